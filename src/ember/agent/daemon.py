"""The host agent's loop: enroll, heartbeat, poll allocations, converge, report.

Synchronous: :meth:`Agent.step` observes the VMs (``driver.status``), runs the health
checks of running VMs that are not healthy yet, lists the allocations, computes
:func:`ember.agent.converge.plan` and executes it. Slow work — preparing an image,
creating the tap, writing the config drive and starting the VMM; stopping a VM — runs on a
small thread pool; while it runs the instance is ``preparing`` (or ``stop_requested``),
which the plan leaves alone, so nothing is started or stopped twice.

The allocations are *polled* (``GET /v1/hosts/{id}/allocations`` every ``poll_s``): the
control plane has no watch endpoint for allocations yet (list + watch with a cursor and
re-list on 410 is the issue's goal; the cursor is already in the list's answer).

Local state (:mod:`ember.agent.state`) is saved after every change; on start-up
:meth:`Agent.adopt` asks the driver to adopt the VM of every recorded instance, so a
restarted agent neither duplicates nor orphans VMs.

Not yet: the ``exec`` health check (counted as passing), ``unhealthy`` reports after a
VM was healthy, per-org firewall grouping (the allocation carries no org: instances are
grouped by app, which is stricter), secrets and volumes on the config drive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import logging
import math
import os
import re
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
from ember.agent.guest_config import GuestConfig, Network, write_config_drive
from ember.agent.net.addressing import HostLocalAllocator, Lease
from ember.agent.net.firewall import Endpoint, Firewall
from ember.agent.net.taps import TapNetwork
from ember.agent.oci.store import PreparedImage
from ember.agent.state import AgentState, InstanceRecord, StateStore
from ember.agent.vmm.base import Drive, NetDevice, VmmDriver, VmNotFound, VmSpec, VmState
from ember.core.errors import Unavailable, ValidationFailed
from ember.core.instances import InstanceSpec

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
    "HealthTarget",
    "HostNetwork",
    "TapHostNetwork",
    "build_guest_config",
    "check_health",
    "health_targets",
]


# -- collaborators -------------------------------------------------------------------------


class ControlPlane(Protocol):
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


@dataclasses.dataclass(frozen=True)
class HealthTarget:
    port: int
    type: str = "tcp"  # tcp | http | exec
    path: str = "/"


def health_targets(services: Sequence[Mapping[str, Any]], process: str) -> list[HealthTarget]:
    """The checks of ``process``'s services (an exec check is skipped: not supported yet)."""
    out: list[HealthTarget] = []
    for svc in services:
        if process and svc.get("process", process) != process:
            continue
        port = int(svc["internal_port"])
        for check in svc.get("checks") or []:
            kind = str(check.get("type", "tcp"))
            if kind in ("tcp", "http"):
                out.append(HealthTarget(port, kind, str(check.get("path") or "/")))
    return out


def build_guest_config(
    spec: InstanceSpec, image: PreparedImage, network: Network | None, hostname: str | None
) -> GuestConfig:
    """The config drive of an instance: the spec's command, else the image's Entrypoint +
    Cmd; the image's Env overridden by the spec's; the image's User and WorkingDir."""
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
    )


def _hostname(alloc: Allocation) -> str:
    """A DNS label for the guest: ``<process>-<instance id>`` (``_`` becomes ``-``)."""
    label = re.sub(r"[^a-z0-9-]+", "-", f"{alloc.process or 'app'}-{alloc.instance_id}".lower())
    return label[:63].strip("-") or "instance"


def check_health(address: str, targets: Sequence[HealthTarget], timeout_s: float = 1.0) -> bool:
    """Every check passes: tcp connects; http GET answers 2xx/3xx."""
    for t in targets:
        try:
            if t.type == "http":
                conn = http.client.HTTPConnection(address, t.port, timeout=timeout_s)
                try:
                    conn.request("GET", t.path)
                    if not 200 <= conn.getresponse().status < 400:
                        return False
                finally:
                    conn.close()
            else:
                with socket.create_connection((address, t.port), timeout=timeout_s):
                    pass
        except OSError:
            return False
    return True


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
    health_timeout_s: float = 1.0


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
        health: Callable[[str, Sequence[HealthTarget], float], bool] = check_health,
    ) -> None:
        self.config = config
        self.control = control
        self.store = store
        self.driver = driver
        self.images = images
        self.network = network
        self.health = health
        self._lock = threading.RLock()
        self.state: AgentState = store.load()
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="ember-agent")
        self._busy: dict[str, Future[None]] = {}
        self._allocs: dict[str, Allocation] = {}

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
            workdir=vm_dir / "run",
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
        """VM exits and health checks of running, not yet healthy instances."""
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
            if not record.healthy and record.address:
                alloc = self._allocs.get(iid)
                targets = (
                    health_targets(alloc.spec.get("services") or [], alloc.process)
                    if alloc is not None
                    else []
                )
                if self.health(record.address, targets, self.config.health_timeout_s):
                    self._update(iid, healthy=True)

    def step(self) -> list[Action]:
        """Observe, list the allocations, plan, execute; returns the actions taken."""
        self._reap()
        self.observe()
        allocations = self.control.allocations(self.config.host_id)
        self._allocs = {a.instance_id: a for a in allocations}
        with self._lock:
            local = {
                iid: r.local_vm()
                for iid, r in self.state.instances.items()
                if iid not in self._busy
            }
            busy = set(self._busy)
        actions = [a for a in plan(allocations, local) if a.instance_id not in busy]
        for action in actions:
            self._execute(action)
        return actions

    def idle(self) -> bool:
        self._reap()
        return not self._busy

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
            self._busy[instance_id] = self._pool.submit(fn)

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
            lease = self.network.attach(iid, alloc.app_id)
            address = str(lease.ipv6)
            self._update(iid, tap=lease.tap, address=address)
            guest = build_guest_config(spec, image, lease.guest_network(), _hostname(alloc))
            write_config_drive(guest, vm_dir / "config.img")
            vm = self._vm_spec(
                record,
                lease,
                vcpus=max(1, math.ceil(spec.cpus)),
                memory_mb=spec.memory_mb,
            )
            self.driver.start(vm)
            self._update(iid, status=LocalStatus.RUNNING, started_at=time.time())
        except Exception as exc:
            log.exception("instance %s: start failed", iid)
            self._update(iid, status=LocalStatus.EXITED, reason=f"start failed: {exc}"[:2000])

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
        """Adopt, then heartbeat and converge until ``stopping()``; VMs keep running."""
        adopted = self.adopt()
        if adopted:
            log.warning("adopted %d running VM(s): %s", len(adopted), ", ".join(adopted))
        next_beat = 0.0
        while not stopping():
            now = time.monotonic()
            try:
                if now >= next_beat:
                    self.heartbeat()
                    next_beat = now + self.config.heartbeat_s
                self.step()
            except Exception as exc:  # the control plane is down, a transient error...
                # A control plane that is down is expected: no traceback for it.
                log.warning("agent step failed: %s", exc, exc_info=not isinstance(exc, Unavailable))
            time.sleep(self.config.poll_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ClientControlPlane:
    """:class:`ControlPlane` over ``ember.client.Client`` (node-authenticated)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def heartbeat(self, host_id: str, report: Mapping[str, Any]) -> None:
        self.client.heartbeat(host_id, report)

    def allocations(self, host_id: str) -> list[Allocation]:
        return [Allocation.from_wire(a) for a in self.client.host_allocations(host_id).items]

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
