"""Hosts (platform operators) and the agent-facing routes: allocations and reports.

Every route needs a platform operator's unscoped admin token (403 ``auth.forbidden``
otherwise). Heartbeats and reports ignore ``Idempotency-Key``: they are idempotent by
nature (a repeat changes nothing), and storing a replay record per heartbeat would write
on every beat of every host — exactly what keeping heartbeats out of the log avoids.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import JSONResponse

from ember.api import convert, idempotency
from ember.api.deps import Paging, Svc, Who
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


Hst = Annotated[Hosts, Depends(hosts)]


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
def register_host(host_id: str, body: wh.HostRegister, svc: Hst, who: Who) -> Response:
    """Register a host (201) or update what it offers (200); the same facts again change
    nothing (200). Counts as a heartbeat."""
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


@router.get("/v1/hosts/{host_id}", response_model=wh.HostDetail, responses=ERRORS, tags=["hosts"])
def get_host(host_id: str, svc: Hst, who: Who) -> wh.HostDetail:
    """One host with its instances that have not ended."""
    return _detail(svc, who, svc.get(who, host_id))


@router.post("/v1/hosts/{host_id}/heartbeat", status_code=204, responses=ERRORS, tags=["hosts"])
def heartbeat(
    host_id: str,
    svc: Hst,
    who: Who,
    body: Annotated[wh.HostHeartbeat | None, Body()] = None,
) -> Response:
    """The host is alive (moves ``last_seen``; no event is written)."""
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
def allocations(host_id: str, svc: Hst, who: Who) -> wh.Allocations:
    """What the host's agent should run: every instance assigned to it that has not
    ended, and the cursor of the views they were read from."""
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
    instance_id: str, body: wh.InstanceReport, svc: Hst, who: Who
) -> wh.InstanceReportAccepted:
    """An agent reports what it observed about an instance on its host; a report that
    changes nothing is accepted and writes nothing."""
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
