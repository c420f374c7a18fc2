"""The agent side of ``make bench-boot`` (:mod:`ember.bench.boot`): the real host agent in
a process of its own, fed its allocations through files instead of the control-plane API.

``python -m ember.bench.boot_agent --dir DIR --registry URL --guest-dir DIR [--poll S]``
composes the agent as ``ember server agent`` does (image store, taps and nftables, qemu
driver, health checks; data directory ``DIR/agent``) with :class:`FileControlPlane` on
``DIR/feed`` as its control plane. The benchmark drives it with :class:`AgentProcess` and
:class:`Feed`:

- ``feed/allocations.json`` ``{"version": N, "items": [...]}``, replaced atomically, is
  the allocation list; its version is the watch cursor;
- ``feed/wake`` is a FIFO: the feed writes a byte after each new version, so the agent's
  allocation watch (:class:`ember.agent.watch.AllocationWatch`) waits in ``select`` and
  has the new list at once, as it would from the API's long-poll;
- ``feed/events.jsonl``: heartbeats, reports, shipped log lines, and the moment each
  (instance, desired) pair first reached the agent, each with its ``time.monotonic()``
  (one clock for every process of the machine).

The control plane is not what the benchmark measures: it only has to hand over one
allocation and hear the reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

IMAGE_BUDGET_BYTES = 2 << 30
POLL_S = 1.0
"""``ember server agent``'s default ``--poll``: how often it observes its VMs and health
(a change of allocations is converged at once, through the watch)."""
WAIT_S = 60.0
HOST_ID = "bench-boot"


class BenchFailed(RuntimeError):
    """The benchmark could not run, or a boot never served its page (the message says
    why)."""


def tail(path: Path, limit: int = 1500) -> str:
    """The end of a log file ("" when there is none)."""
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    """One JSON line in one ``write`` on an ``O_APPEND`` file: a reader never sees half a
    line before its newline."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def _open_fifo(path: Path) -> int:
    """The wake-up FIFO, read-write and non-blocking: with a writer always present a reader
    never sees end-of-file, and a writer never waits for a reader."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


# -- the agent's side --------------------------------------------------------------------------


class FileControlPlane:
    """:class:`ember.agent.daemon.ControlPlane` and
    :class:`ember.agent.watch.AllocationSource` over the files of ``root`` (see the module
    docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.events = root / "events.jsonl"
        self._wake = _open_fifo(root / "wake")
        self._seen: set[tuple[str, str]] = set()
        self._known: dict[str, Any] = {}
        """The set the last list or watch answer left the watcher with."""

    def _read(self) -> tuple[str, list[Any]]:
        from ember.agent.converge import Allocation

        try:
            doc = json.loads((self.root / "allocations.json").read_text())
        except FileNotFoundError:
            return "0", []
        now = time.monotonic()
        allocations = [Allocation(**item) for item in doc["items"]]
        for a in allocations:
            if (a.instance_id, a.desired) not in self._seen:
                self._seen.add((a.instance_id, a.desired))
                record = {"instance_id": a.instance_id, "desired": a.desired}
                _append_line(self.events, {"event": "received", "t": now, **record})
        return str(doc["version"]), allocations

    # ControlPlane

    def heartbeat(self, host_id: str, report: Mapping[str, Any]) -> None:
        _append_line(self.events, {"event": "heartbeat", "t": time.monotonic(), **report})

    def allocations(self, host_id: str) -> list[Any]:
        return self._read()[1]

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
        _append_line(
            self.events,
            {
                "event": "report",
                "t": time.monotonic(),
                "instance_id": instance_id,
                "state": state,
                "exit_code": exit_code,
                "reason": reason,
                "address": address,
            },
        )

    def ship_logs(self, host_id: str, instance_id: str, lines: Sequence[Any]) -> None:
        record = {"instance_id": instance_id, "lines": len(lines)}
        _append_line(self.events, {"event": "logs", "t": time.monotonic(), **record})

    # AllocationSource

    def list_allocations(self, host_id: str) -> tuple[list[Any], str]:
        version, allocations = self._read()
        self._known = {a.instance_id: a for a in allocations}
        return allocations, version

    def watch_allocations(self, host_id: str, cursor: str, wait_s: float) -> tuple[list[Any], str]:
        """The changes after version ``cursor`` (every allocation as ``modified``, the
        vanished ones as ``removed``), waiting up to ``wait_s`` for a new version."""
        from ember.agent.watch import AllocationChange

        deadline = time.monotonic() + wait_s
        while True:
            version, allocations = self._read()
            if version != cursor:
                current = {a.instance_id: a for a in allocations}
                changes = [AllocationChange("modified", a) for a in allocations]
                changes += [
                    AllocationChange("removed", a)
                    for iid, a in self._known.items()
                    if iid not in current
                ]
                self._known = current
                return changes, version
            left = deadline - time.monotonic()
            if left <= 0:
                return [], cursor
            if select.select([self._wake], [], [], left)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake, 4096)


