"""Hosts (platform operators) and the agent-facing routes: enrolment, allocations and
reports.

Every route needs a platform operator's unscoped admin token (403 ``auth.forbidden``
otherwise), except: the agent routes (register, heartbeat, allocations, reports) also
take the node identity of that very host (``Caller``, a signed request), and enrolment
takes no Authorization at all (its one-time token is in the body). Heartbeats, reports
and enrolment ignore ``Idempotency-Key``: they are idempotent by nature (a repeat changes
nothing), and storing a replay record per heartbeat would write on every beat of every
host — exactly what keeping heartbeats out of the log avoids.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import JSONResponse

from ember.api import convert, idempotency
from ember.api.deps import Caller, Paging, Svc, Who
from ember.api.enrollment import Enrollment
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.api.hosts import Hosts
from ember.api.idempotency import IdempotencyContext
from ember.core.tenancy import Principal
from ember.wire import hosts as wh
from ember.wire import models as w

router = APIRouter()

Row = dict[str, Any]


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
    return wh.Allocations(
        host_id=host_id,
        cursor=cursor,
        items=[
            wh.Allocation(
                instance_id=r["instance_id"],
                app_id=r["app_id"],
                env=r["env"],
                process=r["process"],
                state=r["state"],
                desired="stop" if r["state"] == "stopping" else "run",
                spec=r["spec"],
            )
            for r in rows
        ],
    )


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
