"""The reconciler (ember.core.reconcile) driven by a small in-memory simulation.

:class:`World` holds one environment: the workload stream folded with
``ember.core.workloads.apply`` (the projection's function), simulated instances moved by
``ember.core.instances.next_state``, hosts, and a fake clock. Each step asks ``reconcile``
for a decision, folds its events, then lets a simulated scheduler + agent move instances:
``pending`` is assigned to a ready host, reports ``starting`` and, ``health_delay`` steps
later, ``healthy`` (or ``failed`` for a broken image, or stays ``starting`` forever for a
stuck one); ``stopping`` becomes ``stopped``. Invariants are checked after every
decision and every agent pass.

Covered: rolling (property over count / max_surge / max_unavailable / health delay),
immediate, bluegreen, canary (promote, abort, promote after the deadline), failing and
stuck rollouts (halt once, auto-rollback), scale, drain and host loss, restart, memory
scale, rollback to identical contents, restart policies, and determinism of every step.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.events import EventData, RecordedEvent
from ember.core.instances import InstanceSpec, InstanceState, next_state
from ember.core.manifest import for_environment, normalize, parse_manifest
from ember.core.placement import HostState
from ember.core.reconcile import Decision, ObservedInstance, ReconcileConfig, reconcile
from ember.core.workloads import (
    FormationScaled,
    LiveRelease,
    ProcessScale,
    RestartRequested,
    RolloutAborted,
    RolloutPromoted,
    WorkloadState,
    apply,
    desired_processes,
)

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
STEP = dt.timedelta(seconds=1)
GOOD = "sha256:" + "a" * 64
GOOD2 = "sha256:" + "b" * 64
BROKEN = "sha256:" + "f" * 64  # instances of this image fail while starting
STUCK = "sha256:" + "e" * 64  # instances of this image never become healthy


def manifest(
    *,
    strategy: str = "rolling",
    surge: int = 1,
    unavailable: int = 0,
    processes: Mapping[str, str] | None = None,
    policy: str = "on-failure",
    retries: int = 10,
    memory_mb: int = 256,
) -> dict[str, Any]:
    procs = processes or {"web": "serve"}
    lines = ["schema_version = 1", 'app = "hello"', "[processes]"]
    lines += [f'{name} = "{cmd}"' for name, cmd in procs.items()]
    lines += ["[[vm]]", f"processes = {sorted(procs)!r}".replace("'", '"')]
    lines += [f"memory_mb = {memory_mb}"]
    # The manifest refuses a rolling deploy with both limits 0; the reconciler must still
    # cope with it (a release stored before the check), so it is patched in afterwards.
    both_zero = strategy == "rolling" and surge == 0 and unavailable == 0
    lines += [
        "[deploy]",
        f'strategy = "{strategy}"',
        f"max_surge = {1 if both_zero else surge}",
        f"max_unavailable = {unavailable}",
        "[restart]",
        f'policy = "{policy}"',
        f"max_retries = {retries}",
    ]
    m = normalize(for_environment(parse_manifest("\n".join(lines)), "production"))
    if both_zero:
        m["deploy"]["max_surge"] = 0
    return m


def release(
    version: int, m: Mapping[str, Any], digest: str = GOOD, *, auto_rollback: bool = False
) -> LiveRelease:
    return LiveRelease(
        version=version,
        repository="registry.local/hello",
        image_digest=digest,
        manifest=m,
        auto_rollback=auto_rollback,
    )


@dataclasses.dataclass
class SimInstance:
    instance_id: str
    process: str
    spec: InstanceSpec
    spec_hash: str
    rollout_id: str | None
    created_at: dt.datetime
    state: InstanceState = InstanceState.PENDING
    host_id: str | None = None
    age: int = 0
    reason: str = ""

    @property
    def live(self) -> bool:
        return not self.state.terminal and self.state is not InstanceState.STOPPING


class World:
    def __init__(
        self,
        rel: LiveRelease,
        *,
        health_delay: int = 0,
        stagger: int = 0,
        hosts: tuple[str, ...] = ("h1", "h2", "h3"),
        config: ReconcileConfig | None = None,
    ) -> None:
        self.release: LiveRelease | None = rel
        self.previous_release: int | None = None
        self.state = WorkloadState()
        self.instances: dict[str, SimInstance] = {}
        self.hosts = dict.fromkeys(hosts, HostState.READY)
        self.now = T0
        self.health_delay = health_delay
        self.stagger = stagger  # the n-th instance takes n % (stagger + 1) steps more
        self.config = config or ReconcileConfig()
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.rollbacks: list[int] = []
        self.crash = False  # the agent fails every running instance
        self._ids = itertools.count(1)
        self._position = itertools.count(1)

    # -- the workload stream ---------------------------------------------------------

    def new_id(self) -> str:
        return f"x{next(self._ids):04d}"

    def write(self, *payloads: EventData) -> None:
        """Append to the workload stream and fold (as the projection does, with the
        event's recorded time), then let the instance model see it."""
        for p in payloads:
            data = p.model_dump(mode="json")
            n = next(self._position)
            apply(
                self.state,
                RecordedEvent(
                    position=n,
                    xid=n,
                    stream_id="workload-app.production",
                    stream_version=n,
                    type=p.event_type,
                    schema_version=1,
                    data=data,
                    metadata={},
                    recorded_at=self.now,
                ),
            )
            self.log.append((p.event_type, data))
            if p.event_type == "instance.created":
                self.instances[data["instance_id"]] = SimInstance(
                    instance_id=data["instance_id"],
                    process=data["process"],
                    spec=InstanceSpec.model_validate(data["spec"]),
                    spec_hash=data["spec_hash"],
                    rollout_id=data["rollout_id"],
                    created_at=self.now,
                )
            elif p.event_type == "instance.stop_requested":
                self.transition(self.instances[data["instance_id"]], p.event_type)

    def transition(self, inst: SimInstance, event_type: str, reason: str = "") -> None:
        new = next_state(inst.state, event_type)
        if new is not None:
            inst.state, inst.reason = new, reason or inst.reason

    def types(self) -> list[str]:
        return [t for t, _ in self.log]

    # -- the reconciler's view -------------------------------------------------------

    def observed(self) -> list[ObservedInstance]:
        """As the store reads them: live instances, and every instance created since the
        current rollout started."""
        ro = self.state.rollout
        since = ro.started_at if ro else dt.datetime.min.replace(tzinfo=dt.UTC)
        return [
            ObservedInstance(
                instance_id=i.instance_id,
                process=i.process,
                spec_hash=i.spec_hash,
                state=i.state,
                created_at=i.created_at,
                host_id=i.host_id,
                host_state=self.hosts[i.host_id] if i.host_id else None,
                rollout_id=i.rollout_id,
                reason=i.reason,
            )
            for i in sorted(self.instances.values(), key=lambda i: i.instance_id)
            if not i.state.terminal or i.created_at >= since
        ]

    def decide(self, new_id: Callable[[], str] | None = None) -> Decision:
        return reconcile(
            app_id="app",
            env="production",
            release=self.release,
            previous_release=self.previous_release,
            state=self.state.model_copy(deep=True),
            instances=self.observed(),
            now=self.now,
            new_id=new_id or self.new_id,
            config=self.config,
        )

    def reconcile_once(self) -> Decision:
        # Determinism: the same inputs give the same step (ids aside).
        first, second = self.decide(lambda: "id"), self.decide(lambda: "id")
        assert first == second
        decision = self.decide()
        assert _without_ids(decision) == _without_ids(first)
        # A rollout's verdicts come alone: completed when nothing is left to do, halted
        # instead of any further step, awaiting promotion when the canary is done.
        verdicts = {"rollout.completed", "rollout.halted", "rollout.awaiting_promotion"}
        if any(e.event_type in verdicts for e in decision.events):
            assert len(decision.events) == 1, decision.events
        self.write(*decision.events)
        if decision.rollback_to is not None:
            self.rollbacks.append(decision.rollback_to)
        return decision

    # -- the simulated scheduler and agent -------------------------------------------

    def agent(self) -> None:
        load = Counter(i.host_id for i in self.instances.values() if i.live)
        for inst in sorted(self.instances.values(), key=lambda i: i.instance_id):
            if inst.state is InstanceState.PENDING:
                ready = sorted(
                    (h for h, s in self.hosts.items() if s is HostState.READY),
                    key=lambda h: (load[h], h),
                )
                if ready:
                    inst.host_id = ready[0]
                    load[inst.host_id] += 1
                    self.transition(inst, "instance.assigned")
            elif inst.state in (InstanceState.ASSIGNED, InstanceState.STARTING):
                self.transition(inst, "instance.starting")
                digest = inst.spec.image_digest
                if digest == BROKEN or self.crash:
                    self.transition(inst, "instance.failed", "exited with code 1")
                elif inst.age >= self.delay(inst) and digest != STUCK:
                    self.transition(inst, "instance.healthy")
                inst.age += 1
            elif inst.state is InstanceState.HEALTHY and self.crash:
                self.transition(inst, "instance.failed", "exited with code 137")
            elif inst.state is InstanceState.STOPPING:
                self.transition(inst, "instance.stopped")

    def delay(self, inst: SimInstance) -> int:
        return self.health_delay + int(inst.instance_id[1:]) % (self.stagger + 1)

    def lose_host(self, host_id: str) -> None:
        """The controller marks the host down and its live instances lost."""
        self.hosts[host_id] = HostState.DOWN
        for inst in self.instances.values():
            if inst.host_id == host_id:
                self.transition(inst, "instance.lost", f"host {host_id} is down")

    # -- driving -----------------------------------------------------------------------

    def step(self, check: Callable[[World, Decision | None], None] | None = None) -> Decision:
        decision = self.reconcile_once()
        if check:
            check(self, decision)
        self.agent()
        if check:
            check(self, None)
        self.now += STEP
        return decision

    def run(
        self,
        done: Callable[[World], bool],
        *,
        max_steps: int = 200,
        check: Callable[[World, Decision | None], None] | None = None,
    ) -> int:
        for n in range(max_steps):
            if done(self):
                return n
            self.step(check)
        raise AssertionError(f"not done after {max_steps} steps; log tail: {self.log[-8:]}")

    def settle(self, steps: int = 5) -> list[tuple[str, dict[str, Any]]]:
        """Run a few steps and return what was written meanwhile."""
        before = len(self.log)
        for _ in range(steps):
            self.step()
        return self.log[before:]

    def deploy(self, rel: LiveRelease) -> None:
        assert self.release is not None
        self.previous_release = self.release.version
        self.release = rel

    # -- queries -----------------------------------------------------------------------

    def live(self, process: str | None = None) -> list[SimInstance]:
        return [i for i in self.instances.values() if i.live and process in (None, i.process)]

    def healthy(self, spec_hash: str | None = None) -> list[SimInstance]:
        return [
            i
            for i in self.instances.values()
            if i.state is InstanceState.HEALTHY and spec_hash in (None, i.spec_hash)
        ]

    def spec_hash(self, process: str = "web") -> str:
        assert self.release is not None
        return desired_processes(self.release, self.state)[process].spec_hash

    def converged(self, counts: Mapping[str, int] | None = None) -> bool:
        """The rollout (if any) completed, and every process runs exactly its count of
        healthy instances of the desired spec and nothing else."""
        if self.release is None:
            return not self.live()
        desired = desired_processes(self.release, self.state)
        ro = self.state.rollout
        if ro is None or ro.phase != "completed":
            return False
        for name, want in desired.items():
            live = self.live(name)
            count = counts[name] if counts else want.count
            if len(live) != count or any(
                i.spec_hash != want.spec_hash or i.state is not InstanceState.HEALTHY for i in live
            ):
                return False
        return not [i for i in self.live() if i.process not in desired]


def _without_ids(decision: Decision) -> tuple[Any, ...]:
    def strip(e: EventData) -> Any:
        data = e.model_dump(mode="json")
        if e.event_type in ("instance.created", "rollout.started"):
            data.pop("instance_id", None)
            data.pop("rollout_id", None)
        return (e.event_type, data)

    return (tuple(strip(e) for e in decision.events), decision.rollback_to)


def started(world: World, process: str = "web", count: int = 1) -> World:
    """``world`` after scaling ``process`` to ``count`` and converging."""
    assert world.release is not None
    world.write(
        FormationScaled(
            app_id="app", env="production", processes={process: ProcessScale(count=count)}
        )
    )
    world.run(World.converged)
    world.log.clear()
    return world


def rollout_events(world: World, kind: str) -> list[dict[str, Any]]:
    return [d for t, d in world.log if t == f"rollout.{kind}"]


def created(world: World) -> list[dict[str, Any]]:
    return [d for t, d in world.log if t == "instance.created"]


def stopped_ids(decision: Decision) -> set[str]:
    return {
        e.model_dump()["instance_id"]
        for e in decision.events
        if e.event_type == "instance.stop_requested"
    }


# -- 1. rolling ------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(1, 6),
    surge=st.integers(0, 3),
    unavailable=st.integers(0, 3),
    delay=st.integers(0, 3),
    stagger=st.integers(0, 2),
)
def test_rolling_deploy_keeps_the_limits_and_converges(
    count: int, surge: int, unavailable: int, delay: int, stagger: int
) -> None:
    m = manifest(surge=surge, unavailable=unavailable)
    world = started(World(release(1, m), health_delay=delay, stagger=stagger), count=count)
    v1 = world.spec_hash()
    v1_ids = {i.instance_id for i in world.live()}
    assert len(v1_ids) == count

    world.deploy(release(2, m, GOOD2))
    v2 = world.spec_hash()
    assert v1 != v2
    max_live = count + (1 if surge == unavailable == 0 else surge)

    def check(w: World, _: Decision | None) -> None:
        live = w.live("web")
        assert len(live) <= max_live, [(i.instance_id, i.state, i.spec_hash) for i in live]
        assert len(w.healthy()) >= count - unavailable
        assert all(i.spec_hash in (v1, v2) for i in live)

    steps = world.run(World.converged, check=check, max_steps=40 * count + 20)
    assert steps > 0
    assert len(world.healthy(v2)) == count
    assert not [i for i in world.live() if i.spec_hash == v1 or i.instance_id in v1_ids]
    ro = world.state.rollout
    assert ro is not None and ro.release_version == 2
    assert len(rollout_events(world, "started")) == 1
    completed = rollout_events(world, "completed")
    assert completed == [{"rollout_id": ro.rollout_id}]
    assert not rollout_events(world, "halted")
    # Exactly `count` new instances: nothing replaced twice when everything is healthy.
    assert len(created(world)) == count

    # Converged: nothing more to do, however often asked.
    assert world.decide() == Decision()
    assert world.decide() == Decision()
    assert not bool(world.decide())
    assert world.settle() == []


