"""The edge's long-poll: wake waiting ``GET /v1/edge/snapshot?after=...&wait=...`` requests
as soon as the views the snapshot is read from have folded a change that matters to it.

One worker thread per API process holds a connection that LISTENs on the event log's
channel (ember.store.eventlog.CHANNEL; the notification only wakes, it carries no data).
On every wake-up it folds the ``routes`` and ``scheduling`` projections itself — an edge
must not wait for the controller's projector loop — and publishes their common cursor:
the lowest of their checkpoints, up to which both views are exact. Waiting requests are
asyncio tasks, not threads: a thousand edges long-polling hold no worker thread each.

Not every event changes what an edge serves; a waiter wakes only when an event that can
(``route.*``, ``instance.*``, ``app.deleted``, ``env.deleted``) lies between its ``after``
and the published cursor. When the worker starts it cannot know what came before, so it
treats its first cursor as a change (a spurious wake-up is harmless; a lost one is not).

While committed events sit behind a transaction still in flight (they are not readable
yet, events.md §3), the worker re-checks on a short, growing timer instead of its idle
timeout: a transaction that rolls back sends no notification.

The feed can be keyed: ``changes`` names the keys whose data changed between two cursors,
and a waiter wakes only for its own key. The edge uses one key (``ALL``); the agents'
allocation watch one per host (ember.api.hosts), so a placement on one host wakes that
host's agent and not a thousand others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Collection, Sequence

import psycopg

from ember.core.errors import EmberError
from ember.core.events import ZERO, Cursor
from ember.store.db import Database, connect
from ember.store.eventlog import CHANNEL, held_back, wait_for_notify
from ember.store.projections import ProjectionRunner

log = logging.getLogger(__name__)

PROJECTIONS = ("routes", "scheduling")
_RELEVANT_SQL = """
SELECT EXISTS (
    SELECT 1 FROM events
    WHERE (xid, position) > (%s::text::xid8, %s) AND (xid, position) <= (%s::text::xid8, %s)
      AND (type LIKE 'route.%%' OR type LIKE 'instance.%%'
           OR type IN ('app.deleted', 'env.deleted'))
)
"""

ALL = ""
"""The one key of an unkeyed feed (the edge's)."""

Changes = Callable[[psycopg.Connection, Cursor, Cursor], Collection[str]]
"""The keys whose data changed in ``(after, upto]`` (both cursors folded already)."""

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Event, str]


def edge_changes(conn: psycopg.Connection, after: Cursor, upto: Cursor) -> Collection[str]:
    row = conn.execute(
        _RELEVANT_SQL, (str(after.xid), after.position, str(upto.xid), upto.position)
    ).fetchone()
    return (ALL,) if row and row[0] else ()


class EdgeFeed:
    def __init__(
        self,
        db: Database,
        runner: ProjectionRunner,
        projections: Sequence[str] = PROJECTIONS,
        *,
        idle_s: float = 1.0,
        changes: Changes = edge_changes,
        name: str = "ember-edge-feed",
    ) -> None:
        self.db = db
        self.runner = runner
        self.projections = tuple(projections)
        self.idle_s = idle_s
        self.changes = changes
        self.name = name
        self._lock = threading.Lock()
        self._waiters: set[_Waiter] = set()
        self._current: Cursor | None = None
        self._first: Cursor | None = None  # the first cursor published: a change to every key
        self._changed: dict[str, Cursor] = {}  # per key, the last cursor it changed at
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the requests' side ------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def changed_after(self, after: Cursor, key: str = ALL) -> bool:
        with self._lock:
            changed = self._changed.get(key, self._first)
            return changed is not None and changed > after

    async def wait_past(self, after: Cursor, timeout: float, key: str = ALL) -> bool:
        """Wait until a change of ``key`` past ``after`` is folded (True) or ``timeout``
        passes."""
        self.start()
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event(), key)
        deadline = loop.time() + timeout
        with self._lock:
            self._waiters.add(waiter)
        try:
            while True:
                # Clear before checking: a wake-up between the check and the wait then
                # leaves the event set, and the wait returns at once.
                waiter[1].clear()
                if self.changed_after(after, key):
                    return True
                left = deadline - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter[1].wait(), left)
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    # -- the worker --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = connect(self.db.conninfo, autocommit=True)
            except EmberError as exc:
                log.warning("%s: cannot connect: %s", self.name, exc.message)
                self._stop.wait(1.0)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                self._follow(conn)
            except (EmberError, psycopg.Error) as exc:
                if not self._stop.is_set():
                    log.warning("%s: %s; reconnecting", self.name, exc)
                    self._stop.wait(1.0)
            finally:
                conn.close()

    def _follow(self, conn: psycopg.Connection) -> None:
        held_wait = 0.002
        while not self._stop.is_set():
            for name in self.projections:
                self.runner.catch_up(name)
            cursor = min((self.runner.cursor(n) for n in self.projections), default=ZERO)
            self._publish(conn, cursor)
            if held_back(conn, cursor):
                timeout, held_wait = held_wait, min(held_wait * 2, 0.25)
            else:
                timeout, held_wait = self.idle_s, 0.002
            wait_for_notify(conn, timeout, self._stop)

    def _publish(self, conn: psycopg.Connection, cursor: Cursor) -> None:
        previous = self._current
        if previous is not None and cursor <= previous:
            return
        keys = None if previous is None else set(self.changes(conn, previous, cursor))
        with self._lock:
            self._current = cursor
            if keys is None:
                self._first = cursor
            else:
                self._changed.update(dict.fromkeys(keys, cursor))
            waiters = [w for w in self._waiters if keys is None or w[2] in keys]
        for loop, event, _key in waiters:
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                loop.call_soon_threadsafe(event.set)
