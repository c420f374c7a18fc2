"""The user's commands on an environment's workload stream (``workload-<app_id>.<env>``):
``ember scale``, ``ember restart``, ``ember deploy promote`` and ``ember deploy abort``.

Pure decisions over the folded :class:`~ember.core.workloads.WorkloadState`: each returns
the events to append, or nothing when the command changes nothing (scaling to what is set,
promoting what is promoted, aborting what is aborted), so a repeated command is harmless.

Errors::

    ValidationFailed └── InvalidScale          scale.invalid        (ember.core.workloads)
    NotFound         ├── ProcessNotFound       process.not_found    (ember.core.workloads)
                     ├── RolloutNotFound       rollout.not_found    (ember.core.workloads)
                     └── ReleaseNotFound       release.not_found    (ember.core.releases)
    Conflict         ├── RolloutNotAwaiting    rollout.not_awaiting
                     └── RolloutNotActive      rollout.not_active
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ember.core.errors import Conflict
from ember.core.events import EventData
from ember.core.manifest_model import PROCESS_NAME_RE
from ember.core.releases import ReleaseNotFound
from ember.core.workloads import (
    FormationScaled,
    InvalidScale,
    ProcessNotFound,
    ProcessScale,
    RestartRequested,
    Rollout,
    RolloutAborted,
    RolloutNotFound,
    RolloutPromoted,
    WorkloadState,
    check_scale,
)

__all__ = [
    "RolloutNotActive",
    "RolloutNotAwaiting",
    "decide_abort",
    "decide_promote",
    "decide_restart",
    "decide_scale",
]


class RolloutNotAwaiting(Conflict):
    code = "rollout.not_awaiting"


class RolloutNotActive(Conflict):
    code = "rollout.not_active"


def decide_scale(
    state: WorkloadState,
    *,
    app_id: str,
    env: str,
    processes: Mapping[str, ProcessScale],
    declared: Iterable[str] | None,
) -> list[EventData]:
    """``formation.scaled`` with what differs from the formation, or nothing.

    ``declared`` are the live release's processes (None before the first deploy, when
    any well-formed process name is accepted)."""
    if declared is None:
        for name in processes:
            if not PROCESS_NAME_RE.match(name):
                raise InvalidScale(
                    f"invalid process name {name[:40]!r}",
                    hint="lowercase letters, digits and '-', starting with a letter",
                    detail={"field": "processes"},
                )
    wanted = check_scale(processes, declared)
    changes: dict[str, ProcessScale] = {}
    for name, want in sorted(wanted.items()):
        have = state.formation.get(name, ProcessScale())
        delta = ProcessScale(
            count=want.count if want.count is not None and want.count != have.count else None,
            memory_mb=(
                want.memory_mb
                if want.memory_mb is not None and want.memory_mb != have.memory_mb
                else None
            ),
        )
        if delta.count is not None or delta.memory_mb is not None:
            changes[name] = delta
    if not changes:
        return []
    return [FormationScaled(app_id=app_id, env=env, processes=changes)]


def decide_restart(
    *,
    app_id: str,
    env: str,
    processes: Sequence[str],
    declared: Iterable[str] | None,
) -> list[EventData]:
    """A rolling replacement of ``processes`` (every process when empty). Always one
    event: each restart is a new request (retries are guarded by the Idempotency-Key)."""
    if declared is None:
        raise ReleaseNotFound(
            "nothing to restart: no release is live", hint="deploy first with 'ember deploy'"
        )
    known = set(declared)
    for name in processes:
        if name not in known:
            raise ProcessNotFound(
                f"the live release has no process {name[:40]!r}",
                hint=f"processes: {', '.join(sorted(known)) or 'none'}",
                detail={"field": "processes", "process": name[:40]},
            )
    return [RestartRequested(app_id=app_id, env=env, processes=sorted(set(processes)))]


def _current(state: WorkloadState, rollout_id: str | None, error: type[Conflict]) -> Rollout:
    ro = state.rollout
    if ro is None:
        raise RolloutNotFound(
            "no rollout has started in this environment",
            hint="'ember deploy' starts one; 'ember status' shows what runs",
        )
    if rollout_id is not None and rollout_id != ro.rollout_id:
        raise error(
            f"rollout {rollout_id[:40]} is not the current rollout ({ro.rollout_id})",
            hint="'ember status' shows the current rollout",
            detail={"rollout_id": ro.rollout_id},
        )
    return ro


def decide_promote(state: WorkloadState, rollout_id: str | None = None) -> list[EventData]:
    """Let a canary waiting for promotion roll out to every instance."""
    ro = _current(state, rollout_id, RolloutNotAwaiting)
    detail = {"rollout_id": ro.rollout_id, "phase": ro.phase, "strategy": ro.strategy}
    if ro.promoted and ro.phase in ("running", "completed"):
        return []
    if ro.phase == "awaiting_promotion":
        return [RolloutPromoted(rollout_id=ro.rollout_id)]
    if ro.strategy != "canary":
        message = f"the {ro.strategy} rollout of v{ro.release_version} has no canary"
    elif ro.phase == "running":
        message = f"the canary of v{ro.release_version} is not healthy yet"
    else:
        message = f"the rollout of v{ro.release_version} is {ro.phase}"
    raise RolloutNotAwaiting(
        f"nothing to promote: {message}",
        hint="'ember status' shows the rollout; promote once it awaits promotion",
        detail=detail,
    )


def decide_abort(
    state: WorkloadState, rollout_id: str | None = None, reason: str = "aborted by the user"
) -> list[EventData]:
    """Stop an active rollout; the controller stops its new instances and releases the
    previous release again."""
    ro = _current(state, rollout_id, RolloutNotActive)
    if ro.phase == "aborted":
        return []
    if not ro.active:
        raise RolloutNotActive(
            f"nothing to abort: the rollout of v{ro.release_version} is {ro.phase}",
            hint="'ember rollback' releases an earlier version again",
            detail={"rollout_id": ro.rollout_id, "phase": ro.phase},
        )
    return [RolloutAborted(rollout_id=ro.rollout_id, reason=reason)]
