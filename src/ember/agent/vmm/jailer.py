"""Firecracker's jailer: its command line, the chroot it builds, and the uid/gid per VM.

Every Firecracker process is started through the ``jailer`` (ADR-0003), which creates
``<chroot_base>/<exec_file_name>/<jail_id>/root/``, copies the Firecracker binary into it,
creates the VM's cgroup v2 (``<cgroup2 mount>/<parent_cgroup>/<jail_id>``) and writes the
``--cgroup`` values, joins the network namespace, ``pivot_root``\\ s into the chroot, drops
to the VM's own uid/gid and execs Firecracker **in place** (same pid, same stdio) when
neither ``--daemonize`` nor ``--new-pid-ns`` is given. Flags and layout follow
Firecracker's ``docs/jailer.md`` and ``src/jailer/src/main.rs`` (see
docs/operations/firecracker.md for the citations).

The jailer leaves an existing chroot directory alone, so the driver stages it first: the
kernel, initrd and drives are **hard-linked** into ``root/`` (a hard link is the file
itself, so writes to a writable drive land in the agent's image; a bind mount would leak
mounts into the host namespace when a VM is killed, a copy would lose the writes). This
module holds the pure parts (names, paths, argv, cgroup values, the uid allocator) and the
two filesystem steps (``stage_chroot``, ``clear_chroot``).

Paths inside the jail (what Firecracker's API sees, because it runs chrooted)::

    /run/firecracker.socket   API socket (Firecracker's default under the jailer)
    /vmlinux                  kernel        (hard link; must be world-readable or copied)
    /initrd                   initramfs     (idem)
    /drives/<drive_id>        each drive    (hard link, chowned to the VM's uid/gid)
    /firecracker.log          Firecracker's own log (PUT /logger)
    /firecracker.metrics      metrics (PUT /metrics, when enabled)
    /firecracker.pid          written by the jailer (untrusted: the VM's uid owns root/)

Outside ``root/`` (root-owned, invisible to the jailed process) the driver keeps
``ember.json``, its record of the VM (uid, pid, process start time, exit code).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import shutil
import stat
import struct
from collections.abc import Collection
from pathlib import Path

from ember.agent.vmm.base import VmmError, VmSpec

API_SOCKET = "/run/firecracker.socket"
KERNEL = "/vmlinux"
INITRD = "/initrd"
DRIVES_DIR = "/drives"
LOG_FILE = "/firecracker.log"
METRICS_FILE = "/firecracker.metrics"
STATE_FILE = "ember.json"

# The jailer accepts 1-64 characters of [A-Za-z0-9-] as --id (docs/jailer.md).
JAIL_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Ember instance ids are ``ins_<base32>``: the underscore is the only character the jailer
# refuses, so it becomes a hyphen. new_id() never emits a hyphen, so the mapping is 1:1.
VM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Drive and interface ids name files in the jail and URL path segments.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MiB = 1024 * 1024
UID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2)


def jail_id(vm_id: str) -> str:
    """The jailer ``--id`` of a VM: its instance id with ``_`` spelled ``-``."""
    if not VM_ID_RE.match(vm_id):
        raise VmmError(
            f"VM id {vm_id!r} cannot name a Firecracker jail",
            hint="use 1-64 characters of letters, digits, '-' and '_'",
            detail={"vm_id": vm_id},
        )
    out = vm_id.replace("_", "-")
    assert JAIL_ID_RE.match(out)
    return out


@dataclasses.dataclass(frozen=True)
class IdRange:
    """The uids (and the same-numbered gids) handed to VMs, one per running VM.

    The range must belong to no user or group of the host and overlap no ``/etc/subuid``
    range: a VM's uid is its whole identity towards the host kernel."""

    first: int = 10_000_000
    count: int = 100_000

    def __post_init__(self) -> None:
        if self.first < 1 or self.count < 1 or self.first + self.count - 1 > UID_MAX:
            raise ValueError(f"bad uid range {self.first}+{self.count}")

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.first <= value <= self.last


def allocate_id(ids: IdRange, taken: Collection[int]) -> int:
    """The lowest id of ``ids`` not in ``taken`` (pure; the caller serialises calls)."""
    for candidate in range(ids.first, ids.last + 1):
        if candidate not in taken:
            return candidate
    raise VmmError(
        f"all {ids.count} uids of the Firecracker range {ids.first}-{ids.last} are in use",
        hint="stop VMs or widen the jailer uid range",
        detail={"first": ids.first, "count": ids.count},
    )


