"""The event log's contract on real Postgres: appends, conflicts, idempotency, reads."""

from __future__ import annotations

import threading

import psycopg
import pytest

from ember.core.errors import (
    ConcurrencyConflict,
    IdempotencyKeyReused,
    InvalidEvent,
    UnknownEventType,
    ValidationFailed,
)
from ember.core.events import ANY, ZERO, Cursor, NewEvent
from ember.store.db import Database
from ember.store.errors import DatabaseUnavailable, StoreError
from ember.store.eventlog import EventLog, _Wakeups
from tests.support.events import REGISTRY, tick


def count_rows(db: Database, table: str = "events") -> int:
    with db.connection() as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_append_assigns_contiguous_versions_and_reads_back(log: EventLog) -> None:
    first = log.append("counter-a", 0, [tick(1), tick(2)])
    second = log.append("counter-a", 2, [tick(3)])
    assert (first.first_version, first.last_version) == (1, 2)
    assert (second.first_version, second.last_version) == (3, 3)
    assert second.first_position > first.last_position
    events = log.read_stream("counter-a")
    assert [(e.stream_version, e.data["n"]) for e in events] == [(1, 1), (2, 2), (3, 3)]
    assert log.stream_version("counter-a") == 3
    assert log.stream_version("counter-none") == 0
    assert log.read_stream("counter-a", from_version=3)[0].data["n"] == 3


def test_wrong_expected_version_is_a_conflict_and_writes_nothing(
    log: EventLog, db: Database
) -> None:
    log.append("counter-a", 0, [tick(1)])
    for wrong in (0, 2, 5):
        with pytest.raises(ConcurrencyConflict) as err:
            log.append("counter-a", wrong, [tick(9)])
        assert err.value.code == "event.version_conflict"
        assert err.value.detail["actual_version"] == 1
    assert count_rows(db) == 1


def test_any_skips_the_check(log: EventLog) -> None:
    log.append("counter-a", ANY, [tick(1)])
    assert log.append("counter-a", ANY, [tick(2)]).last_version == 2


@pytest.mark.parametrize(
    ("events", "error"),
    [
        ([tick(1), NewEvent("counter.ticked", {"n": "x"})], InvalidEvent),
        ([tick(1), NewEvent("counter.nope", {})], UnknownEventType),
        ([], ValidationFailed),
    ],
    ids=["invalid-in-batch", "unknown-in-batch", "empty"],
)
def test_a_malformed_batch_writes_nothing(
    log: EventLog, db: Database, events: list[NewEvent], error: type[Exception]
) -> None:
    with pytest.raises(error):
        log.append("counter-a", 0, events)
    assert count_rows(db) == 0


@pytest.mark.parametrize("stream", ["", "Bad", "x" * 300])
def test_bad_stream_ids_are_refused(log: EventLog, db: Database, stream: str) -> None:
    with pytest.raises(ValidationFailed):
        log.append(stream, 0, [tick(1)])
    assert count_rows(db) == 0


def test_idempotent_retry_returns_the_first_result_and_writes_nothing(
    log: EventLog, db: Database
) -> None:
    first = log.append("counter-a", 0, [tick(1)], idempotency_key="req-1")
    again = log.append("counter-a", 0, [tick(1)], idempotency_key="req-1")
    assert again == first
    assert count_rows(db) == 1
    assert log.read_stream("counter-a")[0].metadata == {"idempotency_key": "req-1"}


def test_reused_key_with_another_request_is_refused(log: EventLog, db: Database) -> None:
    log.append("counter-a", 0, [tick(1)], idempotency_key="req-1")
    with pytest.raises(IdempotencyKeyReused):
        log.append("counter-a", 1, [tick(2)], idempotency_key="req-1")
    assert count_rows(db) == 1


def test_a_failed_append_does_not_burn_its_key(log: EventLog, db: Database) -> None:
    log.append("counter-a", 0, [tick(1)])
    with pytest.raises(ConcurrencyConflict):
        log.append("counter-a", 0, [tick(2)], idempotency_key="req-2")
    assert count_rows(db, "idempotency_keys") == 0
    assert log.append("counter-a", 1, [tick(2)], idempotency_key="req-3").last_version == 2


def test_concurrent_retries_of_one_key_write_once(log: EventLog, db: Database) -> None:
    results = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        results.append(log.append("counter-a", ANY, [tick(1)], idempotency_key="same"))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert count_rows(db) == 1


def test_read_all_pages_in_commit_order_from_a_cursor(log: EventLog) -> None:
    for i in range(25):
        log.append(f"counter-{i % 3}", ANY, [tick(i)])
    seen: list[int] = []
    cursor = ZERO
    while page := log.read_all(cursor, limit=7):
        seen += [e.data["n"] for e in page]
        cursor = page[-1].cursor
    assert seen == list(range(25))
    assert log.head() == cursor
    assert log.read_all(cursor) == []


