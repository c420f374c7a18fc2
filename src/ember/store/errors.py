"""Errors of the store, translated from psycopg at this boundary::

EmberError (ember.core.errors)
├── Unavailable
│   └── DatabaseUnavailable   store.unavailable       cannot connect / connection lost
└── StoreError                store.error
    └── MigrationFailed       store.migration_failed  a migration is broken or was edited
"""

from __future__ import annotations

from ember.core.errors import EmberError, Kind, Unavailable


class StoreError(EmberError):
    code = "store.error"
    kind = Kind.INTERNAL


class DatabaseUnavailable(Unavailable):
    code = "store.unavailable"


class MigrationFailed(StoreError):
    code = "store.migration_failed"
