"""The pure rules of routes and dedicated addresses (ember.core.routes, ember.core.ipv4):
validation, configuration, the snapshot builder, instance addresses, and — as a property
test over random command sequences from several orgs, run on in-memory streams the way
the API runs them — the uniqueness invariants."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core import ipv4
from ember.core import routes as rt
from ember.core.edge import Backend, EdgeSettings, RouteKind
from ember.core.errors import Conflict, NotFound, ValidationFailed
from ember.core.events import EventData, RecordedEvent
from ember.core.instances import InstanceState, InvalidReport, decide_report
from ember.wire.routes import EdgeSnapshot

S = TypeVar("S")
CONFIG = rt.RoutingConfig(tcp_ports=(10000, 10003))


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("api.example.com", "api.example.com"),
        ("API.Example.COM", "api.example.com"),
        ("  a-b.c-d.example  ", "a-b.c-d.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1.example.com", "1.example.com"),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ],
)
def test_hostnames_are_accepted_and_lowercased(given_name: str, expected: str) -> None:
    assert rt.check_hostname(given_name) == expected


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("", "needs a hostname"),
        ("*.example.com", "wildcard hostnames are not supported yet"),
        ("example.com.", "trailing dot"),
        ("localhost", "fully qualified"),
        ("a..example.com", "label ''"),
        ("-a.example.com", "label '-a'"),
        ("a-.example.com", "label 'a-'"),
        ("a_b.example.com", "label 'a_b'"),
        ("a" * 64 + ".example.com", "label"),
        (".".join(["a" * 63] * 4) + ".com", "at most 253"),
        ("bücher.example", "punycode"),
        ("10.0.0.1", "IP address"),
        ("a b.example.com", "label"),
        ("a\x00.example.com", "invalid hostname"),
    ],
)
def test_bad_hostnames_name_the_field(bad: str, says: str) -> None:
    with pytest.raises(rt.InvalidRoute) as caught:
        rt.check_hostname(bad)
    assert caught.value.detail == {"field": "hostname"}
    assert says in caught.value.message + (caught.value.hint or "")


def check(**fields: Any) -> rt.RouteRequest:
    body: dict[str, Any] = {
        "kind": "tls",
        "hostname": "a.example.com",
        "port": None,
        "process": "web",
        "backend_port": 8443,
    }
    return rt.check_route(CONFIG, **{**body, **fields})


def test_check_route_applies_the_port_rules() -> None:
    assert check().port == 443
    assert check(port=10002).port == 10002  # a TLS route may use a pool port
    assert check(kind="tcp", hostname=None).port is None  # auto
    assert check(kind="tcp", hostname=None, port="auto").port is None
    assert check(kind="tcp", hostname=None, port=10003).port == 10003
    tcp = check(kind="tcp", hostname=None, ip="127.10.0.9", proxy_protocol="v2")
    assert (tcp.kind, tcp.hostname, tcp.ip, tcp.proxy_protocol) == ("tcp", None, "127.10.0.9", "v2")
    for fields, field in [
        ({"kind": "udp"}, "kind"),
        ({"port": "auto"}, "port"),
        ({"port": 8443}, "port"),
        ({"port": 0}, "port"),
        ({"port": True}, "port"),
        ({"port": "443"}, "port"),
        ({"kind": "tcp", "hostname": None, "port": 443}, "port"),
        ({"kind": "tcp", "hostname": None, "port": 10004}, "port"),
        ({"kind": "tcp"}, "hostname"),
        ({"hostname": None}, "hostname"),
        ({"process": "Web"}, "process"),
        ({"backend_port": 65536}, "backend_port"),
        ({"proxy_protocol": "v1"}, "proxy_protocol"),
        ({"ip": "::1"}, "ip"),
        ({"ip": "300.1.1.1"}, "ip"),
    ]:
        with pytest.raises(rt.InvalidRoute) as caught:
            check(**fields)
        assert caught.value.detail["field"] == field, fields


def test_routing_config_from_the_environment() -> None:
    default = rt.load_routing_config({})
    assert default == rt.RoutingConfig()
    assert (default.tcp_ports, default.shared_address) == ((10000, 10999), "0.0.0.0")
    assert default.ipv4_pool == (ipaddress.IPv4Network("127.10.0.0/24"),)
    custom = rt.load_routing_config(
        {
            "EMBER_EDGE_TCP_PORTS": " 20000 - 20010 ",
            "EMBER_EDGE_IPV4_POOL": "203.0.113.8/30, 198.51.100.7",
            "EMBER_EDGE_SHARED_ADDRESS": "::",
        }
    )
    assert custom.tcp_ports == (20000, 20010) and custom.shared_address == "::"
    assert list(ipv4.pool_addresses(custom.ipv4_pool)) == [
        "198.51.100.7",
        "203.0.113.9",
        "203.0.113.10",
    ]
    for env in (
        {"EMBER_EDGE_TCP_PORTS": "10-5"},
        {"EMBER_EDGE_TCP_PORTS": "0-5"},
        {"EMBER_EDGE_TCP_PORTS": "many"},
        {"EMBER_EDGE_IPV4_POOL": "2001:db8::/64"},
        {"EMBER_EDGE_IPV4_POOL": " , "},
        {"EMBER_EDGE_SHARED_ADDRESS": "edge.example.com"},
    ):
        with pytest.raises(ValidationFailed) as caught:
            rt.load_routing_config(env)
        assert caught.value.detail["field"] == next(iter(env)), env


def test_free_ports_skip_the_used_ones() -> None:
    assert list(rt.free_ports(CONFIG, [10001, 9000])) == [10000, 10002, 10003]


# -- instance addresses ----------------------------------------------------------------------


def test_reports_carry_a_normalised_address() -> None:
    report: Callable[..., list[EventData]] = lambda state, **kw: decide_report(  # noqa: E731
        InstanceState.ASSIGNED, "h1", instance_id="i1", host_id="h1", state=state, **kw
    )
    [starting] = report("starting", address="FD00::0:A")
    assert starting.model_dump() == {"instance_id": "i1", "host_id": "h1", "address": "fd00::a"}
    [healthy] = report("healthy", address="10.0.0.7")
    assert healthy.model_dump()["address"] == "10.0.0.7"
    assert report("healthy")[0].model_dump()["address"] is None
    for state, address in (
        ("stopped", "10.0.0.7"),
        ("starting", "fe80::1%eth0"),
        ("starting", "[fd00::1]"),
        ("starting", "0.0.0.0"),
        ("starting", "ff02::1"),
        ("starting", "host.example"),
    ):
        with pytest.raises(InvalidReport) as caught:
            report(state, address=address)
        assert caught.value.detail == {"field": "address"}


# -- the edge's snapshot ---------------------------------------------------------------------


def route_row(route_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "route_id": route_id,
        "org_id": "org_1",
        "app_id": "app_1",
        "env": "prod",
        "process": "web",
        "kind": "tls",
        "address": "0.0.0.0",
        "port": 443,
        "hostname": "a.example.com",
        "backend_port": 8443,
        "proxy_protocol": None,
        **fields,
    }


def backend(instance_id: str, process: str, address: str) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "app_id": "app_1",
        "env": "prod",
        "process": process,
        "address": address,
    }


def test_build_snapshot_joins_backends_and_orders_everything() -> None:
    rows = [
        route_row("rt_3", kind="tcp", port=10000, hostname=None, process="db", backend_port=5432),
        route_row("rt_2", hostname="b.example.com", proxy_protocol="v2"),
        route_row("rt_1"),
        route_row("rt_4", env="staging"),
    ]
    backends = [
        backend("i_b", "web", "fd00::b"),
        backend("i_a", "web", "fd00::a"),
        backend("i_c", "db", "10.0.0.3"),
    ]
    snap = rt.build_snapshot("5-9", rows, backends)
    assert [r.route_id for r in snap.routes] == ["rt_1", "rt_4", "rt_2", "rt_3"]
    by_id = {r.route_id: r for r in snap.routes}
    assert by_id["rt_1"].backends == (
        Backend("i_a", "fd00::a", 8443, True),
        Backend("i_b", "fd00::b", 8443, True),
    )
    assert by_id["rt_4"].backends == ()
    assert by_id["rt_3"].backends == (Backend("i_c", "10.0.0.3", 5432, True),)
    assert by_id["rt_3"].kind is RouteKind.TCP and by_id["rt_2"].proxy_protocol == "v2"
    assert snap.settings == EdgeSettings() and snap.cursor == "5-9"
    assert list(snap.listeners()) == [("0.0.0.0", 443), ("0.0.0.0", 10000)]
    # The wire model carries it unchanged.
    assert EdgeSnapshot.from_core(snap).to_core() == snap
    wire = EdgeSnapshot.model_validate_json(EdgeSnapshot.from_core(snap).model_dump_json())
    assert wire.to_core() == snap


# -- the rules, run the way the API runs them -------------------------------------------------


class Log:
    """In-memory streams with the event log's optimistic concurrency."""

    def __init__(self) -> None:
        self.streams: dict[str, list[RecordedEvent]] = {}
        self.position = 0

    def read(self, stream: str, fold: Callable[[Iterable[RecordedEvent]], S]) -> S:
        return fold(self.streams.get(stream, []))

    def append(self, plan: dict[str, list[EventData]]) -> None:
        for stream, events in sorted(plan.items()):
            recorded = self.streams.setdefault(stream, [])
            for e in events:
                self.position += 1
                recorded.append(
                    RecordedEvent(
                        position=self.position,
                        xid=self.position,
                        stream_id=stream,
                        stream_version=len(recorded) + 1,
                        type=e.event_type,
                        schema_version=1,
                        data=e.model_dump(mode="json"),
                        metadata={},
                        recorded_at=dt.datetime.now(dt.UTC),
                    )
                )