def run_agent(root: Path, registry_url: str, guest_dir: Path, poll_s: float) -> None:
    """The agent process: composed like ``ember server agent`` (src/ember/ops/server.py),
    with :class:`FileControlPlane` for the API. Stops on SIGTERM or SIGINT; its VMs keep
    running (the benchmark stops them through the allocations first)."""
    import logging

    from ember.agent.daemon import Agent, AgentConfig, TapHostNetwork
    from ember.agent.net.addressing import AddressPlan, HostLocalAllocator
    from ember.agent.net.firewall import Firewall
    from ember.agent.net.store import LeaseStore
    from ember.agent.net.taps import TapNetwork
    from ember.agent.oci.store import ImageStore
    from ember.agent.state import StateStore
    from ember.agent.vmm.qemu import KERNEL_ARGS, QemuConfig, QemuDriver
    from ember.client.oci.registry import RegistryClient

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    data_dir = root / "agent"
    store = StateStore(data_dir)
    plan = AddressPlan.for_host(HOST_ID)
    leases = LeaseStore(store.leases_path)
    allocator = HostLocalAllocator(leases.load(plan), on_change=leases.save)
    taps = TapNetwork()
    taps.prepare_host(plan)
    network = TapHostNetwork(allocator, taps, Firewall())
    with RegistryClient(registry_url) as registry:
        initrd = guest_dir / "initrd.gz"
        agent = Agent(
            AgentConfig(
                host_id=HOST_ID,
                kernel=guest_dir / "vmlinux",
                initrd=initrd if initrd.exists() else None,
                kernel_args=KERNEL_ARGS,
                vcpus=os.cpu_count() or 1,
                memory_mb=2048,
                poll_s=poll_s,
            ),
            control=FileControlPlane(root / "feed"),
            store=store,
            driver=QemuDriver(QemuConfig(state_dir=data_dir / "qemu")),
            images=ImageStore(data_dir / "images", registry, IMAGE_BUDGET_BYTES),
            network=network,
        )
        try:
            agent.run(stopping.is_set)
        finally:
            agent.close()


# -- the benchmark's side ----------------------------------------------------------------------


class Feed:
    """Writes the allocations :class:`FileControlPlane` reads; reads its events."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.mkfifo(root / "wake")
        self._wake = _open_fifo(root / "wake")
        self._version = 0
        self._offset = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        os.close(self._wake)

    def publish(self, allocations: Sequence[Mapping[str, Any]]) -> float:
        """Replace the allocation list and wake the watch; the moment the new list became
        visible (monotonic)."""
        self._version += 1
        path = self.root / "allocations.json"
        tmp = path.with_name(".allocations.json.tmp")
        tmp.write_text(json.dumps({"version": self._version, "items": list(allocations)}))
        os.replace(tmp, path)
        visible = time.monotonic()
        with contextlib.suppress(BlockingIOError):  # full: wake-ups are pending anyway
            os.write(self._wake, b"\n")
        return visible

    def poll(self) -> list[dict[str, Any]]:
        """The events appended since the last poll (whole lines only)."""
        try:
            with (self.root / "events.jsonl").open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        new = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.events += new
        return new

    def about(self, instance_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("instance_id") == instance_id]


class AgentProcess:
    """``python -m ember.bench.boot_agent`` on ``root``, started and ready (it has sent
    its first heartbeat)."""

    def __init__(self, root: Path, registry_url: str, guest_dir: Path, feed: Feed) -> None:
        self.root = root
        self.feed = feed
        self.log = root / "agent.log"
        self.store_dir = root / "agent"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ember.bench.boot_agent",
                    *("--dir", str(root), "--registry", registry_url),
                    *("--guest-dir", str(guest_dir), "--poll", str(POLL_S)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait(lambda e: e["event"] == "heartbeat", what="the agent to start")

    def problem(self) -> str | None:
        """Why waiting for the agent is pointless (it exited), or None."""
        if self.proc.poll() is None:
            return None
        return f"the agent exited with {self.proc.returncode}: {tail(self.log)}"

    def wait(
        self, match: Callable[[dict[str, Any]], bool], *, what: str, timeout_s: float = WAIT_S
    ) -> dict[str, Any]:
        """The first event ``match`` accepts (already seen or new)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.feed.events:
                if match(event):
                    return event
            if not self.feed.poll():
                if problem := self.problem():
                    raise BenchFailed(f"waiting for {what}: {problem}")
                if time.monotonic() > deadline:
                    raise BenchFailed(
                        f"timed out after {timeout_s:.0f} s waiting for {what};"
                        f" agent log: {tail(self.log) or '(empty)'}"
                    )
                time.sleep(0.005)

    def records(self) -> dict[str, Any]:
        """The agent's instance records (its state file, replaced atomically)."""
        from ember.agent.state import StateStore

        return dict(StateStore(self.store_dir).load().instances)

    def rss_mb(self) -> float:
        return vm_rss_mb(Path(f"/proc/{self.proc.pid}/status").read_text())

    def cpu_s(self) -> float:
        """User + system CPU seconds the agent process has used so far."""
        return cpu_seconds(Path(f"/proc/{self.proc.pid}/stat").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def vm_rss_mb(status_text: str) -> float:
    """``VmRSS`` of a ``/proc/PID/status`` text, in MiB."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError("no VmRSS line (a kernel thread or a zombie)")


def cpu_seconds(stat_text: str) -> float:
    """utime + stime of a ``/proc/PID/stat`` text, in seconds."""
    fields = stat_text.rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--registry", required=True, help="the registry's URL")
    parser.add_argument("--guest-dir", type=Path, required=True)
    parser.add_argument("--poll", type=float, default=POLL_S)
    args = parser.parse_args()
    run_agent(args.dir, args.registry, args.guest_dir, args.poll)


if __name__ == "__main__":
    main()
