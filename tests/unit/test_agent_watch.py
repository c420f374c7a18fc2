"""The agent's allocations by list + watch (ember.agent.watch): applying changes (pure);
the watcher lists, resumes from each answer's cursor, lists again at once on 410 and after
a backoff on other errors, keeping the last set meanwhile; and the agent's loop steps as
soon as the watch delivers a change (not on its cadence) and stops promptly while a
long-poll is held. The control plane is scripted: each call takes the next answer (or
error) the test queues, and blocks like a long-poll until there is one."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.agent.converge import Allocation
from ember.agent.daemon import Agent
from ember.agent.watch import AllocationChange, AllocationWatch, apply_changes
from ember.client.errors import ApiGone, Unreachable
from tests.unit.test_agent_daemon import SPEC, FakeControl, FakeDriver, make

A1 = Allocation("i1", "assigned", "run", SPEC, "app", "web")
A2 = Allocation("i2", "assigned", "run", SPEC, "app", "web")
A3 = Allocation("i3", "assigned", "run", SPEC, "app", "web")
GONE = ApiGone(
    "cannot watch allocations from cursor 1-1",
    code="allocations.cursor_expired",
    status=410,
)
DOWN = Unreachable("cannot reach the control plane at http://api.test")

Listed = tuple[list[Allocation], str]
Watched = tuple[list[AllocationChange], str]


class Scripted:
    """list_allocations / watch_allocations answering from queues the test fills."""

    def __init__(self) -> None:
        self.lists: queue.Queue[Listed | Exception] = queue.Queue()
        self.watches: queue.Queue[Watched | Exception] = queue.Queue()
        self.calls: list[tuple[str, str | None]] = []
        self._called = threading.Condition()

    def list_allocations(self, host_id: str) -> Listed:
        return self._answer(("list", None), self.lists)

    def watch_allocations(self, host_id: str, cursor: str, wait_s: float) -> Watched:
        return self._answer(("watch", cursor), self.watches)

    def _answer(self, call: tuple[str, str | None], answers: queue.Queue[Any]) -> Any:
        with self._called:
            self.calls.append(call)
            self._called.notify_all()
        answer = answers.get(timeout=30)  # a long-poll: held until the test answers
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wait_calls(self, n: int) -> list[tuple[str, str | None]]:
        with self._called:
            assert self._called.wait_for(lambda: len(self.calls) >= n, 10), self.calls
            return list(self.calls)


class WatchedControl(FakeControl, Scripted):
    """The agent's fake control plane (reports, heartbeats) with a scripted watch."""

    def __init__(self) -> None:
        FakeControl.__init__(self)
        Scripted.__init__(self)


def started(source: Scripted, **kw: Any) -> tuple[AllocationWatch, threading.Event]:
    changed = threading.Event()
    watch = AllocationWatch(source, "h1", on_change=changed.set, **kw)
    watch.start()
    return watch, changed


def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        done.wait(0.01)
    return condition()


# -- applying changes --------------------------------------------------------------------


def test_changes_apply_by_instance_and_repeats_change_nothing() -> None:
    stopping = dataclasses.replace(A1, state="stopping", desired="stop")
    changes = [
        AllocationChange("added", A2),
        AllocationChange("modified", stopping),
        AllocationChange("removed", A3),  # not there: nothing to remove
    ]
    once = apply_changes({"i1": A1, "i3": A3}, changes)
    assert once == {"i1": stopping, "i2": A2}
    assert apply_changes(once, changes) == once  # delivered again: the same set
    assert apply_changes(once, [AllocationChange("removed", stopping)]) == {"i2": A2}
    # A modification of something unknown (its add was before the list) is taken as is.
    assert apply_changes({}, [AllocationChange("modified", A1)]) == {"i1": A1}


# -- the watcher ---------------------------------------------------------------------------


