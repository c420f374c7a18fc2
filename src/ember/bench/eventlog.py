"""`make bench-eventlog`: event-log throughput and delivery latency on real Postgres.

Every figure is a median over interleaved rounds, and append throughput is judged as a
ratio against plain INSERTs of the same 1 KiB payload in the same run (same cluster,
concurrency and durability), so a noisy machine moves both together.

Goals (the Foundation issue): append_ratio >= 0.5, catch-up >= 10x append,
notify p99 <= 20 ms at half the maximum append rate, skipped_events = 0.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ember.bench.common import bench_cluster, median, percentile, write_result
from ember.core.events import ANY, ZERO, Cursor, EventData, EventRegistry, NewEvent
from ember.store.db import Database
from ember.store.eventlog import EventLog

REGISTRY = EventRegistry()
PAD = "x" * 1000  # with the envelope, a ~1 KiB event


@REGISTRY.register
class Recorded(EventData):
    event_type = "bench.recorded"
    pad: str
    t: float = 0.0


RAW_DDL = """
CREATE TABLE IF NOT EXISTS bench_raw (
    position bigserial PRIMARY KEY, stream_id text NOT NULL, stream_version bigint NOT NULL,
    type text NOT NULL, schema_version int NOT NULL, data jsonb NOT NULL,
    metadata jsonb NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now())
"""


def _event(t: float = 0.0) -> NewEvent:
    return NewEvent("bench.recorded", {"pad": PAD, "t": t})


def _run_writers(writers: int, seconds: float, body: Callable[[int, int], int]) -> float:
    """Run ``body(writer, i) -> events written`` in ``writers`` threads; return events/s."""
    counts = [0] * writers
    barrier = threading.Barrier(writers + 1)
    deadline = [0.0]

    def loop(w: int) -> None:
        barrier.wait()
        i = 0
        while time.monotonic() < deadline[0]:
            counts[w] += body(w, i)
            i += 1

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    start = time.monotonic()
    deadline[0] = start + seconds
    barrier.wait()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def measure_append(log: EventLog, writers: int, seconds: float, batch: int, tag: str) -> float:
    versions = [0] * writers
    events = [_event()] * batch

    def body(w: int, _i: int) -> int:
        # Each writer owns its streams, so the expected version is always right.
        versions[w] = log.append(f"bench-{tag}-{w}", versions[w], events).last_version
        return batch

    return _run_writers(writers, seconds, body)


def measure_raw(conns: list[psycopg.Connection], seconds: float) -> float:
    data = Jsonb({"pad": PAD, "t": 0.0})

    def body(w: int, i: int) -> int:
        conns[w].execute(
            "INSERT INTO bench_raw (stream_id, stream_version, type, schema_version, data, "
            "metadata) VALUES (%s, %s, %s, 1, %s, %s)",
            (f"raw-{w}", i + 1, "bench.recorded", data, Jsonb({})),
        )
        return 1

    return _run_writers(len(conns), seconds, body)


def measure_catchup(log: EventLog) -> tuple[float, int]:
    start = time.monotonic()
    cursor, total = ZERO, 0
    while page := log.read_all(cursor, limit=1000):
        cursor = page[-1].cursor
        total += len(page)
    return total / (time.monotonic() - start), total


def _subscriber(conninfo: str, after: str, ready: Any, out: Any) -> None:
    """Runs in its own process (no GIL shared with the writers); records when each event
    reached it, by the wall clock the server's commit timestamps also use."""
    with Database(conninfo, max_size=2) as db:
        log = EventLog(db, REGISTRY)
        received: list[tuple[int, float]] = []
        ready.set()
        for event in log.subscribe(Cursor.parse(after), idle_poll_s=0.5):
            now = time.time()
            if event.stream_id == "bench-done":
                break
            received.append((event.position, now))
        out.send(received)


def measure_notify(
    log: EventLog, conninfo: str, writers: int, seconds: float, rate: float
) -> dict[str, float]:
    """Writers at ``rate`` events/s in total; a subscriber in another process.

    Two latencies per event, both ending when the subscriber holds the decoded event:
    from the moment the writer's append was acknowledged (committed, NOTIFY sent: what a
    caller of the API waits for) and, more conservatively, from the commit timestamp the
    server records before flushing WAL (``track_commit_timestamp``).
    """
    ctx = mp.get_context("spawn")
    ready, (recv, send) = ctx.Event(), ctx.Pipe(duplex=False)
    start_cursor = log.head()
    proc = ctx.Process(target=_subscriber, args=(conninfo, str(start_cursor), ready, send))
    proc.start()
    ready.wait(30)
    time.sleep(0.3)  # let it LISTEN before the first append
    interval = writers / rate
    versions = [0] * writers
    tag = f"{start_cursor.xid}x{start_cursor.position}"
    acked: dict[int, float] = {}

    def body(w: int, i: int) -> int:
        due = t0 + w * interval / writers + i * interval
        if (delay := due - time.monotonic()) > 0:
            time.sleep(delay)
        result = log.append(f"bench-notify-{tag}-{w}", versions[w], [_event()])
        acked[result.last_position] = time.time()
        versions[w] = result.last_version
        return 1

    t0 = time.monotonic()
    _run_writers(writers, seconds, body)
    log.append("bench-done", ANY, [_event()])
    received: list[tuple[int, float]] = recv.recv()
    proc.join(10)
    committed = _commit_times(log, start_cursor)
    from_ack = [max(0.0, at - acked[pos]) * 1000 for pos, at in received if pos in acked]
    from_commit = [(at - committed[pos]) * 1000 for pos, at in received if pos in committed]
    positions = [pos for pos, _ in received]
    return {
        "p50_ms": median(from_ack),
        "p99_ms": percentile(from_ack, 99),
        "commit_p50_ms": median(from_commit),
        "commit_p99_ms": percentile(from_commit, 99),
        "delivered": len(positions),
        "skipped": len(set(committed) - set(positions)),
        "duplicates": len(positions) - len(set(positions)),
    }


