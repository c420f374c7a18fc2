"""`ember scale` argument parsing, and how `ember deploy` judges a rollout from status."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from ember.cli.exits import Exit, InvalidArgument, exit_code_for
from ember.cli.rollout import RolloutFailed, _timed_out, judge, progress_text
from ember.cli.workloads import ago, parse_memory, parse_scale
from ember.main import main
from ember.wire import workloads as ww

# -- ember scale -------------------------------------------------------------------------


def test_counts_and_memory_parse_into_the_request() -> None:
    assert parse_scale(["web=3", "worker=0"], None) == {
        "web": {"count": 3},
        "worker": {"count": 0},
    }
    assert parse_scale(["web"], "512") == {"web": {"memory_mb": 512}}
    assert parse_scale(["web=2", "worker"], "1G") == {
        "web": {"count": 2, "memory_mb": 1024},
        "worker": {"memory_mb": 1024},
    }


@pytest.mark.parametrize(
    ("text", "mb"), [("512", 512), ("512M", 512), ("512mb", 512), ("2g", 2048), ("1 GiB", 1024)]
)
def test_memory_sizes(text: str, mb: int) -> None:
    assert parse_memory(text) == mb


@pytest.mark.parametrize(
    ("args", "memory", "argument", "words"),
    [
        (["web=x"], None, "web=x", "whole number"),
        (["web=-1"], None, "web=-1", "whole number"),
        (["web=3.5"], None, "web=3.5", "whole number"),
        (["web="], None, "web=", "whole number"),
        (["=3"], None, "=3", "no process name"),
        (["Web=3"], None, "Web=3", "not a process name"),
        (["web=1", "web=2"], None, "web=2", "named twice"),
        (["web"], None, "web", "no count and no --memory"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(
    args: list[str], memory: str | None, argument: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_scale(args, memory)
    assert info.value.detail == {"field": "PROCESS", "argument": argument}
    assert repr(argument) in info.value.message and words in info.value.message
    assert exit_code_for(info.value) == Exit.USAGE


def test_nothing_to_scale_and_a_bad_memory_size_are_usage_errors() -> None:
    with pytest.raises(InvalidArgument) as nothing:
        parse_scale([], None)
    assert nothing.value.detail == {"field": "PROCESS"}
    with pytest.raises(InvalidArgument) as size:
        parse_scale(["web"], "lots")
    assert size.value.detail == {"field": "--memory", "argument": "lots"}


def test_the_command_exits_2_before_contacting_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBER_API_URL", "http://127.0.0.1:9")  # nothing listens there
    assert main(["scale", "web=x"]) == Exit.USAGE
    err = capsys.readouterr().err
    assert "invalid argument 'web=x'" in err and "Hint: like web=3" in err
    assert main(["scale", "=3", "--json"]) == Exit.USAGE
    assert '"argument": "=3"' in capsys.readouterr().err


def test_ago_is_short() -> None:
    now = dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC)
    assert [ago(now - dt.timedelta(seconds=s), now) for s in (5, 90, 7200, 200000, -3)] == [
        "5s ago",
        "1m ago",
        "2h ago",
        "2d ago",
        "0s ago",
    ]


# -- ember deploy: judging the rollout ---------------------------------------------------

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def status(
    *,
    live: int | None = 3,
    rollout: dict[str, Any] | None = None,
    converged: bool = False,
    problems: list[str] | None = None,
    reason: str = "deploy",
    rollback_of: int | None = None,
) -> ww.Status:
    release = (
        ww.StatusRelease(
            version=live,
            repository="acme/web",
            image_digest="sha256:" + "1" * 64,
            manifest_hash="sha256:" + "2" * 64,
            secrets_version=0,
            author="a@example.com",
            reason=reason,
            rollback_of=rollback_of,
            auto_rollback=False,
            created_at=T0,
        )
        if live
        else None
    )
    ro = None
    if rollout is not None:
        fields: dict[str, Any] = {
            "id": "r1",
            "release_version": 3,
            "previous_release": 2,
            "strategy": "rolling",
            "phase": "running",
            "reason": "",
            "started_at": T0,
            "deadline_at": T0,
            "promoted": False,
            "auto_rollback": False,
            "rolled_back_to": None,
            "current": True,
        }
        ro = ww.Rollout.model_validate(fields | rollout)
    return ww.Status(
        app="web",
        env="prod",
        release=release,
        rollout=ro,
        processes=[
            ww.StatusProcess(
                name="web",
                desired=3,
                running=2,
                healthy=1,
                outdated=1,
                memory_mb=256,
                cpus=1,
                unplaced_reason=None,
            )
        ],
        instances=[],
        problems=problems or [],
        converged=converged,
    )


def test_waiting_until_the_release_converges() -> None:
    assert judge(status(), 3) == "waiting"  # no rollout yet
    assert judge(status(rollout={"current": False, "release_version": 2}), 3) == "waiting"
    assert judge(status(rollout={}), 3) == "waiting"
    assert judge(status(rollout={"phase": "completed"}, converged=True), 3) == "converged"
    canary = status(rollout={"phase": "awaiting_promotion", "strategy": "canary"})
    assert judge(canary, 3) == "awaiting_promotion"


def test_a_halted_rollout_fails_with_its_reason_and_what_is_live() -> None:
    halted = status(
        rollout={"phase": "halted", "reason": "2 new instances failed", "rolled_back_to": 2},
        problems=["web: instance i-1 failed: exited with code 3"],
    )
    with pytest.raises(RolloutFailed) as info:
        judge(halted, 3)
    message = info.value.message
    assert message.startswith("the rollout of v3 halted: 2 new instances failed")
    assert "rolling back to v2" in message and "exited with code 3" in message
    assert exit_code_for(info.value) == Exit.TIMEOUT

    # After the rollback, the halted rollout is no longer the current one; still ours.
    rolled = status(
        live=4,
        reason="rollback",
        rollback_of=2,
        rollout={"phase": "halted", "reason": "deadline passed", "current": False},
    )
    with pytest.raises(RolloutFailed) as info:
        judge(rolled, 3)
    assert "v3 halted: deadline passed; v4 (the contents of v2) is live now" in info.value.message


def test_aborted_and_replaced_releases_fail() -> None:
    with pytest.raises(RolloutFailed) as aborted:
        judge(status(rollout={"phase": "aborted", "reason": "aborted by a@example.com"}), 3)
    assert "was aborted: aborted by a@example.com" in aborted.value.message
    # The halt was missed (a new rollout of the rollback release already started).
    replaced = status(live=4, reason="rollback", rollback_of=2, rollout={"release_version": 4})
    with pytest.raises(RolloutFailed) as info:
        judge(replaced, 3)
    assert info.value.message.startswith("v3 is no longer live: v4 (the contents of v2)")
    assert info.value.detail["phase"] == "replaced"


def test_progress_and_timeouts_say_whether_a_rollout_started() -> None:
    assert "Waiting for the controller" in progress_text(status(), 3)
    assert progress_text(status(rollout={}), 3) == "Rolling out v3 (rolling): web 1/3 healthy …"
    never = _timed_out(status(), 3, 5)
    assert "no rollout of v3 started within 5s: the controller may not be running" in (
        never.message
    )
    slow = _timed_out(status(rollout={}, problems=["web: 1/3 healthy"]), 3, 300)
    assert slow.message == "v3 did not converge within 300s\n  - web: 1/3 healthy"
    assert exit_code_for(slow) == Exit.TIMEOUT
