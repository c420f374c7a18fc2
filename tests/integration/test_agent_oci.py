"""The agent's image store against a real registry (Debian's docker-registry) and real
e2fsprogs: pull by digest, verify, unpack, mkfs.ext4 -d, cache, collect. The images are
read back with debugfs, which needs no mount."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.agent.oci import (
    ImageStore,
    LayerUnsupported,
    PlatformUnavailable,
    PreparedImage,
    ToolMissing,
    rootfs,
)
from ember.agent.oci.errors import RootfsBuildFailed
from ember.agent.oci.rootfs import build_ext4, find_tool
from ember.client.oci import (
    DigestMismatch,
    ImageConfig,
    OciLayout,
    RegistryClient,
    build_image,
)
from ember.client.oci.media import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    sha256_digest,
)
from ember.core.errors import Kind
from tests.support.registry import RunningRegistry, running_registry

_unique = itertools.count()
GiB = 1024**3
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def registry() -> Iterator[RunningRegistry]:
    try:
        find_tool("mkfs.ext4")
        find_tool("debugfs")
    except ToolMissing as exc:
        pytest.fail(f"{exc.message}: run 'make bootstrap'")
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

    def blob_gets(self) -> list[str]:
        return [p.rsplit("/", 1)[1] for m, p in self.calls if m == "GET" and "/blobs/" in p]


def unique(name: str) -> str:
    return f"{name}-{next(_unique)}"


def debugfs(image: Path, request: str) -> str:
    done = subprocess.run(
        [find_tool("debugfs"), "-R", request, str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def stat_of(image: Path, path: str) -> dict[str, str]:
    """Mode, User, Group, Links and Type of ``path`` inside the image (debugfs stat)."""
    out = debugfs(image, f"stat {path}")
    fields: dict[str, str] = {}
    for token_line in out.splitlines()[:6]:
        parts = token_line.replace(":", " ").split()
        for key in ("Type", "Mode", "User", "Group", "Links"):
            if key in parts:
                fields[key] = parts[parts.index(key) + 1]
    return fields


# -- images ------------------------------------------------------------------------------


def tree_image(
    tmp_path: Path, label: str, base: Path | None = None
) -> tuple[OciLayout, Descriptor]:
    """An image built with the client's builder: a base layer (shared when ``base`` is
    given) and an app layer unique to ``label``."""
    if base is None:
        base = tmp_path / f"{label}-base"
        (base / "bin").mkdir(parents=True)
        (base / "bin" / "tool").write_bytes(label.encode() * 40_000)
        (base / "bin" / "tool").chmod(0o4755)
        (base / "bin" / "sh").symlink_to("tool")
        os.link(base / "bin" / "tool", base / "bin" / "tool-link")
    app = tmp_path / f"{label}-app"
    (app / "www").mkdir(parents=True)
    (app / "www" / "index.html").write_text(f"<h1>{label}</h1>\n")
    layout = OciLayout.create(tmp_path / f"{label}-layout")
    desc = build_image(
        layout,
        [base, app],
        ImageConfig(
            entrypoint=["/bin/sh", "-c"],
            cmd=["httpd -f -p 8080 -h /www"],
            env={"PATH": "/bin", "GREETING": label},
            working_dir="/www",
            user="65534:65534",
        ),
    )
    return layout, desc


def raw_image(
    tmp_path: Path,
    label: str,
    layers: list[bytes],
    *,
    config: dict | None = None,
    architecture: str = "amd64",
    diff_ids: list[str] | None = None,
    layer_media_type: str = OCI_LAYER_GZIP,
) -> tuple[OciLayout, Descriptor]:
    """An image from hand-built layer tars (ownership, whiteouts: what the builder
    normalises away)."""
    layout = OciLayout.create(tmp_path / f"{label}-layout")
    descs = []
    for tar in layers:
        descs.append(layout.write_blob(gzip.compress(tar, mtime=0), layer_media_type))
    doc = {
        "architecture": architecture,
        "os": "linux",
        "config": config or {"Cmd": ["/bin/true"], "Env": [f"LABEL={label}"]},
        "rootfs": {
            "type": "layers",
            "diff_ids": diff_ids or [sha256_digest(t) for t in layers],
        },
    }
    config_desc = layout.write_blob(canonical_json(doc), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [x.to_json() for x in descs],
    }
    return layout, layout.add_manifest(layout.write_blob(canonical_json(manifest), OCI_MANIFEST))


def tar_bytes(*entries: tuple[str, bytes | None, dict]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, attrs in entries:
            info = tarfile.TarInfo(name)
            info.mode = attrs.get("mode", 0o755 if data is None else 0o644)
            info.uid, info.gid = attrs.get("uid", 0), attrs.get("gid", 0)
            if data is None:
                info.type = attrs.get("type", tarfile.DIRTYPE)
                info.linkname = attrs.get("linkname", "")
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def push(registry: RunningRegistry, layout: OciLayout, repo: str, image: Descriptor) -> None:
    with RegistryClient(registry.host) as client:
        client.push(layout, repo, image)


def store_for(root: Path, client: RegistryClient, budget: int = 10 * GiB, **kw) -> ImageStore:
    return ImageStore(root, client, budget, **kw)


def cache_is_clean(store: ImageStore) -> None:
    """Nothing half-done: no temporary blobs, no staging trees, no partial images."""
    assert not [p for p in store.layout.blobs_dir.iterdir() if p.name.startswith(".")]
    assert list((store.root / "tmp").iterdir()) == []
    assert not [p for p in (store.root / "rootfs").iterdir() if p.name.startswith(".")]


# -- prepare -----------------------------------------------------------------------------


def test_prepare_builds_an_ext4_root_filesystem_with_the_image(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    label = unique("hello")
    layout, desc = tree_image(tmp_path, label)
    push(registry, layout, "tests/agent-hello", desc)
    with RegistryClient(registry.host) as client:
        prepared = store_for(tmp_path / "store", client).prepare("tests/agent-hello", desc.digest)

    assert prepared.digest == prepared.manifest_digest == desc.digest
    assert not prepared.cached
    image = prepared.rootfs_path
    assert image == tmp_path / "store" / "rootfs" / f"{desc.hex}.ext4"
    assert debugfs(image, "cat /www/index.html") == f"<h1>{label}</h1>\n"
    # The builder's modes and links survive unpack and mkfs.
    tool = stat_of(image, "/bin/tool")
    assert tool["Mode"] == "04755" and tool["Links"] == "2"
    assert debugfs(image, "cat /bin/tool-link") == label * 40_000
    assert "Type: symlink" in debugfs(image, "stat /bin/sh")
    # The platform's mount points are there.
    listing = debugfs(image, "ls -p /")
    for name in ("dev", "proc", "sys", "run", "tmp"):
        assert f"/{name}/" in listing, listing
    assert stat_of(image, "/tmp")["Mode"] == "01777"
    # A clean filesystem (e2fsck reads it without mounting, and changes nothing).
    subprocess.run([find_tool("e2fsck"), "-fn", str(image)], check=True, capture_output=True)
    assert image.stat().st_size == prepared.size_bytes
    assert image.stat().st_blocks * 512 < prepared.size_bytes, "the image file is sparse"

    assert prepared.config.entrypoint == ("/bin/sh", "-c")
    assert prepared.config.cmd == ("httpd -f -p 8080 -h /www",)
    assert prepared.config.env_dict() == {"PATH": "/bin", "GREETING": label}
    assert prepared.config.user == "65534:65534"
    assert prepared.config.working_dir == "/www"
    t = prepared.timings
    assert t.pull_s > 0 and t.unpack_s > 0 and t.mkfs_s > 0
    assert t.total_s >= t.pull_s + t.unpack_s + t.mkfs_s
    assert len(prepared.fetched) == 4 and prepared.reused == ()  # manifest, config, 2 layers


def test_ownership_and_whiteouts_reach_the_image(registry: RunningRegistry, tmp_path: Path) -> None:
    label = unique("owned")
    lower = tar_bytes(
        ("etc", None, {}),
        ("etc/gone", b"deleted by the next layer", {}),
        ("etc/keep", label.encode(), {}),
        ("home", None, {}),
        ("home/app", None, {"uid": 1000, "gid": 1001, "mode": 0o750}),
        ("home/app/run", b"#!/bin/sh\n", {"uid": 1000, "gid": 1001, "mode": 0o4750}),
        ("var", None, {}),
        ("var/old", None, {}),
        ("var/old/file", b"x", {}),
    )
    upper = tar_bytes(
        ("etc/.wh.gone", b"", {}),
        ("var/.wh..wh..opq", b"", {}),
        ("var/new", b"fresh", {}),
    )
    layout, desc = raw_image(tmp_path, label, [lower, upper])
    push(registry, layout, "tests/agent-owned", desc)
    with RegistryClient(registry.host) as client:
        prepared = store_for(tmp_path / "store", client).prepare("tests/agent-owned", desc.digest)
    image = prepared.rootfs_path
    etc = debugfs(image, "ls -p /etc")
    assert "/keep/" in etc and "gone" not in etc and ".wh." not in etc
    var = debugfs(image, "ls -p /var")
    assert "/new/" in var and "old" not in var and ".wh." not in var
    if ROOT:
        run = stat_of(image, "/home/app/run")
        assert (run["User"], run["Group"], run["Mode"]) == ("1000", "1001", "04750")
        home = stat_of(image, "/home/app")
        assert (home["User"], home["Group"], home["Mode"]) == ("1000", "1001", "0750")
    assert stat_of(image, "/")["User"] == "0"


def test_a_second_image_downloads_only_the_layers_it_does_not_share(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    first, second = unique("first"), unique("second")
    layout_a, a = tree_image(tmp_path, first)
    layout_b, b = tree_image(tmp_path, second, base=tmp_path / f"{first}-base")
    push(registry, layout_a, "tests/agent-shared-a", a)
    push(registry, layout_b, "tests/agent-shared-b", b)
    base_layer, app_b = (Descriptor.from_json(x) for x in layout_b.manifest(b)["layers"])
    assert base_layer.digest == Descriptor.from_json(layout_a.manifest(a)["layers"][0]).digest

    with RegistryClient(registry.host) as client:
        store_for(tmp_path / "store", client).prepare("tests/agent-shared-a", a.digest)
    transport = Counting()
    with RegistryClient(registry.host, transport=transport) as client:
        prepared = store_for(tmp_path / "store", client).prepare("tests/agent-shared-b", b.digest)
    config_b = Descriptor.from_json(layout_b.manifest(b)["config"])
    assert sorted(transport.blob_gets()) == sorted([config_b.digest, app_b.digest])
    assert base_layer.digest in prepared.reused
    assert debugfs(prepared.rootfs_path, "cat /www/index.html") == f"<h1>{second}</h1>\n"
    assert debugfs(prepared.rootfs_path, "cat /bin/tool") == first * 40_000


def test_prepare_is_idempotent_and_answers_from_the_cache(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = tree_image(tmp_path, unique("again"))
    push(registry, layout, "tests/agent-again", desc)
    with RegistryClient(registry.host) as client:
        first = store_for(tmp_path / "store", client).prepare("tests/agent-again", desc.digest)
    before = first.rootfs_path.stat()
    transport = Counting()
    with RegistryClient(registry.host, transport=transport) as client:
        store = store_for(tmp_path / "store", client)  # a restarted agent: a new store object
        second = store.prepare("tests/agent-again", desc.digest)
    assert transport.calls == [], "a prepared image needs no registry"
    assert second.cached and second.rootfs_path == first.rootfs_path
    assert second.config == first.config and second.size_bytes == first.size_bytes
    assert (second.timings.pull_s, second.timings.unpack_s, second.timings.mkfs_s) == (0, 0, 0)
    after = second.rootfs_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert store.get(desc.digest) is not None
    cache_is_clean(store)


def test_concurrent_prepares_of_one_digest_build_it_once(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = tree_image(tmp_path, unique("racing"))
    push(registry, layout, "tests/agent-racing", desc)
    results: list[PreparedImage] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with RegistryClient(registry.host) as client:
                store = store_for(tmp_path / "store", client)
                results.append(store.prepare("tests/agent-racing", desc.digest))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.cached for r in results) == [False, True, True, True]
    assert len({r.rootfs_path for r in results}) == 1


def test_an_index_is_narrowed_to_linux_amd64(registry: RunningRegistry, tmp_path: Path) -> None:
    label = unique("multi")
    layout = OciLayout.create(tmp_path / "multi")
    images = {}
    for arch in ("arm64", "amd64"):
        root = tmp_path / f"{label}-{arch}"
        (root / "www").mkdir(parents=True)
        (root / "www" / "index.html").write_text(arch)
        images[arch] = build_image(
            layout, [root], ImageConfig(cmd=["x"], architecture=arch), ref_name=arch
        )
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                **images[a].to_json(),
                "annotations": {},
                "platform": {"os": "linux", "architecture": a},
            }
            for a in ("arm64", "amd64")
        ],
    }
    index_desc = layout.add_manifest(layout.write_blob(canonical_json(index), OCI_INDEX), "all")
    only_arm = {**index, "manifests": index["manifests"][:1]}
    arm_desc = layout.add_manifest(layout.write_blob(canonical_json(only_arm), OCI_INDEX), "arm")
    with RegistryClient(registry.host) as client:
        client.push(layout, "tests/agent-multi", index_desc)
        client.push(layout, "tests/agent-multi", arm_desc)
        transport = Counting()
    with RegistryClient(registry.host, transport=transport) as client:
        store = store_for(tmp_path / "store", client)
        prepared = store.prepare("tests/agent-multi", index_desc.digest)
        assert prepared.digest == index_desc.digest
        assert prepared.manifest_digest == images["amd64"].digest
        assert debugfs(prepared.rootfs_path, "cat /www/index.html") == "amd64"
        arm_blobs = {x.digest for x, _ in layout.walk(images["arm64"])}
        assert not arm_blobs & set(transport.blob_gets()), "nothing of arm64 is downloaded"

        with pytest.raises(PlatformUnavailable) as err:
            store.prepare("tests/agent-multi", arm_desc.digest)
        assert err.value.code == "image.no_platform"
        assert err.value.detail["available"] == ["linux/arm64"]
        # An image manifest for another architecture, named directly, is refused too.
        with pytest.raises(PlatformUnavailable):
            store.prepare("tests/agent-multi", images["arm64"].digest)
    assert store.get(arm_desc.digest) is None


def test_an_unsupported_layer_type_is_refused_before_any_layer_download(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    label = unique("foreign")
    layout, desc = raw_image(
        tmp_path,
        label,
        [tar_bytes(("x", label.encode(), {}))],
        layer_media_type="application/vnd.example.layer.v1.squashfs",
    )
    push(registry, layout, "tests/agent-foreign", desc)
    transport = Counting()
    with (
        RegistryClient(registry.host, transport=transport) as client,
        pytest.raises(LayerUnsupported) as err,
    ):
        store_for(tmp_path / "store", client).prepare("tests/agent-foreign", desc.digest)
    assert err.value.kind is Kind.INVALID
    assert transport.blob_gets() == []


# -- integrity ---------------------------------------------------------------------------


def assert_refused_and_nothing_kept(
    registry: RunningRegistry, tmp_path: Path, repo: str, digest: str, bad: str
) -> None:
    with RegistryClient(registry.host) as client:
        store = store_for(tmp_path / "store", client)
        with pytest.raises(DigestMismatch) as err:
            store.prepare(repo, digest)
    assert err.value.code == "oci.digest_mismatch"
    assert err.value.kind is Kind.INTERNAL
    assert err.value.detail["digest"] == bad
    assert not store.layout.blob_path(bad).exists(), "the bad blob never enters the cache"
    assert store.get(digest) is None
    assert [p for p in (store.root / "rootfs").iterdir()] == []
    cache_is_clean(store)


def test_a_tampered_blob_is_refused_and_nothing_enters_the_cache(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = tree_image(tmp_path, unique("tampered"))
    push(registry, layout, "tests/agent-tampered", desc)
    layer = Descriptor.from_json(layout.manifest(desc)["layers"][1])
    stored = registry.blob_file(layer.digest)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    stored.write_bytes(bytes(data))
    assert_refused_and_nothing_kept(
        registry, tmp_path, "tests/agent-tampered", desc.digest, layer.digest
    )


def test_a_manifest_that_lies_about_a_blob_size_is_refused(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    label = unique("wrong-size")
    tar = tar_bytes(("www", None, {}), ("www/index.html", label.encode(), {}))
    layout, desc = raw_image(tmp_path, label, [tar])
    push(registry, layout, "tests/agent-wrong-size", desc)
    # The same blobs under a manifest that gives the layer one byte less than it has (the
    # client refuses to push that, so it goes up as raw bytes).
    lying = layout.manifest(desc)
    lying["layers"][0]["size"] -= 1
    with RegistryClient(registry.host) as client:
        bad = client.put_manifest("tests/agent-wrong-size", canonical_json(lying), OCI_MANIFEST)
    layer = Descriptor.from_json(lying["layers"][0])
    assert_refused_and_nothing_kept(
        registry, tmp_path, "tests/agent-wrong-size", bad.digest, layer.digest
    )


def test_a_layer_that_does_not_match_its_diff_id_is_refused(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    label = unique("diff-id")
    tar = tar_bytes(("www", None, {}), ("www/index.html", label.encode(), {}))
    wrong = sha256_digest(b"some other tar")
    layout, desc = raw_image(tmp_path, label, [tar], diff_ids=[wrong])
    push(registry, layout, "tests/agent-diff-id", desc)
    with RegistryClient(registry.host) as client:
        store = store_for(tmp_path / "store", client)
        with pytest.raises(DigestMismatch) as err:
            store.prepare("tests/agent-diff-id", desc.digest)
    assert err.value.detail["digest"] == wrong
    assert store.get(desc.digest) is None
    cache_is_clean(store)


def test_a_cache_blob_damaged_on_disk_is_detected_and_fetched_again(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    layout, desc = tree_image(tmp_path, unique("rot"))
    push(registry, layout, "tests/agent-rot", desc)
    layer = Descriptor.from_json(layout.manifest(desc)["layers"][1])
    with RegistryClient(registry.host) as client:
        store = store_for(tmp_path / "store", client)
        store.prepare("tests/agent-rot", desc.digest)
        store.rootfs_path(desc.digest).unlink()  # the image is gone, its layers are cached
        cached = store.layout.blob_path(layer.digest)
        data = bytearray(cached.read_bytes())
        data[-20] ^= 0xFF
        cached.write_bytes(bytes(data))
        with pytest.raises(DigestMismatch):
            store.prepare("tests/agent-rot", desc.digest)
        assert not cached.exists(), "the damaged copy is thrown away"
        again = store.prepare("tests/agent-rot", desc.digest)
    assert layer.digest in again.fetched
    assert not again.cached


# -- garbage collection ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 100
        return self.now


def test_gc_evicts_least_recently_used_images_and_keeps_those_in_use(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    labels = [unique("gc-a"), unique("gc-b"), unique("gc-c")]
    base_owner = labels[0]
    digests = []
    sizes: dict[str, int] = {}
    for i, label in enumerate(labels):
        base = tmp_path / f"{base_owner}-base" if i else None
        layout, desc = tree_image(tmp_path, label, base=base)
        push(registry, layout, "tests/agent-gc", desc)
        digests.append(desc.digest)
        sizes[desc.digest] = desc.size
    a, b, c = digests
    clock = Clock()
    with RegistryClient(registry.host) as client:
        store = store_for(tmp_path / "store", client, clock=clock)
        for digest in (a, b, c):
            store.prepare("tests/agent-gc", digest)
        store.prepare("tests/agent-gc", a)  # a is now the most recently used
        assert [d for d, _, _ in store.images()] == [b, c, a]

        # Under budget: nothing goes, but leftovers of an interrupted prepare do.
        (store.root / "tmp" / "abandoned").mkdir()
        (store.layout.blobs_dir / ".ingest-abandoned").write_bytes(b"x")
        unchanged = store.gc(in_use=set())
        assert unchanged.removed_images == () and unchanged.removed_blobs == ()
        cache_is_clean(store)

        # One byte over: the least recently used image not in use goes (c, not b).
        store.budget_bytes = store.usage() - 1
        result = store.gc(in_use={b})
        assert result.removed_images == (c,)
        assert not result.over_budget and result.freed_bytes > 0
        assert store.get(c) is None and store.get(b) is not None and store.get(a) is not None
        # c's own blobs went, the base layer it shared with a and b stayed.
        layers_a = OciLayout.open(tmp_path / f"{labels[0]}-layout").manifest(
            Descriptor(OCI_MANIFEST, a, sizes[a])
        )["layers"]
        layers_c = OciLayout.open(tmp_path / f"{labels[2]}-layout").manifest(
            Descriptor(OCI_MANIFEST, c, sizes[c])
        )["layers"]
        assert layers_a[0] == layers_c[0]
        assert store.layout.has_blob(Descriptor.from_json(layers_c[0]))
        assert not store.layout.has_blob(Descriptor.from_json(layers_c[1]))
        assert not store.layout.blob_path(c).exists()

        # A budget of zero: everything not in use goes; b stays, its layers do not.
        store.budget_bytes = 0
        result = store.gc(in_use={b})
        assert result.removed_images == (a,)
        assert result.over_budget
        assert [d for d, _, _ in store.images()] == [b]
        layers_b = OciLayout.open(tmp_path / f"{labels[1]}-layout").manifest(
            Descriptor(OCI_MANIFEST, b, sizes[b])
        )["layers"]
        assert not any(store.layout.has_blob(Descriptor.from_json(x)) for x in layers_b)
        hit = store.prepare("tests/agent-gc", b)
        assert hit.cached, "an image in use is never removed, and still needs no layer"


# -- the ext4 builder on its own ---------------------------------------------------------


def test_a_short_size_estimate_is_retried_with_twice_the_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "data" / "big").write_bytes(os.urandom(6 * 1024 * 1024))
    estimate = rootfs.measure(tree)
    monkeypatch.setattr(rootfs, "GROWTH", 1.0)  # no room for the journal and metadata
    first = estimate.image_bytes(0)
    size = build_ext4(tree, tmp_path / "image.ext4", margin=0)
    assert size == 2 * first
    assert debugfs(tmp_path / "image.ext4", "stat /data/big").count("Size: 6291456") == 1
    subprocess.run(
        [find_tool("e2fsck"), "-fn", str(tmp_path / "image.ext4")], check=True, capture_output=True
    )


def test_a_failed_mkfs_leaves_no_image(tmp_path: Path) -> None:
    with pytest.raises(RootfsBuildFailed) as err:
        build_ext4(tmp_path / "missing", tmp_path / "image.ext4")
    assert err.value.code == "image.rootfs_failed"
    assert not (tmp_path / "image.ext4").exists()
