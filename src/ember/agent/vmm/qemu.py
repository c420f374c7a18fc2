"""The ``qemu`` VMM driver: QEMU's ``microvm`` machine, for development machines and CI.

Sans-IO first: :func:`qemu_argv` turns a :class:`VmSpec` into QEMU's command line (the
flags of ``reference/NOTES.md``: ``-M microvm,acpi=on``, virtio-mmio block and net
devices, PVH boot of the ELF ``vmlinux``). :class:`QemuDriver` does the I/O.

Process layout, all in ``spec.workdir``::

    launch.json   written by the driver: QEMU's argv, console log, cap, cgroup
    state.json    written by the shim: QEMU's pid and start time (for adopt)
    exit.json     written by the shim when QEMU is gone: QEMU's status and the
                  workload's exit status (the init's "ember-init: exit status N")
    qmp.sock      QMP (stop = system_powerdown = the ACPI power button)
    qemu.log      QEMU's stderr (capped)
    shim.log      the shim's own stderr

QEMU runs as the child of a small per-VM supervisor (:mod:`ember.agent.vmm.qemu_shim`)
that outlives the agent: it keeps the console log under ``console_cap`` bytes (one
rotated ``.1`` file), records the exit, and removes the VM's cgroup. A restarted agent
finds QEMU again through ``state.json`` (``adopt``), trusting the pid only when
``/proc/PID/stat`` shows the recorded start time and ``/proc/PID/cmdline`` names the VM.
The shim detaches into its own session, so killing the agent (even ``kill -9`` of its
process group) leaves VMs running; under systemd, run the agent with
``KillMode=process`` (as containerd does) so that a restart does not kill the shims.
``start`` returns once QEMU answers on QMP; ``stop`` presses the power button (repeated
every second: a press during the kernel's boot is lost), waits ``timeout_s``, then
SIGKILLs QEMU (through a pidfd, after re-checking its identity).

Acceleration: KVM only when a one-time probe boots the platform kernel under KVM (the
init answers ``ember-init: probe ok`` for ``ember.probe`` on the kernel command line);
the verdict is cached in ``state_dir/accel.json`` keyed by the host kernel, QEMU and the
guest kernel. Otherwise TCG (NOTES.md: nested KVM fails on these machines).

Memory: the VM gets ``spec.memory_mb``; QEMU itself runs in its own cgroup with a hard
limit of ``memory_mb + overhead`` (cgroup v2 ``memory.max``; on a v1-only memory
hierarchy ``memory.limit_in_bytes``); when no writable memory controller exists the VM
runs without one and :attr:`QemuDriver.cgroup_note` says why.

``VmHandle.exit_code`` is the *workload's* exit status as the init reported it (128 + N
for signal N), None when the guest never reported one (boot failure: see
:func:`ember.agent.guest_config.parse_console_status`; VMM killed before the init
finished).

Errors: :mod:`ember.agent.vmm.base`'s (``VmmError``, ``VmmUnavailable``, ``VmNotFound``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ember.agent.guest_config import parse_console_status
from ember.agent.vmm.base import (
    VmHandle,
    VmmError,
    VmmUnavailable,
    VmNotFound,
    VmSpec,
    VmSpecInvalid,
    VmState,
)

log = logging.getLogger("ember.agent.vmm.qemu")

KERNEL_ARGS = "console=ttyS0 reboot=t panic=-1 pci=off quiet"
"""The platform kernel's command line under QEMU (``pci=off``: microvm has no PCI)."""
PROBE_OK = b"ember-init: probe ok"
VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
SUN_PATH_MAX = 107
SERIAL_MAX = 20  # virtio-blk serial: VIRTIO_BLK_ID_BYTES
Accel = Literal["auto", "kvm", "tcg"]


