"""Workload logs: agents ship their instances' console lines, users read and follow an
environment's (ADR-0016; docs/specs/api.md, "Logs").

``ship`` admits what ``report`` admits (ember.core.tenancy.check_agent: the node identity
of that very host, or a platform operator) and only for an instance assigned to that host
(404 ``instance.not_found`` otherwise, as for a missing one). ``read`` authorises like
``status`` (the env must be visible to the caller, else 404; no further capability).

Following is a long-poll: a request with ``after`` and ``wait`` that finds nothing new
waits in an asyncio task (no worker thread held) on :class:`LogFeed`, which wakes it when
its environment's newest id passes ``after``. The feed is one thread per API process
that LISTENs on ember.store.logs.CHANNEL (ember.store.eventlog.wait_for_notify does the
waiting) and, on every wake-up, reads the newest id of just the environments someone
waits on, in one query. A wake-up it misses (reconnecting, say) costs at most its idle
timer: it re-checks then anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Sequence
from typing import cast

import psycopg
from starlette.concurrency import run_in_threadpool

from ember.api.releases import Releases
from ember.api.service import Tenancy
from ember.core.errors import EmberError, ValidationFailed
from ember.core.instances import InstanceNotFound
from ember.core.tenancy import Capability, Principal, check_agent
from ember.store.db import connect
from ember.store.eventlog import wait_for_notify
from ember.store.logs import CHANNEL, LogSource, LogStore, NewLine, Retention, StoredLine
from ember.wire import logs as wl

log = logging.getLogger(__name__)

__all__ = ["BatchTooLarge", "InvalidLogs", "LogFeed", "LogQuery", "Logs"]

EnvKey = tuple[str, str]  # (app_id, env)
MAX_ID = 2**63 - 1  # bigint


class InvalidLogs(ValidationFailed):
    """A shipped batch or a read's parameters that the wire model alone cannot refuse."""

    code = "logs.invalid"


class BatchTooLarge(InvalidLogs):
    code = "logs.batch_too_large"


@dataclasses.dataclass(frozen=True)
class LogQuery:
    process: str | None = None
    instance: str | None = None
    since: dt.datetime | None = None
    after: int | None = None
    limit: int = 100


@dataclasses.dataclass(eq=False)  # hashed by identity: two may wait on the same env and id
class _Waiter:
    key: EnvKey
    after: int
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event


class LogFeed:
    def __init__(self, store: LogStore, *, idle_s: float = 1.0) -> None:
        self.store = store
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._waiters: set[_Waiter] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="ember-log-feed", daemon=True
                )
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    async def wait_past(self, key: EnvKey, after: int, timeout: float) -> bool:
        """Wait until ``key``'s newest id exceeds ``after`` (True) or ``timeout`` passes."""
        self.start()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(key, after, loop, asyncio.Event())
        with self._lock:
            self._waiters.add(waiter)
        try:
            # Registered first, checked second: a line stored in between is either seen
            # here or wakes the waiter.
            if await run_in_threadpool(self.store.head, *key) > after:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), timeout)
            return waiter.event.is_set()
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiters)

    # -- the worker --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = connect(self.store.db.conninfo, autocommit=True)
            except EmberError as exc:
                log.warning("log feed: cannot connect: %s", exc.message)
                self._stop.wait(1.0)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                while not self._stop.is_set():
                    self._wake()
                    wait_for_notify(conn, self.idle_s, self._stop)
            except (EmberError, psycopg.Error) as exc:
                if not self._stop.is_set():
                    log.warning("log feed: %s; reconnecting", exc)
                    self._stop.wait(1.0)
            finally:
                conn.close()

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        if not waiters:
            return
        heads = self.store.heads(w.key for w in waiters)
        for w in waiters:
            if heads.get(w.key, 0) > w.after:
                with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                    w.loop.call_soon_threadsafe(w.event.set)