@dataclasses.dataclass
class World:
    log: Log = dataclasses.field(default_factory=Log)
    ids: int = 0
    routes: dict[str, rt.RouteCreated] = dataclasses.field(default_factory=dict)
    ips: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # addr -> org, id

    def create(self, org: str, env: str, req: rt.RouteRequest) -> str:
        env_routes = self.log.read(rt.routes_stream(f"app_{org}", env), rt.fold_env_routes)
        address, ip_id = "0.0.0.0", None
        if req.ip is not None:
            held = self.log.read(ipv4.ipv4_stream(req.ip), ipv4.fold_address)
            if held.org_id != org:
                raise ipv4.not_found(req.ip, field="ip")
            address, ip_id = req.ip, held.ip_id
        existing = rt.same_route(env_routes.routes.values(), req, address)
        if existing is not None:
            return existing.route_id
        used = {
            r.port for r in self.routes.values() if (r.ip_id or r.address) == (ip_id or address)
        }
        ports = [req.port] if req.port is not None else list(rt.free_ports(CONFIG, used))
        self.ids += 1
        route_id = f"rt_{self.ids}"
        for port in ports:
            at = rt.Binding(address, ip_id, port, req.port is None)
            try:
                plan = rt.decide_create(
                    req,
                    at,
                    route_id=route_id,
                    org_id=org,
                    app_id=f"app_{org}",
                    env=env,
                    env_routes=env_routes,
                    listener=self.log.read(
                        rt.listener_stream(address, port, ip_id), rt.fold_listener
                    ),
                    hostname=self.log.read(rt.hostname_stream(req.hostname), rt.fold_hostname)
                    if req.hostname
                    else None,
                    address=self.log.read(ipv4.ipv4_stream(address), ipv4.fold_address)
                    if ip_id
                    else None,
                )
            except rt.PortTaken:
                if req.port is not None:
                    raise
                continue
            self.log.append(plan)
            [created] = plan[rt.routes_stream(f"app_{org}", env)]
            assert isinstance(created, rt.RouteCreated)
            self.routes[route_id] = created
            return route_id
        raise rt.NoFreePort("full")

    def delete(self, route_id: str) -> None:
        r = self.routes.pop(route_id)
        plan = rt.decide_delete(
            r,
            listener=self.log.read(
                rt.listener_stream(r.address, r.port, r.ip_id), rt.fold_listener
            ),
            hostname=self.log.read(rt.hostname_stream(r.hostname), rt.fold_hostname)
            if r.hostname
            else None,
            address=self.log.read(ipv4.ipv4_stream(r.address), ipv4.fold_address)
            if r.ip_id
            else None,
        )
        self.log.append(plan)

    def allocate(self, org: str, address: str) -> None:
        state = self.log.read(ipv4.ipv4_stream(address), ipv4.fold_address)
        self.ids += 1
        plan = ipv4.decide_allocate(state, address=address, org_id=org, ip_id=f"ip_{self.ids}")
        self.log.append({ipv4.ipv4_stream(address): plan})
        self.ips[address] = (org, f"ip_{self.ids}")

    def release(self, org: str, address: str) -> None:
        state = self.log.read(ipv4.ipv4_stream(address), ipv4.fold_address)
        self.log.append(
            {ipv4.ipv4_stream(address): ipv4.decide_release(state, address=address, org_id=org)}
        )
        del self.ips[address]


