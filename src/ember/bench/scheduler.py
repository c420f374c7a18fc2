"""`make bench-scheduler`: placements per second through the controller's real path.

A throwaway cluster (default durability) gets 1000 simulated hosts (``host.registered``
on ``host-<id>``) and a backlog of instances (``instance.created`` on
``workload-<app>.<env>``, ~10 per (app, env, process) group); the projections are caught
up before the clock starts. Then the controller, holding the ``controller`` lease, runs
``schedule()`` until it returns 0: each pass reads at most ``max_pending_per_pass``
pending instances and a snapshot from the views, calls ``ember.core.placement.place``,
appends the plan as one fenced multi-stream append of ``instance.assigned`` events with
the hosts' versions as expected versions, and catches up the ``scheduling`` projection.
The clock stops when a pass finds nothing pending: every instance is assigned in
``view_instances``.

Reported alongside, as the baseline that makes the cost of persistence visible:
``place`` alone on the same cluster and demands (all at once, and in the controller's
pass-sized chunks against a growing in-memory snapshot), medians of a few runs.

Checked after the run, from the views and the log: no host's memory is overcommitted,
every instance was assigned exactly once, and the scheduling views equal a rebuild from
the log (``ember admin projections verify``).

Goal (the Scheduler issue): >= 1000 placements/s on 2 cores.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ember.bench.common import bench_cluster, median, percentile, write_result
from ember.control.controller import (
    LEASE_NAME,
    Controller,
    ControllerConfig,
    _demands,
)
from ember.core.catalog import REGISTRY
from ember.core.events import Metadata, NewEvent
from ember.core.hosts import HostRegistered, host_stream
from ember.core.instances import InstanceCreated, InstanceSpec
from ember.core.placement import (
    Allocation,
    Demand,
    Host,
    PlacementConfig,
    Plan,
    Snapshot,
    overcommitted,
    place,
)
from ember.core.workloads import workload_stream
from ember.store.db import Database
from ember.store.eventlog import EventLog, StreamAppend
from ember.store.leases import Leases
from ember.store.projections import ProjectionRunner
from ember.store.scheduling import PendingInstance, SchedulingReads
from ember.store.views import all_projections

GOAL_PLACEMENTS_PER_S = 1000
HOSTS = 1000
INSTANCES = 20_000
QUICK_INSTANCES = 4000
PASS_SIZE = 1000
MAX_GROUP = 20
APPEND_BATCH_EVENTS = 2000
"""Events per ``append_many`` call while seeding (one StreamAppend per stream)."""

REGIONS = ("eu-west", "us-east", "ap-south")
PROCESSES = ("web", "worker", "clock")
ENVS = ("production", "staging")
MEMORY_SIZES_MB = (256, 512, 768, 1024, 1536, 2048)
CPU_SIZES = (0.25, 0.5, 1.0, 2.0)
T = TypeVar("T")


# -- the simulated cluster -----------------------------------------------------------------


def make_hosts(rng: random.Random, count: int) -> list[HostRegistered]:
    hosts = []
    for n in range(count):
        vcpus = rng.choice((8, 16, 24, 32))
        region = REGIONS[n % len(REGIONS)]
        hosts.append(
            HostRegistered(
                host_id=f"h-{n:05d}",
                vcpus=vcpus,
                memory_mb=rng.choice((32, 64, 96, 128)) * 1024,
                disk_mb=rng.choice((500, 1000, 2000)) * 1024,
                labels={"disk": rng.choice(("nvme", "ssd")), "rack": f"r{n % 40:02d}"},
                region=region,
                address=f"fd00::{n + 1:x}",
            )
        )
    return hosts


def make_instances(rng: random.Random, count: int) -> dict[str, list[InstanceCreated]]:
    """workload stream -> its instance.created events: groups (app, env, process) of
    1..MAX_GROUP instances, one size per group, until ``count`` instances."""
    streams: dict[str, list[InstanceCreated]] = {}
    made = app = 0
    while made < count:
        app_id = f"a_bench{app:05d}"
        app += 1
        for env in ENVS[: rng.randint(1, len(ENVS))]:
            for process in PROCESSES[: rng.randint(1, len(PROCESSES))]:
                spec = InstanceSpec(
                    release_version=1,
                    repository=f"bench/{app_id}",
                    image_digest="sha256:" + f"{app:064x}",
                    command=[process],
                    memory_mb=rng.choice(MEMORY_SIZES_MB),
                    cpus=rng.choice(CPU_SIZES),
                )
                size = min(rng.randint(1, MAX_GROUP), count - made)
                events = streams.setdefault(workload_stream(app_id, env), [])
                events += [
                    InstanceCreated(
                        instance_id=f"i_bench{made + k:07d}",
                        app_id=app_id,
                        env=env,
                        process=process,
                        spec=spec,
                        spec_hash=spec.spec_hash,
                    )
                    for k in range(size)
                ]
                made += size
                if made == count:
                    return streams
    return streams


def _batches(appends: Iterable[StreamAppend], max_events: int) -> Iterable[list[StreamAppend]]:
    batch: list[StreamAppend] = []
    size = 0
    for a in appends:
        if batch and size + len(a.events) > max_events:
            yield batch
            batch, size = [], 0
        batch.append(a)
        size += len(a.events)
    if batch:
        yield batch


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def seed(log: EventLog, hosts: list[HostRegistered], instances: dict[str, list[Any]]) -> None:
    meta = Metadata(actor="bench:scheduler")
    host_appends = (StreamAppend(host_stream(h.host_id), 0, [NewEvent.of(h, meta)]) for h in hosts)
    for batch in _batches(host_appends, APPEND_BATCH_EVENTS):
        log.append_many(batch)
    instance_appends = (
        StreamAppend(stream, 0, [NewEvent.of(e, meta) for e in chunk])
        for stream, events in instances.items()
        for chunk in _chunks(events, 1000)  # at most 1000 events per stream and append
    )
    for batch in _batches(instance_appends, APPEND_BATCH_EVENTS):
        log.append_many(batch)


# -- measured pieces -----------------------------------------------------------------------


class Phases:
    """Wall time per phase of the scheduling passes (the rest of a pass is planning)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def timed(self, name: str, fn: Callable[..., T]) -> Callable[..., T]:
        def wrapper(*args: Any, **kwargs: Any) -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return wrapper


