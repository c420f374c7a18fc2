"""Workload console logs in Postgres (table ``instance_logs``, ADR-0016).

Logs are not domain events: they never enter the event log, nothing folds them, and old
lines are deleted. Three rules make them cheap to write and safe to follow:

* **Order.** Ids come from one sequence, but a reader asks for an *environment's* lines
  "after id N". Writers of one environment take turns on a transaction-level advisory
  lock taken before their ids are drawn, so within an environment ids are handed out and
  committed in the same order, and no line can later appear below an id a reader has
  already passed. (Lines of different environments interleave freely.)
* **Wake-ups.** An insert notifies :data:`CHANNEL` when it commits; the notification only
  wakes followers (ember.api.logs.LogFeed), who then read the table.
* **Retention** (:class:`Retention`). Every ``prune_every``-th id (when a batch's ids
  cross a multiple of it) the writer also deletes its environment's lines beyond the
  newest ``keep_lines``, and everyone's lines received more than ``keep_days`` ago. So a
  busy environment is pruned often and a quiet one rarely, in proportion to what it
  writes; either may exceed ``keep_lines`` by about ``prune_every`` lines in between.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Final

import psycopg

from ember.core.errors import ValidationFailed
from ember.store.db import Database
from ember.store.errors import LogsBusy

__all__ = ["CHANNEL", "LogPage", "LogSource", "LogStore", "NewLine", "Retention", "StoredLine"]

CHANNEL: Final = "ember_logs"
_LOCK_SEED: Final = 3  # hashtextextended seeds: 0 idempotency keys, 1 streams, 2 leases

_INSERT_SQL = f"""
WITH ins AS (
    INSERT INTO instance_logs
        (org_id, app_id, env, process, instance_id, host_id, stream, ts, line)
    SELECT %(org_id)s, %(app_id)s, %(env)s, %(process)s, %(instance_id)s, %(host_id)s,
           l.stream, l.ts, l.line
    FROM unnest(%(streams)s::text[], %(tss)s::timestamptz[], %(lines)s::text[])
         WITH ORDINALITY AS l(stream, ts, line, ord)
    ORDER BY l.ord
    RETURNING id
)
SELECT min(id), max(id), pg_notify('{CHANNEL}', %(app_id)s || '/' || %(env)s) FROM ins
"""

# The env's lines beyond its newest ``keep`` (the index finds the (keep+1)-th newest id).
_PRUNE_ENV_SQL = """
DELETE FROM instance_logs WHERE app_id = %(app_id)s AND env = %(env)s AND id <= (
    SELECT id FROM instance_logs WHERE app_id = %(app_id)s AND env = %(env)s
    ORDER BY id DESC OFFSET %(keep)s LIMIT 1
)
"""

# Lines received before the cut-off, whichever env: ids grow with received_at, so the
# first recent id (found by walking the primary key from the oldest line, through exactly
# the lines to delete) bounds them.
_PRUNE_OLD_SQL = """
DELETE FROM instance_logs WHERE id < coalesce(
    (SELECT id FROM instance_logs WHERE received_at >= now() - make_interval(secs => %s)
     ORDER BY id LIMIT 1),
    (SELECT max(id) + 1 FROM instance_logs)
)
"""

_COLUMNS = "id, ts, stream, process, instance_id, line"
_FILTERS = """
app_id = %(app_id)s AND env = %(env)s AND received_at >= %(not_before)s
AND (%(process)s::text IS NULL OR process = %(process)s)
AND (%(instance)s::text IS NULL OR instance_id = %(instance)s)
AND (%(since)s::timestamptz IS NULL OR ts >= %(since)s)
"""
_NEWEST_SQL = f"""
SELECT {_COLUMNS} FROM (
    SELECT {_COLUMNS} FROM instance_logs WHERE {_FILTERS} ORDER BY id DESC LIMIT %(limit)s
) newest ORDER BY id
"""
_AFTER_SQL = f"""
SELECT {_COLUMNS} FROM instance_logs WHERE {_FILTERS} AND id > %(after)s
ORDER BY id LIMIT %(limit)s
"""
_HEAD_SQL = "SELECT coalesce(max(id), 0) FROM instance_logs WHERE app_id = %s AND env = %s"
_HEADS_SQL = """
SELECT k.app_id, k.env,
       coalesce((SELECT max(l.id) FROM instance_logs l
                 WHERE l.app_id = k.app_id AND l.env = k.env), 0)
FROM unnest(%s::text[], %s::text[]) AS k(app_id, env)
"""


@dataclasses.dataclass(frozen=True)
class Retention:
    keep_lines: int = 10_000
    """Per environment: the newest lines kept."""
    keep_days: float = 7.0
    """Lines received longer ago than this are deleted."""
    prune_every: int = 1000
    """Prune when a batch's ids cross a multiple of this."""

    def __post_init__(self) -> None:
        if self.keep_lines < 1 or self.keep_days <= 0 or self.prune_every < 1:
            raise ValidationFailed(
                "log retention needs keep_lines >= 1, keep_days > 0 and prune_every >= 1",
                detail={"field": "retention"},
            )

    def due(self, first_id: int, last_id: int) -> bool:
        """Did the ids ``first_id..last_id`` cross a multiple of ``prune_every``?"""
        return (first_id - 1) // self.prune_every != last_id // self.prune_every


