"""Host and agent commands and queries: register, heartbeat, cordon / uncordon / drain,
list and show hosts; the allocations an agent converges to and its instance reports.

Hosts are platform objects, not an org's, so every method needs a platform operator
(ember.core.tenancy.check_operator): a caller who is not one gets 403 ``auth.forbidden``
(nothing to hide, unlike another tenant's app). The agent's methods (register, heartbeat,
allocations, reports) also admit the node identity of that very host
(ember.core.tenancy.check_agent; enrolment: ember.api.enrollment).

Writes go through the tenancy service's load-decide-append loop on the host's stream
``host-<id>`` or the instance's ``instance-<id>`` and then wait for the ``scheduling``
projection (read-your-writes). Heartbeats are not events: they upsert
``host_heartbeats`` (docs/specs/events.md, "Hosts").

An agent lists its allocations (with the cursor of the snapshot) and then watches from
that cursor: :meth:`Hosts.allocation_changes` answers what changed for the host after a
cursor, read from the ``instance.*`` events in the window and the instances' rows as of
the views' checkpoint, in one snapshot. The route long-polls on a keyed
:class:`ember.api.edge_feed.EdgeFeed` (one key per host: :func:`hosts_changed`), so a
placement wakes only its host's watch. A cursor the log cannot resume from is
:class:`CursorExpired` (410): the agent lists again::

    Conflict  └── CursorExpired       allocations.cursor_expired
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from ember.api.edge_feed import EdgeFeed
from ember.api.service import Row, Tenancy
from ember.core.errors import Conflict
from ember.core.events import STREAM_ID_RE, ZERO, Cursor, EventData, RecordedEvent
from ember.core.hosts import (
    HOST_ID_RE,
    HostNotFound,
    HostRegistered,
    InvalidHost,
    check_registration,
    decide_admin,
    decide_register,
    fold_host,
    host_stream,
)
from ember.core.instances import (
    TERMINAL,
    InstanceState,
    InvalidReport,
    decide_report,
    instance_stream,
)
from ember.core.tenancy import Principal, check_agent, check_operator

PROJECTION = "scheduling"
MAX_REPORT_BYTES = 64 * 1024
ADMIN_ACTIONS = ("cordon", "uncordon", "drain")
MAX_WATCH_WINDOW = 10_000
"""Events a watch reads past its cursor at most; further behind, a list is cheaper (410)."""

# Literal, not a parameter: the planner can then use view_instances' partial index on
# host_id, whose predicate is this very list.
_LIVE = "i.state NOT IN ({})".format(", ".join(f"'{s.value}'" for s in sorted(TERMINAL)))
_HOSTS = f"""
SELECT h.*, hb.last_seen,
       coalesce(u.instances, 0) AS used_instances,
       coalesce(u.memory_mb, 0) AS used_memory_mb,
       coalesce(u.cpus, 0) AS used_cpus
FROM view_hosts h
LEFT JOIN host_heartbeats hb USING (host_id)
LEFT JOIN LATERAL (
    SELECT count(*) AS instances, sum(i.memory_mb)::bigint AS memory_mb,
           round(sum(i.cpus::numeric), 3)::float8 AS cpus
    FROM view_instances i WHERE i.host_id = h.host_id AND {_LIVE}
) u ON true
"""
# The window of a watch: events after its cursor, up to the views' checkpoint (xid8 and
# position parameters: after, then upto).
_WINDOW = (
    "(e.xid, e.position) > (%s::text::xid8, %s) AND (e.xid, e.position) <= (%s::text::xid8, %s)"
)
# Every instance transition names its instance in data.instance_id (events.md §10); an
# instance's host_id never changes once assigned, so the view's host is the event's host.
_CHANGED = f"""
SELECT i.*, a.org_id, bool_or(e.type = 'instance.assigned') AS assigned_in_window
FROM (SELECT e.data->>'instance_id' AS instance_id, e.type FROM events e
      WHERE {_WINDOW} AND e.type LIKE 'instance.%%') e
JOIN view_instances i USING (instance_id)
LEFT JOIN view_apps a ON a.app_id = i.app_id
WHERE i.host_id = %s
GROUP BY i.instance_id, a.org_id ORDER BY i.instance_id
"""
_HOSTS_CHANGED = f"""
SELECT DISTINCT i.host_id
FROM (SELECT DISTINCT e.data->>'instance_id' AS instance_id FROM events e
      WHERE {_WINDOW} AND e.type LIKE 'instance.%%') e