ORGS = ("o1", "o2", "o3")
ENVS = ("prod", "dev")
ADDRESSES = ("127.10.0.1", "127.10.0.2")
requests = st.builds(
    lambda kind, name, port, backend, proxy, ip: rt.check_route(
        CONFIG,
        kind=kind,
        hostname=name if kind == "tls" else None,
        port=None if kind == "tls" and port == "auto" else port,
        process="web",
        backend_port=backend,
        proxy_protocol=proxy,
        ip=ip,
    ),
    st.sampled_from(["tls", "tcp"]),
    st.sampled_from(["a.example.com", "b.example.com"]),
    st.sampled_from([None, "auto", 10000, 10001]),
    st.sampled_from([8443, 9000]),
    st.sampled_from([None, "v2"]),
    st.sampled_from([None, None, None, *ADDRESSES]),
)
creates = st.tuples(st.just("create"), st.sampled_from(ORGS), st.sampled_from(ENVS), requests)
commands = st.lists(
    st.one_of(
        creates,
        creates,
        creates,
        st.tuples(st.just("delete"), st.integers(0, 30)),
        st.tuples(st.just("allocate"), st.sampled_from(ORGS), st.sampled_from(ADDRESSES)),
        st.tuples(st.just("release"), st.sampled_from(ORGS), st.sampled_from(ADDRESSES)),
    ),
    min_size=5,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(commands)
def test_uniqueness_holds_whatever_the_orgs_do(script: list[tuple[Any, ...]]) -> None:
    world = World()
    for command, *args in script:
        try:
            if command == "create":
                world.create(*args)
            elif command == "delete" and world.routes:
                world.delete(sorted(world.routes)[args[0] % len(world.routes)])
            elif command == "allocate":
                world.allocate(*args)
            elif command == "release":
                world.release(*args)
        except (Conflict, NotFound):
            pass
        check_invariants(world)
    for route_id in list(world.routes):
        world.delete(route_id)
    # Everything a route held is free again: hostnames, TCP ports, addresses' routes.
    for stream in world.log.streams:
        if stream.startswith("hostname-"):
            assert world.log.read(stream, rt.fold_hostname) == rt.HostnameState()
        if stream.startswith("listener-"):
            assert world.log.read(stream, rt.fold_listener).kind in (None, RouteKind.TLS)
        if stream.startswith("ipv4-"):
            assert world.log.read(stream, ipv4.fold_address).routes == set()


def check_invariants(world: World) -> None:
    routes = list(world.routes.values())
    bindings = [(r.ip_id or r.address, r.port, r.hostname) for r in routes]
    assert len(bindings) == len(set(bindings)), "a binding is one route's"
    owners: dict[str, set[str]] = {}
    for r in routes:
        if r.hostname:
            owners.setdefault(r.hostname, set()).add(r.org_id)
    assert all(len(orgs) == 1 for orgs in owners.values()), "a hostname is one org's"
    for r in routes:
        if r.kind is RouteKind.TCP:
            same_port = [
                o
                for o in routes
                if (o.ip_id or o.address, o.port) == (r.ip_id or r.address, r.port)
            ]
            assert same_port == [r], "a TCP port is one route's, and no TLS route's"
        if r.ip_id is not None:
            assert world.ips.get(r.address) == (r.org_id, r.ip_id), "only on the org's own address"
        assert r.port == 443 or CONFIG.in_pool(r.port)
    # The streams agree with the routes that exist.
    for r in routes:
        if r.hostname:
            state = world.log.read(rt.hostname_stream(r.hostname), rt.fold_hostname)
            assert state.org_id == r.org_id and state.bindings[(r.address, r.port)] == r.route_id
