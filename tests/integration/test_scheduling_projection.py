"""The scheduling projection's one-statement fold of instance transitions (the
scheduler's hot path) against the statement-by-statement fold and against
``ember.core.instances.next_state``: every transition from every state, stale and
repeated reports, an assignment racing another, redelivery."""

from __future__ import annotations

import pytest

from ember.core.catalog import REGISTRY
from ember.core.events import ANY, EventData, NewEvent
from ember.core.hosts import HostRegistered, InstanceAssigned, host_stream
from ember.core.instances import (
    InstanceCreated,
    InstanceFailed,
    InstanceHealthy,
    InstanceLost,
    InstanceSpec,
    InstanceStarting,
    InstanceState,
    InstanceStopped,
    InstanceStopRequested,
    InstanceUnhealthy,
    instance_stream,
    next_state,
)
from ember.core.workloads import workload_stream
from ember.store.db import Database
from ember.store.eventlog import EventLog
from ember.store.projections import ProjectionRunner
from ember.store.views import scheduling as view
from ember.store.views.scheduling import SchedulingProjection

APP, ENV = "app_shop", "production"
SPEC = InstanceSpec(
    release_version=1, repository="acme/shop", image_digest="sha256:1", memory_mb=256, cpus=0.5
)
# How each start state is reached, as event types in order.
PATHS: dict[str, list[str]] = {
    "pending": [],
    "assigned": ["instance.assigned"],
    "starting": ["instance.assigned", "instance.starting"],
    "healthy": ["instance.assigned", "instance.starting", "instance.healthy"],
    "unhealthy": ["instance.assigned", "instance.starting", "instance.unhealthy"],
    "stopping": ["instance.assigned", "instance.starting", "instance.stop_requested"],
    "stopped": ["instance.assigned", "instance.stopped"],
    "failed": ["instance.assigned", "instance.starting", "instance.failed"],
    "lost": ["instance.assigned", "instance.lost"],
}
PROBES = [
    "instance.assigned",
    "instance.starting",
    "instance.healthy",
    "instance.unhealthy",
    "instance.stop_requested",
    "instance.stopped",
    "instance.failed",
    "instance.lost",
]


def payload(event_type: str, iid: str, host: str) -> tuple[str, EventData]:
    """The stream the platform writes ``event_type`` to, and the event."""
    if event_type == "instance.assigned":
        assigned = InstanceAssigned(
            host_id=host,
            instance_id=iid,
            app_id=APP,
            env=ENV,
            process="web",
            memory_mb=256,
            cpus=0.5,
        )
        return host_stream(host), assigned
    if event_type == "instance.stop_requested":
        return workload_stream(APP, ENV), InstanceStopRequested(instance_id=iid, reason="scale")
    reports: dict[str, EventData] = {
        "instance.starting": InstanceStarting(instance_id=iid, host_id=host),
        "instance.healthy": InstanceHealthy(instance_id=iid, host_id=host),
        "instance.unhealthy": InstanceUnhealthy(instance_id=iid, host_id=host, reason="probe"),
        "instance.stopped": InstanceStopped(instance_id=iid, host_id=host, exit_code=0),
        "instance.failed": InstanceFailed(
            instance_id=iid, host_id=host, reason="oom", exit_code=137
        ),
        "instance.lost": InstanceLost(instance_id=iid, host_id=host, reason="host down"),
    }
    return instance_stream(iid), reports[event_type]


@pytest.fixture
def log(db: Database) -> EventLog:
    return EventLog(db, REGISTRY)


@pytest.fixture
def runner(db: Database) -> ProjectionRunner:
    return ProjectionRunner(db, REGISTRY, [SchedulingProjection()])