JOIN view_instances i USING (instance_id)
WHERE i.host_id IS NOT NULL
"""


class CursorExpired(Conflict):
    """The watch cannot resume from this cursor: list again (HTTP 410)."""

    code = "allocations.cursor_expired"


@dataclasses.dataclass(frozen=True)
class AllocationChange:
    type: Literal["added", "modified", "removed"]
    row: Row


class Hosts:
    def __init__(
        self,
        tenancy: Tenancy,
        *,
        max_wait_s: float = 30.0,
        max_window: int = MAX_WATCH_WINDOW,
    ) -> None:
        self.t = tenancy
        self.max_wait_s = max_wait_s
        self.max_window = max_window
        self.feed = EdgeFeed(
            tenancy.db,
            tenancy.runner,
            (PROJECTION,),
            changes=hosts_changed,
            name="ember-allocations-feed",
        )

    def close(self) -> None:
        self.feed.close()

    # -- hosts -------------------------------------------------------------------------

    def register(
        self,
        who: Principal,
        host_id: str,
        *,
        vcpus: int,
        memory_mb: int,
        disk_mb: int,
        labels: Mapping[str, str],
        region: str,
        address: str,
    ) -> tuple[Row, bool]:
        """Register a host or update what it offers; (host, True) when it is new. The same
        facts again write nothing. Also counts as a heartbeat."""
        check_agent(who, host_id, "register hosts")
        new = registration(
            host_id,
            vcpus=vcpus,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            labels=labels,
            region=region,
            address=address,
        )
        before, _ = self.t.execute(
            host_stream(host_id),
            fold_host,
            lambda rec: decide_register(rec, new),
            who.user_id,
            PROJECTION,
        )
        self.beat(host_id, None)
        return self.get(who, host_id), before.registered is None

    def heartbeat(self, who: Principal, host_id: str, report: Mapping[str, Any]) -> None:
        """The host is alive: move its ``last_seen`` to now. No event (liveness is not
        history); the controller turns silence into ``host.marked_down``."""
        check_agent(who, host_id, "send heartbeats")
        try:
            text = json.dumps(report, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except ValueError:
            text = "\x00"  # NaN or Infinity: not JSON, and jsonb refuses them
        if "\\u0000" in text or not _storable(text):  # JSON escapes a NUL as \u0000
            raise InvalidHost(
                "the report is not storable JSON (NUL, an unpaired surrogate, NaN)",
                detail={"field": "report"},
            )
        if len(text.encode()) > MAX_REPORT_BYTES:
            raise InvalidHost(
                f"the report exceeds {MAX_REPORT_BYTES} bytes as JSON", detail={"field": "report"}
            )
        self._host_row(host_id)
        self.beat(host_id, report)

    def beat(self, host_id: str, report: Mapping[str, Any] | None) -> None:
        """Upsert the host's liveness row; ``report=None`` keeps the last report."""
        value = None if report is None else Jsonb(dict(report))
        with self.t.db.connection() as conn:
            conn.execute(
                "INSERT INTO host_heartbeats (host_id, last_seen, report) "
                "VALUES (%s, now(), coalesce(%s, '{}'::jsonb)) ON CONFLICT (host_id) DO UPDATE "
                "SET last_seen = EXCLUDED.last_seen, "
                "report = coalesce(%s, host_heartbeats.report)",
                (host_id, value, value),
            )

    def admin(self, who: Principal, host_id: str, action: str) -> Row:
        """``cordon`` (nothing new is placed), ``uncordon`` (back to ready) or ``drain``
        (nothing new, and the controller moves the instances away); idempotent."""
        check_operator(who, f"{action} hosts")
        if not HOST_ID_RE.match(host_id):
            raise _not_found(host_id)
        self.t.execute(
            host_stream(host_id),
            fold_host,
            lambda rec: decide_admin(rec, host_id, action),
            who.user_id,
            PROJECTION,
        )
        return self.get(who, host_id)

    def list_hosts(self, who: Principal, after: str | None, limit: int) -> list[Row]:
        check_operator(who, "list hosts")
        return self.t.query(
            _HOSTS + "WHERE h.host_id > %s ORDER BY h.host_id LIMIT %s", [after or "", limit]
        )

    def get(self, who: Principal, host_id: str) -> Row:
        check_agent(who, host_id, "read hosts")
        return self._host_row(host_id)

    def instances(self, who: Principal, host_id: str) -> list[Row]:
        """The host's instances that have not ended, with their app's names."""
        check_agent(who, host_id, "read hosts")
        return self.t.query(
            "SELECT i.*, a.name AS app_name, o.name AS org_name FROM view_instances i "
            "LEFT JOIN view_apps a USING (app_id) LEFT JOIN view_orgs o ON o.org_id = a.org_id "
            f"WHERE i.host_id = %s AND {_LIVE} ORDER BY i.instance_id",
            [host_id],
        )

    def _host_row(self, host_id: str) -> Row:
        rows = (
            self.t.query(_HOSTS + "WHERE h.host_id = %s", [host_id])
            if HOST_ID_RE.match(host_id)
            else []
        )
        if not rows:
            raise _not_found(host_id)
        return rows[0]

    # -- agents --------------------------------------------------------------------------

    def allocations(self, who: Principal, host_id: str) -> tuple[list[Row], str]:
        """Every instance assigned to the host that has not ended, and the cursor of the
        scheduling views they were read from (one snapshot: exactly the state there)."""
        check_agent(who, host_id, "read allocations")
        self._host_row(host_id)
        with self.t.db.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            checkpoint = conn.execute(
                "SELECT xid::text, position FROM projection_checkpoints WHERE name = %s",
                (PROJECTION,),
            ).fetchone()
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT i.*, a.org_id FROM view_instances i "
                    "LEFT JOIN view_apps a ON a.app_id = i.app_id "
                    f"WHERE i.host_id = %s AND {_LIVE} ORDER BY i.instance_id",
                    (host_id,),
                )
                names = [c.name for c in cur.description or ()]
                rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        cursor = f"{checkpoint[0]}-{checkpoint[1]}" if checkpoint else "0-0"
        return rows, cursor

    def check_watch(self, who: Principal, host_id: str) -> None:
        """Who may watch the host's allocations, and that the host exists (as the list)."""
        check_agent(who, host_id, "read allocations")
        self._host_row(host_id)

    def allocation_changes(
        self, host_id: str, after: Cursor, *, check: bool = True
    ) -> tuple[list[AllocationChange], str]:
        """What changed in the host's allocations after ``after``, and the cursor the
        answer is exact at (the ``scheduling`` checkpoint, read in the same snapshot as
        the rows). Each changed instance once, as it is now: ``added`` (assigned after
        ``after``), ``modified``, or ``removed`` (it ended; its final row). An instance
        assigned and ended within the window was never the caller's: it is left out.
        Call :meth:`check_watch` first. ``check=False``: ``after`` is a cursor this
        method answered a moment ago (a long-poll waking up), neither checked nor bounded.
        CursorExpired when ``after`` cannot be resumed from."""
        if check:
            self._check_cursor(after)
        # Read-your-writes: the views at least up to ``after``. A watch resumes from a
        # cursor this method handed out, which the views have reached already: one read
        # then, not the projection's lock that many waking watches would queue on.
        if self.t.runner.cursor(PROJECTION) < after:
            self.t.sync(after, PROJECTION)
        with self.t.db.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = conn.execute(
                "SELECT xid::text::bigint, position FROM projection_checkpoints WHERE name = %s",
                (PROJECTION,),
            ).fetchone()
            upto = Cursor(int(row[0]), int(row[1])) if row else ZERO
            window = (str(after.xid), after.position, str(upto.xid), upto.position)
            if check and self._behind(conn, window) > self.max_window:
                raise _expired(after, f"it is more than {self.max_window} events behind the log")
            with conn.cursor() as cur:
                cur.execute(_CHANGED, (*window, host_id))
                names = [c.name for c in cur.description or ()]
                rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        changes = []
        for r in rows:
            ended = InstanceState(r["state"]) in TERMINAL
            if ended and r["assigned_in_window"]:
                continue
            kind: Literal["added", "modified", "removed"] = (
                "removed" if ended else "added" if r["assigned_in_window"] else "modified"
            )
            changes.append(AllocationChange(kind, r))
        return changes, str(upto)

    def _behind(self, conn: psycopg.Connection, window: tuple[str, int, str, int]) -> int:
        """Events in the window, counted up to one more than the bound."""
        row = conn.execute(
            f"SELECT count(*) FROM (SELECT FROM events e WHERE {_WINDOW} LIMIT %s) w",
            (*window, self.max_window + 1),
        ).fetchone()
        return int(row[0]) if row else 0

    def _check_cursor(self, after: Cursor) -> None:
        """A cursor this API handed out names an event the views have folded, so it is
        below the horizon; one that names no such event comes from another database (or
        was made up) and cannot be resumed from."""
        if after == ZERO:
            return
        if after.xid >= 1 << 63 or after.position >= 1 << 63:  # beyond any bigint
            raise _expired(after, "it names no event of this event log")
        with self.t.db.connection() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT FROM events WHERE position = %s "
                "AND xid = %s::text::xid8 AND xid < pg_snapshot_xmin(pg_current_snapshot()))",
                (after.position, str(after.xid)),
            ).fetchone()
        if not (row and row[0]):
            raise _expired(after, "it names no event of this event log")

    def report(
        self,
        who: Principal,
        instance_id: str,
        *,
        host_id: str,
        state: str,
        exit_code: int | None,
        reason: str,
        address: str | None = None,
    ) -> str:
        """Record what an agent observed about an instance; return the instance's state
        afterwards. Only the host the instance is assigned to may report on it (404
        otherwise, as for a missing instance); a report that changes nothing writes
        nothing."""
        check_agent(who, host_id, "report instance state")
        if not _storable(reason):
            raise InvalidReport(
                "reason holds a NUL character or an unpaired surrogate",
                detail={"field": "reason"},
            )
        known = bool(STREAM_ID_RE.match(instance_stream(instance_id)))

        def current(events: Iterable[RecordedEvent]) -> Row | None:
            # The state comes from the view, which also folds the controller's events on
            # other streams; first make sure it has folded this stream's own events.
            recorded = list(events)
            if recorded:
                self.t.sync(recorded[-1].cursor, PROJECTION)
            return self._instance(instance_id) if known else None

        def decide(row: Row | None) -> list[EventData]:
            # A missing instance is one assigned to no host: decide_report checks the
            # state first (422) and then answers not found.
            return decide_report(
                InstanceState(row["state"]) if row else InstanceState.PENDING,
                row["host_id"] if row else None,
                instance_id=instance_id,
                host_id=host_id,
                state=state,
                exit_code=exit_code,
                reason=reason,
                address=address,
            )

        if not known:
            decide(None)  # raises: the state is invalid, or no such instance is on the host
        self.t.execute(instance_stream(instance_id), current, decide, who.user_id, PROJECTION)
        row = self._instance(instance_id)
        assert row is not None
        return str(row["state"])

    def _instance(self, instance_id: str) -> Row | None:
        rows = self.t.query(
            "SELECT state, host_id FROM view_instances WHERE instance_id = %s", [instance_id]
        )
        return rows[0] if rows else None


