"""The interface every VMM driver implements.

A driver turns a :class:`VmSpec` (boot artifacts, size, devices — all paths prepared by
the agent) into a running microVM process it supervises, and can find that VM again after
the agent restarts (``adopt``), so a restarted agent neither duplicates nor orphans VMs.

Errors::

    EmberError
    └── VmmError            vmm.error           the VMM failed (start, API, exit)
        ├── VmmUnavailable  vmm.unavailable     the VMM binary or device is missing
        ├── VmSpecInvalid   vmm.invalid_spec    the driver cannot express the spec
        └── VmNotFound      vmm.not_found       no VM with that id (adopt/stop)
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Protocol

from ember.core.errors import EmberError, Kind


class VmmError(EmberError):
    code = "vmm.error"
    kind = Kind.INTERNAL


class VmmUnavailable(VmmError):
    code = "vmm.unavailable"
    kind = Kind.UNAVAILABLE


class VmSpecInvalid(VmmError):
    code = "vmm.invalid_spec"
    kind = Kind.INVALID


class VmNotFound(VmmError):
    code = "vmm.not_found"
    kind = Kind.NOT_FOUND


@dataclasses.dataclass(frozen=True)
class Drive:
    drive_id: str
    path: Path
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class NetDevice:
    iface_id: str
    tap: str
    mac: str


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """Everything needed to boot one instance's microVM."""

    vm_id: str
    """The instance id: names the VM's directory, cgroup, tap and process."""
    kernel: Path
    """An uncompressed ELF ``vmlinux`` (PVH entry)."""
    initrd: Path | None
    kernel_args: str
    vcpus: int
    memory_mb: int
    """Guest memory: a hard cap (the VMM process gets a cgroup ``memory.max`` above it)."""
    drives: tuple[Drive, ...]
    """Root filesystem first, then the config drive, then volumes."""
    nets: tuple[NetDevice, ...] = ()
    console_log: Path | None = None
    """Where the serial console (the workload's stdout/stderr) is written."""
    workdir: Path = Path("/var/lib/ember/vms")
    """A directory of this VM alone (sockets, pid file, driver state)."""


class VmState(enum.StrEnum):
    RUNNING = "running"
    EXITED = "exited"


@dataclasses.dataclass(frozen=True)
class VmHandle:
    vm_id: str
    pid: int
    state: VmState
    exit_code: int | None = None


class VmmDriver(Protocol):
    name: str

    def start(self, spec: VmSpec) -> VmHandle:
        """Boot the VM; returns once the VMM process runs (not when the guest is up)."""
        ...

    def adopt(self, spec: VmSpec) -> VmHandle | None:
        """The VM of ``spec`` if its VMM process still runs (after an agent restart)."""
        ...

    def status(self, vm_id: str) -> VmHandle: ...

    def stop(self, vm_id: str, *, timeout_s: float) -> VmHandle:
        """Ask the guest to shut down (the init forwards the kill signal), then kill the
        VMM after ``timeout_s``."""
        ...
