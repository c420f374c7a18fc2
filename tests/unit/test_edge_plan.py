"""The snapshot diff (ember.edge.plan): what reloads, what the runtime API does, and a
model of HAProxy's servers and maps that the runtime commands must move from the old
snapshot's state to the new one's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot, Route, RouteKind
from ember.edge.haproxy_config import (
    backend_name,
    map_path,
    render_maps,
    server_name,
    spare_names,
)
from ember.edge.plan import Running, plan

MAPS = "/run/edge/gen/3/maps"


def tls(route_id: str, hostname: str, *backends: Backend, proxy: str | None = None) -> Route:
    return Route(
        route_id=route_id,
        org_id="o",
        app_id="a",
        env="prod",
        process="web",
        kind=RouteKind.TLS,
        address="0.0.0.0",
        port=443,
        hostname=hostname,
        backend_port=8443,
        proxy_protocol=proxy,
        backends=backends,
    )


def tcp(route_id: str, port: int, *backends: Backend) -> Route:
    return dataclasses.replace(
        tls(route_id, "x.test", *backends), kind=RouteKind.TCP, hostname=None, port=port
    )


def snap(*routes: Route, settings: EdgeSettings | None = None) -> EdgeSnapshot:
    return EdgeSnapshot("c", routes, settings or EdgeSettings())


def running(
    snapshot: EdgeSnapshot, lingering: frozenset[tuple[str, str]] = frozenset(), spares: int = 0
) -> Running:
    return Running(snapshot, MAPS, lingering, spares=spare_names(spares))


I1, I2, I3 = (
    Backend("i_1", "10.0.0.1", 8443),
    Backend("i_2", "10.0.0.2", 8443),
    Backend("i_3", "fd00::3", 8443),
)
MAP = map_path(MAPS, "fe_tls_0.0.0.0_443")


def lines(
    old: EdgeSnapshot, new: EdgeSnapshot, lingering: frozenset[tuple[str, str]] = frozenset()
) -> list[str]:
    step = plan(running(old, lingering), new)
    assert not step.reload, step.reload_reasons
    return [c.line for c in step.commands]


# -- reloads --------------------------------------------------------------------------------------


def test_nothing_running_means_a_reload() -> None:
    assert plan(None, snap()).reload


def test_the_same_snapshot_is_a_noop() -> None:
    s = snap(tls("r_a", "a.test", I1), tcp("r_db", 5432, I2))
    assert plan(running(s), dataclasses.replace(s, cursor="c2")).noop


A = tls("r_a", "a.test")
DB = tcp("r_db", 5432)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (snap(A), snap(A, tls("r_b", "b.test")), "route added: r_b (no spare backend left)"),
        (snap(A, DB), snap(A, tcp("r_db2", 5432)), "route added: r_db2"),
        (snap(A), snap(A, DB), "listener added: fe_tcp_0.0.0.0_5432"),
        (snap(A, DB), snap(A), "listener removed: fe_tcp_0.0.0.0_5432"),
        (snap(A), snap(dataclasses.replace(A, proxy_protocol="v2")), "route changed: r_a"),
        (snap(A), snap(dataclasses.replace(A, port=8443)), "route changed: r_a"),
        (
            snap(A),
            snap(A, settings=EdgeSettings(inspect_timeout_ms=1)),
            "settings changed: inspect_timeout_ms",
        ),
    ],
)
def test_structural_changes_reload(old: EdgeSnapshot, new: EdgeSnapshot, reason: str) -> None:
    step = plan(running(old), new)
    assert step.reload
    assert reason in step.reload_reasons
    assert step.commands == ()


# -- runtime commands -----------------------------------------------------------------------------


def test_a_route_leaving_a_listener_that_stays_is_unmapped_at_runtime() -> None:
    old = snap(tls("r_a", "a.test", I1), tls("r_b", "b.test", I2))
    assert lines(old, snap(tls("r_b", "b.test", I2))) == [
        f"del map {MAP} a.test",
        "set server be_r_a/i_1 state maint",
    ]


def test_a_hostname_change_swaps_the_map_entry() -> None:
    old = snap(tls("r_a", "a.test", I1))
    assert lines(old, snap(tls("r_a", "www.a.test", I1))) == [
        f"del map {MAP} a.test",
        f"add map {MAP} www.a.test be_r_a",
    ]


def test_a_new_hostname_on_a_listener_takes_a_spare_backend_at_runtime() -> None:
    old = snap(tls("r_a", "a.test", I1))
    new = snap(tls("r_a", "a.test", I1), tls("r_b", "b.test", I2))
    step = plan(running(old, spares=2), new)
    assert not step.reload
    assert [c.line for c in step.commands] == [
        "add server spare_1/i_2 10.0.0.2:8443 check inter 2000ms fall 3 rise 2",
        "enable health spare_1/i_2",
        "set server spare_1/i_2 state ready",
        f"add map {MAP} b.test spare_1",  # mapped last: routes only once it has servers
    ]
    assert (dict(step.backends), step.spares) == ({"r_b": "spare_1"}, ("spare_2",))
    # The worker knows r_b as spare_1 from now on, until a reload.
    after = step.running(new, MAPS, frozenset())
    gone = plan(after, snap(tls("r_a", "a.test", I1)))
    assert [c.line for c in gone.commands] == [
        f"del map {MAP} b.test",
        "set server spare_1/i_2 state maint",
    ]
    assert (dict(gone.backends), gone.spares) == ({}, ("spare_2",))  # spent until a reload
    # Two new hostnames, one spare left: a reload.
    more = snap(*new.routes, tls("r_c", "c.test"), tls("r_d", "d.test"))
    assert plan(after, more).reload_reasons == ("route added: r_d (no spare backend left)",)


def test_backend_changes_are_runtime_commands_adds_before_removes() -> None:
    old = snap(tls("r_a", "a.test", I1, I2, proxy="v2"))
    moved = dataclasses.replace(I2, address="10.0.0.22", port=9443)
    new = snap(tls("r_a", "a.test", moved, I3, proxy="v2"))
    assert lines(old, new) == [
        "add server be_r_a/i_3 [fd00::3]:8443 check inter 2000ms fall 3 rise 2"
        " send-proxy-v2 check-send-proxy",
        "enable health be_r_a/i_3",
        "set server be_r_a/i_3 state ready",
        "set server be_r_a/i_2 addr 10.0.0.22 port 9443",
        "set server be_r_a/i_1 state maint",
        "del server be_r_a/i_1",
    ]


def test_platform_health_flips_server_state() -> None:
    sick = dataclasses.replace(I1, healthy=False)
    assert lines(snap(tls("r_a", "a.test", I1)), snap(tls("r_a", "a.test", sick))) == [
        "set server be_r_a/i_1 state maint"
    ]
    assert lines(snap(tls("r_a", "a.test", sick)), snap(tls("r_a", "a.test", I1))) == [
        "set server be_r_a/i_1 state ready"
    ]
    # A new instance that is not healthy yet is added but left in maintenance.
    assert lines(snap(tls("r_a", "a.test")), snap(tls("r_a", "a.test", sick))) == [
        "add server be_r_a/i_1 10.0.0.1:8443 check inter 2000ms fall 3 rise 2",
        "enable health be_r_a/i_1",
    ]


def test_lingering_servers_are_retried_or_revived() -> None:
    s = snap(tls("r_a", "a.test", I2))
    assert lines(s, s, frozenset({("be_r_a", "i_1")})) == ["del server be_r_a/i_1"]
    back = snap(tls("r_a", "a.test", I1, I2))
    assert lines(s, back, frozenset({("be_r_a", "i_1")})) == [
        "set server be_r_a/i_1 addr 10.0.0.1 port 8443",
        "set server be_r_a/i_1 state ready",
    ]


# -- a model of what the runtime commands do ------------------------------------------------


@dataclasses.dataclass
class Model:
    """HAProxy's runtime state as far as the plan touches it."""

    servers: dict[tuple[str, str], tuple[str, str]]  # (backend, server) -> (addr:port, state)
    maps: dict[str, dict[str, str]]  # map file -> hostname -> backend

    @classmethod
    def of(cls, snapshot: EdgeSnapshot, names: Callable[[str], str] = backend_name) -> Model:
        servers = {
            (names(r.route_id), server_name(b.instance_id)): (
                _addr(b),
                "ready" if b.healthy else "maint",
            )
            for r in snapshot.routes
            for b in r.backends
        }
        maps: dict[str, dict[str, str]] = {}
        for name, text in render_maps(snapshot).items():
            entries = maps[map_path(MAPS, name.removesuffix(".map"))] = {}
            for line in text.splitlines():
                hostname, be = line.split()
                entries[hostname] = names(be.removeprefix("be_"))
        return cls(servers, maps)

    def run(self, line: str) -> None:
        words = line.split()
        match words:
            case ["add", "server", ref, addr, *_]:
                key = _ref(ref)
                assert key not in self.servers, line
                self.servers[key] = (addr, "maint")  # dynamic servers start in maintenance
            case ["del", "server", ref]:
                assert self.servers[_ref(ref)][1] == "maint", "HAProxy deletes only maint servers"
                del self.servers[_ref(ref)]
            case ["set", "server", ref, "addr", addr, "port", port]:
                host = f"[{addr}]" if ":" in addr else addr
                self.servers[_ref(ref)] = (f"{host}:{port}", self.servers[_ref(ref)][1])
            case ["set", "server", ref, "state", state]:
                self.servers[_ref(ref)] = (self.servers[_ref(ref)][0], state)
            case ["enable", "health", ref]:
                assert _ref(ref) in self.servers
            case ["del", "map", path, key]:
                del self.maps[path][key]
            case ["add", "map", path, key, value]:
                self.maps[path][key] = value
            case _:
                raise AssertionError(f"unexpected command {line}")

    def serving(self) -> tuple[dict[tuple[str, str], tuple[str, str]], dict[str, dict[str, str]]]:
        """What decides new connections: mapped hostnames, and servers of mapped backends."""
        mapped = {be for m in self.maps.values() for be in m.values()}
        return {k: v for k, v in self.servers.items() if k[0] in mapped or not self.maps}, self.maps


