"""The pure decisions behind `ember scale`, `ember restart`, `ember deploy promote|abort`."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.errors import Kind
from ember.core.events import EventData
from ember.core.releases import ReleaseNotFound
from ember.core.workload_commands import (
    RolloutNotActive,
    RolloutNotAwaiting,
    decide_abort,
    decide_promote,
    decide_restart,
    decide_scale,
)
from ember.core.workloads import (
    ProcessNotFound,
    ProcessScale,
    RolloutNotFound,
    RolloutStarted,
    WorkloadState,
    apply,
)

PROCESSES = ("web", "worker", "clock")
scales = st.dictionaries(
    st.sampled_from(PROCESSES),
    st.builds(
        ProcessScale,
        count=st.none() | st.integers(0, 100),
        memory_mb=st.none() | st.integers(32, 16384).map(lambda m: m * 4),
    ).filter(lambda s: s.count is not None or s.memory_mb is not None),
    min_size=1,
)


def fold(state: WorkloadState, events: list[EventData]) -> WorkloadState:
    for e in events:
        apply(state, (e.event_type, e.model_dump(mode="json")))
    return state


@settings(max_examples=200, deadline=None)
@given(first=scales, second=scales)
def test_scaling_again_to_the_same_writes_nothing_and_only_changes_are_recorded(
    first: dict[str, ProcessScale], second: dict[str, ProcessScale]
) -> None:
    state = fold(
        WorkloadState(),
        decide_scale(WorkloadState(), app_id="a", env="e", processes=first, declared=PROCESSES),
    )
    before = state.model_copy(deep=True)
    events = decide_scale(state, app_id="a", env="e", processes=second, declared=PROCESSES)
    after = fold(state, events)
    for name, want in second.items():  # what was asked is what is set
        if want.count is not None:
            assert after.formation[name].count == want.count
        if want.memory_mb is not None:
            assert after.formation[name].memory_mb == want.memory_mb
    for name in set(PROCESSES) - set(second):  # the rest is untouched
        assert after.formation.get(name) == before.formation.get(name)
    assert decide_scale(after, app_id="a", env="e", processes=second, declared=PROCESSES) == []
    assert bool(events) == (after.formation != before.formation)


def test_restart_names_known_processes_once() -> None:
    [event] = decide_restart(app_id="a", env="e", processes=["web", "web"], declared=PROCESSES)
    assert event.model_dump()["processes"] == ["web"]
    with pytest.raises(ProcessNotFound) as info:
        decide_restart(app_id="a", env="e", processes=["db"], declared=PROCESSES)
    assert info.value.detail == {"field": "processes", "process": "db"}
    with pytest.raises(ReleaseNotFound):
        decide_restart(app_id="a", env="e", processes=[], declared=None)


def rollout(strategy: str = "canary", *events: str) -> WorkloadState:
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    state = WorkloadState()
    started = RolloutStarted(
        rollout_id="r1",
        app_id="a",
        env="e",
        release_version=2,
        strategy=strategy,
        max_surge=1,
        max_unavailable=0,
        specs={"web": "sha256:x"},
        started_at=t0,
        deadline_at=t0,
    )
    apply(state, (started.event_type, started.model_dump(mode="json")))
    for etype in events:
        apply(state, (etype, {"rollout_id": "r1", "reason": "why"}))
    return state


def test_promote_only_an_awaiting_canary_and_abort_only_an_active_rollout() -> None:
    with pytest.raises(RolloutNotFound):
        decide_promote(WorkloadState())
    with pytest.raises(RolloutNotFound):
        decide_abort(WorkloadState())
    for state in (rollout("canary"), rollout("rolling"), rollout("canary", "rollout.completed")):
        with pytest.raises(RolloutNotAwaiting) as info:
            decide_promote(state)
        assert info.value.kind is Kind.CONFLICT
    awaiting = rollout("canary", "rollout.awaiting_promotion")
    assert [e.event_type for e in decide_promote(awaiting)] == ["rollout.promoted"]
    with pytest.raises(RolloutNotAwaiting):
        decide_promote(awaiting, "r0")
    assert decide_promote(rollout("canary", "rollout.awaiting_promotion", "rollout.promoted")) == []

    assert [e.event_type for e in decide_abort(awaiting)] == ["rollout.aborted"]
    assert [e.event_type for e in decide_abort(rollout("rolling"))] == ["rollout.aborted"]
    assert decide_abort(rollout("rolling", "rollout.aborted")) == []
    for phase in ("rollout.completed", "rollout.halted"):
        with pytest.raises(RolloutNotActive):
            decide_abort(rollout("rolling", phase))
