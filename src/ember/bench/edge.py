"""`make bench-edge`: new TLS-passthrough connections per second through the managed edge,
against the same HAProxy binary with a minimal hand-written SNI configuration.

What one connection is (the same for both, from the same load generator): TCP connect,
send a real ClientHello (Python's ssl, SNI ``bench.test``, ~500 bytes), read the first
bytes of the backend's answer, close. The backend reads the whole ClientHello record and
answers with a canned ServerHello-sized TLS record, then closes. No cryptography runs on
either end: a full handshake would spend its time in the Python endpoints and hide the
edge; this way the numbers measure what the edge does per connection (accept, per-source
tracking, inspect, SNI map lookup, connect upstream, forward both ways, close).

* ``edge_conn_per_s``: through :class:`ember.edge.haproxy.HAProxy` serving a snapshot
  rendered by :mod:`ember.edge.haproxy_config` (master-worker, stick table, inspect
  delay, SNI map, health checks; per-source limits set high enough not to reject the
  benchmark's single source address, so they are evaluated but never hit).
* ``direct_haproxy_conn_per_s``: the same binary with :data:`DIRECT_CONFIG` (one
  frontend, inspect delay, ``use_backend ... if { req.ssl_sni -i bench.test }``).
* ``conn_ratio`` = edge / direct, goal >= 0.9. Rounds alternate which one goes first;
  every figure is the median of its rounds. Both HAProxies run one thread, the backend
  and the load generator each run in their own process (2 cores are shared by all four).

Route propagation, through the real path (:func:`measure_propagation`): a throwaway
Postgres (default durability), the API in its own uvicorn process on 127.0.0.1 (edge
shared address :data:`PROPAGATION_ADDRESS`, a small TCP port pool), the real
:class:`ember.edge.controller.EdgeController` in a thread of this process long-polling
``Client.edge_snapshot(after, wait)``, and its HAProxy. Set up once: an operator token,
org/app/env through the API, one instance of process ``web`` placed and reported healthy
with the benchmark backend's address (events appended as the scheduler and an agent
append them), and a warm-up TLS route that makes the shared :443 listener exist.

* ``route_propagation_p50_ms`` / ``_p99_ms``: ``POST .../routes`` for a TLS route with a
  fresh hostname on the shared port 443 is sent (t0; the API appends the route event);
  then a tight loop (2 ms sleeps) connects to :443 and sends a ClientHello with that SNI
  until the backend answers through the edge (t1). The figure is t1 - t0. A new hostname
  on an existing listener is applied through the runtime API (a spare backend + a map
  entry) until the configuration's spare backends run out; that apply is a reload.
* ``tcp_route_propagation_p50_ms`` / ``_p99_ms``: the same for ``--tcp --port auto``
  routes: a new listener, so every one is a seamless reload.

Where the time goes is reported per phase (``propagation_phases``, ms after t0): the API's
answer (append + fold of the route view), the long-poll's answer carrying the route, the
end of HAProxy's apply, and the first routed connection.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import os
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ember.bench.common import bench_cluster, median, percentile, run_and_report
from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot, Route, RouteKind
from ember.edge.haproxy import ApplyResult, HAProxy, HAProxyOptions

GOAL_RATIO = 0.9
HOSTNAME = "bench.test"
EDGE_ADDRESS = "127.0.0.20"
DIRECT_ADDRESS = "127.0.0.21"
BACKEND_ADDRESS = "127.0.0.22"
PROPAGATION_ADDRESS = "127.0.0.20"
"""The API's edge shared address in the propagation run (its routes bind :443 there; the
connection-rate edge on the same address is stopped by then)."""
GOAL_PROPAGATION_P99_MS = 200.0
CONCURRENCY = 32
# A ServerHello-sized TLS handshake record: what a TLS server's first bytes look like.
FIRST_BYTES = b"\x16\x03\x03\x00\x5a\x02\x00\x00\x56\x03\x03" + b"\x00" * 86

DIRECT_CONFIG = """\
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend sni
    bind {address}:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend app if {{ req.ssl_sni -i {hostname} }}
