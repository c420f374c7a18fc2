"""Health checks: the pure model (schedule, grace, threshold, verdict), the host's tcp/http
probe against real sockets, and the agent reporting healthy → unhealthy → healthy with a
fake driver and clock (tcp checks it probes itself; exec check lines from the console)."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.agent.converge import Allocation
from ember.agent.daemon import Agent, AgentConfig, probe
from ember.agent.guest_config import GuestCheck, parse
from ember.agent.health import (
    FAILURE_THRESHOLD,
    GRACE_PROBE_INTERVAL_S,
    REASON_MAX_CHARS,
    SILENCE_SLACK_S,
    STARTUP_INTERVAL_S,
    Check,
    InstanceHealth,
    Result,
    Verdict,
    checks_of,
)
from ember.agent.state import StateStore
from tests.unit.test_agent_daemon import (
    SPEC,
    FakeClock,
    FakeControl,
    FakeDriver,
    FakeImages,
    FakeNetwork,
    converge,
)

OK, FAIL = Result(True), Result(False, "connection refused")
TCP = Check("tcp", 8080, interval_s=10, timeout_s=2, grace_s=5)
EXEC = Check("exec", 8080, command=("test", "-f", "/tmp/ok"), interval_s=1, timeout_s=1, grace_s=0)


# -- the model -----------------------------------------------------------------------------


def test_checks_come_from_the_process_s_services_with_manifest_durations() -> None:
    services = [
        {
            "process": "web",
            "internal_port": 8080,
            "checks": [
                {"type": "http", "path": "/up", "interval": "1m30s", "timeout": "500ms"},
                {"type": "exec", "command": ["pg_isready"], "grace_period": "0s"},
            ],
        },
        {"process": "worker", "internal_port": 9000, "checks": [{"type": "tcp"}]},
    ]
    assert checks_of(services, "web") == (
        Check("http", 8080, "/up", interval_s=90, timeout_s=0.5, grace_s=5),
        Check("exec", 8080, command=("pg_isready",), interval_s=10, timeout_s=2, grace_s=0),
    )
    assert checks_of(services, "worker") == (Check("tcp", 9000),)
    with pytest.raises(ValueError):
        checks_of([{"internal_port": 1, "checks": [{"interval": "ten seconds"}]}], "web")


def test_an_instance_without_checks_is_healthy_at_once() -> None:
    assert InstanceHealth.of(()).verdict is Verdict.HEALTHY
    assert InstanceHealth.of((TCP,)).verdict is None


def test_healthy_only_once_every_check_passed() -> None:
    h = InstanceHealth.of((TCP, EXEC))
    h = h.record(0, OK, now=1, started_at=0)
    assert h.verdict is None
    h = h.record_guest(0, OK, now=2, started_at=0)
    assert h.verdict is Verdict.HEALTHY
    assert h.reason == ""


def test_failures_in_the_grace_period_do_not_count() -> None:
    h = InstanceHealth.of((TCP,))
    for t in range(5):  # grace_s = 5: t = 0..4 is inside it
        h = h.record(0, FAIL, now=100 + t, started_at=100)
    assert h.verdict is None
    assert h.states[0].failures == 0
    assert h.states[0].latest is False


def test_unhealthy_after_threshold_failures_past_grace_then_healthy_again() -> None:
    h = InstanceHealth.of((TCP,)).record(0, OK, now=1, started_at=0)
    for n in range(1, FAILURE_THRESHOLD):
        h = h.record(0, FAIL, now=10 + n, started_at=0)
        assert h.verdict is Verdict.HEALTHY  # a blip is not an outage
    h = h.record(0, FAIL, now=20, started_at=0)
    assert h.verdict is Verdict.UNHEALTHY
    assert h.reason == (
        f"tcp check on port 8080 failed {FAILURE_THRESHOLD} times in a row: connection refused"
    )
    h = h.record(0, OK, now=21, started_at=0)
    assert h.verdict is Verdict.HEALTHY
    assert h.states[0].failures == 0


def test_an_instance_never_healthy_turns_unhealthy_after_grace() -> None:
    h = InstanceHealth.of((EXEC,))
    for t in range(FAILURE_THRESHOLD):
        h = h.record_guest(0, Result(False, "status 1"), now=t, started_at=0)
    assert h.verdict is Verdict.UNHEALTHY
    assert h.reason == "exec check 'test -f /tmp/ok' failed 3 times in a row: status 1"


def test_a_restarted_agent_keeps_the_recorded_verdict_until_checks_say_otherwise() -> None:
    assert InstanceHealth.of((TCP,), Verdict.UNHEALTHY).verdict is Verdict.UNHEALTHY
    assert InstanceHealth.of((), Verdict.UNHEALTHY).verdict is Verdict.HEALTHY


def test_guest_results_are_numbered_among_exec_checks_only() -> None:
    other = dataclasses.replace(EXEC, command=("true",))
    h = InstanceHealth.of((TCP, EXEC, other))
    assert h.guest_checks == (EXEC, other)
    h = h.record_guest(1, OK, now=1, started_at=0)
    assert [s.latest for s in h.states] == [None, None, True]
    assert h.record_guest(2, OK, now=1, started_at=0) == h  # no such exec check
    assert h.record_guest(-1, OK, now=1, started_at=0) == h


def test_a_guest_that_stops_reporting_its_exec_check_turns_unhealthy() -> None:
    """A frozen or thrashing guest prints nothing: silence past interval + timeout + slack
    counts as a failure, once per stretch; a result resets it."""
    late = EXEC.interval_s + EXEC.timeout_s + SILENCE_SLACK_S
    h = InstanceHealth.of((EXEC,)).record_guest(0, OK, now=10, started_at=0)
    assert h.verdict is Verdict.HEALTHY
    assert h.silent(10 + late - 0.1, started_at=0) == h  # not late yet
    now = 10 + late + 0.1
    for _ in range(FAILURE_THRESHOLD):
        h = h.silent(now, started_at=0)
        assert h.silent(now + 1, started_at=0) == h  # counted once per stretch
        now += late + 0.1
    assert h.verdict is Verdict.UNHEALTHY
    assert "no result from the guest" in h.reason
    h = h.record_guest(0, OK, now=now, started_at=0)
    assert h.verdict is Verdict.HEALTHY and h.states[0].failures == 0


def test_the_schedule_startup_rate_until_the_first_pass_then_the_interval() -> None:
    h = InstanceHealth.of((TCP, EXEC))
    assert h.due(0) == [0]  # exec checks are the init's to run
    h = h.started(0, 0)
    assert h.due(STARTUP_INTERVAL_S - 0.01) == []
    assert h.due(STARTUP_INTERVAL_S) == [0]
    h = h.started(0, 1).record(0, OK, now=1.2, started_at=0)
    assert h.due(10.9) == []
    assert h.due(11) == [0]  # every interval_s = 10 once it passed
    assert h.due(0.5) == [0]  # the clock went back: run rather than stall


def test_within_the_grace_period_a_check_is_probed_often_until_it_passes() -> None:
    # TCP's grace period is 5 s: its failures there do not count, so probing often is free.
    h = InstanceHealth.of((TCP,)).started(0, 100.0)
    assert h.due(100.0 + GRACE_PROBE_INTERVAL_S - 0.01, started_at=100.0) == []
    assert h.due(100.0 + GRACE_PROBE_INTERVAL_S, started_at=100.0) == [0]
    # Past the grace period: the startup rate again.
    late = InstanceHealth.of((TCP,)).started(0, 106.0)
    assert late.due(106.0 + GRACE_PROBE_INTERVAL_S, started_at=100.0) == []
    assert late.due(106.0 + STARTUP_INTERVAL_S, started_at=100.0) == [0]
    # Once it passed: its interval, grace or not.
    ok = h.started(0, 100.4).record(0, OK, now=100.5, started_at=100.0)
    assert ok.due(101.0, started_at=100.0) == []


# -- properties -----------------------------------------------------------------------------

events = st.lists(
    st.tuples(st.integers(0, 2), st.booleans(), st.floats(0, 3, allow_nan=False)), max_size=40
)


def fold(checks: tuple[Check, ...], evs: list[tuple[int, bool, float]]) -> InstanceHealth:
    h, now = InstanceHealth.of(checks), 0.0
    for i, ok, dt in evs:
        now += dt
        h = h.record(i % len(checks), OK if ok else FAIL, now=now, started_at=0)
    return h


GRACED = tuple(dataclasses.replace(TCP, grace_s=g) for g in (0.0, 2.0, 7.0))


@given(events)
def test_property_failures_inside_grace_never_make_an_instance_unhealthy(
    evs: list[tuple[int, bool, float]],
) -> None:
    forever = tuple(dataclasses.replace(c, grace_s=1e9) for c in GRACED)
    assert fold(forever, evs).verdict is not Verdict.UNHEALTHY


@given(events, st.integers(0, 2))
def test_property_threshold_failures_past_grace_make_it_unhealthy(
    evs: list[tuple[int, bool, float]], victim: int
) -> None:
    h = fold(GRACED, evs)
    for t in range(FAILURE_THRESHOLD):
        h = h.record(victim, FAIL, now=1000 + t, started_at=0)
    assert h.verdict is Verdict.UNHEALTHY
    assert h.reason


@given(events)
def test_property_every_check_passing_last_makes_it_healthy(
    evs: list[tuple[int, bool, float]],
) -> None:
    h = fold(GRACED, evs)
    for i in range(len(GRACED)):
        h = h.record(i, OK, now=2000, started_at=0)
    assert h.verdict is Verdict.HEALTHY
    assert h.reason == ""


@given(events)
def test_property_the_verdict_is_a_function_of_the_results(
    evs: list[tuple[int, bool, float]],
) -> None:
    """Against a second, history-based reading of the rules."""
    history: list[list[tuple[bool, bool]]] = [[] for _ in GRACED]  # (ok, counted)
    verdict: Verdict | None = None
    h, now = InstanceHealth.of(GRACED), 0.0
    for i, ok, dt in evs:
        now += dt
        history[i].append((ok, ok or now >= GRACED[i].grace_s))
        h = h.record(i, OK if ok else FAIL, now=now, started_at=0)

        def trailing(results: list[tuple[bool, bool]]) -> int:
            since_pass = results[max((k for k, r in enumerate(results) if r[0]), default=-1) + 1 :]
            return sum(1 for _, counted in since_pass if counted)

        if any(trailing(r) >= FAILURE_THRESHOLD for r in history):
            verdict = Verdict.UNHEALTHY
        elif all(r and r[-1][0] for r in history):
            verdict = Verdict.HEALTHY
        assert h.verdict == verdict


# -- the probe, against real sockets ----------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/up" else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_probe_tcp_and_http(http_port: int) -> None:
    assert probe("127.0.0.1", Check("tcp", http_port, timeout_s=2)) == OK
    assert probe("127.0.0.1", Check("http", http_port, "/up", timeout_s=2)) == OK
    assert probe("127.0.0.1", Check("http", http_port, "/down", timeout_s=2)) == Result(
        False, "status 503"
    )
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    failed = probe("127.0.0.1", Check("tcp", closed, timeout_s=2))
    assert not failed.ok
    assert "refused" in failed.detail


def test_probe_times_out_on_a_server_that_never_answers() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # accepts connections (the kernel's backlog) but never answers
        port = server.getsockname()[1]
        assert probe("127.0.0.1", Check("http", port, timeout_s=0.2)) == Result(False, "timeout")


def _serve_once(answer: Callable[[socket.socket], None]) -> tuple[int, threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):
                conn.recv(1024)
                answer(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def test_the_timeout_bounds_the_whole_probe_not_each_read() -> None:
    # A server trickling its answer one byte at a time, each well within the timeout: the
    # whole check must still end at its timeout (probe threads are few and shared).
    def trickle(conn: socket.socket) -> None:
        for byte in b"HTTP/1.0 200 OK\r\n\r\n":
            time.sleep(0.1)
            conn.sendall(bytes([byte]))

    port, thread = _serve_once(trickle)
    assert probe("127.0.0.1", Check("http", port, timeout_s=0.5)) == Result(False, "timeout")
    thread.join(5)


def test_an_answer_that_is_not_http_fails_with_a_short_clean_reason() -> None:
    port, thread = _serve_once(lambda c: c.sendall(b"\x00" * 3000 + b"\n"))
    assert probe("127.0.0.1", Check("http", port, timeout_s=2)) == Result(
        False, "the answer is not HTTP"
    )
    thread.join(5)
    # Whatever a check's detail holds, the reason reported stays short and printable.
    h = InstanceHealth.of((TCP,))
    for _ in range(FAILURE_THRESHOLD):
        h = h.record(0, Result(False, "junk\x00" * 1000), now=100, started_at=0)
    assert h.verdict is Verdict.UNHEALTHY
    assert len(h.reason) <= REASON_MAX_CHARS and h.reason.isprintable()


# -- the agent --------------------------------------------------------------------------------


class ReasonControl(FakeControl):
    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[tuple[str, str]] = []

    def report(self, instance_id: str, **kw: Any) -> None:
        self.reasons.append((kw["state"], kw["reason"]))
        super().report(instance_id, **kw)


def agent_with(
    tmp_path: Path, control: FakeControl, probe_fn: Callable[[str, Check], Result]
) -> Agent:
    rootfs = tmp_path / "image.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    return Agent(
        AgentConfig("h1", tmp_path / "vmlinux", None, "console=ttyS0", 4, 4096),
        control=control,
        store=StateStore(tmp_path / "agent"),
        driver=FakeDriver(),
        images=FakeImages(rootfs),
        network=FakeNetwork(),
        health=probe_fn,
        clock=FakeClock(),
    )


def spec_with(*checks: dict[str, Any]) -> dict[str, Any]:
    return {**SPEC, "services": [{"process": "web", "internal_port": 8080, "checks": checks}]}


def test_the_agent_reports_healthy_unhealthy_healthy_for_a_tcp_check(tmp_path: Path) -> None:
    control, up = ReasonControl(), [False]
    check = {"type": "tcp", "interval": "2s", "timeout": "1s", "grace_period": "5s"}
    control.allocs["i1"] = Allocation("i1", "assigned", "run", spec_with(check), "app", "web")
    agent = agent_with(tmp_path, control, lambda _a, _c: OK if up[0] else FAIL)

    converge(agent, 4)  # failing, but inside the grace period
    assert control.reasons == [("starting", "")]
    up[0] = True
    converge(agent, 2)
    assert control.reasons[-1] == ("healthy", "")
    up[0] = False
    converge(agent, 2 * FAILURE_THRESHOLD + 2)  # every 2 s now that it passed
    why = "tcp check on port 8080 failed 3 times in a row: connection refused"
    assert control.reasons[-1] == ("unhealthy", why)
    assert agent.state.instances["i1"].health is Verdict.UNHEALTHY
    up[0] = True
    converge(agent, 3)
    assert [state for state, _ in control.reasons] == [
        "starting",
        "healthy",
        "unhealthy",
        "healthy",
    ]
    converge(agent, 3)  # nothing more to say
    assert len(control.reasons) == 4
    agent.close()


def test_an_instance_failing_past_grace_before_ever_passing_is_unhealthy(tmp_path: Path) -> None:
    control = ReasonControl()
    check = {"type": "http", "path": "/up", "interval": "10s", "grace_period": "2s"}
    control.allocs["i1"] = Allocation("i1", "assigned", "run", spec_with(check), "app", "web")
    agent = agent_with(tmp_path, control, lambda _a, _c: Result(False, "status 500"))
    converge(agent, 8)  # until it first passes, it runs every second
    assert control.reasons == [
        ("starting", ""),
        ("unhealthy", "http check GET /up on port 8080 failed 3 times in a row: status 500"),
    ]
    agent.close()


def test_a_slow_probe_never_holds_up_converging(tmp_path: Path) -> None:
    control = FakeControl()
    release, probing = threading.Event(), threading.Event()

    def stuck(address: str, check: Check) -> Result:
        probing.set()
        # Released only after a step returned: a step that waited for this probe
        # would see it fail (after 10 s) instead.
        return OK if release.wait(10) else Result(False, "the step waited for the probe")

    check = {"type": "tcp", "timeout": "2s"}
    control.allocs["i1"] = Allocation("i1", "assigned", "run", spec_with(check), "app", "web")
    agent = agent_with(tmp_path, control, stuck)
    agent.step()
    agent.wait_idle(10)  # the start (there is no probe yet)
    agent.step()  # starts the probe, which hangs
    assert probing.wait(10)
    control.allocs["i2"] = Allocation("i2", "assigned", "run", SPEC, "app", "web")
    actions = agent.step()  # returns while the probe still hangs
    assert not release.is_set()
    assert [type(a).__name__ for a in actions if a.instance_id == "i2"] == ["Prepare", "Start"]
    release.set()
    agent.wait_idle(10)
    agent.step()
    assert ("i1", "healthy") in [r[:2] for r in control.reports]
    agent.close()


def test_exec_check_results_come_from_the_console_with_this_boot_s_token(tmp_path: Path) -> None:
    control, probed = ReasonControl(), []

    def never(address: str, check: Check) -> Result:
        probed.append(check)
        return OK

    check = {
        "type": "exec",
        "command": ["test", "-f", "/tmp/ok"],
        "interval": "1s",
        "timeout": "1s",
        "grace_period": "0s",
    }
    control.allocs["i1"] = Allocation("i1", "assigned", "run", spec_with(check), "app", "web")
    agent = agent_with(tmp_path, control, never)
    converge(agent, 2)
    token = agent.state.instances["i1"].check_token
    assert len(token) == 32
    vm_dir = tmp_path / "agent/vms/i1"
    drive = parse((vm_dir / "config.img").read_bytes())
    assert drive.checks == (GuestCheck(("test", "-f", "/tmp/ok"), 1.0, 1.0),)
    assert drive.check_token == token
    console = vm_dir / "console.log"

    def say(*lines: str, path: Path = console) -> None:
        with path.open("a") as f:
            f.write("".join(lines))

    say("booting\r\n", f"ember-init: check {token} 0 ok\r\n")
    converge(agent, 1)
    assert control.reasons[-1] == ("healthy", "")
    forged = "0" * 32
    say(*[f"ember-init: check {forged} 0 fail status 1\r\n"] * 5)
    say(*[f"app: ember-init: check {token[:-1]}x 0 fail status 1\r\n"] * 5)
    converge(agent, 2)
    assert control.reasons[-1] == ("healthy", "")  # look-alikes without the token count for nothing
    say(*[f"ember-init: check {token} 0 fail status 1\r\n"] * 3)
    converge(agent, 1)
    assert control.reasons[-1] == (
        "unhealthy",
        "exec check 'test -f /tmp/ok' failed 3 times in a row: status 1",
    )
    # The VMM rotates the log mid-line: the rest of console.log.1, then the new file.
    say(f"ember-init: check {token} 0 o")
    converge(agent, 1)
    say("k\r\n")
    console.rename(vm_dir / "console.log.1")
    say("the workload keeps talking\r\n")
    converge(agent, 1)
    assert control.reasons[-1] == ("healthy", "")
    assert probed == []  # the agent runs no exec check itself
    agent.close()
