from __future__ import annotations

import threading

import psycopg
import pytest

from ember.dev.postgres import LocalCluster
from ember.store import migrations
from ember.store.errors import DatabaseUnavailable, MigrationFailed
from tests.support import pg
from tests.support.schema_snapshot import SNAPSHOT, dump_schema


@pytest.fixture
def empty_database(pg_cluster: LocalCluster):  # type: ignore[no-untyped-def]
    pg_cluster.ensure_database("empty_for_migrations")
    url = pg_cluster.conninfo("empty_for_migrations")
    yield url
    pg.drop_database(pg_cluster, url)


def test_migrating_an_empty_database_yields_the_committed_snapshot(empty_database: str) -> None:
    applied = migrations.migrate(empty_database)
    assert [m.version for m in applied] == [m.version for m in migrations.available()]
    assert dump_schema(empty_database) == SNAPSHOT.read_text(), (
        "docs/specs/db-schema.sql is stale: run 'make schema' and commit it"
    )


def test_migrate_is_idempotent_and_concurrent_starters_serialise(empty_database: str) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(len(migrations.migrate(empty_database)))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [0, 0, 0, len(migrations.available())]
    assert migrations.migrate(empty_database) == []
    assert migrations.pending(empty_database) == []


def test_an_edited_migration_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
    with pytest.raises(MigrationFailed, match="edited after it was applied"):
        migrations.migrate(database_url)


def test_a_database_from_a_newer_release_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (9999, 'future', 'x')")
    with pytest.raises(MigrationFailed, match="does not know"):
        migrations.migrate(database_url)


def test_an_event_log_from_the_future_is_refused(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO events (xid, stream_id, stream_version, type, data) "
            "VALUES ('999999999999', 'x-1', 1, 'x.y', '{}')"
        )
    with pytest.raises(MigrationFailed, match="ahead of this database cluster"):
        migrations.migrate(database_url)


def test_unreachable_database_fails_clearly() -> None:
    with pytest.raises(DatabaseUnavailable):
        migrations.migrate("host=/nonexistent port=9 dbname=x user=x")
