"""The edge with a real HAProxy (Debian's 2.6) and real TLS/TCP backends on loopback.

The edge listens on 127.0.0.10 (all of 127/8 is loopback); clients connect from
127.0.0.1 unless a test needs another source. Backends are Python servers with their own
self-signed certificates, so a client that verifies against a hostname's certificate
proves by the handshake alone that it reached that hostname's backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.core import proxyv2
from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot
from ember.edge import haproxy_config
from ember.edge.errors import ConfigRejected, ListenerUnavailable, ReloadFailed
from ember.edge.haproxy import HAProxy, HAProxyOptions
from tests.support.edge import (
    TCPEcho,
    TLSEcho,
    client_context,
    client_hello_bytes,
    closed_within,
    connect,
    handmade_client_hello,
    make_cert,
    read_line,
    route,
    servers,
    snapshot,
    tls_connect,
)
from tests.support.net import free_port

EDGE = "127.0.0.10"
INSPECT_S = 0.5
SETTINGS = EdgeSettings(
    inspect_timeout_ms=int(INSPECT_S * 1000),
    max_conn_per_source=100,
    max_conn_rate_per_source=100_000,  # the fuzzing opens many connections from one source
    connect_timeout_ms=2000,
    idle_timeout_ms=60_000,
    check_interval_ms=200,
)
HOSTS = ("a.test", "b.test", "c.test", "pp.test")
REFUSED = (ssl.SSLError, ConnectionError, OSError)


@pytest.fixture(scope="module")
def certs() -> Iterator[dict[str, tuple[Path, Path]]]:
    directory = Path(tempfile.mkdtemp(prefix="ember-certs-"))
    try:
        yield {h: make_cert(directory, h) for h in HOSTS}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def managed_edge(options: HAProxyOptions | None = None) -> Iterator[HAProxy]:
    # A short root: Unix socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ember-edge-"))
    edge = HAProxy(root, options or HAProxyOptions(nbthread=1))
    try:
        yield edge
    finally:
        edge.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def edge() -> Iterator[HAProxy]:
    with managed_edge() as e:
        yield e


def echo(sock: socket.socket, text: str = "ping") -> str:
    sock.sendall(f"{text}\n".encode())
    return read_line(sock)


def server_states(edge: HAProxy, backend: str) -> dict[str, str]:
    """server name -> 'up' | 'down' | 'maint' from ``show servers state``."""
    out = {}
    for line in edge.runtime.execute(f"show servers state {backend}").splitlines():
        f = line.split()
        if len(f) > 6 and f[1] == backend:
            op, admin = int(f[5]), int(f[6])
            out[f[3]] = "maint" if admin else ("up" if op == 2 else "down")
    return out


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- routing --------------------------------------------------------------------------------


def test_three_hostnames_on_one_port_each_reach_their_own_backend(
    edge: HAProxy, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = free_port(EDGE)
    backends = {h: TLSEcho(h, certs[h]) for h in HOSTS[:3]}
    with servers(*backends.values()):
        edge.start(
            snapshot(
                *(
                    route(f"r_{h[0]}", port=port, hostname=h, address=EDGE, backends=(b.backend(),))
                    for h, b in backends.items()
                ),
                settings=SETTINGS,
            )
        )
        for _ in range(2):
            for h in HOSTS[:3]:
                # Verifying against h's own self-signed certificate: only h's backend passes.
                tls, greeting = tls_connect(EDGE, port, h, certs[h][0])
                with tls:
                    assert greeting == h
                    assert echo(tls) == "ping"
        assert [b.served for b in backends.values()] == [2, 2, 2]


def test_unknown_sni_no_sni_and_bytes_that_are_not_tls_are_closed(
    edge: HAProxy, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = free_port(EDGE)
    with servers(TLSEcho("a.test", certs["a.test"])) as (backend,):
        edge.start(
            snapshot(
                route(
                    "r_a", port=port, hostname="a.test", address=EDGE, backends=(backend.backend(),)
                ),
                settings=SETTINGS,
            )
        )
        for hostname in ("unknown.test", None):
            with pytest.raises(REFUSED):
                tls_connect(EDGE, port, hostname, None)
        http = connect(EDGE, port)
        http.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        closed = closed_within(http, 2.0)
        assert closed is not None and closed < INSPECT_S  # refused at once, no waiting
        silent = connect(EDGE, port)
        closed = closed_within(silent, INSPECT_S + 2.0)
        assert closed is not None and INSPECT_S * 0.8 <= closed <= INSPECT_S + 1.0
        assert backend.served == 0
        tls, greeting = tls_connect(EDGE, port, "a.test", certs["a.test"][0])
        tls.close()
        assert greeting == "a.test"


def test_proxy_v2_route_backend_sees_the_real_client_address(
    edge: HAProxy, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = free_port(EDGE)
    pp = TLSEcho("pp.test", certs["pp.test"], proxy_v2=True)
    plain = TLSEcho("a.test", certs["a.test"])
    with servers(pp, plain):
        edge.start(
            snapshot(
                route(
                    "r_pp",
                    port=port,
                    hostname="pp.test",
                    address=EDGE,
                    backends=(pp.backend(),),
                    proxy_protocol="v2",
                ),
                route(
                    "r_a", port=port, hostname="a.test", address=EDGE, backends=(plain.backend(),)
                ),
                settings=SETTINGS,
            )
        )
        tls, greeting = tls_connect(EDGE, port, "pp.test", certs["pp.test"][0], source="127.0.0.1")
        with tls:
            client = tls.getsockname()
            assert greeting == "pp.test"
            assert echo(tls) == "ping"
        header = pp.seen[-1].header
        assert header is not None
        assert (header.command, header.family, header.transport) == (
            proxyv2.Command.PROXY,
            proxyv2.Family.INET,
            proxyv2.Transport.STREAM,
        )
        assert (str(header.source), header.source_port) == client
        assert (str(header.destination), header.destination_port) == (EDGE, port)
        assert pp.seen[-1].peer[0] == "127.0.0.1"  # the TCP peer is the edge, not the client
        # A route without PROXY v2 gets the client's bytes untouched (or its TLS would fail).
        tls, greeting = tls_connect(EDGE, port, "a.test", certs["a.test"][0])
        tls.close()
        assert greeting == "a.test"
        # HAProxy's checks of a PROXY v2 route send the header too (a LOCAL one), so the
        # server a header-expecting service would run stays up.
        wait_for(lambda: pp.local_headers > 0)
        assert server_states(edge, "be_r_pp") == {"i_pp.test": "up"}


def test_raw_tcp_route_carries_a_server_speaks_first_protocol(edge: HAProxy) -> None:
    port = free_port(EDGE)
    with servers(TCPEcho("db")) as (db,):
        edge.start(
            snapshot(
                route("r_db", port=port, address=EDGE, backends=(db.backend(),)), settings=SETTINGS
            )
        )
        with connect(EDGE, port) as sock:
            assert read_line(sock) == "db"  # no inspection delay on a TCP route
            assert echo(sock, "hello") == "hello"


# -- changes without dropping connections ------------------------------------------------------


def test_deleted_routes_refuse_new_connections_while_established_ones_survive(
    edge: HAProxy, certs: dict[str, tuple[Path, Path]]
) -> None:
    tls_port, tcp_port = free_port(EDGE), free_port(EDGE)
    a, b, db = TLSEcho("a.test", certs["a.test"]), TLSEcho("b.test", certs["b.test"]), TCPEcho("db")
    with servers(a, b, db):
        r_a = route("r_a", port=tls_port, hostname="a.test", address=EDGE, backends=(a.backend(),))
        r_b = route("r_b", port=tls_port, hostname="b.test", address=EDGE, backends=(b.backend(),))
        r_db = route("r_db", port=tcp_port, address=EDGE, backends=(db.backend(),))
        edge.start(snapshot(r_a, r_b, r_db, settings=SETTINGS))
        long_a, _ = tls_connect(EDGE, tls_port, "a.test", certs["a.test"][0])
        long_db = connect(EDGE, tcp_port)
        assert read_line(long_db) == "db"

        # A route leaves a listener that stays: the runtime API deletes its map entry.
        result = edge.apply(snapshot(r_b, r_db, settings=SETTINGS))
        assert not result.reloaded
        with pytest.raises(REFUSED):
            tls_connect(EDGE, tls_port, "a.test", certs["a.test"][0])
        assert echo(long_a, "still a") == "still a"
        tls, greeting = tls_connect(EDGE, tls_port, "b.test", certs["b.test"][0])
        tls.close()
        assert greeting == "b.test"

        # The TCP route goes with its listener: a seamless reload.
        result = edge.apply(snapshot(r_b, settings=SETTINGS))
        assert result.reloaded
        with pytest.raises(ConnectionRefusedError):
            connect(EDGE, tcp_port)
        assert echo(long_db, "still db") == "still db"
        assert echo(long_a, "still a") == "still a"
        assert edge.proc_info().old_workers  # kept alive by the two connections

        # A hostname added to a listener that exists takes a spare backend: no reload.
        result = edge.apply(snapshot(r_a, r_b, settings=SETTINGS))
        assert not result.reloaded
        assert result.plan.backends == {"r_a": "spare_1"}
        tls, greeting = tls_connect(EDGE, tls_port, "a.test", certs["a.test"][0])
        assert greeting == "a.test"
        # The next reload renders it as be_r_a; its connection in spare_1 stays up.
        result = edge.apply(snapshot(r_a, r_b, r_db, settings=SETTINGS))
        assert result.reloaded
        assert echo(tls, "from spare_1") == "from spare_1"
        tls.close()
        tls, greeting = tls_connect(EDGE, tls_port, "a.test", certs["a.test"][0])
        tls.close()
        assert greeting == "a.test"
        assert server_states(edge, "be_r_a") == {"i_a.test": "up"}
        assert echo(long_a, "and still") == "and still"
        assert echo(long_db, "and still") == "and still"
        long_a.close()
        long_db.close()
        wait_for(lambda: not edge.proc_info().old_workers)


def test_no_connection_attempt_fails_during_reloads(edge: HAProxy) -> None:
    port, other = free_port(EDGE), free_port(EDGE)
    failures: list[str] = []
    attempts = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal attempts
        while not stop.is_set():
            attempts += 1
            try:
                with connect(EDGE, port, timeout=2) as sock:
                    if read_line(sock) != "db":
                        failures.append("wrong greeting")
            except OSError as exc:
                failures.append(repr(exc))

    with servers(TCPEcho("db")) as (db,):
        r = route("r_db", port=port, address=EDGE, backends=(db.backend(),))
        extra = route("r_extra", port=other, address=EDGE, backends=(db.backend(),))
        edge.start(snapshot(r, settings=SETTINGS))
        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            for i in range(6):  # the extra listener comes and goes: a reload each time
                result = edge.apply(
                    snapshot(r, *([extra] if i % 2 == 0 else []), settings=SETTINGS)
                )
                assert result.reloaded
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
    assert attempts > 50
    assert failures == []


def test_backend_changes_apply_at_runtime_and_a_busy_server_lingers(
    edge: HAProxy, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = free_port(EDGE)
    one, two = TLSEcho("one", certs["a.test"]), TLSEcho("two", certs["a.test"])
    ca = certs["a.test"][0]

    def snap(*backends: Backend) -> EdgeSnapshot:
        return snapshot(
            route("r_a", port=port, hostname="a.test", address=EDGE, backends=backends),
            settings=SETTINGS,
        )

    with servers(one, two):
        edge.start(snap(one.backend()))
        held, greeting = tls_connect(EDGE, port, "a.test", ca)
        assert greeting == "one"

        result = edge.apply(snap(one.backend(), two.backend()))
        assert not result.reloaded
        assert [c.op.value for c in result.plan.commands] == [
            "add server",
            "enable health",
            "set server state",
        ]
        tls, greeting = tls_connect(EDGE, port, "a.test", ca)  # leastconn: the idle one
        tls.close()
        assert greeting == "two"

        result = edge.apply(snap(two.backend()))
        assert not result.reloaded
        assert result.lingering == {("be_r_a", "i_one")}  # it still carries `held`
        assert echo(held, "held") == "held"
        for _ in range(3):
            tls, greeting = tls_connect(EDGE, port, "a.test", ca)
            tls.close()
            assert greeting == "two"

        held.close()

        def deleted() -> bool:
            retry = edge.retry_lingering()
            return retry is None or not retry.lingering

        wait_for(deleted)
        assert server_states(edge, "be_r_a") == {"i_two": "up"}

        # The platform marks the instance unhealthy: maintenance, no new connections.
        result = edge.apply(snap(two.backend(healthy=False)))
        assert not result.reloaded
        assert server_states(edge, "be_r_a") == {"i_two": "maint"}
        with pytest.raises(REFUSED):
            tls_connect(EDGE, port, "a.test", ca)
        edge.apply(snap(two.backend()))
        tls, greeting = tls_connect(EDGE, port, "a.test", ca)
        tls.close()
        assert greeting == "two"


def test_runtime_drift_is_repaired_by_a_reload(
    edge: HAProxy, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = free_port(EDGE)
    one, two = TLSEcho("one", certs["a.test"]), TLSEcho("two", certs["a.test"])
    with servers(one, two):
        r = route("r_a", port=port, hostname="a.test", address=EDGE, backends=(one.backend(),))
        edge.start(snapshot(r, settings=SETTINGS))
        # Someone removes the server behind the edge's back; the next runtime command on
        # it fails, and the driver reloads the whole snapshot instead.
        assert edge.runtime.execute("set server be_r_a/i_one state maint").strip() == ""
        assert "deleted" in edge.runtime.execute("del server be_r_a/i_one")
        moved = dataclasses.replace(one.backend(), port=two.port)  # i_one now at `two`
        result = edge.apply(snapshot(dataclasses.replace(r, backends=(moved,)), settings=SETTINGS))
        assert result.reloaded
        assert result.fallback is not None and "No such server" in result.fallback
        tls, greeting = tls_connect(EDGE, port, "a.test", certs["a.test"][0])
        tls.close()
        assert greeting == "two"


def test_a_listener_that_cannot_be_bound_is_refused_before_reloading(edge: HAProxy) -> None:
    good_port, taken_port = free_port(EDGE), free_port(EDGE)
    with servers(TCPEcho("db")) as (db,):
        r_good = route("r_good", port=good_port, address=EDGE, backends=(db.backend(),))
        r_new = route("r_new", port=taken_port, address=EDGE, backends=(db.backend(),))
        r_away = route("r_away", port=good_port, address="192.0.2.1", backends=(db.backend(),))
        edge.start(snapshot(r_good, settings=SETTINGS))
        reloads = edge.proc_info().reloads
        with socket.create_server((EDGE, taken_port)), pytest.raises(ListenerUnavailable) as err:
            edge.apply(snapshot(r_good, r_new, r_away, settings=SETTINGS))
        assert err.value.code == "edge.listener_unavailable"
        assert {(d["address"], d["port"]) for d in err.value.detail["listeners"]} == {
            (EDGE, taken_port),
            ("192.0.2.1", good_port),  # not an address of this host
        }
        assert edge.proc_info().reloads == reloads  # nothing was attempted
        with connect(EDGE, good_port) as sock:
            assert read_line(sock) == "db"


def test_a_reload_that_fails_keeps_the_last_good_configuration() -> None:
    good_port, taken_port = free_port(EDGE), free_port(EDGE)
    with (
        managed_edge(HAProxyOptions(nbthread=1, preflight_binds=False)) as edge,
        servers(TCPEcho("db")) as (db,),
    ):
        r_good = route("r_good", port=good_port, address=EDGE, backends=(db.backend(),))
        r_new = route("r_new", port=taken_port, address=EDGE, backends=(db.backend(),))
        edge.start(snapshot(r_good, settings=SETTINGS))
        good_config = edge.config_file.read_text()
        held = connect(EDGE, good_port)
        assert read_line(held) == "db"
        # `haproxy -c` cannot see that the port is taken; only the reload's bind fails.
        with socket.create_server((EDGE, taken_port)):
            with pytest.raises(ReloadFailed) as err:
                edge.apply(snapshot(r_good, r_new, settings=SETTINGS))
            assert err.value.code == "edge.reload_failed"
        assert edge.config_file.read_text() == good_config
        assert echo(held) == "ping"
        with connect(EDGE, good_port) as sock:
            assert read_line(sock) == "db"
        # Once the port is free the same snapshot applies.
        assert edge.apply(snapshot(r_good, r_new, settings=SETTINGS)).reloaded
        with connect(EDGE, taken_port) as sock:
            assert read_line(sock) == "db"
        held.close()


def test_a_config_haproxy_refuses_is_never_promoted(
    edge: HAProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, other = free_port(EDGE), free_port(EDGE)
    with servers(TCPEcho("db")) as (db,):
        r = route("r_db", port=port, address=EDGE, backends=(db.backend(),))
        edge.start(snapshot(r, settings=SETTINGS))
        good = edge.config_file.read_text()
        running = edge.running
        real_render = haproxy_config.render

        def buggy(*args: Any, **kwargs: Any) -> str:  # a renderer bug, simulated
            return real_render(*args, **kwargs) + "backend broken\n    bogus-keyword\n"

        monkeypatch.setattr(haproxy_config, "render", buggy)
        extra = route("r_x", port=other, address=EDGE, backends=(db.backend(),))
        with pytest.raises(ConfigRejected) as err:
            edge.apply(snapshot(r, extra, settings=SETTINGS))
        assert err.value.code == "edge.config_rejected"
        assert "bogus-keyword" in err.value.detail["output"]
        assert edge.config_file.read_text() == good
        assert edge.running is running
        with connect(EDGE, port) as sock:
            assert read_line(sock) == "db"
        monkeypatch.setattr(haproxy_config, "render", real_render)
        assert edge.apply(snapshot(r, extra, settings=SETTINGS)).reloaded


def test_a_new_driver_adopts_the_running_haproxy(edge: HAProxy) -> None:
    p1, p2 = free_port(EDGE), free_port(EDGE)
    with servers(TCPEcho("db")) as (db,):
        r1 = route("r_1", port=p1, address=EDGE, backends=(db.backend(),))
        r2 = route("r_2", port=p2, address=EDGE, backends=(db.backend(),))
        edge.start(snapshot(r1, settings=SETTINGS))
        held = connect(EDGE, p1)
        assert read_line(held) == "db"
        successor = HAProxy(edge.root, edge.options)  # a restarted controller
        result = successor.start(snapshot(r1, r2, settings=SETTINGS))
        assert result.reloaded
        assert successor.master_pid == edge.master_pid
        with connect(EDGE, p2) as sock:
            assert read_line(sock) == "db"
        assert echo(held) == "ping"
        held.close()


def test_per_source_connection_limit(edge: HAProxy) -> None:
    port = free_port(EDGE)
    limited = EdgeSettings(**{**SETTINGS.__dict__, "max_conn_per_source": 3})
    with servers(TCPEcho("db")) as (db,):
        edge.start(
            snapshot(
                route("r_db", port=port, address=EDGE, backends=(db.backend(),)), settings=limited
            )
        )
        held = [connect(EDGE, port) for _ in range(3)]
        assert [read_line(s) for s in held] == ["db"] * 3
        try:  # the 4th from 127.0.0.1 is rejected (the reset may beat connect() back)
            extra = connect(EDGE, port)
        except ConnectionResetError:
            pass
        else:
            assert closed_within(extra, 2.0) is not None
            extra.close()
        with connect(EDGE, port, source="127.0.0.2") as other:
            assert read_line(other) == "db"  # another source has its own budget
        held.pop().close()
        time.sleep(0.1)
        with connect(EDGE, port) as again:
            assert read_line(again) == "db"
        for s in held:
            s.close()


# -- hostile ClientHellos --------------------------------------------------------------------------


def _handshake_over(
    sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
) -> None:
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if pending := outgoing.read():
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(data)
    if pending := outgoing.read():
        sock.sendall(pending)


def _read_app_line(sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            buf += obj.read(1024)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed") from None
            incoming.write(data)
    return buf.decode().strip()


def test_a_2kb_client_hello_split_across_tcp_segments_still_routes(
    edge: HAProxy, certs: dict[str, tuple[Path, Path]]
) -> None:
    port = free_port(EDGE)
    with servers(TLSEcho("a.test", certs["a.test"])) as (backend,):
        edge.start(
            snapshot(
                route(
                    "r_a", port=port, hostname="a.test", address=EDGE, backends=(backend.backend(),)
                ),
                settings=SETTINGS,
            )
        )
        ctx = client_context(certs["a.test"][0])
        ctx.set_alpn_protocols([f"{i}-{'x' * 200}" for i in range(9)])  # ~1.9 KB of ALPN
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        assert 2048 <= len(hello) <= 4096
        with connect(EDGE, port) as sock:
            for i in range(0, len(hello), 100):  # ~21 segments over ~0.2 s (< inspect delay)
                sock.sendall(hello[i : i + 100])
                time.sleep(0.01)
            _handshake_over(sock, obj, incoming, outgoing)
            assert _read_app_line(sock, obj, incoming) == "a.test"


@pytest.fixture(scope="module")
def fuzz_target(certs: dict[str, tuple[Path, Path]]) -> Iterator[tuple[HAProxy, int]]:
    port = free_port(EDGE)
    with managed_edge() as edge, servers(TLSEcho("a.test", certs["a.test"])) as (backend,):
        edge.start(
            snapshot(
                route(
                    "r_a", port=port, hostname="a.test", address=EDGE, backends=(backend.backend(),)
                ),
                settings=SETTINGS,
            )
        )
        yield edge, port


lengths = st.none() | st.integers(0, 0xFFFF)
hostile_hellos = st.one_of(
    st.binary(min_size=1, max_size=512),  # random bytes
    st.builds(  # a real hello for a routed name, cut short: waits, then closed
        lambda n: client_hello_bytes("a.test")[: max(1, n)], st.integers(1, 500)
    ),
    st.builds(  # bad lengths, odd or empty SNI
        handmade_client_hello,
        st.binary(max_size=300).filter(lambda b: b != b"a.test"),
        record_len=lengths,
        handshake_len=lengths,
        sni_list_len=lengths,
        sni_name_len=lengths,
    ),
    st.builds(  # huge SNI (up to past HAProxy's 16 KB buffer)
        lambda n: handmade_client_hello(b"h" * n), st.integers(300, 17_000)
    ),
)


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=hostile_hellos)
def test_hostile_client_hellos_are_closed_within_the_inspect_timeout(
    fuzz_target: tuple[HAProxy, int], certs: dict[str, tuple[Path, Path]], payload: bytes
) -> None:
    edge, port = fuzz_target
    with connect(EDGE, port) as sock:
        with contextlib.suppress(OSError):  # HAProxy may reset before a huge payload is in
            sock.sendall(payload)
        closed = closed_within(sock, INSPECT_S + 2.0)
    assert closed is not None, f"still open after {INSPECT_S + 2.0}s"
    assert closed <= INSPECT_S + 1.0
    assert edge.alive()
    tls, greeting = tls_connect(EDGE, port, "a.test", certs["a.test"][0])  # not wedged
    tls.close()
    assert greeting == "a.test"
