"""What it takes to move a running HAProxy from one snapshot to the next: a pure diff.

``plan(running, new)`` answers either a list of runtime-API commands (applied over the
stats socket, no reload) or a reload (a new configuration and a seamless reload). Both
leave established connections alone; the runtime path is also instantaneous and keeps
HAProxy's health-check state, so it is preferred whenever it can express the change.

The runtime path covers (in this order, so a backend never empties during a swap):

1. a route removed from a listener that stays: its map entry is deleted (new connections
   with its SNI are refused at once) and its servers go to maintenance; its backend stays
   in the worker, unreachable, until the next reload drops it;
2. a route's hostname changed on the same listener: ``del map`` + ``add map``;
3. a TLS route added to a listener that exists: the worker's configuration carries a few
   empty *spare* backends (``spare_<n>``, see ``render(spare_backends=...)``); the route
   takes the first free one, gets its servers (``add server``), and only then its map
   entry (``add map``), so the hostname routes the moment it is mapped. The worker then
   knows the route under the spare's name (``Running.backends``) until the next reload
   renders it as ``be_<route_id>`` and refills the spares. Without a free spare, a
   reload;
4. backends: new instances ``add server`` (+ ``enable health``, + ``set server state
   ready`` when healthy: a dynamic server starts in maintenance); moved instances ``set
   server addr``; health flips ``set server state ready|maint``; removed instances ``set
   server state maint`` then ``del server``, which HAProxy refuses while the server still
   has connections: the driver keeps such a server *lingering* (in maintenance, carrying
   only its established connections) and retries the ``del server`` on later plans, or
   revives it if the instance comes back.

Anything else changes the configuration's structure and needs a reload: a listener
added or removed (HAProxy cannot bind at run time), a TCP route added (it comes with its
listener), a TLS route added when no spare is left (2.6 cannot create backends at run
time), a route's kind/address/port/PROXY setting changed, new settings.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Iterable, Mapping

from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot, Route, RouteKind
from ember.edge.haproxy_config import (
    backend_name,
    check,
    frontend_name,
    map_path,
    server_address,
    server_name,
    server_options,
    spare_names,
)

__all__ = ["Op", "Plan", "Running", "RuntimeCommand", "ServerRef", "plan"]

ServerRef = tuple[str, str]
"""(backend name, server name)"""


class Op(enum.StrEnum):
    ADD_SERVER = "add server"
    DEL_SERVER = "del server"
    SET_ADDR = "set server addr"
    SET_STATE = "set server state"
    ENABLE_HEALTH = "enable health"
    ADD_MAP = "add map"
    DEL_MAP = "del map"


@dataclasses.dataclass(frozen=True)
class RuntimeCommand:
    op: Op
    line: str
    """The exact line sent to the runtime API."""
    server: ServerRef | None = None

    def __str__(self) -> str:
        return self.line


@dataclasses.dataclass(frozen=True)
class Running:
    """What the current HAProxy worker serves."""

    snapshot: EdgeSnapshot
    """The snapshot the worker's configuration plus the runtime commands since add up to."""
    map_dir: str
    """Where the worker loaded its maps from (runtime map commands name these files)."""
    lingering: frozenset[ServerRef] = frozenset()
    """Servers no longer in the snapshot that HAProxy would not delete yet (connections)."""
    backends: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """route id -> the worker's backend for it, where that is a spare (else
    ``backend_name(route_id)``)."""
    spares: tuple[str, ...] = ()
    """Spare backends of the worker no route has taken yet."""

    def backend(self, route_id: str) -> str:
        return self.backends.get(route_id) or backend_name(route_id)

    @classmethod
    def loaded(cls, snapshot: EdgeSnapshot, map_dir: str, spare_backends: int) -> Running:
        """A worker fresh from the configuration rendered for ``snapshot``."""
        return cls(snapshot, map_dir, spares=spare_names(spare_backends))


