"""(a) Many writers racing on overlapping streams: no lost or duplicated version."""

from __future__ import annotations

import random
import threading
from collections import Counter

from ember.core.errors import ConcurrencyConflict
from ember.store.db import Database
from ember.store.eventlog import EventLog
from tests.support.events import tick

WRITERS = 16
ATTEMPTS_PER_WRITER = 40
STREAMS = [f"counter-{i}" for i in range(4)]


def test_sixteen_writers_on_overlapping_streams(log: EventLog, db: Database) -> None:
    accepted: Counter[str] = Counter()
    accepted_events: Counter[str] = Counter()
    conflicts = Counter[str]()
    lock = threading.Lock()
    barrier = threading.Barrier(WRITERS)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for i in range(ATTEMPTS_PER_WRITER):
            stream = rng.choice(STREAMS)
            size = rng.choice([1, 1, 1, 3])
            expected = log.stream_version(stream)
            try:
                log.append(stream, expected, [tick(seed * 1000 + i) for _ in range(size)])
            except ConcurrencyConflict:
                with lock:
                    conflicts[stream] += 1
            else:
                with lock:
                    accepted[stream] += 1
                    accepted_events[stream] += size

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(accepted.values()) + sum(conflicts.values()) == WRITERS * ATTEMPTS_PER_WRITER
    assert sum(conflicts.values()) > 0, "the test must actually produce races"
    with db.connection() as conn:
        for stream in STREAMS:
            versions = [
                r[0]
                for r in conn.execute(
                    "SELECT stream_version FROM events WHERE stream_id = %s ORDER BY 1", (stream,)
                )
            ]
            assert versions == list(range(1, accepted_events[stream] + 1)), stream
        total = conn.execute("SELECT count(*) FROM events").fetchone()
    assert total is not None and total[0] == sum(accepted_events.values())
    # Commit-safe reading returns every row exactly once, in per-stream version order.
    everything = log.read_all(limit=10_000)
    assert len(everything) == total[0]
    for stream in STREAMS:
        seq = [e.stream_version for e in everything if e.stream_id == stream]
        assert seq == sorted(seq)