def instrument(controller: Controller, phases: Phases) -> None:
    """Time the controller's I/O steps from outside, on its own objects."""
    reads = controller.reads
    reads.pending = phases.timed("read_pending", reads.pending)  # type: ignore[method-assign]
    reads.snapshot = phases.timed("read_snapshot", reads.snapshot)  # type: ignore[method-assign]
    log = controller.log
    log.append_many = phases.timed("append", log.append_many)  # type: ignore[method-assign]
    runner = controller.runner
    runner.catch_up = phases.timed("project", runner.catch_up)  # type: ignore[method-assign]


def run_scheduling(
    controller: Controller, phases: Phases
) -> tuple[float, list[float], list[dict[str, float]], int]:
    """schedule() until nothing is pending: (elapsed s, ms per placing pass, ms per phase
    of each placing pass, instances placed)."""
    passes: list[float] = []
    breakdown: list[dict[str, float]] = []
    placed = 0
    start = time.perf_counter()
    while True:
        before = dict(phases.seconds)
        t0 = time.perf_counter()
        n = controller.schedule()
        if n == 0:
            break
        ms = (time.perf_counter() - t0) * 1000
        passes.append(ms)
        spent = {k: (v - before.get(k, 0.0)) * 1000 for k, v in phases.seconds.items()}
        breakdown.append(
            {
                **{k: round(v, 1) for k, v in spent.items()},
                "plan": round(ms - sum(spent.values()), 1),
            }
        )
        placed += n
    return time.perf_counter() - start, passes, breakdown, placed


def _with_plan(snapshot: Snapshot, demands: Sequence[Demand], plan: Plan) -> Snapshot:
    """The snapshot after ``plan`` is applied (what the next pass reads back)."""
    added: dict[str, list[Allocation]] = {}
    for p in plan.placements:
        d = demands[p.demand_index]
        added.setdefault(p.host_id, []).append(
            Allocation(str(p.instance), d.group, d.cpus, d.memory_mb)
        )
    return Snapshot(
        hosts=tuple(
            Host(
                id=h.id,
                state=h.state,
                vcpus=h.vcpus,
                memory_mb=h.memory_mb,
                labels=h.labels,
                region=h.region,
                allocations=h.allocations + tuple(added.get(h.id, ())),
            )
            for h in snapshot.hosts
        ),
        versions=snapshot.versions,
    )


