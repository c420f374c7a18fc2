"""View rows -> wire models."""

from __future__ import annotations

from typing import Any

from ember.wire import models as w

Row = dict[str, Any]


def org(row: Row) -> w.Org:
    return w.Org(id=row["org_id"], name=row["name"], role=row["role"], created_at=row["created_at"])


def member(row: Row) -> w.Member:
    return w.Member(
        user_id=row["user_id"], email=row["email"], role=row["role"], added_at=row["added_at"]
    )


def app(row: Row) -> w.App:
    return w.App(
        id=row["app_id"],
        org=row["org_name"],
        name=row["name"],
        envs=list(row["envs"] or []),
        created_at=row["created_at"],
    )


def env(row: Row) -> w.Env:
    return w.Env(app=row["app_name"], name=row["name"], created_at=row["created_at"])


def token(row: Row) -> w.Token:
    return w.Token(
        id=row["token_id"],
        name=row["name"],
        kind=row["kind"],
        hint=row["hint"],
        scope=w.TokenScope(org=row.get("org_name"), app=row.get("app_name"), env=row["env"]),
        capabilities=row["capabilities"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


def dump(model: Any) -> Any:
    return model.model_dump(mode="json")


def release(row: Row, app: str, *, detail: bool = False) -> w.Release:
    fields = {
        "app": app,
        "env": row["env"],
        "version": row["version"],
        "image": w.ImageRef(repository=row["repository"], digest=row["image_digest"]),
        "manifest_hash": row["manifest_hash"],
        "secrets_version": row["secrets_version"],
        "author": row["author"],
        "reason": row["reason"],
        "rollback_of": row["rollback_of"],
        "status": row["status"],
        "created_at": row["created_at"],
    }
    return w.ReleaseDetail(**fields, manifest=row["manifest"]) if detail else w.Release(**fields)
