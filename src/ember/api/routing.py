"""Routes, dedicated IPv4 addresses and the edge's snapshot: commands and queries.

Routes authorise like releases (``deploy`` on the env to write, ``read`` to read; another
tenant's env is not found); addresses are the org's (``admin`` to allocate or release,
``read`` to list). The snapshot is for platform operators (the edges).

A route touches several streams at once (its environment's, the hostname's, the
listener's, a dedicated address's; ember.core.routes), so commands load each, decide with
the pure rules, and append them all in one transaction at the versions read
(``EventLog.append_many``): a concurrent change to any of them is a conflict, and the
command decides again on the new state. Streams are appended in stream-id order, so two
commands racing for the same streams never deadlock. Then the ``routes`` view folds the
append before the command answers (read-your-writes), as everywhere in the API.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ember.api.edge_feed import PROJECTIONS, EdgeFeed
from ember.api.releases import Releases
from ember.api.service import Row, Tenancy
from ember.core import ipv4
from ember.core import routes as rt
from ember.core.edge import EdgeSettings, EdgeSnapshot
from ember.core.errors import ConcurrencyConflict, Unavailable
from ember.core.events import ZERO, Cursor, EventData, Metadata, NewEvent, RecordedEvent
from ember.core.ids import new_id
from ember.core.tenancy import Capability, Principal, Scope
from ember.core.workloads import ProcessNotFound
from ember.store.eventlog import StreamAppend

S = TypeVar("S")
PROJECTION = "routes"
_ATTEMPTS = 5
_AUTO_TRIES = 16
"""Ports (or addresses) tried before giving up when the view says free and the stream
says taken: only concurrent creates make that happen."""

# A route is live while its environment exists and is the one it was created in (an env
# deleted and created again is a new one; a deleted app's routes have no app at all).
# Routes that are not live are orphans: never served, never listed, and reaped (deleted,
# freeing what they hold) when they stand in the way of a new route or a release.
_LIVE = (
    "EXISTS (SELECT 1 FROM view_envs e WHERE e.app_id = r.app_id AND e.name = r.env "
    "AND e.created_at <= r.created_at)"
)
_ROUTES = (
    "SELECT r.*, a.name AS app_name FROM view_routes r JOIN view_apps a USING (app_id) "
    f"WHERE {_LIVE} AND "
)
_REAPER = "system:route-reaper"


@dataclasses.dataclass
class _Loaded:
    """Streams read for one decision: their versions and last cursors."""

    versions: dict[str, int] = dataclasses.field(default_factory=dict)
    seen: Cursor = ZERO


class Routing:
    def __init__(
        self,
        tenancy: Tenancy,
        releases: Releases,
        config: rt.RoutingConfig,
        edge_settings: EdgeSettings | None = None,
        *,
        max_wait_s: float = 30.0,
    ) -> None:
        self.t = tenancy
        self.releases = releases
        self.config = config
        self.edge_settings = edge_settings or EdgeSettings()
        self.max_wait_s = max_wait_s
        self.feed = EdgeFeed(tenancy.db, tenancy.runner)

    def close(self) -> None:
        self.feed.close()

    # -- plumbing --------------------------------------------------------------------

    def _read(
        self, loaded: _Loaded, stream: str, fold: Callable[[Iterable[RecordedEvent]], S]
    ) -> S:
        events = self.t.log.read_stream_all(stream)
        loaded.versions[stream] = events[-1].stream_version if events else 0
        if events:
            loaded.seen = max(loaded.seen, events[-1].cursor)
        return fold(events)

    def _append(self, loaded: _Loaded, plan: Mapping[str, list[EventData]], actor: str) -> Cursor:
        meta = Metadata(actor=actor)
        appends = [
            StreamAppend(stream, loaded.versions[stream], [NewEvent.of(e, meta) for e in events])
            for stream, events in sorted(plan.items())
            if events
        ]
        results = self.t.log.append_many(appends)
        cursor = max(r.cursor for r in results)
        self.t.sync(cursor, PROJECTION)
        return cursor

    # -- routes ------------------------------------------------------------------------

    def create(
        self,
        who: Principal,
        org: str,
        app: str,
        env: str,
        *,
        kind: str,
        hostname: str | None,
        port: int | str | None,
        process: str,
        backend_port: int,
        proxy_protocol: str | None = None,
        ip: str | None = None,
    ) -> tuple[Row, bool]:
        """Create a route; (route, False) when the environment has this route already."""
        app_row = self.releases.authorize(who, org, app, env, Capability.DEPLOY, "create routes")
        org_id, app_id = app_row["org_id"], app_row["app_id"]
        req = rt.check_route(
            self.config,
            kind=kind,
            hostname=hostname,
            port=port,
            process=process,
            backend_port=backend_port,
            proxy_protocol=proxy_protocol,
            ip=ip,
        )
        self._check_process(app_id, env, req.process)
        address, ip_id = self.config.shared_address, None
        if req.ip is not None:
            rows = self.t.query(
                "SELECT ip_id FROM view_ipv4 WHERE address = %s AND org_id = %s", [req.ip, org_id]
            )
            if not rows:
                raise ipv4.not_found(req.ip, field="ip")
            address, ip_id = req.ip, rows[0]["ip_id"]
        route_id = new_id("rt")
        # Routes of an earlier incarnation of this env would answer as "existing".
        self._reap(self._orphans("r.app_id = %s AND r.env = %s", [app_id, env]))
        reaped = False
        for attempt in range(_ATTEMPTS):
            loaded = _Loaded()
            env_routes = self._read(loaded, rt.routes_stream(app_id, env), rt.fold_env_routes)
            existing = rt.same_route(env_routes.routes.values(), req, address)
            if existing is not None:
                self.t.sync(loaded.seen, PROJECTION)
                return self._route_row(app_id, env, existing.route_id), False
            try:
                self._create_once(
                    req, loaded, env_routes, route_id, org_id, app_id, env, address, ip_id, who
                )
            except ConcurrencyConflict:
                if attempt == _ATTEMPTS - 1:
                    raise
                continue
            except (rt.RouteConflict, rt.PortTaken, rt.HostnameTaken) as exc:
                # Held by routes of a deleted app or env: reap them, then decide again.
                if reaped or not self._reap(self._orphans_of(exc.holders)):
                    raise
                reaped = True
                continue
            return self._route_row(app_id, env, route_id), True
        raise AssertionError("unreachable")

    def _create_once(
        self,
        req: rt.RouteRequest,
        env_loaded: _Loaded,
        env_routes: rt.EnvRoutes,
        route_id: str,
        org_id: str,
        app_id: str,
        env: str,
        address: str,
        ip_id: str | None,
        who: Principal,
    ) -> None:
        auto = req.port is None
        candidates: Iterable[int] = (
            [req.port] if req.port is not None else self._free_ports(address, ip_id)
        )
        for tried, port in enumerate(candidates):
            if tried >= _AUTO_TRIES:
                break
            at = rt.Binding(address, ip_id, port, auto)
            loaded = dataclasses.replace(env_loaded, versions=dict(env_loaded.versions))
            listener = self._read(
                loaded, rt.listener_stream(address, port, ip_id), rt.fold_listener
            )
            hostname = (
                self._read(loaded, rt.hostname_stream(req.hostname), rt.fold_hostname)
                if req.hostname is not None
                else None
            )
            held = (
                self._read(loaded, ipv4.ipv4_stream(address), ipv4.fold_address)
                if ip_id is not None
                else None
            )
            try:
                plan = rt.decide_create(
                    req,
                    at,
                    route_id=route_id,
                    org_id=org_id,
                    app_id=app_id,
                    env=env,
                    env_routes=env_routes,
                    listener=listener,
                    hostname=hostname,
                    address=held,
                )
            except rt.PortTaken:
                if not auto:
                    raise
                continue
            self._append(loaded, plan, who.user_id)
            return
        raise rt.NoFreePort(
            f"no free TCP port on {address}: every port of the pool {self.config.pool_text} "
            "is in use",
            hint="delete a TCP route you no longer need, or bind a dedicated address (--ip)",
            detail={"field": "port", "address": address, "pool": self.config.pool_text},
        )

    def _free_ports(self, address: str, ip_id: str | None) -> Iterable[int]:
        self.t.runner.catch_up(PROJECTION)  # a fresh view: only racing creates disagree
        self._reap(
            self._orphans(
                "r.kind = 'tcp' AND r.address = %s AND r.ip_id IS NOT DISTINCT FROM %s",
                [address, ip_id],
            )
        )
        used = self.t.query(
            "SELECT port FROM view_listeners WHERE scope = %s AND port BETWEEN %s AND %s",
            [ip_id or address, *self.config.tcp_ports],
        )
        return rt.free_ports(self.config, (r["port"] for r in used))

    def _check_process(self, app_id: str, env: str, process: str) -> None:
        rows = self.t.query(
            "SELECT manifest FROM view_releases WHERE app_id = %s AND env = %s "
            "AND status = 'active'",
            [app_id, env],
        )
        if not rows:
            return  # before the first deploy any well-formed name is accepted
        declared = sorted(rows[0]["manifest"].get("processes", {}))
        if process not in declared:
            raise ProcessNotFound(
                f"the live release has no process {process!r}",
                hint=f"processes: {', '.join(declared) or 'none'}",
                detail={"field": "process", "process": process},
            )

    def delete(self, who: Principal, org: str, app: str, env: str, route_id: str) -> None:
        app_row = self.releases.authorize(who, org, app, env, Capability.DEPLOY, "delete routes")
        if not self._delete_route(app_row["app_id"], env, route_id, who.user_id):
            raise _route_not_found(route_id)

    def _delete_route(self, app_id: str, env: str, route_id: str, actor: str) -> bool:
        """Delete a route and free what it holds; False when the env has no such route."""
        for attempt in range(_ATTEMPTS):
            loaded = _Loaded()
            env_routes = self._read(loaded, rt.routes_stream(app_id, env), rt.fold_env_routes)
            route = env_routes.routes.get(route_id)
            if route is None:
                return False
            listener = self._read(
                loaded, rt.listener_stream(route.address, route.port, route.ip_id), rt.fold_listener
            )
            hostname = (
                self._read(loaded, rt.hostname_stream(route.hostname), rt.fold_hostname)
                if route.hostname is not None
                else None
            )
            held = (
                self._read(loaded, ipv4.ipv4_stream(route.address), ipv4.fold_address)
                if route.ip_id is not None
                else None
            )
            plan = rt.decide_delete(route, listener=listener, hostname=hostname, address=held)
            try:
                self._append(loaded, plan, actor)
            except ConcurrencyConflict:
                if attempt == _ATTEMPTS - 1:
                    raise
                continue
            return True
        raise AssertionError("unreachable")

    def _orphans(self, where: str, params: list[Any]) -> list[Row]:
        return self.t.query(
            f"SELECT r.route_id, r.app_id, r.env FROM view_routes r WHERE {where} AND NOT {_LIVE}",
            params,
        )

    def _orphans_of(self, route_ids: Iterable[str]) -> list[Row]:
        ids = list(route_ids)
        return self._orphans("r.route_id = ANY(%s)", [ids]) if ids else []

    def _reap(self, orphans: Iterable[Row]) -> bool:
        """Delete routes whose environment is gone; True when there were any."""
        rows = list(orphans)
        for r in rows:
            self._delete_route(r["app_id"], r["env"], r["route_id"], _REAPER)
        return bool(rows)

    def list_routes(
        self, who: Principal, org: str, app: str, env: str, after: str | None, limit: int
    ) -> list[Row]:
        app_row = self.releases.authorize(who, org, app, env, Capability.READ, "read")
        return self.t.query(
            _ROUTES + "r.app_id = %s AND r.env = %s AND r.route_id > %s "
            "ORDER BY r.route_id LIMIT %s",
            [app_row["app_id"], env, after or "", limit],
        )

    def get(self, who: Principal, org: str, app: str, env: str, route_id: str) -> Row:
        app_row = self.releases.authorize(who, org, app, env, Capability.READ, "read")
        return self._route_row(app_row["app_id"], env, route_id)

    def _route_row(self, app_id: str, env: str, route_id: str) -> Row:
        rows = self.t.query(
            _ROUTES + "r.app_id = %s AND r.env = %s AND r.route_id = %s",
            [app_id, env, route_id],
        )
        if not rows:
            raise _route_not_found(route_id)
        return rows[0]

    # -- dedicated IPv4 addresses ------------------------------------------------------

    def allocate_ipv4(self, who: Principal, org: str) -> Row:
        """Allocate the lowest free address of the pool to the org (a paid add-on)."""
        org_row = self.t.visible_org(who, org)
        org_id = org_row["org_id"]
        self.t.require(who, Capability.ADMIN, Scope(org_id), "allocate dedicated addresses")
        self.t.runner.catch_up(PROJECTION)
        used = {r["address"] for r in self.t.query("SELECT address FROM view_ipv4", [])}
        ip_id, tried = new_id("ip"), 0
        for address in ipv4.pool_addresses(self.config.ipv4_pool):
            if address in used or address == self.config.shared_address:
                continue
            loaded = _Loaded()
            stream = ipv4.ipv4_stream(address)
            state = self._read(loaded, stream, ipv4.fold_address)
            try:
                plan = {
                    stream: ipv4.decide_allocate(state, address=address, org_id=org_id, ip_id=ip_id)
                }
                self._append(loaded, plan, who.user_id)
            except (ipv4.AddressTaken, ConcurrencyConflict):
                tried += 1
                if tried >= _AUTO_TRIES:
                    raise Unavailable(
                        "dedicated addresses are being allocated concurrently; none could be taken",
                        hint="retry in a moment",
                    ) from None
                continue
            return self._ip_row(org, org_id, address)
        raise ipv4.PoolExhausted(
            "no dedicated IPv4 address is free: the pool is exhausted",
            hint="release an address you no longer need ('ember ips release'), or ask the "
            "platform operator to grow the pool",
            detail={"family": "ipv4"},
        )

    def list_ips(self, who: Principal, org: str, after: str | None, limit: int) -> list[Row]:
        org_row = self.t.visible_org(who, org)
        return self.t.query(
            "SELECT i.*, %s AS org_name, (SELECT count(*) FROM view_routes r "
            f"WHERE r.ip_id = i.ip_id AND {_LIVE}) AS routes FROM view_ipv4 i "
            "WHERE i.org_id = %s AND i.ip_id > %s ORDER BY i.ip_id LIMIT %s",
            [org, org_row["org_id"], after or "", limit],
        )

    def release_ip(self, who: Principal, org: str, address: str) -> None:
        org_row = self.t.visible_org(who, org)
        org_id = org_row["org_id"]
        # Rights first: a caller who may not release learns nothing about the addresses.
        self.t.require(who, Capability.ADMIN, Scope(org_id), "release dedicated addresses")
        normal = ipv4.check_address(address)
        if normal is None:
            raise ipv4.not_found(address)
        stream = ipv4.ipv4_stream(normal)
        reaped = False
        for attempt in range(_ATTEMPTS):
            loaded = _Loaded()
            state = self._read(loaded, stream, ipv4.fold_address)
            try:
                plan = {stream: ipv4.decide_release(state, address=normal, org_id=org_id)}
                self._append(loaded, plan, who.user_id)
            except ConcurrencyConflict:
                if attempt == _ATTEMPTS - 1:
                    raise
                continue
            except ipv4.IpInUse as exc:
                if reaped or not self._reap(self._orphans_of(exc.holders)):
                    raise
                reaped = True
                continue
            return
        # Only reachable when the last attempt went to reaping orphans: never claim a
        # release that did not happen.
        raise ConcurrencyConflict(
            f"{normal} changed while it was being released",
            hint="retry the release",
            detail={"address": normal},
        )

    def _ip_row(self, org: str, org_id: str, address: str) -> Row:
        rows = self.t.query(
            "SELECT i.*, %s AS org_name, (SELECT count(*) FROM view_routes r "
            f"WHERE r.ip_id = i.ip_id AND {_LIVE}) AS routes FROM view_ipv4 i "
            "WHERE i.org_id = %s AND i.address = %s",
            [org, org_id, address],
        )
        if not rows:
            raise ipv4.not_found(address)
        return rows[0]

    # -- the edge ----------------------------------------------------------------------

    def snapshot(self) -> EdgeSnapshot:
        """Every route with its healthy backends, at the cursor up to which both views
        are exact (one read snapshot)."""
        for name in PROJECTIONS:
            self.t.runner.catch_up(name)
        with self.t.db.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            checkpoints = {
                name: Cursor(int(xid), int(pos))
                for name, xid, pos in conn.execute(
                    "SELECT name, xid::text::bigint, position FROM projection_checkpoints "
                    "WHERE name = ANY(%s)",
                    (list(PROJECTIONS),),
                ).fetchall()
            }
            routes = _rows(conn.execute(f"SELECT r.* FROM view_routes r WHERE {_LIVE}"))
            backends = _rows(
                conn.execute(
                    "SELECT i.instance_id, i.app_id, i.env, i.process, i.address "
                    "FROM (SELECT DISTINCT app_id, env, process FROM view_routes r "
                    f"WHERE {_LIVE}) r JOIN view_instances i USING (app_id, env, process) "
                    "WHERE i.state = 'healthy' AND i.address IS NOT NULL"
                )
            )
        cursor = min((checkpoints.get(n, ZERO) for n in PROJECTIONS), default=ZERO)
        return rt.build_snapshot(str(cursor), routes, backends, self.edge_settings)

    def log_head(self) -> Cursor:
        return self.t.log.head()


def _route_not_found(route_id: str) -> rt.RouteNotFound:
    return rt.RouteNotFound(
        f"no route {route_id!r} in this environment",
        hint="'ember routes list' shows the environment's routes",
        detail={"route_id": route_id},
    )


def _rows(cur: Any) -> list[Row]:
    names = [c.name for c in cur.description or ()]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