def pure_place(
    snapshot: Snapshot,
    pending: Sequence[PendingInstance],
    config: PlacementConfig,
    rounds: int,
) -> dict[str, Any]:
    """``place`` alone on the cluster the controller starts from and the same demands."""
    demands = _demands(pending)
    all_at_once: list[float] = []
    plan = place(snapshot, demands, config)
    for _ in range(rounds):
        t0 = time.perf_counter()
        plan = place(snapshot, demands, config)
        all_at_once.append(len(plan.placements) / (time.perf_counter() - t0))
    violations = overcommitted(snapshot, demands, plan, config)
    # The controller's shape: pass-sized chunks, each against the snapshot grown by the
    # previous plans (only the place() calls are timed).
    chunked: list[float] = []
    for _ in range(rounds):
        snap, seconds, placed = snapshot, 0.0, 0
        for chunk in _chunks(pending, PASS_SIZE):
            chunk_demands = _demands(chunk)
            t0 = time.perf_counter()
            chunk_plan = place(snap, chunk_demands, config)
            seconds += time.perf_counter() - t0
            placed += len(chunk_plan.placements)
            violations += overcommitted(snap, chunk_demands, chunk_plan, config)
            snap = _with_plan(snap, chunk_demands, chunk_plan)
        chunked.append(placed / seconds)
    return {
        "pure_place_per_s": round(median(all_at_once), 1),
        "pure_place_passes_per_s": round(median(chunked), 1),
        "pure_placed": len(plan.placements),
        "pure_unplaced": sum(len(u.instances) for u in plan.unplaced),
        "pure_memory_overcommit_violations": len(set(violations)),
        "samples": {"all_at_once": all_at_once, "passes": chunked},
    }


# -- checks after the run --------------------------------------------------------------------


def view_overcommit(db: Database, config: PlacementConfig) -> int:
    """Hosts whose live instances' memory (+ VM overhead) exceeds memory - reserve."""
    with db.connection() as conn:
        row = conn.execute(
            """SELECT count(*) FROM (
                   SELECT h.host_id FROM view_hosts h
                   JOIN view_instances i ON i.host_id = h.host_id
                        AND i.state NOT IN ('stopped', 'failed', 'lost')
                   GROUP BY h.host_id, h.memory_mb
                   HAVING sum(i.memory_mb + %s) > h.memory_mb - %s) o""",
            (config.per_vm_overhead_mb, config.host_reserve_mb),
        ).fetchone()
    return int(row[0]) if row else -1


def assignment_counts(db: Database) -> dict[str, int]:
    with db.connection() as conn:
        row = conn.execute(
            """SELECT count(*) FILTER (WHERE n > 1), count(*), coalesce(sum(n), 0)
               FROM (SELECT count(*) AS n FROM events WHERE type = 'instance.assigned'
                     GROUP BY data->>'instance_id') a"""
        ).fetchone()
        states = conn.execute(
            "SELECT state, count(*) FROM view_instances GROUP BY state ORDER BY state"
        ).fetchall()
    assert row is not None
    return {
        "double_assignments": int(row[0]),
        "instances_assigned": int(row[1]),
        "assigned_events": int(row[2]),
        **{f"view_{state}": int(n) for state, n in states},
    }


def profile_text(profiler: cProfile.Profile, limit: int = 30) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


# -- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Scheduled:
    """What the timed scheduling produced."""

    seconds: float
    pass_ms: list[float]
    pass_phase_ms: list[dict[str, float]]
    phase_seconds: dict[str, float]
    placed: int


def schedule_everything(
    log: EventLog, runner: ProjectionRunner, config: ControllerConfig, profile: Path | None
) -> Scheduled:
    """The controller, holding the lease, schedules until nothing is pending (timed)."""
    controller = Controller(log, runner, config, holder="bench-scheduler")
    lease = Leases(log.db).acquire(LEASE_NAME, controller.holder, config.lease_ttl_s)
    assert lease is not None, "the controller lease is taken"
    controller.lease = lease
    phases = Phases()
    instrument(controller, phases)
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    seconds, passes, breakdown, placed = run_scheduling(controller, phases)
    if profiler and profile:
        profiler.disable()
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text(profile_text(profiler))
    controller.step_down()
    return Scheduled(seconds, passes, breakdown, phases.seconds, placed)


