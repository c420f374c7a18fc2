"""The controller on real Postgres: reconcile, schedule and converge with simulated agents."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ember.control.controller import ControllerConfig
from ember.core.reconcile import ReconcileConfig
from ember.core.workloads import ProcessScale
from tests.support.scheduling import World, digest, manifest


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    w = World.create(database_url)
    yield w
    w.close()


def healthy(world: World, release: int | None = None) -> list[dict[str, object]]:
    return [
        i for i in world.instances("healthy") if release is None or i["release_version"] == release
    ]


def test_deploy_converges_then_scale_spreads_over_hosts(world: World) -> None:
    for h in ("h1", "h2", "h3"):
        world.add_host(h)
    world.deploy(manifest(), image=1)
    world.converge()
    assert len(healthy(world, 1)) == 1
    assert world.rollout()["phase"] == "completed"

    world.scale(web=ProcessScale(count=3))
    world.converge()
    running = healthy(world)
    assert len(running) == 3
    assert sorted(i["host_id"] for i in running) == ["h1", "h2", "h3"]  # spread

    world.scale(web=ProcessScale(count=1))
    world.converge()
    assert len(healthy(world)) == 1
    assert len(world.instances("stopped")) == 2


def test_rolling_deploy_replaces_every_instance_and_keeps_capacity(world: World) -> None:
    for h in ("h1", "h2"):
        world.add_host(h)
    world.deploy(manifest(), image=1)
    world.scale(web=ProcessScale(count=2))
    world.converge()
    world.deploy(manifest(), image=2)
    for _ in range(30):
        world.step()
        # max_unavailable = 0: never fewer than 2 healthy instances during the rollout
        assert len(healthy(world)) >= 2
        if world.rollout()["phase"] == "completed":
            break
    assert world.rollout()["phase"] == "completed"
    assert len(healthy(world, 2)) == 2 and not healthy(world, 1)


def test_unplaceable_instances_record_why(world: World) -> None:
    world.add_host("small", memory_mb=1024)
    world.deploy(manifest(memory=2048), image=1)
    world.converge()
    pending = world.instances("pending")
    assert len(pending) == 1
    unplaced = world.one(
        "SELECT state->'unplaced'->>'web' FROM view_workloads WHERE app_id = %s", world.app_id
    )
    assert "2080 MB" in unplaced and "small" in unplaced
    # a bigger host arrives: the same instance is placed
    world.add_host("big", memory_mb=8192)
    world.converge()
    assert [i["instance_id"] for i in healthy(world)] == [pending[0]["instance_id"]]
    assert healthy(world)[0]["host_id"] == "big"


def test_failed_rollout_halts_and_auto_rolls_back(database_url: str) -> None:
    world = World.create(database_url, ControllerConfig(reconcile=ReconcileConfig(failure_limit=2)))
    try:
        agent = world.add_host("h1")
        agent.failing_digests = {digest(2)}
        world.deploy(manifest(), image=1)
        world.converge()
        world.deploy(manifest(), image=2, auto_rollback=True)
        world.converge()
        rollout = world.rollout()
        assert rollout["phase"] == "completed"  # the rollback's rollout
        assert world.live_release() == 3  # v3 = a copy of v1
        halted = world.one("SELECT data->>'reason' FROM events WHERE type = 'rollout.halted'")
        assert "failed" in halted
        running = healthy(world)
        assert len(running) == 1 and running[0]["release_version"] == 1  # never replaced
    finally:
        world.close()


def test_drained_host_is_emptied_onto_others(world: World) -> None:
    world.add_host("h1")
    world.deploy(manifest(), image=1)
    world.converge()
    old = healthy(world)[0]
    assert old["host_id"] == "h1"
    world.add_host("h2")
    from ember.core.events import ANY, NewEvent
    from ember.core.hosts import HostDrainStarted, host_stream

    world.log.append(host_stream("h1"), ANY, [NewEvent.of(HostDrainStarted(host_id="h1"))])
    world.converge()
    now = healthy(world)
    assert len(now) == 1 and now[0]["host_id"] == "h2"
    assert (
        world.one("SELECT state FROM view_instances WHERE instance_id = %s", old["instance_id"])
        == "stopped"
    )


def test_down_host_instances_are_rescheduled(world: World) -> None:
    world.add_host("h1")
    world.add_host("h2")
    world.deploy(manifest(), image=1)
    world.scale(web=ProcessScale(count=2))
    world.converge()
    # h1 falls silent: its heartbeat is old and its agent stops
    with world.db.connection() as conn:
        conn.execute(
            "UPDATE host_heartbeats SET last_seen = now() - interval '1 hour' WHERE host_id = 'h1'"
        )
    world.agents = [a for a in world.agents if a.host_id != "h1"]
    world.converge()
    assert world.one("SELECT down FROM view_hosts WHERE host_id = 'h1'") is True
    assert len(world.instances("lost")) == 1
    now = healthy(world)
    assert len(now) == 2 and {i["host_id"] for i in now} == {"h2"}


def test_a_stale_plan_is_refused_whole_and_recomputed(world: World) -> None:
    from ember.control.controller import _demands, _plan_appends
    from ember.core.events import ANY, NewEvent
    from ember.core.hosts import HostCordoned, host_stream
    from ember.core.placement import place

    world.add_host("h1", memory_mb=8192)
    world.add_host("h2", memory_mb=2048)
    world.deploy(manifest(), image=1)
    world.scale(web=ProcessScale(count=2))
    ctl = world.controller
    world.runner.catch_up()
    ctl.reconcile_all()
    ctl.reconcile_all()  # rollout.started, then the instances
    pending = ctl.reads.pending(100)
    assert len(pending) == 2
    snapshot = ctl.reads.snapshot()
    plan = place(snapshot, _demands(pending), ctl.config.placement)
    assert {p.host_id for p in plan.placements} == {"h1", "h2"}
    # The operator cordons h2 after the snapshot was read: the plan is stale.
    world.log.append(host_stream("h2"), ANY, [NewEvent.of(HostCordoned(host_id="h2"))])
    before = world.event_count()
    assert ctl._write(_plan_appends(plan, _demands(pending), ctl._events)) is False
    assert world.event_count() == before  # nothing of it, not even h1's part
    # The next pass sees the cordon and puts both on h1.
    assert ctl.schedule() == 2
    assert {i["host_id"] for i in world.instances("assigned")} == {"h1"}
