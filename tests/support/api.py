"""The control-plane API on a real, freshly migrated Postgres: an in-process TestClient,
and ``Tenant``: a user with an unscoped admin token, one org, one app and one env.

Only the very first token is minted through the Tenancy service (there is no other way
to get one); everything else is created through the HTTP API itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ember.api.app import ApiSettings, create_app
from ember.api.service import Tenancy
from ember.core.tenancy import Capability, Scope
from ember.store.db import Database

_serial = itertools.count(1)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclasses.dataclass
class Api:
    """A TestClient on a running app, plus direct access to its database."""

    client: TestClient
    app: FastAPI
    database_url: str

    @property
    def svc(self) -> Tenancy:
        svc: Tenancy = self.app.state.tenancy
        return svc

    @property
    def db(self) -> Database:
        return self.svc.db

    def scalar(self, sql: str, *params: Any) -> Any:
        with self.db.connection() as conn:
            row = conn.execute(sql.encode(), params).fetchone()
        assert row is not None
        return row[0]

    def event_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM events"))

    def user(self, email: str, name: str = "") -> str:
        """An operator creates a user (no HTTP route does); returns its user_id."""
        return str(self.svc.ensure_user(email, name)["user_id"])

    def mint(
        self,
        user_id: str,
        *,
        scope: Scope | None = None,
        caps: frozenset[Capability] = frozenset(Capability),
        expires_in_days: int | None = None,
        name: str = "bootstrap",
    ) -> str:
        secret, _row = self.svc.issue_token(
            user_id,
            name,
            scope=scope or Scope(),
            capabilities=caps,
            expires_in_days=expires_in_days,
        )
        return secret

    def expire(self, token_id: str) -> None:
        """Make a token's expiry lie in the past (no sleeping for days)."""
        with self.db.connection() as conn:
            conn.execute(
                "UPDATE view_tokens SET expires_at = %s WHERE token_id = %s",
                (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1), token_id),
            )

    def tenant(self, prefix: str | None = None, *, env: str = "prod") -> Tenant:
        return Tenant.create(self, prefix or f"t{next(_serial)}", env=env)

    # HTTP shorthands that assert the expected status and return the JSON body.
    def call(
        self,
        method: str,
        path: str,
        token: str | None,
        expect: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        hdrs = {**(auth(token) if token else {}), **(headers or {})}
        response = self.client.request(method, path, json=body, headers=hdrs)
        assert response.status_code == expect, (method, path, response.status_code, response.text)
        return response.json() if response.content else None


@dataclasses.dataclass
class Tenant:
    """A user who owns org ``<p>-org`` with app ``<p>-app`` and env ``prod``; ``token`` is
    an unscoped token with every capability."""

    api: Api
    email: str
    user_id: str
    token: str
    org: str
    app: str
    env: str

    @classmethod
    def create(cls, api: Api, prefix: str, *, env: str = "prod") -> Tenant:
        email = f"{prefix}@example.com"
        user_id = api.user(email, prefix)
        token = api.mint(user_id)
        org, app = f"{prefix}-org", f"{prefix}-app"
        api.call("POST", "/v1/orgs", token, 201, {"name": org})
        api.call("POST", f"/v1/orgs/{org}/apps", token, 201, {"name": app})
        api.call("POST", f"/v1/orgs/{org}/apps/{app}/envs", token, 201, {"name": env})
        return cls(api, email, user_id, token, org, app, env)

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)

    @property
    def org_id(self) -> str:
        return str(self.api.scalar("SELECT org_id FROM view_orgs WHERE name = %s", self.org))

    @property
    def app_id(self) -> str:
        return str(
            self.api.scalar(
                "SELECT app_id FROM view_apps WHERE org_id = %s AND name = %s",
                self.org_id,
                self.app,
            )
        )

    def add_member(self, email: str, role: str) -> str:
        """Create the user (operator side) and add them to the org over HTTP."""
        user_id = self.api.user(email)
        self.api.call(
            "POST", f"/v1/orgs/{self.org}/members", self.token, 200, {"email": email, "role": role}
        )
        return user_id


def running_api(database_url: str) -> Iterator[Api]:
    app = create_app(ApiSettings(database_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, app, database_url)


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    """The API on a fresh, migrated database, lifespan running."""
    yield from running_api(database_url)


@pytest.fixture
def tenant(api: Api) -> Tenant:
    return api.tenant("acme")
