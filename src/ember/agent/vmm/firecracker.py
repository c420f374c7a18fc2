"""The ``firecracker`` VMM driver (production, ADR-0003).

Sans-IO first: :func:`boot_calls` turns a :class:`VmSpec` into the ordered Firecracker API
calls that configure and start it, and :func:`stop_calls` gives the graceful-stop call;
every path and body they produce is validated against Firecracker's ``firecracker.yaml``
by ``tests/unit/test_firecracker_contract.py``. :class:`FirecrackerApi` is the HTTP client
over the API's Unix socket; :class:`FirecrackerDriver` runs the jailer
(:mod:`ember.agent.vmm.jailer`), sends the calls, and finds its VMs again after an agent
restart.

Errors (besides :mod:`ember.agent.vmm.base`'s)::

    VmmError
    └── VmSpecInvalid   vmm.invalid_spec   the spec cannot be expressed to Firecracker

A start:

1. allocate the VM a uid/gid (lowest free in the configured range; gid = uid);
2. stage ``<chroot_base>/firecracker/<jail_id>/root/`` (hard links, log files, ownership)
   and, when the VMM shares the agent's network namespace, give its taps to its uid;
3. spawn the jailer in its own session with stdout+stderr appended to the console log
   (the jailer execs Firecracker in place, so the pid is the VMM's and stdout is the
   guest's serial console);
4. record ``ember.json`` (uid, pid, the process start time from ``/proc/PID/stat``) beside
   ``root/``, where the jailed process cannot write;
5. wait for the API socket, send :func:`boot_calls` in order. Any failure kills the VMM,
   clears the jail and releases the uid before the error is raised.

``adopt``/``status`` trust a pid only when ``/proc/PID/stat`` shows the recorded start
time and ``/proc/PID/cmdline`` is the jailer's or Firecracker's with ``--id <jail_id>``;
the jailer's own ``firecracker.pid`` is never used (the VM's uid owns the chroot).
``adopt``/``status`` also collect a VMM found gone: its jail is cleared (Firecracker's log
is kept beside ``ember.json``), its cgroup removed and its uid freed.

``stop`` sends ``SendCtrlAltDel`` (the guest's init turns it into a clean shutdown and a
reboot, on which Firecracker exits), waits ``timeout_s``, then sends SIGKILL. Exit codes
follow :mod:`subprocess`: negative for a signal; None when the VMM was adopted (only the
parent can read a process's exit status).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from ember.agent.vmm import jailer
from ember.agent.vmm.base import (
    VmHandle,
    VmmError,
    VmmUnavailable,
    VmNotFound,
    VmSpec,
    VmSpecInvalid,
    VmState,
)
from ember.agent.vmm.jailer import JailerConfig, JailLayout, JailPaths

log = logging.getLogger("ember.agent.vmm.firecracker")

MAX_VCPUS = 32  # firecracker.yaml: MachineConfiguration.vcpu_count maximum
LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
IFNAMSIZ = 16
# sun_path is 108 bytes; longer socket paths are reached through /proc/self/fd/<dirfd>.
SUN_PATH_MAX = 107


# --- sans-IO: the API calls ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ApiCall:
    """One Firecracker API request."""

    method: str
    path: str
    body: Mapping[str, Any] | None = None


def check_spec(spec: VmSpec) -> None:
    """Refuse what Firecracker would refuse, before anything is spawned."""
    jailer.jail_id(spec.vm_id)
    problems: dict[str, str] = {}
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        problems["vcpus"] = f"must be 1-{MAX_VCPUS}"
    if spec.memory_mb < 1:
        problems["memory_mb"] = "must be positive"
    for kind, ids in (
        ("drive", [d.drive_id for d in spec.drives]),
        ("net", [n.iface_id for n in spec.nets]),
    ):
        for value in ids:
            if not jailer.DEVICE_ID_RE.match(value):
                problems[f"{kind}:{value}"] = "ids are 1-64 of [A-Za-z0-9_-]"
        if len(set(ids)) != len(ids):
            problems[f"{kind}s"] = "ids must be unique"
    for net in spec.nets:
        if not MAC_RE.match(net.mac):
            problems[f"net:{net.iface_id}:mac"] = "must look like 02:00:00:00:00:01"
        if not 1 <= len(net.tap) < IFNAMSIZ:
            problems[f"net:{net.iface_id}:tap"] = f"tap names are 1-{IFNAMSIZ - 1} characters"
    if problems:
        raise VmSpecInvalid(
            f"VM {spec.vm_id} cannot be run by Firecracker: "
            + "; ".join(f"{k} {v}" for k, v in problems.items()),
            detail={"vm_id": spec.vm_id, "problems": problems},
        )


def boot_calls(
    spec: VmSpec,
    paths: JailPaths,
    *,
    log_level: str | None = "Warning",
    metrics: bool = False,
) -> list[ApiCall]:
    """The calls that configure and boot ``spec``, in order, with paths inside the jail.

    The logger goes first so Firecracker logs why any later call failed; the first drive
    is the root device (Firecracker then adds ``root=/dev/vda`` to the command line;
    the platform initramfs mounts it itself)."""
    check_spec(spec)
    calls: list[ApiCall] = []
    if log_level is not None:
        if log_level not in LOG_LEVELS:
            raise VmSpecInvalid(f"unknown Firecracker log level {log_level!r}")
        calls.append(
            ApiCall(
                "PUT",
                "/logger",
                {
                    "log_path": paths.log,
                    "level": log_level,
                    "show_level": True,
                    "show_log_origin": False,
                },
            )
        )
    if metrics:
        calls.append(ApiCall("PUT", "/metrics", {"metrics_path": paths.metrics}))
    boot: dict[str, Any] = {"kernel_image_path": paths.kernel, "boot_args": spec.kernel_args}
    if paths.initrd is not None:
        boot["initrd_path"] = paths.initrd
    calls.append(ApiCall("PUT", "/boot-source", boot))
    for index, drive in enumerate(spec.drives):
        calls.append(
            ApiCall(
                "PUT",
                f"/drives/{drive.drive_id}",
                {
                    "drive_id": drive.drive_id,
                    "path_on_host": paths.drive(drive.drive_id),
                    "is_root_device": index == 0,
                    "is_read_only": drive.read_only,
                },
            )
        )
    for net in spec.nets:
        calls.append(
            ApiCall(
                "PUT",
                f"/network-interfaces/{net.iface_id}",
                {"iface_id": net.iface_id, "host_dev_name": net.tap, "guest_mac": net.mac},
            )
        )
    calls.append(
        ApiCall(
            "PUT",
            "/machine-config",
            {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mb, "smt": False},
        )
    )
    calls.append(ApiCall("PUT", "/actions", {"action_type": "InstanceStart"}))
    return calls


def stop_calls() -> list[ApiCall]:
    """The graceful stop: Ctrl+Alt+Del to the guest (then the driver kills on timeout)."""
    return [ApiCall("PUT", "/actions", {"action_type": "SendCtrlAltDel"})]


# --- the HTTP client ----------------------------------------------------------------------


@contextlib.contextmanager
def reachable_socket_path(path: Path) -> Iterator[str]:
    """A name ``connect()`` accepts for ``path``: itself, or ``/proc/self/fd/<dir>/<name>``
    when it is longer than ``sun_path`` (a 64-character jail id is enough for that)."""
    raw = os.fsencode(path)
    if len(raw) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def socket_accepts(path: Path, timeout_s: float = 1.0) -> bool:
    """Whether something listens on the Unix socket ``path`` (connects, sends nothing)."""
    try:
        with (
            reachable_socket_path(path) as name,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        ):
            sock.settimeout(timeout_s)
            sock.connect(name)
    except OSError:
        return False
    return True


class FirecrackerApi:
    """Firecracker's API over its Unix socket; failures become :class:`VmmError`."""

    def __init__(self, socket_path: Path, *, timeout_s: float = 5.0) -> None:
        self._stack = contextlib.ExitStack()
        name = self._stack.enter_context(reachable_socket_path(socket_path))
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=name),
            base_url="http://localhost",
            timeout=timeout_s,
        )
        self._stack.callback(self._client.close)
        self.socket_path = socket_path

    def __enter__(self) -> FirecrackerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def send(self, call: ApiCall) -> httpx.Response:
        what = f"{call.method} {call.path}"
        try:
            if call.body is None:
                response = self._client.request(call.method, call.path)
            else:
                response = self._client.request(call.method, call.path, json=dict(call.body))
        except httpx.HTTPError as exc:
            raise VmmError(
                f"Firecracker API {what} failed: {exc}",
                detail={"request": what, "socket": str(self.socket_path)},
            ) from exc
        if response.is_success:
            return response
        try:
            fault = str(response.json().get("fault_message", response.text))
        except (ValueError, AttributeError):
            fault = response.text
        raise VmmError(
            f"Firecracker refused {what} ({response.status_code}): {fault}",
            detail={"request": what, "status": response.status_code, "fault": fault},
        )


