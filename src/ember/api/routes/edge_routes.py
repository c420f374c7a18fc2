"""Routes of an environment (TLS passthrough on SNI, raw TCP) and the edge's read API.

The edge's snapshot is for platform operators (edges authenticate like agents, with an
operator's unscoped admin token, until edges enrol with node identities). Its long-poll
waits on the event log's notifications in an asyncio task (ember.api.edge_feed), so a
waiting edge holds no worker thread.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from ember.api import idempotency
from ember.api.deps import Paging, Svc, Who
from ember.api.errors import ERROR_RESPONSES as ERRORS
from ember.api.routing import Routing
from ember.core.events import Cursor
from ember.core.tenancy import check_operator
from ember.wire import models as w
from ember.wire import routes as wr

router = APIRouter()
ENV = "/v1/orgs/{org}/apps/{app}/envs/{env}"
MAX_WAIT_S = 30.0


def routing(request: Request) -> Routing:
    svc: Routing = request.app.state.routing
    return svc


Rtg = Annotated[Routing, Depends(routing)]


def route(row: dict[str, Any]) -> wr.Route:
    return wr.Route(
        id=row["route_id"],
        app=row["app_name"],
        env=row["env"],
        kind=row["kind"],
        hostname=row["hostname"],
        address=row["address"],
        dedicated=row["ip_id"] is not None,
        port=row["port"],
        port_auto=row["port_auto"],
        process=row["process"],
        backend_port=row["backend_port"],
        proxy_protocol=row["proxy_protocol"],
        created_at=row["created_at"],
    )


@router.get(ENV + "/routes", response_model=w.Page[wr.Route], responses=ERRORS, tags=["routes"])
def list_routes(org: str, app: str, env: str, rtg: Rtg, who: Who, page: Paging) -> w.Page[wr.Route]:
    """The environment's routes, oldest first."""
    rows = rtg.list_routes(who, org, app, env, page.cursor, page.limit)
    return w.Page(
        items=[route(r) for r in rows],
        next_cursor=rows[-1]["route_id"] if len(rows) == page.limit else None,
    )


@router.post(
    ENV + "/routes",
    response_model=wr.Route,
    status_code=201,
    responses={200: {"model": wr.Route}, **ERRORS},
    tags=["routes"],
)
def create_route(
    org: str,
    app: str,
    env: str,
    body: wr.RouteCreate,
    svc: Svc,
    rtg: Rtg,
    who: Who,
    idem: idempotency.Idem,
) -> Response:
    """Route connections to a process: TLS routed on SNI (`kind: tls`, a `hostname`) or
    raw TCP on a port of its own (`kind: tcp`). 200 with the existing route when the
    environment has this route already (nothing is written)."""

    def go() -> tuple[int, object]:
        row, created = rtg.create(
            who,
            org,
            app,
            env,
            kind=body.kind,
            hostname=body.hostname,
            port=body.port,
            process=body.process,
            backend_port=body.backend_port,
            proxy_protocol=body.proxy_protocol,
            ip=body.ip,
        )
        return (201 if created else 200), route(row).model_dump(mode="json")

    return idempotency.run(svc.db, idem, who, go)


@router.get(ENV + "/routes/{route_id}", response_model=wr.Route, responses=ERRORS, tags=["routes"])
def get_route(org: str, app: str, env: str, route_id: str, rtg: Rtg, who: Who) -> wr.Route:
    return route(rtg.get(who, org, app, env, route_id))


@router.delete(ENV + "/routes/{route_id}", status_code=204, responses=ERRORS, tags=["routes"])
def delete_route(org: str, app: str, env: str, route_id: str, rtg: Rtg, who: Who) -> Response:
    """Delete the route: new connections stop reaching the process; its TCP port, its
    hostname binding (and, with the org's last route on it, the hostname) become free."""
    rtg.delete(who, org, app, env, route_id)
    return Response(status_code=204)


@router.get("/v1/edge/snapshot", response_model=wr.EdgeSnapshot, responses=ERRORS, tags=["edge"])
async def edge_snapshot(
    request: Request,
    who: Who,
    after: Annotated[
        str | None,
        Query(
            max_length=41,
            pattern=r"^\d{1,20}-\d{1,20}$",
            description="The cursor of the snapshot the edge has; with `wait`, answer when "
            "something the edge serves changed after it.",
        ),
    ] = None,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait for a change past `after`."),
    ] = 0,
) -> wr.EdgeSnapshot:
    """Every route with its backends (the healthy instances of its process that reported
    an address), and the cursor they were read at. With `after` and `wait`: long-poll,
    answering as soon as a route or an instance changed after `after`, or when `wait`
    runs out (then possibly with the same routes)."""
    rtg: Routing = request.app.state.routing
    check_operator(who, "read the edge's routes")
    if after is not None and wait > 0:
        since = Cursor.parse(after)
        # A cursor this log never reached (another installation's): answer at once.
        if since <= await run_in_threadpool(rtg.log_head):
            await rtg.feed.wait_past(since, min(wait, rtg.max_wait_s))
    snapshot = await run_in_threadpool(rtg.snapshot)
    return wr.EdgeSnapshot.from_core(snapshot)
