"""The agent's image store: an image digest in, a bootable ext4 root filesystem out.

``ImageStore(root, registry, budget_bytes).prepare(repository, digest)``:

1. **pull** by digest with the registry client: the manifest (an index is narrowed to
   ``linux/amd64``; nested indexes too), the image config and the layers. Every manifest
   and blob is verified (sha256 and size) as it streams into a temporary file and only
   renamed into the cache when it matched, so a corrupt or tampered blob raises
   ``oci.digest_mismatch`` and leaves nothing behind. Layer media types are checked
   before anything is downloaded. Blobs already in the cache are not fetched again: the
   cache is content-addressed and shared by every image.
2. **unpack** the layers, bottom first, into a staging directory (``unpack``: OCI
   whiteouts, ownership, modes, links, path-traversal guards), re-hashing each cached
   blob and checking each layer's ``diff_id`` on the way; a cached blob that no longer
   matches its digest is deleted (fetched again next time) and the prepare fails.
3. **build** ``rootfs/<hex>.ext4`` with ``mkfs.ext4 -d`` (``rootfs``: no mounts), into a
   temporary file renamed into place, then its metadata ``rootfs/<hex>.json`` (runtime
   config, the blobs it came from, size, timings). The staging tree is deleted.

A prepared digest is answered from the cache at once (and its last use recorded).

On disk (``root``)::

    store.lock                 flock: shared by every prepare, exclusive for gc
    locks/<hex>.lock           flock per image digest: one prepare builds, others wait
    cache/blobs/sha256/<hex>   the blob cache (an OCI image layout; index.json unused)
    rootfs/<hex>.ext4          a built root filesystem (sparse, mode 0600)
    rootfs/<hex>.json          its metadata; its mtime is the image's last use
    tmp/                       staging trees and half-built images (0700)

Concurrency: ``prepare`` blocks (run it in a thread from asyncio). Two prepares of one
digest, in threads or processes, build once: the second waits for the first's lock and
then finds the image. ``gc`` waits until no prepare runs.

Garbage collection (``gc(in_use)``), only while the store is over its budget (bytes
allocated on disk by the cache and the images, sparse files counted as allocated):
first blobs no cached image refers to (left by failed prepares or evicted images); then
images least recently used first, never one in ``in_use``, each with the blobs only it
referred to; then, if in-use images alone exceed the budget, the layer blobs of the
remaining images (least recently used first: a built image never needs its layers
again, they only spare downloads). Leftovers of interrupted prepares are always removed.
The caller passes every digest it runs or is about to run as ``in_use``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from ember.agent.oci.errors import LayerUnsupported, PlatformUnavailable
from ember.agent.oci.rootfs import DEFAULT_MARGIN, build_ext4, ensure_mount_points
from ember.agent.oci.unpack import Unpacker, UnpackStats, apply_layer, check_media_type
from ember.client.oci.errors import DigestMismatch, LayoutInvalid
from ember.client.oci.layout import OciLayout, write_atomic
from ember.client.oci.media import (
    DOCKER_CONFIG,
    INDEXES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    Descriptor,
    check_digest,
    children,
    parse_manifest,
    platform_matches,
    sha256_digest,
    verify_bytes,
)
from ember.client.oci.reference import check_repository

PLATFORM = "linux/amd64"
MAX_INDEX_DEPTH = 4
META_VERSION = 1


class Registry(Protocol):
    """What the store needs of a registry: ``ember.client.oci.RegistryClient``."""

    base_url: str

    def get_manifest(
        self, repo: str, reference: str, expected: Descriptor | None = None
    ) -> tuple[Descriptor, bytes]: ...

    def fetch_blob(self, repo: str, desc: Descriptor) -> Iterator[bytes]: ...


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """What the platform init needs from the image config to start the workload."""

    env: tuple[str, ...] = ()
    """``NAME=value`` strings, in image order."""
    user: str = ""
    working_dir: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None

    @classmethod
    def from_image_config(cls, doc: Mapping[str, Any]) -> RuntimeConfig:
        config = doc.get("config") or {}
        if not isinstance(config, dict):
            raise LayoutInvalid("the image config's 'config' is not an object")

        def strings(key: str) -> tuple[str, ...] | None:
            value = config.get(key)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise LayoutInvalid(f"the image config's {key} is not a list of strings")
            return tuple(value)

        def text(key: str) -> str:
            value = config.get(key) or ""
            if not isinstance(value, str):
                raise LayoutInvalid(f"the image config's {key} is not a string")
            return value

        return cls(
            env=strings("Env") or (),
            user=text("User"),
            working_dir=text("WorkingDir"),
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
        )

    def env_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            name, _, value = item.partition("=")
            out[name] = value
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "Env": list(self.env),
            "User": self.user,
            "WorkingDir": self.working_dir,
            "Entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
            "Cmd": list(self.cmd) if self.cmd is not None else None,
        }


@dataclasses.dataclass(frozen=True)
class Timings:
    """Seconds spent (wall clock) in one prepare; all zero but ``total_s`` on a hit.
    ``total_s`` of a cold prepare is what the boot benchmark reports as
    ``cold_image_prepare_s``."""

    pull_s: float = 0.0
    unpack_s: float = 0.0
    mkfs_s: float = 0.0
    total_s: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    digest: str
    """The digest asked for (an image manifest or an index)."""
    manifest_digest: str
    """The linux/amd64 image manifest it resolved to."""
    rootfs_path: Path
    config: RuntimeConfig
    size_bytes: int
    """The filesystem's size (the file is sparse: it takes less on disk)."""
    cached: bool
    """True when the root filesystem was in the cache already."""
    timings: Timings
    fetched: tuple[str, ...] = ()
    """Digests downloaded by this prepare (manifests and blobs)."""
    reused: tuple[str, ...] = ()
    """Blobs this prepare found in the cache."""
    unpack: UnpackStats | None = None