def registration(
    host_id: str,
    *,
    vcpus: int,
    memory_mb: int,
    disk_mb: int,
    labels: Mapping[str, str],
    region: str,
    address: str,
) -> HostRegistered:
    """What a host reports about itself, checked (InvalidHost naming the field)."""
    check_registration(
        host_id, vcpus=vcpus, memory_mb=memory_mb, disk_mb=disk_mb, labels=labels, region=region
    )
    if len(address) > 255 or not address.isprintable() or any(c.isspace() for c in address):
        raise InvalidHost(
            f"invalid address {address!r}: at most 255 printable characters, no spaces",
            detail={"field": "address"},
        )
    if not region.isprintable() or not all(v.isprintable() for v in labels.values()):
        field = "region" if not region.isprintable() else "labels"
        raise InvalidHost(f"{field} must be printable text", detail={"field": field})
    return HostRegistered(
        host_id=host_id,
        vcpus=vcpus,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        labels=dict(labels),
        region=region,
        address=address,
    )


def hosts_changed(conn: psycopg.Connection, after: Cursor, upto: Cursor) -> set[str]:
    """The hosts whose allocations may have changed in ``(after, upto]`` (the keys of the
    allocation feed): the hosts of the instances an ``instance.*`` event names."""
    window = (str(after.xid), after.position, str(upto.xid), upto.position)
    return {r[0] for r in conn.execute(_HOSTS_CHANGED, window).fetchall()}


def _expired(after: Cursor, why: str) -> CursorExpired:
    return CursorExpired(
        f"cannot watch allocations from cursor {after}: {why}",
        hint="list the allocations again (GET /v1/hosts/{host_id}/allocations) and watch "
        "from the list's cursor",
        detail={"cursor": str(after)},
    )


def _not_found(host_id: str) -> HostNotFound:
    return HostNotFound(
        f"no host {host_id!r}",
        hint="'ember hosts list' shows the hosts",
        detail={"host_id": host_id},
    )


def _storable(text: str) -> bool:
    """Postgres text and jsonb hold neither NUL nor an unpaired surrogate (JSON can)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
