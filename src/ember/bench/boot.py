"""`make bench-boot`: an allocation to a served page through the host agent, against the
same guest booted by a plain script.

The guest is the sample app ``examples/hello-http`` (busybox httpd on :8080) built with
:func:`ember.dev.examples.build` and pushed into a real registry (Debian's
``docker-registry``, started by :mod:`ember.dev.registry`), on the platform kernel and
initramfs of ``guest/build`` (``guest/build.py``, cached), with the instance spec the
control plane derives from its ``ember.toml`` (:func:`ember.core.workloads.desired_processes`:
1 vCPU, 256 MB, an http check on ``/``).

* ``agent_boot_to_serving_s``: the real :class:`ember.agent.daemon.Agent` in a process of
  its own (:mod:`ember.bench.boot_agent`, composed like ``ember server agent``: the real
  image store, taps and nftables, config drive, qemu driver and health checks; ``--poll``
  at its default), fed by a file-and-FIFO control plane that its allocation watch
  reads at once (the control plane is not what is measured). The image is already in
  the agent's store. Clock: the allocation list is replaced (the allocation is visible)
  → the page is fetched over the tap from the instance's address (read from the agent's
  state file, where it is saved before the VM starts). Then the allocation asks for
  ``stop``, the agent reports ``stopped``, the allocation goes away and the agent forgets
  the instance (tap, address, VM directory); each run is a new instance.
  ``agent_phases_s`` says where the time went, in seconds after the allocation became
  visible: the agent read it, saved the address (image, root filesystem copy, tap,
  firewall done), reported ``starting``, the page was served, it reported ``healthy``.
* ``bare_qemu_boot_to_serving_s``: ``bench/bare-boot.sh`` runs QEMU with the qemu
  driver's own command line (:func:`ember.agent.vmm.qemu.qemu_argv`, printed for the
  script's ``prepare`` step by ``python -m ember.bench.boot qemu-argv``, so the two
  cannot drift) on the same kernel and initramfs, a copy of the same root filesystem, a
  config drive and a tap, all prepared with the project's code before the clock starts.
  Clock: the script is launched → the page is fetched over the tap.
* ``overhead_ratio`` = agent / bare (medians; goal <= 1.1). Rounds alternate which boot
  goes first; a first round of both warms up and is not counted.
* ``cold_image_prepare_s``: :meth:`ember.agent.oci.store.ImageStore.prepare` of the
  sample into a fresh store directory (pull + verify + unpack + ``mkfs.ext4 -d``), median
  of a few; its phases in ``cold_image_prepare_phases_s``.
* ``agent_rss_mb``: ``VmRSS`` of the agent process while it runs one VM (after it reported
  ``healthy``), the largest over the runs; ``agent_rss_idle_mb`` before the first VM.
  QEMU and its shim are other processes and are not counted. ``agent_cpu_s_per_boot``:
  the CPU time the agent process used from the allocation to the page (median), a figure
  a busy machine does not inflate the way it inflates wall-clock time.

Everything after the image build runs in a private network namespace made for the run
(``ember-bench-boot-PID``; the build comes first, since it may fetch Debian packages). The
agent's firewall replaces table ``inet ember`` as a whole, and taps, routes and sysctls are
host-wide: in the host's namespace the benchmark would rewrite the policy of any agent or
test on the machine. Inside it, the bare boots run while the table does not exist (a tap
the table does not know may send nothing); the agent makes it again for its next
instance. Every tap's neighbour discovery retransmits every 10 ms instead of every
second, for both kinds of boot: a fetch sent before the guest's network is up is
otherwise retried only a second later, and both figures would be quantised by it.

Needs root (namespaces, taps, nftables, cgroups). Everything it starts (registry, agent,
QEMU, shims, taps, namespace, cgroups, temporary directories) is removed at the end, also
when it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ember.bench.boot_agent import (
    IMAGE_BUDGET_BYTES,
    POLL_S,
    AgentProcess,
    BenchFailed,
    Feed,
    tail,
)
from ember.bench.common import median, percentile, run_and_report
from ember.core.errors import EmberError

ROOT = Path(__file__).resolve().parents[3]
BARE_SCRIPT = ROOT / "bench" / "bare-boot.sh"
GUEST_DIR = ROOT / "guest" / "build"
SAMPLE = "hello-http"
SAMPLE_DIR = ROOT / "examples" / SAMPLE
PAGE = SAMPLE_DIR / "rootfs" / "www" / "index.html"
REPOSITORY = "bench/hello-http"
PROCESS = "web"
APP_ID = "a_bench_boot"
BARE_HOST_ID = "bench-bare"
BARE_IPV4_POOL = "10.201.0.0/16"
"""The bare boots' addresses: another prefix and pool than the agent's."""
GOAL_RATIO = 1.1
RUNS, QUICK_RUNS = 7, 2
COLD, QUICK_COLD = 5, 2
SERVE_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 60.0
FETCH_TIMEOUT_S = 1.0
RETRY_S = 0.01
NEIGH_RETRANS_MS = 10
NEIGH_SYSCTL = Path("/proc/sys/net/ipv6/neigh")

__all__ = ["BenchFailed", "Samples", "agent_phases", "ratio", "report", "run", "stats"]


# -- pure: the figures -----------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, Any]:
    """n, p50, p90, min and max of ``values`` (seconds, to the millisecond)."""
    vals = list(values)
    return {
        "n": len(vals),
        "p50": round(median(vals), 3),
        "p90": round(percentile(vals, 90), 3),
        "min": round(min(vals, default=0.0), 3),
        "max": round(max(vals, default=0.0), 3),
    }


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator > 0 else None


def agent_phases(
    visible: float, events: Sequence[Mapping[str, Any]], *, address: float, served: float
) -> dict[str, float]:
    """Seconds after the allocation became visible (``visible``) at which the agent read
    it, saved the address (``address``), reported ``starting``, served the page
    (``served``) and reported ``healthy``, in that order of time. ``events`` are the
    instance's :mod:`ember.bench.boot_agent` events (monotonic clock, every process)."""
    out = {"address_recorded": address - visible, "page_served": served - visible}
    for e in events:
        key = "received" if e["event"] == "received" else f"{e.get('state')}_reported"
        if key in ("received", "starting_reported", "healthy_reported") and key not in out:
            out[key] = float(e["t"]) - visible
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: kv[1])}


