"""Leases: leader election through Postgres, with an epoch for fencing (ADR-0014).

A session advisory lock alone would not do: a SIGSTOPped leader keeps its connection, and
so its lock, for as long as it is paused. A lease row expires instead; whoever takes it
over bumps the epoch, and every write of the leader carries its (holder, epoch) as a
:class:`~ember.store.eventlog.Fence` checked in the write's own transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import psycopg

from ember.store.db import Database
from ember.store.eventlog import Fence, lease_lock_key


@dataclasses.dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    epoch: int
    expires_at: dt.datetime
    ttl_s: float = 10.0

    @property
    def fence(self) -> Fence:
        # A write stalled for a whole TTL belongs to a holder that may have lost the lease.
        return Fence(self.name, self.holder, self.epoch, stall_ms=int(self.ttl_s * 1000))


_ACQUIRE = """INSERT INTO leases AS l VALUES
       (%s, %s, 1, clock_timestamp(), clock_timestamp() + %s * interval '1 second')
   ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
       epoch = l.epoch + 1, acquired_at = EXCLUDED.acquired_at,
       expires_at = EXCLUDED.expires_at
   WHERE l.expires_at <= clock_timestamp() OR l.holder = EXCLUDED.holder
   RETURNING epoch, expires_at"""


class Leases:
    def __init__(self, db: Database) -> None:
        self.db = db

    def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease when it is free, expired or already this holder's (always a new
        epoch); None when another holder has it."""
        with self.db.connection() as conn:
            try:
                with conn.transaction():
                    # Exclusive: waits for fenced writes in flight under the old epoch —
                    # but not forever: a stalled holder's transaction is cut off by its
                    # idle-in-transaction timeout (Fence.stall_ms), and we try again later.
                    conn.execute(
                        "SELECT set_config('lock_timeout', %s, true)",
                        (f"{int(max(ttl_s, 1) * 1000)}ms",),
                    )
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 2))",
                        (lease_lock_key(name),),
                    )
                    row = conn.execute(_ACQUIRE, (name, holder, ttl_s)).fetchone()
            except psycopg.errors.LockNotAvailable:
                return None
        return Lease(name, holder, int(row[0]), row[1], ttl_s) if row else None

    def renew(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend the lease; None when it was lost (another holder or epoch)."""
        with self.db.connection() as conn:
            row = conn.execute(
                """UPDATE leases SET expires_at = clock_timestamp() + %s * interval '1 second'
                   WHERE name = %s AND holder = %s AND epoch = %s RETURNING expires_at""",
                (ttl_s, lease.name, lease.holder, lease.epoch),
            ).fetchone()
        return dataclasses.replace(lease, expires_at=row[0], ttl_s=ttl_s) if row else None

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
