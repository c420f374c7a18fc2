"""Routes: how connections reach an environment's process through the edge (ADR 0008, 0009).

A **TLS route** passes TLS through, routed on the SNI name of the ClientHello: many
hostnames share one listener (port 443 of the shared address, by default). A **TCP route**
owns a port of its own (from the platform's port pool). Either binds the shared address
or a dedicated IPv4 address of the route's org (ember.core.ipv4).

Uniqueness rules are optimistic-concurrency checks on streams keyed by what must be
unique (as tenancy keys org names), all appended in one transaction with the route:

==================================  ===========================================================
stream                              events, and the rule it guards
==================================  ===========================================================
``routes-<app_id>.<env>``           route.created, route.deleted: the environment's routes
                                    (an identical create answers the existing route)
``hostname-<sha256(name)[:32]>``    hostname.claimed, hostname.bound, hostname.unbound,
                                    hostname.released: a hostname belongs to one org; each
                                    (address, port, hostname) binding to one route
``listener-<address|ip_id>.<port>`` listener.claimed, listener.released: a port of an
                                    address is a TLS port (shared by hostnames, and stays one)
                                    or one TCP route's
``ipv4-<address>``                  ipv4.bound, ipv4.unbound (ember.core.ipv4): the routes on
                                    a dedicated address (it cannot be released under them)
==================================  ===========================================================

Hostname streams are keyed by a hash because a hostname (253 characters) does not fit a
stream id (200). A hostname is **claimed** by the first org that routes it, and released
with that org's last route on it (``verification = "none"``). Ownership verification (a
DNS TXT challenge) plugs in as another way to claim: a ``hostname.claimed`` with
``verification = "dns_txt"`` that the decisions here honour over a first-use claim
(docs/operations/edge-routing.md).

A dedicated address's listener streams are keyed by its allocation id, so what one
allocation did to its ports (a TLS port stays a TLS port) does not outlive it.

Errors (messages never say whose a conflicting object is)::

    ValidationFailed └── InvalidRoute      route.invalid        detail.field names the input
    NotFound         └── RouteNotFound     edge_route.not_found (route.not_found means "no such
                                                                 API path")
    Conflict         ├── RouteConflict     route.conflict       the hostname's binding is routed
                     ├── PortTaken         route.port_in_use    the port of the address (auto
                     │                                          tries the next one)
                     ├── NoFreePort        route.no_free_port   the address's pool is full
                     └── HostnameTaken     hostname.taken       another org routes the name
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from ember.core import ipv4
from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot, Route, RouteKind
from ember.core.errors import Conflict, NotFound, ValidationFailed
from ember.core.events import EventData, EventRegistry, RecordedEvent
from ember.core.manifest_model import PROCESS_NAME_RE

REGISTRY = EventRegistry()
AUTO: Final = "auto"
TLS_PORT: Final = 443
DEFAULT_TCP_PORTS: Final = (10000, 10999)
DEFAULT_SHARED_ADDRESS: Final = "0.0.0.0"  # noqa: S104 - the edge's public listener
PROXY_PROTOCOLS: Final = ("v2",)
_LABEL_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


# -- configuration ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """The edge's addresses and ports, as the control plane allocates them."""

    tcp_ports: tuple[int, int] = DEFAULT_TCP_PORTS
    """The port pool (inclusive): ``--port auto`` takes the lowest free one, an explicit
    TCP port must lie in it (``EMBER_EDGE_TCP_PORTS``, "10000-10999")."""
    ipv4_pool: tuple[ipaddress.IPv4Network, ...] = ipv4.parse_pool(ipv4.DEFAULT_POOL)
    """Where dedicated IPv4 addresses come from (``EMBER_EDGE_IPV4_POOL``)."""
    shared_address: str = DEFAULT_SHARED_ADDRESS
    """What routes without ``--ip`` bind (``EMBER_EDGE_SHARED_ADDRESS``)."""
    tls_port: int = TLS_PORT

    def in_pool(self, port: int) -> bool:
        return self.tcp_ports[0] <= port <= self.tcp_ports[1]

    @property
    def pool_text(self) -> str:
        return f"{self.tcp_ports[0]}-{self.tcp_ports[1]}"


