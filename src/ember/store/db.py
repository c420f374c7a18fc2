"""Connections to the control-plane database.

``Database`` owns a connection pool. Every psycopg error leaving this package is an
Ember error (:func:`translate`): users get a message and a hint, never a driver traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import psycopg_pool
from psycopg.rows import TupleRow

from ember.core.errors import EmberError, ValidationFailed
from ember.store.errors import DatabaseUnavailable, SchemaNotMigrated, StoreError

UNREACHABLE_HINT = (
    "check that Postgres is running ('ember dev up' starts the embedded one) "
    "and that EMBER_DATABASE_URL is right"
)


def connect(conninfo: str, *, autocommit: bool = False, timeout: float = 5.0) -> psycopg.Connection:
    """One connection, with driver errors translated."""
    try:
        return psycopg.connect(
            conninfo, autocommit=autocommit, connect_timeout=max(1, int(timeout))
        )
    except psycopg.ProgrammingError as exc:  # a malformed conninfo
        raise ValidationFailed(
            f"invalid database URL: {_first_line(exc)}",
            hint="EMBER_DATABASE_URL takes a libpq URL or conninfo, "
            "e.g. postgresql://user@host/dbname",
            detail={"field": "EMBER_DATABASE_URL"},
        ) from exc
    except psycopg.Error as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database: {_first_line(exc)}", hint=UNREACHABLE_HINT
        ) from exc


def translate(exc: psycopg.Error) -> EmberError:
    """A driver error as an Ember error, by SQLSTATE class."""
    state = exc.sqlstate or ""
    if state == "42P01":  # undefined_table
        return SchemaNotMigrated(
            f"the database schema is not migrated: {_first_line(exc)}",
            hint="run 'ember admin migrate'",
        )
    if not state or state.startswith(("08", "53", "57")):
        # No SQLSTATE: the connection itself failed. 08 connection, 53 resources,
        # 57 operator intervention (shutdown, cancel).
        return DatabaseUnavailable(
            f"database unavailable: {_first_line(exc)}", hint=UNREACHABLE_HINT
        )
    return StoreError(f"database error: {_first_line(exc)}", detail={"sqlstate": state})


class Database:
    """A pool of connections to one database. Open it once per process."""

    def __init__(self, conninfo: str, *, min_size: int = 1, max_size: int = 8) -> None:
        self.conninfo = conninfo
        # Fail fast with a clear error instead of a pool that silently retries forever.
        connect(conninfo).close()
        self.pool: psycopg_pool.ConnectionPool[psycopg.Connection[TupleRow]] = (
            psycopg_pool.ConnectionPool(
                conninfo,
                min_size=min_size,
                max_size=max_size,
                open=True,
                timeout=10.0,
                # Autocommit: a single statement is its own transaction (one round trip);
                # multi-statement work opens ``conn.transaction()`` explicitly.
                kwargs={"autocommit": True},
            )
        )

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            raise DatabaseUnavailable(
                "no database connection became available in time", hint=UNREACHABLE_HINT
            ) from exc
        except psycopg.Error as exc:
            raise translate(exc) from exc

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def redact(conninfo: str) -> str:
    """The conninfo with any password masked: safe to print or log."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "<invalid conninfo>"
    if "password" in params:
        params["password"] = "***"  # noqa: S105 - a mask, not a password
    return make_conninfo("", **params)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


STALL_MS = 10_000
"""How long a transaction may sit idle (its process paused or hung) before the server
cuts it off; fenced writes use the lease TTL instead."""


def cap_stall(conn: psycopg.Connection, ms: int = STALL_MS) -> None:
    """Inside the caller's transaction: let the server end it if the client stalls for
    ``ms`` between statements, so locks it holds cannot block others indefinitely."""
    conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', %s, true)",
        (f"{max(1, ms)}ms",),
    )
