from __future__ import annotations

from collections.abc import Iterator

import pytest

from ember.dev.postgres import LocalCluster
from ember.store.db import Database
from ember.store.eventlog import EventLog
from tests.support import pg
from tests.support.events import REGISTRY


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    """One real PostgreSQL cluster for the whole test session (Unix socket only)."""
    with pg.ephemeral_cluster() as cluster:
        yield cluster


@pytest.fixture
def database_url(pg_cluster: LocalCluster) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    url = pg.fresh_database(pg_cluster)
    yield url
    pg.drop_database(pg_cluster, url)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    with Database(database_url, max_size=20) as database:
        yield database


@pytest.fixture
def log(db: Database) -> EventLog:
    return EventLog(db, REGISTRY)
