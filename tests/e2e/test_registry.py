"""The registry client against real docker-registry processes: push and pull by digest, every
byte verified, tampering on the registry's disk detected, copies between registries."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.client.oci import (
    BlobUnknown,
    DigestMismatch,
    ImageConfig,
    InvalidReference,
    ManifestUnknown,
    OciLayout,
    RegistryClient,
    RegistryUnauthorized,
    RegistryUnreachable,
    build_image,
    copy_image,
)
from ember.client.oci.media import OCI_INDEX, Descriptor, canonical_json
from ember.core.errors import Kind
from tests.support.registry import RunningRegistry, free_port, running_registry

_unique = itertools.count()


@pytest.fixture(scope="module")
def registry_a() -> Iterator[RunningRegistry]:
    with running_registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def registry_b() -> Iterator[RunningRegistry]:
    with running_registry() as reg:
        yield reg


class Counting(httpx.HTTPTransport):
    """A real transport that records (method, path) of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        return super().handle_request(request)


def image(tmp_path: Path, label: str) -> tuple[OciLayout, Descriptor]:
    """A two-layer image whose content is unique to ``label`` (tests tamper with blobs, and
    blobs are shared by every repository of a registry)."""
    base, app = tmp_path / f"{label}-base", tmp_path / f"{label}-app"
    (base / "bin").mkdir(parents=True)
    (base / "bin" / "tool").write_bytes(label.encode() * 50_000)  # > one 1 MiB chunk
    (app / "www").mkdir(parents=True)
    (app / "www" / "index.html").write_text(f"<h1>{label}</h1>\n")
    layout = OciLayout.create(tmp_path / f"{label}-layout")
    desc = build_image(
        layout,
        [base, app],
        ImageConfig(cmd=["httpd", "-f"], exposed_ports=["8080"]),
        annotations={"test": "a"},
    )
    return layout, desc


def unique(name: str) -> str:
    return f"{name}-{next(_unique)}"


