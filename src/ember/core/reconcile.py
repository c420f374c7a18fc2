"""The reconciler: desired (live release + workload stream) vs observed (instances) ->
the next events. Level-driven and idempotent: given the same inputs it returns the same
step, and once the step's events are folded in it returns nothing more for it.

One step per call, per process:

- a rollout starts when the desired spec of some process differs from the current
  rollout's (a deploy, rollback, ``scale --memory``, restart or secrets rotation);
- ``immediate``: create every missing new instance and stop every old one at once;
- ``rolling``: keep at most ``count + max_surge`` live instances and at least
  ``count - max_unavailable`` healthy ones; old instances stop only as new ones report
  healthy, so each step waits for health;
- ``bluegreen``: start the whole new set; when all of it is healthy stop the old set;
- ``canary``: one new instance; when it is healthy wait for ``promote`` (then rolling)
  or ``abort`` (stop it and roll back the release); with nothing running yet (a first
  deploy), or for a restart / memory change of a release already rolled out, it rolls;
- outside a rollout (scale, drain, crash replacement) the rolling rule applies with a
  surge of at least one, so a draining host's instances are replaced before they stop;
- the restart policy bounds how many failed instances are replaced (``no``: none,
  ``on-failure``: ``max_retries``); one left failed keeps its place in the count, so a
  scale-up, a drain or a lost host still gets new instances;
- a rollout halts with the reason when the restart policy gives up on a process's failed
  new instances (``no``: the first failure; ``on-failure``: the one after ``max_retries``
  replacements; ``always`` never gives up), when ``failure_limit`` new instances failed
  (if the controller sets one), or when not all are healthy by its deadline; with
  auto-rollback the decision asks the controller to roll the release back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping, Sequence

from ember.core.events import EventData
from ember.core.instances import InstanceCreated, InstanceState, InstanceStopRequested
from ember.core.placement import HostState
from ember.core.workloads import (
    Desired,
    LiveRelease,
    Rollout,
    RolloutAwaitingPromotion,
    RolloutCompleted,
    RolloutHalted,
    RolloutStarted,
    WorkloadState,
    desired_processes,
)

__all__ = ["Decision", "ObservedInstance", "ReconcileConfig", "reconcile"]


@dataclasses.dataclass(frozen=True)
class ObservedInstance:
    instance_id: str
    process: str
    spec_hash: str
    state: InstanceState
    created_at: dt.datetime
    host_id: str | None = None
    host_state: HostState | None = None
    rollout_id: str | None = None
    reason: str = ""

    @property
    def live(self) -> bool:
        return not self.state.terminal and self.state is not InstanceState.STOPPING

    @property
    def healthy(self) -> bool:
        return self.state is InstanceState.HEALTHY

    @property
    def movable(self) -> bool:
        """On a host that is being emptied: replace it, then stop it."""
        return self.host_state is HostState.DRAINING


@dataclasses.dataclass(frozen=True)
class ReconcileConfig:
    rollout_deadline_s: float = 300.0
    failure_limit: int | None = None
    """Failed (or lost) new instances that halt a rollout whatever the restart policy
    says; None: only the restart policy and the deadline halt it."""


@dataclasses.dataclass(frozen=True)
class Decision:
    events: tuple[EventData, ...] = ()
    rollback_to: int | None = None
    """Set when the release must be rolled back (auto-rollback or abort)."""

    def __bool__(self) -> bool:
        return bool(self.events) or self.rollback_to is not None


def reconcile(
    *,
    app_id: str,
    env: str,
    release: LiveRelease | None,
    previous_release: int | None,
    state: WorkloadState,
    instances: Sequence[ObservedInstance],
    now: dt.datetime,
    new_id: Callable[[], str],
    config: ReconcileConfig = ReconcileConfig(),
) -> Decision:
    """The next step for one environment (see the module docstring)."""
    live = [i for i in instances if i.live]
    if release is None:
        return Decision(tuple(_stop(live, "the environment has no live release")))
    desired = desired_processes(release, state)
    specs = {name: d.spec_hash for name, d in desired.items()}
    ro = state.rollout
    # A new rollout for new specs — and for a new release after a halt even when its specs
    # are the same (a redeploy after fixing what the app depends on, or a rollback to the
    # halted contents): a deploy is a new attempt, as users of Heroku and Fly expect.
    retry = ro is not None and ro.phase == "halted" and ro.release_version != release.version
    if ro is None or ro.specs != specs or retry:
        if ro is not None and ro.phase == "aborted" and ro.release_version == release.version:
            return Decision()  # waiting for the controller's rollback to land
        return Decision(
            (
                _start(
                    app_id=app_id,
                    env=env,
                    release=release,
                    previous=previous_release,
                    specs=specs,
                    current=ro,
                    live=live,
                    now=now,
                    new_id=new_id,
                    config=config,
                ),
            )
        )

    events: list[EventData] = []
    rollback_to: int | None = None
    if ro.phase == "aborted":
        # Stop what the aborted rollout started; the controller rolls the release back.
        started = [i for i in live if i.rollout_id == ro.rollout_id]
        return Decision(tuple(_stop(started, "rollout aborted")), ro.previous_release)
    if ro.active:
        halt = _halt_reason(ro, desired, instances, now, config)
        if halt is not None:
            rollback_to = ro.previous_release if ro.auto_rollback else None
            events.append(
                RolloutHalted(rollout_id=ro.rollout_id, reason=halt, rolled_back_to=rollback_to)
            )
            return Decision(tuple(events), rollback_to)

    by_process: dict[str, list[ObservedInstance]] = {}
    for inst in live:
        by_process.setdefault(inst.process, []).append(inst)
    for name in sorted(set(by_process) - set(desired)):
        events += _stop(by_process[name], f"process {name} is no longer in the release")

    done = True
    for name, want in desired.items():
        step, finished = _process_step(
            app_id=app_id,
            env=env,
            ro=ro,
            want=want,
            live=by_process.get(name, []),
            instances=instances,
            new_id=new_id,
        )
        events += step
        done = done and finished
    if ro.active and done and not events:
        events.append(RolloutCompleted(rollout_id=ro.rollout_id))
    elif (
        ro.phase == "running"
        and ro.strategy == "canary"
        and not ro.promoted
        and not events
        and _canary_ready(desired, by_process)
    ):
        events.append(RolloutAwaitingPromotion(rollout_id=ro.rollout_id))
    return Decision(tuple(events), rollback_to)


def _start(
    *,
    app_id: str,
    env: str,
    release: LiveRelease,
    previous: int | None,
    specs: Mapping[str, str],
    current: Rollout | None,
    live: Sequence[ObservedInstance],
    now: dt.datetime,
    new_id: Callable[[], str],
    config: ReconcileConfig,
) -> RolloutStarted:
    deploy = release.manifest.get("deploy", {})
    surge, unavailable = int(deploy.get("max_surge", 1)), int(deploy.get("max_unavailable", 0))
    strategy = str(deploy.get("strategy", "rolling"))
    if strategy == "canary" and (
        not live
        or (
            current is not None
            and current.phase == "completed"
            and current.release_version == release.version
        )
    ):
        # A canary compares a new release with the one running: with nothing running (a
        # first deploy) there is nothing to compare, and a restart, secrets rotation or
        # memory change of a release already rolled out is a rolling replacement (it
        # must not wait for a promotion nobody asked for).
        strategy = "rolling"
    return RolloutStarted(
        rollout_id=new_id(),
        app_id=app_id,
        env=env,
        release_version=release.version,
        previous_release=previous,
        strategy=strategy,
        max_surge=surge,
        max_unavailable=unavailable,
        auto_rollback=release.auto_rollback,
        specs=dict(specs),
        started_at=now,
        deadline_at=now + dt.timedelta(seconds=config.rollout_deadline_s),
    )


def _halt_reason(
    ro: Rollout,
    desired: Mapping[str, Desired],
    instances: Sequence[ObservedInstance],
    now: dt.datetime,
    config: ReconcileConfig,
) -> str | None:
    failed = [
        i
        for i in instances
        if i.rollout_id == ro.rollout_id
        and i.state in (InstanceState.FAILED, InstanceState.LOST)
        and i.spec_hash == ro.specs.get(i.process)
    ]
    limit = config.failure_limit
    if (limit is not None and len(failed) >= limit) or _policy_gave_up(desired, failed):
        last = max(failed, key=lambda i: (i.created_at, i.instance_id))
        return (
            f"{len(failed)} new instance{'' if len(failed) == 1 else 's'} failed "
            f"(last: {last.instance_id} of {last.process}: {last.reason or last.state.value})"
        )
    if ro.phase == "running" and now >= ro.deadline_at:
        waiting = []
        for name, want in desired.items():
            healthy = sum(
                1
                for i in instances
                if i.process == name and i.spec_hash == want.spec_hash and i.healthy
            )
            canary = ro.strategy == "canary" and not ro.promoted
            target = min(1, want.count) if canary else want.count
            if healthy < target:
                waiting.append(f"{name} {healthy}/{target} healthy")
        if waiting:
            return "deadline passed before the new instances were healthy: " + ", ".join(waiting)
    return None


def _policy_gave_up(desired: Mapping[str, Desired], failed: Sequence[ObservedInstance]) -> bool:
    """Some process has more failed new instances than its restart policy replaces: no
    replacement comes, so the rollout cannot complete (and must not wait for its
    deadline), while a policy that still promises restarts is not cut short."""
    for name, want in desired.items():
        policy = want.spec.restart_policy
        if policy == "always":
            continue
        allowed = 0 if policy == "no" else want.spec.max_retries
        exited = sum(1 for i in failed if i.process == name and i.state is InstanceState.FAILED)
        if exited > allowed:
            return True
    return False


def _order_to_stop(insts: Sequence[ObservedInstance]) -> list[ObservedInstance]:
    """Unhealthy before healthy, then the newest first."""
    return sorted(
        insts,
        key=lambda i: (i.healthy, -i.created_at.timestamp(), i.instance_id),
    )


def _stop(insts: Sequence[ObservedInstance], reason: str) -> list[EventData]:
    return [
        InstanceStopRequested(instance_id=i.instance_id, reason=reason)
        for i in sorted(insts, key=lambda i: i.instance_id)
    ]


def _create(
    *,
    app_id: str,
    env: str,
    ro: Rollout,
    want: Desired,
    n: int,
    new_id: Callable[[], str],
) -> list[EventData]:
    return [
        InstanceCreated(
            instance_id=new_id(),
            app_id=app_id,
            env=env,
            process=want.process,
            spec=want.spec,
            spec_hash=want.spec_hash,
            rollout_id=ro.rollout_id if ro.active else None,
        )
        for _ in range(max(0, n))
    ]


def _unreplaced_failures(want: Desired, ro: Rollout, instances: Sequence[ObservedInstance]) -> int:
    """Restart policy: how many failed instances of this spec are not to be replaced
    (``no``: none is; ``on-failure``: up to ``max_retries`` are; ``always``: all are)."""
    policy = want.spec.restart_policy
    if policy == "always":
        return 0
    failed = sum(
        1
        for i in instances
        if i.process == want.process
        and i.spec_hash == want.spec_hash
        and i.state is InstanceState.FAILED
        and i.created_at >= ro.started_at
    )
    limit = 0 if policy == "no" else want.spec.max_retries
    return max(0, failed - limit)


def _process_step(
    *,
    app_id: str,
    env: str,
    ro: Rollout,
    want: Desired,
    live: Sequence[ObservedInstance],
    instances: Sequence[ObservedInstance],
    new_id: Callable[[], str],
) -> tuple[list[EventData], bool]:
    """This process's next events, and whether it has converged."""
    new = [i for i in live if i.spec_hash == want.spec_hash and not i.movable]
    old = [i for i in live if i not in new]
    healthy_new = sum(1 for i in new if i.healthy)
    d = want.count
    converged = not old and len(new) == d and healthy_new == d
    if converged:
        return [], True
    in_rollout = ro.active and ro.specs.get(want.process) == want.spec_hash
    if ro.phase == "halted" and ro.specs.get(want.process) == want.spec_hash:
        return [], False  # keep what runs; the halt reason says why
    # A failed instance the restart policy does not replace keeps its place in the count;
    # instances missing for any other reason (a scale-up, a drain, a lost host) are made.
    target = max(0, d - _unreplaced_failures(want, ro, instances))
    strategy = ro.strategy if in_rollout else "steady"
    events: list[EventData] = []

    excess = len(new) - d
    if excess > 0:
        events += _stop(_order_to_stop(new)[:excess], f"scaled to {d}")
        new = [i for i in new if i not in _order_to_stop(new)[:excess]]

    create = 0
    stop: list[ObservedInstance] = []
    if strategy == "immediate":
        create = d - len(new)
        stop = list(old)
    elif strategy == "bluegreen":
        create = d - len(new)
        if healthy_new >= d:
            stop = list(old)
    elif strategy == "canary" and not ro.promoted:
        create = min(1, d) - len(new)
    else:  # rolling, a promoted canary, and steady state
        surge = ro.max_surge if in_rollout else max(1, ro.max_surge)
        unavailable = ro.max_unavailable if in_rollout else 0
        if surge == 0 and unavailable == 0:
            surge = 1
        create = min(d - len(new), d + surge - len(new) - len(old))
        not_healthy_old = [i for i in old if not i.healthy]
        healthy_old = [i for i in old if i.healthy]
        keep = d - unavailable if in_rollout else target
        budget = healthy_new + len(healthy_old) - keep
        stop = not_healthy_old + _order_to_stop(healthy_old)[: max(0, budget)]
    create = min(create, target - len(new))
    if create > 0:
        events += _create(app_id=app_id, env=env, ro=ro, want=want, n=create, new_id=new_id)
    events += _stop(stop, _stop_reason(strategy, want))
    return events, False


def _stop_reason(strategy: str, want: Desired) -> str:
    if strategy == "steady":
        return f"replaced ({want.process})"
    return f"replaced by release v{want.spec.release_version} ({strategy})"


def _canary_ready(
    desired: Mapping[str, Desired], by_process: Mapping[str, list[ObservedInstance]]
) -> bool:
    for name, want in desired.items():
        if want.count == 0:
            continue
        healthy = [
            i for i in by_process.get(name, []) if i.spec_hash == want.spec_hash and i.healthy
        ]
        if not healthy:
            return False
    return True
