"""The agent's log shipper on real files, written by the VMM supervisor's own capped log
(ember.agent.vmm.qemu_shim.CappedLog): positions persisted and resumed, rotation without
loss or repeats, partial and overlong lines, the rate cap, streams, failures, and the
agent's step shipping an exited VM's last lines before it forgets the VM."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ember.agent.converge import LocalStatus
from ember.agent.daemon import Agent, AgentConfig
from ember.agent.logship import TRUNCATED, LogShipper, Position, batches, classify, tail_console
from ember.agent.state import AgentState, InstanceRecord, StateStore
from ember.agent.vmm.base import VmNotFound
from ember.agent.vmm.qemu_shim import CappedLog
from ember.client.errors import ApiNotFound, Unreachable
from ember.wire import logs as wl


class Sink:
    """The control plane's side: every batch it accepted, or the error it raises."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[wl.LogShipLine]]] = []
        self.fail: Exception | None = None

    def __call__(self, instance_id: str, lines: Sequence[wl.LogShipLine]) -> None:
        if self.fail is not None:
            raise self.fail
        self.batches.append((instance_id, list(lines)))

    def lines(self, stream: str | None = None) -> list[str]:
        return [ln.line for _, b in self.batches for ln in b if stream in (None, ln.stream)]

    def clear(self) -> None:
        self.batches.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def console(tmp_path: Path) -> Path:
    (tmp_path / "vms" / "i1").mkdir(parents=True)
    return tmp_path / "vms" / "i1" / "console.log"


def shipper(tmp_path: Path, sink: Sink, clock: Clock | None = None, **kw: Any) -> LogShipper:
    return LogShipper(tmp_path / "logship.json", sink, clock=clock or Clock(), **kw)


def write(path: Path, data: bytes, cap: int = 1 << 20) -> None:
    log = CappedLog(path, cap)
    try:
        log.write(data)
    finally:
        log.close()


def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"line %05d\r\n" % i for i in range(start, stop))


# -- positions, rotation, truncation ----------------------------------------------------------


def test_positions_are_persisted_and_a_new_shipper_resumes_there(
    tmp_path: Path, console: Path
) -> None:
    sink = Sink()
    write(console, numbered(0, 3))
    assert shipper(tmp_path, sink).ship({"i1": (console, False)}) == 3
    assert sink.lines() == ["line 00000", "line 00001", "line 00002"]  # no \r
    saved = json.loads((tmp_path / "logship.json").read_text())
    assert saved["instances"]["i1"]["offset"] == console.stat().st_size

    sink.clear()
    write(console, numbered(3, 5))
    restarted = shipper(tmp_path, sink)  # an agent restart: only the file remains
    assert restarted.ship({"i1": (console, False)}) == 2
    assert sink.lines() == ["line 00003", "line 00004"]
    sink.clear()
    assert restarted.ship({"i1": (console, False)}) == 0 and sink.batches == []


def test_rotation_loses_and_repeats_nothing_and_joins_a_line_cut_across_files(
    tmp_path: Path, console: Path
) -> None:
    sink, ship = Sink(), None
    ship = shipper(tmp_path, sink, burst=10_000)
    cap = 4096  # CappedLog's minimum: ~372 lines of 11 bytes per file
    write(console, numbered(0, 100), cap)
    ship.ship({"i1": (console, False)})
    # 300 more lines: the cap is crossed mid-line, console.log becomes console.log.1.
    write(console, numbered(100, 400), cap)
    rotated = console.with_name("console.log.1")
    assert rotated.exists() and not rotated.read_bytes().endswith(b"\n"), "cut mid-line"
    ship.ship({"i1": (console, False)})
    assert sink.lines() == [f"line {i:05d}" for i in range(400)]