def test_rolling_replaces_one_at_a_time_gated_by_health() -> None:
    world = started(World(release(1, manifest()), health_delay=2), count=3)
    old = {i.instance_id for i in world.live()}
    world.deploy(release(2, manifest(), GOOD2))
    assert [e.event_type for e in world.step().events] == ["rollout.started"]
    assert [e.event_type for e in world.step().events] == ["instance.created"]
    stopped: set[str] = set()
    while not world.converged():
        healthy_new = [i for i in world.healthy() if i.instance_id not in old]
        decision = world.step()
        gone = stopped_ids(decision) & old
        # An old instance goes only for a new healthy one, one at a time.
        assert len(gone) <= 1
        stopped |= gone
        assert len(stopped) <= len(healthy_new)
        unready = [i for i in world.live() if i.state is not InstanceState.HEALTHY]
        assert len(unready) <= 1  # max_surge = 1: one new instance on its way at a time
    assert stopped == old
    assert len(rollout_events(world, "completed")) == 1


# -- 2. immediate -----------------------------------------------------------------------


def test_immediate_creates_every_new_and_stops_every_old_at_once() -> None:
    m = manifest(strategy="immediate")
    world = started(World(release(1, m), health_delay=1), count=4)
    old = {i.instance_id for i in world.live()}
    world.deploy(release(2, m, GOOD2))
    assert [e.event_type for e in world.step().events] == ["rollout.started"]
    step = world.step()
    types = Counter(e.event_type for e in step.events)
    assert types == {"instance.created": 4, "instance.stop_requested": 4}
    assert stopped_ids(step) == old
    world.run(World.converged)
    assert len(created(world)) == 4
    assert len(rollout_events(world, "completed")) == 1


