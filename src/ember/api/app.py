"""The control-plane HTTP API (FastAPI). ``create_app`` is the only constructor."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ember import __version__
from ember.api import errors
from ember.api.enrollment import Enrollment
from ember.api.hosts import Hosts
from ember.api.logs import Logs
from ember.api.middleware import EdgeMiddleware, Metrics
from ember.api.releases import Releases
from ember.api.routes import (
    apps,
    edge_routes,
    hosts,
    ips,
    logs,
    orgs,
    releases,
    tokens,
    workloads,
)
from ember.api.routing import Routing
from ember.api.service import Tenancy
from ember.api.workloads import Workloads
from ember.core.catalog import REGISTRY
from ember.core.routes import RoutingConfig
from ember.store.db import Database
from ember.store.eventlog import EventLog
from ember.store.logs import Retention
from ember.store.projections import ProjectionRunner
from ember.store.views import all_projections
from ember.wire import models as w


@dataclasses.dataclass(frozen=True)
class ApiSettings:
    database_url: str
    max_body_bytes: int = 1024 * 1024
    pool_size: int = 10
    registry_url: str | None = None
    """The platform registry `ember deploy` pushes to (EMBER_REGISTRY_URL)."""
    routing: RoutingConfig = dataclasses.field(default_factory=RoutingConfig)
    """The edge's port pool, dedicated IPv4 pool and shared address (EMBER_EDGE_*)."""
    edge_max_wait_s: float = 30.0
    """The longest a long-poll is held — an edge's snapshot, an agent's allocation watch,
    `ember logs -f` (a request may ask for less)."""
    log_retention: Retention = dataclasses.field(default_factory=Retention)
    """How many workload log lines are kept, and how long (ember.store.logs)."""


def create_app(settings: ApiSettings | None) -> FastAPI:
    """Build the app. ``settings=None`` builds it without a database (OpenAPI export)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings is None:
            yield
            return
        db = Database(settings.database_url, max_size=settings.pool_size)
        # An Idempotency-Key's lock is held on one connection for the whole request while
        # the work takes others: from the same pool, pool_size concurrent keyed requests
        # would hold every connection and wait for one more until the pool times out.
        locks = Database(settings.database_url, max_size=settings.pool_size)
        log = EventLog(db, REGISTRY)
        app.state.tenancy = Tenancy(db, log, ProjectionRunner(db, REGISTRY, all_projections()))
        app.state.releases = Releases(app.state.tenancy)
        app.state.workloads = Workloads(app.state.tenancy, app.state.releases)
        app.state.hosts = Hosts(app.state.tenancy, max_wait_s=settings.edge_max_wait_s)
        app.state.enrollment = Enrollment(app.state.hosts)
        app.state.routing = Routing(
            app.state.tenancy,
            app.state.releases,
            settings.routing,
            max_wait_s=settings.edge_max_wait_s,
        )
        app.state.logs = Logs(
            app.state.tenancy,
            app.state.releases,
            settings.log_retention,
            max_wait_s=settings.edge_max_wait_s,
        )
        app.state.idempotency_locks = locks
        try:
            yield
        finally:
            app.state.routing.close()
            app.state.logs.close()
            app.state.hosts.close()
            locks.close()
            db.close()

    app = FastAPI(
        title="Ember control-plane API",
        version=__version__,
        description="Orgs, members, apps, environments, tokens, releases, routes, dedicated "
        "addresses and (for platform "
        "operators) hosts. Errors use the envelope "
        '`{"error": {"code", "message", "detail", "hint"}}` with stable codes.',
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.add_middleware(
        EdgeMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes if settings else 1024 * 1024,
    )
    errors.install(app)
    for router in (
        orgs.router,
        apps.router,
        releases.router,
        workloads.router,
        tokens.router,
        hosts.router,
        edge_routes.router,
        ips.router,
        logs.router,
    ):
        app.include_router(router)

    @app.get("/healthz", response_model=w.Health, tags=["health"])
    def healthz() -> w.Health:
        """The process is up."""
        return w.Health(status="ok")

    @app.get(
        "/readyz",
        response_model=w.Health,
        tags=["health"],
        responses={503: {"model": w.ErrorEnvelope}},
    )
    def readyz() -> w.Health:
        """The database answers; a load balancer may send traffic."""
        with app.state.tenancy.db.connection() as conn:
            conn.execute("SELECT 1")
        return w.Health(status="ready")

    @app.get("/v1/platform", response_model=w.Platform, tags=["platform"])
    def platform() -> w.Platform:
        """What clients need to know about this installation (no token needed)."""
        return w.Platform(
            version=__version__, registry_url=settings.registry_url if settings else None
        )

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
