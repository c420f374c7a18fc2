"""Apply OCI image layers, bottom first, onto one directory: a guarded tar extractor.

Python's ``tarfile.extractall`` is not used: its ``data`` filter (3.11.4+) refuses device
nodes and drops setuid bits and ownership, and without a filter it follows symlinks out
of the target. This extractor reads each layer once, in stream order, and:

- **stays inside the root.** An absolute entry name or one with a ``..`` component is
  refused (``image.layer_unsafe``). Every entry's parent directory is resolved
  component by component *inside the image*, the way the guest will see it: a symlink
  on the way is followed with its target taken relative to the image root (absolute
  targets) or to its directory (relative ones); a target that climbs above the root, or
  more than 40 links in a row, is refused. The last component is never followed: a
  file written over a symlink replaces the symlink. Hard link targets are resolved the
  same way and must already exist (below the root, not a directory).
- **applies the layer changeset rules** (image-spec ``layer.md``). ``.wh.<name>``
  deletes ``<name>`` as the lower layers left it; ``.wh..wh..opq`` hides everything the
  lower layers put in its directory. A whiteout only ever affects lower layers, so what
  this layer itself writes stays, wherever the marker sits in the tar: the extractor
  remembers the paths (and their parent directories) the current layer wrote and
  spares them. Other ``.wh..wh.*`` names (aufs metadata) are ignored; a whiteout of
  ``.``, ``..`` or an empty name is refused. Markers are never written out.
- **keeps what the image says.** Numeric uid/gid (names are ignored: the image's own
  ``/etc/passwd`` maps them), permission bits including setuid/setgid/sticky, mtimes,
  symlinks as they are, hard links as links, FIFOs, and ``SCHILY.xattr.*`` extended
  attributes (file capabilities; ``trusted.*`` excepted). Ownership, xattrs and device
  nodes need root: as root they are applied/created (the staging directory sits in a
  0700 directory, so a device node there is reachable by root only); otherwise they are
  skipped and counted in ``UnpackStats``, and the result is only good for tests.
  Directory modes and mtimes are applied last (``finish``), so a read-only directory
  can still receive later entries and children do not disturb the times.
- **checks digests on the way.** ``apply_layer`` hashes the compressed blob (its
  descriptor digest) and the uncompressed tar (the config's ``diff_id``) as they
  stream; a mismatch raises ``oci.digest_mismatch`` once the layer was read (the caller
  throws the staging directory away).

Compression is detected from the content (gzip ``1f 8b``, zstd ``28 b5 2f fd``,
otherwise a plain tar) after the media type was checked to be a layer type:
``tar``, ``tar+gzip``, ``tar+zstd`` (OCI) and Docker's ``tar.gzip``. zstd needs the
``zstd`` program (the standard library of Python 3.11 has no zstd); without it a zstd
layer is ``image.tool_missing``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

from ember.agent.oci.errors import (
    ImageError,
    LayerInvalid,
    LayerUnsafe,
    LayerUnsupported,
    ToolMissing,
)
from ember.client.oci.errors import DigestMismatch
from ember.client.oci.media import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, mismatch

OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_MEDIA_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP})

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_LINKS = 40  # as the kernel's ELOOP limit
CHUNK = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Never applied from a layer: overlayfs keeps its own state in trusted.overlay.*.
SKIPPED_XATTR_PREFIXES = ("trusted.",)
XATTR_PAX = "SCHILY.xattr."


@dataclasses.dataclass
class UnpackStats:
    layers: int = 0
    entries: int = 0
    files: int = 0
    file_bytes: int = 0
    whiteouts: int = 0
    skipped_devices: int = 0
    """Device nodes not created (not root)."""
    skipped_ownership: int = 0
    """Entries whose uid/gid/xattrs were not applied (not root)."""


def _parts(name: str, source: str, what: str = "entry") -> list[str]:
    """The components of an archive path; LayerUnsafe for absolute paths and ``..``."""
    if name.startswith("/"):
        raise LayerUnsafe(
            f"{source}: {what} {name!r} is an absolute path",
            hint="layer entries must be relative to the image root; rebuild the image",
            detail={"entry": name, "source": source, "reason": "absolute"},
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerUnsafe(
            f"{source}: {what} {name!r} climbs out of the image root with '..'",
            hint="layer entries must stay below the image root; rebuild the image",
            detail={"entry": name, "source": source, "reason": "dotdot"},
        )
    return parts


class Unpacker:
    """Applies layers (uncompressed tar streams), bottom first, onto ``root``.

    ``privileged`` (default: running as root) decides whether ownership, xattrs and
    device nodes are applied. Call ``finish`` once after the last layer."""

    def __init__(self, root: Path, *, privileged: bool | None = None) -> None:
        self.root = str(root)
        self.privileged = os.geteuid() == 0 if privileged is None else privileged
        self.stats = UnpackStats()
        # key ("a/b", "" for the root) -> (mode, mtime or None), applied by finish()
        self._dirs: dict[str, tuple[int, float | None]] = {}
        # paths the current layer wrote (and their parents): its whiteouts spare them
        self._written: set[str] = set()
        self._source = ""

    # -- paths -------------------------------------------------------------------------

    def _host(self, rel: list[str]) -> str:
        return os.path.join(self.root, *rel)

    def _resolve_dir(self, parts: list[str], *, create: bool, entry: str) -> list[str] | None:
        """The real (symlink-free) path of directory ``parts`` below the root, following
        symlinks inside the image; missing directories are created (mode 0755) when
        ``create``, else None is returned."""
        done: list[str] = []
        todo = list(reversed(parts))
        hops = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":  # only ever from a symlink's target: entry names have none
                if not done:
                    raise LayerUnsafe(
                        f"{self._source}: entry {entry!r} goes through a symlink that "
                        "leads out of the image root",
                        hint="a symlink the entry's path goes through points above '/'; "
                        "rebuild the image",
                        detail={"entry": entry, "source": self._source, "reason": "symlink"},
                    )
                done.pop()
                continue
            path = self._host([*done, comp])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(path, 0o755)
                self._dirs["/".join([*done, comp])] = (0o755, None)
                done.append(comp)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_LINKS:
                    raise LayerUnsafe(
                        f"{self._source}: entry {entry!r}: more than {MAX_LINKS} symlinks "
                        "on its path (a loop?)",
                        detail={"entry": entry, "source": self._source, "reason": "loop"},
                    )
                target = os.readlink(path)
                if target.startswith("/"):
                    done = []  # absolute: from the image's root, as the guest sees it
                todo.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise LayerInvalid(
                    f"{self._source}: entry {entry!r}: {'/'.join([*done, comp])} is not a "
                    "directory",
                    detail={"entry": entry, "source": self._source},
                )
            done.append(comp)
        return done

    def _mark(self, rel: list[str]) -> None:
        for i in range(len(rel) + 1):
            self._written.add("/".join(rel[:i]))

    # -- layers ------------------------------------------------------------------------

    def apply(self, tar_stream: IO[bytes], source: str = "layer") -> None:
        """Apply one uncompressed layer tar read from ``tar_stream`` (in stream order)."""
        self._source = source
        self._written = set()
        try:
            with tarfile.open(fileobj=tar_stream, mode="r|") as tar:
                for member in tar:
                    self._entry(tar, member)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise LayerInvalid(
                f"{source} is not a readable layer: {type(exc).__name__}: {exc}",
                detail={"source": source},
            ) from exc
        self.stats.layers += 1

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.stats.entries += 1
        parts = _parts(m.name, self._source)
        if not parts:  # "./": the root directory itself
            if not m.isdir():
                raise LayerInvalid(f"{self._source}: the root entry is not a directory")
            self._owner(self.root, m)
            self._dirs[""] = (m.mode & 0o7777, m.mtime)
            return
        *parent, name = parts
        if name.startswith(WHITEOUT):
            self._whiteout(parent, name, m.name)
            return
        pdir = self._resolve_dir(parent, create=True, entry=m.name)
        assert pdir is not None
        rel = [*pdir, name]
        self._mark(rel)
        dest = self._host(rel)
        try:
            existing: os.stat_result | None = os.lstat(dest)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
            _remove(dest, existing)
            existing = None
        self._create(tar, m, "/".join(rel), existing)

    def _create(
        self, tar: tarfile.TarFile, m: tarfile.TarInfo, key: str, existing: os.stat_result | None
    ) -> None:
        dest = os.path.join(self.root, key)
        if m.isdir():
            if existing is None:
                os.mkdir(dest, 0o755)
            self._owner(dest, m)
            self._dirs[key] = (m.mode & 0o7777, m.mtime)
        elif m.isreg():
            source = tar.extractfile(m)
            if source is None:  # pragma: no cover - isreg() members always have data
                raise LayerInvalid(f"{self._source}: no data for {m.name!r}")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out, source:
                shutil.copyfileobj(source, out, CHUNK)
            self.stats.files += 1
            self.stats.file_bytes += m.size
            self._finish_entry(dest, m)
        elif m.issym():
            os.symlink(m.linkname, dest)
            self._owner(dest, m)
            _set_mtime(dest, m.mtime)
        elif m.islnk():
            os.link(self._link_target(m), dest, follow_symlinks=False)
        elif m.ischr() or m.isblk():
            if not self.privileged:
                self.stats.skipped_devices += 1
                return
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(dest, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            self._finish_entry(dest, m)
        elif m.isfifo():
            os.mkfifo(dest, 0o600)
            self._finish_entry(dest, m)
        else:
            raise LayerInvalid(
                f"{self._source}: entry {m.name!r} has an unsupported type {m.type!r}",
                detail={"entry": m.name, "source": self._source},
            )

    def _link_target(self, m: tarfile.TarInfo) -> str:
        parts = _parts(m.linkname, self._source, "hard link target")
        if not parts:
            raise LayerInvalid(f"{self._source}: hard link {m.name!r} points at the root")
        *parent, name = parts
        pdir = self._resolve_dir(parent, create=False, entry=m.name)
        path = self._host([*pdir, name]) if pdir is not None else None
        try:
            st = os.lstat(path) if path is not None else None
        except FileNotFoundError:
            st = None
        if path is None or st is None:
            raise LayerInvalid(
                f"{self._source}: hard link {m.name!r} points at {m.linkname!r}, "
                "which does not exist",
                detail={"entry": m.name, "source": self._source},
            )
        if stat.S_ISDIR(st.st_mode):
            raise LayerInvalid(
                f"{self._source}: hard link {m.name!r} points at a directory",
                detail={"entry": m.name, "source": self._source},
            )
        return path

    def _whiteout(self, parent: list[str], name: str, entry: str) -> None:
        self.stats.whiteouts += 1
        if name == OPAQUE:
            pdir = self._resolve_dir(parent, create=True, entry=entry)
            assert pdir is not None
            self._mark(pdir)
            self._prune(pdir)
            return
        if name.startswith(WHITEOUT + WHITEOUT):
            return  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to apply
        victim = name[len(WHITEOUT) :]
        if victim in ("", ".", ".."):
            raise LayerUnsafe(
                f"{self._source}: whiteout {entry!r} names {victim!r}",
                hint="a whiteout must name one entry of its directory; rebuild the image",
                detail={"entry": entry, "source": self._source, "reason": "whiteout"},
            )
        pdir = self._resolve_dir(parent, create=False, entry=entry)
        if pdir is None:
            return  # nothing below it to delete
        rel = [*pdir, victim]
        path = self._host(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if "/".join(rel) in self._written:
            # This layer wrote it: only what lower layers left below it goes.
            if stat.S_ISDIR(st.st_mode):
                self._prune(rel)
            return
        _remove(path, st)

    def _prune(self, rel: list[str]) -> None:
        """Delete what lower layers left below directory ``rel`` (keep this layer's)."""
        for name in os.listdir(self._host(rel)):
            child = [*rel, name]
            path = self._host(child)
            st = os.lstat(path)
            if "/".join(child) in self._written:
                if stat.S_ISDIR(st.st_mode):
                    self._prune(child)
            else:
                _remove(path, st)

    # -- metadata ----------------------------------------------------------------------

    def _owner(self, path: str, m: tarfile.TarInfo) -> None:
        """uid/gid and xattrs: before the mode, as chown clears setuid bits and file
        capabilities."""
        if not self.privileged:
            self.stats.skipped_ownership += 1
            return
        os.lchown(path, m.uid, m.gid)
        for key, value in m.pax_headers.items():
            if not key.startswith(XATTR_PAX):
                continue
            attr = key[len(XATTR_PAX) :]
            if attr.startswith(SKIPPED_XATTR_PREFIXES):
                continue
            try:
                os.setxattr(
                    path, attr, value.encode("utf-8", "surrogateescape"), follow_symlinks=False
                )
            except OSError as exc:
                raise LayerInvalid(
                    f"{self._source}: cannot set xattr {attr} on {m.name!r}: {exc}",
                    detail={"entry": m.name, "source": self._source, "xattr": attr},
                ) from exc

    def _finish_entry(self, path: str, m: tarfile.TarInfo) -> None:
        self._owner(path, m)
        os.chmod(path, m.mode & 0o7777)
        _set_mtime(path, m.mtime)

    def finish(self) -> None:
        """Apply directory modes and mtimes, deepest first (after the last layer)."""
        for key in sorted(self._dirs, key=lambda k: k.count("/") + bool(k), reverse=True):
            mode, mtime = self._dirs[key]
            path = self._host(key.split("/")) if key else self.root
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # whited out later
            if not stat.S_ISDIR(st.st_mode):
                continue  # replaced by a non-directory later
            os.chmod(path, mode)
            if mtime is not None:
                _set_mtime(path, mtime)
        self._dirs.clear()


def _remove(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _set_mtime(path: str, mtime: float) -> None:
    with contextlib.suppress(OverflowError, ValueError, OSError):
        os.utime(path, (mtime, mtime), follow_symlinks=False)


# -- compressed blobs ----------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Hashing(io.RawIOBase):
    """A reader that hashes (sha256) and counts what is read through it."""

    def __init__(self, f: _Readable) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._f.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def check_media_type(media_type: str, source: str) -> None:
    if media_type not in LAYER_MEDIA_TYPES:
        raise LayerUnsupported(
            f"{source}: layer media type {media_type!r} is not supported",
            hint="Ember unpacks OCI tar, tar+gzip and tar+zstd layers and Docker tar.gzip "
            "layers; rebuild the image with one of those",
            detail={"media_type": media_type, "source": source},
        )


def zstd_binary() -> str | None:
    return shutil.which("zstd") or next(
        (p for p in ("/usr/bin/zstd", "/bin/zstd") if os.access(p, os.X_OK)), None
    )


@contextlib.contextmanager
def _zstd_stream(blob: Path, source: str) -> Iterator[IO[bytes]]:
    binary = zstd_binary()
    if binary is None:
        raise ToolMissing(
            f"{source} is zstd-compressed and the zstd program is not installed",
            hint="install Debian's zstd package ('make bootstrap' does)",
            detail={"tool": "zstd", "source": source},
        )
    proc = subprocess.Popen(
        [binary, "-d", "-c", "-q", "--", str(blob)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    ok = False
    try:
        yield proc.stdout
        ok = True
    finally:
        if not ok:
            proc.kill()
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise LayerInvalid(
            f"{source} is not a valid zstd stream: {err[-300:] or f'zstd exited {code}'}",
            detail={"source": source},
        )


def apply_layer(
    unpacker: Unpacker,
    blob: Path,
    media_type: str,
    *,
    digest: str | None = None,
    size: int | None = None,
    diff_id: str | None = None,
    source: str = "layer",
) -> None:
    """Apply the layer blob at ``blob`` (compression detected from its content). With
    ``digest``/``size`` the blob is re-hashed as it is read, with ``diff_id`` the
    uncompressed tar too; a mismatch raises DigestMismatch after the layer was applied,
    so the caller must discard the staging directory on any error."""
    check_media_type(media_type, source)
    try:
        packed = _apply_blob(unpacker, blob, diff_id, source)
    except (ImageError, DigestMismatch) as exc:
        # Damaged content explains any failure to read it: say so (the caller evicts a
        # damaged cache copy on DigestMismatch, never on a layer error).
        if digest is not None:
            whole = _hash_file(blob)
            if whole.digest != digest or (size is not None and size != whole.size):
                raise mismatch(
                    source, digest, size, actual=whole.digest, actual_size=whole.size
                ) from exc
        raise
    if digest is not None and (
        packed.digest != digest or (size is not None and size != packed.size)
    ):
        raise mismatch(source, digest, size, actual=packed.digest, actual_size=packed.size)


def _apply_blob(unpacker: Unpacker, blob: Path, diff_id: str | None, source: str) -> _Hashing:
    with open(blob, "rb") as raw:
        packed = _Hashing(raw)
        reader = io.BufferedReader(packed, CHUNK)
        head = reader.peek(4)[:4]
        if head.startswith(ZSTD_MAGIC):
            # zstd reads the file itself; hash the blob in a pass of its own.
            reader.close()
            packed = _hash_file(blob)
            with _zstd_stream(blob, source) as stream:
                _apply_tar(unpacker, stream, diff_id, source)
        elif head.startswith(GZIP_MAGIC):
            with gzip.GzipFile(fileobj=reader, mode="rb") as gz:
                _apply_tar(unpacker, gz, diff_id, source)
            reader.read()  # anything after the gzip members still counts for the digest
        else:
            _apply_tar(unpacker, reader, diff_id, source)
            reader.read()
    return packed


def _hash_file(path: Path) -> _Hashing:
    with open(path, "rb") as f:
        hashing = _Hashing(f)
        hashing.drain()
    return hashing


def _apply_tar(unpacker: Unpacker, stream: _Readable, diff_id: str | None, source: str) -> None:
    tar = _Hashing(stream)
    buffered = io.BufferedReader(tar, CHUNK)
    try:
        unpacker.apply(buffered, source)
        buffered.read()  # the end-of-archive padding is part of the diff_id
    except (zlib.error, EOFError, gzip.BadGzipFile) as exc:
        raise LayerInvalid(
            f"{source} is not a readable layer: {type(exc).__name__}: {exc}",
            detail={"source": source},
        ) from exc
    if diff_id is not None and tar.digest != diff_id:
        raise mismatch(f"{source} (uncompressed)", diff_id, None, actual=tar.digest)