# -- 3. bluegreen -----------------------------------------------------------------------


@pytest.mark.parametrize(("delay", "stagger"), [(0, 0), (2, 0), (0, 3), (1, 2)])
def test_bluegreen_stops_the_old_set_only_when_the_new_set_is_healthy(
    delay: int, stagger: int
) -> None:
    m = manifest(strategy="bluegreen")
    world = started(World(release(1, m), health_delay=delay, stagger=stagger), count=3)
    old = {i.instance_id for i in world.live()}
    world.deploy(release(2, m, GOOD2))
    stops: list[int] = []

    def check(w: World, decision: Decision | None) -> None:
        if decision is None:
            return
        if stopped_ids(decision) & old:
            # The decision was made with the whole new set healthy.
            assert stopped_ids(decision) == old
            stops.append(len(w.healthy(w.spec_hash())))
        elif w.state.rollout is not None and w.state.rollout.phase == "running":
            assert all(w.instances[i].live for i in old)

    # Healthy old instances stay healthy until the switch.
    world.run(World.converged, check=check)
    assert stops == [3]
    assert len(created(world)) == 3
    assert len(rollout_events(world, "completed")) == 1


# -- 4. canary --------------------------------------------------------------------------


def canary_world(**kw: Any) -> tuple[World, set[str]]:
    m = manifest(strategy="canary")
    world = started(World(release(1, m), health_delay=1, **kw), count=3)
    old = {i.instance_id for i in world.live()}
    world.deploy(release(2, m, GOOD2))
    world.run(lambda w: bool(rollout_events(w, "awaiting_promotion")))
    return world, old


