"""(b) A transaction that appends early and commits late is never skipped by a reader."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from ember.core.events import ZERO, RecordedEvent
from ember.store.eventlog import EventLog, _append_params, _run_append
from tests.support.events import REGISTRY, tick


class LiveSubscriber:
    """Runs ``EventLog.subscribe`` in a thread and records what it delivers."""

    def __init__(self, log: EventLog) -> None:
        self.received: list[RecordedEvent] = []
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(log,), daemon=True)
        self._thread.start()

    def _run(self, log: EventLog) -> None:
        # A long idle poll: delivery must come from NOTIFY or the held-back re-check.
        for event in log.subscribe(ZERO, idle_poll_s=30, stop=self.stop):
            with self._cond:
                self.received.append(event)
                self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[RecordedEvent]], bool], timeout: float = 10
    ) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.received), timeout), self.received

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5)


def begin_append(database_url: str, stream: str, n: int) -> psycopg.Connection:
    """Transaction A: append inside an open transaction and leave it open."""
    conn = psycopg.connect(database_url)
    params = _append_params(stream, 0, [REGISTRY.validate(tick(n))])
    _run_append(conn, stream, 0, params)
    return conn


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_late_commit_is_delivered_and_nothing_is_lost(
    log: EventLog, database_url: str, outcome: str
) -> None:
    subscriber = LiveSubscriber(log)
    try:
        log.append("counter-before", 0, [tick(0)])
        subscriber.wait_for(lambda got: len(got) == 1)

        a = begin_append(database_url, "counter-a", 1)  # takes the lower xid and position
        b = log.append("counter-b", 0, [tick(2)])  # commits first
        # B is committed but behind A's horizon: it must not be delivered yet, or a
        # subscriber that checkpoints B's cursor would skip A forever.
        time.sleep(0.3)
        assert [e.stream_id for e in subscriber.received] == ["counter-before"]
        assert log.read_all(subscriber.received[-1].cursor) == []

        if outcome == "commit":
            a.commit()
            expected = ["counter-before", "counter-a", "counter-b"]
        else:
            a.rollback()  # a rollback sends no notification: the reader must still see B
            expected = ["counter-before", "counter-b"]
        a.close()
        subscriber.wait_for(lambda got: len(got) == len(expected))
        time.sleep(0.2)  # anything extra (a duplicate, a phantom) would show up now
        assert [e.stream_id for e in subscriber.received] == expected
        assert subscriber.received[-1].position == b.last_position
        cursors = [e.cursor for e in subscriber.received]
        assert cursors == sorted(cursors)
    finally:
        subscriber.close()


def test_reader_resumes_from_its_cursor_without_gaps_or_repeats(log: EventLog) -> None:
    for i in range(10):
        log.append("counter-x", i, [tick(i)])
    first = log.read_all(ZERO, limit=4)
    rest = log.read_all(first[-1].cursor, limit=100)
    assert [e.data["n"] for e in first + rest] == list(range(10))
