"""What runs in an environment: scale, restart, status, rollout promote / abort."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from ember.api import convert, idempotency
from ember.api.deps import Svc, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.api.workloads import Workloads
from ember.core.workloads import ProcessScale
from ember.wire import workloads as ww

router = APIRouter(prefix="/v1/orgs/{org}/apps/{app}/envs/{env}", tags=["workloads"])


def workloads(request: Request) -> Workloads:
    svc: Workloads = request.app.state.workloads
    return svc


Wl = Annotated[Workloads, Depends(workloads)]


@router.post("/scale", response_model=ww.Formation, responses=ERRORS)
def scale(
    org: str,
    app: str,
    env: str,
    body: ww.ScaleRequest,
    svc: Svc,
    wl: Wl,
    who: Who,
    idem: idempotency.Idem,
) -> Response:
    """Set the instance count and/or memory of processes (`ember scale`). Scaling to what
    is set already writes nothing (`changed: false`)."""
    wanted = {
        name: ProcessScale(count=p.count, memory_mb=p.memory_mb)
        for name, p in body.processes.items()
    }

    def go() -> tuple[int, object]:
        return 200, convert.dump(wl.scale(who, org, app, env, wanted))

    return idempotency.run(svc.db, idem, who, go)


@router.post("/restart", response_model=ww.RestartAccepted, status_code=202, responses=ERRORS)
def restart(
    org: str,
    app: str,
    env: str,
    body: ww.RestartRequest,
    svc: Svc,
    wl: Wl,
    who: Who,
    idem: idempotency.Idem,
) -> Response:
    """Replace the instances of the named processes (all when empty), rolling: new ones
    start and become healthy before old ones stop. 202: the controller does the work."""

    def go() -> tuple[int, object]:
        return 202, convert.dump(wl.restart(who, org, app, env, body.processes))

    return idempotency.run(svc.db, idem, who, go)


@router.get("/status", response_model=ww.Status, responses=ERRORS)
def status(org: str, app: str, env: str, wl: Wl, who: Who) -> ww.Status:
    """What is desired, what is running, and why the environment is not converging."""
    return wl.status(who, org, app, env)


@router.post("/rollout/promote", response_model=ww.Rollout, responses=ERRORS)
def promote(
    org: str,
    app: str,
    env: str,
    body: ww.RolloutCommand,
    svc: Svc,
    wl: Wl,
    who: Who,
    idem: idempotency.Idem,
) -> Response:
    """Let a canary that awaits promotion roll out to every instance (409
    `rollout.not_awaiting` otherwise; promoting a promoted rollout changes nothing)."""

    def go() -> tuple[int, object]:
        return 200, convert.dump(wl.promote(who, org, app, env, body.rollout_id))

    return idempotency.run(svc.db, idem, who, go)


@router.post("/rollout/abort", response_model=ww.Rollout, responses=ERRORS)
def abort(
    org: str,
    app: str,
    env: str,
    body: ww.RolloutCommand,
    svc: Svc,
    wl: Wl,
    who: Who,
    idem: idempotency.Idem,
) -> Response:
    """Abort the active rollout: its new instances stop and the previous release is
    released again (409 `rollout.not_active` when none is active; aborting an aborted
    rollout changes nothing)."""

    def go() -> tuple[int, object]:
        return 200, convert.dump(wl.abort(who, org, app, env, body.rollout_id))

    return idempotency.run(svc.db, idem, who, go)