# --- /proc ----------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after ``comm`` (index 0 is field 3, the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22: starttime


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [os.fsdecode(arg) for arg in raw.split(b"\0") if arg]


def is_vmm_process(pid: int, start_ticks: int, jail: str) -> bool:
    """``pid`` is still the jailer/Firecracker we started for ``jail`` (not a reused pid,
    not a zombie)."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in {"Z", "X"} or int(fields[19]) != start_ticks:
        return False
    args = _cmdline(pid)
    names = [Path(arg).name for arg in args[:2]]
    if not any("firecracker" in name or "jailer" in name for name in names):
        return False
    for index, arg in enumerate(args):
        if arg == f"--id={jail}" or (arg == "--id" and args[index + 1 : index + 2] == [jail]):
            return True
    return False


# --- the driver -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FirecrackerConfig:
    jailer: JailerConfig = dataclasses.field(default_factory=JailerConfig)
    socket_timeout_s: float = 10.0
    """How long the jailer + Firecracker get to open the API socket."""
    api_timeout_s: float = 5.0
    log_level: str | None = "Warning"
    """Firecracker's own log (``PUT /logger``) level; None sends no logger call."""
    metrics: bool = False
    """Send ``PUT /metrics`` (a JSON line per minute into the jail)."""
    kvm_device: Path | None = Path("/dev/kvm")
    """Checked before a start (None skips the check)."""


