"""The agent's loop against a fake control plane, driver, image store and network."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ember.agent.converge import Allocation
from ember.agent.daemon import Agent, AgentConfig, _hostname
from ember.agent.guest_config import parse
from ember.agent.health import Check, Result, checks_of
from ember.agent.net.addressing import AddressPlan, HostLocalAllocator, Lease, LeaseTable
from ember.agent.oci.store import PreparedImage, RuntimeConfig, Timings
from ember.agent.state import StateStore
from ember.agent.vmm.base import VmHandle, VmNotFound, VmSpec, VmState

DIGEST = "sha256:" + "b" * 64
SPEC = {
    "release_version": 1,
    "repository": "o/a",
    "image_digest": DIGEST,
    "command": None,
    "env": {"B": "2"},
    "memory_mb": 256,
    "cpus": 0.5,
    "services": [{"process": "web", "internal_port": 8080, "checks": [{"type": "tcp"}]}],
    "kill_timeout_s": 3,
}


class FakeControl:
    def __init__(self) -> None:
        self.allocs: dict[str, Allocation] = {}
        self.reports: list[tuple[Any, ...]] = []

    def heartbeat(self, host_id: str, report: Mapping[str, Any]) -> None: ...

    def allocations(self, host_id: str) -> list[Allocation]:
        return list(self.allocs.values())

    def report(self, instance_id: str, **kw: Any) -> None:
        self.reports.append((instance_id, kw["state"], kw["exit_code"], kw["address"]))
        a = self.allocs[instance_id]
        self.allocs[instance_id] = dataclasses.replace(a, state=kw["state"])


class FakeDriver:
    name = "fake"

    def __init__(self) -> None:
        self.vms: dict[str, VmHandle] = {}
        self.starts: list[VmSpec] = []

    def start(self, spec: VmSpec) -> VmHandle:
        self.starts.append(spec)
        self.vms[spec.vm_id] = VmHandle(spec.vm_id, 100, VmState.RUNNING)
        return self.vms[spec.vm_id]

    def adopt(self, spec: VmSpec) -> VmHandle | None:
        h = self.vms.get(spec.vm_id)
        return h if h is not None and h.state is VmState.RUNNING else None

    def status(self, vm_id: str) -> VmHandle:
        if vm_id not in self.vms:
            raise VmNotFound(vm_id)
        return self.vms[vm_id]

    def stop(self, vm_id: str, *, timeout_s: float) -> VmHandle:
        self.vms[vm_id] = VmHandle(vm_id, 100, VmState.EXITED, 143)
        return self.vms[vm_id]


class FakeImages:
    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs

    def prepare(self, repository: str, digest: str) -> PreparedImage:
        config = RuntimeConfig(env=("A=1", "B=1"), cmd=("httpd", "-f"), working_dir="/srv")
        return PreparedImage(digest, digest, self.rootfs, config, 1, True, Timings())


class FakeNetwork:
    def __init__(self) -> None:
        self.allocator = HostLocalAllocator(LeaseTable(AddressPlan.for_host("h1")))
        self.detached: list[str] = []
        self.attached: list[tuple[str, str]] = []

    def attach(self, instance_id: str, group: str) -> Lease:
        self.attached.append((instance_id, group))
        return self.allocator.allocate(instance_id)

    def detach(self, instance_id: str) -> None:
        self.detached.append(instance_id)
        self.allocator.release(instance_id)


class FakeClock:
    """Wall-clock seconds that move only when a test (or :func:`converge`) says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, driver: FakeDriver, control: FakeControl, healthy: list[bool]) -> Agent:
    rootfs = tmp_path / "image.ext4"
    rootfs.write_bytes(b"\0" * 4096)

    def health(address: str, check: Check) -> Result:
        return Result(True) if healthy[0] else Result(False, "connection refused")

    config = AgentConfig("h1", tmp_path / "vmlinux", None, "console=ttyS0", 4, 4096)
    return Agent(
        config,
        control=control,
        store=StateStore(tmp_path / "agent"),
        driver=driver,
        images=FakeImages(rootfs),
        network=FakeNetwork(),
        health=health,
        clock=FakeClock(),
    )


def converge(agent: Agent, passes: int = 4, tick_s: float = 1.0) -> None:
    """``passes`` steps, each after the previous one's work and probes finished, with
    the fake clock ``tick_s`` later."""
    for _ in range(passes):
        assert isinstance(agent.clock, FakeClock)
        agent.clock.now += tick_s
        agent.step()
        agent.wait_idle(10)