@dataclasses.dataclass(frozen=True)
class LogSource:
    """The instance a batch of lines comes from, as the control plane knows it."""

    org_id: str
    app_id: str
    env: str
    process: str
    instance_id: str
    host_id: str


@dataclasses.dataclass(frozen=True)
class NewLine:
    ts: dt.datetime
    stream: str
    line: str


@dataclasses.dataclass(frozen=True)
class StoredLine:
    id: int
    ts: dt.datetime
    stream: str
    process: str
    instance_id: str
    line: str


@dataclasses.dataclass(frozen=True)
class LogPage:
    lines: list[StoredLine]
    cursor: int
    """Read on from here: the last line returned, or (when fewer lines than asked for
    matched) the environment's newest id at the time of the read."""


class LogStore:
    def __init__(self, db: Database, retention: Retention | None = None) -> None:
        self.db = db
        self.retention = retention or Retention()

    def append(self, source: LogSource, lines: Sequence[NewLine]) -> tuple[int, int]:
        """Store ``lines`` in order; return their first and last id, ``(0, 0)`` when there
        were none. Prunes when due (see the module docstring)."""
        if not lines:
            return 0, 0
        params = {
            **dataclasses.asdict(source),
            "streams": [ln.stream for ln in lines],
            "tss": [ln.ts for ln in lines],
            "lines": [ln.line for ln in lines],
        }
        with self.db.connection() as conn:
            try:
                with conn.transaction():
                    # Writers of one env queue on its lock, each holding a pooled
                    # connection: a bounded wait, then 503 — the agent ships again next
                    # pass — rather than a pool drained for every other request.
                    conn.execute("SET LOCAL lock_timeout = '2s'")
                    _lock_env(conn, source.app_id, source.env)
                    row = conn.execute(_INSERT_SQL, params).fetchone()
                    assert row is not None and row[0] is not None
                    first, last = int(row[0]), int(row[1])
                    due = self.retention.due(first, last)
                    if due:
                        self._prune_env(conn, source.app_id, source.env)
            except psycopg.errors.LockNotAvailable as exc:
                raise LogsBusy(
                    "this environment's logs are being written by others",
                    hint="the agent ships them again on its next pass",
                ) from exc
            if due:
                # Every env's old lines, in a transaction of its own: not while holding
                # this env's lock, and not taking other envs' rows under it.
                with conn.transaction():
                    self._prune_old(conn)
        return first, last

    def prune(self, app_id: str, env: str) -> None:
        """Apply the retention to ``env`` (and the age limit to everyone) now."""
        with self.db.connection() as conn:
            with conn.transaction():
                _lock_env(conn, app_id, env)
                self._prune_env(conn, app_id, env)
            with conn.transaction():
                self._prune_old(conn)

    def _prune_env(self, conn: psycopg.Connection, app_id: str, env: str) -> None:
        conn.execute(
            _PRUNE_ENV_SQL,
            {"app_id": app_id, "env": env, "keep": self.retention.keep_lines},
        )

    def _prune_old(self, conn: psycopg.Connection) -> None:
        # One age sweep at a time: two sweeps deleting the same rows could deadlock, and
        # the second has nothing left to do anyway.
        got = conn.execute(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('logs:age', %s))", (_LOCK_SEED,)
        ).fetchone()
        if got and got[0]:
            conn.execute(_PRUNE_OLD_SQL, (self.retention.keep_days * 86400.0,))

    def read(
        self,
        app_id: str,
        env: str,
        *,
        not_before: dt.datetime,
        process: str | None = None,
        instance: str | None = None,
        since: dt.datetime | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> LogPage:
        """Without ``after``: the newest ``limit`` matching lines. With it: the oldest
        ``limit`` matching lines after that id. Oldest first either way. Lines received
        before ``not_before`` (the env's creation: an env deleted and made again under the
        same name starts empty) are not read."""
        params: dict[str, Any] = {
            "app_id": app_id,
            "env": env,
            "not_before": not_before,
            "process": process,
            "instance": instance,
            "since": since,
            "after": after,
            "limit": limit,
        }
        with self.db.connection() as conn, conn.transaction():
            # One snapshot: the head read with the lines is exactly what they were read up to.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = conn.execute(_NEWEST_SQL if after is None else _AFTER_SQL, params).fetchall()
            head_row = conn.execute(_HEAD_SQL, (app_id, env)).fetchone()
        lines = [StoredLine(*r) for r in rows]
        head = int(head_row[0]) if head_row else 0
        if after is not None and len(lines) == limit:
            cursor = lines[-1].id  # more may match after it
        else:
            cursor = max(head, after or 0, lines[-1].id if lines else 0)
        return LogPage(lines, cursor)

    def head(self, app_id: str, env: str) -> int:
        """The environment's newest id (0 when it has no lines)."""
        with self.db.connection() as conn:
            row = conn.execute(_HEAD_SQL, (app_id, env)).fetchone()
        return int(row[0]) if row else 0

    def heads(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """:meth:`head` of several environments ``(app_id, env)`` in one query."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        with self.db.connection() as conn:
            rows = conn.execute(
                _HEADS_SQL, ([k[0] for k in wanted], [k[1] for k in wanted])
            ).fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}


def _lock_env(conn: psycopg.Connection, app_id: str, env: str) -> None:
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))",
        (f"logs:{app_id}/{env}", _LOCK_SEED),
    )
