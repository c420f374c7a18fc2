"""Request and response bodies of the control-plane API (docs/specs/openapi.json).

Shared by the API (ember.api) and its client (ember.client): one definition of the wire.
Field names are a contract: add fields freely, never rename or remove one.
"""

from __future__ import annotations

import datetime as dt
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ember.core.tenancy import Capability, Role

T = TypeVar("T")


class Body(BaseModel):
    """Request bodies reject unknown fields: a typo is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    code: str = Field(examples=["app.not_found"])
    message: str
    detail: dict[str, object] = Field(default_factory=dict)
    hint: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= to get the next page; null on the last page."
    )


class Health(BaseModel):
    status: str


class OrgCreate(Body):
    name: str = Field(min_length=1, max_length=40, examples=["acme"])


class Org(BaseModel):
    id: str
    name: str
    role: Role = Field(description="The caller's role in this org.")
    created_at: dt.datetime


class MemberAdd(Body):
    email: str = Field(min_length=3, max_length=254)
    role: Role


class MemberUpdate(Body):
    role: Role


class Member(BaseModel):
    user_id: str
    email: str
    role: Role
    added_at: dt.datetime


class AppCreate(Body):
    name: str = Field(min_length=1, max_length=40, examples=["hello"])


class App(BaseModel):
    id: str
    org: str
    name: str
    envs: list[str]
    created_at: dt.datetime


class EnvCreate(Body):
    name: str = Field(min_length=1, max_length=20, examples=["prod"])


class Env(BaseModel):
    app: str
    name: str
    created_at: dt.datetime


class TokenScope(BaseModel):
    org: str | None = None
    app: str | None = None
    env: str | None = None


class TokenCreate(Body):
    name: str = Field(min_length=1, max_length=100, examples=["ci-deploy"])
    org: str | None = Field(None, description="Limit the token to this org.")
    app: str | None = Field(None, description="Limit the token to this app (needs org).")
    env: str | None = Field(None, description="Limit the token to this env (needs app).")
    capabilities: list[Capability] = Field(
        default_factory=lambda: [Capability.READ], min_length=1, max_length=4
    )
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class Token(BaseModel):
    id: str
    name: str
    kind: str
    hint: str = Field(description="Last four characters of the token.")
    scope: TokenScope
    capabilities: list[Capability]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenCreated(Token):
    token: str = Field(description="The secret. Shown once; only its hash is stored.")


class WhoAmI(BaseModel):
    user_id: str
    email: str
    token: Token
    orgs: list[Org]


class ImageRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repository: str = Field(min_length=1, max_length=255, examples=["local/hello"])
    digest: str = Field(
        min_length=71,
        max_length=71,
        examples=["sha256:" + "0" * 64],
        description="The image manifest's digest in the platform registry.",
    )


class ReleaseCreate(Body):
    image: ImageRef
    manifest: str = Field(
        min_length=1,
        max_length=256 * 1024,
        description="The ember.toml text; the server validates it and derives the env's "
        "normalized manifest and its hash.",
    )
    auto_rollback: bool = Field(
        False,
        description="If the release's rollout halts (new instances fail or miss the "
        "deadline), the controller releases the previous release again.",
    )


class RollbackRequest(Body):
    version: int | None = Field(
        None, ge=1, description="The release to return to; default: the one before the live one."
    )


class Release(BaseModel):
    app: str
    env: str
    version: int
    image: ImageRef
    manifest_hash: str
    secrets_version: int
    author: str
    reason: str = Field(description="deploy | rollback")
    rollback_of: int | None
    status: str = Field(description="active | superseded | created")
    created_at: dt.datetime


class ReleaseDetail(Release):
    manifest: dict[str, object] = Field(description="The normalized manifest of this env.")


class Platform(BaseModel):
    version: str
    registry_url: str | None = Field(
        description="Where `ember deploy` pushes images; null when not configured."
    )