def test_old_schema_versions_are_upcast_on_read(log: EventLog, db: Database) -> None:
    # Write a v1 row as an older release would have, bypassing today's validation.
    with db.connection() as conn:
        conn.execute(
            "INSERT INTO events (stream_id, stream_version, type, schema_version, data) "
            "VALUES ('person-1', 1, 'person.renamed', 1, '{\"name\": \"Grace Hopper\"}')"
        )
    log.append("person-1", 1, [NewEvent("person.renamed", {"first": "G", "last": "H"}, 2)])
    events = log.read_stream("person-1")
    assert [(e.schema_version, dict(e.data)) for e in events] == [
        (2, {"first": "Grace", "last": "Hopper"}),
        (2, {"first": "G", "last": "H"}),
    ]
    assert [e.data for e in log.read_all()] == [e.data for e in events]


def test_an_append_from_an_older_transaction_cannot_reorder_a_stream(
    log: EventLog, db: Database, database_url: str
) -> None:
    """The xid guard: a transaction that got its xid before the stream's last event was
    written must not append after it, or readers ordering by (xid, position) would see
    the stream out of order."""
    from ember.store.eventlog import _append_params, _run_append

    with psycopg.connect(database_url) as old:
        old.execute("SELECT pg_current_xact_id()")  # takes an xid now
        log.append("counter-a", 0, [tick(1)])  # a younger transaction writes v1
        params = _append_params("counter-a", 1, [REGISTRY.validate(tick(2))])
        with pytest.raises(ConcurrencyConflict, match="older than its last event"):
            _run_append(old, "counter-a", 1, params)
        old.rollback()
    assert [e.stream_version for e in log.read_all()] == [1]


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(DatabaseUnavailable) as err:
        Database("host=/nonexistent/socket port=1 dbname=nope user=nope connect_timeout=1")
    assert err.value.code == "store.unavailable"
    assert "EMBER_DATABASE_URL" in (err.value.hint or "")


def test_bad_page_sizes_are_refused(log: EventLog) -> None:
    with pytest.raises(ValidationFailed):
        log.read_all(Cursor(0, 0), limit=0)


@pytest.mark.parametrize(
    "sql",
    ["UPDATE events SET data = '{}'", "DELETE FROM events", "TRUNCATE events"],
    ids=["update", "delete", "truncate"],
)
def test_history_cannot_be_rewritten(log: EventLog, db: Database, sql: str) -> None:
    log.append("counter-a", 0, [tick(1)])
    with (
        pytest.raises(StoreError, match="append-only") as err,
        db.connection() as conn,
    ):
        conn.execute(sql)
    assert err.value.detail == {"sqlstate": "42501"}
    assert [e.data for e in log.read_all()] == [{"n": 1, "pad": ""}]


def test_nul_characters_are_invalid_input_not_driver_errors(log: EventLog, db: Database) -> None:
    with pytest.raises(InvalidEvent, match="NUL"):
        log.append("counter-a", 0, [NewEvent("counter.ticked", {"n": 1, "pad": "a\x00b"})])
    with pytest.raises(ValidationFailed):
        log.append("counter-a", 0, [tick(1)], idempotency_key="k\x00")
    assert count_rows(db) == 0


def test_any_appends_never_conflict_under_contention(log: EventLog, db: Database) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(12)

    def writer(w: int) -> None:
        barrier.wait()
        for i in range(15):
            try:
                key = f"w{w}-{i}" if i % 2 else None
                log.append("counter-hot", ANY, [tick(i)], idempotency_key=key)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [e.stream_version for e in log.read_stream("counter-hot")] == list(range(1, 181))


def test_a_malformed_database_url_is_a_validation_error() -> None:
    with pytest.raises(ValidationFailed) as err:
        Database("nonsense=1")
    assert err.value.detail == {"field": "EMBER_DATABASE_URL"}


def test_wakeups_return_on_an_append_and_fall_back_to_a_timer_without_a_database(
    log: EventLog,
) -> None:
    woke = threading.Event()
    with log.wakeups() as wait:
        wait(0.01)  # listening from here on

        def waiter() -> None:
            wait(60)
            woke.set()

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        log.append("counter-wake", ANY, [tick(1)])
        # Far below the 60 s timer: the append's NOTIFY woke it (no tight timing here).
        assert woke.wait(20), "an append did not wake the waiter"
        thread.join(5)

    waker = _Wakeups("host=/nonexistent/socket port=1 dbname=nope user=nope connect_timeout=1")
    waker.wait(0.01)  # the database is away: a timer, no error
    assert waker.conn is None