@dataclasses.dataclass(frozen=True)
class JailerConfig:
    """How this host runs the jailer (read once at the agent's entry point)."""

    jailer_bin: Path = Path("/usr/local/bin/jailer")
    firecracker_bin: Path = Path("/usr/local/bin/firecracker")
    """Its file name must contain ``firecracker`` (the jailer enforces it) and names the
    chroot's middle directory and the default parent cgroup."""
    chroot_base: Path = Path("/srv/jailer")
    """Must be on the filesystem of the agent's images (hard links), mounted without
    ``nodev`` and ``noexec``."""
    ids: IdRange = IdRange()
    parent_cgroup: str | None = None
    """Relative cgroup path for the VMs' cgroups; the jailer's default is the exec file
    name (``firecracker``), i.e. ``/sys/fs/cgroup/firecracker/<jail_id>``."""
    cgroup_root: Path = Path("/sys/fs/cgroup")
    """Where the cgroup2 hierarchy is mounted (the driver removes a VM's empty cgroup)."""
    memory_overhead_mib: int = 128
    """memory.max = guest memory + this: Firecracker's own RSS, page tables, and the page
    cache of its log files. Measured peaks are 45-60 MiB above a fully touched guest."""
    swap_max_zero: bool = True
    """Write memory.swap.max=0 so the cap is real (otherwise the excess goes to swap)."""
    cpu_period_us: int = 100_000
    """cpu.max = ``vcpus * period`` per ``period``: at most ``vcpus`` host CPUs."""
    extra_cgroups: tuple[str, ...] = ()
    """More ``file=value`` pairs for ``--cgroup`` (e.g. ``pids.max=64``)."""
    netns: str | None = None
    """Network namespace name template (``{vm_id}``, ``{jail_id}``), joined through
    ``--netns <netns_dir>/<name>``; None keeps the VMM in the agent's namespace, where the
    tap devices are then expected."""
    netns_dir: Path = Path("/var/run/netns")
    own_taps: bool = True
    """Without a netns, hand each tap to the VM's uid/gid (TUNSETOWNER/TUNSETGROUP) before
    the start: an ownerless tap may be attached by any uid, i.e. by another VM's VMM."""
    resource_limits: tuple[str, ...] = ()
    """``--resource-limit`` values (``no-file=N``, ``fsize=BYTES``). Beware ``fsize``: the
    serial console is Firecracker's stdout, so a console file above it kills the VMM."""

    @property
    def exec_name(self) -> str:
        return self.firecracker_bin.name


@dataclasses.dataclass(frozen=True)
class JailLayout:
    """Where one VM's jail lives on the host."""

    chroot_base: Path
    exec_name: str
    jail_id: str

    @classmethod
    def of(cls, config: JailerConfig, vm_id: str) -> JailLayout:
        return cls(config.chroot_base, config.exec_name, jail_id(vm_id))

    @property
    def jail_dir(self) -> Path:
        return self.chroot_base / self.exec_name / self.jail_id

    @property
    def root(self) -> Path:
        """The chroot (``/`` for Firecracker)."""
        return self.jail_dir / "root"

    @property
    def state_file(self) -> Path:
        return self.jail_dir / STATE_FILE

    @property
    def socket(self) -> Path:
        return self.host(API_SOCKET)

    def host(self, inside: str) -> Path:
        """The host path of a path inside the jail."""
        return self.root / inside.lstrip("/")


@dataclasses.dataclass(frozen=True)
class JailPaths:
    """The paths Firecracker is given, as seen inside its chroot."""

    kernel: str
    initrd: str | None
    drives: tuple[tuple[str, str], ...]
    """``(drive_id, path)`` in the spec's order."""
    log: str = LOG_FILE
    metrics: str = METRICS_FILE
    api_socket: str = API_SOCKET

    @classmethod
    def of(cls, spec: VmSpec) -> JailPaths:
        return cls(
            kernel=KERNEL,
            initrd=INITRD if spec.initrd is not None else None,
            drives=tuple((d.drive_id, f"{DRIVES_DIR}/{d.drive_id}") for d in spec.drives),
        )

    def drive(self, drive_id: str) -> str:
        return dict(self.drives)[drive_id]


def netns_path(config: JailerConfig, vm_id: str) -> Path | None:
    if config.netns is None:
        return None
    name = config.netns.format(vm_id=vm_id, jail_id=jail_id(vm_id))
    if not name or "/" in name or name in {".", ".."}:
        raise VmmError(f"bad network namespace name {name!r}", detail={"netns": name})
    return config.netns_dir / name


def cgroup_values(config: JailerConfig, spec: VmSpec) -> tuple[str, ...]:
    """The ``--cgroup file=value`` pairs: memory is a hard cap above the guest's memory,
    CPU is capped at the VM's vCPU count."""
    memory = (spec.memory_mb + config.memory_overhead_mib) * MiB
    values = [f"memory.max={memory}"]
    if config.swap_max_zero:
        values.append("memory.swap.max=0")
    values.append(f"cpu.max={spec.vcpus * config.cpu_period_us} {config.cpu_period_us}")
    values.extend(config.extra_cgroups)
    return tuple(values)


def jailer_argv(config: JailerConfig, spec: VmSpec, *, uid: int, gid: int) -> list[str]:
    """The jailer command line for ``spec`` (without ``--daemonize``/``--new-pid-ns``: the
    jailer must exec Firecracker in place so the pid we spawn is the VMM's and its stdout,
    the serial console, stays ours)."""
    argv = [
        str(config.jailer_bin),
        "--id",
        jail_id(spec.vm_id),
        "--exec-file",
        str(config.firecracker_bin),
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--chroot-base-dir",
        str(config.chroot_base),
        "--cgroup-version",
        "2",
    ]
    if config.parent_cgroup:
        argv += ["--parent-cgroup", config.parent_cgroup]
    for value in cgroup_values(config, spec):
        argv += ["--cgroup", value]
    netns = netns_path(config, spec.vm_id)
    if netns is not None:
        argv += ["--netns", str(netns)]
    for limit in config.resource_limits:
        argv += ["--resource-limit", limit]
    argv += ["--", "--api-sock", API_SOCKET]
    return argv


