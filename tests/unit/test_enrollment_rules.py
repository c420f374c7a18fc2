"""Enrolment rules (ember.core.enrollment), the host stream's identity
(ember.core.hosts), and who may act as a host's agent (ember.core.tenancy.check_agent)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from ember.core.enrollment import (
    EnrollmentState,
    EnrollmentTokenCreated,
    HostEnrolled,
    check_rebind,
    decide_enroll,
    enrollment_stream,
    fold_enrollment,
    new_token,
)
from ember.core.errors import ValidationFailed
from ember.core.events import RecordedEvent
from ember.core.hosts import (
    HostIdentityBound,
    HostRecord,
    HostRegistered,
    InvalidHost,
    decide_bind,
    fold_host,
)
from ember.core.tenancy import (
    Capability,
    Forbidden,
    Principal,
    Scope,
    Unauthorized,
    check_agent,
)

NOW = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
HASH = "ab" * 32
KEY_A, KEY_B = "A" * 43, "B" * 43


def recorded(version: int, type_: str, data: dict[str, Any], stream: str = "s") -> RecordedEvent:
    return RecordedEvent(
        position=version,
        xid=1,
        stream_id=stream,
        stream_version=version,
        type=type_,
        schema_version=1,
        data=data,
        metadata={},
        recorded_at=NOW,
    )


def token(host_id: str | None = None, expires_in_s: int = 3600) -> EnrollmentTokenCreated:
    return new_token(HASH, host_id, expires_in_s, now=NOW, created_by="usr_ops")


def state(created: EnrollmentTokenCreated, enrolled: HostEnrolled | None = None) -> EnrollmentState:
    events = [recorded(1, created.event_type, created.model_dump(mode="json"))]
    if enrolled is not None:
        events.append(recorded(2, enrolled.event_type, enrolled.model_dump(mode="json")))
    return fold_enrollment(events)


def enroll(s: EnrollmentState, host_id: str = "h1", key: str = KEY_A, **kw: Any) -> list[Any]:
    return decide_enroll(
        s,
        token_hash=kw.get("token_hash", HASH),
        host_id=host_id,
        public_key=key,
        now=kw.get("now", NOW),
    )


def test_new_tokens_check_their_input() -> None:
    created = token("h1", 60)
    assert created.expires_at == NOW + dt.timedelta(seconds=60)
    assert enrollment_stream(HASH) == "enrollment-" + HASH[:32]
    assert token(None, 7 * 86400).host_id is None
    for seconds in (59, 7 * 86400 + 1, 0, -1):
        with pytest.raises(ValidationFailed) as err:
            token(None, seconds)
        assert err.value.detail == {"field": "expires_in_s"}
    with pytest.raises(InvalidHost) as bad:
        token("Bad_Host")
    assert bad.value.detail == {"field": "host_id"}


def test_a_token_enrolls_once_and_a_retry_writes_nothing() -> None:
    fresh = state(token())
    assert fresh.version == 1 and fresh.enrolled is None
    used = HostEnrolled(token_hash=HASH, host_id="h1", public_key=KEY_A)
    assert enroll(fresh) == [used]
    after = state(token(), used)
    assert after.version == 2
    assert enroll(after) == [], "same host and key: the agent retrying a lost answer"
    assert enroll(after, now=NOW + dt.timedelta(days=30)) == [], "also after the expiry"


@pytest.mark.parametrize(
    ("s", "host_id", "key", "extra"),
    [
        (EnrollmentState(), "h1", KEY_A, {}),  # unknown token
        (state(token()), "h1", KEY_A, {"token_hash": "cd" * 32}),  # another token's stream
        (state(token()), "h1", KEY_A, {"now": NOW + dt.timedelta(seconds=3600)}),  # expired
        (state(token("h2")), "h1", KEY_A, {}),  # made for another host
        (
            state(token(), HostEnrolled(token_hash=HASH, host_id="h1", public_key=KEY_A)),
            "h1",
            KEY_B,
            {},
        ),  # used, with another key
        (
            state(token(), HostEnrolled(token_hash=HASH, host_id="h1", public_key=KEY_A)),
            "h2",
            KEY_A,
            {},
        ),  # used, for another host
    ],
)
def test_every_refusal_looks_the_same(
    s: EnrollmentState, host_id: str, key: str, extra: dict[str, Any]
) -> None:
    with pytest.raises(Unauthorized) as err:
        enroll(s, host_id, key, **extra)
    assert err.value.code == "auth.unauthorized"
    assert err.value.message == "enrollment token invalid, expired or used"


def test_binding_registers_and_replaces_the_key() -> None:
    facts = HostRegistered(host_id="h1", vcpus=4, memory_mb=8192, disk_mb=0)
    assert decide_bind(HostRecord(), facts, KEY_A) == [
        facts,
        HostIdentityBound(host_id="h1", public_key=KEY_A),
    ]
    stream = [
        recorded(1, "host.registered", facts.model_dump(mode="json"), "host-h1"),
        recorded(2, "host.identity_bound", {"host_id": "h1", "public_key": KEY_A}, "host-h1"),
    ]
    rec = fold_host(stream)
    assert (rec.public_key, rec.version) == (KEY_A, 2)
    assert decide_bind(rec, facts, KEY_A) == [], "the same facts and key: nothing"
    assert decide_bind(rec, facts, KEY_B) == [HostIdentityBound(host_id="h1", public_key=KEY_B)]
    bigger = facts.model_copy(update={"memory_mb": 16384})
    assert decide_bind(rec, bigger, KEY_A) == [bigger]


def test_only_a_token_made_for_the_host_replaces_its_identity() -> None:
    enrolled = HostRecord(public_key=KEY_A)
    check_rebind(token(), HostRecord(), "h1")  # no identity yet: any token
    check_rebind(token("h1"), enrolled, "h1")
    with pytest.raises(Forbidden) as err:
        check_rebind(token(), enrolled, "h1")
    assert "--host-id h1" in (err.value.hint or "")


def test_a_node_acts_for_its_own_host_only() -> None:
    node = Principal.node("h1")
    assert (node.node_host, node.operator, node.operates, node.roles) == ("h1", False, False, {})
    assert not node.capabilities and node.user_id == "host:h1"
    check_agent(node, "h1", "send heartbeats")
    with pytest.raises(Forbidden) as err:
        check_agent(node, "h2", "send heartbeats")
    assert err.value.detail == {"host_id": "h2"}
    operator = Principal("u", "u@x", "t", Scope(), frozenset(Capability), {}, operator=True)
    check_agent(operator, "h2", "send heartbeats")
    user = Principal("u", "u@x", "t", Scope(), frozenset(Capability), {}, operator=False)
    with pytest.raises(Forbidden):
        check_agent(user, "h1", "send heartbeats")
    # Even a node that somehow carried the operator bit is no operator.
    forged = Principal(
        "host:h1", "", "n", Scope(), frozenset(Capability), {}, operator=True, node_host="h1"
    )
    assert not forged.operates