@dataclasses.dataclass(frozen=True)
class QemuConfig:
    binary: str = "qemu-system-x86_64"
    accel: Accel = "auto"
    state_dir: Path = Path("/var/lib/ember/qemu")
    """Where the acceleration verdict is cached."""
    console_cap_bytes: int = 16 << 20
    """The console log never exceeds this; the older part moves to ``LOG.1``."""
    memory_overhead_mb: int = 256
    """QEMU's own memory on top of the guest's, in the VM's cgroup limit (TCG's
    translation cache is most of it; see ``-accel tcg,tb-size``)."""
    tcg_tb_size_mb: int = 64
    cgroup_parent: Path | None = None
    """A cgroup v2 directory for the VMs' cgroups; None: found automatically."""
    python: str = sys.executable
    """Runs the per-VM shim."""
    start_timeout_s: float = 10.0
    probe_timeout_s: float = 10.0
    tsc_khz: int | None = None
    """Under TCG the guest's TSC is the host's: the guest is told its rate
    (``tsc_early_khz``) because calibrating it against the emulated PIT fails on a busy
    host and the boot then hangs waiting for timer ticks. None: read from the host's
    ``/proc/cpuinfo`` when that is trustworthy; 0: never pass it."""


# -- sans-IO ---------------------------------------------------------------------------------


def _opt(value: str) -> str:
    """A value inside QEMU's ``key=value,...`` option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def check_spec(spec: VmSpec) -> None:
    problems: dict[str, str] = {}
    if not VM_ID_RE.match(spec.vm_id):
        problems["vm_id"] = "1-64 of [A-Za-z0-9_.-], starting with a letter or digit"
    if spec.vcpus < 1:
        problems["vcpus"] = "must be at least 1"
    if spec.memory_mb < 16:
        problems["memory_mb"] = "must be at least 16"
    if not spec.drives:
        problems["drives"] = "needs the root filesystem and the config drive"
    for net in spec.nets:
        if not MAC_RE.match(net.mac):
            problems[f"net:{net.iface_id}:mac"] = "must look like 02:00:00:00:00:01"
        if not 1 <= len(net.tap) <= 15 or "," in net.tap:
            problems[f"net:{net.iface_id}:tap"] = "tap names are 1-15 characters"
    qmp = spec.workdir / "qmp.sock"
    if len(str(qmp)) > SUN_PATH_MAX:
        problems["workdir"] = f"too long for a Unix socket path ({qmp})"
    if problems:
        raise VmSpecInvalid(
            f"VM {spec.vm_id} cannot be run by QEMU: "
            + "; ".join(f"{k}: {v}" for k, v in problems.items()),
            detail={"vm_id": spec.vm_id, "problems": problems},
        )


def host_tsc_khz(cpuinfo: str) -> int | None:
    """The host's TSC rate from ``/proc/cpuinfo``, when it can be trusted: an invariant
    TSC (``constant_tsc``, ``nonstop_tsc``) and every CPU reporting the same clock (a
    host that scales its frequency reports the current clock instead, which differs)."""
    mhz: set[str] = set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            mhz.add(value.strip())
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    if len(mhz) != 1 or not {"constant_tsc", "nonstop_tsc"} <= flags:
        return None
    try:
        khz = round(float(mhz.pop()) * 1000)
    except ValueError:
        return None
    return khz if khz > 0 else None


def kernel_args(spec: VmSpec, accel: Literal["kvm", "tcg"], tsc_khz: int | None) -> str:
    """``spec.kernel_args`` plus what this accelerator needs."""
    args = spec.kernel_args
    if accel == "tcg" and tsc_khz and "tsc_early_khz=" not in args:
        args = f"{args} tsc_early_khz={tsc_khz}"
    return args


def qemu_argv(
    spec: VmSpec,
    *,
    binary: str,
    accel: Literal["kvm", "tcg"],
    tb_size_mb: int,
    tsc_khz: int | None = None,
) -> list[str]:
    """QEMU's command line for ``spec``; the serial console goes to stdout."""
    argv = [
        binary,
        "-name",
        f"ember:{spec.vm_id}",
        "-M",
        "microvm,acpi=on",
        *(
            ["-accel", "kvm", "-cpu", "host"]
            if accel == "kvm"
            else ["-accel", f"tcg,tb-size={tb_size_mb}", "-cpu", "max"]
        ),
        "-m",
        str(spec.memory_mb),
        "-smp",
        str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{_opt(str(spec.workdir / 'qmp.sock'))},server=on,wait=off",
        "-kernel",
        str(spec.kernel),
        *(["-initrd", str(spec.initrd)] if spec.initrd else []),
        "-append",
        kernel_args(spec, accel, tsc_khz),
    ]
    # Drive order is the guest's device order: vda = root, vdb = config, then volumes.
    for i, drive in enumerate(spec.drives):
        ro = "on" if drive.read_only else "off"
        argv += [
            "-drive",
            f"id=drive{i},file={_opt(str(drive.path))},format=raw,if=none,readonly={ro}"
            + ("" if drive.read_only else ",discard=unmap"),
            "-device",
            f"virtio-blk-device,drive=drive{i},serial={_opt(drive.drive_id[:SERIAL_MAX])}",
        ]
    for i, net in enumerate(spec.nets):
        argv += [
            "-netdev",
            f"tap,id=net{i},ifname={net.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net{i},mac={net.mac}",
        ]
    return argv