@dataclasses.dataclass(frozen=True)
class GcResult:
    removed_images: tuple[str, ...]
    removed_blobs: tuple[str, ...]
    freed_bytes: int
    usage_bytes: int
    budget_bytes: int

    @property
    def over_budget(self) -> bool:
        """Still over budget: the images in use alone take more than it."""
        return self.usage_bytes > self.budget_bytes


@dataclasses.dataclass(frozen=True)
class _Pulled:
    manifest: Descriptor
    config: RuntimeConfig
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    blobs: tuple[str, ...]
    """Every digest the image consists of (indexes, manifest, config, layers)."""


@dataclasses.dataclass(frozen=True)
class _Cached:
    digest: str
    meta: dict[str, Any]
    last_used: float
    disk_bytes: int


@contextlib.contextmanager
def _flock(path: Path, operation: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


def _disk_bytes(path: Path) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class ImageStore:
    """Prepares root filesystems from images by digest; see the module docstring."""

    def __init__(
        self,
        root: Path,
        registry: Registry,
        budget_bytes: int,
        *,
        platform: str = PLATFORM,
        margin_bytes: int = DEFAULT_MARGIN,
        privileged: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.registry = registry
        self.budget_bytes = budget_bytes
        self.platform = platform
        self.margin_bytes = margin_bytes
        self.privileged = privileged
        self._clock = clock
        for sub in ("locks", "rootfs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.root / "tmp", 0o700)
        self.layout = OciLayout.create(self.root / "cache")

    # -- paths -------------------------------------------------------------------------

    def rootfs_path(self, digest: str) -> Path:
        return self.root / "rootfs" / f"{check_digest(digest).split(':', 1)[1]}.ext4"

    def _meta_path(self, digest: str) -> Path:
        return self.rootfs_path(digest).with_suffix(".json")

    def _store_lock(self, operation: int) -> contextlib.AbstractContextManager[None]:
        return _flock(self.root / "store.lock", operation)

    # -- prepare -----------------------------------------------------------------------

    def prepare(self, repository: str, digest: str) -> PreparedImage:
        """The root filesystem of image ``digest`` from ``repository``: from the cache,
        or pulled, unpacked and built now."""
        check_repository(repository)
        check_digest(digest)
        started = time.monotonic()
        lock = self.root / "locks" / f"{digest.split(':', 1)[1]}.lock"
        with self._store_lock(fcntl.LOCK_SH), _flock(lock, fcntl.LOCK_EX):
            hit = self._load(digest, touch=True)
            if hit is not None:
                return dataclasses.replace(hit, timings=Timings(total_s=time.monotonic() - started))
            return self._build(repository, digest, started)

    def get(self, digest: str) -> PreparedImage | None:
        """The prepared image ``digest`` if it is cached (no registry contact, no touch)."""
        return self._load(check_digest(digest), touch=False)

    def _load(self, digest: str, *, touch: bool) -> PreparedImage | None:
        meta_path, image = self._meta_path(digest), self.rootfs_path(digest)
        try:
            meta = json.loads(meta_path.read_bytes())
            if not image.is_file() or meta.get("version") != META_VERSION:
                return None
            prepared = PreparedImage(
                digest=digest,
                manifest_digest=meta["manifest_digest"],
                rootfs_path=image,
                config=RuntimeConfig.from_image_config({"config": meta["config"]}),
                size_bytes=int(meta["size_bytes"]),
                cached=True,
                timings=Timings(),
            )
        except (OSError, ValueError, KeyError, TypeError, LayoutInvalid):
            return None
        if touch:
            now = self._clock()
            os.utime(meta_path, (now, now))
        return prepared

    def _build(self, repository: str, digest: str, started: float) -> PreparedImage:
        fetched: list[str] = []
        reused: list[str] = []
        pulled = self._pull(repository, digest, fetched, reused)
        pulled_at = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f"{digest[7:19]}-", dir=self.root / "tmp"))
        try:
            tree = staging / "rootfs"
            tree.mkdir(mode=0o755)
            os.chmod(tree, 0o755)  # noqa: S103 - the image's root directory
            unpacker = Unpacker(tree, privileged=self.privileged)
            for layer, diff_id in zip(pulled.layers, pulled.diff_ids, strict=True):
                blob = self.layout.blob_path(layer.digest)
                try:
                    apply_layer(
                        unpacker,
                        blob,
                        layer.media_type,
                        digest=layer.digest,
                        size=layer.size,
                        diff_id=diff_id,
                        source=f"layer {layer.digest} of {repository}@{digest}",
                    )
                except DigestMismatch as exc:
                    if exc.detail.get("digest") == layer.digest:
                        blob.unlink(missing_ok=True)  # the cache copy went bad: refetch next time
                    raise
            unpacker.finish()
            ensure_mount_points(tree)
            unpacked_at = time.monotonic()
            image = staging / "rootfs.ext4"
            size = build_ext4(tree, image, margin=self.margin_bytes)
            os.chmod(image, 0o600)
            os.replace(image, self.rootfs_path(digest))
            built_at = time.monotonic()
            timings = Timings(
                pull_s=pulled_at - started,
                unpack_s=unpacked_at - pulled_at,
                mkfs_s=built_at - unpacked_at,
                total_s=built_at - started,
            )
            meta = {
                "version": META_VERSION,
                "digest": digest,
                "manifest_digest": pulled.manifest.digest,
                "repository": repository,
                "config": pulled.config.to_json(),
                "blobs": list(pulled.blobs),
                "layers": [layer.digest for layer in pulled.layers],
                "size_bytes": size,
                "timings": timings.to_json(),
            }
            meta_path = self._meta_path(digest)
            write_atomic(meta_path, json.dumps(meta, sort_keys=True, indent=1).encode())
            now = self._clock()
            os.utime(meta_path, (now, now))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return PreparedImage(
            digest=digest,
            manifest_digest=pulled.manifest.digest,
            rootfs_path=self.rootfs_path(digest),
            config=pulled.config,
            size_bytes=size,
            cached=False,
            timings=timings,
            fetched=tuple(fetched),
            reused=tuple(reused),
            unpack=unpacker.stats,
        )

    # -- pull --------------------------------------------------------------------------

    def _pull(self, repo: str, digest: str, fetched: list[str], reused: list[str]) -> _Pulled:
        desc, doc = self._manifest(repo, digest, None, fetched, reused)
        chain = [desc.digest]
        while doc["mediaType"] in INDEXES:
            if len(chain) > MAX_INDEX_DEPTH:
                raise LayoutInvalid(f"{digest}: indexes nested more than {MAX_INDEX_DEPTH} deep")
            chosen = self._select(doc, desc.digest, digest)
            desc, doc = self._manifest(repo, chosen.digest, chosen, fetched, reused)
            chain.append(desc.digest)
        blobs, _ = children(doc, desc.digest)
        config_desc, layers = blobs[0], tuple(blobs[1:])
        if config_desc.media_type not in (OCI_CONFIG, DOCKER_CONFIG):
            raise LayerUnsupported(
                f"{digest} is not a container image (config media type {config_desc.media_type!r})",
                detail={"digest": digest, "media_type": config_desc.media_type},
            )
        if not layers:
            raise LayoutInvalid(f"{digest}: the image has no layers")
        for layer in layers:  # before downloading anything big
            check_media_type(layer.media_type, f"layer {layer.digest} of {digest}")
        if config_desc.size > MAX_MANIFEST_BYTES:
            raise LayoutInvalid(f"{digest}: the image config is larger than {MAX_MANIFEST_BYTES}")
        self._blob(repo, config_desc, fetched, reused)
        config_doc = self._config(config_desc)
        self._check_platform(config_doc, digest)
        diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids")
        if (
            not isinstance(diff_ids, list)
            or len(diff_ids) != len(layers)
            or not all(isinstance(d, str) for d in diff_ids)
        ):
            raise LayoutInvalid(
                f"{digest}: the image config lists {len(diff_ids or [])} diff_ids for "
                f"{len(layers)} layers",
                detail={"digest": digest},
            )
        for layer in layers:
            self._blob(repo, layer, fetched, reused)
        return _Pulled(
            manifest=desc,
            config=RuntimeConfig.from_image_config(config_doc),
            layers=layers,
            diff_ids=tuple(diff_ids),
            blobs=(*chain, config_desc.digest, *(layer.digest for layer in layers)),
        )

    def _select(self, index: dict[str, Any], where: str, digest: str) -> Descriptor:
        entries = children(index, where)[1]
        # An entry without a platform is no answer to "which one is linux/amd64?".
        for entry in entries:
            if entry.platform and platform_matches(entry, self.platform):
                return entry
        found = sorted(
            "/".join(str(p.get(k)) for k in ("os", "architecture") if p.get(k))
            for p in (e.platform or {} for e in entries)
        )
        raise PlatformUnavailable(
            f"image {digest} has no {self.platform} variant (it has: "
            f"{', '.join(f for f in found if f) or 'none'})",
            hint=f"build and push the image for {self.platform}",
            detail={"digest": digest, "platform": self.platform, "available": found},
        )

    def _check_platform(self, config: Mapping[str, Any], digest: str) -> None:
        os_, _, arch = self.platform.partition("/")
        have_os, have_arch = config.get("os"), config.get("architecture")
        if (have_os and have_os != os_) or (have_arch and have_arch != arch):
            raise PlatformUnavailable(
                f"image {digest} is for {have_os}/{have_arch}, not {self.platform}",
                hint=f"build and push the image for {self.platform}",
                detail={"digest": digest, "platform": self.platform},
            )

    def _manifest(
        self,
        repo: str,
        digest: str,
        expected: Descriptor | None,
        fetched: list[str],
        reused: list[str],
    ) -> tuple[Descriptor, dict[str, Any]]:
        """A manifest by digest, from the cache (re-verified: manifests are small) or the
        registry (verified, then cached)."""
        path = self.layout.blob_path(digest)
        media_type = expected.media_type if expected is not None else None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is not None:
            try:
                verify_bytes(data, expected or digest, str(path))
            except DigestMismatch:
                path.unlink(missing_ok=True)
                data = None
        if data is None:
            desc, data = self.registry.get_manifest(repo, digest, expected)
            with self.layout.writer() as w:
                w.write(data)
                w.commit(desc.media_type, expected=desc)
            fetched.append(digest)
        else:
            reused.append(digest)
        doc = parse_manifest(data, media_type, digest)
        return Descriptor(doc["mediaType"], sha256_digest(data), len(data)), doc

    def _blob(self, repo: str, desc: Descriptor, fetched: list[str], reused: list[str]) -> None:
        if self.layout.has_blob(desc):
            reused.append(desc.digest)
            return
        source = f"registry {self.registry.base_url} ({repo})"
        self.layout.ingest(desc, self.registry.fetch_blob(repo, desc), source)
        fetched.append(desc.digest)

    def _config(self, desc: Descriptor) -> dict[str, Any]:
        path = self.layout.blob_path(desc.digest)
        try:
            data = self.layout.read_blob(desc, limit=MAX_MANIFEST_BYTES)
        except DigestMismatch:
            path.unlink(missing_ok=True)
            raise
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise LayoutInvalid(f"{desc.digest}: the image config is not JSON") from exc
        if not isinstance(doc, dict):
            raise LayoutInvalid(f"{desc.digest}: the image config is not a JSON object")
        return doc

    # -- cache contents and garbage collection -----------------------------------------

    def _cached(self) -> list[_Cached]:
        """Every complete image in the cache, least recently used first."""
        out = []
        for meta_path in (self.root / "rootfs").glob("*.json"):
            image = meta_path.with_suffix(".ext4")
            try:
                meta = json.loads(meta_path.read_bytes())
                last_used = meta_path.stat().st_mtime
                digest = check_digest(str(meta["digest"]))
            except (OSError, ValueError, KeyError, TypeError, LayoutInvalid):
                continue
            if not image.is_file() or meta.get("version") != META_VERSION:
                continue
            disk = _disk_bytes(image) + _disk_bytes(meta_path)
            out.append(_Cached(digest, meta, last_used, disk))
        return sorted(out, key=lambda c: (c.last_used, c.digest))

    def images(self) -> list[tuple[str, float, int]]:
        """``(digest, last_used, disk_bytes)`` of every cached image, LRU first."""
        return [(c.digest, c.last_used, c.disk_bytes) for c in self._cached()]

    def _blob_files(self) -> dict[str, Path]:
        return {
            f"sha256:{p.name}": p
            for p in self.layout.blobs_dir.iterdir()
            if not p.name.startswith(".")
        }

    def usage(self) -> int:
        """Bytes allocated on disk by the blob cache and the root filesystems."""
        blobs = sum(_disk_bytes(p) for p in self._blob_files().values())
        images = sum(_disk_bytes(p) for p in (self.root / "rootfs").iterdir())
        return blobs + images

    def gc(self, in_use: Collection[str]) -> GcResult:
        """Bring the store under its budget; see the module docstring for the order."""
        keep = set(in_use)
        with self._store_lock(fcntl.LOCK_EX):
            self._clean_leftovers()
            before = usage = self.usage()
            removed_images: list[str] = []
            removed_blobs: list[str] = []
            cached = self._cached()

            def drop_blobs(candidates: Collection[str]) -> None:
                nonlocal usage
                files = self._blob_files()
                for digest in sorted(candidates):
                    path = files.get(digest)
                    if path is None:
                        continue
                    usage -= _disk_bytes(path)
                    path.unlink(missing_ok=True)
                    removed_blobs.append(digest)

            def referenced() -> set[str]:
                return {str(b) for c in cached for b in c.meta.get("blobs", [])}

            if usage > self.budget_bytes:
                drop_blobs(set(self._blob_files()) - referenced())
            for image in list(cached):
                if usage <= self.budget_bytes:
                    break
                if image.digest in keep:
                    continue
                self.rootfs_path(image.digest).unlink(missing_ok=True)
                self._meta_path(image.digest).unlink(missing_ok=True)
                (self.root / "locks" / f"{image.digest.split(':', 1)[1]}.lock").unlink(
                    missing_ok=True
                )
                usage -= image.disk_bytes
                cached.remove(image)
                removed_images.append(image.digest)
                drop_blobs(set(self._blob_files()) - referenced())
            for image in cached:  # only images in use are left: their layers can go
                if usage <= self.budget_bytes:
                    break
                drop_blobs(set(image.meta.get("layers", [])))
            usage = self.usage()
        return GcResult(
            tuple(removed_images),
            tuple(removed_blobs),
            max(0, before - usage),
            usage,
            self.budget_bytes,
        )

    def _clean_leftovers(self) -> None:
        """Remove what interrupted prepares left (only called with the store locked)."""
        for entry in (self.root / "tmp").iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        for entry in self.layout.blobs_dir.iterdir():
            if entry.name.startswith(".ingest-"):
                entry.unlink(missing_ok=True)
        rootfs = self.root / "rootfs"
        for entry in rootfs.iterdir():
            if entry.name.startswith("."):  # a half-written metadata file
                entry.unlink(missing_ok=True)
            elif entry.suffix == ".ext4" and not entry.with_suffix(".json").exists():
                entry.unlink(missing_ok=True)  # built, but its metadata never written