backend app
    server s1 {backend}
"""


@dataclasses.dataclass(frozen=True)
class Target:
    address: str
    port: int
    pid: int | None = None
    """The HAProxy process that does the work (CPU accounting), if any."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def client_hello(hostname: str) -> bytes:
    """The first flight of Python's TLS client for ``hostname``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- the backend (its own process) ---------------------------------------------------------


def _serve(address: str, port: int, ready: Connection) -> None:
    """Read a whole TLS record, answer FIRST_BYTES, close; forever (non-blocking)."""
    listener = socket.create_server((address, port), backlog=4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    ready.send(True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                _accept_all(listener, sel)
                continue
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            buf: bytearray = key.data
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            buf += chunk
            complete = len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big")
            if complete or not chunk:
                sel.unregister(sock)
                if complete:
                    with contextlib.suppress(OSError):
                        sock.send(FIRST_BYTES)
                sock.close()


def _accept_all(listener: socket.socket, sel: selectors.BaseSelector) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, bytearray())


@contextlib.contextmanager
def backend_process(address: str) -> Iterator[Target]:
    port = free_port(address)
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_serve, args=(address, port, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(10):
            raise RuntimeError("the benchmark backend did not start")
        yield Target(address, port)
    finally:
        proc.terminate()
        proc.join(5)


# -- the load generator (its own process) ------------------------------------------------------


def _drive(target: Target, hello: bytes, concurrency: int, seconds: float, out: Connection) -> None:
    """Keep ``concurrency`` connections in flight for ``seconds``; report (ok, errors, s)."""
    sel = selectors.DefaultSelector()
    linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT eats the client's ports
    ok = errors = 0

    def open_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex((target.address, target.port))
        sel.register(sock, selectors.EVENT_WRITE, "connecting")

    start = time.perf_counter()
    deadline = start + seconds
    for _ in range(concurrency):
        open_one()
    while time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=0.5):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data == "connecting":
                try:
                    sock.send(hello)
                    sel.modify(sock, selectors.EVENT_READ, "reading")
                    continue
                except OSError:
                    good = False
            else:
                try:
                    good = sock.recv(len(FIRST_BYTES)).startswith(FIRST_BYTES[:5])
                except OSError:
                    good = False
            sel.unregister(sock)
            sock.close()
            ok, errors = (ok + 1, errors) if good else (ok, errors + 1)
            open_one()
    elapsed = time.perf_counter() - start
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    out.send((ok, errors, elapsed))


def load(
    target: Target, hello: bytes, *, seconds: float, concurrency: int = CONCURRENCY
) -> dict[str, float]:
    """Connections per second (and HAProxy CPU microseconds per connection) of one round."""
    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(
        target=_drive, args=(target, hello, concurrency, seconds, child), daemon=True
    )
    proc.start()
    if not parent.poll(seconds + 30):
        proc.kill()
        raise RuntimeError("the load generator did not report")
    ok, errors, elapsed = parent.recv()
    proc.join(5)
    cpu = cpu_seconds(target.pid) - cpu_before if target.pid else 0.0
    return {
        "conn_per_s": ok / elapsed,
        "cpu_us_per_conn": cpu / ok * 1e6 if ok else 0.0,
        "ok": ok,
        "errors": errors,
    }


# -- the two HAProxies ---------------------------------------------------------------------------


def edge_snapshot(port: int, backend: Target) -> EdgeSnapshot:
    route = Route(
        route_id="r_bench",
        org_id="o_bench",
        app_id="a_bench",
        env="production",
        process="web",
        kind=RouteKind.TLS,
        address=EDGE_ADDRESS,
        port=port,
        hostname=HOSTNAME,
        backend_port=backend.port,
        backends=(Backend("i_bench", backend.address, backend.port),),
    )
    # Limits far above the benchmark's rate from its one source address: the stick
    # table is updated on every connection, but nothing is rejected.
    settings = EdgeSettings(max_conn_per_source=100_000, max_conn_rate_per_source=10_000_000)
    return EdgeSnapshot("bench", (route,), settings)


@contextlib.contextmanager
def managed_edge(backend: Target, root: Path) -> Iterator[Target]:
    port = free_port(EDGE_ADDRESS)
    edge = HAProxy(root / "edge", HAProxyOptions(nbthread=1))
    try:
        edge.start(edge_snapshot(port, backend))
        yield Target(EDGE_ADDRESS, port, edge.proc_info().workers[0])
    finally:
        edge.stop()


@contextlib.contextmanager
def direct_haproxy(backend: Target, root: Path) -> Iterator[Target]:
    port = free_port(DIRECT_ADDRESS)
    config = root / "direct.cfg"
    config.write_text(
        DIRECT_CONFIG.format(
            address=DIRECT_ADDRESS,
            port=port,
            hostname=HOSTNAME,
            backend=f"{backend.address}:{backend.port}",
        )
    )
    binary = shutil.which("haproxy") or "haproxy"
    proc = subprocess.Popen(
        [binary, "-f", str(config)], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_listening(Target(DIRECT_ADDRESS, port), proc)
        yield Target(DIRECT_ADDRESS, port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_listening(target: Target, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"direct haproxy exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection((target.address, target.port), timeout=1),
        ):
            return
        time.sleep(0.02)
    raise RuntimeError("direct haproxy did not listen")


# -- the measurement -------------------------------------------------------------------------------


def measure_conn_rates(
    edge: Target, direct: Target, hello: bytes, *, rounds: int, seconds: float
) -> dict[str, Any]:
    load(edge, hello, seconds=min(1.0, seconds))  # warm-up: page cache, first checks
    load(direct, hello, seconds=min(1.0, seconds))
    samples: dict[str, list[dict[str, float]]] = {"edge": [], "direct": []}
    for r in range(rounds):
        order = ("edge", "direct") if r % 2 == 0 else ("direct", "edge")
        for name in order:
            samples[name].append(load(edge if name == "edge" else direct, hello, seconds=seconds))

    def med(name: str, key: str) -> float:
        return median([x[key] for x in samples[name]])

    edge_rate, direct_rate = med("edge", "conn_per_s"), med("direct", "conn_per_s")
    edge_cpu, direct_cpu = med("edge", "cpu_us_per_conn"), med("direct", "cpu_us_per_conn")
    return {
        "edge_conn_per_s": round(edge_rate, 1),
        "direct_haproxy_conn_per_s": round(direct_rate, 1),
        "conn_ratio": round(edge_rate / direct_rate, 3) if direct_rate else 0.0,
        # HAProxy's own CPU per connection: less sensitive than the rates to what else
        # runs on the machine (the rates share 2 cores with the generator and backend).
        "edge_cpu_us_per_conn": round(edge_cpu, 1),
        "direct_haproxy_cpu_us_per_conn": round(direct_cpu, 1),
        "cpu_ratio": round(direct_cpu / edge_cpu, 3) if edge_cpu else 0.0,
        "conn_errors": int(sum(x["errors"] for v in samples.values() for x in v)),
        "samples": {
            k: {
                "conn_per_s": [round(x["conn_per_s"], 1) for x in v],
                "cpu_us_per_conn": [round(x["cpu_us_per_conn"], 1) for x in v],
            }
            for k, v in samples.items()
        },
        "ratios_per_round": [
            round(e["conn_per_s"] / d["conn_per_s"], 3) if d["conn_per_s"] else 0.0
            for e, d in zip(samples["edge"], samples["direct"], strict=True)
        ],
    }


# -- route propagation through the control plane -------------------------------------------


def serve_api(port: int) -> None:
    """The API process: one uvicorn worker, as `ember server api` runs it (routing settings
    from the EMBER_EDGE_* variables the benchmark sets)."""
    import uvicorn

    from ember.api.app import ApiSettings, create_app
    from ember.core.routes import load_routing_config

    settings = ApiSettings(
        os.environ["EMBER_DATABASE_URL"], routing=load_routing_config(os.environ)
    )
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        workers=1,
        access_log=False,
        log_level="warning",
    )


def free_port_range(address: str, size: int) -> tuple[int, int]:
    """``size`` consecutive ports free on ``address`` (the API's TCP port pool)."""
    for base in range(41000, 60000, size):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + size):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((address, port))
            return base, base + size - 1
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports on {address}")