def load_routing_config(environ: Mapping[str, str]) -> RoutingConfig:
    """The routing settings from ``EMBER_EDGE_*`` (defaults for what is unset). Pure: the
    entry point passes its environment in."""
    config = RoutingConfig()
    ports = environ.get("EMBER_EDGE_TCP_PORTS")
    if ports:
        config = dataclasses.replace(config, tcp_ports=_parse_port_range(ports))
    pool = environ.get("EMBER_EDGE_IPV4_POOL")
    if pool:
        config = dataclasses.replace(config, ipv4_pool=ipv4.parse_pool(pool))
    shared = environ.get("EMBER_EDGE_SHARED_ADDRESS")
    if shared:
        try:
            address = str(ipaddress.ip_address(shared.strip()))
        except ValueError:
            raise ValidationFailed(
                f"EMBER_EDGE_SHARED_ADDRESS must be an IP address, not {shared!r}",
                hint="e.g. 0.0.0.0 or ::",
                detail={"field": "EMBER_EDGE_SHARED_ADDRESS"},
            ) from None
        config = dataclasses.replace(config, shared_address=address)
    return config


def _parse_port_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
    low, high = (int(m[1]), int(m[2])) if m else (0, 0)
    if not m or not 1 <= low <= high <= 65535:
        raise ValidationFailed(
            f"EMBER_EDGE_TCP_PORTS must be a port range like 10000-10999, not {text!r}",
            detail={"field": "EMBER_EDGE_TCP_PORTS"},
        )
    return low, high


# -- errors ----------------------------------------------------------------------------------


class InvalidRoute(ValidationFailed):
    code = "route.invalid"


class RouteNotFound(NotFound):
    code = "edge_route.not_found"


class RouteConflict(Conflict):
    code = "route.conflict"
    holders: tuple[str, ...] = ()
    """The routes in the way (for the service, which reaps the orphaned ones; never sent:
    they may be another tenant's)."""


class PortTaken(Conflict):
    """The port of the address is used; ``--port auto`` moves on to the next one."""

    code = "route.port_in_use"
    holders: tuple[str, ...] = ()


class NoFreePort(Conflict):
    code = "route.no_free_port"


class HostnameTaken(Conflict):
    code = "hostname.taken"
    holders: tuple[str, ...] = ()


# -- events ----------------------------------------------------------------------------------


@REGISTRY.register
class RouteCreated(EventData):
    event_type = "route.created"
    route_id: str
    org_id: str
    app_id: str
    env: str
    kind: RouteKind
    address: str
    ip_id: str | None = None
    """The dedicated address's allocation; None on the shared address."""
    port: int
    port_auto: bool = False
    """The port was allocated from the pool (``--port auto``)."""
    hostname: str | None = None
    process: str
    backend_port: int
    proxy_protocol: str | None = None


@REGISTRY.register
class RouteDeleted(EventData):
    event_type = "route.deleted"
    route_id: str
    org_id: str
    app_id: str
    env: str


@REGISTRY.register
class HostnameClaimed(EventData):
    """The org owns the hostname now. ``verification`` says how the claim was made:
    ``none`` (its first route) today; ``dns_txt`` once ownership is verified."""

    event_type = "hostname.claimed"
    hostname: str
    org_id: str
    verification: str = "none"


@REGISTRY.register
class HostnameBound(EventData):
    event_type = "hostname.bound"
    hostname: str
    route_id: str
    address: str
    port: int


@REGISTRY.register
class HostnameUnbound(EventData):
    event_type = "hostname.unbound"
    hostname: str
    route_id: str
    address: str
    port: int


@REGISTRY.register
class HostnameReleased(EventData):
    event_type = "hostname.released"
    hostname: str
    org_id: str


@REGISTRY.register
class ListenerClaimed(EventData):
    """The port of the address serves TLS routes from now on (``route_id`` None: it stays
    a TLS port), or one TCP route."""

    event_type = "listener.claimed"
    address: str
    ip_id: str | None = None
    port: int
    kind: RouteKind
    route_id: str | None = None


