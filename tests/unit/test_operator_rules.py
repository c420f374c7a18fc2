"""The platform-operator rules of ember.core.tenancy: the user stream's fold, the grant /
revoke decision, and who may act on platform objects."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from ember.core.events import RecordedEvent
from ember.core.tenancy import (
    Capability,
    Forbidden,
    Principal,
    Role,
    Scope,
    UserNotFound,
    UserOperatorGranted,
    UserOperatorRevoked,
    UserState,
    check_operator,
    decide_operator,
    fold_user,
)


def recorded(version: int, type_: str, data: dict[str, Any]) -> RecordedEvent:
    return RecordedEvent(
        position=version,
        xid=1,
        stream_id="user-x",
        stream_version=version,
        type=type_,
        schema_version=1,
        data=data,
        metadata={},
        recorded_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )


def test_fold_and_decide_grant_and_revoke() -> None:
    created = recorded(1, "user.created", {"user_id": "usr_1", "email": "a@b", "name": ""})
    state = fold_user([created])
    assert (state.user_id, state.operator) == ("usr_1", False)
    assert decide_operator(state, False) == []
    assert decide_operator(state, True) == [UserOperatorGranted(user_id="usr_1")]
    granted = recorded(2, "user.operator_granted", {"user_id": "usr_1"})
    assert fold_user([created, granted]).operator is True
    assert decide_operator(fold_user([created, granted]), True) == []
    assert decide_operator(fold_user([created, granted]), False) == [
        UserOperatorRevoked(user_id="usr_1")
    ]
    revoked = recorded(3, "user.operator_revoked", {"user_id": "usr_1"})
    assert fold_user([created, granted, revoked]).operator is False
    with pytest.raises(UserNotFound):
        decide_operator(UserState(), True)


def who(*, operator: bool, scope: Scope, caps: set[Capability]) -> Principal:
    return Principal(
        user_id="u",
        email="u@x",
        token_id="t",
        scope=scope,
        capabilities=frozenset(caps),
        roles={"o1": Role.OWNER},
        operator=operator,
    )


@pytest.mark.parametrize(
    ("operator", "scope", "caps", "operates"),
    [
        (True, Scope(), set(Capability), True),
        (True, Scope(), {Capability.READ, Capability.ADMIN}, True),
        (True, Scope(), {Capability.READ, Capability.DEPLOY}, False),
        (True, Scope("o1"), set(Capability), False),
        (True, Scope("o1", "a1", "prod"), set(Capability), False),
        (False, Scope(), set(Capability), False),  # an org owner is no operator
    ],
)
def test_only_an_operator_through_an_unscoped_admin_token_operates(
    operator: bool, scope: Scope, caps: set[Capability], operates: bool
) -> None:
    principal = who(operator=operator, scope=scope, caps=caps)
    assert principal.operates is operates
    if operates:
        check_operator(principal, "list hosts")
    else:
        with pytest.raises(Forbidden) as raised:
            check_operator(principal, "list hosts")
        assert raised.value.code == "auth.forbidden"
        assert ("grant-operator" in (raised.value.hint or "")) is (not operator)
