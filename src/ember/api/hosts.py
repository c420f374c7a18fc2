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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from psycopg.types.json import Jsonb

from ember.api.service import Row, Tenancy
from ember.core.events import STREAM_ID_RE, EventData, RecordedEvent
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


class Hosts:
    def __init__(self, tenancy: Tenancy) -> None:
        self.t = tenancy

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
                    f"SELECT i.* FROM view_instances i WHERE i.host_id = %s AND {_LIVE} "
                    "ORDER BY i.instance_id",
                    (host_id,),
                )
                names = [c.name for c in cur.description or ()]
                rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        cursor = f"{checkpoint[0]}-{checkpoint[1]}" if checkpoint else "0-0"
        return rows, cursor

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
