"""Errors of the store, translated from psycopg at this boundary (ember.store.db)::

EmberError (ember.core.errors)
├── Unavailable
│   ├── DatabaseUnavailable   store.unavailable       cannot connect / connection lost
│   └── LogsBusy              logs.busy               an env's log writers queued too long
└── StoreError                store.error             any other database error
    ├── MigrationFailed       store.migration_failed  a migration is broken or was edited
    └── SchemaNotMigrated     store.not_migrated      tables missing: run migrations
Conflict
└── Fenced                    store.fenced            a write under a lease this holder lost
"""

from __future__ import annotations

from ember.core.errors import Conflict, EmberError, Kind, Unavailable


class StoreError(EmberError):
    code = "store.error"
    kind = Kind.INTERNAL


class LogsBusy(Unavailable):
    """An environment's log writers queued past their lock timeout: ship again later."""

    code = "logs.busy"


class DatabaseUnavailable(Unavailable):
    code = "store.unavailable"


class MigrationFailed(StoreError):
    code = "store.migration_failed"


class SchemaNotMigrated(StoreError):
    code = "store.not_migrated"
    kind = Kind.UNAVAILABLE


class Fenced(Conflict):
    """The writer's lease epoch is no longer current: another leader took over (or the
    lease expired). Nothing of the write was kept."""

    code = "store.fenced"