def test_start_health_stop_and_restart_adoption(tmp_path: Path) -> None:
    control, driver, healthy = FakeControl(), FakeDriver(), [False]
    control.allocs["i1"] = Allocation("i1", "assigned", "run", SPEC, "app", "web")
    agent = make(tmp_path, driver, control, healthy)
    converge(agent)
    (spec,) = driver.starts
    assert (spec.vcpus, spec.memory_mb) == (1, 256)
    guest = parse((tmp_path / "agent/vms/i1/config.img").read_bytes())
    assert guest.argv == ("httpd", "-f")
    assert dict(guest.env) == {"A": "1", "B": "2"}
    assert guest.workdir == "/srv"
    assert guest.kill_timeout_s == 3
    address = agent.state.instances["i1"].address
    assert address is not None
    assert control.reports == [("i1", "starting", None, address)]

    healthy[0] = True
    converge(agent)
    assert control.reports[-1] == ("i1", "healthy", None, address)

    # a restarted agent adopts the running VM: no start, no report
    agent.close()
    again = make(tmp_path, driver, control, healthy)
    assert again.adopt() == ["i1"]
    n = len(control.reports)
    converge(again)
    assert len(driver.starts) == 1
    assert len(control.reports) == n

    control.allocs["i1"] = dataclasses.replace(control.allocs["i1"], desired="stop")
    converge(again)
    assert control.reports[-1:] == [("i1", "stopped", 143, None)]
    assert "i1" not in again.state.instances  # forgotten once terminal
    again.close()


def test_adopted_vms_rejoin_the_host_network_before_it_changes(tmp_path: Path) -> None:
    """The firewall is rendered from the host network's bookkeeping as a whole: an adopted
    VM must be back in it, in its allocation's group, before a new instance is attached
    (that attach would otherwise cut the adopted VM off)."""
    control, driver = FakeControl(), FakeDriver()
    control.allocs["i1"] = Allocation("i1", "assigned", "run", SPEC, "app-a", "web")
    agent = make(tmp_path, driver, control, [True])
    converge(agent)
    agent.close()
    again = make(tmp_path, driver, control, [True])
    network = again.network
    assert isinstance(network, FakeNetwork)
    assert again.adopt() == ["i1"]
    control.allocs["i2"] = Allocation("i2", "assigned", "run", SPEC, "app-b", "web")
    converge(again)
    assert network.attached[0] == ("i1", "app:app-a")
    assert sorted(set(network.attached)) == [("i1", "app:app-a"), ("i2", "app:app-b")]
    assert len(driver.starts) == 2  # i2 only: i1 was adopted, not restarted
    again.close()


def test_a_vm_exiting_on_its_own_is_reported_failed(tmp_path: Path) -> None:
    control, driver = FakeControl(), FakeDriver()
    control.allocs["i1"] = Allocation("i1", "assigned", "run", SPEC, "app", "web")
    agent = make(tmp_path, driver, control, [True])
    converge(agent)
    driver.vms["i1"] = VmHandle("i1", 100, VmState.EXITED, 3)
    converge(agent)
    assert control.reports[-1][:3] == ("i1", "failed", 3)
    assert agent.state.instances.get("i1") is None
    agent.close()


def test_the_checks_are_the_process_s_own() -> None:
    services = [
        {"process": "web", "internal_port": 80, "checks": [{"type": "http", "path": "/up"}]},
        {"process": "worker", "internal_port": 81, "checks": [{"type": "tcp"}]},
        {"process": "web", "internal_port": 82, "checks": [{"type": "exec", "command": ["x"]}]},
    ]
    assert checks_of(services, "web") == (
        Check("http", 80, "/up"),
        Check("exec", 82, command=("x",)),
    )


def test_the_guest_hostname_is_a_dns_label_even_for_real_instance_ids() -> None:
    real = Allocation("i_01m8e850s1vh1qafas0mygfqjy", "assigned", "run", process="web")
    assert _hostname(real) == "web-i-01m8e850s1vh1qafas0mygfqjy"
    long = Allocation("i_" + "x" * 80, "assigned", "run", process="Web_Worker")
    label = _hostname(long)
    assert len(label) <= 63 and label.startswith("web-worker-i-") and not label.endswith("-")