def test_the_watcher_lists_then_resumes_from_every_answers_cursor() -> None:
    source = Scripted()
    watch, changed = started(source)
    try:
        assert watch.current() is None  # nothing listed yet: the agent does not plan
        source.lists.put(([A1], "1-1"))
        assert changed.wait(10)
        assert watch.current() == [A1] and watch.cursor == "1-1"

        changed.clear()
        source.watches.put(([AllocationChange("added", A2)], "1-2"))
        assert changed.wait(10)
        assert watch.current() == [A1, A2]

        # The wait ran out with nothing for this host: no change to report, but the
        # next watch resumes from the newer cursor.
        changed.clear()
        source.watches.put(([], "1-3"))
        calls = source.wait_calls(4)
        assert calls == [("list", None), ("watch", "1-1"), ("watch", "1-2"), ("watch", "1-3")]
        assert not changed.is_set() and watch.current() == [A1, A2]
    finally:
        watch.stop()


def test_a_410_lists_again_at_once() -> None:
    source = Scripted()
    # A backoff would hold the new list for a minute: the 410 must not wait for one.
    watch, changed = started(source, backoff_s=60)
    try:
        source.lists.put(([A1], "1-1"))
        assert changed.wait(10)
        changed.clear()
        source.watches.put(GONE)
        source.lists.put(([A1, A3], "5-9"))
        assert changed.wait(10)
        assert watch.current() == [A1, A3] and watch.cursor == "5-9"
        assert source.wait_calls(4) == [
            ("list", None),
            ("watch", "1-1"),
            ("list", None),
            ("watch", "5-9"),
        ]
    finally:
        watch.stop()


def test_errors_keep_the_last_set_and_list_again_after_a_backoff() -> None:
    source = Scripted()
    watch, changed = started(source, backoff_s=0.01)
    try:
        source.lists.put(DOWN)  # the control plane is down at start: nothing known yet
        source.wait_calls(2)
        assert watch.current() is None
        source.lists.put(([A1], "1-1"))
        assert changed.wait(10) and watch.current() == [A1]

        source.watches.put(RuntimeError("connection reset"))
        # Listing again (held): meanwhile the agent keeps converging to what it knew.
        assert source.wait_calls(4)[-1] == ("list", None)
        assert watch.current() == [A1] and watch.cursor is None
        changed.clear()
        source.lists.put(([A2], "2-2"))
        assert changed.wait(10) and watch.current() == [A2]
        assert source.wait_calls(5)[-1] == ("watch", "2-2")
    finally:
        watch.stop()


# -- the agent's loop ----------------------------------------------------------------------


def running(agent: Agent) -> tuple[threading.Thread, threading.Event]:
    stopping = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stopping.is_set,), daemon=True)
    thread.start()
    return thread, stopping


def test_the_agent_steps_when_the_watch_delivers_and_stops_during_a_long_poll(
    tmp_path: Path,
) -> None:
    control, driver = WatchedControl(), FakeDriver()
    agent = make(tmp_path, driver, control, [False])
    # One pass a minute: only the watch can make the agent act within the test.
    agent.config = dataclasses.replace(agent.config, poll_s=60.0)
    thread, stopping = running(agent)
    try:
        control.lists.put(([], "1-1"))
        control.wait_calls(2)  # listed, and now holding the watch
        control.allocs["i1"] = A1  # what the fake's report() updates
        control.watches.put(([AllocationChange("added", A1)], "1-2"))
        assert until(lambda: [s.vm_id for s in driver.starts] == ["i1"]), driver.starts

        # Stopped while the next long-poll is held (nothing answers it): run returns.
        control.wait_calls(3)
        stopping.set()
        thread.join(5)
        assert not thread.is_alive(), "the agent did not stop while a watch was held"
    finally:
        stopping.set()
        agent.close()


def test_a_control_plane_without_a_watch_is_listed_on_every_step(tmp_path: Path) -> None:
    control, driver = FakeControl(), FakeDriver()
    control.allocs["i1"] = A1
    agent = make(tmp_path, driver, control, [False])
    agent.config = dataclasses.replace(agent.config, poll_s=0.05)
    thread, stopping = running(agent)
    try:
        assert until(lambda: [s.vm_id for s in driver.starts] == ["i1"]), driver.starts
        control.allocs["i1"] = dataclasses.replace(control.allocs["i1"], desired="stop")
        assert until(lambda: any(r[:2] == ("i1", "stopped") for r in control.reports))
    finally:
        stopping.set()
        thread.join(5)
        agent.close()
    assert not thread.is_alive()