@REGISTRY.register
class ListenerReleased(EventData):
    event_type = "listener.released"
    address: str
    ip_id: str | None = None
    port: int
    route_id: str


def routes_stream(app_id: str, env: str) -> str:
    return f"routes-{app_id}.{env}"


def hostname_stream(hostname: str) -> str:
    return "hostname-" + hashlib.sha256(hostname.encode()).hexdigest()[:32]


def listener_stream(address: str, port: int, ip_id: str | None = None) -> str:
    return f"listener-{ip_id or address}.{port}"


# -- validation ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    """A create request, checked and normalised."""

    kind: RouteKind
    hostname: str | None
    port: int | None
    """None: take the lowest free port of the pool (``auto``)."""
    process: str
    backend_port: int
    proxy_protocol: str | None
    ip: str | None
    """A dedicated IPv4 address of the org; None: the shared address."""


def _invalid(field: str, message: str, hint: str | None = None) -> InvalidRoute:
    return InvalidRoute(message, hint=hint, detail={"field": field})


def check_hostname(value: str, field: str = "hostname") -> str:
    """A DNS name an SNI can carry, lowercased: LDH labels of 1-63 characters, at most 253
    characters, at least two labels, no trailing dot, no wildcard (not supported yet)."""
    name = value.strip().lower() if isinstance(value, str) else ""
    if not name:
        raise _invalid(field, "a TLS route needs a hostname", "e.g. --hostname api.example.com")
    if name.startswith("*"):
        raise _invalid(
            field,
            f"wildcard hostnames are not supported yet: {value!r}",
            "create one route per name (api.example.com, www.example.com)",
        )
    if name.endswith("."):
        raise _invalid(field, f"invalid hostname {value!r}", "leave out the trailing dot")
    if not name.isascii() or not name.isprintable():
        raise _invalid(
            field,
            f"invalid hostname {value!r}",
            "write an international name in its ASCII form (punycode: xn--...)",
        )
    if len(name) > 253:
        raise _invalid(field, f"the hostname has {len(name)} characters; at most 253")
    labels = name.split(".")
    if len(labels) < 2:
        raise _invalid(
            field, f"invalid hostname {value!r}", "use a fully qualified name: api.example.com"
        )
    for label in labels:
        if not _LABEL_RE.match(label):
            raise _invalid(
                field,
                f"invalid hostname {value!r}: label {label!r}",
                "labels have 1-63 letters, digits and '-', not starting or ending with '-'",
            )
    if labels[-1].isdigit():
        raise _invalid(
            field,
            f"{value!r} is an IP address, not a hostname",
            "TLS clients send no SNI for an address: route a name, or a TCP port",
        )
    return name