def test_canary_waits_for_promotion_then_rolls_out() -> None:
    world, old = canary_world()
    v2 = world.spec_hash()
    new = [i for i in world.live() if i.spec_hash == v2]
    assert len(new) == 1 and new[0].state is InstanceState.HEALTHY
    assert {i.instance_id for i in world.healthy()} >= old
    # Nothing more until promoted, however long it waits.
    assert world.settle(10) == []
    assert world.state.rollout is not None
    assert world.state.rollout.phase == "awaiting_promotion"

    world.write(RolloutPromoted(rollout_id=world.state.rollout.rollout_id))

    def check(w: World, _: Decision | None) -> None:
        assert len(w.live("web")) <= 3 + 1  # promoted: rolling with the manifest's surge
        assert len(w.healthy()) >= 3

    world.run(World.converged, check=check)
    assert len(rollout_events(world, "awaiting_promotion")) == 1
    assert len(rollout_events(world, "completed")) == 1
    assert not rollout_events(world, "halted")
    assert len(created(world)) == 3  # the canary and two more
    assert not {i.instance_id for i in world.live()} & old


def test_canary_promoted_after_the_deadline_still_rolls_out() -> None:
    """The deadline measures how long new instances take to become healthy, not how long
    a person takes to promote the canary."""
    world, _ = canary_world(config=ReconcileConfig(rollout_deadline_s=60))
    world.now += dt.timedelta(hours=2)
    assert world.settle(3) == []
    assert world.state.rollout is not None
    world.write(RolloutPromoted(rollout_id=world.state.rollout.rollout_id))
    world.run(World.converged)
    assert not rollout_events(world, "halted")
    assert len(rollout_events(world, "completed")) == 1


