"""Connections to the control-plane database.

``Database`` owns a connection pool; every psycopg connection failure leaving this package
is a :class:`DatabaseUnavailable` with a hint, never a raw driver traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import psycopg_pool
from psycopg.rows import TupleRow

from ember.store.errors import DatabaseUnavailable

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
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database: {_first_line(exc)}", hint=UNREACHABLE_HINT
        ) from exc


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
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(
                f"lost the database connection: {_first_line(exc)}", hint=UNREACHABLE_HINT
            ) from exc

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
