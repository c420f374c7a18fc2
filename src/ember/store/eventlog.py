"""The event log on Postgres (docs/specs/events.md).

Appends are one SQL statement (read the stream head, insert at contiguous versions, wake
subscribers) so the common case costs one round trip. ``UNIQUE(stream_id,
stream_version)`` is the optimistic-concurrency guard: a lost race is a
:class:`ConcurrencyConflict`, never a silent overwrite.

Reading "all" is commit-safe: rows are returned in ``(xid, position)`` order and only below
``pg_snapshot_xmin(pg_current_snapshot())``, the oldest transaction still running. Every
transaction below that horizon has ended, so nothing can later appear behind a cursor —
no skipped events, and no wall-clock gap timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import psycopg
from psycopg.types.json import Jsonb

from ember.core.errors import (
    ConcurrencyConflict,
    EmberError,
    IdempotencyKeyReused,
    ValidationFailed,
)
from ember.core.events import (
    ANY,
    ZERO,
    AppendResult,
    Cursor,
    EventRegistry,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    check_expected_version,
    check_stream_id,
    request_hash,
)
from ember.store.db import STALL_MS, Database, cap_stall, connect
from ember.store.errors import Fenced

CHANNEL: Final = "ember_events"
MAX_EVENTS_PER_APPEND: Final = 1000
MAX_PAGE: Final = 10_000

_COLUMNS = (
    "position, xid::text::bigint, stream_id, stream_version, type, schema_version, data, "
    "metadata, recorded_at"
)

# One statement: head of the stream, the insert (only when the head is as expected), the
# wake-up. Returns the head seen and what was written (NULLs when nothing was).
_APPEND_TEMPLATE = """
WITH last AS (
    SELECT stream_version AS v, xid FROM events WHERE stream_id = %(stream)s
    ORDER BY stream_version DESC LIMIT 1
), head AS (
    SELECT coalesce((SELECT v FROM last), 0) AS v, (SELECT xid FROM last) AS xid
), ins AS (
    INSERT INTO events (stream_id, stream_version, type, schema_version, data, metadata)
    SELECT %(stream)s, head.v + e.ord, e.type, e.sv, e.data, e.meta
    FROM head, {rows} AS e(type, sv, data, meta, ord)
    WHERE (%(expected)s::bigint IS NULL OR head.v = %(expected)s::bigint)
      -- Readers order by (xid, position): a stream's next event must come from a younger
      -- transaction than its previous one, or they would read the stream out of order.
      AND (head.xid IS NULL OR head.xid < pg_current_xact_id())
    ORDER BY e.ord
    RETURNING position, stream_version, xid
)
SELECT head.v, min(ins.stream_version), max(ins.stream_version),
       min(ins.position), max(ins.position), min(ins.xid::text::bigint),
       CASE WHEN count(ins.position) > 0 THEN pg_notify('{channel}', %(stream)s) END
FROM head LEFT JOIN ins ON true GROUP BY head.v
"""
# Arrays cost the client real CPU to build and escape, so one event (the common case)
# goes as plain parameters; a batch goes as parallel arrays.
_APPEND_ONE_SQL = _APPEND_TEMPLATE.format(
    channel=CHANNEL,
    rows="(VALUES (%(types)s::text, %(svs)s::int, %(datas)s::jsonb, %(metas)s::jsonb, 1))",
)
_APPEND_MANY_SQL = _APPEND_TEMPLATE.format(
    channel=CHANNEL,
    rows="unnest(%(types)s::text[], %(svs)s::int[], %(datas)s::jsonb[], %(metas)s::jsonb[]) "
    "WITH ORDINALITY",
)

_READ_ALL_SQL = f"""
SELECT {_COLUMNS} FROM events
WHERE (xid, position) > (%s::text::xid8, %s)
  AND xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY events.xid, events.position  -- qualified: the output column "xid" is a bigint cast
