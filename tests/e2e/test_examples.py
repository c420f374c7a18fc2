"""The sample apps built from real Debian packages (apt-get download + dpkg -x), and — as
root — run from their unpacked images in a chroot to show the images actually work:
hello-tls also behind PROXY v2 headers built here by hand, and behind the real edge
(HAProxy, an SNI route with ``proxy_protocol="v2"``). All traffic stays on loopback."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from ember.client.oci import OciLayout
from ember.client.oci.media import Descriptor
from ember.core import proxyv2
from ember.core.edge import Backend, EdgeSettings
from ember.core.errors import ValidationFailed
from ember.dev import examples
from ember.dev.examples import ExampleFailed
from ember.edge.haproxy import HAProxy, HAProxyOptions
from tests.support.edge import connect, route, snapshot
from tests.support.net import free_port

pytestmark = pytest.mark.slow
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


@pytest.fixture(scope="session")
def cache() -> Iterator[Path]:
    """A .deb cache that outlives the session (each .deb is checked against apt's SHA256
    on use), so repeated runs on one machine download the packages once."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ember-test-debs"
    path.mkdir(parents=True, exist_ok=True)
    yield path


def build(name: str, out: Path, cache: Path) -> examples.Built:
    try:
        return examples.build(name, out, cache=cache)
    except ExampleFailed:
        # The mirror may have moved on since apt's lists were fetched (a package version
        # gone): refresh them once, as root, and retry.
        if os.getuid() != 0:
            raise
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        return examples.build(name, out, cache=cache)