@dataclasses.dataclass
class _Record:
    """``ember.json``: what the driver knows about one VM, outside its chroot."""

    vm_id: str
    jail_id: str
    uid: int
    gid: int
    pid: int | None = None
    start_ticks: int | None = None
    console_log: str | None = None
    released: bool = False
    """The VM is gone, its jail cleared and its uid free again."""
    exit_code: int | None = None

    @classmethod
    def load(cls, path: Path) -> _Record | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            raise VmmError(f"unreadable Firecracker VM record {path}: {exc}") from exc
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        os.replace(tmp, path)


class FirecrackerDriver:
    """Runs each VM as a jailed Firecracker; see the module docstring."""

    name = "firecracker"

    def __init__(self, config: FirecrackerConfig | None = None) -> None:
        self.config = config or FirecrackerConfig()
        self._lock = threading.RLock()
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- the VmmDriver interface --

    def start(self, spec: VmSpec) -> VmHandle:
        check_spec(spec)
        self._preflight(spec)
        layout = JailLayout.of(self.config.jailer, spec.vm_id)
        paths = JailPaths.of(spec)
        calls = boot_calls(
            spec, paths, log_level=self.config.log_level, metrics=self.config.metrics
        )
        with self._lock:
            record = self._claim(spec, layout)
        try:
            jailer.stage_chroot(
                layout,
                spec,
                paths,
                uid=record.uid,
                gid=record.gid,
                metrics=self.config.metrics,
            )
            if self.config.jailer.netns is None and self.config.jailer.own_taps:
                for net in spec.nets:
                    jailer.hand_tap_to(net.tap, record.uid, record.gid)
            process = self._spawn(spec, layout, record)
            self._wait_for_socket(spec.vm_id, layout, process, record)
            with FirecrackerApi(layout.socket, timeout_s=self.config.api_timeout_s) as api:
                for call in calls:
                    api.send(call)
        except BaseException as exc:
            self._abort(spec.vm_id, layout, record)
            if isinstance(exc, VmmError) and not isinstance(exc, VmSpecInvalid):
                tail = _tail(Path(record.console_log)) if record.console_log else ""
                if tail:
                    exc.detail.setdefault("console_tail", tail)
            raise
        assert record.pid is not None
        log.info("firecracker VM %s started: pid %d uid %d", spec.vm_id, record.pid, record.uid)
        return VmHandle(spec.vm_id, record.pid, VmState.RUNNING)

    def adopt(self, spec: VmSpec) -> VmHandle | None:
        layout = JailLayout.of(self.config.jailer, spec.vm_id)
        with self._lock:
            record = _Record.load(layout.state_file)
            if record is None or record.released or record.vm_id != spec.vm_id:
                return None
            if self._alive(spec.vm_id, record):
                assert record.pid is not None
                return VmHandle(spec.vm_id, record.pid, VmState.RUNNING)
            self._finish(spec.vm_id, layout, record)
            return None

    def status(self, vm_id: str) -> VmHandle:
        layout = JailLayout.of(self.config.jailer, vm_id)
        with self._lock:
            record = self._record(vm_id, layout)
            if not record.released and self._alive(vm_id, record):
                assert record.pid is not None
                return VmHandle(vm_id, record.pid, VmState.RUNNING)
            if not record.released:
                self._finish(vm_id, layout, record)
            return VmHandle(vm_id, record.pid or 0, VmState.EXITED, record.exit_code)

    def stop(self, vm_id: str, *, timeout_s: float) -> VmHandle:
        layout = JailLayout.of(self.config.jailer, vm_id)
        with self._lock:
            record = self._record(vm_id, layout)
        if not record.released and self._alive(vm_id, record):
            graceful = True
            try:
                with FirecrackerApi(
                    layout.socket, timeout_s=min(self.config.api_timeout_s, max(timeout_s, 0.1))
                ) as api:
                    for call in stop_calls():
                        api.send(call)
            except VmmError as exc:
                log.warning("VM %s: no graceful stop (%s); killing it", vm_id, exc.message)
                graceful = False
            if not (graceful and self._wait_gone(vm_id, record, timeout_s)):
                self._kill(vm_id, record)
                if not self._wait_gone(vm_id, record, 10.0):
                    raise VmmError(
                        f"Firecracker of VM {vm_id} (pid {record.pid}) survived SIGKILL",
                        detail={"vm_id": vm_id, "pid": record.pid},
                    )
        with self._lock:
            # Re-read: a concurrent status() may have collected the exit already.
            record = self._record(vm_id, layout)
            if not record.released:
                self._finish(vm_id, layout, record)
        return VmHandle(vm_id, record.pid or 0, VmState.EXITED, record.exit_code)

    # -- internals --

    def _preflight(self, spec: VmSpec) -> None:
        config = self.config.jailer
        if "firecracker" not in config.exec_name:
            raise VmmUnavailable(
                f"the Firecracker binary's name {config.exec_name!r} lacks 'firecracker'",
                hint="the jailer refuses any other exec file; rename or link it",
            )
        for binary in (config.jailer_bin, config.firecracker_bin):
            if not os.access(binary, os.X_OK):
                raise VmmUnavailable(
                    f"{binary} is missing or not executable",
                    hint="install Firecracker's release binaries (docs/operations/firecracker.md)",
                    detail={"path": str(binary)},
                )
        kvm = self.config.kvm_device
        if kvm is not None and not kvm.exists():
            raise VmmUnavailable(f"{kvm} is missing: Firecracker needs KVM")
        netns = jailer.netns_path(config, spec.vm_id)
        if netns is not None and not netns.exists():
            raise VmmUnavailable(
                f"network namespace {netns} does not exist",
                hint="create the VM's namespace and tap before starting it",
                detail={"netns": str(netns)},
            )

    def _records(self) -> Iterator[_Record]:
        base = self.config.jailer.chroot_base / self.config.jailer.exec_name
        if not base.is_dir():
            return
        for state in base.glob(f"*/{jailer.STATE_FILE}"):
            record = _Record.load(state)
            if record is not None:
                yield record

    def _claim(self, spec: VmSpec, layout: JailLayout) -> _Record:
        """Reserve the jail and a uid (under the lock)."""
        old = _Record.load(layout.state_file)
        if old is not None and not old.released:
            if self._alive(spec.vm_id, old):
                raise VmmError(
                    f"VM {spec.vm_id} is already running (pid {old.pid})",
                    hint="adopt it, or stop it first",
                    detail={"vm_id": spec.vm_id, "pid": old.pid},
                )
            self._finish(spec.vm_id, layout, old)
        jailer.clear_chroot(layout)
        taken = {r.uid for r in self._records() if not r.released}
        uid = jailer.allocate_id(self.config.jailer.ids, taken)
        layout.jail_dir.mkdir(parents=True, exist_ok=True)
        console = spec.console_log or layout.jail_dir / "console.log"
        record = _Record(
            vm_id=spec.vm_id,
            jail_id=layout.jail_id,
            uid=uid,
            gid=uid,
            console_log=str(console),
        )
        record.save(layout.state_file)
        return record

    def _spawn(self, spec: VmSpec, layout: JailLayout, record: _Record) -> subprocess.Popen[bytes]:
        argv = jailer.jailer_argv(self.config.jailer, spec, uid=record.uid, gid=record.gid)
        assert record.console_log is not None
        console = Path(record.console_log)
        console.parent.mkdir(parents=True, exist_ok=True)
        with open(console, "ab") as out:
            # Its own session: the VMM outlives the agent and ignores its terminal.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                cwd=layout.jail_dir,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        self._children[spec.vm_id] = process
        record.pid = process.pid
        record.start_ticks = process_start_ticks(process.pid)
        record.save(layout.state_file)
        return process

    def _wait_for_socket(
        self,
        vm_id: str,
        layout: JailLayout,
        process: subprocess.Popen[bytes],
        record: _Record,
    ) -> None:
        deadline = time.monotonic() + self.config.socket_timeout_s
        while True:
            code = process.poll()
            if code is not None:
                raise VmmError(
                    f"the jailer/Firecracker of VM {vm_id} exited with {code} before its "
                    "API socket opened",
                    hint=f"read {record.console_log}",
                    detail={"vm_id": vm_id, "exit_code": code},
                )
            if layout.socket.exists() and socket_accepts(layout.socket):
                return
            if time.monotonic() > deadline:
                raise VmmError(
                    f"Firecracker of VM {vm_id} opened no API socket within "
                    f"{self.config.socket_timeout_s}s",
                    detail={"vm_id": vm_id, "socket": str(layout.socket)},
                )
            time.sleep(0.02)

    def _abort(self, vm_id: str, layout: JailLayout, record: _Record) -> None:
        """Undo a failed start: kill, clear, release."""
        if record.pid is not None and self._alive(vm_id, record):
            self._kill(vm_id, record)
            self._wait_gone(vm_id, record, 10.0)
        with self._lock:
            self._finish(vm_id, layout, record)

    def _record(self, vm_id: str, layout: JailLayout) -> _Record:
        record = _Record.load(layout.state_file)
        if record is None or record.vm_id != vm_id:
            raise VmNotFound(f"no Firecracker VM {vm_id} on this host", detail={"vm_id": vm_id})
        return record

    def _alive(self, vm_id: str, record: _Record) -> bool:
        child = self._children.get(vm_id)
        if child is not None and child.pid == record.pid:
            return child.poll() is None
        if record.pid is None or record.start_ticks is None:
            return False
        return is_vmm_process(record.pid, record.start_ticks, record.jail_id)

    def _kill(self, vm_id: str, record: _Record) -> None:
        if record.pid is None or not self._alive(vm_id, record):
            return  # never signal a pid that is no longer ours
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)

    def _wait_gone(self, vm_id: str, record: _Record, timeout_s: float) -> bool:
        child = self._children.get(vm_id)
        if child is not None and child.pid == record.pid:
            try:
                child.wait(timeout=max(timeout_s, 0))
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while self._alive(vm_id, record):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _finish(self, vm_id: str, layout: JailLayout, record: _Record) -> None:
        """The VMM is gone: collect its exit code, clear the jail, free the uid."""
        child = self._children.pop(vm_id, None)
        if child is not None and child.pid == record.pid:
            record.exit_code = child.wait()
        elif record.pid is not None and record.start_ticks is not None:
            record.exit_code = _reap_if_zombie_child(record.pid, record.start_ticks)
        jailer.clear_chroot(layout)
        cgroup = jailer.cgroup_dir(self.config.jailer, vm_id)
        with contextlib.suppress(FileNotFoundError):
            try:
                cgroup.rmdir()
            except OSError as exc:
                log.warning("VM %s: cgroup %s not removed: %s", vm_id, cgroup, exc)
        record.released = True
        record.save(layout.state_file)
        log.info("firecracker VM %s gone (exit %s); jail cleared", vm_id, record.exit_code)


def _reap_if_zombie_child(pid: int, start_ticks: int) -> int | None:
    """The exit status of the VMM ``pid`` when it is a zombie child of this process (an
    agent that restarted in the same process), else None (init reaped it)."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] != "Z" or int(fields[19]) != start_ticks:
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done != pid:
        return None
    return os.waitstatus_to_exitcode(status)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