def test_rotating_twice_between_passes_says_output_was_lost(tmp_path: Path, console: Path) -> None:
    sink = Sink()
    ship = shipper(tmp_path, sink, burst=10_000)
    write(console, numbered(0, 10), 4096)
    ship.ship({"i1": (console, False)})
    sink.clear()
    write(console, numbered(10, 1000), 4096)  # ~11 KB: two rotations
    ship.ship({"i1": (console, False)})
    got = sink.lines()
    assert got[0].startswith("ember: console output was lost")
    assert sink.batches[0][1][0].stream == "agent"
    # What is still on disk (console.log.1 and console.log) follows, once, in order.
    on_disk = (console.with_name("console.log.1").read_bytes() + console.read_bytes()).split(b"\n")
    tail = [b.rstrip(b"\r").decode() for b in on_disk if b.startswith(b"line")]
    assert got[-len(tail) :] == tail and got[-1] == "line 00999"
    assert len(got) <= len(tail) + 2  # the note, and at most one cut line before the tail


def test_a_truncated_console_is_read_from_its_start(tmp_path: Path, console: Path) -> None:
    sink = Sink()
    ship = shipper(tmp_path, sink)
    write(console, numbered(0, 50))
    ship.ship({"i1": (console, False)})
    sink.clear()
    os.truncate(console, 36)  # same inode and first bytes, shorter than the position
    write(console, b"after truncation\n")
    ship.ship({"i1": (console, False)})
    assert sink.lines() == ["line 00000", "line 00001", "line 00002", "after truncation"]
    sink.clear()
    # Truncated and rewritten: another file for all the shipper can tell.
    console.write_bytes(b"rewritten\n")
    ship.ship({"i1": (console, False)})
    assert sink.lines("app") == ["rewritten"]
    assert sink.lines("agent")[0].startswith("ember: console output was lost")


# -- lines -------------------------------------------------------------------------------------


def test_a_partial_line_waits_for_its_newline_unless_the_vm_exited(
    tmp_path: Path, console: Path
) -> None:
    sink = Sink()
    ship = shipper(tmp_path, sink)
    write(console, b"one\nhalf a li")
    ship.ship({"i1": (console, False)})
    assert sink.lines() == ["one"]
    write(console, b"ne\nlast words")
    ship.ship({"i1": (console, False)})
    assert sink.lines() == ["one", "half a line"]
    ship.ship({"i1": (console, True)})  # the VM exited: nothing more will come
    assert sink.lines() == ["one", "half a line", "last words"]
    ship.ship({"i1": (console, True)})
    assert sink.lines() == ["one", "half a line", "last words"], "flushed once"


def test_overlong_lines_are_cut_and_their_rest_skipped_even_across_passes(
    tmp_path: Path, console: Path
) -> None:
    sink = Sink()
    ship = shipper(tmp_path, sink)
    write(console, b"x" * 20_000 + b"\nshort\n")
    ship.ship({"i1": (console, False)})
    first, short = sink.lines()
    assert len(first) == wl.MAX_LINE_CHARS and first.endswith(TRUNCATED)
    assert short == "short"
    sink.clear()

    # An endless line without a newline yet: shipped cut, its rest skipped when it comes.
    write(console, b"y" * 40_000)
    ship.ship({"i1": (console, False)})
    (cut,) = sink.lines()
    assert cut.startswith("yyy") and cut.endswith(TRUNCATED)
    write(console, b"y" * 50_000)
    ship.ship({"i1": (console, False)})
    write(console, b"yyy\nnext\n")
    ship.ship({"i1": (console, False)})
    assert sink.lines() == [cut, "next"]


def test_text_is_cleaned_and_streams_are_classified(tmp_path: Path, console: Path) -> None:
    sink = Sink()
    write(
        console,
        b"[    0.512345] Linux version 6.1\r\n"
        b"ember-init: exit status 0\r\n"
        b"listening on :8080\n"
        b"bad \xff byte and a nul \x00\n"
        b"\n",
    )
    shipper(tmp_path, sink).ship({"i1": (console, False)})
    got = [(ln.stream, ln.line) for _, b in sink.batches for ln in b]
    assert got == [
        ("kernel", "[    0.512345] Linux version 6.1"),
        ("init", "ember-init: exit status 0"),
        ("app", "listening on :8080"),
        ("app", "bad \ufffd byte and a nul \ufffd"),
        ("app", ""),
    ]
    assert classify("[12345.000001] Out of memory: Killed process 42") == "kernel"
    assert classify("[x] not the kernel") == "app"
    assert classify("my ember-init: look-alike") == "app"