def probe_argv(kernel: Path, initrd: Path, *, binary: str) -> list[str]:
    """A guest with no devices whose init only answers ``probe ok``: does KVM boot it?"""
    return [
        binary,
        "-M",
        "microvm,acpi=on",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"{KERNEL_ARGS} ember.probe",
    ]


# -- processes -------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie has exited
    return int(fields[19])


def _is_our_qemu(pid: int, start_ticks: int | None, vm_id: str) -> bool:
    if not pid or _start_ticks(pid) != start_ticks or start_ticks is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"ember:{vm_id}".encode() in cmdline


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _wait_pid(pid: int, timeout_s: float) -> bool:
    """True once ``pid`` has exited (it is not our child: a pidfd tells)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout_s))
        return bool(ready)
    finally:
        os.close(fd)


def _kill_pid(pid: int, start_ticks: int | None, vm_id: str) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # Checked after pidfd_open: the pidfd pins this very process.
        if _is_our_qemu(pid, start_ticks, vm_id):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


class Qmp:
    """The few QMP commands the driver needs, over the VM's Unix socket."""

    def __init__(self, path: Path, timeout_s: float = 2.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(str(path))
            self.f = self.sock.makefile("rwb")
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("QMP closed the connection")
            msg = json.loads(line)
            if "event" not in msg:
                return dict(msg)

    def execute(self, command: str) -> dict[str, Any]:
        self.f.write(json.dumps({"execute": command}).encode() + b"\n")
        self.f.flush()
        reply = self._read()
        if "error" in reply:
            raise VmmError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        self.sock.close()


# -- cgroups ---------------------------------------------------------------------------------


def _is_cgroup2(path: Path) -> bool:
    return (path / "cgroup.controllers").is_file()


def _own_cgroup(controller: str) -> str | None:
    """This process's cgroup path in the hierarchy of ``controller`` ("" = unified)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


@dataclasses.dataclass(frozen=True)
class CgroupPlan:
    """Where VM cgroups go: ``parent/<vm_id>`` with ``limit_file`` set."""

    parent: Path
    version: int
    limit_files: tuple[str, ...]


_V2_LIMITS = ("memory.max", "memory.swap.max")
_V1_LIMITS = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")


def find_cgroup_parent(configured: Path | None) -> tuple[CgroupPlan | None, str]:
    """Where to create the VMs' cgroups, or None and why not."""
    if configured is not None:
        if not _is_cgroup2(configured):
            return None, f"{configured} is not a cgroup v2 directory"
        return CgroupPlan(configured, 2, _V2_LIMITS), "configured"
    root = Path("/sys/fs/cgroup")
    if _is_cgroup2(root):
        return _v2_plan(root)
    return _v1_plan(root)


def _v2_plan(root: Path) -> tuple[CgroupPlan | None, str]:
    if "memory" not in (root / "cgroup.controllers").read_text().split():
        return None, "cgroup v2 is mounted but has no memory controller"
    if not os.access(root, os.W_OK):
        return None, f"{root} is not writable (run the agent as root or delegate a cgroup)"
    return CgroupPlan(root / "ember.vms", 2, _V2_LIMITS), "cgroup v2"


def _v1_plan(root: Path) -> tuple[CgroupPlan | None, str]:
    """A hybrid or legacy host: cgroup v1's memory hierarchy gives the same hard limit."""
    hierarchy = root / "memory"
    own = _own_cgroup("memory")
    if not (hierarchy / "cgroup.procs").is_file() or own is None:
        return None, f"{root} is neither cgroup v2 nor has a cgroup v1 memory hierarchy"
    base = hierarchy / own.lstrip("/")
    if not os.access(base, os.W_OK):
        return None, f"{base} is not writable"
    return (
        CgroupPlan(base / "ember.vms", 1, _V1_LIMITS),
        "cgroup v1 memory controller: this host has no cgroup v2 memory controller",
    )


def _make_cgroup(plan: CgroupPlan, vm_id: str, limit_bytes: int) -> Path:
    if not plan.parent.is_dir():
        plan.parent.mkdir(exist_ok=True)
    if plan.version == 2:
        control = plan.parent / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory")
    group = plan.parent / vm_id
    if group.is_dir():
        with contextlib.suppress(OSError):
            group.rmdir()  # left over from a VM that is gone
    group.mkdir(exist_ok=True)
    for name in plan.limit_files:
        path = group / name
        if not path.exists():
            continue  # memsw without swap accounting, swap.max without swap
        value = "0" if name == "memory.swap.max" else str(limit_bytes)
        path.write_text(value)
    return group


# -- the driver ------------------------------------------------------------------------------


class QemuDriver:
    """Runs microVMs under QEMU; see the module docstring for the layout."""

    name = "qemu"

    def __init__(self, config: QemuConfig | None = None) -> None:
        self.config = config or QemuConfig()
        self._workdirs: dict[str, Path] = {}
        self._accel: Literal["kvm", "tcg"] | None = None
        self._cgroup: CgroupPlan | None = None
        self._cgroup_checked = False
        self.cgroup_note = ""
        """Where VM cgroups go, or why the VMs run without one."""
        self.accel_note = ""

    # -- acceleration ------------------------------------------------------------------

    def accel(self, kernel: Path, initrd: Path | None) -> Literal["kvm", "tcg"]:
        """KVM if a probe boot under KVM works (cached on disk), else TCG."""
        if self._accel is not None:
            return self._accel
        mode = self.config.accel
        if mode != "auto":
            self._accel, self.accel_note = mode, "configured"
            return mode
        key = self._probe_key(kernel, initrd)
        cache = self.config.state_dir / "accel.json"
        cached = _read_json(cache)
        if cached and cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
            self._accel, self.accel_note = cached["accel"], str(cached.get("reason", ""))
            return self._accel
        accel, reason = self._probe(kernel, initrd)
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(".accel.json.tmp")
        tmp.write_text(
            json.dumps({"key": key, "accel": accel, "reason": reason, "at": time.time()})
        )
        tmp.replace(cache)
        log.info("qemu acceleration: %s (%s)", accel, reason)
        self._accel, self.accel_note = accel, reason
        return accel

    def _probe_key(self, kernel: Path, initrd: Path | None) -> dict[str, Any]:
        def ident(p: Path | None) -> list[Any]:
            try:
                st = p.stat() if p else None
            except OSError:
                return [str(p)]
            return [str(p), st.st_size, st.st_mtime_ns] if st else []

        binary = shutil.which(self.config.binary)
        return {
            "host": os.uname().release,
            "qemu": ident(Path(binary)) if binary else None,
            "kernel": ident(kernel),
            "initrd": ident(initrd),
        }

    def _probe(self, kernel: Path, initrd: Path | None) -> tuple[Literal["kvm", "tcg"], str]:
        if initrd is None:
            return "tcg", "no initramfs to probe KVM with"
        try:
            fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
            os.close(fd)
        except OSError as exc:
            return "tcg", f"/dev/kvm: {exc.strerror}"
        argv = probe_argv(kernel, initrd, binary=self.config.binary)
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            return "tcg", f"cannot run {self.config.binary}: {exc}"
        out = b""
        err = b""
        deadline = time.monotonic() + self.config.probe_timeout_s
        assert proc.stdout is not None and proc.stderr is not None
        streams = [proc.stdout, proc.stderr]
        try:
            while streams and time.monotonic() < deadline:
                ready, _, _ = select.select(streams, [], [], max(0.0, deadline - time.monotonic()))
                for s in ready:
                    data = os.read(s.fileno(), 65536)
                    if not data:
                        streams.remove(s)
                    elif s is proc.stdout:
                        out += data
                    else:
                        err += data
                if PROBE_OK in out:
                    return "kvm", "a probe guest booted under KVM"
                if b"KVM internal error" in err or b"emulation failure" in err:
                    return "tcg", "KVM cannot run the guest (KVM internal error)"
            reason = err.decode("utf-8", "replace").strip().splitlines()
            return (
                "tcg",
                f"the probe guest did not boot under KVM: {reason[-1] if reason else 'timeout'}",
            )
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()

    def _tsc_khz(self) -> int | None:
        if self.config.tsc_khz is not None:
            return self.config.tsc_khz or None
        try:
            return host_tsc_khz(Path("/proc/cpuinfo").read_text())
        except OSError:
            return None

    # -- cgroups ------------------------------------------------------------------------

    def _cgroup_plan(self) -> CgroupPlan | None:
        if not self._cgroup_checked:
            self._cgroup, note = find_cgroup_parent(self.config.cgroup_parent)
            self._cgroup_checked = True
            if self._cgroup is None:
                self.cgroup_note = f"VMs run without a cgroup: {note}"
                log.warning("qemu: %s", self.cgroup_note)
            else:
                self.cgroup_note = f"{self._cgroup.parent} ({note})"
                log.info("qemu: VM cgroups under %s", self.cgroup_note)
        return self._cgroup

    # -- VmmDriver ----------------------------------------------------------------------

    def start(self, spec: VmSpec) -> VmHandle:
        check_spec(spec)
        if shutil.which(self.config.binary) is None:
            raise VmmUnavailable(
                f"{self.config.binary} is not installed",
                hint="install the Debian package qemu-system-x86 ('make bootstrap')",
            )
        for path in (spec.kernel, spec.initrd, *(d.path for d in spec.drives)):
            if path is not None and not path.exists():
                raise VmmError(
                    f"VM {spec.vm_id}: {path} does not exist", detail={"path": str(path)}
                )
        running = self.adopt(spec)
        if running is not None:
            return running  # idempotent: the agent may converge twice

        workdir = spec.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for name in ("state.json", "exit.json", "qmp.sock", "shim.error"):
            (workdir / name).unlink(missing_ok=True)
        accel = self.accel(spec.kernel, spec.initrd)
        plan = self._cgroup_plan()
        cgroup = None
        if plan is not None:
            limit = (spec.memory_mb + self.config.memory_overhead_mb) << 20
            try:
                cgroup = _make_cgroup(plan, spec.vm_id, limit)
            except OSError as exc:
                raise VmmError(
                    f"VM {spec.vm_id}: cannot create its cgroup under {plan.parent}: {exc}"
                ) from exc
        console = spec.console_log or workdir / "console.log"
        console.parent.mkdir(parents=True, exist_ok=True)
        launch = {
            "vm_id": spec.vm_id,
            "argv": qemu_argv(
                spec,
                binary=self.config.binary,
                accel=accel,
                tb_size_mb=self.config.tcg_tb_size_mb,
                tsc_khz=self._tsc_khz(),
            ),
            "console_log": str(console),
            "console_cap": self.config.console_cap_bytes,
            "cgroup": str(cgroup) if cgroup else None,
        }
        (workdir / "launch.json").write_text(json.dumps(launch, indent=2) + "\n")
        with (workdir / "shim.log").open("ab") as shim_log:
            shim = subprocess.Popen(
                [self.config.python, "-m", "ember.agent.vmm.qemu_shim", str(workdir)],
                stdin=subprocess.DEVNULL,
                stdout=shim_log,
                stderr=shim_log,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": _src_path()},
            )
        if shim.wait(timeout=self.config.start_timeout_s) != 0:
            raise VmmError(f"VM {spec.vm_id}: the QEMU shim failed: {_tail(workdir / 'shim.log')}")
        self._workdirs[spec.vm_id] = workdir
        return self._wait_started(spec.vm_id, workdir)

    def _wait_started(self, vm_id: str, workdir: Path) -> VmHandle:
        """Until QEMU answers on QMP (it is up) or is gone (it failed)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            exited = _read_json(workdir / "exit.json")
            if exited is not None or (workdir / "shim.error").exists():
                raise VmmError(
                    f"VM {vm_id}: QEMU exited at start: "
                    + (
                        _tail(workdir / "qemu.log", 800).strip()
                        or _tail(workdir / "shim.error").strip()
                    ),
                    detail={"vm_id": vm_id, "exit": exited},
                )
            state = _read_json(workdir / "state.json")
            if state is not None and (workdir / "qmp.sock").exists():
                with contextlib.suppress(OSError, ConnectionError, VmmError, ValueError):
                    Qmp(workdir / "qmp.sock", timeout_s=1.0).close()
                    return VmHandle(vm_id, int(state["qemu_pid"]), VmState.RUNNING)
            time.sleep(0.01)
        state = _read_json(workdir / "state.json")
        if state:
            _kill_pid(int(state["qemu_pid"]), state.get("qemu_start_ticks"), vm_id)
        raise VmmError(f"VM {vm_id}: QEMU did not come up in {self.config.start_timeout_s} s")

    def adopt(self, spec: VmSpec) -> VmHandle | None:
        state = _read_json(spec.workdir / "state.json")
        if state is None or state.get("vm_id") != spec.vm_id:
            return None
        self._workdirs[spec.vm_id] = spec.workdir
        handle = self.status(spec.vm_id)
        return handle if handle.state is VmState.RUNNING else None

    def status(self, vm_id: str) -> VmHandle:
        workdir = self._workdirs.get(vm_id)
        state = _read_json(workdir / "state.json") if workdir else None
        if workdir is None or state is None:
            raise VmNotFound(f"no QEMU VM {vm_id} is known to this driver", detail={"vm_id": vm_id})
        pid = int(state["qemu_pid"])
        if _is_our_qemu(pid, state.get("qemu_start_ticks"), vm_id):
            return VmHandle(vm_id, pid, VmState.RUNNING)
        exited = _read_json(workdir / "exit.json")
        if exited is None:
            # The shim died before QEMU or before writing its record: the console says.
            _wait_for((workdir / "exit.json").exists, 1.0)
            exited = _read_json(workdir / "exit.json")
        if exited is not None:
            code = exited.get("exit_code")
            return VmHandle(vm_id, pid, VmState.EXITED, int(code) if code is not None else None)
        launch = _read_json(workdir / "launch.json") or {}
        console = Path(launch.get("console_log", workdir / "console.log"))
        code, _ = parse_console_status(_tail(console, 4096))
        return VmHandle(vm_id, pid, VmState.EXITED, code)

    def stop(self, vm_id: str, *, timeout_s: float) -> VmHandle:
        handle = self.status(vm_id)
        if handle.state is VmState.EXITED:
            return handle
        workdir = self._workdirs[vm_id]
        state = _read_json(workdir / "state.json") or {}
        pid, ticks = handle.pid, state.get("qemu_start_ticks")
        if not self._press_power_button(vm_id, workdir, pid, timeout_s):
            log.info(
                "qemu VM %s: still running %.1f s after the power button; SIGKILL", vm_id, timeout_s
            )
            _kill_pid(pid, ticks, vm_id)
            _wait_pid(pid, 5.0)
        # The shim writes exit.json once it has drained the console.
        _wait_for((workdir / "exit.json").exists, 5.0)
        return self.status(vm_id)

    def _press_power_button(self, vm_id: str, workdir: Path, pid: int, timeout_s: float) -> bool:
        """Press the power button until QEMU exits or ``timeout_s`` passes; True if it
        exited. A press while the kernel still boots is lost (the init is not yet
        listening), so it is repeated every second; the init acts on the first one."""
        deadline = time.monotonic() + timeout_s
        try:
            qmp = Qmp(workdir / "qmp.sock")
        except (OSError, ConnectionError, ValueError, VmmError) as exc:
            log.warning("qemu VM %s: no QMP (%s); killing it", vm_id, exc)
            return _wait_pid(pid, 0)
        try:
            while True:
                with contextlib.suppress(OSError, ConnectionError, ValueError, VmmError):
                    qmp.execute("system_powerdown")
                left = deadline - time.monotonic()
                if _wait_pid(pid, min(1.0, max(0.0, left))):
                    return True
                if left <= 1.0:
                    return False
        finally:
            qmp.close()


def _wait_for(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _src_path() -> str:
    """Where the ``ember`` package lives, so the shim imports the same code."""
    import ember

    src = str(Path(ember.__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH")
    return f"{src}{os.pathsep}{extra}" if extra else src
