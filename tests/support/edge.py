"""Real endpoints for the edge tests: TLS and TCP backends on loopback, certificates,
snapshot builders and hand-made ClientHellos.

Backends run in threads; every accepted connection gets its own thread, so a health check
(HAProxy connects and closes, or sends a PROXY v2 LOCAL header and closes) never blocks
the traffic the test is looking at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ember.core import proxyv2
from ember.core.edge import Backend, EdgeSettings, EdgeSnapshot, Route, RouteKind


def make_cert(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for ``hostname`` (its own CA in the tests)."""
    cert, key = directory / f"{hostname}.crt", directory / f"{hostname}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


# -- backends -------------------------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    """What a backend saw on one proxied connection."""

    header: proxyv2.Header | None
    peer: tuple[str, int]


class Server:
    """A threaded loopback server; subclasses implement :meth:`handle`."""

    def __init__(self, name: str, host: str = "127.0.0.1", *, proxy_v2: bool = False) -> None:
        self.name = name
        self.host = host
        self.proxy_v2 = proxy_v2
        self.listener = socket.create_server((host, 0), backlog=512)
        self.port = int(self.listener.getsockname()[1])
        self.seen: list[Seen] = []
        """Every connection that got past the PROXY header (if any)."""
        self.served = 0
        """Connections that completed the protocol (TLS handshake, greeting sent): never a
        health check (HAProxy's TCP checks do not even complete the TCP handshake)."""
        self.local_headers = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def backend(self, instance_id: str | None = None, *, healthy: bool = True) -> Backend:
        return Backend(instance_id or f"i_{self.name}", self.host, self.port, healthy)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(30)
            try:
                header, rest = self._read_proxy_header(conn) if self.proxy_v2 else (None, b"")
                if self.proxy_v2 and header is None:
                    return  # a health check (LOCAL) or a connection without a header
                self.seen.append(Seen(header, peer))
                self.handle(conn, rest)
            except (OSError, ssl.SSLError, proxyv2.ProxyV2Error) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _read_proxy_header(self, conn: socket.socket) -> tuple[proxyv2.Header | None, bytes]:
        buf = b""
        while isinstance(result := proxyv2.parse(buf), proxyv2.NeedMore):
            chunk = conn.recv(result.at_least)
            if not chunk:
                return None, b""
            buf += chunk
        if result.header.command is proxyv2.Command.LOCAL:
            self.local_headers += 1
            return None, b""
        return result.header, buf[result.consumed :]

    def handle(self, conn: socket.socket, early: bytes) -> None:
        raise NotImplementedError


class TCPEcho(Server):
    """Greets with ``<name>\\n`` then echoes every line until the client closes."""

    def handle(self, conn: socket.socket, early: bytes) -> None:
        self.served += 1  # before the greeting: the client may check right after it
        conn.sendall(f"{self.name}\n".encode())
        if early:
            conn.sendall(early)
        while data := conn.recv(65536):
            conn.sendall(data)


class TLSEcho(Server):
    """A TLS server with its own certificate: answers ``<name>\\n`` after the handshake,
    then echoes. The PROXY header is read with ``recv(NeedMore.at_least)``, which never
    reads past the header, so no TLS byte is consumed before the handshake."""

    def __init__(
        self, name: str, cert: tuple[Path, Path], host: str = "127.0.0.1", *, proxy_v2: bool = False
    ) -> None:
        super().__init__(name, host, proxy_v2=proxy_v2)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*cert)

    def handle(self, conn: socket.socket, early: bytes) -> None:
        assert not early
        with self.context.wrap_socket(conn, server_side=True) as tls:
            self.served += 1  # before the greeting: the client may check right after it
            tls.sendall(f"{self.name}\n".encode())
            while data := tls.recv(65536):
                tls.sendall(data)


@contextlib.contextmanager
def servers(*items: Server) -> Iterator[tuple[Server, ...]]:
    for s in items:
        s.start()
    try:
        yield items
    finally:
        for s in items:
            s.stop()


# -- clients --------------------------------------------------------------------------------


def client_context(cafile: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(
    address: str, port: int, *, source: str | None = None, timeout: float = 5.0
) -> socket.socket:
    sock = socket.create_connection(
        (address, port), timeout=timeout, source_address=(source, 0) if source else None
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def tls_connect(
    address: str,
    port: int,
    hostname: str | None,
    cafile: Path | None,
    *,
    source: str | None = None,
    timeout: float = 5.0,
) -> tuple[ssl.SSLSocket, str]:
    """A TLS connection through the edge: (socket, the backend's greeting)."""
    raw = connect(address, port, source=source, timeout=timeout)
    tls = client_context(cafile).wrap_socket(raw, server_hostname=hostname)
    return tls, read_line(tls)


def read_line(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return buf.decode().strip()


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closes or resets ``sock`` (reading and discarding), or None
    if it is still open after ``timeout``."""
    t0 = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - t0 < timeout:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


# -- snapshots ------------------------------------------------------------------------------


def route(
    route_id: str,
    *,
    port: int,
    hostname: str | None = None,
    address: str = "127.0.0.1",
    backends: tuple[Backend, ...] = (),
    proxy_protocol: str | None = None,
) -> Route:
    return Route(
        route_id=route_id,
        org_id="o_test",
        app_id="a_test",
        env="production",
        process="web",
        kind=RouteKind.TLS if hostname else RouteKind.TCP,
        address=address,
        port=port,
        hostname=hostname,
        backend_port=backends[0].port if backends else 8443,
        proxy_protocol=proxy_protocol,
        backends=backends,
    )


_cursor = iter(range(1, 1 << 30))


def snapshot(*routes: Route, settings: EdgeSettings | None = None) -> EdgeSnapshot:
    return EdgeSnapshot(f"c{next(_cursor)}", routes, settings or EdgeSettings())


# -- ClientHellos ---------------------------------------------------------------------------


def client_hello_bytes(hostname: str | None, *, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real client (Python's ssl) for ``hostname``."""
    ctx = client_context(None)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def handmade_client_hello(
    sni: bytes | None,
    *,
    record_len: int | None = None,
    handshake_len: int | None = None,
    sni_list_len: int | None = None,
    sni_name_len: int | None = None,
) -> bytes:
    """A TLS 1.2 ClientHello built by hand, with any length field overridable (fuzzing)."""
    body = b"\x03\x03" + os.urandom(32) + b"\x00"  # version, random, empty session id
    body += b"\x00\x04\x13\x01\xc0\x2f" + b"\x01\x00"  # two cipher suites, null compression
    exts = b""
    if sni is not None:
        name = b"\x00" + (len(sni) if sni_name_len is None else sni_name_len).to_bytes(2, "big")
        name += sni
        lst = (len(name) if sni_list_len is None else sni_list_len).to_bytes(2, "big") + name
        exts += b"\x00\x00" + (len(lst) & 0xFFFF).to_bytes(2, "big") + lst
    body += (len(exts) & 0xFFFF).to_bytes(2, "big") + exts
    hs_len = len(body) if handshake_len is None else handshake_len
    handshake = b"\x01" + (hs_len & 0xFFFFFF).to_bytes(3, "big") + body
    rec_len = len(handshake) if record_len is None else record_len
    return b"\x16\x03\x01" + (rec_len & 0xFFFF).to_bytes(2, "big") + handshake