@dataclasses.dataclass(frozen=True)
class Plan:
    reload_reasons: tuple[str, ...] = ()
    """Why a reload is needed; empty when the runtime commands suffice."""
    commands: tuple[RuntimeCommand, ...] = ()
    backends: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """After the commands: route id -> spare backend, for routes living in spares."""
    spares: tuple[str, ...] = ()
    """After the commands: the spares still free."""

    @property
    def reload(self) -> bool:
        return bool(self.reload_reasons)

    @property
    def noop(self) -> bool:
        return not self.reload and not self.commands

    def running(
        self, snapshot: EdgeSnapshot, map_dir: str, lingering: frozenset[ServerRef]
    ) -> Running:
        """The worker's state once this (runtime) plan ran."""
        return Running(snapshot, map_dir, lingering, self.backends, self.spares)


def plan(running: Running | None, new: EdgeSnapshot) -> Plan:
    """The step from ``running`` to ``new`` (``new`` must be valid: see ``check``)."""
    check(new)
    if running is None:
        return Plan(reload_reasons=("no running configuration",))
    reasons = _structural_changes(running, new)
    if reasons:
        return Plan(reload_reasons=tuple(reasons))
    old_routes = {r.route_id: r for r in running.snapshot.routes}
    new_routes = {r.route_id: r for r in new.routes}
    backends = {rid: be for rid, be in running.backends.items() if rid in new_routes}
    spares = list(running.spares)
    commands: list[RuntimeCommand] = []
    for rid in sorted(old_routes.keys() - new_routes.keys()):
        commands += _remove_route(old_routes[rid], running.backend(rid), running.map_dir)
    for rid in sorted(new_routes):
        route = new_routes[rid]
        old = old_routes.get(rid)
        if old is None:  # _structural_changes made sure a spare is free
            backends[rid] = spares.pop(0)
            commands += _add_route(route, backends[rid], new.settings, running.map_dir)
            continue
        be = running.backend(rid)
        if old.hostname != route.hostname:
            commands += _rename_route(old, route, be, running.map_dir)
        commands += _servers(old, route, be, new.settings, running.lingering)
    commands += _retry_lingering(running, new)
    return Plan(commands=tuple(commands), backends=backends, spares=tuple(spares))


# -- structure ----------------------------------------------------------------------------


def _listener_key(r: Route) -> tuple[str, int]:
    return (ipaddress.ip_address(r.address).compressed, r.port)


def _shape(r: Route) -> tuple[object, ...]:
    """What of a route is baked into the configuration (hostname and backends are not)."""
    return (r.kind, _listener_key(r), r.proxy_protocol)


def _structural_changes(running: Running, new: EdgeSnapshot) -> list[str]:
    old = running.snapshot
    reasons: list[str] = []
    if old.settings != new.settings:
        changed = [
            f.name
            for f in dataclasses.fields(EdgeSettings)
            if getattr(old.settings, f.name) != getattr(new.settings, f.name)
        ]
        reasons.append("settings changed: " + ", ".join(changed))
    old_listeners = {(_listener_key(r), r.kind) for r in old.routes}
    new_listeners = {(_listener_key(r), r.kind) for r in new.routes}
    for (address, port), kind in sorted(new_listeners - old_listeners):
        reasons.append(f"listener added: {frontend_name(kind, address, port)}")
    for (address, port), kind in sorted(old_listeners - new_listeners):
        reasons.append(f"listener removed: {frontend_name(kind, address, port)}")
    old_routes = {r.route_id: r for r in old.routes}
    free = len(running.spares)
    for r in sorted(new.routes, key=lambda r: r.route_id):
        before = old_routes.get(r.route_id)
        if before is None:
            if (_listener_key(r), r.kind) not in old_listeners:
                continue  # reported with its listener
            if r.kind is RouteKind.TLS and free > 0:
                free -= 1
            elif r.kind is RouteKind.TLS:
                reasons.append(f"route added: {r.route_id} (no spare backend left)")
            else:
                reasons.append(f"route added: {r.route_id}")
        elif _shape(before) != _shape(r):
            reasons.append(f"route changed: {r.route_id}")
    return reasons