def test_push_then_pull_by_digest_round_trips_every_blob(
    registry_a: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = image(tmp_path, unique("round-trip"))
    with RegistryClient(registry_a.host) as client:
        assert client.base_url == registry_a.url, "loopback registries use plain http"
        pushed = client.push(layout, "tests/round-trip", tag="v1")
        assert pushed.digest == desc.digest
        assert len(pushed.uploaded) == 4 and pushed.existing == ()
        assert client.resolve(f"{registry_a.host}/tests/round-trip:v1") == desc.digest
        assert client.resolve(f"tests/round-trip@{desc.digest}") == desc.digest
        assert client.list_tags("tests/round-trip") == ["v1"]

        out = OciLayout.create(tmp_path / "pulled")
        pulled = client.pull("tests/round-trip", desc.digest, out, ref_name="v1")
    assert pulled.digest == desc.digest
    assert sorted(pulled.fetched) == sorted(pushed.uploaded)
    originals = layout.verify(desc)
    assert sorted(b.digest for b in out.verify()) == sorted(b.digest for b in originals)
    for blob in originals:
        assert out.read_blob(blob) == layout.read_blob(blob)
    assert out.resolve("v1").digest == desc.digest

    # Pulling into a layout that has everything fetches nothing but the manifest check.
    with RegistryClient(registry_a.host) as client:
        again = client.pull("tests/round-trip", desc.digest, out)
    assert again.fetched == (desc.digest,) and len(again.cached) == 3


def test_pushing_twice_uploads_nothing_the_second_time(
    registry_a: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = image(tmp_path, unique("twice"))
    with RegistryClient(registry_a.host) as client:
        client.push(layout, "tests/twice", tag="latest")
    transport = Counting()
    with RegistryClient(registry_a.host, transport=transport) as client:
        second = client.push(layout, "tests/twice", tag="latest")
    assert second.digest == desc.digest
    assert second.uploaded == () and len(second.existing) == 4
    assert {method for method, _ in transport.calls} == {"HEAD"}, transport.calls
    assert len(transport.calls) == 5  # 3 blobs, the manifest, the tag


def test_a_tampered_blob_is_rejected_on_pull(
    registry_a: RunningRegistry, registry_b: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = image(tmp_path, unique("tampered-blob"))
    with RegistryClient(registry_a.host) as client:
        client.push(layout, "tests/tampered-blob")
    layer = Descriptor.from_json(layout.manifest(desc)["layers"][0])
    stored = registry_a.blob_file(layer.digest)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    stored.write_bytes(bytes(data))

    out = OciLayout.create(tmp_path / "pulled")
    with RegistryClient(registry_a.host) as client, pytest.raises(DigestMismatch) as err:
        client.pull("tests/tampered-blob", desc.digest, out)
    assert err.value.code == "oci.digest_mismatch"
    assert err.value.kind is Kind.INTERNAL
    assert err.value.detail["digest"] == layer.digest
    assert err.value.detail["actual"] not in (None, layer.digest)
    assert not out.has_blob(layer), "nothing unverified is kept"
    assert not any(p.name.startswith(".ingest-") for p in out.blobs_dir.iterdir())
    assert out.index() == []

    # Nor is it copied to another registry: the copy streams through the same checks.
    with RegistryClient(registry_a.host) as src, RegistryClient(registry_b.host) as dst:
        with pytest.raises(DigestMismatch):
            copy_image(src, "tests/tampered-blob", desc.digest, dst, "tests/tampered-copy")
        assert not dst.has_blob("tests/tampered-copy", layer)


def test_a_tampered_manifest_is_rejected(registry_a: RunningRegistry, tmp_path: Path) -> None:
    layout, desc = image(tmp_path, unique("tampered-manifest"))
    with RegistryClient(registry_a.host) as client:
        client.push(layout, "tests/tampered-manifest")
    stored = registry_a.blob_file(desc.digest)
    original = stored.read_bytes()
    assert b'"test":"a"' in original
    stored.write_bytes(original.replace(b'"test":"a"', b'"test":"b"'))  # still valid JSON

    with RegistryClient(registry_a.host) as client:
        with pytest.raises(DigestMismatch) as err:
            client.pull("tests/tampered-manifest", desc.digest, OciLayout.create(tmp_path / "o"))
        assert err.value.detail["digest"] == desc.digest
        with pytest.raises(DigestMismatch):
            client.get_manifest("tests/tampered-manifest", desc.digest)
    assert OciLayout.open(tmp_path / "o").index() == []


def test_copy_between_two_registries_by_digest(
    registry_a: RunningRegistry, registry_b: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = image(tmp_path, unique("copy"))
    with RegistryClient(registry_a.host) as a, RegistryClient(registry_b.host) as b:
        a.push(layout, "src/app")
        copied = copy_image(a, "src/app", desc.digest, b, "dst/app", tag="v1")
        assert copied.digest == desc.digest
        assert len(copied.copied) == 4 and copied.existing == ()
        assert b.resolve("dst/app:v1") == desc.digest
        out = OciLayout.create(tmp_path / "from-b")
        b.pull("dst/app", desc.digest, out)
        for blob in layout.verify(desc):
            assert out.read_blob(blob) == layout.read_blob(blob)

        again = copy_image(a, "src/app", desc.digest, b, "dst/app")
        assert again.copied == () and len(again.existing) == 4

        # Within one registry, blobs are mounted across repositories, not re-sent.
        mounted = copy_image(a, "src/app", desc.digest, a, "other/app")
        assert len(mounted.mounted) == 3 and mounted.copied == (desc.digest,)


def test_an_image_index_is_pushed_pulled_and_filtered_by_platform(
    registry_a: RunningRegistry, tmp_path: Path
) -> None:
    layout, amd64 = image(tmp_path, unique("index"))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**amd64.to_json(), "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    index_desc = layout.write_blob(canonical_json(index), OCI_INDEX)
    with RegistryClient(registry_a.host) as client:
        pushed = client.push(layout, "tests/index", index_desc)
        assert pushed.digest == index_desc.digest
        whole = OciLayout.create(tmp_path / "whole")
        assert client.pull("tests/index", index_desc.digest, whole).digest == index_desc.digest
        assert len(whole.verify()) == 5
        one = OciLayout.create(tmp_path / "one")
        chosen = client.pull("tests/index", index_desc.digest, one, platform="linux/amd64")
        assert chosen.digest == amd64.digest
        with pytest.raises(ManifestUnknown):
            client.pull("tests/index", index_desc.digest, one, platform="linux/arm64")


def test_registry_errors_have_stable_codes(registry_a: RunningRegistry) -> None:
    missing = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 1)
    with RegistryClient(registry_a.host) as client:
        with pytest.raises(ManifestUnknown) as err:
            client.resolve("tests/nothing-here:v1")
        assert err.value.code == "oci.manifest_unknown" and err.value.kind is Kind.NOT_FOUND
        with pytest.raises(BlobUnknown) as blob_err:
            list(client.fetch_blob("tests/nothing-here", missing))
        assert blob_err.value.code == "oci.blob_unknown"
        assert client.has_blob("tests/nothing-here", missing) is False
        with pytest.raises(InvalidReference):
            client.resolve("Not A Reference")
        with pytest.raises(InvalidReference):
            client.resolve("elsewhere.example:5000/app:v1")
    with (
        RegistryClient(f"127.0.0.1:{free_port()}") as nobody,
        pytest.raises(RegistryUnreachable) as e,
    ):
        nobody.ping()
    assert e.value.code == "oci.unreachable" and e.value.kind is Kind.UNAVAILABLE


def test_basic_auth_against_a_registry_that_requires_it(tmp_path: Path) -> None:
    layout, desc = image(tmp_path, unique("auth"))
    with running_registry(users={"alice": "s3cret"}) as reg:
        for credentials in ({}, {"username": "alice", "password": "wrong"}):
            with RegistryClient(reg.host, **credentials) as client:
                with pytest.raises(RegistryUnauthorized) as err:
                    client.push(layout, "team/app")
                assert err.value.code == "oci.unauthorized"
                assert err.value.kind is Kind.UNAUTHORIZED
        with RegistryClient(reg.host, username="alice", password="s3cret") as client:
            assert client.push(layout, "team/app").digest == desc.digest
            out = OciLayout.create(tmp_path / "pulled")
            assert client.pull("team/app", desc.digest, out).digest == desc.digest


def test_https_everywhere_but_loopback() -> None:
    assert RegistryClient("registry.example.com").base_url == "https://registry.example.com"
    assert RegistryClient("10.0.0.5:5000").base_url == "https://10.0.0.5:5000"
    assert RegistryClient("localhost:5050").base_url == "http://localhost:5050"
    assert RegistryClient("[::1]:5050").base_url == "http://[::1]:5050"
    with pytest.raises(InvalidReference):
        RegistryClient("http://registry.example.com")