def _check_port(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _invalid(field, f"{field} must be a port number 1-65535, not {value!r}")
    return value


def check_route(
    config: RoutingConfig,
    *,
    kind: str,
    hostname: str | None,
    port: int | str | None,
    process: str,
    backend_port: int,
    proxy_protocol: str | None = None,
    ip: str | None = None,
) -> RouteRequest:
    """Check a create request against the rules of docs/specs/api.md ("Routes")."""
    try:
        route_kind = RouteKind(kind)
    except ValueError:
        raise _invalid("kind", f"a route is 'tls' or 'tcp', not {kind!r}") from None
    wanted: int | None
    if route_kind is RouteKind.TLS:
        name: str | None = check_hostname(hostname or "")
        wanted = _tls_port(config, port)
    else:
        if hostname:
            raise _invalid(
                "hostname",
                "a TCP route has no hostname: it owns its port",
                "leave out --hostname, or leave out --tcp for a TLS route",
            )
        name, wanted = None, _tcp_port(config, port)
    if not isinstance(process, str) or not PROCESS_NAME_RE.match(process):
        raise _invalid(
            "process",
            f"invalid process name {process!r}",
            "process names are lowercase letters, digits and '-' (as in ember.toml)",
        )
    _check_port("backend_port", backend_port)
    if proxy_protocol is not None and proxy_protocol not in PROXY_PROTOCOLS:
        raise _invalid(
            "proxy_protocol",
            f"only PROXY protocol v2 is offered, not {proxy_protocol!r}",
            "use --proxy-protocol v2, or leave it out (off)",
        )
    address = None
    if ip is not None:
        address = ipv4.check_address(ip) if isinstance(ip, str) else None
        if address is None:
            raise _invalid("ip", f"{ip!r} is not an IPv4 address", "e.g. --ip 203.0.113.7")
    return RouteRequest(
        route_kind, name, wanted, process, backend_port, proxy_protocol or None, address
    )


def _tls_port(config: RoutingConfig, port: int | str | None) -> int:
    """TLS: the TLS port (default) or a port of the pool; never ``auto``."""
    if port is None:
        return config.tls_port
    if port == AUTO:
        raise _invalid(
            "port",
            "TLS routes share a TLS port; 'auto' allocates raw TCP ports",
            f"leave out --port (it is {config.tls_port})",
        )
    wanted = _check_port("port", port)
    if wanted != config.tls_port and not config.in_pool(wanted):
        raise _invalid(
            "port",
            f"a TLS route listens on port {config.tls_port} or a port of the pool "
            f"{config.pool_text}",
            f"leave out --port for {config.tls_port}",
        )
    return wanted


def _tcp_port(config: RoutingConfig, port: int | str | None) -> int | None:
    """TCP: a port of the pool, or None for ``auto`` (the default)."""
    if port is None or port == AUTO:
        return None
    wanted = _check_port("port", port)
    if not config.in_pool(wanted):
        raise _invalid(
            "port",
            f"TCP ports come from the pool {config.pool_text}; {wanted} is outside it",
            "use --port auto for the lowest free one",
        )
    return wanted


def free_ports(config: RoutingConfig, used: Iterable[int]) -> Iterator[int]:
    """The pool's ports not in ``used``, lowest first."""
    taken = set(used)
    return (p for p in range(config.tcp_ports[0], config.tcp_ports[1] + 1) if p not in taken)


# -- streams folded --------------------------------------------------------------------------


@dataclasses.dataclass
class EnvRoutes:
    routes: dict[str, RouteCreated] = dataclasses.field(default_factory=dict)


def fold_env_routes(events: Iterable[RecordedEvent]) -> EnvRoutes:
    state = EnvRoutes()
    for e in events:
        if e.type == "route.created":
            created = RouteCreated.model_validate(e.data)
            state.routes[created.route_id] = created
        elif e.type == "route.deleted":
            state.routes.pop(str(e.data["route_id"]), None)
    return state


@dataclasses.dataclass
class HostnameState:
    org_id: str | None = None
    verification: str | None = None
    bindings: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)
    """(address, port) -> the route bound there."""


def fold_hostname(events: Iterable[RecordedEvent]) -> HostnameState:
    state = HostnameState()
    for e in events:
        d = e.data
        if e.type == "hostname.claimed":
            state.org_id, state.verification = d["org_id"], d.get("verification", "none")
        elif e.type == "hostname.released":
            state = HostnameState()
        elif e.type == "hostname.bound":
            state.bindings[(d["address"], int(d["port"]))] = d["route_id"]
        elif e.type == "hostname.unbound":
            key = (d["address"], int(d["port"]))
            if state.bindings.get(key) == d["route_id"]:
                del state.bindings[key]
    return state


@dataclasses.dataclass
class ListenerState:
    kind: RouteKind | None = None
    route_id: str | None = None


def fold_listener(events: Iterable[RecordedEvent]) -> ListenerState:
    state = ListenerState()
    for e in events:
        if e.type == "listener.claimed":
            state = ListenerState(RouteKind(e.data["kind"]), e.data.get("route_id"))
        elif e.type == "listener.released" and e.data["route_id"] == state.route_id:
            state = ListenerState()
    return state


# -- decisions -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Binding:
    """Where a new route binds: the address (and its allocation), and the port."""

    address: str
    ip_id: str | None
    port: int
    port_auto: bool


