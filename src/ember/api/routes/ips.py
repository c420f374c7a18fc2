"""Dedicated IPv4 addresses of an org: a paid add-on (billing ``dedicated_ipv4``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from ember.api import idempotency
from ember.api.deps import Paging, Svc, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.api.routes.edge_routes import Rtg
from ember.core import ipv4
from ember.wire import models as w
from ember.wire import routes as wr

router = APIRouter(prefix="/v1/orgs/{org}/ips", tags=["ips"])


def ip_address(row: dict[str, Any]) -> wr.IpAddress:
    return wr.IpAddress(
        address=row["address"],
        family="ipv4",
        org=row["org_name"],
        billing=ipv4.BILLING,
        routes=row["routes"],
        allocated_at=row["allocated_at"],
    )


@router.get("", response_model=w.Page[wr.IpAddress], responses=ERRORS)
def list_ips(org: str, rtg: Rtg, who: Who, page: Paging) -> w.Page[wr.IpAddress]:
    """The org's dedicated addresses, in the order they were allocated."""
    rows = rtg.list_ips(who, org, page.cursor, page.limit)
    return w.Page(
        items=[ip_address(r) for r in rows],
        next_cursor=rows[-1]["ip_id"] if len(rows) == page.limit else None,
    )


@router.post("", response_model=wr.IpAddress, status_code=201, responses=ERRORS)
def allocate_ip(
    org: str, body: wr.IpAllocate, svc: Svc, rtg: Rtg, who: Who, idem: idempotency.Idem
) -> Response:
    """Allocate a dedicated IPv4 address to the org (capability `admin`), the lowest free
    one of the platform's pool; 409 `ipv4.pool_exhausted` when none is free. Every call
    allocates another address, except a retry with the same `Idempotency-Key`."""

    def go() -> tuple[int, object]:
        return 201, ip_address(rtg.allocate_ipv4(who, org)).model_dump(mode="json")

    return idempotency.run(svc.db, idem, who, go)


@router.delete("/{address}", status_code=204, responses=ERRORS)
def release_ip(org: str, address: str, rtg: Rtg, who: Who) -> Response:
    """Give the address back to the pool (capability `admin`); 409 `ipv4.in_use` while
    routes bind it; 404 `ipv4.not_found` when it is not the org's."""
    rtg.release_ip(who, org, address)
    return Response(status_code=204)