def test_canary_abort_stops_the_canary_and_rolls_the_release_back() -> None:
    world, old = canary_world()
    ro = world.state.rollout
    assert ro is not None
    canary = [i for i in world.live() if i.instance_id not in old]
    assert len(canary) == 1
    world.write(RolloutAborted(rollout_id=ro.rollout_id))
    decision = world.step()
    assert stopped_ids(decision) == {canary[0].instance_id}
    assert decision.rollback_to == 1
    assert {i.instance_id for i in world.live()} == old
    # Until the rollback lands, nothing more is stopped or created (the rollback is asked
    # again, which the controller's rollback decision makes harmless).
    again = world.decide()
    assert again.events == () and again.rollback_to == 1

    # The controller's rollback: a new release with v1's contents.
    world.log.clear()
    world.deploy(release(3, manifest(strategy="canary")))
    world.run(World.converged)
    assert not created(world)
    assert {i.instance_id for i in world.live()} == old
    assert world.decide() == Decision()


# -- 5. failing rollout -----------------------------------------------------------------


@pytest.mark.parametrize("auto_rollback", [False, True])
def test_failing_rollout_halts_once_and_keeps_the_old_instances(auto_rollback: bool) -> None:
    m = manifest(retries=1)  # one replacement, then the restart policy gives up
    world = started(World(release(1, m), health_delay=1), count=2)
    old = {i.instance_id for i in world.live()}
    world.deploy(release(2, m, BROKEN, auto_rollback=auto_rollback))
    world.run(lambda w: bool(rollout_events(w, "halted")), max_steps=30)
    halted = rollout_events(world, "halted")
    assert len(halted) == 1
    reason = halted[0]["reason"]
    assert "2 new instances failed" in reason and "exited with code 1" in reason
    assert "web" in reason
    assert len([d for d in created(world) if d["spec"]["image_digest"] == BROKEN]) == 2
    assert world.rollbacks == ([1] if auto_rollback else [])
    assert halted[0]["rolled_back_to"] == (1 if auto_rollback else None)
    # Written once: asked again, the reconciler writes nothing and keeps what runs.
    assert world.decide() == Decision()
    assert world.settle(5) == []
    assert {i.instance_id for i in world.healthy()} == old


def test_a_new_release_retries_a_halted_rollout_even_with_the_same_specs() -> None:
    m = manifest(retries=0)
    world = started(World(release(1, m), health_delay=1), count=1)
    world.deploy(release(2, m, BROKEN))
    world.run(lambda w: bool(rollout_events(w, "halted")), max_steps=30)
    assert world.decide() == Decision()  # halted: nothing more for release 2
    broken = len([d for d in created(world) if d["spec"]["image_digest"] == BROKEN])

    # The same image and settings deployed again (release 3): a new attempt.
    world.deploy(release(3, m, BROKEN))
    first = world.step()
    assert [e.event_type for e in first.events] == ["rollout.started"]
    world.run(lambda w: len(rollout_events(w, "halted")) == 2, max_steps=30)
    assert len([d for d in created(world) if d["spec"]["image_digest"] == BROKEN]) > broken
    assert world.decide() == Decision()  # halted again, once


def test_halting_decision_carries_the_rollback() -> None:
    m = manifest()
    world = started(World(release(1, m), health_delay=0), count=1)
    world.deploy(release(2, m, BROKEN, auto_rollback=True))
    decisions = []
    while not rollout_events(world, "halted"):
        decisions.append(world.step())
    last = decisions[-1]
    assert [e.event_type for e in last.events] == ["rollout.halted"]
    assert last.rollback_to == 1
    assert all(d.rollback_to is None for d in decisions[:-1])


