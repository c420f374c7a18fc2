"""The ``tenancy`` projection: orgs, users, members, apps, envs and tokens as tables.

Redelivery is harmless: ``view_tenancy_streams`` records the last version folded per
stream, and older or equal versions are skipped.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ember.core.events import RecordedEvent
from ember.store.projections import first_delivery


class TenancyProjection:
    name = "tenancy"
    tables = (
        "view_tenancy_streams",
        "view_orgs",
        "view_users",
        "view_members",
        "view_apps",
        "view_envs",
        "view_tokens",
    )
    _kinds = ("org", "user", "app", "token")

    def apply(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        if event.stream_id.split("-", 1)[0] not in self._kinds:
            return
        if not first_delivery(cur, "view_tenancy_streams", event):
            return
        handler = getattr(self, "_" + event.type.replace(".", "_"), None)
        if handler is not None:
            handler(cur, event.data, event.recorded_at)

    def _org_created(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute("INSERT INTO view_orgs VALUES (%s, %s, %s)", (d["org_id"], d["name"], at))

    def _member_added(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "INSERT INTO view_members VALUES (%s, %s, %s, %s)",
            (d["org_id"], d["user_id"], d["role"], at),
        )

    def _member_role_changed(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "UPDATE view_members SET role = %s WHERE org_id = %s AND user_id = %s",
            (d["role"], d["org_id"], d["user_id"]),
        )

    def _member_removed(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "DELETE FROM view_members WHERE org_id = %s AND user_id = %s",
            (d["org_id"], d["user_id"]),
        )

    def _user_created(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "INSERT INTO view_users (user_id, email, name, created_at, operator) "
            "VALUES (%s, %s, %s, %s, false)",
            (d["user_id"], d["email"], d.get("name", ""), at),
        )

    def _user_operator_granted(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute("UPDATE view_users SET operator = true WHERE user_id = %s", (d["user_id"],))

    def _user_operator_revoked(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute("UPDATE view_users SET operator = false WHERE user_id = %s", (d["user_id"],))

    def _app_created(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "INSERT INTO view_apps VALUES (%s, %s, %s, %s)",
            (d["app_id"], d["org_id"], d["name"], at),
        )

    def _app_deleted(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute("DELETE FROM view_envs WHERE app_id = %s", (d["app_id"],))
        cur.execute("DELETE FROM view_apps WHERE app_id = %s", (d["app_id"],))

    def _env_created(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute("INSERT INTO view_envs VALUES (%s, %s, %s)", (d["app_id"], d["name"], at))

    def _env_deleted(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "DELETE FROM view_envs WHERE app_id = %s AND name = %s", (d["app_id"], d["name"])
        )

    def _token_created(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            """INSERT INTO view_tokens (token_id, token_hash, user_id, kind, name, hint, org_id,
                   app_id, env, capabilities, created_at, expires_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                d["token_id"],
                d["token_hash"],
                d["user_id"],
                d["kind"],
                d["name"],
                d["hint"],
                d.get("org_id"),
                d.get("app_id"),
                d.get("env"),
                sorted(d["capabilities"]),
                at,
                d.get("expires_at"),
            ),
        )

    def _token_revoked(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "UPDATE view_tokens SET revoked_at = %s WHERE token_id = %s AND revoked_at IS NULL",
            (at, d["token_id"]),
        )