def write_history(log: EventLog) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """Every probe from every start state, each on its own instance: (start state, probe)
    -> (instance id, the transition event types it received, in log order)."""
    for h in ("h1", "h2"):
        event = HostRegistered(host_id=h, vcpus=4, memory_mb=4096, disk_mb=1000)
        log.append(host_stream(h), 0, [NewEvent.of(event)])
    received: dict[tuple[str, str], tuple[str, list[str]]] = {}
    n = 0
    for start, path in PATHS.items():
        for probe in PROBES:
            iid = f"i_{n:03d}"
            n += 1
            created = InstanceCreated(
                instance_id=iid,
                app_id=APP,
                env=ENV,
                process="web",
                spec=SPEC,
                spec_hash=SPEC.spec_hash,
            )
            log.append(workload_stream(APP, ENV), ANY, [NewEvent.of(created)])
            # The probe's assignment comes from the other host: a plan racing another.
            steps = [(t, "h1") for t in path] + [(probe, "h2" if path else "h1")]
            for event_type, host in steps:
                stream, event = payload(event_type, iid, host)
                log.append(stream, ANY, [NewEvent.of(event)])
            received[(start, probe)] = (iid, [t for t, _ in steps])
    idle = InstanceCreated(
        instance_id="i_idle",
        app_id=APP,
        env=ENV,
        process="web",
        spec=SPEC,
        spec_hash=SPEC.spec_hash,
    )
    log.append(workload_stream(APP, ENV), ANY, [NewEvent.of(idle)])
    # A report about an instance the views do not know changes nothing.
    stream, event = payload("instance.healthy", "i_unknown", "h1")
    log.append(stream, ANY, [NewEvent.of(event)])
    return received


def rows(db: Database) -> dict[str, tuple[object, ...]]:
    with db.connection() as conn:
        found = conn.execute(
            "SELECT instance_id, state, host_id, reason, exit_code FROM view_instances"
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in found}


def test_transitions_follow_next_state(
    log: EventLog, db: Database, runner: ProjectionRunner
) -> None:
    received = write_history(log)
    runner.catch_up()
    views = rows(db)
    assert "i_unknown" not in views
    for (start, _probe), (iid, types) in received.items():
        expected = InstanceState.PENDING
        for n, t in enumerate(types):
            if n == len(PATHS[start]):
                assert expected.value == start  # the path reaches the state it is named for
            expected = next_state(expected, t) or expected
        assert views[iid][0] == expected.value, (iid, types)
    # The first assignment wins; a later one from another host's plan changes nothing.
    assert views[received[("assigned", "instance.assigned")][0]][1] == "h1"
    assert views[received[("pending", "instance.assigned")][0]][1] == "h1"
    failed = views[received[("starting", "instance.failed")][0]]
    assert failed == ("failed", "h1", "oom", 137)
    # Every host stream's version is in view_hosts (a plan's expected version).
    with db.connection() as conn:
        versions = conn.execute(
            "SELECT h.host_id, h.version, (SELECT max(stream_version) FROM events "
            "WHERE stream_id = 'host-' || h.host_id) FROM view_hosts h"
        ).fetchall()
    assert versions and all(v == head for _, v, head in versions)
    assert {r[0] for r in versions} == {"h1", "h2"}


def test_one_statement_fold_equals_the_statement_by_statement_fold(
    log: EventLog, db: Database, runner: ProjectionRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_history(log)
    runner.rebuild("scheduling")
    fused = runner.digest("scheduling")
    fused_rows = rows(db)
    with monkeypatch.context() as m:
        m.setattr(view, "_is_transition", lambda _t: False)  # every event the long way
        runner.rebuild("scheduling")
        assert rows(db) == fused_rows
        assert runner.digest("scheduling") == fused
    assert len({r[0] for r in fused_rows.values()}) == len(InstanceState)  # all states seen


def test_redelivery_changes_nothing(log: EventLog, db: Database, runner: ProjectionRunner) -> None:
    write_history(log)
    runner.catch_up()
    before = runner.digest("scheduling")
    with db.connection() as conn:  # forget the checkpoint: everything is delivered again
        conn.execute("DELETE FROM projection_checkpoints WHERE name = 'scheduling'")
    assert runner.catch_up()["scheduling"] > 0
    assert runner.digest("scheduling") == before