# -- 6. deadline ------------------------------------------------------------------------


def test_stuck_rollout_halts_at_the_deadline_naming_the_process() -> None:
    m = manifest(processes={"web": "serve", "worker": "work"})
    config = ReconcileConfig(rollout_deadline_s=30)
    world = World(release(1, m), config=config)
    world.write(
        FormationScaled(
            app_id="app",
            env="production",
            processes={"web": ProcessScale(count=2), "worker": ProcessScale(count=1)},
        )
    )
    world.run(World.converged)
    old = {i.instance_id for i in world.live()}
    world.log.clear()
    world.deploy(release(2, m, STUCK))
    world.run(lambda w: bool(rollout_events(w, "halted")), max_steps=60)
    ro = world.state.rollout
    assert ro is not None and ro.phase == "halted"
    assert world.now - STEP >= ro.deadline_at  # not before the deadline
    assert world.now - STEP < ro.deadline_at + 2 * STEP
    reason = rollout_events(world, "halted")[0]["reason"]
    assert "deadline" in reason
    assert "web 0/2 healthy" in reason and "worker 0/1 healthy" in reason
    assert {i.instance_id for i in world.healthy()} == old
    assert world.settle(3) == []


# -- 7. scale ---------------------------------------------------------------------------


def test_scale_without_a_spec_change_starts_no_rollout() -> None:
    world = started(World(release(1, manifest()), health_delay=1), count=2)
    first = {i.instance_id for i in world.live()}

    def scale(n: int) -> None:
        world.write(
            FormationScaled(
                app_id="app", env="production", processes={"web": ProcessScale(count=n)}
            )
        )

    scale(5)
    world.run(lambda w: w.converged({"web": 5}))
    assert len(world.healthy()) == 5
    assert first <= {i.instance_id for i in world.live()}  # nothing replaced
    scale(1)
    step = world.step()
    assert Counter(e.event_type for e in step.events) == {"instance.stop_requested": 4}
    world.run(lambda w: w.converged({"web": 1}))
    scale(0)
    world.run(lambda w: w.converged({"web": 0}))
    assert world.live() == []
    assert not [t for t in world.types() if t.startswith("rollout.")]
    assert world.decide() == Decision()


def test_no_live_release_stops_everything() -> None:
    world = started(World(release(1, manifest())), count=2)
    world.release = None
    step = world.step()
    assert Counter(e.event_type for e in step.events) == {"instance.stop_requested": 2}
    world.step()
    assert world.live() == [] and world.decide() == Decision()


def test_a_process_removed_from_the_release_is_stopped() -> None:
    m2 = manifest(processes={"web": "serve", "worker": "work"})
    world = World(release(1, m2))
    world.write(
        FormationScaled(
            app_id="app",
            env="production",
            processes={"web": ProcessScale(count=1), "worker": ProcessScale(count=2)},
        )
    )
    world.run(World.converged)
    web = {i.instance_id for i in world.live("web")}
    world.deploy(release(2, manifest()))  # web unchanged, worker gone
    world.run(World.converged)
    assert world.live("worker") == []
    assert {i.instance_id for i in world.live()} == web


# -- 8. drain and host loss -------------------------------------------------------------


def test_draining_host_instances_are_replaced_before_they_stop() -> None:
    # max_unavailable applies to rollouts only: a drain never goes below the count.
    m = manifest(surge=1, unavailable=2)
    world = started(World(release(1, m), health_delay=2, stagger=2), count=3)
    on_h1 = {i.instance_id for i in world.live() if i.host_id == "h1"}
    assert on_h1
    world.hosts["h1"] = HostState.DRAINING

    def check(w: World, decision: Decision | None) -> None:
        assert len(w.healthy()) >= 3  # steady state: never below the count
        assert len(w.live()) <= 3 + 1
        if decision is not None and stopped_ids(decision):
            assert stopped_ids(decision) <= on_h1

    first = world.step(check)
    assert [e.event_type for e in first.events] == ["instance.created"]
    assert all(world.instances[i].live for i in on_h1)
    world.run(
        lambda w: not [i for i in w.live() if i.host_id == "h1"] and len(w.healthy()) == 3,
        check=check,
    )
    assert not [t for t in world.types() if t.startswith("rollout.")]
    assert all(i.host_id != "h1" for i in world.live())
    assert world.decide() == Decision()


def test_lost_instances_of_a_down_host_are_replaced() -> None:
    world = started(World(release(1, manifest())), count=4)
    on_h1 = {i.instance_id for i in world.live() if i.host_id == "h1"}
    assert on_h1
    world.lose_host("h1")
    assert all(world.instances[i].state is InstanceState.LOST for i in on_h1)
    step = world.step()
    assert Counter(e.event_type for e in step.events) == {"instance.created": len(on_h1)}
    world.run(World.converged)
    assert all(i.host_id != "h1" for i in world.live())
    assert len(world.healthy()) == 4


