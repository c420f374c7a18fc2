"""OCI image layouts on disk, and OCI / ``docker save`` tar archives.

An image layout (image-spec ``image-layout.md``) is a directory::

    oci-layout              {"imageLayoutVersion": "1.0.0"}
    index.json              an image index; entries may carry
                            org.opencontainers.image.ref.name (e.g. "latest")
    blobs/sha256/<hex>      content addressed by its digest

Blobs enter a layout only through ``BlobWriter``: written to a temporary file, hashed as
they stream, and renamed to their digest only when digest and size are right, so a blob
file in a layout has always been verified once. Reading back (``read_blob``,
``verify``) checks again: a layout is a cache, and a cache can be tampered with.

Archives: ``write_archive`` writes a layout as a deterministic tar that holds the OCI
layout *and* a Docker-style ``manifest.json`` (so ``docker load`` and ``podman load``
take it). ``import_archive`` reads either an OCI archive (a tarred layout, what
``docker save`` writes since Docker 25) or a legacy ``docker save`` archive
(``manifest.json`` + ``<id>/layer.tar``), optionally gzip-compressed, into a layout;
legacy layers are gzip-compressed deterministically and each one is checked against the
``diff_id`` its config declares.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO

from ember.client.oci.errors import LayoutInvalid
from ember.client.oci.media import (
    IMAGE_MANIFESTS,
    INDEXES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    canonical_json,
    check_digest,
    children,
    index_document,
    mismatch,
    parse_manifest,
    verify_bytes,
)

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"
CHUNK = 1024 * 1024
GZIP_LEVEL = 6  # fixed: the same bytes in give the same digest out on every machine


class BlobWriter:
    """Stream one blob into a layout; ``commit`` verifies and publishes it.

    Use as a context manager: leaving the block without ``commit`` (an exception, a
    digest mismatch) deletes the temporary file, so nothing unverified is ever kept."""

    def __init__(self, layout: OciLayout) -> None:
        self._layout = layout
        layout.blobs_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".ingest-", dir=layout.blobs_dir)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._sha = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> int:
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def commit(
        self,
        media_type: str,
        expected: Descriptor | None = None,
        source: str = "the layout",
    ) -> Descriptor:
        """Publish the blob under its digest; with ``expected``, only if it matches."""
        self._file.close()
        digest = self.digest
        if expected is not None and (expected.digest != digest or expected.size != self.size):
            self._tmp.unlink(missing_ok=True)
            self._done = True
            raise mismatch(
                source, expected.digest, expected.size, actual=digest, actual_size=self.size
            )
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self._layout.blob_path(digest))
        self._done = True
        return Descriptor(media_type, digest, self.size)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


class OciLayout:
    """One OCI image layout directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- creating and opening ----------------------------------------------------------

    @classmethod
    def create(cls, path: Path) -> OciLayout:
        """Open the layout at ``path``, creating an empty one if there is none."""
        layout = cls(path)
        layout.blobs_dir.mkdir(parents=True, exist_ok=True)
        marker = layout.path / LAYOUT_FILE
        if not marker.exists():
            write_atomic(marker, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
        if not layout.index_path.exists():
            write_atomic(layout.index_path, canonical_json(index_document([])))
        return layout

    @classmethod
    def open(cls, path: Path) -> OciLayout:
        """An existing layout; LayoutInvalid when ``path`` is not one."""
        layout = cls(path)
        try:
            marker = json.loads((layout.path / LAYOUT_FILE).read_bytes())
        except (OSError, ValueError) as exc:
            raise LayoutInvalid(
                f"{path} is not an OCI image layout (no readable {LAYOUT_FILE} file)",
                hint="give a directory written by 'ember.client.oci' or 'skopeo copy ... oci:DIR'",
                detail={"path": str(path)},
            ) from exc
        if not isinstance(marker, dict) or marker.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise LayoutInvalid(f"{path}/{LAYOUT_FILE}: unsupported imageLayoutVersion")
        layout.index()  # parses, or raises
        return layout

    @property
    def index_path(self) -> Path:
        return self.path / "index.json"

    @property
    def blobs_dir(self) -> Path:
        return self.path / "blobs" / "sha256"

    # -- blobs -----------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / check_digest(digest).split(":", 1)[1]

    def has_blob(self, desc: Descriptor) -> bool:
        """Is the blob here with the right size? (The digest is its name; ``verify``
        re-hashes the content.)"""
        try:
            return self.blob_path(desc.digest).stat().st_size == desc.size
        except FileNotFoundError:
            return False

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def write_blob(self, data: bytes, media_type: str) -> Descriptor:
        with self.writer() as w:
            w.write(data)
            return w.commit(media_type)

    def ingest(self, desc: Descriptor, chunks: Iterable[bytes], source: str) -> Descriptor:
        """Stream ``chunks`` in as ``desc``; DigestMismatch (and nothing kept) unless the
        bytes are exactly ``desc``. Stops reading as soon as there are too many bytes."""
        with self.writer() as w:
            for chunk in chunks:
                if w.size + len(chunk) > desc.size:
                    w.write(chunk)
                    raise mismatch(source, desc.digest, desc.size, actual_size=w.size)
                w.write(chunk)
            return w.commit(desc.media_type, expected=desc, source=source)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        try:
            return self.blob_path(desc.digest).open("rb")
        except FileNotFoundError as exc:
            raise LayoutInvalid(
                f"{self.path}: blob {desc.digest} is missing",
                detail={"digest": desc.digest, "path": str(self.path)},
            ) from exc

    def iter_blob(self, desc: Descriptor, *, verify: bool = True) -> Iterator[bytes]:
        """The blob's bytes in chunks; with ``verify`` the last chunk is only yielded
        after digest and size were checked (DigestMismatch otherwise)."""
        sha = hashlib.sha256()
        size = 0
        pending = b""
        with self.open_blob(desc) as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
                if pending:
                    yield pending
                pending = chunk
        if verify and ("sha256:" + sha.hexdigest() != desc.digest or size != desc.size):
            raise mismatch(
                str(self.blob_path(desc.digest)),
                desc.digest,
                desc.size,
                actual="sha256:" + sha.hexdigest(),
                actual_size=size,
            )
        if pending:
            yield pending

    def read_blob(self, desc: Descriptor, *, limit: int | None = None) -> bytes:
        """A (small) blob's bytes, verified."""
        if limit is not None and desc.size > limit:
            raise LayoutInvalid(f"{desc.digest} is {desc.size} bytes, more than {limit}")
        with self.open_blob(desc) as f:
            data = f.read()
        verify_bytes(data, desc, str(self.blob_path(desc.digest)))
        return data

    # -- the index -------------------------------------------------------------------

    def index(self) -> list[Descriptor]:
        """The manifests ``index.json`` lists, in order."""
        try:
            doc = parse_manifest(self.index_path.read_bytes(), None, f"{self.path}/index.json")
        except OSError as exc:
            raise LayoutInvalid(f"{self.path}: no readable index.json") from exc
        if doc["mediaType"] not in INDEXES:
            raise LayoutInvalid(f"{self.path}/index.json is not an image index")
        return children(doc, "index.json")[1]

    def add_manifest(self, desc: Descriptor, ref_name: str | None = None) -> Descriptor:
        """List ``desc`` in index.json (as ``ref_name``, which moves from any other entry).
        Idempotent; the manifest blob must be in the layout already."""
        if not self.has_blob(desc):
            raise LayoutInvalid(f"{self.path}: cannot list {desc.digest}: its blob is missing")
        annotations = {k: v for k, v in desc.annotations.items() if k != REF_NAME}
        if ref_name:
            annotations[REF_NAME] = ref_name
        entry = desc.with_annotations(annotations)
        kept = [
            m
            for m in self.index()
            if not (ref_name and m.ref_name == ref_name)
            and not (m.digest == desc.digest and m.ref_name == entry.ref_name)
        ]
        write_atomic(self.index_path, canonical_json(index_document([*kept, entry])))
        return entry

    def resolve(self, ref_name: str | None = None) -> Descriptor:
        """The index entry named ``ref_name``; without a name, the only entry there is."""
        entries = self.index()
        if ref_name is not None:
            for entry in entries:
                if ref_name in (entry.ref_name, entry.digest):
                    return entry
            names = sorted({e.ref_name for e in entries if e.ref_name})
            raise LayoutInvalid(
                f"{self.path} has no image named {ref_name!r}",
                hint=f"names in this layout: {', '.join(names) or 'none'}",
                detail={"ref_name": ref_name, "names": names},
            )
        if len(entries) != 1:
            names = sorted({e.ref_name or e.digest for e in entries})
            raise LayoutInvalid(
                f"{self.path} holds {len(entries)} images; say which one",
                hint=f"name one of: {', '.join(names) or '(the layout is empty)'}",
                detail={"names": names},
            )
        return entries[0]

    # -- manifests -------------------------------------------------------------------

    def manifest(self, desc: Descriptor) -> dict[str, Any]:
        """The parsed manifest or index ``desc`` names, verified."""
        data = self.read_blob(desc, limit=MAX_MANIFEST_BYTES)
        return parse_manifest(data, desc.media_type, desc.digest)

    def walk(self, desc: Descriptor) -> Iterator[tuple[Descriptor, dict[str, Any] | None]]:
        """Every descriptor reachable from ``desc``, children before their parents:
        ``(blob, None)`` for config and layers, ``(manifest, parsed)`` for manifests."""
        doc = self.manifest(desc)
        blobs, manifests = children(doc, desc.digest)
        for child in manifests:
            yield from self.walk(child)
        for blob in blobs:
            yield blob, None
        yield desc, doc

    def verify(self, desc: Descriptor | None = None) -> list[Descriptor]:
        """Re-hash every blob reachable from ``desc`` (default: every listed image);
        return them. DigestMismatch or LayoutInvalid on the first bad one."""
        roots = [desc] if desc is not None else self.index()
        seen: dict[str, Descriptor] = {}
        for root in roots:
            for item, doc in self.walk(root):
                if item.digest in seen:
                    continue
                if doc is None:
                    for _ in self.iter_blob(item):
                        pass
                seen[item.digest] = item
        return list(seen.values())

    def image_config(self, desc: Descriptor) -> dict[str, Any]:
        """The image config of an image manifest, parsed and verified."""
        doc = self.manifest(desc)
        if doc["mediaType"] not in IMAGE_MANIFESTS:
            raise LayoutInvalid(f"{desc.digest} is an index, not an image manifest")
        config = Descriptor.from_json(doc.get("config"), "config")
        parsed = json.loads(self.read_blob(config, limit=MAX_MANIFEST_BYTES))
        if not isinstance(parsed, dict):
            raise LayoutInvalid(f"{config.digest}: the image config is not a JSON object")
        return parsed


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically. The temporary file has a unique name:
    concurrent writers of one path (two processes opening the same layout) must not
    rename each other's half-written files away."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- archives ---------------------------------------------------------------------------


def _tar_info(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(
    layout: OciLayout,
    dest: Path | BinaryIO,
    images: Sequence[Descriptor] | None = None,
    *,
    repo_tags: Sequence[str] = (),
) -> None:
    """Write ``images`` (default: all the layout lists) as a deterministic tar archive:
    the OCI layout plus a Docker ``manifest.json`` for the image manifests among them
    (``repo_tags``, e.g. ``hello:latest``, go to the first one)."""
    roots = list(images) if images is not None else layout.index()
    blobs: dict[str, Descriptor] = {}
    docker: list[dict[str, Any]] = []
    for root in roots:
        for item, doc in layout.walk(root):
            blobs.setdefault(item.digest, item)
            if doc is not None and doc["mediaType"] in IMAGE_MANIFESTS and item in roots:
                layers = [Descriptor.from_json(e) for e in doc["layers"]]
                config = Descriptor.from_json(doc["config"])
                docker.append(
                    {
                        "Config": f"blobs/sha256/{config.hex}",
                        "RepoTags": list(repo_tags) if not docker else [],
                        "Layers": [f"blobs/sha256/{x.hex}" for x in layers],
                    }
                )
    try:
        opened = open(dest, "wb") if isinstance(dest, Path) else contextlib.nullcontext(dest)  # noqa: SIM115
        with opened as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in ("blobs", "blobs/sha256"):
                tar.addfile(_tar_info(name, 0, directory=True))
            for digest in sorted(blobs):
                desc = blobs[digest]
                with layout.open_blob(desc) as f:
                    reader = _VerifyingReader(f, desc, str(layout.blob_path(desc.digest)))
                    tar.addfile(_tar_info(f"blobs/sha256/{desc.hex}", desc.size), reader)
                    reader.check()
            for name, data in (
                ("index.json", canonical_json(index_document(roots))),
                ("manifest.json", canonical_json(docker)),
                (LAYOUT_FILE, canonical_json({"imageLayoutVersion": LAYOUT_VERSION})),
            ):
                tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
    except BaseException:
        if isinstance(dest, Path):
            dest.unlink(missing_ok=True)  # never leave an archive with unverified content
        raise


class _VerifyingReader:
    """Reads a blob for tarfile, hashing it; ``check`` raises DigestMismatch if it was bad."""

    def __init__(self, f: BinaryIO, desc: Descriptor, source: str) -> None:
        self._f, self._desc, self._source = f, desc, source
        self._sha = hashlib.sha256()
        self._size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if not data and n != 0 and self._size < self._desc.size:
            raise mismatch(self._source, self._desc.digest, self._desc.size, actual_size=self._size)
        self._sha.update(data)
        self._size += len(data)
        return data

    def check(self) -> None:
        actual = "sha256:" + self._sha.hexdigest()
        if actual != self._desc.digest or self._size != self._desc.size:
            raise mismatch(
                self._source,
                self._desc.digest,
                self._desc.size,
                actual=actual,
                actual_size=self._size,
            )


def import_archive(src: Path, dest: Path) -> tuple[OciLayout, list[Descriptor]]:
    """Read an OCI or ``docker save`` archive (plain or gzip'd tar) into the layout at
    ``dest``; return the layout and the images the archive names, each listed in the
    layout's index. Every blob is verified on the way in."""
    try:
        tar = tarfile.open(src, mode="r:*")  # noqa: SIM115 - closed just below
    except (OSError, tarfile.TarError) as exc:
        raise LayoutInvalid(
            f"{src} is not a readable tar archive: {exc}",
            hint="give an OCI layout directory, an OCI archive or a 'docker save' tar",
            detail={"path": str(src)},
        ) from exc
    try:
        with tar:
            members = {_norm(m.name): m for m in tar.getmembers()}
            layout = OciLayout.create(dest)
            if LAYOUT_FILE in members and "index.json" in members:
                return layout, _import_oci(tar, members, layout, src)
            if "manifest.json" in members:
                return layout, _import_docker(tar, members, layout, src)
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeDecodeError) as exc:
        # A truncated or corrupt archive (or layer inside it) is bad input, not a crash.
        raise LayoutInvalid(
            f"{src} is damaged: {type(exc).__name__}: {exc}",
            hint="re-create the archive ('docker save' or an OCI export) and try again",
            detail={"path": str(src)},
        ) from exc
    raise LayoutInvalid(
        f"{src} holds neither an OCI layout (oci-layout, index.json) nor a 'docker save' "
        "manifest.json",
        detail={"path": str(src)},
    )


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _member_bytes(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, src: Path
) -> bytes:
    f = _member_file(tar, members, name, src)
    with f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise LayoutInvalid(f"{src}: {name} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def _member_file(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, src: Path
) -> IO[bytes]:
    member = members.get(_norm(name))
    f = tar.extractfile(member) if member is not None else None
    if f is None:
        raise LayoutInvalid(f"{src}: {name} is missing from the archive", detail={"path": name})
    return f


def _import_oci(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], layout: OciLayout, src: Path
) -> list[Descriptor]:
    index = parse_manifest(_member_bytes(tar, members, "index.json", src), None, "index.json")
    roots = children(index, "index.json")[1]

    def copy(desc: Descriptor) -> None:
        if layout.has_blob(desc):
            return
        with _member_file(tar, members, f"blobs/sha256/{desc.hex}", src) as f:
            layout.ingest(desc, iter(lambda: f.read(CHUNK), b""), f"{src}:{desc.digest}")

    def copy_tree(desc: Descriptor) -> None:
        copy(desc)
        blobs, manifests = children(layout.manifest(desc), desc.digest)
        for child in manifests:
            copy_tree(child)
        for blob in blobs:
            copy(blob)

    for root in roots:
        copy_tree(root)
        layout.add_manifest(root, root.ref_name)
    return roots