@contextlib.contextmanager
def api_process(conninfo: str, tcp_ports: tuple[int, int]) -> Iterator[str]:
    import httpx

    port = free_port("127.0.0.1")
    env = {
        **os.environ,
        "EMBER_DATABASE_URL": conninfo,
        "EMBER_EDGE_SHARED_ADDRESS": PROPAGATION_ADDRESS,
        "EMBER_EDGE_TCP_PORTS": f"{tcp_ports[0]}-{tcp_ports[1]}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.bench.edge", "--serve-api", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the API server exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not become ready in 30 s")
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def operator_token(conninfo: str) -> str:
    """The first token comes from the service itself: a platform operator's (the edge's
    snapshot is an operator read), with every capability."""
    from ember.api.service import Tenancy
    from ember.core.catalog import REGISTRY
    from ember.core.tenancy import Capability, Scope
    from ember.store.db import Database
    from ember.store.eventlog import EventLog
    from ember.store.projections import ProjectionRunner
    from ember.store.views import all_projections

    with Database(conninfo, max_size=2) as db:
        svc = Tenancy(db, EventLog(db, REGISTRY), ProjectionRunner(db, REGISTRY, all_projections()))
        user = svc.ensure_user("edge-bench@example.com", "edge-bench")
        svc.set_operator("edge-bench@example.com", True)
        secret, _ = svc.issue_token(
            user["user_id"], "edge-bench", scope=Scope(), capabilities=frozenset(Capability)
        )
    return secret


def place_healthy_instance(
    conninfo: str, names: tuple[str, str, str], process: str, backend: Target
) -> None:
    """What the scheduler and an agent append for one instance of ``process`` that is
    healthy at the backend's address (no controller runs: nothing reconciles it away)."""
    from ember.core.catalog import REGISTRY
    from ember.core.events import ANY, Metadata, NewEvent
    from ember.core.hosts import InstanceAssigned, host_stream
    from ember.core.instances import (
        InstanceCreated,
        InstanceHealthy,
        InstanceSpec,
        InstanceStarting,
        instance_stream,
    )
    from ember.core.workloads import workload_stream
    from ember.store.db import Database
    from ember.store.eventlog import EventLog

    org, app, env = names
    with Database(conninfo, max_size=2) as db:
        with db.connection() as conn:
            row = conn.execute(
                "SELECT a.app_id FROM view_apps a JOIN view_orgs o USING (org_id) "
                "WHERE o.name = %s AND a.name = %s",
                (org, app),
            ).fetchone()
        assert row is not None, "the app is not in the views"
        app_id, host, iid = str(row[0]), "h-bench", f"i_bench_{process}"
        spec = InstanceSpec(
            release_version=1,
            repository=f"{org}/{app}",
            image_digest="sha256:" + "b" * 64,
            memory_mb=256,
            cpus=0.5,
        )
        log = EventLog(db, REGISTRY)
        meta = Metadata(actor="bench:edge")

        def append(stream: str, *events: Any) -> None:
            log.append(stream, ANY, [NewEvent.of(e, meta) for e in events])

        append(
            workload_stream(app_id, env),
            InstanceCreated(
                instance_id=iid,
                app_id=app_id,
                env=env,
                process=process,
                spec=spec,
                spec_hash=spec.spec_hash,
            ),
        )
        append(
            host_stream(host),
            InstanceAssigned(
                host_id=host,
                instance_id=iid,
                app_id=app_id,
                env=env,
                process=process,
                memory_mb=256,
                cpus=0.5,
            ),
        )
        append(
            instance_stream(iid),
            InstanceStarting(instance_id=iid, host_id=host, address=backend.address),
            InstanceHealthy(instance_id=iid, host_id=host, address=backend.address),
        )


def routed(address: str, port: int, hello: bytes, timeout: float = 1.0) -> bool:
    """One connection through the edge: does the backend answer this ClientHello?"""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(hello)
            return sock.recv(len(FIRST_BYTES)).startswith(FIRST_BYTES[:5])
    except OSError:
        return False


@dataclasses.dataclass
class EdgeTimeline:
    """When the edge controller received and applied snapshots (perf_counter seconds)."""

    received: list[tuple[float, frozenset[str]]] = dataclasses.field(default_factory=list)
    applied: list[tuple[float, frozenset[str], bool, float]] = dataclasses.field(
        default_factory=list
    )

    def first_received(self, route_id: str) -> float | None:
        return next((t for t, ids in list(self.received) if route_id in ids), None)

    def first_applied(self, route_id: str) -> tuple[float, bool, float] | None:
        return next(
            ((t, reloaded, s) for t, ids, reloaded, s in list(self.applied) if route_id in ids),
            None,
        )


@dataclasses.dataclass
class Probe:
    """One route's propagation as the benchmark saw it (perf_counter seconds)."""

    kind: str
    route_id: str
    sent: float
    answered: float
    routed: float | None
    """None: the edge did not route to it within the timeout."""
    probes: int

    def phases(self, timeline: EdgeTimeline) -> dict[str, Any]:
        """Milliseconds after the request was sent, per step of the path."""

        def ms(t: float | None) -> float | None:
            return round((t - self.sent) * 1000, 2) if t is not None else None

        applied = timeline.first_applied(self.route_id)
        return {
            "kind": self.kind,
            "total_ms": ms(self.routed),
            "api_answered_ms": ms(self.answered),
            "edge_received_ms": ms(timeline.first_received(self.route_id)),
            "haproxy_applied_ms": ms(applied[0]) if applied else None,
            "reloaded": applied[1] if applied else None,
            "haproxy_apply_ms": round(applied[2] * 1000, 2) if applied else None,
            "probes": self.probes,
        }


@dataclasses.dataclass
class PropagationRun:
    """Creates routes through the API and poll-connects until the edge routes them."""

    client: Any
    org: str
    app: str
    env: str
    backend: Target
    timeline: EdgeTimeline = dataclasses.field(default_factory=EdgeTimeline)
    timeout_s: float = 10.0

    def create(self, *, hostname: str | None, process: str = "web") -> Any:
        if hostname is not None:
            return self.client.create_route(
                self.org, self.app, self.env, hostname=hostname, port=443,
                process=process, backend_port=self.backend.port,
            ).item  # fmt: skip
        return self.client.create_route(
            self.org, self.app, self.env, kind="tcp", port="auto",
            process=process, backend_port=self.backend.port,
        ).item  # fmt: skip

    def one(self, *, hostname: str | None, process: str = "web") -> Probe:
        hello = client_hello(hostname or HOSTNAME)
        sent = time.perf_counter()
        route = self.create(hostname=hostname, process=process)
        answered = time.perf_counter()
        probes = 0
        while True:
            probes += 1
            if routed(route.address, route.port, hello):
                done: float | None = time.perf_counter()
                break
            if time.perf_counter() - sent > self.timeout_s:
                done = None
                break
            time.sleep(0.002)
        kind = "tls" if hostname else "tcp"
        return Probe(kind, route.id, sent, answered, done, probes)


def _phase_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float]:
        xs = [float(s[key]) for s in samples if s[key] is not None]
        return {"p50": round(median(xs), 1), "p99": round(percentile(xs, 99), 1)} if xs else {}

    return {
        "n": len(samples),
        **{
            key: stats(key)
            for key in (
                "api_answered_ms",
                "edge_received_ms",
                "haproxy_applied_ms",
                "haproxy_apply_ms",
                "total_ms",
            )
        },
        "reloads": sum(1 for s in samples if s["reloaded"]),
    }