# -- 9. restart, memory, rollback -------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rolling", "canary"])
def test_restart_rolls_every_instance(strategy: str) -> None:
    world = started(World(release(1, manifest(strategy=strategy)), health_delay=1), count=3)
    old = {i.instance_id for i in world.live()}
    world.write(RestartRequested(app_id="app", env="production"))

    def check(w: World, _: Decision | None) -> None:
        assert len(w.healthy()) >= 3
        assert len(w.live()) <= 4

    world.run(World.converged, check=check)
    assert len(rollout_events(world, "started")) == 1
    assert rollout_events(world, "started")[0]["release_version"] == 1
    assert rollout_events(world, "started")[0]["strategy"] == "rolling"
    assert not rollout_events(world, "awaiting_promotion")
    assert not {i.instance_id for i in world.live()} & old
    assert {d["spec"]["restart_generation"] for d in created(world)} == {1}


def test_restart_of_one_process_replaces_only_it() -> None:
    m = manifest(processes={"web": "serve", "worker": "work"})
    world = World(release(1, m))
    world.write(
        FormationScaled(
            app_id="app",
            env="production",
            processes={"web": ProcessScale(count=2), "worker": ProcessScale(count=1)},
        )
    )
    world.run(World.converged)
    world.log.clear()
    web = {i.instance_id for i in world.live("web")}
    worker = {i.instance_id for i in world.live("worker")}
    world.write(RestartRequested(app_id="app", env="production", processes=["worker"]))
    world.run(World.converged)
    assert {i.instance_id for i in world.live("web")} == web
    assert not {i.instance_id for i in world.live("worker")} & worker


def test_memory_scale_rolls_out_the_new_size() -> None:
    world = started(World(release(1, manifest())), count=2)
    world.write(
        FormationScaled(
            app_id="app", env="production", processes={"web": ProcessScale(memory_mb=512)}
        )
    )
    world.run(World.converged)
    assert len(rollout_events(world, "started")) == 1
    assert [d["spec"]["memory_mb"] for d in created(world)] == [512, 512]
    assert all(i.spec.memory_mb == 512 for i in world.live())
    assert len(world.live()) == 2


def test_rollback_to_identical_contents_replaces_nothing() -> None:
    world = started(World(release(1, manifest())), count=3)
    before = world.spec_hash()
    world.deploy(release(7, manifest()))
    assert world.spec_hash() == before
    assert world.settle(5) == []
    assert world.decide() == Decision()


# -- 10. restart policy -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "retries", "replacements"),
    [("no", 10, 0), ("on-failure", 2, 2), ("on-failure", 0, 0), ("always", 0, None)],
)
def test_restart_policy_bounds_replacements(
    policy: str, retries: int, replacements: int | None
) -> None:
    world = started(
        World(release(1, manifest(policy=policy, retries=retries)), health_delay=1), count=1
    )
    world.crash = True
    world.settle(30)
    made = len(created(world))
    if replacements is None:
        assert made >= 5  # always: replaced every time
    else:
        assert made == replacements
        assert world.live() == []
    assert not [t for t in world.types() if t.startswith("rollout.")]


@pytest.mark.parametrize(
    ("policy", "retries", "limit", "failures"),
    [
        ("no", 10, None, 1),
        ("on-failure", 0, None, 1),
        ("on-failure", 2, None, 3),  # two replacements, then the policy gives up
        ("on-failure", 10, 2, 2),  # the controller's failure_limit cuts it short
        ("always", 0, 4, 4),
    ],
)
def test_a_rollout_halts_when_the_restart_policy_gives_up(
    policy: str, retries: int, limit: int | None, failures: int
) -> None:
    """A first deploy whose instances crash: replaced per the restart policy, and halted
    at once when no replacement comes (not at the deadline)."""
    m = manifest(policy=policy, retries=retries)
    world = World(release(1, m), config=ReconcileConfig(failure_limit=limit))
    world.crash = True
    world.run(lambda w: bool(rollout_events(w, "halted")), max_steps=60)
    reason = rollout_events(world, "halted")[0]["reason"]
    noun = "instance" if failures == 1 else "instances"
    assert reason.startswith(f"{failures} new {noun} failed"), reason
    assert len(created(world)) == failures
    assert world.now < T0 + dt.timedelta(seconds=world.config.rollout_deadline_s)
    assert world.settle(5) == []  # halted: nothing more is created