# -- runtime commands ---------------------------------------------------------------------


def _map_file(route: Route, map_dir: str) -> str:
    address, port = _listener_key(route)
    return map_path(map_dir, frontend_name(route.kind, address, port))


def _remove_route(route: Route, be: str, map_dir: str) -> Iterable[RuntimeCommand]:
    yield RuntimeCommand(Op.DEL_MAP, f"del map {_map_file(route, map_dir)} {route.hostname}")
    for b in sorted(route.backends, key=lambda b: b.instance_id):
        # Maintenance also stops the checks of the now unreachable backend.
        yield _set_state((be, server_name(b.instance_id)), healthy=False)


def _rename_route(old: Route, new: Route, be: str, map_dir: str) -> Iterable[RuntimeCommand]:
    path = _map_file(new, map_dir)
    yield RuntimeCommand(Op.DEL_MAP, f"del map {path} {old.hostname}")
    yield RuntimeCommand(Op.ADD_MAP, f"add map {path} {new.hostname} {be}")


def _add_route(
    route: Route, be: str, settings: EdgeSettings, map_dir: str
) -> Iterable[RuntimeCommand]:
    """A new TLS route into a spare backend: servers first, then the map entry."""
    empty = dataclasses.replace(route, backends=())
    yield from _servers(empty, route, be, settings, frozenset())
    path = _map_file(route, map_dir)
    yield RuntimeCommand(Op.ADD_MAP, f"add map {path} {route.hostname} {be}")


def _set_state(ref: ServerRef, *, healthy: bool) -> RuntimeCommand:
    state = "ready" if healthy else "maint"
    return RuntimeCommand(Op.SET_STATE, f"set server {ref[0]}/{ref[1]} state {state}", ref)


def _set_addr(ref: ServerRef, b: Backend) -> RuntimeCommand:
    address = ipaddress.ip_address(b.address).compressed
    line = f"set server {ref[0]}/{ref[1]} addr {address} port {b.port}"
    return RuntimeCommand(Op.SET_ADDR, line, ref)


def _servers(
    old: Route, new: Route, be: str, settings: EdgeSettings, lingering: frozenset[ServerRef]
) -> Iterable[RuntimeCommand]:
    before = {server_name(b.instance_id): b for b in old.backends}
    after = {server_name(b.instance_id): b for b in new.backends}
    for name in sorted(after.keys() - before.keys()):
        b, ref = after[name], (be, name)
        if ref in lingering:  # still in the worker: revive it
            yield _set_addr(ref, b)
        else:
            line = f"add server {be}/{name} {server_address(b)} {server_options(new, settings)}"
            yield RuntimeCommand(Op.ADD_SERVER, line, ref)
            yield RuntimeCommand(Op.ENABLE_HEALTH, f"enable health {be}/{name}", ref)
        if b.healthy:
            yield _set_state(ref, healthy=True)
    for name in sorted(after.keys() & before.keys()):
        b, was, ref = after[name], before[name], (be, name)
        if (ipaddress.ip_address(b.address), b.port) != (
            ipaddress.ip_address(was.address),
            was.port,
        ):
            yield _set_addr(ref, b)
        if b.healthy != was.healthy:
            yield _set_state(ref, healthy=b.healthy)
    for name in sorted(before.keys() - after.keys()):
        ref = (be, name)
        yield _set_state(ref, healthy=False)
        yield RuntimeCommand(Op.DEL_SERVER, f"del server {be}/{name}", ref)


def _retry_lingering(running: Running, new: EdgeSnapshot) -> Iterable[RuntimeCommand]:
    wanted = {
        (running.backend(r.route_id), server_name(b.instance_id))
        for r in new.routes
        for b in r.backends
    }
    for ref in sorted(running.lingering - wanted):
        yield RuntimeCommand(Op.DEL_SERVER, f"del server {ref[0]}/{ref[1]}", ref)