@dataclasses.dataclass
class Samples:
    """What the rounds measured (seconds unless named otherwise)."""

    bare: list[float] = dataclasses.field(default_factory=list)
    agent: list[float] = dataclasses.field(default_factory=list)
    phases: list[dict[str, float]] = dataclasses.field(default_factory=list)
    rss_mb: list[float] = dataclasses.field(default_factory=list)
    rss_idle_mb: float = 0.0
    agent_cpu: list[float] = dataclasses.field(default_factory=list)
    """CPU seconds of the agent process per boot (allocation → page)."""
    cold: list[dict[str, float]] = dataclasses.field(default_factory=list)
    """Each cold prepare's :class:`ember.agent.oci.store.Timings` (``to_json``)."""
    warmup: dict[str, float] = dataclasses.field(default_factory=dict)
    first: list[str] = dataclasses.field(default_factory=list)
    """Which boot went first in each counted round."""


def report(samples: Samples, config: Mapping[str, Any]) -> dict[str, Any]:
    """The result file's body (without what :func:`ember.bench.common.write_result` adds)."""
    bare, agent = median(samples.bare), median(samples.agent)
    overhead = ratio(agent, bare)
    phase_names = sorted({k for p in samples.phases for k in p})
    result: dict[str, Any] = {
        "bare_qemu_boot_to_serving_s": round(bare, 3),
        "agent_boot_to_serving_s": round(agent, 3),
        "overhead_ratio": overhead,
        "overhead_s": round(agent - bare, 3),
        "goal_overhead_ratio": GOAL_RATIO,
        "goal_met": overhead is not None and overhead <= GOAL_RATIO,
        "cold_image_prepare_s": round(median([c["total_s"] for c in samples.cold]), 3),
        "agent_rss_mb": round(max(samples.rss_mb, default=0.0), 1),
        "agent_rss_idle_mb": round(samples.rss_idle_mb, 1),
        "agent_cpu_s_per_boot": round(median(samples.agent_cpu), 3),
        "runs": len(samples.agent),
        "boot_stats_s": {"bare": stats(samples.bare), "agent": stats(samples.agent)},
        "agent_phases_s": {
            name: round(median([p[name] for p in samples.phases if name in p]), 3)
            for name in phase_names
        },
        "cold_image_prepare_phases_s": {
            name: round(median([c[name] for c in samples.cold]), 3)
            for name in ("pull_s", "unpack_s", "mkfs_s")
            if samples.cold
        },
        "config": {
            **config,
            "samples": {
                "bare_s": [round(x, 3) for x in samples.bare],
                "agent_s": [round(x, 3) for x in samples.agent],
                "ratios_per_round": [
                    ratio(a, b) for a, b in zip(samples.agent, samples.bare, strict=True)
                ],
                "first_per_round": samples.first,
                "agent_phases_s": samples.phases,
                "agent_rss_mb": [round(x, 1) for x in samples.rss_mb],
                "agent_cpu_s": [round(x, 3) for x in samples.agent_cpu],
                "cold_image_prepare": samples.cold,
                "warmup_s": samples.warmup,
            },
        },
    }
    result["goals"] = {
        "overhead_ratio<=1.1": result["goal_met"],
        "every_boot_served": len(samples.bare) == len(samples.agent) == result["runs"] > 0,
    }
    return result


