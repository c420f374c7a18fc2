"""The agent's converge plan (pure) and its local state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.agent.converge import (
    Allocation,
    Forget,
    LocalStatus,
    LocalVm,
    Prepare,
    Report,
    Start,
    Stop,
    plan,
)
from ember.agent.health import Verdict
from ember.agent.state import AgentState, InstanceRecord, StateInvalid, StateStore

HEALTHY, UNHEALTHY = Verdict.HEALTHY, Verdict.UNHEALTHY

SPEC = {"repository": "o/a", "image_digest": "sha256:" + "a" * 64, "kill_timeout_s": 7}


def alloc(iid: str = "i1", state: str = "assigned", desired: str = "run") -> Allocation:
    return Allocation(iid, state, desired, SPEC, app_id="app", process="web")


def vm(iid: str = "i1", status: LocalStatus = LocalStatus.RUNNING, **kw: object) -> LocalVm:
    return LocalVm(iid, status, **kw)  # type: ignore[arg-type]


def test_a_new_run_allocation_is_prepared_then_started() -> None:
    a = alloc()
    assert plan([a], {}) == [Prepare("i1", a), Start("i1", a)]


def test_a_preparing_instance_is_left_alone_even_when_asked_to_stop() -> None:
    local = {"i1": vm(status=LocalStatus.PREPARING)}
    assert plan([alloc()], local) == []
    assert plan([alloc(desired="stop", state="stopping")], local) == []


def test_a_running_vm_is_reported_starting_with_its_address_once() -> None:
    local = {"i1": vm(address="fd00::5")}
    assert plan([alloc()], local) == [Report("i1", "starting", address="fd00::5")]
    sent = {"i1": vm(address="fd00::5", reported="starting")}
    assert plan([alloc()], sent) == []  # the allocations have not caught up yet
    assert plan([alloc(state="starting")], sent) == []


def test_a_passed_health_check_is_reported_healthy() -> None:
    local = {"i1": vm(address="fd00::5", health=HEALTHY, reported="starting")}
    assert plan([alloc(state="starting")], local) == [Report("i1", "healthy", address="fd00::5")]
    # straight from assigned when the check passed before the first report
    first = {"i1": vm(address="fd00::5", health=HEALTHY)}
    assert plan([alloc()], first) == [Report("i1", "healthy", address="fd00::5")]


def test_an_unhealthy_verdict_is_reported_with_the_failing_check_once() -> None:
    why = "tcp check on port 8080 failed 3 times in a row: connection refused"
    local = {"i1": vm(address="fd00::5", health=UNHEALTHY, health_reason=why)}
    expected = [Report("i1", "unhealthy", reason=why)]
    assert plan([alloc(state="healthy")], local) == expected
    assert plan([alloc(state="starting")], local) == expected  # never healthy so far
    sent = {"i1": vm(health=UNHEALTHY, health_reason=why, reported="unhealthy")}
    assert plan([alloc(state="healthy")], sent) == []  # the allocations lag behind
    assert plan([alloc(state="unhealthy")], sent) == []


def test_an_unhealthy_instance_not_known_to_run_is_reported_starting_first() -> None:
    # an unhealthy report carries no address: starting (with it) comes first
    local = {"i1": vm(address="fd00::5", health=UNHEALTHY, health_reason="x")}
    assert plan([alloc()], local) == [Report("i1", "starting", address="fd00::5")]
    local = {"i1": vm(address="fd00::5", health=UNHEALTHY, reported="starting")}
    assert plan([alloc()], local) == []
    assert plan([alloc(state="starting")], local) == [Report("i1", "unhealthy")]


def test_healthy_unhealthy_healthy_reports_each_transition_once() -> None:
    vm_ = vm(address="fd00::5", health=HEALTHY, reported="starting")
    a = alloc(state="starting")
    seen: list[Report] = []
    for health, reason in [(HEALTHY, ""), (UNHEALTHY, "down"), (HEALTHY, ""), (HEALTHY, "")]:
        vm_ = LocalVm(
            "i1",
            LocalStatus.RUNNING,
            health=health,
            health_reason=reason,
            reported=vm_.reported,
            address="fd00::5",
        )
        for _ in range(3):  # the plan runs again before and after the allocation catches up
            actions = plan([a], {"i1": vm_})
            for action in actions:
                assert isinstance(action, Report)
                seen.append(action)
                vm_ = LocalVm(
                    "i1",
                    LocalStatus.RUNNING,
                    health=health,
                    health_reason=reason,
                    reported=action.state,
                    address="fd00::5",
                )
            a = Allocation("i1", vm_.reported or a.state, "run", SPEC)
    assert seen == [
        Report("i1", "healthy", address="fd00::5"),
        Report("i1", "unhealthy", reason="down"),
        Report("i1", "healthy", address="fd00::5"),
    ]


def test_a_stopping_or_terminal_instance_gets_no_health_reports() -> None:
    local = {"i1": vm(health=UNHEALTHY, stop_requested=True)}
    assert plan([alloc(state="healthy")], local) == []
    (action,) = plan([alloc(state="stopping", desired="stop")], {"i1": vm(health=UNHEALTHY)})
    assert isinstance(action, Stop)


def test_a_converged_host_yields_nothing() -> None:
    local = {"i1": vm(health=HEALTHY, reported="healthy"), "i2": vm("i2")}
    allocs = [alloc(state="healthy"), alloc("i2", state="starting")]
    assert plan(allocs, local) == []
    assert plan(allocs, local) == []  # idempotent


def test_a_restarted_agent_adopting_three_running_vms_starts_and_stops_nothing() -> None:
    # after adopt(): the records say running; health was not re-checked yet
    local = {f"i{n}": vm(f"i{n}", address=f"fd00::{n}") for n in range(3)}
    allocs = [alloc(f"i{n}", state="healthy") for n in range(3)]
    assert plan(allocs, local) == []


def test_a_healthy_instance_is_never_reported_starting_again() -> None:
    assert plan([alloc(state="healthy")], {"i1": vm()}) == []


def test_desired_stop_stops_the_running_vm_with_the_kill_timeout() -> None:
    actions = plan([alloc(state="stopping", desired="stop")], {"i1": vm()})
    assert actions == [Stop("i1", 7.0, "stop requested")]


def test_a_stop_under_way_is_not_repeated() -> None:
    local = {"i1": vm(stop_requested=True)}
    assert plan([alloc(state="stopping", desired="stop")], local) == []
    assert plan([], local) == []


def test_an_exit_after_a_requested_stop_is_reported_stopped_with_its_code() -> None:
    local = {"i1": vm(status=LocalStatus.EXITED, exit_code=143, stop_requested=True)}
    actions = plan([alloc(state="stopping", desired="stop")], local)
    assert actions == [Report("i1", "stopped", exit_code=143)]


def test_a_vm_exiting_on_its_own_is_reported_failed_with_its_exit_code() -> None:
    local = {"i1": vm(status=LocalStatus.EXITED, exit_code=3)}
    actions = plan([alloc(state="healthy")], local)
    assert actions == [Report("i1", "failed", exit_code=3, reason="exited with code 3")]
    reported = {"i1": vm(status=LocalStatus.EXITED, exit_code=3, reported="failed")}
    assert plan([alloc(state="healthy")], reported) == []


def test_a_failed_start_is_reported_failed_with_its_reason() -> None:
    local = {"i1": vm(status=LocalStatus.EXITED, reason="start failed: no image")}
    assert plan([alloc()], local) == [Report("i1", "failed", reason="start failed: no image")]


def test_an_exit_without_status_says_so() -> None:
    (action,) = plan([alloc(state="starting")], {"i1": vm(status=LocalStatus.EXITED)})
    assert isinstance(action, Report)
    assert action.state == "failed"
    assert action.exit_code is None
    assert "without an exit status" in action.reason


def test_a_terminal_instance_with_an_exited_vm_is_forgotten() -> None:
    local = {"i1": vm(status=LocalStatus.EXITED, exit_code=0, reported="stopped")}
    assert plan([alloc(state="stopped", desired="stop")], local) == [Forget("i1")]


def test_an_orphan_is_stopped_then_forgotten() -> None:
    assert plan([], {"x": vm("x")}) == [Stop("x", 5.0, "not allocated to this host")]
    assert plan([], {"x": vm("x", status=LocalStatus.EXITED)}) == [Forget("x")]
    assert plan([], {"x": vm("x", status=LocalStatus.PREPARING)}) == []


def test_a_running_vm_of_a_written_off_instance_is_stopped() -> None:
    (action,) = plan([alloc(state="lost")], {"i1": vm()})
    assert isinstance(action, Stop)
    assert action.reason == "instance is lost"


@pytest.mark.parametrize("state", ["stopped", "failed", "lost"])
def test_terminal_allocations_without_a_vm_need_nothing(state: str) -> None:
    assert plan([alloc(state=state)], {}) == []
    assert plan([alloc(state=state, desired="stop")], {}) == []


def test_a_stop_for_an_instance_never_started_here_is_reported_stopped() -> None:
    assert plan([alloc(state="stopping", desired="stop")], {}) == [
        Report("i1", "stopped", reason="not running on this host")
    ]


def test_a_running_instance_unknown_to_the_host_is_reported_failed() -> None:
    (action,) = plan([alloc(state="healthy")], {})
    assert action == Report("i1", "failed", reason="no VM for this instance on the host")


def test_actions_come_in_instance_order() -> None:
    allocs = [alloc("b"), alloc("a")]
    assert [a.instance_id for a in plan(allocs, {})] == ["a", "a", "b", "b"]


# -- state -------------------------------------------------------------------------------


def test_state_round_trips_atomically(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "agent")
    assert store.load() == AgentState()
    rec = InstanceRecord(
        "i1",
        "i1",
        repository="o/a",
        image_digest="sha256:" + "a" * 64,
        address="fd00::5",
        tap="em-abc",
        started_at=12.5,
        status=LocalStatus.RUNNING,
        reported="healthy",
    )
    state = AgentState(host_id="h1").with_instance(rec)
    store.save(state)
    assert store.load() == state
    assert json.loads(store.path.read_text())["instances"]["i1"]["status"] == "running"
    assert [p.name for p in store.data_dir.iterdir()] == ["state.json"]  # no temp file left
    assert store.load().without_instance("i1").instances == {}
    assert rec.local_vm() == LocalVm(
        "i1", LocalStatus.RUNNING, reported="healthy", address="fd00::5"
    )
    assert store.identity_path == tmp_path / "agent" / "node.key"


@pytest.mark.parametrize(
    "text",
    [
        "nope",
        "[]",
        '{"version": 2}',
        '{"version": 1, "instances": {"i": {"status": "zz"}}}',
        '{"version": 1, "instances": {"i": {"instance_id": "i", "vm_id": "i", "health": "meh"}}}',
    ],
)
def test_a_bad_state_file_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(StateInvalid):
        StateStore(tmp_path).load()


def test_health_and_the_check_token_survive_a_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    rec = InstanceRecord(
        "i1", "i1", health=UNHEALTHY, health_reason="exec check 'x' failed", check_token="t" * 32
    )
    store.save(AgentState().with_instance(rec))
    assert json.loads(store.path.read_text())["instances"]["i1"]["health"] == "unhealthy"
    assert store.load().instances["i1"] == rec
    assert rec.local_vm().health is UNHEALTHY
    assert rec.local_vm().health_reason == "exec check 'x' failed"


def test_a_record_of_an_older_agent_keeps_its_healthy_flag(tmp_path: Path) -> None:
    old = {"instance_id": "i1", "vm_id": "i1", "status": "running", "healthy": True}
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "instances": {"i1": old}}))
    assert StateStore(tmp_path).load().instances["i1"].health is HEALTHY
    old["healthy"] = False
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "instances": {"i1": old}}))
    assert StateStore(tmp_path).load().instances["i1"].health is None


def test_an_instance_joins_its_orgs_network_group_else_its_apps_alone() -> None:
    assert Allocation("i1", "assigned", "run", SPEC, app_id="a1", org_id="o1").network_group == "o1"
    # Without an org (an older control plane) it may reach its own app's instances only.
    assert Allocation("i1", "assigned", "run", SPEC, app_id="a1").network_group == "app:a1"
