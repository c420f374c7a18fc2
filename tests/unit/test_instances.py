"""The instance lifecycle (ember.core.instances): ``next_state`` and ``decide_report``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.instances import (
    REPORTABLE,
    InstanceFailed,
    InstanceHealthy,
    InstanceNotFound,
    InstanceState,
    InstanceStopped,
    InstanceUnhealthy,
    InvalidReport,
    decide_report,
    next_state,
)

S = InstanceState
EVENT_TYPES = [
    "instance.assigned",
    "instance.starting",
    "instance.healthy",
    "instance.unhealthy",
    "instance.stop_requested",
    "instance.stopped",
    "instance.failed",
    "instance.lost",
    "instance.created",  # not a transition
    "rollout.started",  # not about an instance at all
]
RUNNING = {S.STARTING, S.HEALTHY, S.UNHEALTHY}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(EVENT_TYPES), max_size=25))
def test_next_state_is_monotone(events: list[str]) -> None:
    state = S.PENDING
    for etype in events:
        new = next_state(state, etype)
        if new is None:
            continue
        assert new != state  # None is how "no change" is said
        if state.terminal:
            pytest.fail(f"{state} is terminal but {etype} moved it to {new}")
        if state is S.STOPPING:
            assert new.terminal  # stopping only ends
        if new is S.ASSIGNED:
            assert state is S.PENDING  # assignment happens once, before anything runs
        if new is S.PENDING:
            pytest.fail("nothing goes back to pending")
        state = new


@pytest.mark.parametrize("current", list(S))
def test_next_state_table(current: InstanceState) -> None:
    if current.terminal:
        assert all(next_state(current, e) is None for e in EVENT_TYPES)
        return
    # A stop ends at once what no host has yet; otherwise it starts stopping.
    stop = next_state(current, "instance.stop_requested")
    expected = S.STOPPED if current is S.PENDING else None if current is S.STOPPING else S.STOPPING
    assert stop is expected
    for end in ("instance.stopped", "instance.failed", "instance.lost"):
        assert next_state(current, end) is S(end.removeprefix("instance."))
    if current is S.STOPPING:
        assert next_state(current, "instance.healthy") is None
        assert next_state(current, "instance.starting") is None
    assert next_state(current, "instance.created") is None


# -- decide_report ---------------------------------------------------------------------


def report(current: InstanceState, state: str, *, host: str = "h1", **kw: object) -> list[object]:
    return list(
        decide_report(
            current,
            "h1",
            instance_id="i1",
            host_id=host,
            state=state,
            **kw,  # type: ignore[arg-type]
        )
    )


def test_a_report_from_another_host_is_not_found() -> None:
    with pytest.raises(InstanceNotFound) as info:
        report(S.ASSIGNED, "healthy", host="h2")
    assert info.value.code == "instance.not_found"
    # Not assigned anywhere yet: no host may report on it.
    with pytest.raises(InstanceNotFound):
        decide_report(S.PENDING, None, instance_id="i1", host_id="h1", state="starting")


@pytest.mark.parametrize("state", ["running", "pending", "assigned", "stopping", "lost", ""])
def test_a_state_agents_do_not_report_is_invalid(state: str) -> None:
    with pytest.raises(InvalidReport) as info:
        report(S.STARTING, state)
    assert info.value.detail["field"] == "state"
    assert info.value.code == "instance.invalid_report"


def test_reports_become_events() -> None:
    assert report(S.ASSIGNED, "healthy") == [InstanceHealthy(instance_id="i1", host_id="h1")]
    assert report(S.HEALTHY, "unhealthy", reason="check failed") == [
        InstanceUnhealthy(instance_id="i1", host_id="h1", reason="check failed")
    ]
    assert report(S.HEALTHY, "failed", exit_code=3) == [
        InstanceFailed(instance_id="i1", host_id="h1", reason="exited with code 3", exit_code=3)
    ]
    assert report(S.STOPPING, "stopped", exit_code=0) == [
        InstanceStopped(instance_id="i1", host_id="h1", exit_code=0)
    ]
    (long,) = report(S.HEALTHY, "failed", reason="x" * 2000)
    assert isinstance(long, InstanceFailed) and len(long.reason) == 500


@pytest.mark.parametrize("current", sorted(REPORTABLE))
def test_a_repeated_report_writes_nothing(current: InstanceState) -> None:
    assert report(current, current.value) == []


@pytest.mark.parametrize("current", [S.STOPPED, S.FAILED, S.LOST])
@pytest.mark.parametrize("state", sorted(s.value for s in REPORTABLE))
def test_a_report_about_an_ended_instance_writes_nothing(
    current: InstanceState, state: str
) -> None:
    assert report(current, state) == []


@pytest.mark.parametrize("state", ["starting", "healthy", "unhealthy"])
def test_a_stopping_instance_only_reports_its_end(state: str) -> None:
    assert report(S.STOPPING, state) == []
    assert len(report(S.STOPPING, "failed")) == 1


@settings(max_examples=100, deadline=None)
@given(
    current=st.sampled_from(list(S)),
    state=st.sampled_from(sorted(s.value for s in REPORTABLE)),
)
def test_a_report_event_agrees_with_next_state(current: InstanceState, state: str) -> None:
    """Whatever decide_report writes moves the instance (never a no-op event)."""
    for event in report(current, state):
        new = next_state(current, type(event).event_type)  # type: ignore[attr-defined]
        assert new is not None and new is not current
