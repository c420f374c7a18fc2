"""``view_streams``: one row per stream — its kind, version and last event.

Answers "what exists and what happened to it last" for `ember admin events streams`
without scanning the log; also the model for writing an idempotent projection.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ember.core.events import RecordedEvent


class StreamsProjection:
    name = "streams"
    tables = ("view_streams",)

    def apply(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        kind = event.stream_id.split("-", 1)[0]
        # The version guard makes redelivery a no-op: an older event never overwrites.
        cur.execute(
            """
            INSERT INTO view_streams AS v (stream_id, kind, version, last_type, last_position,
                                           first_recorded_at, last_recorded_at)
            VALUES (%(s)s, %(k)s, %(v)s, %(t)s, %(p)s, %(at)s, %(at)s)
            ON CONFLICT (stream_id) DO UPDATE SET
                version = EXCLUDED.version, last_type = EXCLUDED.last_type,
                last_position = EXCLUDED.last_position,
                last_recorded_at = EXCLUDED.last_recorded_at
            WHERE v.version < EXCLUDED.version
            """,
            {
                "s": event.stream_id,
                "k": kind,
                "v": event.stream_version,
                "t": event.type,
                "p": event.position,
                "at": event.recorded_at,
            },
        )
