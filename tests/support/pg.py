"""An ephemeral PostgreSQL cluster for a test session, and cheap per-test databases.

Every test database is cloned from a migrated template, so a test starts from the real
schema in a few tens of milliseconds and never sees another test's rows.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from ember.dev.postgres import LocalCluster
from ember.store import migrations

TEMPLATE = "ember_template"
_counter = itertools.count()


@contextmanager
def ephemeral_cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="ember-pg-"))
    cluster = LocalCluster(root, durable=False)
    try:
        cluster.init()
        cluster.start()
        cluster.ensure_database(TEMPLATE)
        migrations.migrate(cluster.conninfo(TEMPLATE))
        yield cluster
    finally:
        cluster.destroy()


def fresh_database(cluster: LocalCluster) -> str:
    """A new database cloned from the migrated template; returns its conninfo."""
    name = f"t{next(_counter)}"
    drop_database(cluster, cluster.conninfo(name))
    cluster.ensure_database(name, template=TEMPLATE)
    return cluster.conninfo(name)


def drop_database(cluster: LocalCluster, conninfo: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(conninfo)["dbname"]
    with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
