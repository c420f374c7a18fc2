"""The boot benchmark's fixed parts: its figures, the file-fed control plane the agent
watches, the page fetch, and the bare script's QEMU command line."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.agent.vmm.base import Drive, NetDevice, VmSpec
from ember.agent.vmm.qemu import KERNEL_ARGS, QemuConfig, host_tsc_khz, qemu_argv
from ember.agent.watch import AllocationSource, AllocationWatch
from ember.bench.boot import (
    BARE_SCRIPT,
    GOAL_RATIO,
    BenchFailed,
    Samples,
    agent_phases,
    fetch,
    instance_spec,
    ratio,
    report,
    stats,
    wait_served,
)
from ember.bench.boot_agent import Feed, FileControlPlane, cpu_seconds, vm_rss_mb

DIGEST = "sha256:" + "c" * 64


def _samples(bare: list[float], agent: list[float]) -> Samples:
    return Samples(
        bare=bare,
        agent=agent,
        phases=[{"received": 0.001, "page_served": a} for a in agent],
        rss_mb=[60.0 + n for n in range(len(agent))],
        rss_idle_mb=58.25,
        agent_cpu=[0.05, 0.07, 0.06][: len(agent)],
        cold=[
            {"pull_s": 0.03, "unpack_s": 0.2, "mkfs_s": 0.02, "total_s": 0.25},
            {"pull_s": 0.05, "unpack_s": 0.3, "mkfs_s": 0.04, "total_s": 0.39},
        ],
        warmup={"bare": 5.0, "agent": 6.0},
        first=["agent", "bare", "agent"][: len(agent)],
    )


def test_the_headline_figures_are_medians_and_their_ratio() -> None:
    result = report(_samples([2.0, 2.2, 2.1], [2.3, 2.2, 2.6]), {"accel": "tcg"})
    assert result["bare_qemu_boot_to_serving_s"] == 2.1
    assert result["agent_boot_to_serving_s"] == 2.3
    assert result["overhead_ratio"] == round(2.3 / 2.1, 3)
    assert result["overhead_s"] == 0.2
    assert GOAL_RATIO == 1.1 and result["goal_met"] is True  # 1.095
    assert result["cold_image_prepare_s"] == 0.32
    assert result["cold_image_prepare_phases_s"] == {
        "pull_s": 0.04,
        "unpack_s": 0.25,
        "mkfs_s": 0.03,
    }
    assert result["agent_rss_mb"] == 62.0  # the largest: while a VM runs
    assert result["agent_rss_idle_mb"] == 58.2
    assert result["agent_cpu_s_per_boot"] == 0.06
    assert result["runs"] == 3
    assert result["agent_phases_s"] == {"page_served": 2.3, "received": 0.001}
    assert result["goals"] == {"overhead_ratio<=1.1": True, "every_boot_served": True}


def test_the_raw_samples_and_the_run_config_are_kept() -> None:
    result = report(_samples([2.0, 4.0], [2.2, 4.8]), {"accel": "tcg"})
    config = result["config"]
    assert config["accel"] == "tcg"
    samples = config["samples"]
    assert samples["bare_s"] == [2.0, 4.0] and samples["agent_s"] == [2.2, 4.8]
    assert samples["ratios_per_round"] == [1.1, 1.2]
    assert samples["first_per_round"] == ["agent", "bare"]
    assert samples["warmup_s"] == {"bare": 5.0, "agent": 6.0}
    assert len(samples["cold_image_prepare"]) == 2
    assert samples["agent_cpu_s"] == [0.05, 0.07]
    assert result["boot_stats_s"]["agent"] == {
        "n": 2,
        "p50": 3.5,
        "p90": 4.8,
        "min": 2.2,
        "max": 4.8,
    }
    json.dumps(result)  # the result file is JSON


def test_a_slow_agent_misses_the_goal_and_no_runs_meet_nothing() -> None:
    slow = report(_samples([2.0], [2.5]), {})
    assert slow["overhead_ratio"] == 1.25
    assert slow["goal_met"] is False and slow["goals"]["overhead_ratio<=1.1"] is False
    empty = report(Samples(), {})
    assert empty["overhead_ratio"] is None and empty["goal_met"] is False
    assert empty["goals"]["every_boot_served"] is False


def test_stats_and_ratio() -> None:
    assert stats([3.0, 1.0, 2.0]) == {"n": 3, "p50": 2.0, "p90": 3.0, "min": 1.0, "max": 3.0}
    assert stats([])["n"] == 0
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None


def test_agent_phases_are_seconds_after_the_allocation_was_visible_in_time_order() -> None:
    events = [
        {"event": "received", "t": 100.002, "instance_id": "i1", "desired": "run"},
        {"event": "report", "t": 101.0, "instance_id": "i1", "state": "starting"},
        {"event": "logs", "t": 101.5, "instance_id": "i1", "lines": 3},
        {"event": "report", "t": 103.0, "instance_id": "i1", "state": "healthy"},
        {"event": "received", "t": 104.0, "instance_id": "i1", "desired": "stop"},
        {"event": "report", "t": 105.0, "instance_id": "i1", "state": "stopped"},
    ]
    phases = agent_phases(100.0, events, address=100.05, served=102.25)
    assert phases == {
        "received": 0.002,
        "address_recorded": 0.05,
        "starting_reported": 1.0,
        "page_served": 2.25,
        "healthy_reported": 3.0,
    }
    assert list(phases) == sorted(phases, key=phases.__getitem__)


def test_cpu_time_comes_from_proc_stat() -> None:
    hz = os.sysconf("SC_CLK_TCK")
    # The command name may hold spaces and parentheses: fields count from its last ")".
    stat = f"42 (a (b) c) S 1 42 42 0 -1 4194304 100 0 0 0 {3 * hz} {hz} 0 0 20 0 1 0"
    assert cpu_seconds(stat) == 4.0
    assert cpu_seconds(Path("/proc/self/stat").read_text()) > 0


def test_vm_rss_comes_from_proc_status() -> None:
    assert vm_rss_mb("Name:\tpython\nVmPeak:\t 99999 kB\nVmRSS:\t   61440 kB\n") == 60.0
    assert vm_rss_mb(Path("/proc/self/status").read_text()) > 1
    with pytest.raises(ValueError, match="VmRSS"):
        vm_rss_mb("Name:\tkthreadd\n")


def test_the_spec_is_the_one_the_control_plane_derives_from_the_samples_manifest() -> None:
    spec = instance_spec(DIGEST)
    assert spec.image_digest == DIGEST and spec.repository == "bench/hello-http"
    assert (spec.cpus, spec.memory_mb) == (1.0, 256)
    assert spec.command == ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
    assert spec.services[0]["internal_port"] == 8080
    assert spec.services[0]["checks"][0]["type"] == "http"


# -- the file-fed control plane ----------------------------------------------------------------


def _alloc(iid: str, desired: str = "run") -> dict[str, Any]:
    return {
        "instance_id": iid,
        "state": "assigned",
        "desired": desired,
        "spec": {"image_digest": DIGEST},
        "app_id": "a_x",
        "process": "web",
    }


def _until(what: str, cond: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_agent_lists_reports_and_the_feed_hears_it(tmp_path: Path) -> None:
    feed = Feed(tmp_path)
    control = FileControlPlane(tmp_path)
    assert isinstance(control, AllocationSource)
    assert control.allocations("h") == []
    feed.publish([_alloc("i1")])
    items, cursor = control.list_allocations("h")
    assert [a.instance_id for a in items] == ["i1"] and cursor == "1"
    assert items[0].spec == {"image_digest": DIGEST}
    control.allocations("h")  # read again: "received" is recorded once per (instance, desired)
    control.report(
        "i1", host_id="h", state="starting", exit_code=None, reason="", address="fd00::5"
    )
    control.heartbeat("h", {"instances": 1})
    events = feed.poll()
    assert [e["event"] for e in events] == ["received", "report", "heartbeat"]
    assert events[1]["state"] == "starting" and events[1]["address"] == "fd00::5"
    assert [e["event"] for e in feed.about("i1")] == ["received", "report"]
    assert feed.poll() == []  # only what is new
    feed.close()


def test_a_watch_wakes_on_a_new_list_and_sees_removals(tmp_path: Path) -> None:
    feed = Feed(tmp_path)
    control = FileControlPlane(tmp_path)
    feed.publish([_alloc("i1"), _alloc("i2")])
    _, cursor = control.list_allocations("h")
    assert control.watch_allocations("h", cursor, 0.05) == ([], cursor)  # nothing new
    feed.publish([_alloc("i2", "stop")])
    changes, following = control.watch_allocations("h", cursor, 30)
    assert following == "2"
    assert {(c.type, c.allocation.instance_id, c.allocation.desired) for c in changes} == {
        ("modified", "i2", "stop"),
        ("removed", "i1", "run"),
    }
    feed.close()


def test_the_agents_allocation_watch_follows_the_feed(tmp_path: Path) -> None:
    feed = Feed(tmp_path)
    changed = threading.Event()
    watch = AllocationWatch(FileControlPlane(tmp_path), "h", on_change=changed.set, wait_s=30)
    watch.start()
    try:
        _until("the first list", lambda: watch.current() == [])
        feed.publish([_alloc("i1")])
        _until("i1", lambda: [a.instance_id for a in watch.current() or []] == ["i1"])
        assert changed.is_set()
        feed.publish([])
        _until("no allocation", lambda: watch.current() == [])
        received = [e for e in feed.poll() if e["event"] == "received"]
        assert [(e["instance_id"], e["desired"]) for e in received] == [("i1", "run")]
    finally:
        watch.stop()
        feed.close()


# -- the page -------------------------------------------------------------------------------


@pytest.fixture
def page_server() -> Iterator[tuple[int, dict[str, bytes]]]:
    """A local HTTP server answering GET / with ``state["page"]`` (404 while empty)."""
    state: dict[str, bytes] = {"page": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state["page"]
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], state
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_counts_only_when_it_is_the_expected_one(
    page_server: tuple[int, dict[str, bytes]],
) -> None:
    port, state = page_server
    assert fetch("127.0.0.1", port) is None  # 404
    state["page"] = b"<h1>hi</h1>"
    assert fetch("127.0.0.1", port) == b"<h1>hi</h1>"
    checks = []

    def alive() -> str | None:
        checks.append(1)
        if len(checks) == 3:
            state["page"] = b"<h1>hello</h1>"  # served from the next fetch on
        return None

    before = time.monotonic()
    assert wait_served("127.0.0.1", port, b"<h1>hello</h1>", alive=alive) >= before
    assert len(checks) == 3


def test_waiting_for_the_page_stops_when_the_vm_is_gone(
    page_server: tuple[int, dict[str, bytes]],
) -> None:
    port, _ = page_server
    with pytest.raises(BenchFailed, match="never served the page: QEMU exited with 1"):
        wait_served("127.0.0.1", port, b"x", alive=lambda: "QEMU exited with 1")
    with socket_port() as free:
        assert fetch("127.0.0.1", free) is None  # refused
        with pytest.raises(BenchFailed, match="did not serve the page in 0 s"):
            wait_served("127.0.0.1", free, b"x", alive=lambda: None, timeout_s=0.0)


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound without listen: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# -- the bare script ----------------------------------------------------------------------------


def test_the_bare_script_boots_the_qemu_drivers_own_command_line(tmp_path: Path) -> None:
    files = {
        name: tmp_path / name for name in ("vmlinux", "initrd.gz", "rootfs.ext4", "config.img")
    }
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            "bash",
            str(BARE_SCRIPT),
            "prepare",
            str(run_dir),
            "bare1",
            *(str(p) for p in files.values()),
            "em-bare1",
            "02:00:00:00:00:07",
            "tcg",
            "1",
            "256",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    written = (run_dir / "qemu.argv").read_bytes().split(b"\0")
    assert written[-1] == b""  # NUL-terminated
    spec = VmSpec(
        vm_id="bare1",
        kernel=files["vmlinux"],
        initrd=files["initrd.gz"],
        kernel_args=KERNEL_ARGS,
        vcpus=1,
        memory_mb=256,
        drives=(
            Drive("root", files["rootfs.ext4"]),
            Drive("config", files["config.img"], read_only=True),
        ),
        nets=(NetDevice("eth0", "em-bare1", "02:00:00:00:00:07"),),
        workdir=run_dir,
    )
    config = QemuConfig()
    expected = qemu_argv(
        spec,
        binary=config.binary,
        accel="tcg",
        tb_size_mb=config.tcg_tb_size_mb,
        tsc_khz=host_tsc_khz(Path("/proc/cpuinfo").read_text()),
    )
    assert [a.decode() for a in written[:-1]] == expected


def test_the_bare_script_refuses_a_wrong_call_with_its_usage(tmp_path: Path) -> None:
    for argv in ([], ["boot"], ["prepare", str(tmp_path), "only-two"], ["reboot", "x"]):
        proc = subprocess.run(
            ["bash", str(BARE_SCRIPT), *argv], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 2, argv
        assert "bare-boot.sh prepare DIR VM_ID" in proc.stderr
    assert not (tmp_path / "qemu.argv").exists()
