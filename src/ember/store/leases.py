"""Leases: leader election through Postgres, with an epoch for fencing (ADR-0014).

A session advisory lock alone would not do: a SIGSTOPped leader keeps its connection, and
so its lock, for as long as it is paused. A lease row expires instead; whoever takes it
over bumps the epoch, and every write of the leader carries its (holder, epoch) as a
:class:`~ember.store.eventlog.Fence` checked in the write's own transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from ember.store.db import Database
from ember.store.eventlog import Fence, lease_lock_key


@dataclasses.dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    epoch: int
    expires_at: dt.datetime

    @property
    def fence(self) -> Fence:
        return Fence(self.name, self.holder, self.epoch)


class Leases:
    def __init__(self, db: Database) -> None:
        self.db = db

    def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease when it is free, expired or already this holder's (always a new
        epoch); None when another holder has it."""
        with self.db.connection() as conn, conn.transaction():
            # Exclusive: waits for fenced writes in flight under the old epoch.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 2))", (lease_lock_key(name),)
            )
            row = conn.execute(
                """INSERT INTO leases AS l VALUES
                       (%s, %s, 1, clock_timestamp(), clock_timestamp() + %s * interval '1 second')
                   ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
                       epoch = l.epoch + 1, acquired_at = EXCLUDED.acquired_at,
                       expires_at = EXCLUDED.expires_at
                   WHERE l.expires_at <= clock_timestamp() OR l.holder = EXCLUDED.holder
                   RETURNING epoch, expires_at""",
                (name, holder, ttl_s),
            ).fetchone()
        return Lease(name, holder, int(row[0]), row[1]) if row else None

    def renew(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend the lease; None when it was lost (another holder or epoch)."""
        with self.db.connection() as conn:
            row = conn.execute(
                """UPDATE leases SET expires_at = clock_timestamp() + %s * interval '1 second'
                   WHERE name = %s AND holder = %s AND epoch = %s RETURNING expires_at""",
                (ttl_s, lease.name, lease.holder, lease.epoch),
            ).fetchone()
        return dataclasses.replace(lease, expires_at=row[0]) if row else None

    def release(self, lease: Lease) -> None:
        """Step down: expire the lease now so a standby takes over without waiting."""
        with self.db.connection() as conn:
            conn.execute(
                "UPDATE leases SET expires_at = clock_timestamp() "
                "WHERE name = %s AND holder = %s AND epoch = %s",
                (lease.name, lease.holder, lease.epoch),
            )

    def current(self, name: str) -> Lease | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT holder, epoch, expires_at FROM leases WHERE name = %s", (name,)
            ).fetchone()
        return Lease(name, str(row[0]), int(row[1]), row[2]) if row else None