@pytest.fixture(scope="session")
def hello_http(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> examples.Built:
    return build("hello-http", tmp_path_factory.mktemp("hello-http"), cache)


@pytest.fixture(scope="session")
def hello_tls(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> examples.Built:
    return build("hello-tls", tmp_path_factory.mktemp("hello-tls"), cache)


def layer_names(layout: OciLayout, digest: str) -> list[set[str]]:
    manifest = layout.manifest(layout.resolve(digest))
    names = []
    for entry in manifest["layers"]:
        with (
            layout.open_blob(Descriptor.from_json(entry)) as f,
            tarfile.open(fileobj=f, mode="r:gz") as tar,
        ):
            names.append({m.name for m in tar.getmembers()})
    return names


def test_hello_http_image(hello_http: examples.Built, cache: Path, tmp_path: Path) -> None:
    layout = OciLayout.open(hello_http.layout)
    desc = layout.resolve("latest")
    assert desc.digest == hello_http.digest
    config = layout.image_config(desc)["config"]
    assert config["Cmd"] == ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
    assert "Entrypoint" not in config
    assert config["ExposedPorts"] == {"8080/tcp": {}}
    assert config["User"] == "65534:65534"
    assert [p.split("=")[0] for p in hello_http.packages] == ["busybox-static"]

    packages, app = layer_names(layout, desc.digest)
    assert {"bin/busybox", "bin/sh", "usr/sbin/httpd"} <= packages
    assert not any(n.startswith("usr/share/man") for n in packages), "docs are pruned"
    assert {"www/index.html", "etc/passwd", "tmp"} <= app
    assert len(layout.verify()) == 4

    # Same packages (from the cache) and sources: the same digest, byte for byte.
    again = build("hello-http", tmp_path / "again", cache)
    assert again.digest == hello_http.digest
    assert sorted(p.name for p in (tmp_path / "again/blobs/sha256").iterdir()) == sorted(
        p.name for p in layout.blobs_dir.iterdir()
    )


def test_hello_tls_image(hello_tls: examples.Built, cache: Path, tmp_path: Path) -> None:
    layout = OciLayout.open(hello_tls.layout)
    config = layout.image_config(layout.resolve())["config"]
    assert config["Cmd"] == ["/usr/local/bin/hello-tls"]
    assert config["ExposedPorts"] == {"8443/tcp": {}}
    assert config["User"] == "65534:65534"
    # The server is compiled in, static: no shared libraries, no dynamic loader.
    assert [p.split("=")[0] for p in hello_tls.packages] == ["busybox-static"]
    packages, app = layer_names(layout, hello_tls.digest)
    assert {"bin/busybox", "bin/sh"} <= packages
    assert not any(n.startswith(("lib64/", "usr/lib/x86_64-linux-gnu/")) for n in packages)
    assert {"usr/local/bin/hello-tls", "etc/hello-tls/cert.pem", "etc/hello-tls/key.pem"} <= app

    # The compiled binary too: the same source, toolchain and cache give the same digest.
    again = build("hello-tls", tmp_path / "again", cache)
    assert again.digest == hello_tls.digest
    assert sorted(p.name for p in (tmp_path / "again/blobs/sha256").iterdir()) == sorted(
        p.name for p in layout.blobs_dir.iterdir()
    )


def test_unknown_example_is_a_validation_error(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ValidationFailed) as err:
        examples.build("nope", tmp_path, cache=cache)
    assert err.value.detail == {"field": "name"}


# -- running them (root only: chroot) --------------------------------------------------------

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="chroot needs root")


def _serve(
    root: Path, argv: list[str], port: int, log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "PORT": str(port)}
    return subprocess.Popen(
        [CHROOT, "--userspec=65534:65534", str(root), *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log or subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"the server exited {proc.returncode}: {out}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on {port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@needs_root
def test_hello_http_serves_its_page_from_the_image(
    hello_http: examples.Built, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    config = examples.unpack_image(hello_http.layout, root)["config"]
    port = free_port()
    argv = [a if a != "8080" else str(port) for a in config["Cmd"]]  # type: ignore[index]
    server = _serve(root, argv, port)
    try:
        _wait_port(port, server)
        response = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        _stop(server)
    assert response.status_code == 200
    assert "Hello from hello-http" in response.text


@needs_root
def test_hello_tls_answers_with_the_client_address(
    hello_tls: examples.Built, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    examples.unpack_image(hello_tls.layout, root)
    port = free_port()
    server = _serve(root, ["/usr/local/bin/hello-tls"], port)
    context = ssl.create_default_context(cafile=str(root / "etc/hello-tls/cert.pem"))
    answers = []
    try:
        _wait_port(port, server)
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as raw:
                raw.settimeout(5)
                raw.connect((host, port))
                local_port = raw.getsockname()[1]
                with context.wrap_socket(raw, server_hostname="hello-tls") as tls:
                    data = b""
                    while chunk := tls.recv(4096):
                        data += chunk
            answers.append((data.decode(), host, local_port))
    finally:
        _stop(server)
    for text, host, local_port in answers:
        assert text == f"hello from hello-tls; you are {host} port {local_port}\n"


# -- hello-tls behind PROXY protocol v2 -------------------------------------------------------

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(
    source: str, source_port: int, dest: str, dest_port: int, *, command: int = 1
) -> bytes:
    """A PROXY v2 header for TCP (haproxy.org/download/2.9/doc/proxy-protocol.txt, 2.2),
    built here by hand so that the server is not checked against the project's own
    parser's idea of the format."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source_port, dest_port)
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


@dataclasses.dataclass(frozen=True)
class TLSServer:
    root: Path
    port: int
    log: Path

    @property
    def cafile(self) -> str:
        return str(self.root / "etc/hello-tls/cert.pem")

    def ask(
        self, prefix: bytes = b"", host: str = "127.0.0.1", *, split: bool = False
    ) -> tuple[str, int]:
        """Send ``prefix``, then talk TLS: (the answer, the client's own port)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        context = ssl.create_default_context(cafile=self.cafile)
        with socket.socket(family) as raw:
            raw.settimeout(5)
            raw.connect((host, self.port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if split:  # the header in two segments: the server must wait for the rest
                raw.sendall(prefix[:7])
                time.sleep(0.2)
                raw.sendall(prefix[7:])
            elif prefix:
                raw.sendall(prefix)
            with context.wrap_socket(raw, server_hostname="hello-tls") as tls:
                return read_all(tls).decode(), tls.getsockname()[1]

    def refuses(self, data: bytes, *, half_close: bool = False) -> bytes:
        """Send ``data`` (then EOF with ``half_close``): what comes back until the server
        closes (a reset counts as closed)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            try:
                return read_all(sock)
            except ConnectionResetError:
                return b""


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@pytest.fixture(scope="module")
def tls_server(
    hello_tls: examples.Built, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TLSServer]:
    if os.getuid() != 0:
        pytest.skip("chroot needs root")
    # A directory of its own: mktemp's are 0700, and "/" must be searchable by nobody.
    root = tmp_path_factory.mktemp("hello-tls-run") / "root"
    examples.unpack_image(hello_tls.layout, root)
    port = free_port()
    log = root.parent / "hello-tls.log"
    with log.open("wb") as out:
        server = _serve(root, ["/usr/local/bin/hello-tls"], port, out)
        try:
            _wait_port(port, server)
            yield TLSServer(root, port, log)
        finally:
            _stop(server)


ANSWER = "hello from hello-tls; you are {} port {}\n"


@needs_root
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (proxy_v2("203.0.113.7", 51234, "10.0.0.1", 8443), ("203.0.113.7", 51234)),
        (proxy_v2("2001:db8::7", 4433, "2001:db8::1", 8443), ("2001:db8::7", 4433)),
        # An IPv4 client of a dual-stack edge, as the edge may forward it.
        (proxy_v2("::ffff:198.51.100.9", 1, "2001:db8::1", 8443), ("198.51.100.9", 1)),
        # TLVs after the addresses, with a CRC32C over the whole header (the project's
        # builder: an independent implementation of the checksum).
        (
            proxyv2.build(
                proxyv2.Header(
                    proxyv2.Command.PROXY,
                    proxyv2.Family.INET,
                    proxyv2.Transport.STREAM,
                    ipaddress.IPv4Address("192.0.2.44"),
                    ipaddress.IPv4Address("10.0.0.1"),
                    65535,
                    8443,
                    (proxyv2.TLV(proxyv2.TLVType.AUTHORITY, b"hello-tls"),),
                ),
                checksum=True,
            ),
            ("192.0.2.44", 65535),
        ),
    ],
    ids=["ipv4", "ipv6", "ipv4-mapped", "tlvs-crc32c"],
)
def test_hello_tls_answers_with_the_address_of_a_proxy_v2_header(
    tls_server: TLSServer, header: bytes, expected: tuple[str, int]
) -> None:
    text, _ = tls_server.ask(header)
    assert text == ANSWER.format(*expected)


@needs_root
def test_hello_tls_waits_for_a_proxy_v2_header_sent_in_pieces(tls_server: TLSServer) -> None:
    text, _ = tls_server.ask(proxy_v2("203.0.113.7", 51234, "10.0.0.1", 8443), split=True)
    assert text == ANSWER.format("203.0.113.7", 51234)


@needs_root
@pytest.mark.parametrize(
    "header",
    [
        # LOCAL (the edge's health checks): the addresses it carries are ignored.
        proxy_v2("203.0.113.7", 51234, "10.0.0.1", 8443, command=0),
        SIGNATURE + b"\x20\x00\x00\x00",  # LOCAL, UNSPEC: what HAProxy sends
        SIGNATURE + b"\x21\x00\x00\x00",  # PROXY for an unknown protocol
        # PROXY for UDP: a valid header this TCP server has no use for.
        SIGNATURE + b"\x21\x12" + proxy_v2("203.0.113.7", 1, "10.0.0.1", 2)[14:],
    ],
    ids=["local", "local-unspec", "proxy-unspec", "proxy-udp"],
)
def test_hello_tls_answers_with_the_socket_peer_for_local_and_other_families(
    tls_server: TLSServer, header: bytes
) -> None:
    text, local_port = tls_server.ask(header)
    assert text == ANSWER.format("127.0.0.1", local_port)


@needs_root
@pytest.mark.parametrize(
    ("data", "half_close"),
    [
        (SIGNATURE + b"\x11" + proxy_v2("203.0.113.7", 1, "10.0.0.1", 2)[13:], False),  # v1
        (SIGNATURE + b"\x22" + proxy_v2("203.0.113.7", 1, "10.0.0.1", 2)[13:], False),
        (SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), False),  # no such transport
        (SIGNATURE + b"\x21\x01\x00\x0c" + bytes(12), False),  # UNSPEC family, STREAM
        (SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), False),  # IPv6 needs 36 bytes
        (SIGNATURE + b"\x21\x00\x00\x04\x01\x00\x05\x00", False),  # TLV past the end
        (SIGNATURE + b"\x21\x00\x00\x02\x01\x00", False),  # stray bytes, no TLV
        (proxy_v2("203.0.113.7", 1, "10.0.0.1", 2)[:20], True),  # truncated, then EOF
        (SIGNATURE[:6], True),  # half a signature, then EOF
        (b"\r\n\r\n\x00\r\nQUIX" + bytes(4), False),  # almost the signature
        (b"GET / HTTP/1.0\r\n\r\n", False),  # neither TLS nor PROXY v2
        (b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n", False),  # v1 is not offered
    ],
    ids=[
        "version-1",
        "command-2",
        "bad-transport",
        "unspec-stream",
        "short-block",
        "tlv-past-end",
        "stray-bytes",
        "truncated",
        "half-signature",
        "bad-signature",
        "http",
        "proxy-v1",
    ],
)
def test_hello_tls_closes_a_malformed_start_without_a_word(
    tls_server: TLSServer, data: bytes, half_close: bool
) -> None:
    assert tls_server.refuses(data, half_close=half_close) == b""


@needs_root
def test_hello_tls_rejects_a_header_whose_crc32c_does_not_match(tls_server: TLSServer) -> None:
    header = bytearray(
        proxyv2.build(
            proxyv2.Header(
                proxyv2.Command.PROXY,
                proxyv2.Family.INET,
                proxyv2.Transport.STREAM,
                ipaddress.IPv4Address("203.0.113.7"),
                ipaddress.IPv4Address("10.0.0.1"),
                51234,
                8443,
            ),
            checksum=True,
        )
    )
    header[-1] ^= 0x01  # the checksum's last byte
    assert tls_server.refuses(bytes(header)) == b""
    # The server logs why, and it still serves the next client.
    text, local_port = tls_server.ask()
    assert text == ANSWER.format("127.0.0.1", local_port)
    assert "bad PROXY v2 header: its CRC32C does not match" in tls_server.log.read_text()


@needs_root
def test_hello_tls_health_checks_are_answered_quietly(tls_server: TLSServer) -> None:
    """The edge checks every 2 s (connect and close; with a LOCAL header on PROXY v2
    routes): no log line each time, or they would drown the console log."""
    before = tls_server.log.read_text()
    for check in (b"", SIGNATURE + b"\x20\x00\x00\x00"):
        assert tls_server.refuses(check, half_close=True) == b""
    text, local_port = tls_server.ask()
    assert text == ANSWER.format("127.0.0.1", local_port)
    new = tls_server.log.read_text()[len(before) :]
    assert new.splitlines() == [f"hello-tls: answered 127.0.0.1 port {local_port}"]


EDGE = "127.0.0.10"
CLIENT = "127.0.0.2"  # not the edge's own source address (127.0.0.1) towards the backend


@needs_root
def test_hello_tls_behind_an_sni_route_with_proxy_v2_reports_the_real_client(
    tls_server: TLSServer,
) -> None:
    port = free_port(EDGE)
    edge = HAProxy(Path(tempfile.mkdtemp(prefix="ember-edge-")), HAProxyOptions(nbthread=1))
    try:
        edge.start(
            snapshot(
                route(
                    "r_hello",
                    port=port,
                    hostname="hello-tls",
                    address=EDGE,
                    backends=(Backend("i_hello", "127.0.0.1", tls_server.port),),
                    proxy_protocol="v2",
                ),
                settings=EdgeSettings(check_interval_ms=200),
            )
        )
        context = ssl.create_default_context(cafile=tls_server.cafile)
        with (
            connect(EDGE, port, source=CLIENT) as raw,
            context.wrap_socket(raw, server_hostname="hello-tls") as tls,
        ):
            client_port = tls.getsockname()[1]
            text = read_all(tls).decode()
        assert text == ANSWER.format(CLIENT, client_port)
        # The edge's checks carry a LOCAL header, which hello-tls accepts: the server is up.
        deadline = time.monotonic() + 10
        while not _server_up(edge, "be_r_hello", "i_hello"):
            assert time.monotonic() < deadline, edge.runtime.execute("show servers state")
            time.sleep(0.1)
    finally:
        edge.stop()
        shutil.rmtree(edge.root, ignore_errors=True)
    log = tls_server.log.read_text()
    assert f"answered {CLIENT} port {client_port} (PROXY v2 from 127.0.0.1 port" in log


def _server_up(edge: HAProxy, backend: str, server: str) -> bool:
    """Whether HAProxy reports ``server`` of ``backend`` up (op state 2, not in maint)."""
    for line in edge.runtime.execute(f"show servers state {backend}").splitlines():
        f = line.split()
        if len(f) > 6 and (f[1], f[3]) == (backend, server):
            return (f[5], f[6]) == ("2", "0")
    return False
