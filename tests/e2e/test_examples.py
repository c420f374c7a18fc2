"""The sample apps built from real Debian packages (apt-get download + dpkg -x), and — as
root — run from their unpacked images in a chroot to show the images actually work."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.client.oci import OciLayout
from ember.client.oci.media import Descriptor
from ember.dev import examples
from ember.dev.examples import ExampleFailed
from tests.support.registry import free_port

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


def test_hello_tls_image(hello_tls: examples.Built) -> None:
    layout = OciLayout.open(hello_tls.layout)
    config = layout.image_config(layout.resolve())["config"]
    assert config["Cmd"] == ["/usr/local/bin/hello-tls"]
    assert config["ExposedPorts"] == {"8443/tcp": {}}
    names = {p.split("=")[0] for p in hello_tls.packages}
    assert {"socat", "libssl3", "libc6", "busybox-static"} <= names
    packages, app = layer_names(layout, hello_tls.digest)
    assert {"usr/bin/socat", "bin/busybox", "lib64/ld-linux-x86-64.so.2"} <= packages
    assert {
        "usr/local/bin/hello-tls",
        "usr/local/bin/hello-tls-reply",
        "etc/hello-tls/cert.pem",
        "etc/hello-tls/key.pem",
    } <= app


def test_unknown_example_is_a_validation_error(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(examples.ValidationFailed) as err:
        examples.build("nope", tmp_path, cache=cache)
    assert err.value.detail == {"field": "name"}


# -- running them (root only: chroot) --------------------------------------------------------

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="chroot needs root")


def _serve(root: Path, argv: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "PORT": str(port)}
    return subprocess.Popen(
        [CHROOT, "--userspec=65534:65534", str(root), *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
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