def same_route(
    existing: Iterable[RouteCreated], req: RouteRequest, address: str
) -> RouteCreated | None:
    """An existing route of the environment that ``req`` asks for again. With
    ``--port auto`` any port of the same address serves."""
    for r in existing:
        if (
            r.kind == req.kind
            and r.hostname == req.hostname
            and r.address == address
            and r.process == req.process
            and r.backend_port == req.backend_port
            and r.proxy_protocol == req.proxy_protocol
            and (req.port is None or r.port == req.port)
        ):
            return r
    return None


def describe_binding(address: str, port: int, hostname: str | None = None) -> str:
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return f"{hostname} on {where}" if hostname else where


def decide_create(
    req: RouteRequest,
    at: Binding,
    *,
    route_id: str,
    org_id: str,
    app_id: str,
    env: str,
    env_routes: EnvRoutes,
    listener: ListenerState,
    hostname: HostnameState | None,
    address: ipv4.AddressState | None,
) -> dict[str, list[EventData]]:
    """The events per stream that create the route, or raise the conflict. The caller
    answers :func:`same_route` first (an identical request changes nothing)."""
    out: dict[str, list[EventData]] = {}
    where = describe_binding(at.address, at.port)
    if at.ip_id is not None:
        assert address is not None
        out[ipv4.ipv4_stream(at.address)] = ipv4.decide_bind(
            address, address=at.address, org_id=org_id, ip_id=at.ip_id, route_id=route_id
        )
    listener_events: list[EventData] = []
    if req.kind is RouteKind.TCP:
        if listener.kind is not None:
            hint = (
                "that port serves TLS routes (routed on SNI); use --port auto"
                if listener.kind is RouteKind.TLS
                else "use --port auto for the lowest free port"
            )
            taken = PortTaken(
                f"port {where} is already in use",
                hint=hint,
                detail={"field": "port", "port": at.port, "address": at.address},
            )
            taken.holders = (listener.route_id,) if listener.route_id else ()
            raise taken
        listener_events.append(
            ListenerClaimed(
                address=at.address, ip_id=at.ip_id, port=at.port, kind=req.kind, route_id=route_id
            )
        )
    else:
        if listener.kind is RouteKind.TCP:
            taken = PortTaken(
                f"port {where} is already in use by a raw TCP route",
                hint=f"TLS routes share a TLS port such as {TLS_PORT}",
                detail={"field": "port", "port": at.port, "address": at.address},
            )
            taken.holders = (listener.route_id,) if listener.route_id else ()
            raise taken
        if listener.kind is None:  # a TLS port stays one: no later claim needs to append
            listener_events.append(
                ListenerClaimed(address=at.address, ip_id=at.ip_id, port=at.port, kind=req.kind)
            )
        assert hostname is not None and req.hostname is not None
        out[hostname_stream(req.hostname)] = _bind_hostname(
            hostname, req.hostname, at, org_id=org_id, route_id=route_id, env_routes=env_routes
        )
    if listener_events:
        out[listener_stream(at.address, at.port, at.ip_id)] = listener_events
    out[routes_stream(app_id, env)] = [
        RouteCreated(
            route_id=route_id,
            org_id=org_id,
            app_id=app_id,
            env=env,
            kind=req.kind,
            address=at.address,
            ip_id=at.ip_id,
            port=at.port,
            port_auto=at.port_auto,
            hostname=req.hostname,
            process=req.process,
            backend_port=req.backend_port,
            proxy_protocol=req.proxy_protocol,
        )
    ]
    return out


def _bind_hostname(
    state: HostnameState,
    name: str,
    at: Binding,
    *,
    org_id: str,
    route_id: str,
    env_routes: EnvRoutes,
) -> list[EventData]:
    if state.org_id is not None and state.org_id != org_id:
        other = HostnameTaken(
            f"the hostname {name} is already in use",
            hint="a hostname belongs to the first org that routes it; if you own the "
            "domain, ask the platform operator (docs/operations/edge-routing.md)",
            detail={"field": "hostname", "hostname": name},
        )
        other.holders = tuple(sorted(state.bindings.values()))
        raise other
    holder = state.bindings.get((at.address, at.port))
    if holder is not None:
        detail: dict[str, Any] = {"field": "hostname", "hostname": name, "port": at.port}
        if holder in env_routes.routes:  # the caller's own environment: name the route
            detail["route_id"] = holder
        conflict = RouteConflict(
            f"{describe_binding(at.address, at.port, name)} is already routed",
            hint="delete that route first to point the name elsewhere"
            + (f" ('ember routes delete {holder}')" if "route_id" in detail else ""),
            detail=detail,
        )
        conflict.holders = (holder,)
        raise conflict
    events: list[EventData] = []
    if state.org_id is None:
        events.append(HostnameClaimed(hostname=name, org_id=org_id))
    events.append(HostnameBound(hostname=name, route_id=route_id, address=at.address, port=at.port))
    return events