def run(quick: bool, *, profile: Path | None = None, verify: bool = True) -> dict[str, Any]:
    rng = random.Random(20261127)  # a reproducible workload
    n_instances = QUICK_INSTANCES if quick else INSTANCES
    hosts = make_hosts(rng, HOSTS)
    instances = make_instances(rng, n_instances)
    config = ControllerConfig(max_pending_per_pass=PASS_SIZE, lease_ttl_s=3600)
    setup: dict[str, float] = {}
    checks: dict[str, Any] = {}
    with bench_cluster() as cluster, Database(cluster.conninfo(), max_size=4) as db:
        log = EventLog(db, REGISTRY)
        runner = ProjectionRunner(db, REGISTRY, all_projections())
        t0 = time.perf_counter()
        seed(log, hosts, instances)
        setup["seed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.catch_up(batch_size=1000)
        setup["catch_up_s"] = time.perf_counter() - t0
        with db.connection() as conn:  # start from settled tables, as a long-lived cluster
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")

        reads = SchedulingReads(db)
        pending = reads.pending(n_instances)
        assert len(pending) == n_instances, f"{len(pending)} pending, not {n_instances}"
        t0 = time.perf_counter()
        pure = pure_place(reads.snapshot(), pending, config.placement, 3 if quick else 5)
        setup["pure_s"] = time.perf_counter() - t0

        scheduled = schedule_everything(log, runner, config, profile)

        checks["memory_overcommit_violations"] = view_overcommit(db, config.placement)
        checks["counts"] = assignment_counts(db)
        if verify:
            t0 = time.perf_counter()
            live, rebuilt = runner.verify("scheduling")["scheduling"]
            setup["verify_s"] = time.perf_counter() - t0
            checks["views_verified"] = live == rebuilt
    return report(
        hosts, instances, config, scheduled=scheduled, pure=pure, checks=checks, setup=setup
    )


def report(
    hosts: Sequence[HostRegistered],
    instances: dict[str, list[InstanceCreated]],
    config: ControllerConfig,
    *,
    scheduled: Scheduled,
    pure: dict[str, Any],
    checks: dict[str, Any],
    setup: dict[str, float],
) -> dict[str, Any]:
    created = [e for events in instances.values() for e in events]
    overhead, reserve = config.placement.per_vm_overhead_mb, config.placement.host_reserve_mb
    demand_mb = sum(e.spec.memory_mb + overhead for e in created)
    capacity_mb = sum(h.memory_mb - reserve for h in hosts)
    passes, counts = scheduled.pass_ms, checks["counts"]
    rate = scheduled.placed / scheduled.seconds if scheduled.seconds else 0.0
    violations = checks["memory_overcommit_violations"]
    phase_seconds = {k: round(v, 3) for k, v in sorted(scheduled.phase_seconds.items())}
    phase_seconds["plan"] = round(sum(passes) / 1000 - sum(scheduled.phase_seconds.values()), 3)
    result: dict[str, Any] = {
        "hosts": len(hosts),
        "instances": len(created),
        "groups": len({(e.app_id, e.env, e.process) for e in created}),
        "placed": scheduled.placed,
        "placements_per_s": round(rate, 1),
        "goal_placements_per_s": GOAL_PLACEMENTS_PER_S,
        "goal_met": rate >= GOAL_PLACEMENTS_PER_S,
        "passes": len(passes),
        "plan_p50_ms": round(median(passes), 1),
        "plan_p99_ms": round(percentile(passes, 99), 1),
        "plan_max_ms": round(max(passes, default=0.0), 1),
        "pure_place_per_s": pure["pure_place_per_s"],
        "pure_place_passes_per_s": pure["pure_place_passes_per_s"],
        "persistence_cost_ratio": (
            round(pure["pure_place_passes_per_s"] / rate, 1) if rate else None
        ),
        "memory_overcommit_violations": violations,
        "pure_memory_overcommit_violations": pure["pure_memory_overcommit_violations"],
        "double_assignments": counts["double_assignments"],
        "unassigned": len(created) - counts["instances_assigned"],
        "views_verified": checks.get("views_verified"),
        "config": {
            "max_pending_per_pass": config.max_pending_per_pass,
            "placement": dataclasses.asdict(config.placement),
            "memory_demand_mb": demand_mb,
            "memory_capacity_mb": capacity_mb,
            "memory_utilisation": round(demand_mb / capacity_mb, 3),
            "durability": "fsync=on, synchronous_commit=on (PostgreSQL defaults)",
            "phase_seconds": phase_seconds,
            "setup_seconds": {k: round(v, 2) for k, v in setup.items()},
            "pure_samples": {k: [round(x, 1) for x in v] for k, v in pure["samples"].items()},
            "pass_ms": [round(x, 1) for x in passes],
            "pass_phase_ms": scheduled.pass_phase_ms,
            "counts": counts,
        },
    }
    result["goals"] = {
        "placements_per_s>=1000": result["goal_met"],
        "memory_overcommit_violations==0": violations == 0
        and pure["pure_memory_overcommit_violations"] == 0,
        "double_assignments==0": counts["double_assignments"] == 0,
        "all_assigned": result["unassigned"] == 0 and scheduled.placed == len(created),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced run, under 60 s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scheduler.json"))
    parser.add_argument(
        "--profile", type=Path, help="cProfile the scheduling passes; write the stats here"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip comparing the views with a rebuild"
    )
    args = parser.parse_args()
    started = time.monotonic()
    result = run(args.quick, profile=args.profile, verify=not args.no_verify)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    write_result(args.out, "scheduler", result, quick=args.quick)
    for key in (
        "hosts",
        "instances",
        "placements_per_s",
        "plan_p50_ms",
        "plan_p99_ms",
        "pure_place_per_s",
        "pure_place_passes_per_s",
        "memory_overcommit_violations",
        "double_assignments",
        "views_verified",
        "goals",
        "wall_seconds",
    ):
        print(f"{key:32} {result.get(key)}")
    print(f"{'phase_seconds':32} {result['config']['phase_seconds']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
