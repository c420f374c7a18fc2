"""Build an OCI image from directories, without Docker.

Each directory becomes one layer, in order. The output is a function of the directory
contents and the ``ImageConfig`` only, so the same input gives the same digests on every
run and machine (given the same zlib):

- entries in ``tar --sort=name`` order (depth-first, names sorted in each directory);
- mtime 0, uid/gid 0, no user or group names, no atime/ctime, PAX format;
- permission bits (setuid, setgid, sticky included) kept; hard links within a layer
  stored as links to the first path in that order; symlinks stored as they are;
- gzip with a fixed level, no file name and mtime 0 in its header;
- config, manifest and index as canonical JSON (sorted keys, no whitespace); no
  ``created`` time unless one is given.

Sockets are skipped (they cannot be in a tar); device nodes and FIFOs are kept.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import os
import stat
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ember.client.oci.errors import LayoutInvalid
from ember.client.oci.layout import CHUNK, GZIP_LEVEL, OciLayout, _Hashing
from ember.client.oci.media import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """What the runtime needs to start the image (the ``config`` of an image config)."""

    entrypoint: Sequence[str] | None = None
    cmd: Sequence[str] | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    working_dir: str = "/"
    user: str = ""
    exposed_ports: Sequence[str] = ()
    """``"8080/tcp"`` or ``"8080"`` (tcp)."""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    architecture: str = "amd64"
    os: str = "linux"
    created: datetime.datetime | None = None

    def document(self, diff_ids: Sequence[str], history: Sequence[str]) -> dict[str, Any]:
        """The image config JSON (image-spec ``config.md``)."""
        config: dict[str, Any] = {
            "Env": [f"{k}={v}" for k, v in self.env.items()],
            "WorkingDir": self.working_dir,
        }
        if self.entrypoint is not None:
            config["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            config["Cmd"] = list(self.cmd)
        if self.user:
            config["User"] = self.user
        if self.exposed_ports:
            config["ExposedPorts"] = {
                (p if "/" in p else f"{p}/tcp"): {} for p in self.exposed_ports
            }
        if self.labels:
            config["Labels"] = dict(self.labels)
        doc: dict[str, Any] = {
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created_by": h} for h in history],
        }
        if self.created is not None:
            stamp = self.created.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            doc["created"] = stamp
            for h in doc["history"]:
                h["created"] = stamp
        return doc


@dataclasses.dataclass(frozen=True)
class Layer:
    blob: Descriptor
    diff_id: str
    """sha256 of the uncompressed tar (what the image config lists)."""


def _entries(root: Path, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """``(archive name, path)`` under ``root`` in ``tar --sort=name`` order: depth-first,
    names sorted within each directory, every directory right before what it holds."""
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise LayoutInvalid(f"cannot read {root}: {exc}") from exc
    for name in names:
        path = root / name
        yield f"{prefix}{name}", path
        if stat.S_ISDIR(os.lstat(path).st_mode):
            yield from _entries(path, f"{prefix}{name}/")


def _tarinfo(name: str, path: Path, links: dict[tuple[int, int], str]) -> tarfile.TarInfo | None:
    st = os.lstat(path)
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
    elif stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            info.type = tarfile.LNKTYPE
            info.linkname = links[key]
        else:
            if st.st_nlink > 1:
                links[key] = name
            info.type = tarfile.REGTYPE
            info.size = st.st_size
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None  # a socket: not representable in a tar
    return info


def write_layer(layout: OciLayout, rootfs: Path) -> Layer:
    """Write ``rootfs`` as one deterministic gzip'd tar layer blob into ``layout``."""
    if not rootfs.is_dir():
        raise LayoutInvalid(f"{rootfs} is not a directory", detail={"path": str(rootfs)})
    links: dict[tuple[int, int], str] = {}
    with layout.writer() as blob:
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=GZIP_LEVEL
        ) as gz:
            uncompressed = _Hashing(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name, path in _entries(rootfs):
                    info = _tarinfo(name, path, links)
                    if info is None:
                        continue
                    if info.type == tarfile.REGTYPE:
                        with path.open("rb") as f:
                            tar.addfile(info, _Exactly(f, info.size, path))
                    else:
                        tar.addfile(info)
        desc = blob.commit(OCI_LAYER_GZIP)
    return Layer(desc, uncompressed.digest)


class _Exactly:
    """A file reader that fails loudly if the file changed size while it was archived."""

    def __init__(self, f: Any, size: int, path: Path) -> None:
        self._f, self._left, self._path = f, size, path

    def read(self, n: int = CHUNK) -> bytes:
        data: bytes = self._f.read(min(n, self._left) if n >= 0 else self._left)
        self._left -= len(data)
        if not data and self._left > 0:
            raise LayoutInvalid(f"{self._path} shrank while it was being archived")
        return data


def build_image(
    layout: OciLayout | Path,
    layers: Sequence[Path],
    config: ImageConfig,
    *,
    ref_name: str | None = "latest",
    annotations: Mapping[str, str] | None = None,
) -> Descriptor:
    """Build an image whose layers are ``layers`` (directories, bottom first) into the
    layout (created if missing); list it in index.json as ``ref_name``; return the
    manifest's descriptor."""
    target = layout if isinstance(layout, OciLayout) else OciLayout.create(layout)
    if not layers:
        raise LayoutInvalid("an image needs at least one layer directory")
    built = [write_layer(target, Path(d)) for d in layers]
    history = [f"ember image builder: layer {i + 1} of {len(built)}" for i in range(len(built))]
    config_blob = target.write_blob(
        canonical_json(config.document([x.diff_id for x in built], history)), OCI_CONFIG
    )
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.to_json(),
        "layers": [x.blob.to_json() for x in built],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    desc = target.write_blob(canonical_json(manifest), OCI_MANIFEST)
    return target.add_manifest(desc, ref_name)
