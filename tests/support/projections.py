"""A test projection: per-stream running totals of ``counter.ticked`` (idempotent by
version guard), optionally slowed down so a test can kill it mid-batch."""

from __future__ import annotations

from typing import Any

import psycopg

from ember.core.events import RecordedEvent

DDL = """
CREATE TABLE IF NOT EXISTS test_ticks (
    stream_id text, version bigint, n bigint, PRIMARY KEY (stream_id, version));
CREATE TABLE IF NOT EXISTS test_counters (
    stream_id text PRIMARY KEY, version bigint NOT NULL, total bigint NOT NULL);
"""


class CounterProjection:
    name = "counters"
    tables = ("test_counters", "test_ticks")

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def apply(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        if event.type != "counter.ticked":
            return
        if self.delay_s:
            cur.execute("SELECT pg_sleep(%s)", (self.delay_s,))
        cur.execute(
            "INSERT INTO test_ticks VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (event.stream_id, event.stream_version, event.data["n"]),
        )
        # A running total is not idempotent by itself; the version guard makes it so.
        cur.execute(
            """INSERT INTO test_counters AS c VALUES (%s, %s, %s)
               ON CONFLICT (stream_id) DO UPDATE
               SET version = EXCLUDED.version, total = c.total + EXCLUDED.total
               WHERE c.version < EXCLUDED.version""",
            (event.stream_id, event.stream_version, event.data["n"]),
        )


def create_tables(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(DDL.encode())