def _ref(ref: str) -> tuple[str, str]:
    backend, server = ref.split("/")
    return backend, server


def _addr(b: Backend) -> str:
    return f"[{b.address}]:{b.port}" if ":" in b.address else f"{b.address}:{b.port}"


instances = st.builds(
    Backend,
    st.sampled_from(["i_1", "i_2", "i_3", "i_4", "i_5"]),
    st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1"]),
    st.sampled_from([8443, 9443]),
    st.booleans(),
)
backend_sets = st.lists(instances, max_size=4, unique_by=lambda b: b.instance_id).map(tuple)


@st.composite
def snapshot_pairs(draw: st.DrawFn) -> tuple[EdgeSnapshot, EdgeSnapshot]:
    """Two snapshots of one listener: routes leave and arrive, hostnames and backends
    change."""
    ids = ["r_a", "r_b", "r_c", "r_d", "r_e"]
    old_ids = draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    new_ids = draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    old = [tls(rid, f"{rid[-1]}.test", *draw(backend_sets)) for rid in old_ids]
    new = [
        tls(
            rid,
            draw(st.sampled_from([f"{rid[-1]}.test", f"www.{rid[-1]}.test"])),
            *draw(backend_sets),
        )
        for rid in new_ids
    ]
    return snap(*old), snap(*new)


@given(snapshot_pairs())
def test_runtime_commands_move_the_model_from_old_to_new(
    pair: tuple[EdgeSnapshot, EdgeSnapshot],
) -> None:
    old, new = pair
    before = running(old, spares=5)
    step = plan(before, new)
    assert not step.reload
    model = Model.of(old)
    for command in step.commands:
        model.run(command.line)
    after = step.running(new, MAPS, frozenset())
    expected = Model.of(new, after.backend)
    assert model.maps == expected.maps
    serving, _ = model.serving()
    assert serving == expected.servers
    # Routes that left keep their (unreachable) backend, with every server in maintenance.
    removed = {before.backend(r.route_id) for r in old.routes} - {
        after.backend(r.route_id) for r in new.routes
    }
    assert all(state == "maint" for (be, _), (_, state) in model.servers.items() if be in removed)
    # Spares are spent, never shared: each route has a backend of its own.
    assert len({after.backend(r.route_id) for r in new.routes}) == len(new.routes)
    added = {r.route_id for r in new.routes} - {r.route_id for r in old.routes}
    assert len(after.spares) == len(before.spares) - len(added)
