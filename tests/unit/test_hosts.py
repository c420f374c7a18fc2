"""Host liveness and the operator's actions (ember.core.hosts)."""

from __future__ import annotations

import datetime as dt

import pytest

from ember.core.hosts import (
    HostCordoned,
    HostDrainStarted,
    HostNotFound,
    HostRecord,
    HostRecovered,
    HostRegistered,
    HostUncordoned,
    InvalidHost,
    Liveness,
    decide_admin,
    liveness_changes,
)
from ember.core.placement import HostState

NOW = dt.datetime(2025, 1, 1, 12, tzinfo=dt.UTC)


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def test_a_silent_host_goes_down_after_the_timeout() -> None:
    down, recovered = liveness_changes(
        [
            Liveness("h1", down=False, last_seen=ago(31)),
            Liveness("h2", down=False, last_seen=ago(30)),  # exactly at the timeout: still up
            Liveness("h3", down=False, last_seen=ago(1)),
        ],
        NOW,
        30,
    )
    assert [e.host_id for e in down] == ["h1"]
    assert "31s" in down[0].reason and "30" in down[0].reason
    assert recovered == []


def test_a_down_host_heard_from_again_recovers() -> None:
    down, recovered = liveness_changes(
        [
            Liveness("h2", down=True, last_seen=ago(2)),
            Liveness("h1", down=True, last_seen=ago(300)),  # still silent: stays down
        ],
        NOW,
        30,
    )
    assert down == []
    assert recovered == [HostRecovered(host_id="h2")]


def test_liveness_is_idempotent_once_applied() -> None:
    hosts = [Liveness("b", False, ago(100)), Liveness("a", False, ago(100))]
    down, _ = liveness_changes(hosts, NOW, 30)
    assert [e.host_id for e in down] == ["a", "b"]  # a stable order
    marked = [Liveness(h.host_id, True, h.last_seen) for h in hosts]
    assert liveness_changes(marked, NOW, 30) == ([], [])


def registered() -> HostRecord:
    return HostRecord(registered=HostRegistered(host_id="h1", vcpus=4, memory_mb=8192, disk_mb=0))


def test_admin_actions_write_a_change_once() -> None:
    rec = registered()
    assert decide_admin(rec, "h1", "cordon") == [HostCordoned(host_id="h1")]
    rec.admin_state = HostState.CORDONED
    assert decide_admin(rec, "h1", "cordon") == []
    assert decide_admin(rec, "h1", "drain") == [HostDrainStarted(host_id="h1")]
    rec.admin_state = HostState.DRAINING
    assert decide_admin(rec, "h1", "drain") == []
    assert decide_admin(rec, "h1", "uncordon") == [HostUncordoned(host_id="h1")]


def test_admin_errors() -> None:
    with pytest.raises(HostNotFound):
        decide_admin(HostRecord(), "h9", "cordon")
    with pytest.raises(InvalidHost) as info:
        decide_admin(registered(), "h1", "reboot")
    assert info.value.detail["field"] == "action"


def test_a_down_host_shows_down_whatever_its_admin_state() -> None:
    for down, shown in ((True, HostState.DOWN), (False, HostState.DRAINING)):
        rec = registered()
        rec.admin_state, rec.down = HostState.DRAINING, down
        assert rec.state is shown