def _import_docker(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], layout: OciLayout, src: Path
) -> list[Descriptor]:
    try:
        entries = json.loads(_member_bytes(tar, members, "manifest.json", src))
    except ValueError as exc:
        raise LayoutInvalid(f"{src}: manifest.json is not JSON") from exc
    if not isinstance(entries, list) or not entries:
        raise LayoutInvalid(f"{src}: manifest.json lists no image")
    out = []
    for i, entry in enumerate(entries):
        where = f"{src}: manifest.json[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise LayoutInvalid(f"{where}: no Config")
        layers = entry.get("Layers")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise LayoutInvalid(f"{where}: Layers is not a list of paths")
        config_bytes = _member_bytes(tar, members, entry["Config"], src)
        try:
            config = json.loads(config_bytes)
            diff_ids = config["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LayoutInvalid(f"{where}: the image config has no rootfs.diff_ids") from exc
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise LayoutInvalid(f"{where}: {len(layers)} layers but {len(diff_ids)} diff_ids")
        config_desc = layout.write_blob(config_bytes, OCI_CONFIG)
        layer_descs = []
        for path, diff_id in zip(layers, diff_ids, strict=True):
            with _member_file(tar, members, path, src) as f:
                layer_descs.append(_layer_from_docker(layout, f, str(diff_id), f"{src}:{path}"))
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [d.to_json() for d in layer_descs],
        }
        desc = layout.write_blob(canonical_json(manifest), OCI_MANIFEST)
        tags = entry.get("RepoTags") or []
        ref_name = str(tags[0]) if tags else None
        out.append(layout.add_manifest(desc, ref_name))
    return out


