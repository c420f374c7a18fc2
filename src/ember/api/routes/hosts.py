"""Hosts (platform operators) and the agent-facing routes: enrolment, allocations and
reports.

Every route needs a platform operator's unscoped admin token (403 ``auth.forbidden``
otherwise), except: the agent routes (register, heartbeat, allocations, reports) also
take the node identity of that very host (``Caller``, a signed request), and enrolment
takes no Authorization at all (its one-time token is in the body). Heartbeats, reports
and enrolment ignore ``Idempotency-Key``: they are idempotent by nature (a repeat changes
nothing), and storing a replay record per heartbeat would write on every beat of every
host — exactly what keeping heartbeats out of the log avoids.

The allocation watch is a long-poll like the edge's snapshot: an asyncio task waiting on
the host's key of the allocation feed (ember.api.edge_feed), so a waiting agent holds no
worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ember.api import convert, idempotency
from ember.api.deps import Caller, Paging, Svc, Who
from ember.api.enrollment import Enrollment
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.api.errors import error_response
from ember.api.hosts import AllocationChange, CursorExpired, Hosts
from ember.api.idempotency import IdempotencyContext
from ember.core.events import Cursor
from ember.core.instances import TERMINAL
from ember.core.tenancy import Principal
from ember.wire import hosts as wh
from ember.wire import models as w

router = APIRouter()

Row = dict[str, Any]
MAX_WAIT_S = 30.0
_GONE: dict[int | str, dict[str, Any]] = {
    410: {
        "model": w.ErrorEnvelope,
        "description": "`allocations.cursor_expired`: the watch cannot resume from this "
        "cursor; list the allocations again and watch from the list's cursor.",
    }
}


def hosts(request: Request) -> Hosts:
    svc: Hosts = request.app.state.hosts
    return svc


def enrollment(request: Request) -> Enrollment:
    svc: Enrollment = request.app.state.enrollment
    return svc


Hst = Annotated[Hosts, Depends(hosts)]
Enr = Annotated[Enrollment, Depends(enrollment)]


def host(row: Row, instances: list[Row] | None = None) -> wh.Host:
    fields = {
        "id": row["host_id"],
        "state": "down" if row["down"] else row["admin_state"],
        "admin_state": row["admin_state"],
        "vcpus": row["vcpus"],
        "memory_mb": row["memory_mb"],
        "disk_mb": row["disk_mb"],
        "labels": row["labels"],
        "region": row["region"],
        "address": row["address"],
        "last_seen": row["last_seen"],
        "public_key": row["public_key"],
        "registered_at": row["registered_at"],
        "state_since": row["state_since"],
        "usage": wh.HostUsage(
            instances=row["used_instances"],
            memory_mb=row["used_memory_mb"],
            cpus=row["used_cpus"],
        ),
    }
    if instances is None:
        return wh.Host(**fields)
    return wh.HostDetail(
        **fields,
        instances=[
            wh.HostInstance(
                instance_id=i["instance_id"],
                app_id=i["app_id"],
                org=i["org_name"],
                app=i["app_name"],
                env=i["env"],
                process=i["process"],
                state=i["state"],
                memory_mb=i["memory_mb"],
                cpus=round(i["cpus"], 3),
            )
            for i in instances
        ],
    )


def _detail(svc: Hosts, who: Principal, row: Row) -> wh.HostDetail:
    detail = host(row, svc.instances(who, row["host_id"]))
    assert isinstance(detail, wh.HostDetail)
    return detail


@router.get("/v1/hosts", response_model=w.Page[wh.Host], responses=ERRORS, tags=["hosts"])
def list_hosts(svc: Hst, who: Who, page: Paging) -> w.Page[wh.Host]:
    """Every host, by id, with what its instances use."""
    rows = svc.list_hosts(who, page.cursor, page.limit)
    return w.Page(
        items=[host(r) for r in rows],
        next_cursor=rows[-1]["host_id"] if len(rows) == page.limit else None,
    )


@router.put(
    "/v1/hosts/{host_id}",
    response_model=wh.HostDetail,
    status_code=201,
    responses={200: {"model": wh.HostDetail}, **ERRORS},
    tags=["hosts"],
)
def register_host(host_id: str, body: wh.HostRegister, svc: Hst, who: Caller) -> Response:
    """Register a host (201) or update what it offers (200); the same facts again change
    nothing (200). Counts as a heartbeat. An operator, or the host's own node."""
    row, created = svc.register(
        who,
        host_id,
        vcpus=body.vcpus,
        memory_mb=body.memory_mb,
        disk_mb=body.disk_mb,
        labels=body.labels,
        region=body.region,
        address=body.address,
    )
    return JSONResponse(convert.dump(_detail(svc, who, row)), status_code=201 if created else 200)