class Logs:
    def __init__(
        self,
        tenancy: Tenancy,
        releases: Releases,
        retention: Retention | None = None,
        *,
        max_wait_s: float = 30.0,
        feed_idle_s: float = 1.0,
    ) -> None:
        """``max_wait_s``: the longest a follower's long-poll is held (a request may ask
        for less); ``feed_idle_s``: how often the feed re-checks followers without a
        notification."""
        self.t = tenancy
        self.releases = releases
        self.max_wait_s = max_wait_s
        self.store = LogStore(tenancy.db, retention)
        self.feed = LogFeed(self.store, idle_s=feed_idle_s)

    def close(self) -> None:
        self.feed.close()

    # -- agents --------------------------------------------------------------------------

    def ship(
        self, who: Principal, host_id: str, instance_id: str, lines: Sequence[wl.LogShipLine]
    ) -> int:
        """Store the lines an agent read from ``instance_id``'s console; return how many."""
        check_agent(who, host_id, "ship logs")
        check_batch(lines)
        rows = self.t.query(
            "SELECT i.app_id, i.env, i.process, i.host_id, a.org_id FROM view_instances i "
            "JOIN view_apps a USING (app_id) WHERE i.instance_id = %s",
            [instance_id],
        )
        if not rows or rows[0]["host_id"] != host_id:
            # Also an instance of a deleted app: nobody could read its lines any more.
            raise InstanceNotFound(
                f"instance {instance_id} is not assigned to host {host_id}",
                detail={"instance_id": instance_id, "host_id": host_id},
            )
        row = rows[0]
        source = LogSource(
            org_id=row["org_id"],
            app_id=row["app_id"],
            env=row["env"],
            process=row["process"],
            instance_id=instance_id,
            host_id=host_id,
        )
        self.store.append(source, [NewLine(ln.ts, ln.stream, ln.line) for ln in lines])
        return len(lines)

    # -- users ---------------------------------------------------------------------------

    def _env(self, who: Principal, org: str, app: str, env: str) -> tuple[EnvKey, dt.datetime]:
        """The env's key and creation time; not found unless the caller sees it (the rule
        of ``status``)."""
        app_row = self.releases.authorize(who, org, app, env, Capability.READ, "read logs")
        env_row = self.t.visible_env(who, org, app, env)
        return (app_row["app_id"], env), env_row["created_at"]

    def _read(self, key: EnvKey, created: dt.datetime, q: LogQuery) -> wl.LogPage:
        page = self.store.read(
            key[0],
            key[1],
            not_before=created,
            process=q.process,
            instance=q.instance,
            since=q.since,
            after=q.after,
            limit=q.limit,
        )
        return wl.LogPage(items=[_item(ln) for ln in page.lines], cursor=str(page.cursor))

    async def read(
        self, who: Principal, org: str, app: str, env: str, q: LogQuery, wait: float = 0.0
    ) -> wl.LogPage:
        """One page of the env's lines (see LogStore.read); with ``q.after`` and ``wait``,
        wait up to ``wait`` seconds (at most ``max_wait_s``) for lines that match."""
        if q.after is not None and q.after > MAX_ID:
            raise InvalidLogs(f"after {q.after} is beyond any cursor", detail={"field": "after"})
        if wait > 0 and q.after is None:
            raise InvalidLogs(
                "wait needs after: follow from the cursor of a previous read",
                hint="read once without wait, then pass its cursor as after",
                detail={"field": "wait"},
            )
        key, created = await run_in_threadpool(self._env, who, org, app, env)
        page = await run_in_threadpool(self._read, key, created, q)
        if wait <= 0 or page.items:
            return page
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, self.max_wait_s)
        # Lines that do not match the filters move the cursor on without answering.
        while not page.items and (left := deadline - loop.time()) > 0:
            after = int(page.cursor)
            if not await self.feed.wait_past(key, after, left):
                break
            page = await run_in_threadpool(
                self._read, key, created, dataclasses.replace(q, after=after)
            )
        return page


def check_batch(lines: Sequence[wl.LogShipLine]) -> None:
    """What the wire model cannot say: no NUL or unpaired surrogate (Postgres text holds
    neither), and the batch's total size."""
    total = 0
    for i, ln in enumerate(lines):
        try:
            size = len(ln.line.encode())
        except UnicodeEncodeError:
            size = -1
        if size < 0 or "\x00" in ln.line:
            raise InvalidLogs(
                f"line {i} holds a NUL character or an unpaired surrogate",
                hint="replace them before shipping (the agent writes U+FFFD)",
                detail={"field": f"lines.{i}.line"},
            )
        total += size
    if total > wl.MAX_BATCH_BYTES:
        raise BatchTooLarge(
            f"the lines hold {total} bytes; a batch holds at most {wl.MAX_BATCH_BYTES}",
            hint="ship them in several requests",
            detail={"field": "lines", "max_bytes": wl.MAX_BATCH_BYTES},
        )


def _item(ln: StoredLine) -> wl.LogLine:
    return wl.LogLine(
        id=ln.id,
        ts=ln.ts,
        stream=cast(wl.LogStream, ln.stream),  # stored from the same Literal
        process=ln.process,
        instance_id=ln.instance_id,
        line=ln.line,
    )
