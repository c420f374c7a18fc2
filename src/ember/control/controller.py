"""The controller: leader election, then one loop of projections, liveness,
reconciliation and scheduling.

Every decision is a pure function of ``ember.core`` (``liveness_changes``, ``reconcile``,
``place``) over views read here; every write is one fenced multi-stream append
(``EventLog.append_many``) with the versions read as expected versions. A conflict means
the world moved: the step is dropped and recomputed on the next pass. A :class:`Fenced`
write means another controller leads now: this one steps down at once.

Several controllers may run; only the holder of the ``controller`` lease acts. The lease
is renewed every pass; a pass is kept much shorter than the lease TTL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ember.core import hosts as hostmod
from ember.core.errors import ConcurrencyConflict, EmberError
from ember.core.events import ANY, EventData, Metadata, NewEvent
from ember.core.hosts import InstanceAssigned, Liveness, host_stream
from ember.core.ids import new_id
from ember.core.instances import InstanceLost, PlacementFailed, instance_stream
from ember.core.placement import Demand, GroupKey, PlacementConfig, Plan, place
from ember.core.reconcile import Decision, ReconcileConfig, reconcile
from ember.core.releases import decide_rollback, fold_releases, releases_stream
from ember.core.workloads import workload_stream
from ember.store.errors import Fenced
from ember.store.eventlog import EventLog, StreamAppend
from ember.store.leases import Lease, Leases
from ember.store.projections import ProjectionRunner
from ember.store.scheduling import PendingInstance, SchedulingReads

log = logging.getLogger("ember.controller")
LEASE_NAME = "controller"
PROJECTION = "scheduling"


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    lease_ttl_s: float = 10.0
    interval_s: float = 0.5
    heartbeat_timeout_s: float = 30.0
    placement: PlacementConfig = dataclasses.field(default_factory=PlacementConfig)
    reconcile: ReconcileConfig = dataclasses.field(default_factory=ReconcileConfig)
    max_pending_per_pass: int = 50_000


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.is_leader = Gauge(
            "ember_controller_leader", "1 while this controller leads", registry=r
        )
        self.epoch = Gauge("ember_controller_epoch", "lease epoch held", registry=r)
        self.fenced = Counter(
            "ember_controller_fenced_writes", "writes refused: lease lost", registry=r
        )
        self.conflicts = Counter(
            "ember_controller_conflicts", "steps dropped on a version conflict", registry=r
        )
        self.placements = Counter("ember_controller_placements", "instances assigned", registry=r)
        self.unplaced = Gauge("ember_controller_unplaced", "instances without a host", registry=r)
        self.pass_seconds = Histogram(
            "ember_controller_pass_seconds", "one controller pass", registry=r
        )


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('c')[-6:]}"


class Controller:
    def __init__(
        self,
        log_: EventLog,
        runner: ProjectionRunner,
        config: ControllerConfig = ControllerConfig(),
        *,
        holder: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.log = log_
        self.runner = runner
        self.reads = SchedulingReads(log_.db)
        self.leases = Leases(log_.db)
        self.config = config
        self.holder = holder or default_holder()
        self.metrics = metrics or Metrics()
        self.lease: Lease | None = None

    # -- leadership ----------------------------------------------------------------------

    def ensure_leader(self) -> bool:
        """Renew the lease, or try to take it; True while this controller leads."""
        ttl = self.config.lease_ttl_s
        if self.lease is not None:
            self.lease = self.leases.renew(self.lease, ttl)
            if self.lease is None:
                log.warning("controller %s: lost the lease; standing by", self.holder)
        if self.lease is None:
            self.lease = self.leases.acquire(LEASE_NAME, self.holder, ttl)
            if self.lease is not None:
                log.warning("controller %s: leader with epoch %d", self.holder, self.lease.epoch)
        self.metrics.is_leader.set(1 if self.lease else 0)
        self.metrics.epoch.set(self.lease.epoch if self.lease else 0)
        return self.lease is not None

    def step_down(self) -> None:
        if self.lease is not None:
            self.leases.release(self.lease)
        self.lease = None
        self.metrics.is_leader.set(0)

    def run(self, stop: Callable[[], bool], *, batch_size: int = 500) -> None:
        """Lead or stand by until ``stop()``; then hand the lease over."""
        with self.log.wakeups() as wait:
            try:
                self._run(stop, wait, batch_size)
            finally:
                self.step_down()

    def _run(
        self, stop: Callable[[], bool], wait: Callable[[float], None], batch_size: int
    ) -> None:
        # A pass runs as soon as an event is appended (a deploy, a scale, an agent's
        # report) — not on the next tick — and at least every interval_s for what time
        # alone changes (deadlines, heartbeats). A pass that appends wakes the next one
        # at once: multi-step work (place, then start a rollout's next step) goes on
        # without waiting out a tick; a pass with nothing to do appends nothing.
        while not stop():
            if not self.ensure_leader():
                # Standing by: the lease, on a timer — yet reading the notifications (a
                # listener that never reads them holds back the server's NOTIFY queue).
                until = time.monotonic() + self.config.interval_s
                while (left := until - time.monotonic()) > 0:
                    wait(left)
                continue
            try:
                self.run_pass(batch_size=batch_size)
            except Fenced:
                self.metrics.fenced.inc()
                log.warning("controller %s: write fenced; stepping down", self.holder)
                self.lease = None
            except EmberError as exc:
                # The database went away mid-pass (or cut off a stalled write): nothing
                # half-done is kept; re-check the lease before acting again.
                log.warning("controller %s: pass failed: %s", self.holder, exc.message)
                self.lease = None
            wait(self.config.interval_s)

    # -- one pass ------------------------------------------------------------------------

    def run_pass(self, *, batch_size: int = 500) -> None:
        with self.metrics.pass_seconds.time():
            self.runner.catch_up(batch_size=batch_size)
            self.check_liveness()
            self.reconcile_all()
            self.schedule()

    def _write(self, appends: Sequence[StreamAppend]) -> bool:
        """One fenced append; False (and nothing written) on a version conflict."""
        if not appends:
            return True
        assert self.lease is not None, "only the leader writes"
        try:
            self.log.append_many(appends, fence=self.lease.fence)
        except ConcurrencyConflict as exc:
            self.metrics.conflicts.inc()
            log.info("controller: step dropped, %s", exc.message)
            self.runner.catch_up(PROJECTION)  # so the retry decides on what changed
            return False
        self.runner.catch_up(PROJECTION)
        return True

    def _events(self, payloads: Iterable[EventData]) -> list[NewEvent]:
        assert self.lease is not None
        meta = Metadata(actor=f"controller:{self.holder}", leader_epoch=self.lease.epoch)
        return [NewEvent.of(p, meta) for p in payloads]

    def check_liveness(self) -> None:
        now = self.reads.now()
        rows = self.reads.liveness()
        down, recovered = hostmod.liveness_changes(
            [Liveness(r.host_id, r.down, r.last_seen or r.registered_at) for r in rows],
            now,
            self.config.heartbeat_timeout_s,
        )
        if not down and not recovered:
            return
        versions = {r.host_id: r.version for r in rows}
        changes: list[hostmod.HostMarkedDown | hostmod.HostRecovered] = [*down, *recovered]
        appends = [
            StreamAppend(host_stream(e.host_id), versions[e.host_id], self._events([e]))
            for e in changes
        ]
        lost = self.reads.live_instances_on(e.host_id for e in down)
        reasons = {e.host_id: e.reason for e in down}
        appends += [
            StreamAppend(
                instance_stream(iid),
                ANY,
                self._events(
                    [
                        InstanceLost(
                            instance_id=iid, host_id=h, reason=f"host {h} is down: {reasons[h]}"
                        )
                    ]
                ),
            )
            for iid, h in lost
        ]
        self._write(appends)

    def reconcile_all(self) -> None:
        now = self.reads.now()
        for app_id, env in self.reads.envs():
            self.reconcile_env(app_id, env, now)

    def reconcile_env(self, app_id: str, env: str, now: dt.datetime | None = None) -> Decision:
        """Decide and write the next step of one environment; returns the decision (it
        was written unless a concurrent change made it stale)."""
        work, version = self.reads.env_work(app_id, env)
        decision = reconcile(
            app_id=app_id,
            env=env,
            release=work.release,
            previous_release=work.previous_release,
            state=work.state,
            instances=work.instances,
            now=now or self.reads.now(),
            new_id=lambda: new_id("i"),
            config=self.config.reconcile,
        )
        if not decision:
            return decision
        appends: list[StreamAppend] = []
        if decision.events:
            appends.append(
                StreamAppend(workload_stream(app_id, env), version, self._events(decision.events))
            )
        if decision.rollback_to is not None:
            appends += self._rollback(app_id, env, decision.rollback_to)
        self._write(appends)
        return decision

    def _rollback(self, app_id: str, env: str, target: int) -> list[StreamAppend]:
        stream = releases_stream(app_id, env)
        events = self.log.read_stream_all(stream)
        state = fold_releases(events)
        payloads = decide_rollback(state, target=target, author=f"controller:{self.holder}")
        if not payloads:
            return []
        version = events[-1].stream_version if events else 0
        log.warning("controller: rolling %s/%s back to v%d", app_id, env, target)
        return [StreamAppend(stream, version, self._events(payloads))]

    def schedule(self, attempts: int = 3) -> int:
        """Place pending instances; returns how many were assigned. A plan made stale by
        a concurrent change (a cordon, a registration) is refused whole and recomputed."""
        for _ in range(attempts):
            pending = self.reads.pending(self.config.max_pending_per_pass)
            if not pending:
                self.metrics.unplaced.set(0)
                return 0
            snapshot = self.reads.snapshot()
            demands = _demands(pending)
            plan = place(snapshot, demands, self.config.placement)
            if self._write(_plan_appends(plan, demands, self._events)):
                self.metrics.placements.inc(len(plan.placements))
                self.metrics.unplaced.set(sum(len(u.instances) for u in plan.unplaced))
                self._record_unplaced(plan)
                return len(plan.placements)
        return 0

    def _record_unplaced(self, plan: Plan) -> None:
        if not plan.unplaced:
            return
        workloads = self.reads.workload_versions()
        appends = []
        by_stream: dict[str, list[EventData]] = {}
        for u in plan.unplaced:
            g = u.demand.group
            known = workloads.get((g.app_id, g.env))
            if known is not None and known[1].unplaced.get(g.process) == u.reason:
                continue
            by_stream.setdefault(workload_stream(g.app_id, g.env), []).append(
                PlacementFailed(
                    app_id=g.app_id,
                    env=g.env,
                    process=g.process,
                    instance_ids=[str(i) for i in u.instances],
                    reason=u.reason,
                )
            )
        for stream, payloads in by_stream.items():
            app_id, _, env = stream.removeprefix("workload-").rpartition(".")
            version = workloads[(app_id, env)][0] if (app_id, env) in workloads else 0
            appends.append(StreamAppend(stream, version, self._events(payloads)))
        self._write(appends)


def _demands(pending: Sequence[PendingInstance]) -> list[Demand]:
    """One demand per (group, size): instances of a group spread together."""
    groups: dict[tuple[GroupKey, float, int], list[str]] = {}
    for p in pending:
        groups.setdefault((p.group, p.cpus, p.memory_mb), []).append(p.instance_id)
    return [
        Demand(group=group, cpus=cpus, memory_mb=memory, instance_ids=tuple(ids))
        for (group, cpus, memory), ids in groups.items()
    ]


def _plan_appends(
    plan: Plan,
    demands: Sequence[Demand],
    events: Callable[[Iterable[EventData]], list[NewEvent]],
) -> list[StreamAppend]:
    by_host: dict[str, list[EventData]] = {}
    for p in plan.placements:
        d = demands[p.demand_index]
        by_host.setdefault(p.host_id, []).append(
            InstanceAssigned(
                host_id=p.host_id,
                instance_id=str(p.instance),
                app_id=d.group.app_id,
                env=d.group.env,
                process=d.group.process,
                memory_mb=d.memory_mb,
                cpus=d.cpus,
            )
        )
    return [
        StreamAppend(host_stream(h), plan.versions[h], events(payloads))
        for h, payloads in sorted(by_host.items())
    ]
