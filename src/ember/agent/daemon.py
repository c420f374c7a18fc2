"""The host agent's loop: enroll, heartbeat, watch allocations, converge, report.

Synchronous: :meth:`Agent.step` observes the VMs (``driver.status``) and their health,
takes the desired allocations, computes
:func:`ember.agent.converge.plan` and executes it. Slow work — preparing an image,
creating the tap, writing the config drive and starting the VMM; stopping a VM — runs on a
small thread pool; while it runs the instance is ``preparing`` (or ``stop_requested``),
which the plan leaves alone, so nothing is started or stopped twice.

The allocations come by list + watch (:mod:`ember.agent.watch`): a thread lists them,
then long-polls the watch from the list's cursor, and lists again on 410 or after an
error. :meth:`Agent.run` steps every ``poll_s`` (observing VMs and health needs a
cadence of its own) and at once when the watch reports a change, so a placement reaches
:meth:`Agent.step` in milliseconds. Until the first list answers, it only observes.

Local state (:mod:`ember.agent.state`) is saved after every change; on start-up
:meth:`Agent.adopt` asks the driver to adopt the VM of every recorded instance, so a
restarted agent neither duplicates nor orphans VMs.

Health (:mod:`ember.agent.health`): every running instance's checks run on their own
schedule for as long as it runs. tcp and http checks are probes from the host on a small
pool of their own (``check_workers``), so a slow check never holds up converging; exec
checks run inside the guest (the platform init, config drive ``check`` lines) and their
results are read from the console log, trusted only with the instance's per-boot
``check_token``. A changed verdict is recorded and reported by the plan: ``healthy`` ⇄
``unhealthy``, each transition once.

Network: each instance joins its allocation's org group in the host firewall
(:attr:`ember.agent.converge.Allocation.network_group`): instances of one org reach each
other, never another org's, nor the host's own services.

Not yet: secrets and volumes on the config drive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from ember.agent.converge import (
    Action,
    Allocation,
    Forget,
    LocalStatus,
    Prepare,
    Report,
    Start,
    Stop,
    plan,
)
from ember.agent.guest_config import (
    ConsoleCursor,
    GuestCheck,
    GuestConfig,
    Network,
    parse_check_line,
    read_console,
    write_config_drive,
)
from ember.agent.health import Check, InstanceHealth, Result, checks_of
from ember.agent.logship import LogShipper
from ember.agent.net.addressing import HostLocalAllocator, Lease
from ember.agent.net.firewall import Endpoint, Firewall
from ember.agent.net.taps import TapNetwork
from ember.agent.oci.store import PreparedImage
from ember.agent.state import AgentState, InstanceRecord, StateStore
from ember.agent.vmm.base import Drive, NetDevice, VmmDriver, VmNotFound, VmSpec, VmState
from ember.agent.watch import AllocationChange, AllocationSource, AllocationWatch, changes_of
from ember.core.errors import EmberError, Unavailable, ValidationFailed
from ember.core.instances import InstanceSpec
from ember.wire.logs import LogShipLine

log = logging.getLogger("ember.agent")


class NotEnrolled(ValidationFailed):
    """No host id in the data dir and no enrolment token to get one."""

    code = "agent.not_enrolled"


class NoRegistry(Unavailable):
    """The control plane names no registry to pull images from."""

    code = "agent.no_registry"


__all__ = [
    "Agent",
    "AgentConfig",
    "ControlPlane",
    "HostNetwork",
    "TapHostNetwork",
    "build_guest_config",
    "probe",
]


# -- collaborators -------------------------------------------------------------------------


class ControlPlane(Protocol):
    """The control plane's agent routes. One that is also an
    :class:`~ember.agent.watch.AllocationSource` (list + watch: ClientControlPlane, the
    boot benchmark's file control plane) is watched; another is listed on every step."""

    def heartbeat(self, host_id: str, report: Mapping[str, Any]) -> None: ...

    def allocations(self, host_id: str) -> list[Allocation]: ...

    def report(
        self,
        instance_id: str,
        *,
        host_id: str,
        state: str,
        exit_code: int | None,
        reason: str,
        address: str | None,
    ) -> None: ...

    def ship_logs(self, host_id: str, instance_id: str, lines: Sequence[LogShipLine]) -> None:
        """Post console lines of an instance on this host (ember.agent.logship)."""
        ...


class Images(Protocol):
    def prepare(self, repository: str, digest: str) -> PreparedImage: ...


class HostNetwork(Protocol):
    def attach(self, instance_id: str, group: str) -> Lease:
        """The instance's lease with its tap up and the firewall applied (idempotent)."""
        ...

    def detach(self, instance_id: str) -> None: ...


class TapHostNetwork:
    """:class:`HostNetwork` with the host-local allocator, taps and nftables."""

    def __init__(
        self, allocator: HostLocalAllocator, taps: TapNetwork, firewall: Firewall | None
    ) -> None:
        self.allocator = allocator
        self.taps = taps
        self.firewall = firewall
        self._groups: dict[str, str] = {}
        self._lock = threading.Lock()

    def attach(self, instance_id: str, group: str) -> Lease:
        with self._lock:
            lease = self.allocator.allocate(instance_id)
            self.taps.create(lease)
            self._groups[instance_id] = group
            self._sync()
            return lease

    def detach(self, instance_id: str) -> None:
        with self._lock:
            lease = self.allocator.leases().get(instance_id)
            if lease is not None:
                self.taps.delete(lease)
                self.allocator.release(instance_id)
            self._groups.pop(instance_id, None)
            self._sync()

    def _sync(self) -> None:
        if self.firewall is None:
            return
        leases = self.allocator.leases()
        self.firewall.sync(
            Endpoint.from_lease(leases[iid], group or "default")
            for iid, group in sorted(self._groups.items())
            if iid in leases
        )


# -- pure helpers ----------------------------------------------------------------------------


def build_guest_config(
    spec: InstanceSpec,
    image: PreparedImage,
    network: Network | None,
    hostname: str | None,
    *,
    checks: Sequence[Check] = (),
    check_token: str | None = None,
) -> GuestConfig:
    """The config drive of an instance: the spec's command, else the image's Entrypoint +
    Cmd; the image's Env overridden by the spec's; the image's User and WorkingDir; the
    ``exec`` ones of ``checks`` for the init to run, with ``check_token``."""
    cfg = image.config
    argv = tuple(spec.command) if spec.command else (*(cfg.entrypoint or ()), *(cfg.cmd or ()))
    return GuestConfig(
        argv=argv,
        env=GuestConfig.env_from({**cfg.env_dict(), **spec.env}),
        hostname=hostname,
        user=cfg.user,
        workdir=cfg.working_dir or "/",
        kill_signal=spec.kill_signal,
        kill_timeout_s=spec.kill_timeout_s,
        network=network,
        checks=tuple(
            GuestCheck(c.command, c.interval_s, c.timeout_s) for c in checks if c.in_guest
        ),
        check_token=check_token,
    )


def _hostname(alloc: Allocation) -> str:
    """A DNS label for the guest: ``<process>-<instance id>`` (``_`` becomes ``-``)."""
    label = re.sub(r"[^a-z0-9-]+", "-", f"{alloc.process or 'app'}-{alloc.instance_id}".lower())
    return label[:63].strip("-") or "instance"


def probe(address: str, check: Check) -> Result:
    """One tcp or http check from the host: tcp connects to the port; http ``GET path``
    answers 2xx or 3xx. ``check.timeout_s`` bounds the whole check, not each socket call:
    a server trickling a byte at a time must not hold a probe thread (there are few, and
    every instance's checks share them) past its timeout. So the http request is a
    minimal HTTP/1.0 exchange on a socket with a deadline (http.client's timeout is per
    call) that reads only the status line."""
    deadline = time.monotonic() + check.timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    try:
        with socket.create_connection((address, check.port), timeout=check.timeout_s) as sock:
            if check.type != "http":
                return Result(True)
            host = f"[{address}]" if ":" in address else address
            request = (
                f"GET {check.path} HTTP/1.0\r\nHost: {host}:{check.port}\r\n"
                "User-Agent: ember-agent/health\r\nConnection: close\r\n\r\n"
            )
            sock.settimeout(left())
            sock.sendall(request.encode("ascii", "replace"))
            head = b""
            while b"\n" not in head and len(head) < 1024:
                sock.settimeout(left())
                chunk = sock.recv(1024)
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        return Result(False, "timeout")
    except OSError as exc:
        return Result(False, exc.strerror or type(exc).__name__)
    parts = head.split(b"\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return Result(False, "the answer is not HTTP")
    status = int(parts[1])
    if not 200 <= status < 400:
        return Result(False, f"status {status}")
    return Result(True)


def _outcome(done: Future[Result]) -> Result:
    try:
        return done.result()
    except Exception as exc:  # a bug in a probe must not stop every instance's checks
        log.exception("health probe failed")
        return Result(False, f"check error: {exc}")


# -- the agent ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    host_id: str
    kernel: Path
    initrd: Path | None
    kernel_args: str
    vcpus: int
    memory_mb: int
    heartbeat_s: float = 5.0
    poll_s: float = 1.0
    workers: int = 4
    check_workers: int = 4
    """Threads for tcp/http health probes (each waits at most its check's timeout)."""


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        control: ControlPlane,
        store: StateStore,
        driver: VmmDriver,
        images: Images,
        network: HostNetwork,
        health: Callable[[str, Check], Result] = probe,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.control = control
        self.store = store
        self.driver = driver
        self.images = images
        self.network = network
        self.health = health
        self.clock = clock
        """Wall-clock seconds: start times (persisted) and health check schedules."""
        self._lock = threading.RLock()
        self.state: AgentState = store.load()
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="ember-agent")
        self._busy: dict[str, Future[None]] = {}
        self._allocs: dict[str, Allocation] = {}
        self._adopted: set[str] = set()
        """Adopted instances not yet back in the host network's bookkeeping (``step``)."""
        self._checks = ThreadPoolExecutor(config.check_workers, thread_name_prefix="ember-check")
        self._health: dict[str, InstanceHealth] = {}
        self._probes: dict[str, dict[int, Future[Result]]] = {}
        self._consoles: dict[str, ConsoleCursor] = {}
        self._wake = threading.Event()
        """Set to step at once (not at the next ``poll_s``): the allocations changed, a
        health probe answered (so a passing check is reported without delay), or slow
        work (a start, a stop) finished."""
        self.logs = LogShipper(
            store.data_dir / "logship.json",
            lambda iid, lines: control.ship_logs(config.host_id, iid, lines),
        )

    # -- state ----------------------------------------------------------------------------

    def _update(self, instance_id: str, **changes: Any) -> InstanceRecord:
        with self._lock:
            record = dataclasses.replace(self.state.instances[instance_id], **changes)
            self.state = self.state.with_instance(record)
            self.store.save(self.state)
            return record

    def _vm_spec(self, record: InstanceRecord, lease: Lease | None = None, **kw: Any) -> VmSpec:
        vm_dir = self.store.vm_dir(record.instance_id)
        return VmSpec(
            vm_id=record.vm_id,
            kernel=self.config.kernel,
            initrd=self.config.initrd,
            kernel_args=self.config.kernel_args,
            vcpus=kw.get("vcpus", 1),
            memory_mb=kw.get("memory_mb", 128),
            drives=(
                Drive("root", vm_dir / "rootfs.ext4"),
                Drive("config", vm_dir / "config.img", read_only=True),
            ),
            nets=(NetDevice("eth0", lease.tap, lease.mac),) if lease is not None else (),
            console_log=vm_dir / "console.log",
            workdir=self.store.vm_run_dir(record.instance_id),
        )

    # -- start-up -------------------------------------------------------------------------

    def adopt(self) -> list[str]:
        """Adopt the VM of every recorded running instance; those gone become exited (and
        are reported ``failed``/``stopped`` by the next plan). Returns the adopted ids."""
        adopted = []
        for iid, record in sorted(self.state.instances.items()):
            if record.status is LocalStatus.EXITED:
                continue
            handle = self.driver.adopt(self._vm_spec(record))
            if handle is not None and handle.state is VmState.RUNNING:
                adopted.append(iid)
                if record.status is not LocalStatus.RUNNING:
                    self._update(iid, status=LocalStatus.RUNNING)
                continue
            code = None
            with contextlib.suppress(VmNotFound):
                code = self.driver.status(record.vm_id).exit_code
            self._update(
                iid,
                status=LocalStatus.EXITED,
                exit_code=code,
                reason=record.reason or "the VM was gone when the agent restarted",
            )
        self._adopted = set(adopted)
        return adopted

    # -- one pass ---------------------------------------------------------------------------

    def heartbeat(self) -> None:
        running = [r for r in self.state.instances.values() if r.status is not LocalStatus.EXITED]
        self.control.heartbeat(
            self.config.host_id,
            {
                "vcpus": self.config.vcpus,
                "memory_mb": self.config.memory_mb,
                "instances": len(running),
                "vmm": self.driver.name,
            },
        )

    def observe(self) -> None:
        """VM exits, and the health of the running VMs (:meth:`_observe_health`)."""
        now = self.clock()
        watched = set()
        for iid, record in sorted(self.state.instances.items()):
            if record.status is not LocalStatus.RUNNING or iid in self._busy:
                continue
            try:
                handle = self.driver.status(record.vm_id)
            except VmNotFound:
                self._update(iid, status=LocalStatus.EXITED, reason="the VM is unknown")
                continue
            if handle.state is VmState.EXITED:
                self._update(iid, status=LocalStatus.EXITED, exit_code=handle.exit_code)
                continue
            watched.add(iid)
            try:
                self._observe_health(record, now)
            except Exception:  # one instance's checks must not stop the others' converging
                log.exception("instance %s: health checks failed", iid)
        for iid in set(self._health) - watched:  # exited or stopping: checks are over
            self._health.pop(iid, None)
            self._probes.pop(iid, None)  # a probe still running ends on its own
            self._consoles.pop(iid, None)

    def _observe_health(self, record: InstanceRecord, now: float) -> None:
        """Record the finished probes and the init's exec check lines (console lines
        with the instance's ``check_token``), start the probes that are due, save a
        changed verdict (the plan reports it)."""
        iid = record.instance_id
        alloc = self._allocs.get(iid)
        if alloc is None:
            return  # the checks come with the allocation (a restarted agent: first list)
        health = self._health.get(iid)
        if health is None:
            checks = checks_of(alloc.spec.get("services") or [], alloc.process)
            health = InstanceHealth.of(checks, record.health)
        started_at = record.started_at or 0.0
        probes = self._probes.setdefault(iid, {})
        for index, fut in list(probes.items()):
            if fut.done():
                del probes[index]
                health = health.record(index, _outcome(fut), now=now, started_at=started_at)
        if health.guest_checks and record.check_token:
            path = self.store.vm_dir(iid) / "console.log"
            cursor = self._consoles.get(iid) or ConsoleCursor.at_end(path)
            lines, self._consoles[iid] = read_console(path, cursor)
            for line in lines:
                if (got := parse_check_line(line, record.check_token)) is not None:
                    result = Result(got.ok, got.detail)
                    health = health.record_guest(got.index, result, now=now, started_at=started_at)
            health = health.silent(now, started_at)
        address = record.address or ""
        for index in health.due(now, started_at) if address else ():
            if index not in probes:  # never two runs of one check at once
                probes[index] = self._checks.submit(self.health, address, health.checks[index])
                probes[index].add_done_callback(lambda _: self._wake.set())
                health = health.started(index, now)
        self._health[iid] = health
        if health.verdict != record.health:
            self._update(iid, health=health.verdict, health_reason=health.reason)

    def step(self, allocations: Sequence[Allocation] | None = None) -> list[Action]:
        """Observe, plan against ``allocations`` (the watched set; None: list them now),
        execute; returns the actions taken."""
        self._reap()
        self.observe()
        # Before the plan: an exited VM's last lines leave before Forget deletes its dir.
        self.ship_logs()
        if allocations is None:
            allocations = self.control.allocations(self.config.host_id)
        self._allocs = {a.instance_id: a for a in allocations}
        # Adopted VMs rejoin the host network's bookkeeping (their group is the
        # allocation's) before anything changes it: the firewall is rendered from it as a
        # whole, and from the next attach on a tap it does not know could send nothing.
        self._adopted &= self._allocs.keys()
        for iid in sorted(self._adopted):
            self.network.attach(iid, self._allocs[iid].network_group)
            self._adopted.discard(iid)
        with self._lock:
            local = {
                iid: r.local_vm()
                for iid, r in self.state.instances.items()
                if iid not in self._busy
            }
            busy = set(self._busy)
        actions = [a for a in plan(allocations, local) if a.instance_id not in busy]
        for action in actions:
            try:
                self._execute(action)
            except Exception as exc:  # one instance's failed report must not stall the rest
                log.warning(
                    "instance %s: %s failed: %s",
                    action.instance_id,
                    type(action).__name__,
                    exc,
                    exc_info=not isinstance(exc, EmberError),
                )
        return actions

    def ship_logs(self) -> int:
        """Ship what is new in every instance's console; a failure is logged, never
        raised (converging matters more; the lines are read again next pass)."""
        consoles = {
            iid: (self.store.vm_dir(iid) / "console.log", r.status is LocalStatus.EXITED)
            for iid, r in self.state.instances.items()
        }
        try:
            return self.logs.ship(consoles)
        except Exception as exc:
            log.warning("log shipping failed: %s", exc, exc_info=not isinstance(exc, Unavailable))
            return 0

    def idle(self) -> bool:
        """No slow work and no health probe in flight."""
        self._reap()
        probing = any(not f.done() for probes in self._probes.values() for f in probes.values())
        return not self._busy and not probing

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _reap(self) -> None:
        with self._lock:
            for iid, fut in list(self._busy.items()):
                if fut.done():
                    del self._busy[iid]
                    exc = fut.exception()
                    if exc is not None:
                        log.error("instance %s: %s", iid, exc)

    def _submit(self, instance_id: str, fn: Callable[[], None]) -> None:
        with self._lock:
            future = self._pool.submit(fn)
            self._busy[instance_id] = future
        # Its outcome (a VM started or stopped) is reported, and a started VM's checks
        # begin, at the next step: make that now, not a poll interval later.
        future.add_done_callback(lambda _: self._wake.set())

    def _execute(self, action: Action) -> None:
        iid = action.instance_id
        if isinstance(action, Prepare):
            with self._lock:
                self.state = self.state.with_instance(
                    InstanceRecord(
                        instance_id=iid,
                        vm_id=iid,
                        repository=str(action.allocation.spec.get("repository", "")),
                        image_digest=str(action.allocation.spec.get("image_digest", "")),
                        status=LocalStatus.PREPARING,
                    )
                )
                self.store.save(self.state)
        elif isinstance(action, Start):
            alloc = action.allocation
            self._submit(iid, lambda: self._start(alloc))
        elif isinstance(action, Stop):
            self._update(iid, stop_requested=True)
            self._submit(iid, lambda: self._stop(iid, action.timeout_s))
        elif isinstance(action, Report):
            self.control.report(
                iid,
                host_id=self.config.host_id,
                state=action.state,
                exit_code=action.exit_code,
                reason=action.reason,
                address=action.address,
            )
            if iid in self.state.instances:
                self._update(iid, reported=action.state)
        elif isinstance(action, Forget):
            self._submit(iid, lambda: self._forget(iid))

    # -- slow work (pool threads) -----------------------------------------------------------

    def _start(self, alloc: Allocation) -> None:
        iid = alloc.instance_id
        try:
            spec = InstanceSpec.model_validate(dict(alloc.spec))
            image = self.images.prepare(spec.repository, spec.image_digest)
            record = self._update(iid, kill_timeout_s=spec.kill_timeout_s)
            vm_dir = self.store.vm_dir(iid)
            vm_dir.mkdir(parents=True, exist_ok=True)
            rootfs = vm_dir / "rootfs.ext4"
            if not rootfs.exists():  # a private, writable copy of the cached image
                tmp = rootfs.with_suffix(".tmp")
                subprocess.run(
                    ["cp", "--sparse=always", "--reflink=auto", str(image.rootfs_path), str(tmp)],
                    check=True,
                    capture_output=True,
                )
                os.replace(tmp, rootfs)
            lease = self.network.attach(iid, alloc.network_group)
            address = str(lease.ipv6)
            checks = checks_of(spec.services, alloc.process)
            # A fresh secret per boot: only the init knows it inside the guest.
            token = secrets.token_hex(16) if any(c.in_guest for c in checks) else ""
            self._update(iid, tap=lease.tap, address=address, check_token=token)
            guest = build_guest_config(
                spec,
                image,
                lease.guest_network(),
                _hostname(alloc),
                checks=checks,
                check_token=token or None,
            )
            write_config_drive(guest, vm_dir / "config.img")
            self._consoles[iid] = ConsoleCursor.at_end(vm_dir / "console.log")
            vm = self._vm_spec(
                record,
                lease,
                vcpus=max(1, math.ceil(spec.cpus)),
                memory_mb=spec.memory_mb,
            )
            self.driver.start(vm)
            self._update(iid, status=LocalStatus.RUNNING, started_at=self.clock())
        except Exception as exc:
            log.exception("instance %s: start failed", iid)
            # The stable code leads (``start failed (oci.digest_mismatch): ...``): `ember
            # status` shows this reason, and scripts match the code, not the prose.
            code = f" ({exc.code})" if isinstance(exc, EmberError) else ""
            reason = f"start failed{code}: {exc}"[:2000]
            self._update(iid, status=LocalStatus.EXITED, reason=reason)

    def _stop(self, instance_id: str, timeout_s: float) -> None:
        record = self.state.instances[instance_id]
        if record.status is not LocalStatus.RUNNING:
            return
        try:
            handle = self.driver.stop(record.vm_id, timeout_s=timeout_s)
            code = handle.exit_code
        except VmNotFound:
            code = None
        self._update(instance_id, status=LocalStatus.EXITED, exit_code=code)

    def _forget(self, instance_id: str) -> None:
        self.network.detach(instance_id)
        shutil.rmtree(self.store.vm_dir(instance_id), ignore_errors=True)
        with self._lock:
            self.state = self.state.without_instance(instance_id)
            self.store.save(self.state)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stopping: Callable[[], bool]) -> None:
        """Adopt, start watching the allocations, then heartbeat and converge until
        ``stopping()`` (noticed within 0.2 s): every ``poll_s``, and at once when the
        allocations change or a health probe answers. VMs keep running."""
        adopted = self.adopt()
        if adopted:
            log.warning("adopted %d running VM(s): %s", len(adopted), ", ".join(adopted))
        wake = self._wake
        watch = None
        if isinstance(self.control, AllocationSource):
            watch = AllocationWatch(self.control, self.config.host_id, on_change=wake.set)
            watch.start()
        next_beat = next_step = 0.0
        try:
            while not stopping():
                now = time.monotonic()
                if wake.is_set() or now >= next_step:
                    wake.clear()  # before the step: a change during it steps again
                    next_step = now + self.config.poll_s
                    if now >= next_beat:
                        next_beat = now + self.config.heartbeat_s
                        self._guarded("heartbeat", self.heartbeat)
                    self._guarded("step", lambda: self._converge(watch))
                wake.wait(max(0.0, min(next_step - time.monotonic(), 0.2)))
        finally:
            if watch is not None:
                watch.stop()

    def _converge(self, watch: AllocationWatch | None) -> None:
        if watch is None:
            self.step()
            return
        allocations = watch.current()
        if allocations is None:  # not listed yet: keep observing, plan nothing
            self._reap()
            self.observe()
        else:
            self.step(allocations)

    @staticmethod
    def _guarded(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # the control plane is down, a transient error...
            # A control plane that is down is expected: no traceback for it.
            log.warning("agent %s failed: %s", what, exc, exc_info=not isinstance(exc, Unavailable))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._checks.shutdown(wait=True, cancel_futures=True)


class ClientControlPlane:
    """:class:`ControlPlane` over ``ember.client.Client`` (node-authenticated)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def heartbeat(self, host_id: str, report: Mapping[str, Any]) -> None:
        self.client.heartbeat(host_id, report)

    def allocations(self, host_id: str) -> list[Allocation]:
        return self.list_allocations(host_id)[0]

    def list_allocations(self, host_id: str) -> tuple[list[Allocation], str]:
        listed = self.client.host_allocations(host_id)
        return [Allocation.from_wire(a) for a in listed.items], listed.cursor

    def watch_allocations(
        self, host_id: str, cursor: str, wait_s: float
    ) -> tuple[list[AllocationChange], str]:
        answer = self.client.watch_allocations(host_id, cursor, wait_s)
        return changes_of(answer.events), answer.cursor

    def report(
        self,
        instance_id: str,
        *,
        host_id: str,
        state: str,
        exit_code: int | None,
        reason: str,
        address: str | None,
    ) -> None:
        self.client.report_instance(
            instance_id,
            host_id=host_id,
            state=state,
            exit_code=exit_code,
            reason=reason,
            address=address,
        )

    def ship_logs(self, host_id: str, instance_id: str, lines: Sequence[LogShipLine]) -> None:
        self.client.ship_logs(host_id, instance_id, lines)


def ensure_enrolled(
    store: StateStore,
    *,
    api_url: str,
    host_id: str,
    enroll_token: str | None,
    vcpus: int,
    memory_mb: int,
) -> tuple[str, Any]:
    """The host id and node identity: enrolled now with ``enroll_token`` on the first
    start (the key pair is created in the data dir, the host id saved in the state),
    loaded on every later start (no token needed)."""
    from ember.client.api import Client
    from ember.client.node_auth import NodeIdentity

    identity = NodeIdentity.load_or_create(store.identity_path)
    state = store.load()
    if state.host_id is not None:
        return state.host_id, identity
    if not enroll_token:
        raise NotEnrolled(
            f"this host is not enrolled yet ({store.path} has no host id)",
            hint="give --enroll-token (an operator makes one with 'ember hosts enroll-token')",
            detail={"field": "--enroll-token"},
        )
    with Client(api_url, None) as anon:
        enrolled = anon.enroll(
            enroll_token,
            host_id=host_id,
            public_key=identity.public_key_b64,
            vcpus=vcpus,
            memory_mb=memory_mb,
        ).item
    store.save(dataclasses.replace(state, host_id=enrolled.host_id))
    return enrolled.host_id, identity