@router.post(
    "/v1/hosts/enrollment-tokens",
    response_model=wh.EnrollmentTokenCreated,
    status_code=201,
    responses=ERRORS,
    tags=["hosts"],
)
def create_enrollment_token(
    body: wh.EnrollmentTokenCreate, svc: Svc, enr: Enr, who: Who, idem: idempotency.Idem
) -> Response:
    """A one-time token a host's agent enrols with (``POST /v1/agents/enroll``), for one
    host or any. The secret is in the response only: hand it to the host now."""

    def go() -> tuple[int, object]:
        secret, created = enr.create_token(
            who, host_id=body.host_id, expires_in_s=body.expires_in_s
        )
        out = wh.EnrollmentTokenCreated(
            token=secret, host_id=created.host_id, expires_at=created.expires_at
        )
        return 201, convert.dump(out)

    return idempotency.run(svc.db, idem, who, go, secret_field="token")  # noqa: S106 - a field name


@router.post(
    "/v1/agents/enroll",
    response_model=wh.Enrolled,
    status_code=201,
    responses={200: {"model": wh.Enrolled}, **ERRORS},
    tags=["agents"],
)
def enroll(body: wh.AgentEnroll, enr: Enr) -> Response:
    """A host's agent trades a one-time enrolment token for its node identity: the host
    is registered (or updated) and ``public_key`` bound to it (201). The same token, host
    and key again answers 200 and changes nothing. No Authorization header: the token is
    the credential (401 ``auth.unauthorized`` when it is unknown, expired, used, or made
    for another host). Replacing the key of a host that has one needs a token made for
    that host (403 otherwise)."""
    created = enr.enroll(
        token=body.token,
        host_id=body.host_id,
        public_key=body.public_key,
        vcpus=body.vcpus,
        memory_mb=body.memory_mb,
        disk_mb=body.disk_mb,
        labels=body.labels,
        region=body.region,
        address=body.address,
    )
    return JSONResponse(
        convert.dump(wh.Enrolled(host_id=body.host_id)), status_code=201 if created else 200
    )


@router.get("/v1/hosts/{host_id}", response_model=wh.HostDetail, responses=ERRORS, tags=["hosts"])
def get_host(host_id: str, svc: Hst, who: Who) -> wh.HostDetail:
    """One host with its instances that have not ended."""
    return _detail(svc, who, svc.get(who, host_id))


@router.post("/v1/hosts/{host_id}/heartbeat", status_code=204, responses=ERRORS, tags=["hosts"])
def heartbeat(
    host_id: str,
    svc: Hst,
    who: Caller,
    body: Annotated[wh.HostHeartbeat | None, Body()] = None,
) -> Response:
    """The host is alive (moves ``last_seen``; no event is written). An operator, or the
    host's own node."""
    svc.heartbeat(who, host_id, body.report if body else {})
    return Response(status_code=204)


def _admin(
    action: str, host_id: str, svc: Svc, hst: Hosts, who: Principal, idem: IdempotencyContext
) -> Response:
    def go() -> tuple[int, object]:
        return 200, convert.dump(_detail(hst, who, hst.admin(who, host_id, action)))

    return idempotency.run(svc.db, idem, who, go)


@router.post(
    "/v1/hosts/{host_id}/cordon", response_model=wh.HostDetail, responses=ERRORS, tags=["hosts"]
)
def cordon_host(host_id: str, svc: Svc, hst: Hst, who: Who, idem: idempotency.Idem) -> Response:
    """Place nothing new on the host; what runs there stays (idempotent)."""
    return _admin("cordon", host_id, svc, hst, who, idem)


@router.post(
    "/v1/hosts/{host_id}/uncordon", response_model=wh.HostDetail, responses=ERRORS, tags=["hosts"]
)
def uncordon_host(host_id: str, svc: Svc, hst: Hst, who: Who, idem: idempotency.Idem) -> Response:
    """The host receives new instances again, also after a drain (idempotent)."""
    return _admin("uncordon", host_id, svc, hst, who, idem)


