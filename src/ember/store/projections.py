"""Projections: fold the event log into view tables, checkpointed in the same transaction.

A projection handles a batch inside one transaction that also moves its checkpoint, so a
crash mid-batch rolls back both and the batch is simply delivered again. Handlers must
also be idempotent on their own (guard rows by stream version): delivery is at least once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import psycopg
from psycopg import sql

from ember.core.errors import NotFound
from ember.core.events import ZERO, Cursor, EventRegistry, RecordedEvent
from ember.store.db import Database, cap_stall
from ember.store.eventlog import read_all_on


class Projection(Protocol):
    """A named fold from events to view tables."""

    @property
    def name(self) -> str:
        """Unique and stable: it keys the checkpoint."""

    @property
    def tables(self) -> Sequence[str]:
        """View tables this projection owns: emptied on rebuild, hashed by ``digest``."""

    def apply(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        """Fold one event into the views. Must be idempotent; ignore unknown types."""


@dataclasses.dataclass(frozen=True)
class ProjectionStatus:
    name: str
    cursor: Cursor
    lag_events: int
    updated_at: Any


class ProjectionRunner:
    """Runs projections against the event log; safe to run in several processes at once
    (an advisory lock per projection makes them take turns)."""

    def __init__(
        self, db: Database, registry: EventRegistry, projections: Sequence[Projection]
    ) -> None:
        self.db = db
        self.registry = registry
        self.projections = {p.name: p for p in projections}

    def get(self, name: str) -> Projection:
        try:
            return self.projections[name]
        except KeyError:
            raise NotFound(
                f"no projection named {name!r}",
                hint=f"known projections: {', '.join(sorted(self.projections)) or 'none'}",
                detail={"projection": name},
            ) from None

    def run_once(self, name: str, *, batch_size: int = 500) -> int:
        """Apply at most one batch; return how many events it folded."""
        projection = self.get(name)
        with self.db.connection() as conn, conn.transaction():
            cursor = _lock_checkpoint(conn, name)
            events = read_all_on(conn, self.registry, cursor, batch_size)
            if not events:
                return 0
            with conn.cursor() as cur:
                for event in events:
                    projection.apply(cur, event)
            _save_checkpoint(conn, name, events[-1].cursor)
        return len(events)

    def catch_up(self, name: str | None = None, *, batch_size: int = 500) -> dict[str, int]:
        """Run until every (or the named) projection has folded everything readable."""
        names = [name] if name else sorted(self.projections)
        totals = dict.fromkeys(names, 0)
        for n in names:
            while folded := self.run_once(n, batch_size=batch_size):
                totals[n] += folded
        return totals

    def run_forever(
        self, *, batch_size: int = 500, idle_s: float = 0.2, stop: Callable[[], bool] = bool
    ) -> None:
        """The projector loop of ``ember server controller``."""
        while not stop():
            if not sum(self.catch_up(batch_size=batch_size).values()):
                time.sleep(idle_s)

    def rebuild(self, name: str | None = None, *, batch_size: int = 1000) -> dict[str, int]:
        """Empty the views and replay from zero, atomically per projection: readers see
        the old views until the rebuilt ones commit."""
        totals: dict[str, int] = {}
        for n in [name] if name else sorted(self.projections):
            with self.db.connection() as conn, conn.transaction():
                totals[n] = self._rebuild_on(conn, n, batch_size)
        return totals

    def verify(self, name: str | None = None) -> dict[str, tuple[str, str]]:
        """Compare each live view with a rebuild from zero, without changing anything:
        the rebuild happens in a transaction that is rolled back. Returns
        ``{name: (live_digest, rebuilt_digest)}``; equal digests mean the views are right."""
        out: dict[str, tuple[str, str]] = {}
        for n in [name] if name else sorted(self.projections):
            with self.db.connection() as conn, conn.transaction():
                # One snapshot for the whole check: both sides then see exactly the same
                # events, even while other transactions append and commit.
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                # Fold what the live view has not seen yet, so both sides cover the same
                # events; then compare with a replay from zero, and roll it all back.
                self._fold_pending(conn, n)
                live = self._digest_on(conn, n)
                self._rebuild_on(conn, n, 1000)
                out[n] = (live, self._digest_on(conn, n))
                raise psycopg.Rollback
        return out

    def _fold_pending(self, conn: psycopg.Connection, name: str) -> None:
        projection = self.get(name)
        cursor = _lock_checkpoint(conn, name)
        with conn.cursor() as cur:
            while events := read_all_on(conn, self.registry, cursor, 1000):
                for event in events:
                    projection.apply(cur, event)
                cursor = events[-1].cursor

    def _rebuild_on(self, conn: psycopg.Connection, name: str, batch_size: int) -> int:
        projection = self.get(name)
        _lock_checkpoint(conn, name)
        # DELETE, not TRUNCATE: TRUNCATE's exclusive lock would block every reader of the
        # views until the rebuild commits; with DELETE they keep reading the old rows.
        for table in projection.tables:
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
        cursor, count = ZERO, 0
        with conn.cursor() as cur:
            while events := read_all_on(conn, self.registry, cursor, batch_size):
                for event in events:
                    projection.apply(cur, event)
                cursor = events[-1].cursor
                count += len(events)
        _save_checkpoint(conn, name, cursor)
        return count

    def cursor(self, name: str) -> Cursor:
        """How far ``name`` has folded the log."""
        self.get(name)
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT xid::text::bigint, position FROM projection_checkpoints WHERE name = %s",
                (name,),
            ).fetchone()
        return Cursor(int(row[0]), int(row[1])) if row else ZERO

    def status(self) -> list[ProjectionStatus]:
        out = []
        with self.db.connection() as conn:
            for name in sorted(self.projections):
                row = conn.execute(
                    "SELECT xid::text::bigint, position, updated_at FROM projection_checkpoints "
                    "WHERE name = %s",
                    (name,),
                ).fetchone()
                cursor = Cursor(int(row[0]), int(row[1])) if row else ZERO
                lag = conn.execute(
                    "SELECT count(*) FROM events WHERE (xid, position) > (%s::text::xid8, %s) "
                    "AND xid < pg_snapshot_xmin(pg_current_snapshot())",
                    (str(cursor.xid), cursor.position),
                ).fetchone()
                out.append(
                    ProjectionStatus(name, cursor, int(lag[0]) if lag else 0, row and row[2])
                )
        return out

    def digest(self, name: str) -> str:
        """A hash of the projection's views, rows in full-row order: equal digests mean
        byte-identical views."""
        with self.db.connection() as conn:
            return self._digest_on(conn, name)

    def _digest_on(self, conn: psycopg.Connection, name: str) -> str:
        h = hashlib.sha256()
        for table in self.get(name).tables:
            h.update(table.encode())
            query = sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(sql.Identifier(table))
            for (line,) in conn.execute(query):
                h.update(line.encode() + b"\n")
        return h.hexdigest()


def first_delivery(cur: psycopg.Cursor[Any], guard_table: str, event: RecordedEvent) -> bool:
    """Record that ``event`` was folded, in a projection's ``(stream_id, version)`` guard
    table; False when it (or a later event of its stream) was folded already — the
    redelivery to ignore. Events of a stream arrive in version order (events.md §3)."""
    cur.execute(
        sql.SQL(
            "INSERT INTO {t} AS s VALUES (%s, %s) ON CONFLICT (stream_id) DO UPDATE "
            "SET version = EXCLUDED.version WHERE s.version < EXCLUDED.version RETURNING 1"
        ).format(t=sql.Identifier(guard_table)),
        (event.stream_id, event.stream_version),
    )
    return cur.fetchone() is not None


def _lock_checkpoint(conn: psycopg.Connection, name: str) -> Cursor:
    # An advisory lock, not SELECT ... FOR UPDATE: it serialises runners without giving
    # this transaction an xid, which would hold back every reader's horizon. A runner that
    # stalls while holding it (a paused process) is cut off by the server instead of
    # blocking every other runner: its work is only ever a rolled-back batch.
    cap_stall(conn)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(name),))
    row = conn.execute(
        "SELECT xid::text::bigint, position FROM projection_checkpoints WHERE name = %s", (name,)
    ).fetchone()
    return Cursor(int(row[0]), int(row[1])) if row else ZERO


def _save_checkpoint(conn: psycopg.Connection, name: str, cursor: Cursor) -> None:
    conn.execute(
        "INSERT INTO projection_checkpoints (name, xid, position, updated_at) "
        "VALUES (%s, %s::text::xid8, %s, now()) "
        "ON CONFLICT (name) DO UPDATE SET xid = EXCLUDED.xid, position = EXCLUDED.position, "
        "updated_at = EXCLUDED.updated_at",
        (name, str(cursor.xid), cursor.position),
    )


def _lock_key(name: str) -> int:
    return 0x454D_0000_0000 | zlib.crc32(name.encode())
