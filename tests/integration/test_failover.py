"""Leader election and fencing: a paused leader that wakes up after losing its lease
cannot write, and no instance is ever assigned twice."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from ember.core.events import ANY
from ember.core.workloads import ProcessScale
from ember.store.errors import Fenced
from ember.store.eventlog import EventLog, StreamAppend, check_fence
from ember.store.leases import Leases
from tests.support.scheduling import World, manifest

TTL = 1.0


def _tick(log: EventLog, stream: str = "test-fence") -> list[StreamAppend]:
    from tests.support.events import tick

    return [StreamAppend(stream, ANY, [tick(1)])]


def test_a_lease_taken_over_fences_the_old_holder(log: EventLog) -> None:
    leases = Leases(log.db)
    a = leases.acquire("controller", "a", 0.2)
    assert a is not None and a.epoch == 1
    assert leases.acquire("controller", "b", 0.2) is None  # held
    log.append_many(_tick(log), fence=a.fence)
    time.sleep(0.3)
    b = leases.acquire("controller", "b", 5)
    assert b is not None and b.epoch == 2
    before = log.stream_version("test-fence")
    with pytest.raises(Fenced):
        log.append_many(_tick(log), fence=a.fence)
    assert log.stream_version("test-fence") == before  # nothing kept
    assert leases.renew(a, 5) is None  # and it learns it lost
    log.append_many(_tick(log), fence=b.fence)
    assert log.stream_version("test-fence") == before + 1


def test_an_expired_lease_fences_until_renewed(log: EventLog) -> None:
    leases = Leases(log.db)
    a = leases.acquire("controller", "a", 0.1)
    assert a is not None
    time.sleep(0.2)
    with pytest.raises(Fenced):
        log.append_many(_tick(log), fence=a.fence)
    renewed = leases.renew(a, 5)  # nobody took over: the same epoch goes on
    assert renewed is not None and renewed.epoch == a.epoch
    log.append_many(_tick(log), fence=renewed.fence)


def test_a_writer_stalled_inside_its_fenced_write_cannot_block_a_takeover(
    log: EventLog, database_url: str
) -> None:
    leases = Leases(log.db)
    a = leases.acquire("controller", "a", 0.5)
    assert a is not None
    stalled = psycopg.connect(database_url, autocommit=True)
    try:
        tx = stalled.transaction()
        tx.__enter__()
        check_fence(stalled, a.fence)  # holds the lease lock (shared), then the process pauses
        time.sleep(0.6)  # past a's lease
        started = time.monotonic()
        b = leases.acquire("controller", "b", 5)
        assert b is not None and b.epoch == a.epoch + 1
        assert time.monotonic() - started < 5
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):  # cut off
            stalled.execute("SELECT 1")
    finally:
        stalled.close()


# -- two real controller processes -------------------------------------------------------


def _controller(database_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "EMBER_DATABASE_URL": database_url,
        "EMBER_CONTROLLER_LEASE_TTL": str(TTL),
        "EMBER_CONTROLLER_INTERVAL": "0.05",
        "EMBER_HEARTBEAT_TIMEOUT": "3600",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ember.main", "server", "controller"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    w = World.create(database_url)
    w.controller.step_down()  # the real processes lead, not the test
    yield w
    w.close()


def _leader(world: World) -> tuple[str, int] | None:
    with world.db.connection() as conn:
        row = conn.execute(
            "SELECT holder, epoch FROM leases WHERE name = 'controller' "
            "AND expires_at > clock_timestamp()"
        ).fetchone()
    return (row[0], int(row[1])) if row else None


def _wait(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _placed(world: World) -> int:
    world.runner.catch_up()
    return int(
        world.one(
            "SELECT count(*) FROM view_instances WHERE host_id IS NOT NULL "
            "AND state NOT IN ('stopped', 'failed', 'lost')"
        )
    )


def _pid_of(holder: str) -> int:
    return int(holder.split(":")[1])


def test_paused_leader_is_fenced_and_nothing_is_assigned_twice(
    world: World, database_url: str
) -> None:
    for h in ("h1", "h2", "h3", "h4"):
        world.add_host(h, memory_mb=16384)
    world.deploy(manifest(), image=1)
    procs = [_controller(database_url), _controller(database_url)]
    try:
        _wait(lambda: _leader(world) is not None)
        count = 1
        epochs_seen = set()
        for _round in range(4):
            holder, epoch = _leader(world)  # type: ignore[misc]
            epochs_seen.add(epoch)
            paused = _pid_of(holder)
            # Keep the leader busy, and pause it at an arbitrary point of its pass.
            count += 3
            world.scale(web=ProcessScale(count=count))
            time.sleep(0.02 * (_round + 1))
            os.kill(paused, signal.SIGSTOP)
            count += 2
            world.scale(web=ProcessScale(count=count))
            try:
                _wait(lambda e=epoch: (_leader(world) or ("", 0))[1] > e)
            finally:
                os.kill(paused, signal.SIGCONT)
            for agent in world.agents:
                agent.step()
        _wait(lambda: _placed(world) == count)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=15)[1].decode() for p in procs]
    fenced = sum(text.count("write fenced") for text in logs)
    print(f"stale-epoch writes refused by the fence: {fenced}")
    assert len(epochs_seen) >= 3

    with world.db.connection() as conn:
        # No instance assigned twice.
        doubled = conn.execute(
            "SELECT data->>'instance_id' FROM events WHERE type = 'instance.assigned' "
            "GROUP BY 1 HAVING count(*) > 1"
        ).fetchall()
        assert doubled == []
        # Zero writes accepted from a stale epoch: every epoch's writes all precede the
        # next epoch's (a takeover waits for writes in flight under the old epoch).
        spans = conn.execute(
            "SELECT (metadata->>'leader_epoch')::int AS e, min(position), max(position) "
            "FROM events WHERE metadata ? 'leader_epoch' GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert len(spans) >= 2
    for (e1, _lo1, hi1), (e2, lo2, _hi2) in itertools.pairwise(spans):
        assert e1 < e2 and hi1 < lo2, spans