def cgroup_dir(config: JailerConfig, vm_id: str) -> Path:
    parent = config.parent_cgroup or config.exec_name
    return config.cgroup_root / parent / jail_id(vm_id)


# --- filesystem steps -------------------------------------------------------------------


def _link_into(src: Path, dst: Path, *, copy_if_needed: bool) -> bool:
    """Hard-link ``src`` at ``dst``; returns True when it had to copy instead."""
    try:
        os.link(src, dst)
    except FileNotFoundError as exc:
        raise VmmError(f"{src} does not exist", detail={"path": str(src)}) from exc
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM) or not copy_if_needed:
            raise VmmError(
                f"cannot hard-link {src} into the jail at {dst}: {exc.strerror}",
                hint="put the jailer's chroot base on the same filesystem as the agent's "
                "images (a drive must be the file itself, never a copy)",
                detail={"path": str(src), "jail_path": str(dst)},
            ) from exc
        shutil.copyfile(src, dst)
        return True
    return False


def _stage_readable(src: Path, dst: Path, uid: int, gid: int) -> None:
    """Kernel and initrd: shared by every VM, so never chowned. A world-readable file is
    hard-linked; anything else is copied and the copy given to the VM."""
    try:
        mode = src.stat().st_mode
    except FileNotFoundError as exc:
        raise VmmError(f"{src} does not exist", detail={"path": str(src)}) from exc
    if mode & stat.S_IROTH and not _link_into(src, dst, copy_if_needed=True):
        return
    if not dst.exists():
        shutil.copyfile(src, dst)
    os.chown(dst, uid, gid, follow_symlinks=False)
    os.chmod(dst, 0o400)


def stage_chroot(
    layout: JailLayout,
    spec: VmSpec,
    paths: JailPaths,
    *,
    uid: int,
    gid: int,
    metrics: bool,
) -> None:
    """Build ``root/`` before the jailer runs: links to the boot artifacts and drives, the
    log files, all usable by the VM's uid. Each drive is chowned to the VM: a drive file
    belongs to one VM only (two jails linking one inode would fight over its owner)."""
    root = layout.root
    root.mkdir(parents=True, exist_ok=False)
    _stage_readable(spec.kernel, layout.host(paths.kernel), uid, gid)
    if spec.initrd is not None and paths.initrd is not None:
        _stage_readable(spec.initrd, layout.host(paths.initrd), uid, gid)
    if spec.drives:
        layout.host(DRIVES_DIR).mkdir(mode=0o755)
    for drive in spec.drives:
        dst = layout.host(paths.drive(drive.drive_id))
        _link_into(drive.path, dst, copy_if_needed=False)
        os.chown(dst, uid, gid, follow_symlinks=False)
        os.chmod(dst, 0o400 if drive.read_only else 0o600)
    for inside in (paths.log, *([paths.metrics] if metrics else [])):
        target = layout.host(inside)
        target.touch(mode=0o600)
        os.chown(target, uid, gid, follow_symlinks=False)


TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETOWNER = 0x400454CC  # _IOW('T', 204, int)
TUNSETGROUP = 0x400454CE  # _IOW('T', 206, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def hand_tap_to(
    tap: str, uid: int, gid: int, *, sys_class_net: Path = Path("/sys/class/net")
) -> None:
    """Make the existing persistent tap ``tap`` attachable by ``uid``/``gid`` only.

    TUNSETIFF on a name that does not exist would create a throw-away tap, hence the
    check first."""
    if not (sys_class_net / tap / "tun_flags").exists():
        raise VmmError(
            f"tap device {tap} does not exist",
            hint="create the instance's tap (ip tuntap add dev TAP mode tap) before the VM",
            detail={"tap": tap},
        )
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, gid)
    except OSError as exc:
        raise VmmError(
            f"cannot hand tap {tap} to uid {uid}: {exc.strerror}",
            detail={"tap": tap, "uid": uid},
        ) from exc
    finally:
        os.close(fd)


def clear_chroot(layout: JailLayout) -> None:
    """Remove ``root/`` (links, socket, device nodes); the images themselves stay. The
    VMM's log is kept beside ``ember.json`` when it is still a regular file (the VM's uid
    owned ``root/`` and could have replaced it with anything)."""
    log = layout.host(LOG_FILE)
    try:
        if stat.S_ISREG(log.lstat().st_mode):
            os.replace(log, layout.jail_dir / log.name)
    except FileNotFoundError:
        pass
    # rmtree never follows symlinks, whatever the VM left behind.
    shutil.rmtree(layout.root, ignore_errors=True)
