"""The host's desired allocations, kept current by list + watch.

:class:`AllocationWatch` runs one thread: it lists the allocations (``GET
/v1/hosts/{id}/allocations``, with the cursor of that snapshot), then long-polls the watch
from that cursor (``GET .../allocations/watch?cursor=&wait=``), applying each answer's
changes and moving to its cursor. Whenever the set changes it calls ``on_change`` — the
agent's loop then converges at once instead of at its next tick. A 410 (``ApiGone``: the
cursor cannot be resumed from) lists again straight away (a second 410 in a row only after
a backoff); any other error lists again after a backoff (doubling up to
``max_backoff_s``), keeping the last known set meanwhile.

Applying changes is the pure :func:`apply_changes`; delivery is at least once, so applying
an event twice, or removing what is not there, changes nothing.

Stopping sets a flag the thread checks between requests; a long-poll in flight is not
interrupted (a synchronous HTTP request cannot be), so the thread is a daemon and
:meth:`AllocationWatch.stop` waits for it only briefly: the process exits without it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

from ember.agent.converge import Allocation
from ember.client.errors import ApiGone
from ember.core.errors import Unavailable
from ember.wire.hosts import AllocationEvent

log = logging.getLogger("ember.agent")

WAIT_S = 25.0
"""How long one watch request waits for a change (the API holds it at most 30 s)."""


@dataclasses.dataclass(frozen=True)
class AllocationChange:
    """One event of a watch answer."""

    type: Literal["added", "modified", "removed"]
    allocation: Allocation


@runtime_checkable
class AllocationSource(Protocol):
    def list_allocations(self, host_id: str) -> tuple[list[Allocation], str]:
        """Every allocation of the host and the cursor of that snapshot."""
        ...

    def watch_allocations(
        self, host_id: str, cursor: str, wait_s: float
    ) -> tuple[list[AllocationChange], str]:
        """The changes after ``cursor`` and the cursor after them; raises ApiGone when
        the cursor cannot be resumed from."""
        ...


def apply_changes(
    current: Mapping[str, Allocation], changes: Iterable[AllocationChange]
) -> dict[str, Allocation]:
    """``current`` with ``changes`` applied: added and modified replace the instance's
    allocation, removed drops it."""
    out = dict(current)
    for change in changes:
        iid = change.allocation.instance_id
        if change.type == "removed":
            out.pop(iid, None)
        else:
            out[iid] = change.allocation
    return out


class AllocationWatch:
    def __init__(
        self,
        source: AllocationSource,
        host_id: str,
        *,
        on_change: Callable[[], None] = lambda: None,
        wait_s: float = WAIT_S,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.source = source
        self.host_id = host_id
        self.on_change = on_change
        self.wait_s = wait_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._items: dict[str, Allocation] | None = None
        self._cursor: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the agent reads --------------------------------------------------------

    def current(self) -> list[Allocation] | None:
        """The allocations as of :attr:`cursor`, by instance id; None before the first
        list answered (the agent then does not know what to run yet)."""
        with self._lock:
            return None if self._items is None else [self._items[k] for k in sorted(self._items)]

    @property
    def cursor(self) -> str | None:
        with self._lock:
            return self._cursor

    # -- the thread ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ember-agent-watch", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 0.2) -> None:
        """Stop; wait ``timeout_s`` at most (a long-poll in flight is not waited for)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        backoff, gone = self.backoff_s, False
        while not self._stop.is_set():
            try:
                if self.poll_once():  # a watch that resumed ends a run of failures
                    backoff, gone = self.backoff_s, False
                continue
            except ApiGone as exc:
                log.info("allocations: %s; listing again", exc.message)
                self._forget_cursor()
                if not gone:  # the usual case: a cursor grown too old; list at once
                    gone = True
                    continue
            except Exception as exc:  # the control plane is down, a transient error...
                if self._stop.is_set():
                    return
                log.warning(
                    "allocations watch failed: %s; listing again in %.1fs",
                    exc,
                    backoff,
                    exc_info=not isinstance(exc, Unavailable),
                )
                self._forget_cursor()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def poll_once(self) -> bool:
        """One request: list when there is no cursor to resume from (False), else watch
        from it (True). Errors propagate (the thread's loop decides what to do)."""
        cursor = self.cursor
        if cursor is None:
            items, cursor = self.source.list_allocations(self.host_id)
            self._set({a.instance_id: a for a in items}, cursor)
            return False
        changes, following = self.source.watch_allocations(self.host_id, cursor, self.wait_s)
        with self._lock:
            before = self._items or {}
        self._set(apply_changes(before, changes), following)
        return True

    def _set(self, items: dict[str, Allocation], cursor: str) -> None:
        with self._lock:
            changed = items != self._items
            self._items, self._cursor = items, cursor
        if changed:
            self.on_change()

    def _forget_cursor(self) -> None:
        # The last known set stays: the agent keeps converging to it until the list answers.
        with self._lock:
            self._cursor = None


def changes_of(events: Sequence[AllocationEvent]) -> list[AllocationChange]:
    """A watch answer's events (ember.wire.hosts) as changes."""
    return [AllocationChange(e.type, Allocation.from_wire(e.allocation)) for e in events]