def test_an_always_policy_crash_loop_halts_at_the_deadline() -> None:
    m = manifest(policy="always")
    world = World(release(1, m), config=ReconcileConfig(rollout_deadline_s=30))
    world.crash = True
    world.run(lambda w: bool(rollout_events(w, "halted")), max_steps=200)
    reason = rollout_events(world, "halted")[0]["reason"]
    assert reason.startswith("deadline passed"), reason
    assert len(created(world)) > 2  # replaced every time until then


def crash_one(world: World) -> str:
    """One healthy instance fails on its own (the agent reports the exit)."""
    victim = sorted(world.healthy(), key=lambda i: i.instance_id)[0]
    world.transition(victim, "instance.failed", "exited with code 2")
    return victim.instance_id


def test_policy_no_leaves_a_failed_instance_but_still_scales_up() -> None:
    world = started(World(release(1, manifest(policy="no")), health_delay=1), count=3)
    crash_one(world)
    assert world.settle(5) == []  # not replaced
    assert len(world.live()) == 2
    world.write(
        FormationScaled(app_id="app", env="production", processes={"web": ProcessScale(count=5)})
    )
    world.settle(5)
    # A scale-up is not a restart: the two new instances are created (the failed one
    # keeps its place in the count).
    assert len(world.healthy()) == 4
    assert world.settle(5) == []


def test_policy_no_still_replaces_instances_of_a_lost_host() -> None:
    world = started(World(release(1, manifest(policy="no")), hosts=("h1", "h2")), count=4)
    crash_one(world)
    world.settle(3)
    assert len(world.live()) == 3
    lost = [i for i in world.live() if i.host_id == "h1"]
    assert lost
    world.lose_host("h1")
    world.settle(5)
    assert len(world.healthy()) == 3  # the lost ones were replaced, the failed one not
    assert all(i.host_id == "h2" for i in world.live())


def test_policy_no_with_a_failed_instance_still_drains() -> None:
    world = started(World(release(1, manifest(policy="no")), hosts=("h1", "h2")), count=4)
    crash_one(world)
    world.settle(3)
    world.hosts["h1"] = HostState.DRAINING
    world.run(lambda w: not [i for i in w.live() if i.host_id == "h1"], max_steps=30)
    assert len(world.healthy()) == 3


def test_canary_deadline_ignores_a_process_scaled_to_zero() -> None:
    m = manifest(strategy="canary", processes={"web": "serve", "worker": "work"})
    world = World(release(1, m), config=ReconcileConfig(rollout_deadline_s=20))
    world.write(
        FormationScaled(
            app_id="app",
            env="production",
            processes={"web": ProcessScale(count=2), "worker": ProcessScale(count=0)},
        )
    )
    world.run(World.converged)
    world.log.clear()
    world.deploy(release(2, m, STUCK))
    world.run(lambda w: bool(rollout_events(w, "halted")), max_steps=40)
    reason = rollout_events(world, "halted")[0]["reason"]
    assert reason.endswith("web 0/1 healthy"), reason


def test_a_fix_forward_replaces_a_stuck_rollout() -> None:
    """v2 never became healthy (halted); v3 replaces the stuck v2 instances too."""
    m = manifest(surge=1)
    world = started(World(release(1, m), config=ReconcileConfig(rollout_deadline_s=10)), count=3)
    world.deploy(release(2, m, STUCK))
    world.run(lambda w: bool(rollout_events(w, "halted")), max_steps=30)
    stuck = {i.instance_id for i in world.live() if i.spec.image_digest == STUCK}
    assert stuck
    world.deploy(release(3, m, GOOD2))

    def check(w: World, _: Decision | None) -> None:
        assert len(w.live()) <= 3 + 1
        assert len(w.healthy()) >= 3

    world.run(World.converged, check=check, max_steps=60)
    assert not [i for i in world.live() if i.instance_id in stuck]
    assert len(world.healthy(world.spec_hash())) == 3


def test_a_restart_during_a_canary_keeps_the_canary_gate() -> None:
    world, old = canary_world()
    world.log.clear()
    world.write(RestartRequested(app_id="app", env="production"))
    world.run(lambda w: bool(rollout_events(w, "awaiting_promotion")))
    assert [d["strategy"] for d in rollout_events(world, "started")] == ["canary"]
    assert {i.instance_id for i in world.healthy()} >= old  # v1 still serves
    assert len([i for i in world.live() if i.spec_hash == world.spec_hash()]) == 1


def test_a_first_canary_deploy_has_nothing_to_compare_and_rolls() -> None:
    world = World(release(1, manifest(strategy="canary")))
    world.write(
        FormationScaled(app_id="app", env="production", processes={"web": ProcessScale(count=3)})
    )
    world.run(World.converged)
    assert [d["strategy"] for d in rollout_events(world, "started")] == ["rolling"]
    assert not rollout_events(world, "awaiting_promotion")