class _Hashing(io.RawIOBase):
    """A write-only sink that hashes what passes through to ``target``."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = bytes(data)
        self.sha.update(view)
        self.size += len(view)
        self.target.write(view)
        return len(view)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def _layer_from_docker(layout: OciLayout, f: IO[bytes], diff_id: str, source: str) -> Descriptor:
    """A docker layer (a tar, or an already gzip'd tar) as an OCI gzip layer blob whose
    uncompressed content must hash to ``diff_id``."""
    head = f.read(2)
    with layout.writer() as w:
        if head == b"\x1f\x8b":
            gunzip = _GunzipHasher()
            for chunk in _chain(head, f):
                w.write(chunk)
                gunzip.feed(chunk)
            actual = gunzip.digest
        else:
            hasher = _Hashing(None)
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=w, mtime=0, compresslevel=GZIP_LEVEL
            ) as gz:
                for chunk in _chain(head, f):
                    hasher.sha.update(chunk)
                    gz.write(chunk)
            actual = hasher.digest
        if actual != diff_id:
            raise mismatch(source, diff_id, None, actual=actual)
        return w.commit(OCI_LAYER_GZIP)


class _GunzipHasher:
    """sha256 of the decompressed content of a (possibly multi-member) gzip stream."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> None:
        while data:
            self.sha.update(self._z.decompress(data))
            if not self._z.eof:
                return
            data = self._z.unused_data
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def _chain(head: bytes, f: IO[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    while chunk := f.read(CHUNK):
        yield chunk


def copy_layout(src: OciLayout, dest: OciLayout, desc: Descriptor, ref_name: str | None) -> None:
    """Copy one image (and everything it references) between layouts, verifying."""
    for item, _ in src.walk(desc):
        if not dest.has_blob(item):
            dest.ingest(item, src.iter_blob(item), str(src.blob_path(item.digest)))
    dest.add_manifest(desc, ref_name)
