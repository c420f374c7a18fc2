"""What an edge node serves: the routes and their live backends (the contract between the
control plane, which computes it from the views, and ``ember server edge``, which renders
it into HAProxy's configuration and runtime state).

A :class:`Listener` is one bound socket (address, port). A TLS listener routes each
connection on the SNI of its ClientHello to one of its hostnames' routes; a TCP listener
has exactly one route. Backends are the healthy instances of the route's process, at the
instance's address and the route's backend port.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

__all__ = ["Backend", "EdgeSettings", "EdgeSnapshot", "Route", "RouteKind"]


class RouteKind(enum.StrEnum):
    TLS = "tls"  # TLS passthrough, routed on SNI
    TCP = "tcp"  # raw TCP on a port of its own


@dataclasses.dataclass(frozen=True, order=True)
class Backend:
    """One instance behind a route."""

    instance_id: str
    address: str  # an IP literal (IPv6 or IPv4), no brackets
    port: int
    healthy: bool = True


@dataclasses.dataclass(frozen=True)
class Route:
    route_id: str
    org_id: str
    app_id: str
    env: str
    process: str
    kind: RouteKind
    address: str
    """The edge address to bind: '0.0.0.0' / '::' for the shared address, or an org's
    dedicated IPv4."""
    port: int
    hostname: str | None
    """TLS routes only: the SNI name (lowercase, no trailing dot)."""
    backend_port: int
    proxy_protocol: str | None = None
    """None or 'v2': send a PROXY protocol v2 header to the backend."""
    backends: tuple[Backend, ...] = ()


@dataclasses.dataclass(frozen=True)
class EdgeSettings:
    inspect_timeout_ms: int = 5000
    """How long a TLS listener waits for a complete ClientHello before closing."""
    max_conn_per_source: int = 200
    """Concurrent connections from one client address, per listener."""
    max_conn_rate_per_source: int = 500
    """New connections per 10 s from one client address, per listener."""
    connect_timeout_ms: int = 5000
    idle_timeout_ms: int = 3_600_000
    check_interval_ms: int = 2000


@dataclasses.dataclass(frozen=True)
class EdgeSnapshot:
    """Everything an edge serves at one cursor of the control plane."""

    cursor: str
    routes: tuple[Route, ...]
    settings: EdgeSettings = dataclasses.field(default_factory=EdgeSettings)

    def listeners(self) -> Mapping[tuple[str, int], tuple[Route, ...]]:
        """(address, port) -> its routes, sorted by hostname, then id."""
        out: dict[tuple[str, int], list[Route]] = {}
        for r in self.routes:
            out.setdefault((r.address, r.port), []).append(r)
        return {
            key: tuple(sorted(rs, key=lambda r: (r.hostname or "", r.route_id)))
            for key, rs in sorted(out.items())
        }
