"""Versioned, forward-only schema migrations.

Files ``migrations/NNNN_name.sql`` are applied in order, each in its own transaction,
under a session advisory lock so concurrent starters (several api replicas) serialise.
An applied migration whose file changed is refused: history is not edited, a new
migration is added instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from importlib import resources

import psycopg

from ember.store.db import connect
from ember.store.errors import MigrationFailed

# Arbitrary constant shared by every Ember process: "ember-migrate".
_LOCK_KEY = 0x656D6265_72_6D6967 & 0x7FFFFFFFFFFFFFFF
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with this release, in order."""
    found = []
    for entry in resources.files("ember.store").joinpath("migrations").iterdir():
        m = _NAME_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationFailed(f"migration versions must be 1..N without gaps, found {versions}")
    return found


def migrate(conninfo: str) -> list[Migration]:
    """Apply every pending migration; return the ones applied now (empty when up to date)."""
    applied_now: list[Migration] = []
    with connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer     PRIMARY KEY,
                       name       text        NOT NULL,
                       checksum   text        NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                row[0]: row[1]
                for row in conn.execute("SELECT version, checksum FROM schema_migrations")
            }
            unknown = sorted(set(done) - {m.version for m in available()})
            if unknown:
                raise MigrationFailed(
                    f"the database has migrations this release does not know: {unknown}",
                    hint="run a release at least as new as the one that migrated this database",
                )
            for mig in available():
                if mig.version in done:
                    if done[mig.version] != mig.checksum:
                        raise MigrationFailed(
                            f"migration {mig.version:04d}_{mig.name} was edited after it was "
                            "applied",
                            hint="restore the original file and add a new migration instead",
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(mig.sql.encode())
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) "
                            "VALUES (%s, %s, %s)",
                            (mig.version, mig.name, mig.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationFailed(
                        f"migration {mig.version:04d}_{mig.name} failed: {exc}"
                    ) from exc
                applied_now.append(mig)
            _check_xid_horizon(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def _check_xid_horizon(conn: psycopg.Connection) -> None:
    """Readers order the log by transaction id. A log copied into another cluster (a
    dump and restore) can carry xids from the future of that cluster: its old events
    would be hidden and new ones sorted before the readers' cursors. Refuse to run."""
    row = conn.execute("SELECT (SELECT max(xid) FROM events) >= pg_current_xact_id()").fetchone()
    if row and row[0]:
        raise MigrationFailed(
            "the event log holds transaction ids ahead of this database cluster "
            "(was it restored from another cluster?)",
            hint="restore with the cluster's files (pg_basebackup), not a logical dump; "
            "see docs/specs/events.md",
        )


def pending(conninfo: str) -> list[Migration]:
    with connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        done: set[int] = set()
        if exists and exists[0]:
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    return [m for m in available() if m.version not in done]
