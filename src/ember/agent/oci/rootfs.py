"""Turn an unpacked image directory into an ext4 image file with ``mkfs.ext4 -d``.

Nothing is mounted: e2fsprogs copies the tree (ownership, modes, times, symlinks, hard
links, device nodes, FIFOs, extended attributes) into a fresh filesystem in a regular
file. The file is sparse: only the blocks mkfs wrote take disk space.

Sizing: the content (regular files rounded up to 4 KiB blocks, one block per directory
and per long symlink, 256 bytes per inode) times 1.3, plus ``margin`` (default 64 MiB:
the journal, metadata, and room for the workload to write). Inodes: the number of
entries times 1.3 plus 16384 spare ones, so trees of many small files never run out. If
mkfs still finds no room, it is run once more with twice the size (and twice the inodes
when those ran out).

Mount points: before mkfs, ``ensure_mount_points`` creates what the platform init
mounts on and the image may lack: ``/dev``, ``/proc``, ``/sys``, ``/run`` (0755/0555)
and ``/tmp`` (1777). Existing entries (of any type) are left as the image made them.
Nothing else is added: ``/etc/hosts``, ``/etc/resolv.conf`` and the like are the init's
business at boot (from the config drive).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import stat
import subprocess
from pathlib import Path

from ember.agent.oci.errors import RootfsBuildFailed, ToolMissing

BLOCK = 4096
INODE_SIZE = 256
MIB = 1024 * 1024
DEFAULT_MARGIN = 64 * MIB
SPARE_INODES = 16384
GROWTH = 1.3
LABEL = "ember-rootfs"
MKFS_TIMEOUT_S = 600.0
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

MOUNT_POINTS: tuple[tuple[str, int], ...] = (
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
)


def find_tool(name: str) -> str:
    """The path of an e2fsprogs program (they live in /sbin, often not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise ToolMissing(
        f"{name} is not installed",
        hint="install Debian's e2fsprogs package ('make bootstrap' does)",
        detail={"tool": name},
    )


def ensure_mount_points(root: Path) -> list[str]:
    """Create the platform's mount points the image lacks; return the ones created."""
    made = []
    for name, mode in MOUNT_POINTS:
        path = root / name
        if os.path.lexists(path):
            continue
        path.mkdir()
        os.chmod(path, mode)
        made.append(f"/{name}")
    return made


@dataclasses.dataclass(frozen=True)
class TreeSize:
    content_bytes: int
    """Bytes the tree takes in 4 KiB blocks (hard-linked files counted once)."""
    entries: int

    def image_bytes(self, margin: int) -> int:
        """The filesystem size for this tree: (content + inode tables) x 1.3 + margin,
        rounded up to a MiB."""
        inodes = self.inodes()
        raw = (self.content_bytes + inodes * INODE_SIZE) * GROWTH + margin
        return math.ceil(raw / MIB) * MIB

    def inodes(self) -> int:
        return math.ceil(self.entries * GROWTH) + SPARE_INODES


def measure(root: Path) -> TreeSize:
    """Walk the tree without following symlinks."""
    content = 0
    entries = 1
    seen: set[tuple[int, int]] = set()
    for directory, dirs, files in os.walk(root):
        content += BLOCK
        for name in dirs + files:
            st = os.lstat(os.path.join(directory, name))
            entries += 1
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                content += -(-st.st_size // BLOCK) * BLOCK
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                content += BLOCK  # short targets live in the inode itself
    return TreeSize(content, entries)


def build_ext4(staging: Path, dest: Path, *, margin: int = DEFAULT_MARGIN) -> int:
    """Write an ext4 image of ``staging`` to ``dest`` (which must not exist); return its
    size in bytes. RootfsBuildFailed (and no ``dest``) when mkfs fails."""
    mkfs = find_tool("mkfs.ext4")
    tree = measure(staging)
    size, inodes = tree.image_bytes(margin), tree.inodes()
    try:
        try:
            _mkfs(mkfs, staging, dest, size, inodes)
        except RootfsBuildFailed as exc:
            if not exc.detail.get("no_space"):
                raise
            dest.unlink(missing_ok=True)
            # The estimate was short: twice the room (and inodes if those ran out).
            if exc.detail.get("no_inodes"):
                inodes *= 2
            size *= 2
            _mkfs(mkfs, staging, dest, size, inodes)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size


def _mkfs(mkfs: str, staging: Path, dest: Path, size: int, inodes: int) -> None:
    command = [
        mkfs,
        "-q",
        "-F",
        "-b",
        str(BLOCK),
        "-I",
        str(INODE_SIZE),
        "-N",
        str(inodes),
        "-m",
        "0",
        "-L",
        LABEL,
        "-E",
        "root_owner=0:0",
        "-d",
        str(staging),
        str(dest),
        f"{size // 1024}k",
    ]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=MKFS_TIMEOUT_S,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RootfsBuildFailed(
            f"mkfs.ext4 did not finish within {MKFS_TIMEOUT_S:.0f}s",
            detail={"command": command},
        ) from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).decode(errors="replace").strip()
        no_space = "Could not allocate" in output or "No space left" in output
        raise RootfsBuildFailed(
            f"mkfs.ext4 failed (exit {done.returncode}): {output[-500:]}",
            hint="see the message; the staging tree may hold something e2fsprogs cannot copy",
            detail={
                "exit_code": done.returncode,
                "no_space": no_space,
                "no_inodes": "allocate inode" in output,
                "size": size,
            },
        )