# -- the page ------------------------------------------------------------------------------------


def fetch(address: str, port: int, timeout_s: float = FETCH_TIMEOUT_S) -> bytes | None:
    """The body of a 200 answer to ``GET /``, or None (refused, unreachable, timeout)."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout_s)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        return body if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_served(
    address: str,
    port: int,
    expected: bytes,
    *,
    alive: Callable[[], str | None],
    timeout_s: float = SERVE_TIMEOUT_S,
) -> float:
    """Fetch the page until it is ``expected``; the moment it was (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if fetch(address, port) == expected:
            return time.monotonic()
        if problem := alive():
            raise BenchFailed(f"[{address}]:{port} never served the page: {problem}")
        if time.monotonic() > deadline:
            raise BenchFailed(f"[{address}]:{port} did not serve the page in {timeout_s:.0f} s")
        time.sleep(RETRY_S)


# -- `qemu-argv`: the bare script's prepare step ------------------------------------------------


def print_qemu_argv(args: argparse.Namespace) -> None:
    """The qemu driver's command line for these files, NUL-terminated, on stdout."""
    from ember.agent.vmm.base import Drive, NetDevice, VmSpec
    from ember.agent.vmm.qemu import KERNEL_ARGS, QemuConfig, host_tsc_khz, qemu_argv

    spec = VmSpec(
        vm_id=args.vm_id,
        kernel=args.kernel,
        initrd=args.initrd,
        kernel_args=KERNEL_ARGS,
        vcpus=args.vcpus,
        memory_mb=args.memory_mb,
        drives=(Drive("root", args.rootfs), Drive("config", args.config_drive, read_only=True)),
        nets=(NetDevice("eth0", args.tap, args.mac),),
        workdir=args.workdir,
    )
    config = QemuConfig()
    # What the driver does with QemuConfig.tsc_khz None: the host's rate, when trustworthy.
    tsc_khz = host_tsc_khz(Path("/proc/cpuinfo").read_text())
    argv = qemu_argv(
        spec,
        binary=config.binary,
        accel=args.accel,
        tb_size_mb=config.tcg_tb_size_mb,
        tsc_khz=tsc_khz,
    )
    sys.stdout.write("".join(f"{a}\0" for a in argv))


# -- setting up --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """The sample image as the agent's store has it, and its instance spec."""

    spec: Any
    """:class:`ember.core.instances.InstanceSpec` of process ``web``."""
    image: Any
    """:class:`ember.agent.oci.store.PreparedImage` (the agent's store)."""

    @property
    def port(self) -> int:
        return int(self.spec.services[0]["internal_port"])


def instance_spec(digest: str) -> Any:
    """The spec the control plane gives process ``web`` of the sample's ``ember.toml``."""
    from ember.core.manifest import normalize, parse_manifest
    from ember.core.workloads import LiveRelease, WorkloadState, desired_processes

    path = SAMPLE_DIR / "ember.toml"
    manifest = normalize(parse_manifest(path.read_text(), source=str(path)))
    release = LiveRelease(1, REPOSITORY, digest, manifest)
    return desired_processes(release, WorkloadState())[PROCESS].spec


def ensure_guest() -> None:
    """``make guest`` (instant when cached)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "guest" / "build.py"), "--out", str(GUEST_DIR)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchFailed(f"building the guest failed (make guest): {proc.stderr.strip()}")


def build_sample(out: Path) -> str:
    """The sample image built into the OCI layout ``out``; its digest."""
    from ember.core.settings import load_settings
    from ember.dev.examples import build

    return build(SAMPLE, out, cache=load_settings(os.environ).home / "cache").digest


@contextlib.contextmanager
def private_netns(name: str) -> Iterator[None]:
    """This process, and whatever it starts from now on, in a new network namespace with
    loopback up; the namespace is removed afterwards."""
    from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

    netns.create(name)
    try:
        netns.pushns(name)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            yield
        finally:
            netns.popns()
    finally:
        netns.remove(name)


def fast_retries(link: str) -> bool:
    """Neighbour discovery on ``link`` retransmits every :data:`NEIGH_RETRANS_MS`; False
    when the link is gone."""
    try:
        (NEIGH_SYSCTL / link / "retrans_time_ms").write_text(str(NEIGH_RETRANS_MS))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def fast_retries_on_taps() -> Iterator[None]:
    """A thread gives every tap :func:`fast_retries` as soon as it appears: the agent
    makes its own taps, and a namespace other than the host's has no ``default`` entry
    for new links to copy. A tap exists long before its guest's network is up."""
    from ember.agent.net.addressing import TAP_PREFIX

    stop = threading.Event()

    def watch() -> None:
        done: set[str] = set()
        while not stop.wait(0.002):
            links = {n for n in os.listdir(NEIGH_SYSCTL) if n.startswith(TAP_PREFIX)}
            done &= links  # a name deleted and made again needs it again
            done |= {n for n in links - done if fast_retries(n)}

    thread = threading.Thread(target=watch, name="bench-boot-neigh", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


@contextlib.contextmanager
def running_registry(root: Path) -> Iterator[str]:
    """Debian's registry on loopback, as the dev stack runs it; its URL."""
    from ember.dev import registry
    from ember.dev.processes import Supervisor

    config = registry.prepare(root / "registry", registry.DEFAULT_PORT)
    sup = Supervisor(root, markers={registry.NAME: config.marker})
    registry.start(sup, config, {"PATH": "/usr/bin:/bin"})
    try:
        registry.wait_ready(
            config.url,
            timeout=30,
            exited=lambda: sup.exited_early(registry.NAME),
            log=sup.log_file(registry.NAME),
        )
        yield config.url
    finally:
        sup.stop(registry.NAME, grace_s=5)


def prepare_sample(
    registry_url: str, layout: Path, built: str, root: Path, cold: int
) -> tuple[Sample, list[dict[str, float]]]:
    """Push the sample; ``cold`` prepares of it, each into a fresh image store (their
    timings); then one into the agent's store (the image the agent finds cached)."""
    from ember.agent.oci.store import ImageStore
    from ember.client.oci.layout import OciLayout
    from ember.client.oci.registry import RegistryClient

    timings = []
    with RegistryClient(registry_url) as reg:
        digest = reg.push(OciLayout.open(layout), REPOSITORY).digest
        if digest != built:
            raise BenchFailed(f"the registry has {digest}, the build made {built}")
        for n in range(cold):
            store_dir = root / f"cold-{n}"
            try:
                store = ImageStore(store_dir, reg, IMAGE_BUDGET_BYTES)
                prepared = store.prepare(REPOSITORY, digest)
                if prepared.cached:
                    raise BenchFailed(f"the fresh image store {store_dir} had the image")
                timings.append(prepared.timings.to_json())
            finally:
                _rmtree(store_dir)
        store = ImageStore(root / "agent" / "images", reg, IMAGE_BUDGET_BYTES)
        image = store.prepare(REPOSITORY, digest)
    return Sample(instance_spec(digest), image), timings


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- the two kinds of boot -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgentBoot:
    seconds: float
    phases: dict[str, float]
    rss_mb: float
    cpu_s: float
    """CPU the agent process used from the allocation to the page (not QEMU's)."""


def agent_boot(agent: AgentProcess, sample: Sample, instance_id: str, page: bytes) -> AgentBoot:
    """One allocation → page served → stopped and forgotten."""
    feed = agent.feed
    alloc = {
        "instance_id": instance_id,
        "state": "assigned",
        "desired": "run",
        "spec": sample.spec.model_dump(mode="json"),
        "app_id": APP_ID,
        "process": PROCESS,
    }
    console = agent.store_dir / "vms" / instance_id / "console.log"

    def reported(*states: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e.get("instance_id") == instance_id and e.get("state") in states

    def alive() -> str | None:
        feed.poll()
        failed = [e for e in feed.about(instance_id) if e.get("state") == "failed"]
        if failed:
            return f"the agent reported failed: {failed[0]['reason']}; console: {tail(console)}"
        return agent.problem()

    cpu = agent.cpu_s()
    visible = feed.publish([alloc])
    # The address from the agent's record (saved once the tap is up, before the VM
    # starts) rather than from its `starting` report, which waits for its next pass.
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not (address := getattr(agent.records().get(instance_id), "address", None)):
        if (problem := alive()) or time.monotonic() > deadline:
            raise BenchFailed(f"the agent gave {instance_id} no address: {problem or 'timeout'}")
        time.sleep(0.005)
    addressed = time.monotonic()
    served = wait_served(address, sample.port, page, alive=alive)
    cpu = agent.cpu_s() - cpu
    agent.wait(reported("healthy"), what=f"{instance_id} to be reported healthy")
    rss = agent.rss_mb()
    phases = agent_phases(visible, feed.about(instance_id), address=addressed, served=served)

    feed.publish([{**alloc, "state": "healthy", "desired": "stop"}])
    stopped = agent.wait(reported("stopped", "failed"), what=f"{instance_id} to stop")
    if stopped["state"] != "stopped":
        raise BenchFailed(f"{instance_id} did not stop cleanly: {stopped['reason']}")
    feed.publish([])
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while instance_id in agent.records():
        if (problem := agent.problem()) or time.monotonic() > deadline:
            raise BenchFailed(f"the agent did not forget {instance_id}: {problem or 'timeout'}")
        time.sleep(0.02)
    return AgentBoot(served - visible, phases, rss, cpu)


class BareBoots:
    """The baseline: ``bench/bare-boot.sh`` on files and a tap prepared before the clock."""

    def __init__(self, root: Path, sample: Sample, accel: str) -> None:
        from ember.agent.net.addressing import AddressPlan

        self.root = root
        self.sample = sample
        self.accel = accel
        self.plan = AddressPlan.for_host(BARE_HOST_ID, ipv4_pool=BARE_IPV4_POOL)
        self.proc: subprocess.Popen[bytes] | None = None

    def boot(self, vm_id: str, page: bytes) -> float:
        """Seconds from launching the script to the page; then the VM is killed and its
        tap and files removed."""
        from ember.agent.daemon import build_guest_config
        from ember.agent.guest_config import write_config_drive
        from ember.agent.net.addressing import LeaseTable
        from ember.agent.net.firewall import Firewall
        from ember.agent.net.taps import TapNetwork

        spec, image = self.sample.spec, self.sample.image
        vm_dir = self.root / vm_id
        vm_dir.mkdir(parents=True)
        rootfs, config = vm_dir / "rootfs.ext4", vm_dir / "config.img"
        # The agent's own copy command (its _start), off the clock here.
        subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", str(image.rootfs_path), str(rootfs)],
            check=True,
            capture_output=True,
        )
        _, lease = LeaseTable(self.plan).allocate(vm_id)
        guest = build_guest_config(spec, image, lease.guest_network(), f"{PROCESS}-{vm_id}")
        write_config_drive(guest, config)
        taps = TapNetwork()
        taps.create(lease)
        try:
            if not fast_retries(lease.tap):
                raise BenchFailed(f"tap {lease.tap} vanished")
            self._script(
                *("prepare", vm_dir, vm_id, GUEST_DIR / "vmlinux", GUEST_DIR / "initrd.gz"),
                *(rootfs, config, lease.tap, lease.mac, self.accel),
                *(max(1, math.ceil(spec.cpus)), spec.memory_mb),
            )
            Firewall().remove()  # the agent's table drops what a tap it does not know sends
            started = time.monotonic()
            self.proc = subprocess.Popen(["bash", str(BARE_SCRIPT), "boot", str(vm_dir)])

            def alive() -> str | None:
                if self.proc is None or self.proc.poll() is None:
                    return None
                return (
                    f"QEMU exited with {self.proc.returncode}: {tail(vm_dir / 'qemu.log')}"
                    f" console: {tail(vm_dir / 'console.log')}"
                )

            return wait_served(str(lease.ipv6), self.sample.port, page, alive=alive) - started
        finally:
            self.kill()
            taps.delete(lease)
            _rmtree(vm_dir)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @staticmethod
    def _script(*args: Any) -> None:
        proc = subprocess.run(
            ["bash", str(BARE_SCRIPT), *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHON": sys.executable},
            check=False,
        )
        if proc.returncode != 0:
            raise BenchFailed(f"bare-boot.sh {args[0]} failed: {proc.stderr.strip()}")


def cleanup(root: Path, vm_ids: Sequence[str]) -> None:
    """Whatever an aborted run left: processes naming ``root`` (QEMU, shims, the agent),
    the taps and the firewall table of the (private) namespace, the VMs' cgroups."""
    from ember.agent.net.firewall import Firewall
    from ember.agent.net.taps import TapNetwork
    from ember.agent.vmm.qemu import find_cgroup_parent

    marker = os.fsencode(root)
    killed = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(proc)
    deadline = time.monotonic() + 5  # a cgroup cannot go while its QEMU is still exiting
    while any(p.exists() for p in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(EmberError):
        taps = TapNetwork()
        for tap in taps.list_taps():
            taps.delete(tap.name)
    with contextlib.suppress(EmberError):
        Firewall().remove()
    plan, _ = find_cgroup_parent(None)
    if plan is not None:
        for vm_id in vm_ids:
            with contextlib.suppress(OSError):
                (plan.parent / vm_id).rmdir()


# -- the run -----------------------------------------------------------------------------------


def measure(
    samples: Samples, agent: AgentProcess, bare: BareBoots, rounds: int, vm_ids: list[str]
) -> None:
    """Round 0 warms both up; then ``rounds`` rounds, alternating which boot is first."""
    page = PAGE.read_bytes()
    for n in range(rounds + 1):
        agent_first = n % 2 == 1
        iid = f"i_bootbench{os.getpid()}x{n}"
        vm_ids.append(iid)
        if agent_first:
            booted = agent_boot(agent, bare.sample, iid, page)
        bare_s = bare.boot(f"bare{os.getpid()}x{n}", page)
        if not agent_first:
            booted = agent_boot(agent, bare.sample, iid, page)
        print(f"round {n}: bare {bare_s:.3f} s, agent {booted.seconds:.3f} s", file=sys.stderr)
        if n == 0:
            samples.warmup = {"bare": round(bare_s, 3), "agent": round(booted.seconds, 3)}
            continue
        samples.bare.append(bare_s)
        samples.agent.append(booted.seconds)
        samples.phases.append(booted.phases)
        samples.rss_mb.append(booted.rss_mb)
        samples.agent_cpu.append(booted.cpu_s)
        samples.first.append("agent" if agent_first else "bare")


def run(quick: bool) -> dict[str, Any]:
    from ember.agent.vmm.qemu import QemuConfig, QemuDriver

    rounds, cold = (QUICK_RUNS, QUICK_COLD) if quick else (RUNS, COLD)
    samples = Samples()
    vm_ids: list[str] = []
    with contextlib.ExitStack() as stack:  # unwinds in reverse, also on failure
        root = Path(tempfile.mkdtemp(prefix="ember-bench-boot-"))
        stack.callback(_rmtree, root)
        t0 = time.monotonic()
        ensure_guest()
        built = build_sample(root / "layout")
        build_s = time.monotonic() - t0
        stack.enter_context(private_netns(f"ember-bench-boot-{os.getpid()}"))
        stack.callback(cleanup, root, vm_ids)
        registry_url = stack.enter_context(running_registry(root))
        stack.enter_context(fast_retries_on_taps())
        sample, samples.cold = prepare_sample(registry_url, root / "layout", built, root, cold)
        # Probed here into the agent's state dir: its driver finds the verdict cached.
        driver = QemuDriver(QemuConfig(state_dir=root / "agent" / "qemu"))
        accel = driver.accel(GUEST_DIR / "vmlinux", GUEST_DIR / "initrd.gz")
        feed = Feed(root / "feed")
        stack.callback(feed.close)
        agent = AgentProcess(root, registry_url, GUEST_DIR, feed)
        stack.callback(agent.stop)
        bare = BareBoots(root / "bare", sample, accel)
        stack.callback(bare.kill)
        samples.rss_idle_mb = agent.rss_mb()
        measure(samples, agent, bare, rounds, vm_ids)
    config = {
        "sample": SAMPLE,
        "image": {
            "repository": REPOSITORY,
            "digest": built,
            "rootfs_bytes": sample.image.size_bytes,
        },
        "vm": {"vcpus": max(1, math.ceil(sample.spec.cpus)), "memory_mb": sample.spec.memory_mb},
        "accel": accel,
        "accel_note": driver.accel_note,
        "agent_poll_s": POLL_S,
        "rounds": f"{rounds} counted after 1 warm-up; alternating which boot goes first",
        "network": f"a private netns; neighbour discovery retransmits every {NEIGH_RETRANS_MS}"
        " ms on every tap (both kinds of boot)",
        "clock": {
            "agent": "allocation list replaced (the agent watches it) -> page fetched from"
            " the instance's address",
            "bare": "bench/bare-boot.sh boot launched -> page fetched",
        },
        "build_seconds": round(build_s, 2),
    }
    return report(samples, config)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced run, under 60 s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/boot.json"))
    sub = parser.add_subparsers(dest="command")
    argv = sub.add_parser("qemu-argv", help="the qemu driver's argv, for bench/bare-boot.sh")
    for name in ("kernel", "initrd", "rootfs", "config-drive", "workdir"):
        argv.add_argument(f"--{name}", type=Path, required=True)
    for name in ("vm-id", "tap", "mac"):
        argv.add_argument(f"--{name}", required=True)
    argv.add_argument("--accel", choices=("kvm", "tcg"), required=True)
    argv.add_argument("--vcpus", type=int, default=1)
    argv.add_argument("--memory-mb", type=int, default=256)
    args = parser.parse_args()
    if args.command == "qemu-argv":
        print_qemu_argv(args)
        return
    if os.geteuid() != 0:
        sys.exit("bench-boot needs root (a network namespace, taps, nftables, cgroups)")
    result = run_and_report(
        "boot",
        run,
        quick=args.quick,
        out=args.out,
        summary=(
            "bare_qemu_boot_to_serving_s",
            "agent_boot_to_serving_s",
            "overhead_ratio",
            "overhead_s",
            "cold_image_prepare_s",
            "agent_rss_mb",
            "agent_rss_idle_mb",
            "agent_cpu_s_per_boot",
            "agent_phases_s",
            "goals",
            "wall_seconds",
        ),
        errors=(BenchFailed, EmberError),
    )
    print(f"{'ratios_per_round':30} {result['config']['samples']['ratios_per_round']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
