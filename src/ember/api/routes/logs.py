"""Workload logs: an agent ships its instances' console lines; a user reads and follows an
environment's (`ember logs`). The rules are in ember.api.logs.

Shipping ignores ``Idempotency-Key`` like instance reports do: storing a replay record
per batch would double the writes, and a batch repeated after a lost answer only repeats
a few lines (delivery is at-least-once, ADR-0016).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime

from ember.api.deps import Caller, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.api.logs import LogQuery, Logs
from ember.wire import logs as wl

router = APIRouter()
ENV = "/v1/orgs/{org}/apps/{app}/envs/{env}"
MAX_WAIT_S = 30.0


def logs(request: Request) -> Logs:
    svc: Logs = request.app.state.logs
    return svc


Lgs = Annotated[Logs, Depends(logs)]


@router.post(
    "/v1/hosts/{host_id}/instances/{instance_id}/logs",
    response_model=wl.LogShipAccepted,
    status_code=202,
    responses=ERRORS,
    tags=["agents"],
)
def ship_logs(
    host_id: str, instance_id: str, body: wl.LogShipRequest, svc: Lgs, who: Caller
) -> wl.LogShipAccepted:
    """An agent ships lines it read from the console of an instance assigned to its host
    (404 `instance.not_found` for any other). At most 1000 lines and 256 KiB of text
    (422 `logs.batch_too_large`); no NUL (422 `logs.invalid`). An operator, or the host's
    own node."""
    accepted = svc.ship(who, host_id, instance_id, body.lines)
    return wl.LogShipAccepted(instance_id=instance_id, accepted=accepted)


@router.get(ENV + "/logs", response_model=wl.LogPage, responses=ERRORS, tags=["logs"])
async def read_logs(
    org: str,
    app: str,
    env: str,
    svc: Lgs,
    who: Who,
    process: Annotated[
        str | None, Query(max_length=63, description="Only this process's lines.")
    ] = None,
    instance: Annotated[
        str | None, Query(max_length=100, description="Only this instance's lines (its id).")
    ] = None,
    since: Annotated[
        AwareDatetime | None,
        Query(description="Only lines read at or after this time (RFC 3339, with offset)."),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            max_length=19,
            pattern=r"^\d{1,19}$",
            description="The cursor of a previous read: the lines stored after it, oldest "
            "first. Without it: the newest lines.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=wl.MAX_READ_LIMIT, description="Lines per answer.")] = 100,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="With `after`: seconds to wait for a matching line when there is "
            "none yet (long-poll; 422 `logs.invalid` without `after`).",
        ),
    ] = 0,
) -> wl.LogPage:
    """The environment's console lines, oldest first: without `after` the newest `limit`
    lines, with it the lines stored after that cursor. Filters: `process`, `instance`,
    `since`. `cursor` continues where the answer ends, filters or not."""
    query = LogQuery(
        process=process,
        instance=instance,
        since=since,
        after=int(after) if after is not None else None,
        limit=limit,
    )
    return await svc.read(who, org, app, env, query, wait)
