"""Tenancy: orgs, users, memberships, apps, environments and API tokens.

Events and the pure rules over them. Each aggregate is one stream:

==============================  ====================================================
stream                          events
==============================  ====================================================
``org-<name>``                  org.created, member.added, member.role_changed,
                                member.removed
``user-<sha256(email)[:32]>``   user.created, user.operator_granted,
                                user.operator_revoked
``app-<org_id>.<name>``         app.created, env.created, env.deleted, app.deleted
                                (a deleted name can be created again: new app id)
``token-<token_id>``            token.created, token.revoked
==============================  ====================================================

Keying a stream by a name makes "name unique per org" an optimistic-concurrency check
(expected version) instead of a lookup race.

**Platform operators** are users with the operator bit (``user.operator_granted``). It
is platform-wide, not an org role: hosts and other platform objects belong to no org.
An operator acts on them only through an unscoped token with the ``admin`` capability
(:func:`check_operator`), so a narrow token an operator made for CI stays narrow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
from collections.abc import Iterable, Sequence

from ember.core.errors import Conflict, EmberError, Kind, NotFound, ValidationFailed
from ember.core.events import EventData, EventRegistry, RecordedEvent
from ember.core.ids import ENV_NAME_RE, NAME_RE

REGISTRY = EventRegistry()


class Role(enum.StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    DEPLOYER = "deployer"
    VIEWER = "viewer"


class Capability(enum.StrEnum):
    READ = "read"
    DEPLOY = "deploy"
    EXEC = "exec"
    ADMIN = "admin"


ROLE_CAPABILITIES: dict[Role, frozenset[Capability]] = {
    Role.VIEWER: frozenset({Capability.READ}),
    Role.DEPLOYER: frozenset({Capability.READ, Capability.DEPLOY, Capability.EXEC}),
    Role.ADMIN: frozenset(Capability),
    Role.OWNER: frozenset(Capability),
}


# -- errors ------------------------------------------------------------------------------


class Unauthorized(EmberError):
    code = "auth.unauthorized"
    kind = Kind.UNAUTHORIZED


class Forbidden(EmberError):
    code = "auth.forbidden"
    kind = Kind.FORBIDDEN


class OrgNotFound(NotFound):
    code = "org.not_found"


class AppNotFound(NotFound):
    code = "app.not_found"


class EnvNotFound(NotFound):
    code = "env.not_found"


class MemberNotFound(NotFound):
    code = "member.not_found"


class UserNotFound(NotFound):
    code = "user.not_found"


class TokenNotFound(NotFound):
    code = "token.not_found"


class NameTaken(Conflict):
    code = "name.taken"


class AlreadyExists(Conflict):
    code = "already_exists"


class LastOwner(Conflict):
    code = "org.last_owner"


# -- events ------------------------------------------------------------------------------


@REGISTRY.register
class OrgCreated(EventData):
    event_type = "org.created"
    org_id: str
    name: str
    owner_user_id: str


@REGISTRY.register
class MemberAdded(EventData):
    event_type = "member.added"
    org_id: str
    user_id: str
    role: Role


@REGISTRY.register
class MemberRoleChanged(EventData):
    event_type = "member.role_changed"
    org_id: str
    user_id: str
    role: Role


@REGISTRY.register
class MemberRemoved(EventData):
    event_type = "member.removed"
    org_id: str
    user_id: str


@REGISTRY.register
class UserCreated(EventData):
    event_type = "user.created"
    user_id: str
    email: str
    name: str = ""


@REGISTRY.register
class UserOperatorGranted(EventData):
    """The user may operate the platform (hosts), through an unscoped admin token."""

    event_type = "user.operator_granted"
    user_id: str


@REGISTRY.register
class UserOperatorRevoked(EventData):
    event_type = "user.operator_revoked"
    user_id: str


@REGISTRY.register
class AppCreated(EventData):
    event_type = "app.created"
    app_id: str
    org_id: str
    name: str


@REGISTRY.register
class AppDeleted(EventData):
    event_type = "app.deleted"
    app_id: str
    org_id: str


@REGISTRY.register
class EnvCreated(EventData):
    event_type = "env.created"
    app_id: str
    name: str


@REGISTRY.register
class EnvDeleted(EventData):
    event_type = "env.deleted"
    app_id: str
    name: str


@REGISTRY.register
class TokenCreated(EventData):
    event_type = "token.created"
    token_id: str
    user_id: str
    kind: str
    name: str
    token_hash: str
    hint: str
    """The last four characters, so a person can recognise the token in a list."""
    org_id: str | None = None
    app_id: str | None = None
    env: str | None = None
    capabilities: list[Capability]
    expires_at: dt.datetime | None = None


@REGISTRY.register
class TokenRevoked(EventData):
    event_type = "token.revoked"
    token_id: str


# -- names and stream ids ----------------------------------------------------------------


def check_name(value: str, field: str, *, env: bool = False) -> str:
    pattern = ENV_NAME_RE if env else NAME_RE
    if not isinstance(value, str) or not pattern.match(value):
        limit = 20 if env else 40
        raise ValidationFailed(
            f"invalid {field} {value!r}",
            hint=f"use 1-{limit} characters: lowercase letters, digits and '-', starting with "
            "a letter and not ending with '-'",
            detail={"field": field},
        )
    return value


def org_stream(name: str) -> str:
    return f"org-{name}"


def user_stream(email: str) -> str:
    return "user-" + hashlib.sha256(normalise_email(email).encode()).hexdigest()[:32]


def app_stream(org_id: str, name: str) -> str:
    return f"app-{org_id}.{name}"


def token_stream(token_id: str) -> str:
    return f"token-{token_id}"


def normalise_email(email: str) -> str:
    value = email.strip().lower() if isinstance(email, str) else ""
    local, _, domain = value.partition("@")
    if (
        not local
        or not domain
        or len(value) > 254
        or any(c.isspace() for c in value)
        or not value.isprintable()  # NUL and other control characters
    ):
        raise ValidationFailed(
            f"invalid email {email!r}",
            hint="use an address like ada@example.com",
            detail={"field": "email"},
        )
    return value


# -- aggregate states (folded from a stream) ---------------------------------------------


@dataclasses.dataclass
class OrgState:
    org_id: str | None = None
    name: str | None = None
    members: dict[str, Role] = dataclasses.field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.org_id is not None


def fold_org(events: Iterable[RecordedEvent]) -> OrgState:
    state = OrgState()
    for e in events:
        d = e.data
        if e.type == "org.created":
            state.org_id, state.name = d["org_id"], d["name"]
        elif e.type in ("member.added", "member.role_changed"):
            state.members[d["user_id"]] = Role(d["role"])
        elif e.type == "member.removed":
            state.members.pop(d["user_id"], None)
    return state


@dataclasses.dataclass
class UserState:
    user_id: str | None = None
    email: str | None = None
    operator: bool = False

    @property
    def exists(self) -> bool:
        return self.user_id is not None


def fold_user(events: Iterable[RecordedEvent]) -> UserState:
    state = UserState()
    for e in events:
        d = e.data
        if e.type == "user.created":
            state = UserState(d["user_id"], d["email"], False)
        elif e.type == "user.operator_granted":
            state.operator = True
        elif e.type == "user.operator_revoked":
            state.operator = False
    return state


@dataclasses.dataclass
class AppState:
    app_id: str | None = None
    org_id: str | None = None
    name: str | None = None
    envs: list[str] = dataclasses.field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.app_id is not None


def fold_app(events: Iterable[RecordedEvent]) -> AppState:
    state = AppState()
    for e in events:
        d = e.data
        if e.type == "app.created":
            state = AppState(d["app_id"], d["org_id"], d["name"], [])
        elif e.type == "app.deleted":
            state = AppState()
        elif e.type == "env.created" and d["name"] not in state.envs:
            state.envs.append(d["name"])
        elif e.type == "env.deleted" and d["name"] in state.envs:
            state.envs.remove(d["name"])
    return state


# -- decisions ---------------------------------------------------------------------------


def decide_add_member(state: OrgState, user_id: str, role: Role) -> list[EventData]:
    assert state.org_id is not None
    current = state.members.get(user_id)
    if current == role:
        return []
    if current is None:
        return [MemberAdded(org_id=state.org_id, user_id=user_id, role=role)]
    _keep_an_owner(state, user_id, role)
    return [MemberRoleChanged(org_id=state.org_id, user_id=user_id, role=role)]


def decide_remove_member(state: OrgState, user_id: str) -> list[EventData]:
    assert state.org_id is not None
    if user_id not in state.members:
        return []
    _keep_an_owner(state, user_id, None)
    return [MemberRemoved(org_id=state.org_id, user_id=user_id)]


def _keep_an_owner(state: OrgState, user_id: str, new_role: Role | None) -> None:
    owners = [u for u, r in state.members.items() if r == Role.OWNER]
    if owners == [user_id] and new_role != Role.OWNER:
        raise LastOwner(
            "an org must keep at least one owner",
            hint="make another member an owner first",
            detail={"user_id": user_id},
        )


def decide_operator(state: UserState, operator: bool) -> list[EventData]:
    """Grant (``operator=True``) or revoke the operator bit; a repeat writes nothing."""
    if state.user_id is None:
        raise UserNotFound("no such user", hint="create it with 'ember admin create-user'")
    if state.operator == operator:
        return []
    event = UserOperatorGranted if operator else UserOperatorRevoked
    return [event(user_id=state.user_id)]


def decide_create_env(state: AppState, name: str) -> list[EventData]:
    assert state.app_id is not None
    if name in state.envs:
        return []
    return [EnvCreated(app_id=state.app_id, name=name)]


def decide_delete_env(state: AppState, name: str) -> list[EventData]:
    assert state.app_id is not None
    return [EnvDeleted(app_id=state.app_id, name=name)] if name in state.envs else []


# -- authorization -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where a token reaches: everything its user can see (all None), an org, an app of
    that org, or one environment of that app."""

    org_id: str | None = None
    app_id: str | None = None
    env: str | None = None

    def contains(self, target: Scope) -> bool:
        return all(
            mine is None or mine == theirs
            for mine, theirs in (
                (self.org_id, target.org_id),
                (self.app_id, target.app_id),
                (self.env, target.env),
            )
        )

    def overlaps(self, target: Scope) -> bool:
        """Either contains the other: an app-scoped token can see its org (to reach the
        app), but not the org's other apps."""
        return self.contains(target) or target.contains(self)


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: a user through one token, with that user's org roles; or a host's
    agent through its node identity (:meth:`node`)."""

    user_id: str
    email: str
    token_id: str
    scope: Scope
    capabilities: frozenset[Capability]
    roles: dict[str, Role]  # org_id -> role
    operator: bool = False
    """The user is a platform operator (whatever this token may do)."""
    node_host: str | None = None
    """Set for a node identity (a request signed by a host's enrolled key): the host it
    acts for. A node has no orgs, roles or capabilities and is no operator; it reaches
    its own host's agent routes only (:func:`check_agent`)."""

    @classmethod
    def node(cls, host_id: str) -> Principal:
        return cls(
            user_id=f"host:{host_id}",  # the actor recorded on the node's events
            email="",
            token_id=f"node:{host_id}",
            scope=Scope(),
            capabilities=frozenset(),
            roles={},
            operator=False,
            node_host=host_id,
        )

    @property
    def operates(self) -> bool:
        """May act on platform objects (hosts): an operator, through an unscoped token
        with the ``admin`` capability."""
        return (
            self.node_host is None
            and self.operator
            and self.scope == Scope()
            and Capability.ADMIN in self.capabilities
        )

    def effective(self, org_id: str) -> frozenset[Capability]:
        role = self.roles.get(org_id)
        return self.capabilities & ROLE_CAPABILITIES[role] if role else frozenset()

    def can_see(self, target: Scope) -> bool:
        assert target.org_id is not None
        return target.org_id in self.roles and self.scope.overlaps(target)

    def can(self, capability: Capability, target: Scope) -> bool:
        assert target.org_id is not None
        return (
            self.can_see(target)
            and self.scope.contains(target)
            and capability in self.effective(target.org_id)
        )


def check_operator(who: Principal, what: str) -> None:
    """Raise Forbidden unless ``who`` may act on platform objects (:attr:`Principal.operates`).

    Not "not found": hosts are no tenant's objects, so there is nothing to hide."""
    if who.operates:
        return
    if who.node_host is not None:
        hint = "a node identity reaches only its own host's agent routes"
    elif not who.operator:
        hint = "this needs a platform operator: 'ember admin grant-operator EMAIL'"
    else:
        hint = "use an unscoped token with the 'admin' capability"
    raise Forbidden(
        f"your token may not {what}: that is for platform operators",
        hint=hint,
        detail={"operator": who.operator},
    )


def check_agent(who: Principal, host_id: str, what: str) -> None:
    """Raise Forbidden unless ``who`` may act as the agent of ``host_id``: that host's
    node identity, or a platform operator (:func:`check_operator`)."""
    if who.node_host is None:
        check_operator(who, what)
    elif who.node_host != host_id:
        raise Forbidden(
            f"the node identity of host {who.node_host!r} may not {what} for host {host_id!r}",
            hint="a node acts for its own host only",
            detail={"host_id": host_id},
        )


def check_capabilities(values: Sequence[str]) -> frozenset[Capability]:
    try:
        caps = frozenset(Capability(v) for v in values)
    except ValueError:
        raise ValidationFailed(
            f"unknown capability in {list(values)!r}",
            hint="capabilities are: read, deploy, exec, admin",
            detail={"field": "capabilities"},
        ) from None
    if not caps:
        raise ValidationFailed(
            "a token needs at least one capability", detail={"field": "capabilities"}
        )
    return caps | {Capability.READ}
