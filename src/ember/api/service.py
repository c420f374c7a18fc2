"""Tenancy commands and queries: the application layer between the API and the store.

Commands load an aggregate's stream, decide with the pure rules of ember.core.tenancy,
append with the version they read (a concurrent change is a conflict, never a lost
update), then wait until the tenancy view has folded the append so the caller reads its
own write. Queries read views only. Every method that takes a Principal authorises:
an object the caller may not see is "not found", exactly like a missing one.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ember.core import tokens
from ember.core.errors import ConcurrencyConflict, Unavailable, ValidationFailed
from ember.core.events import Cursor, EventData, Metadata, NewEvent, RecordedEvent
from ember.core.ids import ENV_NAME_RE, NAME_RE, new_id
from ember.core.tenancy import (
    AppCreated,
    AppDeleted,
    AppNotFound,
    Capability,
    EnvNotFound,
    Forbidden,
    MemberNotFound,
    NameTaken,
    OrgCreated,
    OrgNotFound,
    OrgState,
    Principal,
    Role,
    Scope,
    TokenCreated,
    TokenNotFound,
    TokenRevoked,
    Unauthorized,
    UserCreated,
    UserNotFound,
    app_stream,
    check_name,
    decide_add_member,
    decide_create_env,
    decide_delete_env,
    decide_operator,
    decide_remove_member,
    fold_app,
    fold_org,
    fold_user,
    normalise_email,
    org_stream,
    token_stream,
    user_stream,
)
from ember.store.db import Database
from ember.store.eventlog import EventLog
from ember.store.projections import ProjectionRunner

S = TypeVar("S")
Row = dict[str, Any]
PROJECTION = "tenancy"
_DECIDE_ATTEMPTS = 5


class Tenancy:
    def __init__(self, db: Database, log: EventLog, runner: ProjectionRunner) -> None:
        self.db = db
        self.log = log
        self.runner = runner

    # -- plumbing --------------------------------------------------------------------

    def _load(
        self, stream: str, fold: Callable[[Iterable[RecordedEvent]], S]
    ) -> tuple[S, int, Cursor | None]:
        """The stream folded, its version, and the cursor of its last event."""
        events = self.log.read_stream_all(stream)
        last = events[-1] if events else None
        return fold(events), (last.stream_version if last else 0), (last.cursor if last else None)

    def execute(
        self,
        stream: str,
        fold: Callable[[Iterable[RecordedEvent]], S],
        decide: Callable[[S], list[EventData]],
        actor: str,
        projection: str = PROJECTION,
    ) -> tuple[S, list[EventData]]:
        """Load, decide, append at the version read; on a concurrent change, decide again
        on the new state (so racing identical requests all succeed, none answers 409).
        Then fold ``projection`` far enough for the caller to read its own write — or,
        when nothing was written, the events the decision was taken on (a concurrent
        request may have appended them without folding them yet: "exists" in the log must
        not read as missing in the view). Returns the state decided on and the events
        written."""
        for attempt in range(_DECIDE_ATTEMPTS):
            state, version, seen = self._load(stream, fold)
            events = decide(state)
            if not events:
                if seen is not None:
                    self.sync(seen, projection)
                return state, events
            meta = Metadata(actor=actor)
            try:
                result = self.log.append(stream, version, [NewEvent.of(e, meta) for e in events])
            except ConcurrencyConflict:
                if attempt == _DECIDE_ATTEMPTS - 1:
                    raise
                continue
            self.sync(result.cursor, projection)
            return state, events
        raise AssertionError("unreachable")

    def sync(self, cursor: Cursor, projection: str = PROJECTION, timeout: float = 10.0) -> None:
        """Fold ``projection`` up to ``cursor`` (read-your-writes for the caller)."""
        deadline = time.monotonic() + timeout
        while True:
            self.runner.catch_up(projection)
            if self.runner.cursor(projection) >= cursor:
                return
            if time.monotonic() > deadline:
                raise Unavailable(
                    "the views did not catch up with the write in time",
                    hint="the write is recorded; retry the read in a moment",
                )
            time.sleep(0.005)

    def _one(self, sql: str, params: Iterable[Any]) -> Row | None:
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(sql.encode(), tuple(params))
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip([c.name for c in cur.description or ()], row, strict=True))

    def query(self, sql: str, params: Iterable[Any]) -> list[Row]:
        """Rows of a read-only query on the views, as dicts."""
        with self.db.connection() as conn, conn.cursor() as cur:
            cur.execute(sql.encode(), tuple(params))
            names = [c.name for c in cur.description or ()]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    # -- authentication --------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthorized(
                "no API token given", hint="run 'ember login' or set EMBER_API_TOKEN"
            )
        if not tokens.looks_valid(token):
            raise Unauthorized("that is not an Ember API token", hint="check for copy errors")
        row = self._one(
            "SELECT t.*, u.email, u.operator FROM view_tokens t JOIN view_users u USING (user_id) "
            "WHERE t.token_hash = %s",
            [tokens.digest(token)],
        )
        now = dt.datetime.now(dt.UTC)
        if row is None or row["revoked_at"] is not None:
            raise Unauthorized("the API token is unknown or revoked", hint="create a new token")
        if row["expires_at"] is not None and row["expires_at"] <= now:
            raise Unauthorized("the API token has expired", hint="create a new token")
        roles = {
            r["org_id"]: Role(r["role"])
            for r in self.query(
                "SELECT org_id, role FROM view_members WHERE user_id = %s", [row["user_id"]]
            )
        }
        return Principal(
            user_id=row["user_id"],
            email=row["email"],
            token_id=row["token_id"],
            scope=Scope(row["org_id"], row["app_id"], row["env"]),
            capabilities=frozenset(Capability(c) for c in row["capabilities"]),
            roles=roles,
            operator=bool(row["operator"]),
        )

    # -- users and tokens (operators and self-service) -------------------------------

    def ensure_user(self, email: str, name: str = "", *, actor: str = "system") -> Row:
        email = normalise_email(email)
        self.execute(
            user_stream(email),
            lambda events: any(True for _ in events),
            lambda exists: (
                [] if exists else [UserCreated(user_id=new_id("usr"), email=email, name=name)]
            ),
            actor,
        )
        row = self._one("SELECT * FROM view_users WHERE email = %s", [email])
        assert row is not None
        return row

    def user_by_email(self, email: str) -> Row | None:
        return self._one("SELECT * FROM view_users WHERE email = %s", [normalise_email(email)])

    def set_operator(
        self, email: str, operator: bool, *, actor: str = "system"
    ) -> tuple[Row, bool]:
        """Grant or revoke the platform-operator bit (`ember admin`; no principal, no
        authorisation). Returns the user and whether anything changed."""
        email = normalise_email(email)
        if self.user_by_email(email) is None:
            raise UserNotFound(
                f"no user with email {email!r}",
                hint="create it with 'ember admin create-user'",
                detail={"email": email},
            )
        _, events = self.execute(
            user_stream(email), fold_user, lambda state: decide_operator(state, operator), actor
        )
        row = self.user_by_email(email)
        assert row is not None
        return row, bool(events)

    def issue_token(
        self,
        user_id: str,
        name: str,
        *,
        scope: Scope,
        capabilities: frozenset[Capability],
        expires_in_days: int | None = None,
        kind: tokens.TokenKind = tokens.TokenKind.USER,
        actor: str = "system",
    ) -> tuple[str, Row]:
        """Create a token; return the secret (shown once) and its view row."""
        secret = tokens.generate(kind)
        expires = (
            dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days)
            if expires_in_days
            else None
        )
        created = TokenCreated(
            token_id=new_id("tok"),
            user_id=user_id,
            kind=kind.value,
            name=name,
            token_hash=tokens.digest(secret),
            hint=secret[-4:],
            org_id=scope.org_id,
            app_id=scope.app_id,
            env=scope.env,
            capabilities=sorted(capabilities | {Capability.READ}),
            expires_at=expires,
        )
        # A fresh id: the stream is new, so a conflict here could only be a bug.
        self.execute(token_stream(created.token_id), bool, lambda _: [created], actor)
        row = self.token(created.token_id)
        assert row is not None
        return secret, row

    def scope_for(
        self, org: str | None, app: str | None, env: str | None, *, who: Principal | None
    ) -> Scope:
        """The token scope that names ``org`` / ``app`` / ``env``. With ``who``, only what
        that caller can see resolves (the rest is not found); without (operators), all."""
        if (app and not org) or (env and not app):
            raise ValidationFailed(
                "a token scoped to an app needs its org, and one scoped to an env its app",
                detail={"field": "scope"},
            )
        if not org:
            return Scope()
        if who is not None:
            org_id = self.visible_org(who, org)["org_id"]
            app_id = self.visible_app(who, org, app)["app_id"] if app else None
            if app and env:
                self.visible_env(who, org, app, env)
            return Scope(org_id, app_id, env)
        org_row = self.org_by_name(org)
        if org_row is None:
            raise OrgNotFound(f"no org {org!r}", detail={"org": org})
        app_row = self.app_by_name(org_row["org_id"], app) if app else None
        if app and app_row is None:
            raise AppNotFound(f"no app {app!r} in {org!r}", detail={"app": app})
        if (
            app_row
            and env
            and not self.query(
                "SELECT 1 FROM view_envs WHERE app_id = %s AND name = %s", [app_row["app_id"], env]
            )
        ):
            raise EnvNotFound(f"no environment {env!r} in app {app!r}", detail={"env": env})
        return Scope(org_row["org_id"], app_row["app_id"] if app_row else None, env)

    def create_token(
        self,
        who: Principal,
        name: str,
        *,
        org: str | None,
        app: str | None,
        env: str | None,
        capabilities: frozenset[Capability],
        expires_in_days: int | None,
    ) -> tuple[str, Row]:
        """A user makes a token for themselves: never wider than the token they use."""
        scope = self.scope_for(org, app, env, who=who)
        if not who.scope.contains(scope):
            raise Forbidden(
                "a new token cannot reach further than the token creating it",
                detail={"field": "scope"},
            )
        wanted = capabilities | {Capability.READ}
        if not wanted <= who.capabilities:
            raise Forbidden(
                "a new token cannot have capabilities the creating token lacks",
                detail={"missing": sorted(wanted - who.capabilities)},
            )
        return self.issue_token(
            who.user_id,
            name,
            scope=scope,
            capabilities=wanted,
            expires_in_days=expires_in_days,
            actor=who.user_id,
        )

    def token(self, token_id: str) -> Row | None:
        return self._one(
            """SELECT t.*, o.name AS org_name, a.name AS app_name FROM view_tokens t
               LEFT JOIN view_orgs o ON o.org_id = t.org_id
               LEFT JOIN view_apps a ON a.app_id = t.app_id WHERE t.token_id = %s""",
            [token_id],
        )

    def list_tokens(self, who: Principal, after: str | None, limit: int) -> list[Row]:
        return self.query(
            """SELECT t.*, o.name AS org_name, a.name AS app_name FROM view_tokens t
               LEFT JOIN view_orgs o ON o.org_id = t.org_id
               LEFT JOIN view_apps a ON a.app_id = t.app_id
               WHERE t.user_id = %s AND t.token_id > %s ORDER BY t.token_id LIMIT %s""",
            [who.user_id, after or "", limit],
        )

    def revoke_token(self, who: Principal, token_id: str) -> Row:
        row = self.token(token_id)
        if row is None or row["user_id"] != who.user_id:
            raise TokenNotFound(f"no token {token_id!r}", detail={"token": token_id})
        target = Scope(row["org_id"], row["app_id"], row["env"])
        wider = not who.scope.contains(target) or not set(row["capabilities"]) <= who.capabilities
        if token_id != who.token_id and wider:
            raise Forbidden(
                "a token can revoke itself and tokens no wider than itself",
                hint="revoke it with a token whose scope and capabilities cover it",
                detail={"token": token_id},
            )
        if row["revoked_at"] is None:
            self.execute(
                token_stream(token_id),
                list,
                lambda seen: (
                    []
                    if any(e.type == "token.revoked" for e in seen)
                    else [TokenRevoked(token_id=token_id)]
                ),
                who.user_id,
            )
            row = self.token(token_id)
            assert row is not None
        return row

    # -- orgs and members --------------------------------------------------------------

    def create_org(
        self, who: Principal | None, name: str, *, owner_id: str | None = None
    ) -> tuple[Row, bool]:
        """Create an org owned by the caller; return it and whether it was created now.
        The same call again answers the same org."""
        check_name(name, "name")
        owner = who.user_id if who else owner_id
        assert owner is not None
        if who is not None and who.scope != Scope():
            raise Forbidden(
                "creating an org needs a token that is not limited to an org",
                hint="create one with 'ember tokens create --name NAME' from an unscoped token",
            )

        def decide(state: OrgState) -> list[EventData]:
            if not state.exists:
                org_id = new_id("org")
                return [
                    OrgCreated(org_id=org_id, name=name, owner_user_id=owner),
                    *decide_add_member(OrgState(org_id, name, {}), owner, Role.OWNER),
                ]
            if state.members.get(owner) == Role.OWNER:
                return []
            raise NameTaken(
                f"the org name {name!r} is taken",
                hint="pick another name",
                detail={"field": "name"},
            )

        _, events = self.execute(org_stream(name), fold_org, decide, owner)
        return self._org_row(owner, name), bool(events)

    def _org_row(self, user_id: str, name: str) -> Row:
        row = self._one(
            "SELECT o.*, m.role FROM view_orgs o JOIN view_members m ON m.org_id = o.org_id "
            "AND m.user_id = %s WHERE o.name = %s",
            [user_id, name],
        )
        assert row is not None
        return row

    def visible_org(self, who: Principal, name: str) -> Row:
        # A string that is no valid name names nothing (and may not even be storable text:
        # a NUL makes Postgres fail), so it is not looked up.
        row = (
            self._one(
                "SELECT o.*, m.role FROM view_orgs o JOIN view_members m ON m.org_id = o.org_id "
                "AND m.user_id = %s WHERE o.name = %s",
                [who.user_id, name],
            )
            if NAME_RE.match(name)
            else None
        )
        if row is None or not who.can_see(Scope(row["org_id"])):
            raise OrgNotFound(
                f"no org {name!r}", hint="'ember orgs' lists yours", detail={"org": name}
            )
        return row

    def list_orgs(self, who: Principal, after: str | None, limit: int) -> list[Row]:
        # The token's scope filters in SQL, before LIMIT: filtering a page afterwards would
        # shorten it, and a short page ends the listing (next_cursor is null).
        rows = self.query(
            "SELECT o.*, m.role FROM view_orgs o JOIN view_members m ON m.org_id = o.org_id "
            "WHERE m.user_id = %s AND o.name > %s AND (%s::text IS NULL OR o.org_id = %s) "
            "ORDER BY o.name LIMIT %s",
            [who.user_id, after or "", who.scope.org_id, who.scope.org_id, limit],
        )
        return [r for r in rows if who.can_see(Scope(r["org_id"]))]

    def require(self, who: Principal, cap: Capability, target: Scope, what: str) -> None:
        if not who.can(cap, target):
            raise Forbidden(
                f"your token may not {what}",
                hint=f"this needs the '{cap.value}' capability and a role that grants it",
                detail={"capability": cap.value},
            )

    def list_members(self, who: Principal, org: str, after: str | None, limit: int) -> list[Row]:
        org_row = self.visible_org(who, org)
        return self.query(
            "SELECT m.*, u.email FROM view_members m JOIN view_users u USING (user_id) "
            "WHERE m.org_id = %s AND u.email > %s ORDER BY u.email LIMIT %s",
            [org_row["org_id"], after or "", limit],
        )

    def set_member(self, who: Principal, org: str, email: str, role: Role) -> Row:
        org_row = self.visible_org(who, org)
        self.require(who, Capability.ADMIN, Scope(org_row["org_id"]), "manage members")
        user = self.user_by_email(email)
        if user is None:
            raise UserNotFound(
                f"no user with email {email!r}",
                hint="an operator creates users: 'ember admin create-user'",
                detail={"email": email},
            )

        def decide(state: OrgState) -> list[EventData]:
            touches_owner = role == Role.OWNER or state.members.get(user["user_id"]) == Role.OWNER
            if touches_owner and who.roles.get(org_row["org_id"]) != Role.OWNER:
                raise Forbidden(
                    "only an owner can grant or change the owner role",
                    detail={"role": role.value},
                )
            return decide_add_member(state, user["user_id"], role)

        self.execute(org_stream(org), fold_org, decide, who.user_id)
        return self._member(org_row["org_id"], user["user_id"])

    def remove_member(self, who: Principal, org: str, user_id: str) -> None:
        org_row = self.visible_org(who, org)
        # Rights first: a caller who may not manage members learns nothing about them.
        self.require(who, Capability.ADMIN, Scope(org_row["org_id"]), "manage members")
        member = self._member(org_row["org_id"], user_id, missing_ok=True)
        if member is None:
            raise MemberNotFound(f"no member {user_id!r} in {org!r}", detail={"user_id": user_id})

        def decide(state: OrgState) -> list[EventData]:
            is_owner = state.members.get(user_id) == Role.OWNER
            if is_owner and who.roles.get(org_row["org_id"]) != Role.OWNER:
                raise Forbidden("only an owner can remove an owner")
            return decide_remove_member(state, user_id)

        self.execute(org_stream(org), fold_org, decide, who.user_id)

    def operator_set_member(self, org: str, user_id: str, role: Role, actor: str) -> None:
        """For operators (`ember admin`): no principal, no authorisation."""

        def decide(state: OrgState) -> list[EventData]:
            if not state.exists:
                raise OrgNotFound(f"no org {org!r}", detail={"org": org})
            return decide_add_member(state, user_id, role)

        self.execute(org_stream(org), fold_org, decide, actor)

    def org_by_name(self, name: str) -> Row | None:
        return self._one("SELECT * FROM view_orgs WHERE name = %s", [name])

    def app_by_name(self, org_id: str, name: str) -> Row | None:
        return self._one("SELECT * FROM view_apps WHERE org_id = %s AND name = %s", [org_id, name])

    def _member(self, org_id: str, user_id: str, missing_ok: bool = False) -> Row:
        row = self._one(
            "SELECT m.*, u.email FROM view_members m JOIN view_users u USING (user_id) "
            "WHERE m.org_id = %s AND m.user_id = %s",
            [org_id, user_id],
        )
        if row is None and not missing_ok:
            raise MemberNotFound(f"no member {user_id!r}", detail={"user_id": user_id})
        return row  # type: ignore[return-value]

    # -- apps and envs -----------------------------------------------------------------

    def create_app(self, who: Principal, org: str, name: str) -> tuple[Row, bool]:
        """Create an app; return it and whether it was created now (False: it existed)."""
        check_name(name, "name")
        org_row = self.visible_org(who, org)
        self.require(who, Capability.ADMIN, Scope(org_row["org_id"]), "create apps")
        _, events = self.execute(
            app_stream(org_row["org_id"], name),
            fold_app,
            lambda state: (
                []
                if state.exists
                else [AppCreated(app_id=new_id("app"), org_id=org_row["org_id"], name=name)]
            ),
            who.user_id,
        )
        return self.visible_app(who, org, name), bool(events)

    def visible_app(self, who: Principal, org: str, name: str) -> Row:
        org_row = self.visible_org(who, org)
        row = (
            self._one(
                "SELECT a.*, %s AS org_name, coalesce((SELECT array_agg(e.name ORDER BY e.name) "
                "FROM view_envs e WHERE e.app_id = a.app_id), '{}') AS envs "
                "FROM view_apps a WHERE a.org_id = %s AND a.name = %s",
                [org, org_row["org_id"], name],
            )
            if NAME_RE.match(name)
            else None
        )
        if row is None or not who.can_see(Scope(row["org_id"], row["app_id"])):
            raise AppNotFound(
                f"no app {name!r} in org {org!r}",
                hint="'ember apps list' shows the apps you can see",
                detail={"app": name},
            )
        return row

    def list_apps(self, who: Principal, org: str, after: str | None, limit: int) -> list[Row]:
        org_row = self.visible_org(who, org)
        rows = self.query(
            "SELECT a.*, %s AS org_name, coalesce((SELECT array_agg(e.name ORDER BY e.name) "
            "FROM view_envs e WHERE e.app_id = a.app_id), '{}') AS envs "
            "FROM view_apps a WHERE a.org_id = %s AND a.name > %s "
            "AND (%s::text IS NULL OR a.app_id = %s) ORDER BY a.name LIMIT %s",
            [org, org_row["org_id"], after or "", who.scope.app_id, who.scope.app_id, limit],
        )
        return [r for r in rows if who.can_see(Scope(r["org_id"], r["app_id"]))]

    def delete_app(self, who: Principal, org: str, name: str) -> None:
        app = self.visible_app(who, org, name)
        self.require(who, Capability.ADMIN, Scope(app["org_id"], app["app_id"]), "delete apps")
        self.execute(
            app_stream(app["org_id"], name),
            fold_app,
            lambda state: (
                [AppDeleted(app_id=app["app_id"], org_id=app["org_id"])]
                if state.app_id == app["app_id"]
                else []
            ),
            who.user_id,
        )

    def create_env(self, who: Principal, org: str, app: str, name: str) -> tuple[Row, bool]:
        check_name(name, "name", env=True)
        app_row = self.visible_app(who, org, app)
        self.require(
            who,
            Capability.ADMIN,
            Scope(app_row["org_id"], app_row["app_id"]),
            "create environments",
        )
        _, events = self.execute(
            app_stream(app_row["org_id"], app),
            fold_app,
            lambda state: decide_create_env(state, name) if state.exists else [],
            who.user_id,
        )
        return self.visible_env(who, org, app, name), bool(events)

    def visible_env(self, who: Principal, org: str, app: str, name: str) -> Row:
        app_row = self.visible_app(who, org, app)
        row = (
            self._one(
                "SELECT e.*, %s AS app_name FROM view_envs e WHERE e.app_id = %s AND e.name = %s",
                [app, app_row["app_id"], name],
            )
            if ENV_NAME_RE.match(name)
            else None
        )
        if row is None or not who.can_see(Scope(app_row["org_id"], app_row["app_id"], name)):
            raise EnvNotFound(f"no environment {name!r} in app {app!r}", detail={"env": name})
        return row

    def list_envs(
        self, who: Principal, org: str, app: str, after: str | None, limit: int
    ) -> list[Row]:
        app_row = self.visible_app(who, org, app)
        rows = self.query(
            "SELECT e.*, %s AS app_name FROM view_envs e WHERE e.app_id = %s AND e.name > %s "
            "AND (%s::text IS NULL OR e.name = %s) ORDER BY e.name LIMIT %s",
            [app, app_row["app_id"], after or "", who.scope.env, who.scope.env, limit],
        )
        return [
            r for r in rows if who.can_see(Scope(app_row["org_id"], app_row["app_id"], r["name"]))
        ]

    def delete_env(self, who: Principal, org: str, app: str, name: str) -> None:
        env = self.visible_env(who, org, app, name)
        app_row = self.visible_app(who, org, app)
        self.require(
            who,
            Capability.ADMIN,
            Scope(app_row["org_id"], app_row["app_id"], env["name"]),
            "delete environments",
        )
        self.execute(
            app_stream(app_row["org_id"], app),
            fold_app,
            lambda state: decide_delete_env(state, name) if state.exists else [],
            who.user_id,
        )