def test_exec_check_results_never_leave_the_host(tmp_path: Path, console: Path) -> None:
    """They carry the boot's secret check token (docs/specs/guest-config.md §4.1), also
    after a workload's unfinished output on the same line."""
    sink = Sink()
    ship = shipper(tmp_path, sink)
    write(
        console,
        b"ember-init: check 5f0c9a1e 0 ok\r\n"
        b"served GET /\n"
        b"progress 50%ember-init: check 5f0c9a1e 0 fail status 1\r\n",
    )
    ship.ship({"i1": (console, False)})
    assert sink.lines() == ["served GET /"]
    sink.clear()
    ship.ship({"i1": (console, False)})  # the skipped lines are behind the position too
    assert sink.lines() == []


def test_lines_carry_the_time_the_agent_read_them(tmp_path: Path, console: Path) -> None:
    sink, clock = Sink(), Clock()
    ship = shipper(tmp_path, sink, clock)
    write(console, b"a\n")
    ship.ship({"i1": (console, False)})
    clock.now += 60
    write(console, b"b\n")
    ship.ship({"i1": (console, False)})
    a, b = (ln for _, batch in sink.batches for ln in batch)
    assert a.ts.timestamp() == 1_800_000_000.0 and (b.ts - a.ts).total_seconds() == 60


# -- rate cap and batches -----------------------------------------------------------------------


def test_the_rate_cap_drops_lines_with_a_marker_and_refills_over_time(
    tmp_path: Path, console: Path
) -> None:
    sink, clock = Sink(), Clock()
    ship = shipper(tmp_path, sink, clock, rate=10, burst=5)
    write(console, numbered(0, 20))
    assert ship.ship({"i1": (console, False)}) == 6  # 5 lines and the marker
    assert sink.lines() == [f"line {i:05d}" for i in range(5)] + [
        "ember: 15 lines dropped (this instance logs over 10 lines/s)"
    ]
    assert sink.batches[-1][1][-1].stream == "agent"
    sink.clear()
    clock.now += 0.35  # 3.5 tokens
    write(console, numbered(20, 30))
    ship.ship({"i1": (console, False)})
    assert sink.lines() == [
        "line 00020",
        "line 00021",
        "line 00022",
        "ember: 7 lines dropped (this instance logs over 10 lines/s)",
    ]
    sink.clear()
    clock.now += 100  # refills up to the burst, not beyond
    write(console, numbered(30, 40))
    ship.ship({"i1": (console, False)})
    assert len(sink.lines("app")) == 5


def test_batches_stay_within_the_wire_limits(tmp_path: Path, console: Path) -> None:
    sink = Sink()
    write(console, numbered(0, 2500) + (b"z" * 8000 + b"\n") * 100)
    shipper(tmp_path, sink, burst=10_000).ship({"i1": (console, False)})
    sizes = [len(b) for _, b in sink.batches]
    assert sum(sizes) == 2600 and max(sizes) == wl.MAX_BATCH_LINES
    for _, batch in sink.batches:
        assert sum(len(ln.line.encode()) for ln in batch) <= wl.MAX_BATCH_BYTES
        wl.LogShipRequest(lines=batch)  # what the API validates
    assert batches([]) == []


# -- failures -------------------------------------------------------------------------------------


def test_a_failed_batch_is_sent_again_next_pass_and_a_refused_one_is_skipped(
    tmp_path: Path, console: Path
) -> None:
    sink, clock = Sink(), Clock()
    ship = shipper(tmp_path, sink, clock, rate=1, burst=3)
    write(console, b"a\nb\n")
    sink.fail = Unreachable("the control plane is down")
    assert ship.ship({"i1": (console, False)}) == 0
    assert not (tmp_path / "logship.json").exists(), "nothing delivered, nothing moved"
    sink.fail = None
    assert ship.ship({"i1": (console, False)}) == 2, "tokens of undelivered lines come back"
    assert sink.lines() == ["a", "b"]

    clock.now += 10
    write(console, b"c\n")
    sink.fail = ApiNotFound("instance i1 is not assigned to host h1", status=404)
    assert ship.ship({"i1": (console, False)}) == 0
    sink.fail = None
    write(console, b"d\n")
    ship.ship({"i1": (console, False)})
    assert sink.lines() == ["a", "b", "d"], "a refused batch is not sent forever"


