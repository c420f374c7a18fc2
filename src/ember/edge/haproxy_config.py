"""An :class:`EdgeSnapshot` rendered as HAProxy 2.6 configuration: pure functions, no I/O.

What the rendered configuration looks like, and why:

* **One frontend per listener** (address, port). A TLS listener waits up to
  ``inspect_timeout_ms`` for a complete ClientHello (``tcp-request inspect-delay``), then
  accepts only if it *is* a ClientHello (``req.ssl_hello_type 1``) whose SNI is one of the
  listener's hostnames, and rejects everything else: bytes that are not TLS, a hello that
  never completes, no SNI, an unknown SNI. There is no default backend.
* **SNI -> backend is a map file per listener** (``<map_dir>/<frontend>.map``, one
  ``hostname backend`` line each, looked up with ``req.ssl_sni,lower,map(...)``) rather
  than one ACL per hostname: a map lookup is a tree search (ACL lists are evaluated one
  by one, which matters with thousands of hostnames on :443), and the runtime API can
  change map entries in place (``del map`` / ``add map``), so a route deleted from a
  listener that stays stops matching at once without a reload.
* **One backend per route** (``be_<route_id>``), ``balance leastconn`` (long-lived TCP
  connections; also a *dynamic* algorithm, which ``add server`` requires). **Servers are
  named after instance ids** and carry every option on their own line (no
  ``default-server``: the runtime ``add server`` command ignores it, and
  :func:`server_options` is shared with the runtime path so a server added at run time
  is identical to one loaded from the file). Membership changes therefore go through the
  runtime API (``add server`` / ``del server`` / ``set server addr|state``) without a
  reload, with no fixed number of pre-allocated slots (``server-template``) to outgrow
  and no slot bookkeeping to keep stable across reloads.
* **Spare backends** (``spare_<n>``, empty, ``render(spare_backends=...)``): HAProxy 2.6
  cannot create a backend at run time, so each configuration carries a few empty ones;
  a new TLS hostname on an existing listener takes one (``add server`` + ``add map``)
  instead of waiting for a reload. The next reload renders it under its own name.
* **Health**: only the platform's healthy instances are in a snapshot (an instance marked
  ``healthy=False`` is rendered ``disabled``, i.e. in maintenance); on top of that every
  server has an HAProxy ``check`` (TCP connect every ``check_interval_ms``; with the PROXY
  header on routes that send it, ADR 0009), so a server is used only when both agree.
  ``retries`` + ``option redispatch`` move a connection that fails to connect to another
  server before the checks notice.
* **PROXY v2** (``send-proxy-v2``) only on servers of routes with ``proxy_protocol='v2'``;
  listeners never accept a PROXY header from clients.
* **Slowloris / abuse**: a stick table per listener tracks each source address
  (``conn_cur``, ``conn_rate(10s)``); connections over ``max_conn_per_source`` concurrent
  or ``max_conn_rate_per_source`` per 10 s are rejected before any byte is read. The
  inspect delay bounds how long a silent or slow client holds a TLS connection open
  before routing; ``timeout client/server`` bound idle established connections.
* **Master-worker** (``master-worker``), ``stats socket <runtime_socket> ... level admin
  expose-fd listeners``: a reload starts a new worker that takes the listening sockets
  over from the old one (the master passes them through its socket pair; ``expose-fd``
  also allows ``-x`` hand-over), so no connection attempt is refused during a reload, and
  the old worker keeps serving its established connections until they close (or
  ``hard_stop_after_ms``, when given).

Everything is sorted, so the same snapshot renders the same bytes (golden-tested in
tests/unit/test_haproxy_config.py). Names are derived from ids through :func:`safe_name`,
and every value that reaches the text is validated first (:func:`problems`): a hostname,
address or id cannot inject configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping

from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot, Route, RouteKind
from ember.edge.errors import SnapshotInvalid

__all__ = [
    "CHECK_FALL",
    "CHECK_RISE",
    "Listener",
    "Problem",
    "backend_name",
    "bind_address",
    "check",
    "frontend_name",
    "listeners",
    "map_path",
    "problems",
    "render",
    "render_maps",
    "safe_name",
    "server_address",
    "server_name",
    "server_options",
    "spare_names",
    "without_invalid_routes",
]

CHECK_FALL = 3
CHECK_RISE = 2
STICK_TABLE_SIZE = "100k"
STICK_TABLE_EXPIRE_S = 60
FIN_TIMEOUT_MS = 30_000
RETRIES = 2

_NAME_OK = re.compile(r"[A-Za-z0-9_.-]+")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)
_PATH_OK = re.compile(r"/[A-Za-z0-9_./@:+-]*")
"""Socket and map paths go into the configuration unquoted (and inside ``map(...)``)."""


# -- names --------------------------------------------------------------------------------


def safe_name(raw: str) -> str:
    """An HAProxy identifier for an id: the id itself when it only has letters, digits,
    ``_ . -``; otherwise the id with other characters replaced plus a short hash of the
    original, so two ids never collide after the replacement."""
    if _NAME_OK.fullmatch(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", raw)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{cleaned}-{digest}"


def frontend_name(kind: RouteKind, address: str, port: int) -> str:
    # ':' is legal in HAProxy names but not in every tool that reads map file names.
    return f"fe_{kind.value}_{address.replace(':', '-')}_{port}"


def backend_name(route_id: str) -> str:
    return f"be_{safe_name(route_id)}"


def server_name(instance_id: str) -> str:
    return safe_name(instance_id)


def spare_names(count: int) -> tuple[str, ...]:
    """Names of the empty spare backends (never ``be_...``, so no route id can clash)."""
    return tuple(f"spare_{n}" for n in range(1, count + 1))


def map_path(map_dir: str, frontend: str) -> str:
    return f"{map_dir.rstrip('/')}/{frontend}.map"


def bind_address(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"


def server_address(backend: Backend) -> str:
    return bind_address(backend.address, backend.port)


def server_options(route: Route, settings: EdgeSettings) -> str:
    """Options of every server of ``route`` (shared with the runtime ``add server``)."""
    opts = f"check inter {settings.check_interval_ms}ms fall {CHECK_FALL} rise {CHECK_RISE}"
    if route.proxy_protocol == "v2":
        # The checks carry the header too (a LOCAL one): a server that expects it would
        # otherwise reject every check (ADR 0009).
        opts += " send-proxy-v2 check-send-proxy"
    return opts


# -- validation ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    route_id: str
    message: str

    def __str__(self) -> str:
        return f"route {self.route_id}: {self.message}"


def _route_problems(route: Route) -> list[str]:
    out: list[str] = []
    if not route.route_id:
        out.append("empty route id")
    try:
        ipaddress.ip_address(route.address)
    except ValueError:
        out.append(f"edge address {route.address!r} is not an IP literal")
    if not 1 <= route.port <= 65535:
        out.append(f"port {route.port} is out of range")
    if not 1 <= route.backend_port <= 65535:
        out.append(f"backend port {route.backend_port} is out of range")
    if route.kind is RouteKind.TLS:
        if route.hostname is None or not _HOSTNAME.match(route.hostname):
            out.append(f"hostname {route.hostname!r} is not a lowercase DNS name")
    elif route.hostname is not None:
        out.append("a TCP route has no hostname")
    if route.proxy_protocol not in (None, "v2"):
        out.append(f"proxy_protocol {route.proxy_protocol!r} is not None or 'v2'")
    return out + _backend_problems(route.backends)


def _backend_problems(backends: Iterable[Backend]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for b in backends:
        if not b.instance_id:
            out.append("a backend has an empty instance id")
        elif server_name(b.instance_id) in seen:
            out.append(f"instance {b.instance_id!r} appears twice")
        seen.add(server_name(b.instance_id))
        try:
            ipaddress.ip_address(b.address)
        except ValueError:
            out.append(f"instance {b.instance_id!r}: {b.address!r} is not an IP literal")
        if not 1 <= b.port <= 65535:
            out.append(f"instance {b.instance_id!r}: port {b.port} is out of range")
    return out


def _partition(snapshot: EdgeSnapshot) -> tuple[tuple[Route, ...], tuple[Problem, ...]]:
    """(routes that can be served, problems of the others)."""
    found: list[Problem] = []
    kept: list[Route] = []
    by_backend: dict[str, str] = {}
    listeners: dict[tuple[str, int], list[Route]] = {}
    for route in sorted(snapshot.routes, key=lambda r: r.route_id):
        own = _route_problems(route)
        if own:
            found += [Problem(route.route_id, m) for m in own]
            continue
        be = backend_name(route.route_id)
        if be in by_backend:
            found.append(Problem(route.route_id, f"same backend name as {by_backend[be]!r}"))
            continue
        key = (ipaddress.ip_address(route.address).compressed, route.port)
        on_listener = listeners.setdefault(key, [])
        clash = _listener_clash(on_listener, route)
        if clash:
            found.append(Problem(route.route_id, clash))
            continue
        by_backend[be] = route.route_id
        on_listener.append(route)
        kept.append(route)
    return tuple(kept), tuple(sorted(found))


def problems(snapshot: EdgeSnapshot) -> tuple[Problem, ...]:
    """Why routes of ``snapshot`` cannot be served, sorted. Among routes that conflict
    (same route id or backend name; a hostname twice on a listener; a TCP listener with
    several routes; TLS and TCP on one listener) the lowest route id wins and the others
    are reported."""
    return _partition(snapshot)[1]


def _listener_clash(kept: list[Route], route: Route) -> str | None:
    where = f"{route.address} port {route.port}"
    if kept and kept[0].kind is not route.kind:
        return f"{where} already serves {kept[0].kind.value} route {kept[0].route_id!r}"
    if route.kind is RouteKind.TCP and kept:
        return f"TCP {where} is taken by route {kept[0].route_id!r}"
    for other in kept:
        if other.hostname == route.hostname:
            return f"{route.hostname} on {where} is taken by route {other.route_id!r}"
    return None


def check(snapshot: EdgeSnapshot) -> None:
    """Raise :class:`SnapshotInvalid` naming every problem, or return."""
    found = problems(snapshot)
    if found:
        raise SnapshotInvalid(
            f"{len(found)} route problem(s): " + "; ".join(str(p) for p in found),
            detail={"problems": [dataclasses.asdict(p) for p in found]},
            hint="the control plane should never publish these; report a bug",
        )


def without_invalid_routes(snapshot: EdgeSnapshot) -> tuple[EdgeSnapshot, tuple[Problem, ...]]:
    """The snapshot minus the routes :func:`problems` names, so one bad route never keeps
    the others from being served."""
    kept, found = _partition(snapshot)
    if not found:
        return snapshot, ()
    return dataclasses.replace(snapshot, routes=kept), found


# -- rendering ----------------------------------------------------------------------------


def _comment(text: str) -> str:
    """Free text (org ids, cursors) made safe for a comment line."""
    return re.sub(r"[^A-Za-z0-9_.:@/+=,() -]", "?", text)[:200]


def _path(value: str, what: str) -> str:
    if not _PATH_OK.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be an absolute path without spaces")
    return value


def _routes_by_listener(snapshot: EdgeSnapshot) -> Mapping[tuple[str, int], tuple[Route, ...]]:
    """Listeners keyed by (compressed address, port), routes sorted by hostname then id."""
    grouped: dict[tuple[str, int], list[Route]] = {}
    for r in snapshot.routes:
        grouped.setdefault((ipaddress.ip_address(r.address).compressed, r.port), []).append(r)
    return {
        key: tuple(sorted(rs, key=lambda r: (r.hostname or "", r.route_id)))
        for key, rs in sorted(grouped.items(), key=lambda kv: _listener_sort_key(kv[0]))
    }


def _listener_sort_key(key: tuple[str, int]) -> tuple[int, int, int]:
    ip = ipaddress.ip_address(key[0])
    return (ip.version, int(ip), key[1])


@dataclasses.dataclass(frozen=True)
class Listener:
    """One frontend: a bound (address, port) and its routes (sorted by hostname, id)."""

    frontend: str
    address: str
    port: int
    kind: RouteKind
    routes: tuple[Route, ...]


def listeners(snapshot: EdgeSnapshot) -> Mapping[str, Listener]:
    """frontend name -> listener, in rendering order (IPv4 first, by address, port)."""
    out: dict[str, Listener] = {}
    for (address, port), routes in _routes_by_listener(snapshot).items():
        kind = routes[0].kind
        fe = frontend_name(kind, address, port)
        out[fe] = Listener(fe, address, port, kind, routes)
    return out


def render_maps(snapshot: EdgeSnapshot) -> dict[str, str]:
    """Map file name (relative to the map directory) -> content, one per TLS listener."""
    check(snapshot)
    out: dict[str, str] = {}
    for fe, listener in listeners(snapshot).items():
        if listener.kind is RouteKind.TLS:
            lines = sorted(f"{r.hostname} {backend_name(r.route_id)}\n" for r in listener.routes)
            out[f"{fe}.map"] = "".join(lines)
    return out


def render(
    snapshot: EdgeSnapshot,
    *,
    runtime_socket: str,
    map_dir: str,
    nbthread: int | None = None,
    maxconn: int | None = None,
    hard_stop_after_ms: int | None = None,
    spare_backends: int = 0,
) -> str:
    """The whole haproxy.cfg for ``snapshot`` (its maps come from :func:`render_maps`,
    written under ``map_dir``), with ``spare_backends`` empty backends that new TLS
    routes take at run time (:mod:`ember.edge.plan`). Raises :class:`SnapshotInvalid` for
    an invalid snapshot."""
    check(snapshot)
    s = snapshot.settings
    lines = [
        "# Generated by ember.edge.haproxy_config; do not edit (the edge rewrites it).",
        f"# snapshot cursor: {_comment(snapshot.cursor)}",
        "",
        "global",
        "    master-worker",
        f"    stats socket {_path(runtime_socket, 'runtime socket')}"
        " mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
    ]
    if nbthread is not None:
        lines.append(f"    nbthread {int(nbthread)}")
    if maxconn is not None:
        lines.append(f"    maxconn {int(maxconn)}")
    if hard_stop_after_ms is not None:
        lines.append(f"    hard-stop-after {int(hard_stop_after_ms)}ms")
    lines += [
        "",
        "defaults",
        "    mode tcp",
        f"    timeout connect {s.connect_timeout_ms}ms",
        f"    timeout client {s.idle_timeout_ms}ms",
        f"    timeout server {s.idle_timeout_ms}ms",
        f"    timeout client-fin {min(s.idle_timeout_ms, FIN_TIMEOUT_MS)}ms",
        f"    timeout server-fin {min(s.idle_timeout_ms, FIN_TIMEOUT_MS)}ms",
        f"    retries {RETRIES}",
        "    option redispatch 1",
    ]
    map_dir = _path(map_dir, "map directory")
    for listener in listeners(snapshot).values():
        lines += ["", *_frontend(listener, s, map_dir)]
    for route in sorted(snapshot.routes, key=lambda r: r.route_id):
        lines += ["", *_backend(route, s)]
    for name in spare_names(spare_backends):
        lines += [
            "",
            f"backend {name}",
            "    # spare: a new TLS route's servers go here at run time",
        ]
        lines += ["    balance leastconn"]
    return "\n".join(lines) + "\n"


def _frontend(listener: Listener, s: EdgeSettings, map_dir: str) -> Iterable[str]:
    name, address, port, kind, routes = (
        listener.frontend,
        listener.address,
        listener.port,
        listener.kind,
        listener.routes,
    )
    yield f"frontend {name}"
    if kind is RouteKind.TLS:
        yield f"    # TLS passthrough routed on SNI: {len(routes)} hostname(s)"
    else:
        yield f"    # raw TCP: route {_comment(routes[0].route_id)}"
    v6 = ipaddress.ip_address(address).version == 6
    # v6only: '::' must not also take IPv4, which a '0.0.0.0' listener may serve; and
    # then every source of a listener has the listener's family (the table's key type).
    yield f"    bind {bind_address(address, port)}{' v6only' if v6 else ''}"
    yield (
        f"    stick-table type {'ipv6' if v6 else 'ip'} size {STICK_TABLE_SIZE}"
        f" expire {STICK_TABLE_EXPIRE_S}s store conn_cur,conn_rate(10s)"
    )
    yield "    tcp-request connection track-sc0 src"
    yield (
        f"    tcp-request connection reject if {{ sc0_conn_cur gt {s.max_conn_per_source} }}"
        f" || {{ sc0_conn_rate gt {s.max_conn_rate_per_source} }}"
    )
    if kind is RouteKind.TCP:
        yield f"    default_backend {backend_name(routes[0].route_id)}"
        return
    sni_map = f"req.ssl_sni,lower,map({map_path(map_dir, name)})"
    yield f"    tcp-request inspect-delay {s.inspect_timeout_ms}ms"
    yield f"    tcp-request content accept if {{ req.ssl_hello_type 1 }} {{ {sni_map} -m found }}"
    yield "    tcp-request content reject"
    yield f"    use_backend %[{sni_map}]"


def _backend(route: Route, s: EdgeSettings) -> Iterable[str]:
    yield f"backend {backend_name(route.route_id)}"
    what = route.hostname if route.kind is RouteKind.TLS else f"tcp port {route.port}"
    yield (
        f"    # route {_comment(route.route_id)}: {what} -> {_comment(route.org_id)}/"
        f"{_comment(route.app_id)}/{_comment(route.env)} process {_comment(route.process)}"
        f" port {route.backend_port}"
    )
    yield "    balance leastconn"
    opts = server_options(route, s)
    for b in sorted(route.backends, key=lambda b: b.instance_id):
        disabled = "" if b.healthy else " disabled"
        yield f"    server {server_name(b.instance_id)} {server_address(b)} {opts}{disabled}"
