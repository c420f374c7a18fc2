"""Request and response bodies of routes, dedicated IPv4 addresses and the edge's snapshot
(docs/specs/api.md, "Routes", "Dedicated IPv4 addresses", "Edge").

The server checks values with ember.core.routes.check_route and answers 422
``route.invalid`` with ``detail.field``; the descriptions below document those rules.
Field names are a contract: add fields freely, never rename or remove one.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from ember.core import edge
from ember.wire.models import Body


class RouteCreate(Body):
    kind: Literal["tls", "tcp"] = Field(
        "tls",
        description="tls: TLS passed through, routed on the SNI name (needs `hostname`); "
        "tcp: raw TCP on a port of its own.",
    )
    hostname: str | None = Field(
        None,
        max_length=300,
        description="TLS routes: the name clients send as SNI (lowercase letters, digits, "
        "'-' and '.'; at most 253 characters; no trailing dot; no wildcard yet).",
        examples=["api.example.com"],
    )
    port: int | Literal["auto"] | None = Field(
        None,
        description="The edge port. TLS: 443 (default) or a port of the pool. TCP: a free "
        "port of the pool, or `auto` (default) for the lowest free one.",
        examples=[443],
    )
    process: str = Field(
        max_length=63, description="The process that serves the route.", examples=["web"]
    )
    backend_port: int = Field(
        description="The port the process listens on (1-65535).", examples=[8443]
    )
    proxy_protocol: Literal["v2"] | None = Field(
        None,
        description="v2: every connection to the backend starts with a PROXY protocol v2 "
        "header carrying the client's address; the service must expect it. Off by default.",
    )
    ip: str | None = Field(
        None,
        max_length=45,
        description="Bind a dedicated IPv4 address of the org; default: the shared address.",
        examples=["203.0.113.7"],
    )


class Route(BaseModel):
    id: str
    app: str
    env: str
    kind: str = Field(description="tls | tcp")
    hostname: str | None = Field(description="TLS routes: the SNI name; null for TCP.")
    address: str = Field(description="The edge address the route binds.")
    dedicated: bool = Field(description="The address is a dedicated IPv4 address of the org.")
    port: int
    port_auto: bool = Field(description="The port was allocated from the pool (`auto`).")
    process: str
    backend_port: int
    proxy_protocol: str | None = Field(description="v2, or null (off).")
    created_at: dt.datetime


class IpAllocate(Body):
    family: Literal["ipv4"] = Field("ipv4", description="Only dedicated IPv4 is offered.")


class IpAddress(BaseModel):
    address: str
    family: str = Field(description="ipv4")
    org: str
    billing: str = Field(
        description="The paid add-on this address is billed as: dedicated_ipv4.",
        examples=["dedicated_ipv4"],
    )
    routes: int = Field(description="Routes bound to it (it can be released only at 0).")
    allocated_at: dt.datetime


# -- the edge's read API -----------------------------------------------------------------------


class EdgeBackend(BaseModel):
    instance_id: str
    address: str = Field(description="The instance's IP literal (no brackets).")
    port: int = Field(description="The route's backend port.")
    healthy: bool


class EdgeRoute(BaseModel):
    route_id: str
    org_id: str
    app_id: str
    env: str
    process: str
    kind: str = Field(description="tls | tcp")
    address: str
    port: int
    hostname: str | None
    backend_port: int
    proxy_protocol: str | None
    backends: list[EdgeBackend] = Field(
        description="The healthy instances of the route's process that reported an address."
    )


class EdgeSettings(BaseModel):
    inspect_timeout_ms: int
    max_conn_per_source: int
    max_conn_rate_per_source: int
    connect_timeout_ms: int
    idle_timeout_ms: int
    check_interval_ms: int


class EdgeSnapshot(BaseModel):
    """ember.core.edge.EdgeSnapshot on the wire (``to_core`` / ``from_core``)."""

    cursor: str = Field(
        description="How far the routes and instance views have read the event log: pass "
        "it back as `after` to wait for the next change."
    )
    routes: list[EdgeRoute]
    settings: EdgeSettings

    def to_core(self) -> edge.EdgeSnapshot:
        return edge.EdgeSnapshot(
            cursor=self.cursor,
            routes=tuple(
                edge.Route(
                    route_id=r.route_id,
                    org_id=r.org_id,
                    app_id=r.app_id,
                    env=r.env,
                    process=r.process,
                    kind=edge.RouteKind(r.kind),
                    address=r.address,
                    port=r.port,
                    hostname=r.hostname,
                    backend_port=r.backend_port,
                    proxy_protocol=r.proxy_protocol,
                    backends=tuple(
                        edge.Backend(b.instance_id, b.address, b.port, b.healthy)
                        for b in r.backends
                    ),
                )
                for r in self.routes
            ),
            settings=edge.EdgeSettings(**self.settings.model_dump()),
        )

    @classmethod
    def from_core(cls, snapshot: edge.EdgeSnapshot) -> EdgeSnapshot:
        s = snapshot.settings
        return cls(
            cursor=snapshot.cursor,
            routes=[
                EdgeRoute(
                    route_id=r.route_id,
                    org_id=r.org_id,
                    app_id=r.app_id,
                    env=r.env,
                    process=r.process,
                    kind=r.kind.value,
                    address=r.address,
                    port=r.port,
                    hostname=r.hostname,
                    backend_port=r.backend_port,
                    proxy_protocol=r.proxy_protocol,
                    backends=[
                        EdgeBackend(
                            instance_id=b.instance_id,
                            address=b.address,
                            port=b.port,
                            healthy=b.healthy,
                        )
                        for b in r.backends
                    ],
                )
                for r in snapshot.routes
            ],
            settings=EdgeSettings(
                inspect_timeout_ms=s.inspect_timeout_ms,
                max_conn_per_source=s.max_conn_per_source,
                max_conn_rate_per_source=s.max_conn_rate_per_source,
                connect_timeout_ms=s.connect_timeout_ms,
                idle_timeout_ms=s.idle_timeout_ms,
                check_interval_ms=s.check_interval_ms,
            ),
        )