def test_forgotten_instances_leave_the_state_file_and_a_bad_one_is_not_fatal(
    tmp_path: Path, console: Path
) -> None:
    sink = Sink()
    ship = shipper(tmp_path, sink)
    write(console, b"a\n")
    ship.ship({"i1": (console, False)})
    ship.ship({})
    assert json.loads((tmp_path / "logship.json").read_text())["instances"] == {}

    (tmp_path / "logship.json").write_text("{not json")
    again = shipper(tmp_path, sink)
    assert again.positions == {}
    assert again.ship({"i1": (console, False)}) == 1  # from the start: repeats, loses nothing
    with pytest.raises(Exception, match="bad log position"):
        Position.from_dict({"dev": 1})


def test_a_console_that_does_not_exist_yet_ships_nothing(tmp_path: Path) -> None:
    read = tail_console(tmp_path / "missing.log", None)
    assert read.lines == [] and read.end is None
    sink = Sink()
    assert shipper(tmp_path, sink).ship({"i1": (tmp_path / "missing.log", False)}) == 0
    assert not (tmp_path / "logship.json").exists()


# -- the agent's step ---------------------------------------------------------------------------


class Control:
    def __init__(self) -> None:
        self.shipped: list[tuple[str, str, list[str]]] = []
        self.fail = False

    def heartbeat(self, host_id: str, report: Any) -> None: ...

    def allocations(self, host_id: str) -> list[Any]:
        return []  # the instance is allocated no more: the plan forgets it

    def report(self, instance_id: str, **kw: Any) -> None:
        raise AssertionError("nothing to report")

    def ship_logs(self, host_id: str, instance_id: str, lines: Sequence[wl.LogShipLine]) -> None:
        if self.fail:
            raise Unreachable("the control plane is down")
        self.shipped.append((host_id, instance_id, [ln.line for ln in lines]))


class Driver:
    name = "fake"

    def status(self, vm_id: str) -> Any:
        raise VmNotFound(vm_id)


class Network:
    def __init__(self) -> None:
        self.detached: list[str] = []

    def detach(self, instance_id: str) -> None:
        self.detached.append(instance_id)


def agent(tmp_path: Path, control: Control) -> tuple[Agent, Path]:
    store = StateStore(tmp_path / "agent")
    record = InstanceRecord(instance_id="i1", vm_id="i1", status=LocalStatus.EXITED, exit_code=1)
    store.save(AgentState(host_id="h1", instances={"i1": record}))
    vm_dir = store.vm_dir("i1")
    vm_dir.mkdir(parents=True)
    write(vm_dir / "console.log", b"started\nfatal: no config")
    config = AgentConfig("h1", tmp_path / "vmlinux", None, "console=ttyS0", 2, 2048)
    a = Agent(
        config,
        control=control,
        store=store,
        driver=Driver(),  # type: ignore[arg-type]
        images=None,  # type: ignore[arg-type]
        network=Network(),  # type: ignore[arg-type]
    )
    return a, vm_dir


def test_the_step_ships_an_exited_vms_last_lines_before_forgetting_it(tmp_path: Path) -> None:
    control = Control()
    a, vm_dir = agent(tmp_path, control)
    try:
        a.step()
        a.wait_idle(10)
    finally:
        a.close()
    assert control.shipped == [("h1", "i1", ["started", "fatal: no config"])]
    assert not vm_dir.exists() and "i1" not in a.state.instances


def test_a_shipping_failure_never_breaks_the_step(tmp_path: Path) -> None:
    control = Control()
    control.fail = True
    a, vm_dir = agent(tmp_path, control)
    try:
        assert a.ship_logs() == 0
        a.step()  # converges anyway (the lines of a forgotten VM are lost then)
        a.wait_idle(10)
    finally:
        a.close()
    assert control.shipped == [] and not vm_dir.exists()
