"""The ``releases`` projection: one row per release, with which one is live per env."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ember.core.events import RecordedEvent
from ember.store.projections import first_delivery


class ReleasesProjection:
    name = "releases"
    tables = ("view_releases_streams", "view_releases")

    def apply(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        if not event.stream_id.startswith("releases-"):
            return
        if not first_delivery(cur, "view_releases_streams", event):
            return
        d = event.data
        if event.type == "release.created":
            cur.execute(
                """INSERT INTO view_releases VALUES
                   (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'created', %s)""",
                (
                    d["app_id"],
                    d["env"],
                    d["version"],
                    d["repository"],
                    d["image_digest"],
                    d["manifest_hash"],
                    Jsonb(d["manifest"]),
                    d.get("secrets_version", 0),
                    d["author"],
                    d["reason"],
                    d.get("rollback_of"),
                    event.recorded_at,
                ),
            )
        elif event.type == "release.promoted":
            cur.execute(
                """UPDATE view_releases SET previous_active = (
                       SELECT version FROM view_releases
                       WHERE app_id = %s AND env = %s AND status = 'active'),
                       auto_rollback = %s
                   WHERE app_id = %s AND env = %s AND version = %s""",
                (
                    d["app_id"],
                    d["env"],
                    bool(d.get("auto_rollback", False)),
                    d["app_id"],
                    d["env"],
                    d["version"],
                ),
            )
            cur.execute(
                """UPDATE view_releases SET status = CASE WHEN version = %s THEN 'active'
                                                         ELSE 'superseded' END
                   WHERE app_id = %s AND env = %s AND (version = %s OR status = 'active')""",
                (d["version"], d["app_id"], d["env"], d["version"]),
            )