@contextlib.contextmanager
def edge_controller(
    feed: Any, root: Path, timeline: EdgeTimeline, wake: Callable[[], object]
) -> Iterator[None]:
    """The real edge controller in a thread, long-polling ``feed`` (a Client); ``wake``
    makes a change so that a long-poll in flight returns when the run ends."""
    from ember.edge.controller import EdgeController

    def source(after: str | None, wait_s: float) -> EdgeSnapshot:
        snap: EdgeSnapshot = feed.edge_snapshot(after=after, wait=wait_s).to_core()
        timeline.received.append((time.perf_counter(), frozenset(r.route_id for r in snap.routes)))
        return snap

    def on_apply(snap: EdgeSnapshot, result: ApplyResult) -> None:
        ids = frozenset(r.route_id for r in snap.routes)
        timeline.applied.append((time.perf_counter(), ids, result.reloaded, result.seconds))

    haproxy = HAProxy(root / "prop", HAProxyOptions(nbthread=1))
    controller = EdgeController(source, haproxy, wait_s=25.0, on_apply=on_apply)
    stop = threading.Event()
    errors: list[Exception] = []

    def loop() -> None:
        try:
            controller.run(stop.is_set)
        except Exception as exc:  # noqa: BLE001 -- surfaced by the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=loop, name="bench-edge-controller", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            wake()
        thread.join(15)
        haproxy.stop()
    if errors:
        raise RuntimeError(f"the edge controller failed: {errors[0]!r}")


