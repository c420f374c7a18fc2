"""``GET .../status``: what is desired, what is running, why it is not converging.

A pure function of view rows (the live release, the folded workload, the instances), so
it is tested without a database. Desired counts and specs come from
ember.core.workloads.desired_processes, exactly as the controller's reconciler sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember.core import workloads as wl
from ember.core.instances import InstanceState
from ember.wire import workloads as ww

Row = dict[str, Any]

_HEALTH: dict[str, ww.Health] = {
    "healthy": "passing",
    "unhealthy": "failing",
    "failed": "failing",
}


def live_release(row: Row) -> wl.LiveRelease:
    """A view_releases row as the controller reads it (ember.store.scheduling)."""
    return wl.LiveRelease(
        version=int(row["version"]),
        repository=row["repository"],
        image_digest=row["image_digest"],
        manifest=row["manifest"],
        secrets_version=int(row["secrets_version"]),
        auto_rollback=bool(row["auto_rollback"]),
    )


def desired(release: Row | None, state: wl.WorkloadState) -> dict[str, wl.Desired]:
    return wl.desired_processes(live_release(release), state) if release else {}


def is_current(ro: wl.Rollout | None, want: dict[str, wl.Desired], release: Row | None) -> bool:
    """The rollout converges to the live release's desired specs (the reconciler starts
    a new rollout whenever they differ)."""
    return (
        ro is not None
        and release is not None
        and ro.specs == {name: d.spec_hash for name, d in want.items()}
    )


def rollout_model(state: wl.WorkloadState, release: Row | None) -> ww.Rollout:
    ro = state.rollout
    assert ro is not None
    return _rollout(ro, is_current(ro, desired(release, state), release))


def _rollout(ro: wl.Rollout, current: bool) -> ww.Rollout:
    return ww.Rollout(
        id=ro.rollout_id,
        release_version=ro.release_version,
        previous_release=ro.previous_release,
        strategy=ro.strategy,
        phase=ro.phase,
        reason=ro.reason,
        started_at=ro.started_at,
        deadline_at=ro.deadline_at,
        promoted=ro.promoted,
        auto_rollback=ro.auto_rollback,
        rolled_back_to=ro.rolled_back_to,
        current=current,
    )


def _release(row: Row) -> ww.StatusRelease:
    return ww.StatusRelease(
        version=row["version"],
        repository=row["repository"],
        image_digest=row["image_digest"],
        manifest_hash=row["manifest_hash"],
        secrets_version=row["secrets_version"],
        author=row["author"],
        reason=row["reason"],
        rollback_of=row["rollback_of"],
        auto_rollback=bool(row["auto_rollback"]),
        created_at=row["created_at"],
    )


def _instance(row: Row) -> ww.StatusInstance:
    return ww.StatusInstance(
        instance_id=row["instance_id"],
        process=row["process"],
        host_id=row["host_id"],
        state=row["state"],
        health=_HEALTH.get(row["state"], "unknown"),
        release_version=row["release_version"],
        since=row["state_since"],
        created_at=row["created_at"],
        reason=row["reason"],
        exit_code=row["exit_code"],
        address=row.get("address"),
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rollout_problems(ro: wl.Rollout | None, current: bool, release: Row | None) -> list[str]:
    if release is None:
        return []
    version = release["version"]
    if not current or ro is None:
        return [
            f"waiting for the controller to start the rollout of v{version} "
            "(is the controller running?)"
        ]
    if ro.phase == "halted":
        back = f"; rolled back to v{ro.rolled_back_to}" if ro.rolled_back_to else ""
        return [f"rollout of v{ro.release_version} halted: {ro.reason}{back}"]
    if ro.phase == "aborted":
        return [f"rollout of v{ro.release_version} aborted ({ro.reason}); rolling back"]
    if ro.phase == "awaiting_promotion":
        return [
            f"the canary of v{ro.release_version} is healthy and awaits promotion: "
            "'ember deploy promote' continues, 'ember deploy abort' rolls back"
        ]
    return []


def build_status(
    *,
    app: str,
    env: str,
    release: Row | None,
    state: wl.WorkloadState,
    live: Sequence[Row],
    ended: Sequence[Row],
) -> ww.Status:
    """``live``: the env's instances that have not ended; ``ended``: recently ended ones,
    newest first."""
    want = desired(release, state)
    ro = state.rollout
    current = is_current(ro, want, release)
    problems = _rollout_problems(ro, current, release)
    processes: list[ww.StatusProcess] = []
    settled = True
    for name in sorted(set(want) | {i["process"] for i in live}):
        d = want.get(name)
        count = d.count if d else 0
        mine = [i for i in live if i["process"] == name]
        new = [i for i in mine if d is not None and i["spec_hash"] == d.spec_hash]
        healthy = sum(1 for i in new if i["state"] == InstanceState.HEALTHY)
        pending = sum(1 for i in mine if i["state"] == InstanceState.PENDING)
        reason = state.unplaced.get(name) if pending else None
        processes.append(
            ww.StatusProcess(
                name=name,
                desired=count,
                running=sum(1 for i in mine if InstanceState(i["state"]).running),
                healthy=healthy,
                outdated=len(mine) - len(new),
                memory_mb=d.spec.memory_mb if d else None,
                cpus=d.spec.cpus if d else None,
                unplaced_reason=reason,
            )
        )
        if reason:
            problems.append(f"{name}: {_plural(pending, 'instance')} cannot be placed: {reason}")
        for i in mine:
            if i["state"] == InstanceState.UNHEALTHY:
                why = f": {i['reason']}" if i["reason"] else ""
                problems.append(f"{name}: instance {i['instance_id']} is unhealthy{why}")
        if healthy < count:
            problems.append(f"{name}: {healthy}/{count} healthy")
        if len(mine) > len(new):
            old = len(mine) - len(new)
            what = "of an older release or spec" if d else "of a process no longer released"
            problems.append(f"{name}: {_plural(old, 'instance')} {what} still running")
        elif len(new) > count:
            problems.append(f"{name}: {len(new) - count} more than desired, stopping")
        settled = settled and len(mine) == count and healthy == count
    for i in ended:
        if i["state"] in (InstanceState.FAILED, InstanceState.LOST):
            why = f": {i['reason']}" if i["reason"] else ""
            problems.append(f"{i['process']}: instance {i['instance_id']} {i['state']}{why}")
    if release is None:
        converged = not live
    else:
        converged = current and ro is not None and ro.phase == "completed" and settled
    return ww.Status(
        app=app,
        env=env,
        release=_release(release) if release else None,
        rollout=_rollout(ro, current) if ro else None,
        processes=processes,
        instances=[_instance(i) for i in [*live, *ended]],
        problems=problems,
        converged=converged,
    )