LIMIT %s
"""


@dataclasses.dataclass(frozen=True)
class StreamAppend:
    stream_id: str
    expected_version: ExpectedVersion
    events: Sequence[NewEvent]


@dataclasses.dataclass(frozen=True)
class Fence:
    """A lease held at an epoch (ember.store.leases)."""

    name: str
    holder: str
    epoch: int
    stall_ms: int = STALL_MS
    """A writer stalled this long inside its fenced transaction (paused, hung) is cut off
    by the server, so its locks cannot block a takeover."""


def lease_lock_key(name: str) -> str:
    return f"lease:{name}"


def check_fence(conn: psycopg.Connection, fence: Fence) -> None:
    """Inside the caller's transaction: refuse unless ``fence`` is the current, unexpired
    lease. The shared advisory lock makes a takeover (which takes it exclusively) wait for
    writes already past this check, and writes after the takeover see the new epoch —
    without giving this transaction an xid before its appends read the stream heads."""
    cap_stall(conn, fence.stall_ms)
    conn.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 2))",
        (lease_lock_key(fence.name),),
    )
    row = conn.execute(
        "SELECT epoch FROM leases WHERE name = %s AND holder = %s AND epoch = %s "
        "AND expires_at > clock_timestamp()",
        (fence.name, fence.holder, fence.epoch),
    ).fetchone()
    if row is None:
        raise Fenced(
            f"lease {fence.name!r} epoch {fence.epoch} is no longer held by this process",
            hint="another controller is the leader now; this one steps down",
            detail={"lease": fence.name, "epoch": fence.epoch},
        )


class EventLog:
    """Append to and read from the event log. Thread-safe: connections come from the pool."""

    def __init__(self, db: Database, registry: EventRegistry) -> None:
        self.db = db
        self.registry = registry

    # -- writing -------------------------------------------------------------------------

    def append(
        self,
        stream_id: str,
        expected_version: ExpectedVersion,
        events: Sequence[NewEvent],
        *,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        """Append ``events`` atomically at the next versions of ``stream_id``.

        ``expected_version`` is the version the caller last read (0: the stream must be
        new) or ``ANY``. Raises ConcurrencyConflict when the stream is elsewhere,
        UnknownEventType / InvalidEvent for a malformed event (nothing is written).
        """
        check_stream_id(stream_id)
        check_expected_version(expected_version)
        if not events:
            raise ValidationFailed("an append needs at least one event", detail={"field": "events"})
        if len(events) > MAX_EVENTS_PER_APPEND:
            raise ValidationFailed(
                f"at most {MAX_EVENTS_PER_APPEND} events per append", detail={"field": "events"}
            )
        if idempotency_key is not None and (
            not 1 <= len(idempotency_key) <= 200 or "\x00" in idempotency_key
        ):
            raise ValidationFailed(
                "an idempotency key has 1-200 characters", detail={"field": "idempotency_key"}
            )
        checked = [self.registry.validate(e) for e in events]
        params = _append_params(stream_id, expected_version, checked)
        with self.db.connection() as conn:
            if idempotency_key is None:
                return _append_once(conn, stream_id, expected_version, params)
            return _append_idempotent(
                conn,
                stream_id=stream_id,
                expected=expected_version,
                params=params,
                key=idempotency_key,
                fingerprint=request_hash(stream_id, expected_version, checked),
            )

    def append_many(
        self, appends: Sequence[StreamAppend], *, fence: Fence | None = None
    ) -> list[AppendResult]:
        """Append to several streams in one transaction: all of it or nothing.

        Each stream is checked against its expected version (a stale plan conflicts as a
        whole). With ``fence``, the write is kept only while the lease ``fence`` names is
        still held at that epoch (:class:`Fenced` otherwise): a leader that lost its lease
        while paused cannot write after waking up.
        """
        streams = [a.stream_id for a in appends]
        if len(set(streams)) != len(streams):
            raise ValidationFailed("one append per stream", detail={"field": "appends"})
        prepared = []
        for a in appends:
            check_stream_id(a.stream_id)
            check_expected_version(a.expected_version)
            if not a.events or len(a.events) > MAX_EVENTS_PER_APPEND:
                raise ValidationFailed(
                    f"1-{MAX_EVENTS_PER_APPEND} events per stream", detail={"field": "events"}
                )
            checked = [self.registry.validate(e) for e in a.events]
            prepared.append((a, _append_params(a.stream_id, a.expected_version, checked)))
        if not prepared:
            return []
        with self.db.connection() as conn, conn.transaction():
            if fence is not None:
                check_fence(conn, fence)
            for a in sorted(appends, key=lambda a: a.stream_id):
                if a.expected_version == ANY:
                    _lock_stream(conn, a.stream_id)
            return [_run_append(conn, a.stream_id, a.expected_version, p) for a, p in prepared]

    # -- reading -------------------------------------------------------------------------

    def stream_version(self, stream_id: str) -> int:
        """The stream's current version; 0 when it has no events."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = %s",
                (check_stream_id(stream_id),),
            ).fetchone()
        return int(row[0]) if row else 0

    def read_stream(
        self, stream_id: str, *, from_version: int = 1, limit: int = MAX_PAGE
    ) -> list[RecordedEvent]:
        """Events of one stream in version order, starting at ``from_version``."""
        check_stream_id(stream_id)
        with self.db.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE stream_id = %s AND stream_version >= %s "
                "ORDER BY stream_version LIMIT %s",
                (stream_id, from_version, _page(limit)),
            ).fetchall()
        return [self._decode(r) for r in rows]

    def read_stream_all(self, stream_id: str) -> list[RecordedEvent]:
        """Every event of one stream, page by page: what a decision folds (one page
        would cut a long stream short and append at the wrong version)."""
        events: list[RecordedEvent] = []
        while True:
            page = self.read_stream(stream_id, from_version=len(events) + 1)
            events += page
            if len(page) < MAX_PAGE:
                return events

    def read_all(self, after: Cursor = ZERO, *, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events after ``after`` in commit-safe order."""
        with self.db.connection() as conn:
            return read_all_on(conn, self.registry, after, limit)

    def head(self) -> Cursor:
        """The cursor of the last event a reader can consume right now."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT xid::text::bigint, position FROM events "
                "WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) "
                "ORDER BY events.xid DESC, events.position DESC LIMIT 1"
            ).fetchone()
        return Cursor(int(row[0]), int(row[1])) if row else ZERO

    @contextlib.contextmanager
    def wakeups(self) -> Iterator[Callable[[float], None]]:
        """``wait(timeout)``: returns as soon as an append commits (a NOTIFY on
        :data:`CHANNEL`) or after ``timeout`` — for a loop that should react to new events
        at once yet still run on a timer. A NOTIFY is only a hint: the loop reads what
        it needs itself. While the database is away it is a plain timer, and it listens
        again on a later call once the database is back."""
        waker = _Wakeups(self.db.conninfo)
        try:
            yield waker.wait
        finally:
            waker.close()

    def subscribe(
        self,
        after: Cursor = ZERO,
        *,
        page_size: int = 1000,
        idle_poll_s: float = 1.0,
        stop: Any = None,
    ) -> Iterator[RecordedEvent]:
        """Yield every event after ``after``, forever (or until ``stop.is_set()``).

        LISTEN/NOTIFY only wakes the reader; the data always comes from ``read_all``.
        While committed events sit behind an in-flight transaction the reader re-checks
        the horizon on a short, growing timer: a transaction that rolls back sends no
        notification, and the events behind it must still be delivered.
        """
        conn = connect(self.db.conninfo, autocommit=True)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            cursor = after
            held_wait = 0.002
            while stop is None or not stop.is_set():
                page = read_all_on(conn, self.registry, cursor, page_size)
                for event in page:
                    yield event
                    cursor = event.cursor
                if len(page) == page_size:
                    continue
                if held_back(conn, cursor):
                    timeout = held_wait
                    held_wait = min(held_wait * 2, 0.25)
                else:
                    timeout = idle_poll_s
                    held_wait = 0.002
                wait_for_notify(conn, timeout, stop)
        finally:
            conn.close()

    def _decode(self, row: tuple[Any, ...]) -> RecordedEvent:
        return decode_row(self.registry, row)