def measure_propagation(
    backend: Target, root: Path, *, tls_routes: int, tcp_routes: int
) -> dict[str, Any]:
    """Route created through the API -> the managed edge routes a connection to it."""
    from ember.client import Client

    org, app, env = "bench-org", "bench-app", "production"
    # One process per TCP route: an identical `--tcp --port auto` request is the same
    # route (create-or-get), so each TCP route routes to its own process.
    tcp_processes = [f"tcp{n}" for n in range(tcp_routes)]
    with (
        bench_cluster() as cluster,
        api_process(cluster.conninfo(), free_port_range(PROPAGATION_ADDRESS, 16)) as base,
    ):
        token = operator_token(cluster.conninfo())
        with Client(base, token, timeout=10) as client, Client(base, token, timeout=35) as feed:
            client.create_org(org)
            client.create_app(org, app)
            client.create_env(org, app, env)
            for process in ("web", *tcp_processes):
                place_healthy_instance(cluster.conninfo(), (org, app, env), process, backend)
            prop = PropagationRun(client, org, app, env, backend)
            probes: list[Probe] = []
            with edge_controller(
                feed, root, prop.timeline, lambda: prop.create(hostname="bye.bench.test")
            ):
                # Warm-up: the first TLS route makes the shared :443 listener (a reload).
                if prop.one(hostname="warm.bench.test").routed is None:
                    raise RuntimeError("the edge never routed the warm-up route")
                for n in range(tls_routes):
                    time.sleep(0.05)  # the controller is back in its long-poll
                    probes.append(prop.one(hostname=f"p{n:03d}.bench.test"))
                for process in tcp_processes:
                    time.sleep(0.05)
                    probes.append(prop.one(hostname=None, process=process))

    samples = [p.phases(prop.timeline) for p in probes]
    ok = {
        k: [s for s in samples if s["kind"] == k and s["total_ms"] is not None]
        for k in ("tls", "tcp")
    }

    def pct(kind: str, p: float) -> float:
        values = [float(s["total_ms"]) for s in ok[kind]]
        return round(median(values) if p == 50 else percentile(values, p), 1)

    return {
        "route_propagation_p50_ms": pct("tls", 50),
        "route_propagation_p99_ms": pct("tls", 99),
        "route_propagation_max_ms": pct("tls", 100),
        "tcp_route_propagation_p50_ms": pct("tcp", 50),
        "tcp_route_propagation_p99_ms": pct("tcp", 99),
        "route_propagation_failures": sum(1 for s in samples if s["total_ms"] is None),
        "propagation_phases": {k: _phase_stats(v) for k, v in ok.items()},
        "propagation_samples": samples,
    }