def decide_delete(
    route: RouteCreated,
    *,
    listener: ListenerState,
    hostname: HostnameState | None,
    address: ipv4.AddressState | None,
) -> dict[str, list[EventData]]:
    """The events per stream that delete ``route`` and free what it held: its TCP port,
    its hostname binding (and the org's claim with its last first-use binding), its hold
    on a dedicated address."""
    out: dict[str, list[EventData]] = {
        routes_stream(route.app_id, route.env): [
            RouteDeleted(
                route_id=route.route_id, org_id=route.org_id, app_id=route.app_id, env=route.env
            )
        ]
    }
    if route.kind is RouteKind.TCP and listener.route_id == route.route_id:
        out[listener_stream(route.address, route.port, route.ip_id)] = [
            ListenerReleased(
                address=route.address, ip_id=route.ip_id, port=route.port, route_id=route.route_id
            )
        ]
    if route.hostname is not None and hostname is not None:
        key = (route.address, route.port)
        events: list[EventData] = []
        if hostname.bindings.get(key) == route.route_id:
            events.append(
                HostnameUnbound(
                    hostname=route.hostname,
                    route_id=route.route_id,
                    address=route.address,
                    port=route.port,
                )
            )
            last = set(hostname.bindings) == {key}
            if last and hostname.org_id is not None and hostname.verification == "none":
                events.append(HostnameReleased(hostname=route.hostname, org_id=hostname.org_id))
        if events:
            out[hostname_stream(route.hostname)] = events
    if route.ip_id is not None and address is not None:
        unbound = ipv4.decide_unbind(address, route_id=route.route_id)
        if unbound:
            out[ipv4.ipv4_stream(route.address)] = unbound
    return out


# -- what the edge serves --------------------------------------------------------------------


def build_snapshot(
    cursor: str,
    routes: Iterable[Mapping[str, Any]],
    backends: Iterable[Mapping[str, Any]],
    settings: EdgeSettings | None = None,
) -> EdgeSnapshot:
    """The edge's snapshot from view rows: ``routes`` (``route_id``, ``org_id``,
    ``app_id``, ``env``, ``process``, ``kind``, ``address``, ``port``, ``hostname``,
    ``backend_port``, ``proxy_protocol``) and ``backends``, the healthy instances with an
    address (``instance_id``, ``app_id``, ``env``, ``process``, ``address``). Each route
    gets the backends of its (app, env, process) at its backend port; routes are ordered
    by listener, then hostname, backends by instance id."""
    by_process: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for b in backends:
        key = (str(b["app_id"]), str(b["env"]), str(b["process"]))
        by_process.setdefault(key, []).append((str(b["instance_id"]), str(b["address"])))
    out = []
    for r in routes:
        members = sorted(by_process.get((str(r["app_id"]), str(r["env"]), str(r["process"])), []))
        port = int(r["backend_port"])
        out.append(
            Route(
                route_id=str(r["route_id"]),
                org_id=str(r["org_id"]),
                app_id=str(r["app_id"]),
                env=str(r["env"]),
                process=str(r["process"]),
                kind=RouteKind(r["kind"]),
                address=str(r["address"]),
                port=int(r["port"]),
                hostname=r["hostname"],
                backend_port=port,
                proxy_protocol=r["proxy_protocol"],
                backends=tuple(Backend(iid, addr, port, True) for iid, addr in members),
            )
        )
    out.sort(key=lambda r: (r.address, r.port, r.hostname or "", r.route_id))
    return EdgeSnapshot(cursor=cursor, routes=tuple(out), settings=settings or EdgeSettings())
