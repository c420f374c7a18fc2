"""(c) a projector killed mid-batch recovers to exactly a fresh rebuild; (d) rebuilds are
byte-identical and redelivery changes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.core.errors import NotFound
from ember.core.events import ANY
from ember.store.db import Database
from ember.store.eventlog import EventLog
from ember.store.projections import ProjectionRunner
from ember.store.views.streams import StreamsProjection
from tests.support.events import REGISTRY, tick
from tests.support.projections import CounterProjection, create_tables

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner(db: Database, database_url: str) -> ProjectionRunner:
    create_tables(database_url)
    return ProjectionRunner(db, REGISTRY, [CounterProjection(), StreamsProjection()])


def fill(log: EventLog, n: int, streams: int = 7) -> None:
    for i in range(n):
        log.append(f"counter-{i % streams}", ANY, [tick(i)])


def scalar(db: Database, sql: str) -> object:
    with db.connection() as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_catch_up_folds_everything_and_tracks_its_cursor(
    log: EventLog, runner: ProjectionRunner, db: Database
) -> None:
    fill(log, 50)
    assert runner.catch_up(batch_size=8) == {"counters": 50, "streams": 50}
    assert scalar(db, "SELECT sum(total) FROM test_counters") == sum(range(50))
    assert scalar(db, "SELECT count(*) FROM view_streams") == 7
    status = {s.name: s for s in runner.status()}
    assert status["counters"].cursor == log.head() and status["counters"].lag_events == 0
    fill(log, 5)
    assert {s.name: s.lag_events for s in runner.status()} == {"counters": 5, "streams": 5}
    assert runner.catch_up() == {"counters": 5, "streams": 5}


def test_rebuild_is_byte_identical_and_redelivery_changes_nothing(
    log: EventLog, runner: ProjectionRunner, db: Database
) -> None:
    fill(log, 120)
    runner.catch_up(batch_size=13)
    incremental = {n: runner.digest(n) for n in ("counters", "streams")}

    assert runner.rebuild() == {"counters": 120, "streams": 120}
    assert {n: runner.digest(n) for n in incremental} == incremental

    # Deliver every event a second time: from a reset checkpoint, and twice in a row.
    with db.connection() as conn:
        conn.execute("UPDATE projection_checkpoints SET xid = '0', position = 0")
    runner.catch_up(batch_size=17)
    with db.connection() as conn, conn.transaction(), conn.cursor() as cur:
        for event in log.read_all(limit=1000):
            for projection in runner.projections.values():
                projection.apply(cur, event)
                projection.apply(cur, event)
    assert {n: runner.digest(n) for n in incremental} == incremental


def test_digest_notices_a_changed_row(
    log: EventLog, runner: ProjectionRunner, db: Database
) -> None:
    fill(log, 10)
    runner.catch_up()
    before = runner.digest("counters")
    with db.connection() as conn:
        conn.execute("UPDATE test_counters SET total = total + 1 WHERE stream_id = 'counter-0'")
    assert runner.digest("counters") != before
    runner.rebuild("counters")
    assert runner.digest("counters") == before


def test_unknown_projection_is_not_found(runner: ProjectionRunner) -> None:
    with pytest.raises(NotFound) as err:
        runner.rebuild("nope")
    assert err.value.hint == "known projections: counters, streams"


def _projector(database_url: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.projector_proc", database_url, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_kill_9_mid_batch_then_restart_equals_a_fresh_rebuild(
    log: EventLog, runner: ProjectionRunner, db: Database, database_url: str
) -> None:
    fill(log, 1000)
    proc = _projector(database_url, "--delay", "0.004", "--batch", "100")
    try:
        # Wait until one batch has committed and the next one is in flight.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = scalar(
                db,
                "SELECT coalesce(max(position), 0) FROM projection_checkpoints "
                "WHERE name = 'counters'",
            )
            in_flight = scalar(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                "'ember-projector' AND xact_start IS NOT NULL",
            )
            if done and in_flight and done <= 500:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the projector never reached the middle of a batch")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()

    # Wait for Postgres to notice the dead client and roll its batch back.
    deadline = time.monotonic() + 30
    while (
        scalar(
            db, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ember-projector'"
        )
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    checkpoint = scalar(db, "SELECT position FROM projection_checkpoints WHERE name='counters'")
    ticks = scalar(db, "SELECT count(*) FROM test_ticks")
    assert 0 < checkpoint < 1000, "killed after the first batch and before the last"  # type: ignore[operator]
    assert checkpoint % 100 == 0, "the checkpoint only moves at batch boundaries"  # type: ignore[operator]
    assert ticks == checkpoint, "views hold exactly the committed batches, no partial one"

    restarted = _projector(database_url, "--once", "--batch", "64")
    try:
        assert restarted.wait(timeout=60) == 0
    finally:
        if restarted.poll() is None:
            restarted.kill()
    recovered = runner.digest("counters")
    assert scalar(db, "SELECT count(*) FROM test_ticks") == 1000
    runner.rebuild("counters")
    assert runner.digest("counters") == recovered


def test_verify_compares_live_views_with_a_rebuild_and_changes_nothing(
    log: EventLog, runner: ProjectionRunner, db: Database
) -> None:
    fill(log, 30)
    runner.catch_up()
    fill(log, 4)  # not yet folded: verify must fold them on both sides
    results = runner.verify()
    assert all(live == rebuilt for live, rebuilt in results.values())
    assert {s.name: s.lag_events for s in runner.status()} == {"counters": 4, "streams": 4}

    with db.connection() as conn:
        conn.execute("UPDATE test_counters SET total = 0 WHERE stream_id = 'counter-1'")
    before = runner.digest("counters")
    live, rebuilt = runner.verify("counters")["counters"]
    assert live != rebuilt
    assert runner.digest("counters") == before, "verify rolled everything back"