def run(quick: bool) -> dict[str, Any]:
    # Many short alternating rounds: the machine is shared, and a median over many
    # pairs resists a neighbour's burst better than a few long rounds.
    rounds, seconds = (7, 1.5) if quick else (21, 3.0)
    tls_routes, tcp_routes = (15, 4) if quick else (60, 10)
    hello = client_hello(HOSTNAME)
    root = Path(tempfile.mkdtemp(prefix="ember-bench-edge-"))
    try:
        with backend_process(BACKEND_ADDRESS) as backend:
            with managed_edge(backend, root) as edge, direct_haproxy(backend, root) as direct:
                rates = measure_conn_rates(edge, direct, hello, rounds=rounds, seconds=seconds)
            propagation = measure_propagation(
                backend, root, tls_routes=tls_routes, tcp_routes=tcp_routes
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result: dict[str, Any] = {
        **{k: v for k, v in rates.items() if k not in ("samples", "ratios_per_round")},
        **{k: v for k, v in propagation.items() if k != "propagation_samples"},
        "goal_met": rates["conn_ratio"] >= GOAL_RATIO,
        "config": {
            "rounds": rounds,
            "seconds_per_round": seconds,
            "concurrency": CONCURRENCY,
            "client_hello_bytes": len(hello),
            "connection": "TCP connect + real ClientHello (SNI) + first bytes of the"
            " backend's answer + close; no TLS crypto on either end",
            "haproxy_threads": 1,
            "note": "absolute rates are bounded by the Python load generator and backend"
            " sharing 2 cores with both HAProxies (HAProxy's own figure is ~83k TCP conn/s"
            " per core); the ratios compare the two configurations on equal terms",
            "cpus": os.cpu_count(),
            "samples": rates["samples"],
            "ratios_per_round": rates["ratios_per_round"],
            "propagation": {
                "tls_routes": tls_routes,
                "tcp_routes": tcp_routes,
                "path": "POST /routes (uvicorn API process, durable Postgres) -> edge"
                " controller long-poll (GET /v1/edge/snapshot?after&wait=25) -> HAProxy"
                " apply -> poll-connect every 2 ms until the backend answers",
                "spare_backends": HAProxyOptions().spare_backends,
                "samples": propagation["propagation_samples"],
            },
        },
    }
    result["goals"] = {
        "conn_ratio>=0.9": result["goal_met"],
        "no_connection_errors": rates["conn_errors"] == 0,
        "route_propagation_p99<=200ms": propagation["route_propagation_p99_ms"]
        <= GOAL_PROPAGATION_P99_MS,
        "every_route_propagated": propagation["route_propagation_failures"] == 0,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced run, under 60 s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/edge.json"))
    parser.add_argument("--serve-api", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_api:
        serve_api(args.serve_api)
        return
    result = run_and_report(
        "edge",
        run,
        quick=args.quick,
        out=args.out,
        summary=(
            "edge_conn_per_s",
            "direct_haproxy_conn_per_s",
            "conn_ratio",
            "edge_cpu_us_per_conn",
            "direct_haproxy_cpu_us_per_conn",
            "cpu_ratio",
            "conn_errors",
            "route_propagation_p50_ms",
            "route_propagation_p99_ms",
            "tcp_route_propagation_p50_ms",
            "tcp_route_propagation_p99_ms",
            "route_propagation_failures",
            "goals",
            "wall_seconds",
        ),
    )
    print(f"{'ratios_per_round':30} {result['config']['ratios_per_round']}")
    for kind, phases in result["propagation_phases"].items():
        print(f"{'phases ' + kind:30} {phases}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