def read_all_on(
    conn: psycopg.Connection, registry: EventRegistry, after: Cursor, limit: int
) -> list[RecordedEvent]:
    """``read_all`` on a caller's connection (projections read inside their transaction)."""
    rows = conn.execute(_READ_ALL_SQL, (str(after.xid), after.position, _page(limit))).fetchall()
    return [decode_row(registry, r) for r in rows]


def decode_row(registry: EventRegistry, row: tuple[Any, ...]) -> RecordedEvent:
    position, xid, stream_id, version, type_, schema_version, data, metadata, recorded_at = row
    schema_version, data = registry.upcast(type_, schema_version, data)
    return RecordedEvent(
        position=position,
        xid=xid,
        stream_id=stream_id,
        stream_version=version,
        type=type_,
        schema_version=schema_version,
        data=data,
        metadata=metadata,
        recorded_at=recorded_at,
    )


class _Wakeups:
    """A LISTEN connection opened on first use and re-opened after it broke."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.conn: psycopg.Connection | None = None

    def wait(self, timeout: float) -> None:
        try:
            if self.conn is None:
                self.conn = connect(self.conninfo, autocommit=True)
                self.conn.execute(f"LISTEN {CHANNEL}")
            wait_for_notify(self.conn, timeout, None)
        except (EmberError, psycopg.Error):
            self.close()  # the database is away: a timer now, listen again next call
            time.sleep(timeout)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


def wait_for_notify(conn: psycopg.Connection, timeout: float, stop: Any) -> None:
    """Block until a NOTIFY arrives or ``timeout`` passes, noticing ``stop`` within 0.2 s."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if any(True for _ in conn.notifies(timeout=min(left, 0.2), stop_after=1)):
            # Several appends may have notified meanwhile: one re-read covers them all.
            for _ in conn.notifies(timeout=0.001):
                pass
            return
        if stop is not None and stop.is_set():
            return


def held_back(conn: psycopg.Connection, after: Cursor) -> bool:
    """Are there committed events past ``after`` that the horizon still hides?"""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM events WHERE (xid, position) > (%s::text::xid8, %s) "
        "AND xid >= pg_snapshot_xmin(pg_current_snapshot()))",
        (str(after.xid), after.position),
    ).fetchone()
    return bool(row and row[0])