def _commit_times(log: EventLog, after: Cursor) -> dict[int, float]:
    """position -> commit time (epoch seconds) of every event after ``after``."""
    with log.db.connection() as conn:
        rows = conn.execute(
            "SELECT position, extract(epoch FROM pg_xact_commit_timestamp(xid::text::xid)) "
            "FROM events WHERE (xid, position) > (%s::text::xid8, %s) "
            "AND stream_id <> 'bench-done'",
            (str(after.xid), after.position),
        ).fetchall()
    return {int(pos): float(ts) for pos, ts in rows}


def run(quick: bool) -> dict[str, Any]:
    writers = 4
    rounds, seconds = (2, 2.5) if quick else (5, 5.0)
    with (
        bench_cluster("track_commit_timestamp = on") as cluster,
        Database(cluster.conninfo(), max_size=writers + 2) as db,
    ):
        log = EventLog(db, REGISTRY)
        raw_conns = [psycopg.connect(cluster.conninfo(), autocommit=True) for _ in range(writers)]
        raw_conns[0].execute(RAW_DDL)
        appends, raws, batches = [], [], []
        for r in range(rounds):  # interleaved, so drift hits both sides alike
            raws.append(measure_raw(raw_conns, seconds))
            appends.append(measure_append(log, writers, seconds, 1, f"single{r}"))
            batches.append(measure_append(log, writers, seconds / 2, 100, f"batch{r}"))
        for c in raw_conns:
            c.close()
        catchups = []
        for _ in range(3):
            rate, total = measure_catchup(log)
            catchups.append(rate)
        append_rate, raw_rate = median(appends), median(raws)
        # Settle the write backlog of the throughput phases (checkpoint, visibility map)
        # so the latency phase measures delivery, not the previous phase's flushing.
        with db.connection() as conn:
            conn.execute("VACUUM ANALYZE events")
            conn.execute("CHECKPOINT")
        notify = measure_notify(
            log, cluster.conninfo(), writers, seconds * (1 if quick else 2), append_rate / 2
        )
    result = {
        "append_events_per_s": round(append_rate, 1),
        "raw_insert_rows_per_s": round(raw_rate, 1),
        "append_ratio": round(append_rate / raw_rate, 3),
        "batch_append_events_per_s": round(median(batches), 1),
        "catchup_events_per_s": round(median(catchups), 1),
        "catchup_ratio_vs_append": round(median(catchups) / append_rate, 1),
        "notify_to_subscriber_p50_ms": round(notify["p50_ms"], 2),
        "notify_to_subscriber_p99_ms": round(notify["p99_ms"], 2),
        "commit_to_subscriber_p50_ms": round(notify["commit_p50_ms"], 2),
        "commit_to_subscriber_p99_ms": round(notify["commit_p99_ms"], 2),
        "notify_rate_events_per_s": round(append_rate / 2, 1),
        "notify_delivered": notify["delivered"],
        "skipped_events": notify["skipped"],
        "duplicate_deliveries": notify["duplicates"],
        "catchup_log_size": total,
        "config": {
            "writers": writers,
            "rounds": rounds,
            "seconds_per_round": seconds,
            "event_bytes": len(PAD) + 24,
            "durability": "fsync=on, synchronous_commit=on (PostgreSQL defaults)",
            "samples": {"append": appends, "raw": raws, "batch": batches, "catchup": catchups},
        },
    }
    result["goals"] = {
        "append_ratio>=0.5": append_rate / raw_rate >= 0.5,
        "catchup>=10x_append": median(catchups) >= 10 * append_rate,
        "notify_p99<=20ms": notify["p99_ms"] <= 20,
        # Stricter than asked: measured from the commit record, before the WAL flush.
        "commit_to_subscriber_p99<=20ms": notify["commit_p99_ms"] <= 20,
        "skipped_events==0": notify["skipped"] == 0,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced run, under 60 s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/eventlog.json"))
    args = parser.parse_args()
    started = time.monotonic()
    result = run(args.quick)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    write_result(args.out, "eventlog", result, quick=args.quick)
    for key in (
        "append_events_per_s",
        "raw_insert_rows_per_s",
        "append_ratio",
        "batch_append_events_per_s",
        "catchup_events_per_s",
        "notify_to_subscriber_p99_ms",
        "skipped_events",
        "goals",
        "wall_seconds",
    ):
        print(f"{key:32} {result[key]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
