from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.core import tokens
from ember.core.errors import ValidationFailed
from ember.core.tenancy import (
    Capability,
    LastOwner,
    MemberAdded,
    MemberRemoved,
    MemberRoleChanged,
    OrgState,
    Principal,
    Role,
    Scope,
    check_capabilities,
    check_name,
    decide_add_member,
    decide_remove_member,
    normalise_email,
    user_stream,
)


def test_generated_tokens_have_the_documented_shape_and_checksum() -> None:
    token = tokens.generate()
    assert token.startswith("ember_pat_") and len(token) == len("ember_pat_") + 36
    assert tokens.looks_valid(token)
    assert tokens.kind_of(token) is tokens.TokenKind.USER
    assert tokens.kind_of(tokens.generate(tokens.TokenKind.AGENT)) is tokens.TokenKind.AGENT
    assert tokens.digest(token) != tokens.digest(tokens.generate())


@given(st.integers(min_value=10, max_value=45), st.sampled_from("0123456789abcXYZ"))
def test_a_single_changed_character_fails_the_checksum(index: int, char: str) -> None:
    token = tokens.generate()
    mutated = token[:index] + char + token[index + 1 :]
    if mutated != token:
        assert not tokens.looks_valid(mutated)


@pytest.mark.parametrize("bad", ["", "ember_pat_short", "github_pat_" + "a" * 36, "x" * 46])
def test_non_tokens_are_rejected(bad: str) -> None:
    assert not tokens.looks_valid(bad)


def test_scope_containment_and_overlap() -> None:
    org, app, env = Scope("o1"), Scope("o1", "a1"), Scope("o1", "a1", "prod")
    assert Scope().contains(env) and org.contains(app) and app.contains(env)
    assert not env.contains(app) and not app.contains(Scope("o1", "a2"))
    assert app.overlaps(org) and org.overlaps(app)
    assert not app.overlaps(Scope("o1", "a2")) and not org.overlaps(Scope("o2"))


def _who(scope: Scope, caps: set[Capability], role: Role | None) -> Principal:
    return Principal(
        user_id="u",
        email="u@x",
        token_id="t",
        scope=scope,
        capabilities=frozenset(caps),
        roles={"o1": role} if role else {},
    )


@pytest.mark.parametrize(
    ("scope", "caps", "role", "target", "see", "admin"),
    [
        (Scope(), set(Capability), Role.OWNER, Scope("o1", "a1"), True, True),
        (Scope(), set(Capability), Role.VIEWER, Scope("o1", "a1"), True, False),
        (Scope(), {Capability.READ}, Role.OWNER, Scope("o1", "a1"), True, False),
        (Scope(), set(Capability), None, Scope("o1", "a1"), False, False),
        (Scope("o1", "a1"), set(Capability), Role.ADMIN, Scope("o1"), True, False),
        (Scope("o1", "a1"), set(Capability), Role.ADMIN, Scope("o1", "a1"), True, True),
        (Scope("o1", "a1"), set(Capability), Role.ADMIN, Scope("o1", "a2"), False, False),
        (Scope("o2"), set(Capability), Role.ADMIN, Scope("o1"), False, False),
    ],
)
def test_principal_rules(
    scope: Scope,
    caps: set[Capability],
    role: Role | None,
    target: Scope,
    see: bool,
    admin: bool,
) -> None:
    who = _who(scope, caps, role)
    assert who.can_see(target) is see
    assert who.can(Capability.ADMIN, target) is admin


def test_deployer_can_deploy_but_not_administer() -> None:
    who = _who(Scope(), set(Capability), Role.DEPLOYER)
    assert who.can(Capability.DEPLOY, Scope("o1", "a1"))
    assert who.can(Capability.EXEC, Scope("o1", "a1"))
    assert not who.can(Capability.ADMIN, Scope("o1", "a1"))


def test_members_change_through_events_and_keep_an_owner() -> None:
    state = OrgState("o1", "acme", {"u1": Role.OWNER})
    assert decide_add_member(state, "u2", Role.VIEWER) == [
        MemberAdded(org_id="o1", user_id="u2", role=Role.VIEWER)
    ]
    assert decide_add_member(state, "u1", Role.OWNER) == []
    with pytest.raises(LastOwner):
        decide_add_member(state, "u1", Role.ADMIN)
    with pytest.raises(LastOwner):
        decide_remove_member(state, "u1")
    two = OrgState("o1", "acme", {"u1": Role.OWNER, "u2": Role.OWNER})
    assert decide_add_member(two, "u1", Role.ADMIN) == [
        MemberRoleChanged(org_id="o1", user_id="u1", role=Role.ADMIN)
    ]
    assert decide_remove_member(two, "u2") == [MemberRemoved(org_id="o1", user_id="u2")]
    assert decide_remove_member(two, "nobody") == []


@pytest.mark.parametrize("name", ["a", "hello", "my-app-2", "a" * 40])
def test_valid_names(name: str) -> None:
    assert check_name(name, "name") == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "Hello", "1app", "a" * 41, "a_b", "é"])
def test_invalid_names_name_the_field(name: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        check_name(name, "name")
    assert err.value.detail == {"field": "name"}


def test_env_names_are_shorter() -> None:
    assert check_name("a" * 20, "name", env=True)
    with pytest.raises(ValidationFailed):
        check_name("a" * 21, "name", env=True)


def test_emails_normalise_and_key_their_stream() -> None:
    assert normalise_email("  Ada@Example.COM ") == "ada@example.com"
    assert user_stream("Ada@example.com") == user_stream("ada@EXAMPLE.com")
    for bad in ["", "no-at", "@x", "a b@x"]:
        with pytest.raises(ValidationFailed):
            normalise_email(bad)


def test_capabilities_always_include_read_and_reject_unknowns() -> None:
    assert check_capabilities(["deploy"]) == {Capability.DEPLOY, Capability.READ}
    with pytest.raises(ValidationFailed):
        check_capabilities(["root"])
    with pytest.raises(ValidationFailed):
        check_capabilities([])
