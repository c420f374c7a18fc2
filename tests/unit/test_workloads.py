"""The workload stream (ember.core.workloads): folding events with ``apply``, the desired
processes of a live release, and ``check_scale``'s errors."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.events import EventData, RecordedEvent
from ember.core.instances import PlacementFailed
from ember.core.manifest import for_environment, normalize, parse_manifest
from ember.core.workloads import (
    MAX_COUNT,
    FormationScaled,
    InvalidScale,
    LiveRelease,
    ProcessNotFound,
    ProcessScale,
    RestartRequested,
    RolloutAborted,
    RolloutAwaitingPromotion,
    RolloutCompleted,
    RolloutHalted,
    RolloutPromoted,
    RolloutStarted,
    WorkloadState,
    apply,
    check_scale,
    desired_processes,
    fold,
)

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

MANIFEST = """
schema_version = 1
app = "hello"
[processes]
web = "serve --port 8080"
worker = ["work", "--queue", "default"]
[env]
LOG_LEVEL = "info"
[[vm]]
processes = ["web"]
cpus = 2
memory_mb = 512
[deploy]
kill_signal = "SIGINT"
kill_timeout = "1m30s"
[restart]
policy = "always"
max_retries = 3
"""


def live_release(version: int = 1, digest: str = "sha256:" + "a" * 64, **kw: Any) -> LiveRelease:
    m = normalize(for_environment(parse_manifest(MANIFEST), "production"))
    return LiveRelease(
        version=version,
        repository="registry.local/hello",
        image_digest=digest,
        manifest=m,
        **kw,
    )


def folded(*payloads: EventData) -> WorkloadState:
    state = WorkloadState()
    for p in payloads:
        apply(state, (p.event_type, p.model_dump(mode="json")))
    return state


def started(rollout_id: str = "r1", **kw: Any) -> RolloutStarted:
    fields: dict[str, Any] = {
        "rollout_id": rollout_id,
        "app_id": "app",
        "env": "production",
        "release_version": 2,
        "previous_release": 1,
        "strategy": "canary",
        "max_surge": 1,
        "max_unavailable": 0,
        "specs": {"web": "sha256:x"},
        "started_at": T0,
        "deadline_at": T0 + dt.timedelta(minutes=5),
    }
    return RolloutStarted(**(fields | kw))


def scaled(**processes: ProcessScale) -> FormationScaled:
    return FormationScaled(app_id="app", env="production", processes=processes)


# -- apply --------------------------------------------------------------------------------


def test_formation_merges_count_and_memory_per_process() -> None:
    state = folded(
        scaled(web=ProcessScale(count=3)),
        scaled(web=ProcessScale(memory_mb=1024), worker=ProcessScale(count=0)),
        scaled(web=ProcessScale(count=2)),
    )
    assert state.formation == {
        "web": ProcessScale(count=2, memory_mb=1024),
        "worker": ProcessScale(count=0, memory_mb=None),
    }


def test_restarts_count_per_process_and_for_all() -> None:
    state = folded(
        RestartRequested(app_id="app", env="production"),
        RestartRequested(app_id="app", env="production", processes=["web"]),
        RestartRequested(app_id="app", env="production", processes=["web", "worker"]),
        RestartRequested(app_id="app", env="production", secrets_version=4, reason="secrets"),
    )
    assert state.all_restarts == 2
    assert state.restart_generation == {"web": 2, "worker": 1}
    assert state.secrets_version == 4


def test_rollout_phases() -> None:
    state = folded(started())
    assert state.rollout is not None
    assert (state.rollout.phase, state.rollout.active) == ("running", True)
    apply(state, ("rollout.awaiting_promotion", {"rollout_id": "r1"}))
    assert (state.rollout.phase, state.rollout.active) == ("awaiting_promotion", True)
    apply(state, ("rollout.promoted", {"rollout_id": "r1"}))
    assert (state.rollout.phase, state.rollout.promoted) == ("running", True)
    apply(state, ("rollout.completed", {"rollout_id": "r1"}))
    assert (state.rollout.phase, state.rollout.active) == ("completed", False)


def test_halt_and_abort_keep_the_reason() -> None:
    halted = folded(started(), RolloutHalted(rollout_id="r1", reason="boom", rolled_back_to=1))
    assert halted.rollout is not None
    assert (halted.rollout.phase, halted.rollout.reason) == ("halted", "boom")
    assert halted.rollout.rolled_back_to == 1
    aborted = folded(started(), RolloutAborted(rollout_id="r1", reason="nope"))
    assert aborted.rollout is not None
    assert (aborted.rollout.phase, aborted.rollout.reason) == ("aborted", "nope")


def test_events_of_an_older_rollout_change_nothing() -> None:
    state = folded(started("r1"), started("r2", release_version=3))
    before = state.model_copy(deep=True)
    for p in (
        RolloutCompleted(rollout_id="r1"),
        RolloutHalted(rollout_id="r1", reason="late"),
        RolloutAwaitingPromotion(rollout_id="r1"),
        RolloutAborted(rollout_id="r1"),
    ):
        apply(state, (p.event_type, p.model_dump(mode="json")))
    assert state == before
    assert state.rollout is not None and state.rollout.rollout_id == "r2"


def test_a_new_rollout_replaces_the_last_one() -> None:
    state = folded(started("r1"), RolloutCompleted(rollout_id="r1"), started("r2"))
    assert state.rollout is not None
    assert (state.rollout.rollout_id, state.rollout.phase) == ("r2", "running")
    assert not state.rollout.promoted


def test_unplaced_is_recorded_and_cleared_by_a_creation() -> None:
    state = folded(
        PlacementFailed(
            app_id="app", env="production", process="web", instance_ids=["i1"], reason="no room"
        )
    )
    assert state.unplaced == {"web": "no room"}
    apply(state, ("instance.created", {"instance_id": "i2", "process": "worker"}))
    assert state.unplaced == {"web": "no room"}
    apply(state, ("instance.created", {"instance_id": "i3", "process": "web"}))
    assert state.unplaced == {}


def recorded(payload: EventData, version: int, at: dt.datetime) -> RecordedEvent:
    return RecordedEvent(
        position=version,
        xid=version,
        stream_id="workload-app.production",
        stream_version=version,
        type=payload.event_type,
        schema_version=1,
        data=payload.model_dump(mode="json"),
        metadata={},
        recorded_at=at,
    )


def test_fold_of_recorded_events_tracks_the_version_and_equals_apply_of_pairs() -> None:
    payloads: list[EventData] = [
        scaled(web=ProcessScale(count=2)),
        started(),
        RolloutAwaitingPromotion(rollout_id="r1"),
        RestartRequested(app_id="app", env="production"),
    ]
    state = fold(recorded(p, n, T0) for n, p in enumerate(payloads, 1))
    assert state.version == 4
    assert state.model_copy(update={"version": 0}) == folded(*payloads)


def test_a_promotion_restarts_the_deadline_window() -> None:
    """The canary may wait for its promotion as long as it likes; the rest of the
    rollout then gets a full deadline."""
    late = T0 + dt.timedelta(hours=3)
    state = fold(
        [
            recorded(started(), 1, T0),
            recorded(RolloutAwaitingPromotion(rollout_id="r1"), 2, T0 + dt.timedelta(minutes=1)),
            recorded(RolloutPromoted(rollout_id="r1"), 3, late),
        ]
    )
    assert state.rollout is not None
    assert state.rollout.deadline_at == late + dt.timedelta(minutes=5)
    # Promoted early, the original deadline stands (it never shrinks).
    early = fold([recorded(started(), 1, T0), recorded(RolloutPromoted(rollout_id="r1"), 2, T0)])
    assert early.rollout is not None
    assert early.rollout.deadline_at == T0 + dt.timedelta(minutes=5)


def test_the_folded_state_round_trips_through_json() -> None:
    """The projection stores the state as JSON and reads it back."""
    state = folded(
        scaled(web=ProcessScale(count=2, memory_mb=512)),
        started(),
        RolloutHalted(rollout_id="r1", reason="x"),
        RestartRequested(app_id="app", env="production", processes=["web"]),
    )
    assert WorkloadState.model_validate(state.model_dump(mode="json")) == state


# -- desired_processes ---------------------------------------------------------------------


def test_desired_processes_from_the_manifest() -> None:
    desired = desired_processes(live_release(secrets_version=2), WorkloadState())
    assert sorted(desired) == ["web", "worker"]
    web, worker = desired["web"], desired["worker"]
    assert (web.count, worker.count) == (1, 1)  # never scaled: one instance
    assert web.spec.command == ["serve", "--port", "8080"]
    assert worker.spec.command == ["work", "--queue", "default"]
    assert (web.spec.cpus, web.spec.memory_mb) == (2.0, 512)
    assert (worker.spec.cpus, worker.spec.memory_mb) == (1.0, 256)
    assert web.spec.env == {"LOG_LEVEL": "info"}
    assert (web.spec.kill_signal, web.spec.kill_timeout_s) == ("SIGINT", 90.0)
    assert (web.spec.restart_policy, web.spec.max_retries) == ("always", 3)
    assert web.spec.secrets_version == 2
    assert web.spec_hash != worker.spec_hash


def test_formation_sets_count_and_memory() -> None:
    state = folded(scaled(web=ProcessScale(count=4, memory_mb=2048), worker=ProcessScale(count=0)))
    desired = desired_processes(live_release(), state)
    assert (desired["web"].count, desired["web"].spec.memory_mb) == (4, 2048)
    assert desired["worker"].count == 0


def test_the_spec_hash_ignores_the_release_number_only() -> None:
    state = WorkloadState()
    base = desired_processes(live_release(1), state)["web"]
    assert desired_processes(live_release(9), state)["web"].spec_hash == base.spec_hash
    assert desired_processes(live_release(9), state)["web"].spec.release_version == 9
    changed = [
        desired_processes(live_release(1, digest="sha256:" + "b" * 64), state),
        desired_processes(live_release(1, secrets_version=1), state),
        desired_processes(live_release(1), folded(scaled(web=ProcessScale(memory_mb=1024)))),
        desired_processes(live_release(1), folded(RestartRequested(app_id="a", env="e"))),
        desired_processes(
            live_release(1), folded(RestartRequested(app_id="a", env="e", processes=["web"]))
        ),
    ]
    for desired in changed:
        assert desired["web"].spec_hash != base.spec_hash
    # A count is not part of the spec: scaling replaces nothing.
    count = desired_processes(live_release(1), folded(scaled(web=ProcessScale(count=7))))
    assert count["web"].spec_hash == base.spec_hash


def test_a_restart_of_one_process_leaves_the_others_alone() -> None:
    state = folded(RestartRequested(app_id="a", env="e", processes=["worker"]))
    before = desired_processes(live_release(), WorkloadState())
    after = desired_processes(live_release(), state)
    assert after["web"].spec_hash == before["web"].spec_hash
    assert after["worker"].spec_hash != before["worker"].spec_hash


def test_secrets_rotation_takes_the_newer_secrets_version() -> None:
    rotated = folded(RestartRequested(app_id="a", env="e", secrets_version=5))
    older = desired_processes(live_release(secrets_version=3), rotated)
    assert older["web"].spec.secrets_version == 5
    # A release made after the rotation carries the newer version itself.
    newer = desired_processes(live_release(secrets_version=7), rotated)
    assert newer["web"].spec.secrets_version == 7


# -- check_scale ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("processes", "declared", "error", "field"),
    [
        ({}, None, InvalidScale, "processes"),
        ({"db": ProcessScale(count=1)}, ["web"], ProcessNotFound, "processes.db"),
        ({"web": ProcessScale()}, ["web"], InvalidScale, "processes.web"),
        ({"web": ProcessScale(count=-1)}, ["web"], InvalidScale, "processes.web.count"),
        ({"web": ProcessScale(count=MAX_COUNT + 1)}, None, InvalidScale, "processes.web.count"),
        ({"web": ProcessScale(memory_mb=64)}, None, InvalidScale, "processes.web.memory_mb"),
        ({"web": ProcessScale(memory_mb=130)}, None, InvalidScale, "processes.web.memory_mb"),
        ({"web": ProcessScale(memory_mb=65540)}, None, InvalidScale, "processes.web.memory_mb"),
    ],
)
def test_check_scale_names_the_field(
    processes: dict[str, ProcessScale],
    declared: list[str] | None,
    error: type[Exception],
    field: str,
) -> None:
    with pytest.raises(error) as info:
        check_scale(processes, declared)
    assert info.value.detail["field"] == field  # type: ignore[attr-defined]
    assert info.value.code in ("scale.invalid", "process.not_found")  # type: ignore[attr-defined]


@settings(max_examples=100, deadline=None)
@given(
    count=st.none() | st.integers(-5, MAX_COUNT + 5),
    memory=st.none() | st.integers(0, 70000),
)
def test_check_scale_accepts_exactly_the_valid_sizes(count: int | None, memory: int | None) -> None:
    scale = {"web": ProcessScale(count=count, memory_mb=memory)}
    valid = (count is not None or memory is not None) and (
        (count is None or 0 <= count <= MAX_COUNT)
        and (memory is None or (128 <= memory <= 65536 and memory % 4 == 0))
    )
    if valid:
        assert check_scale(scale, ["web"]) == scale
    else:
        with pytest.raises(InvalidScale):
            check_scale(scale, ["web"])


def test_check_scale_before_a_first_deploy_accepts_any_process() -> None:
    scale = {"anything": ProcessScale(count=2)}
    assert check_scale(scale, None) == scale