def _page(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed(f"page size must be 1-{MAX_PAGE}", detail={"field": "limit"})
    return limit


def _append_params(
    stream_id: str, expected: ExpectedVersion, events: Sequence[NewEvent]
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "stream": stream_id,
        "expected": None if expected == ANY else expected,
        "types": [e.type for e in events],
        "svs": [e.schema_version for e in events],
        "datas": [Jsonb(dict(e.data)) for e in events],
        "metas": [Jsonb(dict(e.metadata)) for e in events],
    }
    if len(events) == 1:
        params.update({k: params[k][0] for k in ("types", "svs", "datas", "metas")})
    return params


def _run_append(
    conn: psycopg.Connection, stream_id: str, expected: ExpectedVersion, params: dict[str, Any]
) -> AppendResult:
    try:
        sql = _APPEND_MANY_SQL if isinstance(params["types"], list) else _APPEND_ONE_SQL
        row = conn.execute(sql, params).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        # Another writer took the version between our read of the head and our insert.
        raise ConcurrencyConflict(
            f"stream {stream_id} was appended to concurrently",
            hint="re-read the stream and retry with its new version",
            detail={"stream_id": stream_id, "expected_version": expected},
        ) from exc
    assert row is not None
    head, first_v, last_v, first_p, last_p, xid, _ = row
    if first_v is None and expected in {ANY, head}:
        # Only the xid guard can refuse an append whose head matched.
        raise ConcurrencyConflict(
            f"stream {stream_id} cannot be appended to from a transaction older than its "
            "last event",
            hint="append in a fresh transaction (the store always does; this is a bug)",
            detail={"stream_id": stream_id},
        )
    if first_v is None:
        raise ConcurrencyConflict(
            f"stream {stream_id} is at version {head}, not {expected}",
            hint="re-read the stream and retry with its current version",
            detail={"stream_id": stream_id, "expected_version": expected, "actual_version": head},
        )
    return AppendResult(stream_id, first_v, last_v, first_p, last_p, xid)


def _append_once(
    conn: psycopg.Connection, stream_id: str, expected: ExpectedVersion, params: dict[str, Any]
) -> AppendResult:
    if expected != ANY:
        # One statement on an autocommit connection: atomic, and one round trip.
        return _run_append(conn, stream_id, expected, params)
    with conn.transaction():
        _lock_stream(conn, stream_id)
        return _run_append(conn, stream_id, expected, params)


def _lock_stream(conn: psycopg.Connection, stream_id: str) -> None:
    """With ANY the caller asked for no check, so writers of one stream must not race:
    they take turns on an advisory lock (which, unlike a row lock, gives the transaction
    no xid before the append reads the stream head)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (stream_id,))


def _append_idempotent(
    conn: psycopg.Connection,
    *,
    stream_id: str,
    expected: ExpectedVersion,
    params: dict[str, Any],
    key: str,
    fingerprint: str,
) -> AppendResult:
    with conn.transaction():
        # Serialise on the key with an advisory lock, not a row: a row lock or insert would
        # give this transaction an xid before the append reads the stream head (see the
        # xid guard in _APPEND_TEMPLATE). A concurrent retry waits here for our outcome.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
        if expected == ANY:
            _lock_stream(conn, stream_id)
        row = conn.execute(
            "SELECT request_hash, result FROM idempotency_keys WHERE key = %s", (key,)
        ).fetchone()
        if row is not None:
            if row[0] != fingerprint:
                raise IdempotencyKeyReused(
                    f"idempotency key {key!r} was already used for a different request",
                    hint="use a fresh key for a new request",
                    detail={"idempotency_key": key},
                )
            return AppendResult.from_dict(row[1])
        metas = params["metas"]
        keyed = (
            [_with_key(m, key) for m in metas] if isinstance(metas, list) else _with_key(metas, key)
        )
        params = dict(params, metas=keyed)
        result = _run_append(conn, stream_id, expected, params)
        conn.execute(
            "INSERT INTO idempotency_keys (key, request_hash, result) VALUES (%s, %s, %s)",
            (key, fingerprint, Jsonb(result.to_dict())),
        )
        return result


def _with_key(meta: Jsonb, key: str) -> Jsonb:
    return Jsonb({**meta.obj, "idempotency_key": key})


def dumps(event: RecordedEvent) -> str:
    """One event as a JSON line (CLI output, debugging)."""
    return json.dumps(
        {
            "cursor": str(event.cursor),
            "position": event.position,
            "stream_id": event.stream_id,
            "stream_version": event.stream_version,
            "type": event.type,
            "schema_version": event.schema_version,
            "data": event.data,
            "metadata": event.metadata,
            "recorded_at": event.recorded_at.isoformat(),
        },
        sort_keys=True,
    )