@router.post(
    "/v1/hosts/{host_id}/drain", response_model=wh.HostDetail, responses=ERRORS, tags=["hosts"]
)
def drain_host(host_id: str, svc: Svc, hst: Hst, who: Who, idem: idempotency.Idem) -> Response:
    """Place nothing new on the host, and let the controller move its instances
    elsewhere (idempotent)."""
    return _admin("drain", host_id, svc, hst, who, idem)


@router.get(
    "/v1/hosts/{host_id}/allocations",
    response_model=wh.Allocations,
    responses=ERRORS,
    tags=["agents"],
)
def allocations(host_id: str, svc: Hst, who: Caller) -> wh.Allocations:
    """What the host's agent should run: every instance assigned to it that has not
    ended, and the cursor of the views they were read from. An operator, or the host's
    own node."""
    rows, cursor = svc.allocations(who, host_id)
    return wh.Allocations(host_id=host_id, cursor=cursor, items=[allocation(r) for r in rows])


def allocation(row: Row) -> wh.Allocation:
    ending = row["state"] == "stopping" or row["state"] in TERMINAL
    return wh.Allocation(
        instance_id=row["instance_id"],
        org_id=row["org_id"] or "",
        app_id=row["app_id"],
        env=row["env"],
        process=row["process"],
        state=row["state"],
        desired="stop" if ending else "run",
        spec=row["spec"],
    )


@router.get(
    "/v1/hosts/{host_id}/allocations/watch",
    response_model=wh.AllocationChanges,
    responses={**ERRORS, **_GONE},
    tags=["agents"],
)
async def watch_allocations(
    host_id: str,
    request: Request,
    who: Caller,
    cursor: Annotated[
        str | None,
        Query(
            max_length=41,
            pattern=r"^\d{1,20}-\d{1,20}$",
            description="The cursor of the list, or of the previous watch answer; omitted: "
            "every current allocation is `added` (the list, in the watch's shape).",
        ),
    ] = None,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait for a change after `cursor`."),
    ] = 0,
) -> Response:
    """What changed in the host's allocations after `cursor`: each changed allocation once
    (`added`, `modified`, `removed`) and the cursor to watch from next. With `wait`,
    answers as soon as something changed, or with no events when the wait runs out. 410
    `allocations.cursor_expired` when the cursor cannot be resumed from (another
    database's, or too far behind): list again. An operator, or the host's own node."""
    svc: Hosts = request.app.state.hosts
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, svc.max_wait_s)
    try:
        if cursor is None:  # from nothing, as Kubernetes: every allocation is added
            rows, upto = await run_in_threadpool(svc.allocations, who, host_id)
            changes = [AllocationChange("added", r) for r in rows]
        else:
            await run_in_threadpool(svc.check_watch, who, host_id)
            changes, upto = await run_in_threadpool(
                svc.allocation_changes, host_id, Cursor.parse(cursor)
            )
        while not changes and (left := deadline - loop.time()) > 0:
            # Nothing for this host up to ``upto``: wait past it (a cursor of our own now,
            # so neither checked nor bounded), then read once more, also when time ran out.
            after = Cursor.parse(upto)
            await svc.feed.wait_past(after, left, key=host_id)
            changes, upto = await run_in_threadpool(
                svc.allocation_changes, host_id, after, check=False
            )
    except CursorExpired as exc:
        return error_response(410, {"error": exc.to_dict()})
    out = wh.AllocationChanges(host_id=host_id, cursor=upto, events=[_event(c) for c in changes])
    return JSONResponse(convert.dump(out))


def _event(change: AllocationChange) -> wh.AllocationEvent:
    return wh.AllocationEvent(type=change.type, allocation=allocation(change.row))


@router.post(
    "/v1/instances/{instance_id}/reports",
    response_model=wh.InstanceReportAccepted,
    status_code=202,
    responses=ERRORS,
    tags=["agents"],
)
def report_instance(
    instance_id: str, body: wh.InstanceReport, svc: Hst, who: Caller
) -> wh.InstanceReportAccepted:
    """An agent reports what it observed about an instance on its host; a report that
    changes nothing is accepted and writes nothing. An operator, or the node of the host
    named in the body."""
    state = svc.report(
        who,
        instance_id,
        host_id=body.host_id,
        state=body.state,
        exit_code=body.exit_code,
        reason=body.reason,
        address=body.address,
    )
    return wh.InstanceReportAccepted(instance_id=instance_id, state=state)
