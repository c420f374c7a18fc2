"""The ``scheduling`` projection: hosts, instances and workloads (migration 0004), and
each host's node identity (``view_hosts.public_key``, migration 0009). Enrolment streams
(``enrollment-*``) are not folded: the API reads them directly.

Instance state moves through :func:`ember.core.instances.next_state`, which is monotone,
so reports racing with the controller's own events cannot resurrect an ended instance.

The instance's ``address`` comes with ``instance.starting`` / ``instance.healthy`` (the
agent's report); a transition without one keeps the address known.

An instance transition on a host or instance stream (``instance.assigned`` above all: the
scheduler writes one per placement) is folded in one statement: the redelivery guard, the
host stream's version and the transition, with ``next_state`` tabulated for the event
type (see :func:`_transition_sql`). That is one round trip instead of four per placement.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ember.core import workloads
from ember.core.events import RecordedEvent
from ember.core.instances import InstanceState, next_state
from ember.store.projections import first_delivery

_HOST_ADMIN = {
    "host.cordoned": "cordoned",
    "host.uncordoned": "ready",
    "host.drain_started": "draining",
}
_INSTANCE_STREAMS = ("workload-", "host-", "instance-")


class SchedulingProjection:
    name = "scheduling"
    tables = ("view_scheduling_streams", "view_hosts", "view_instances", "view_workloads")

    def apply(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        if not event.stream_id.startswith(_INSTANCE_STREAMS):
            return
        if _is_transition(event.type) and not event.stream_id.startswith("workload-"):
            self._transition_fused(cur, event)
            return
        if not first_delivery(cur, "view_scheduling_streams", event):
            return
        d, t, at = event.data, event.type, event.recorded_at
        if event.stream_id.startswith("host-"):
            self._host(cur, event)
        if event.stream_id.startswith("workload-"):
            self._workload(cur, event)
        if t == "instance.created":
            spec = d["spec"]
            cur.execute(
                "INSERT INTO view_instances VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'pending', "
                "NULL, %s, %s, '', NULL, %s, %s) ON CONFLICT DO NOTHING",
                (
                    d["instance_id"],
                    d["app_id"],
                    d["env"],
                    d["process"],
                    spec["release_version"],
                    d["spec_hash"],
                    Jsonb(spec),
                    d.get("rollout_id"),
                    spec["memory_mb"],
                    spec["cpus"],
                    at,
                    at,
                ),
            )
        elif t.startswith("instance."):
            self._transition(cur, event)

    def _host(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        d, t, at = event.data, event.type, event.recorded_at
        if t == "host.registered":
            cur.execute(
                """INSERT INTO view_hosts VALUES (%s, %s, %s, %s, %s, %s, %s, 'ready', false,
                       %s, %s, %s)
                   ON CONFLICT (host_id) DO UPDATE SET vcpus = EXCLUDED.vcpus,
                       memory_mb = EXCLUDED.memory_mb, disk_mb = EXCLUDED.disk_mb,
                       labels = EXCLUDED.labels, region = EXCLUDED.region,
                       address = EXCLUDED.address""",
                (
                    d["host_id"],
                    d["vcpus"],
                    d["memory_mb"],
                    d["disk_mb"],
                    Jsonb(d.get("labels", {})),
                    d.get("region", ""),
                    d.get("address", ""),
                    event.stream_version,
                    at,
                    at,
                ),
            )
        elif t in _HOST_ADMIN:
            cur.execute(
                "UPDATE view_hosts SET admin_state = %s, state_since = %s WHERE host_id = %s",
                (_HOST_ADMIN[t], at, d["host_id"]),
            )
        elif t in ("host.marked_down", "host.recovered"):
            cur.execute(
                "UPDATE view_hosts SET down = %s, state_since = %s WHERE host_id = %s",
                (t == "host.marked_down", at, d["host_id"]),
            )
        elif t == "host.identity_bound":
            # Enrolment writes host.registered first in the same append, so the row exists.
            cur.execute(
                "UPDATE view_hosts SET public_key = %s WHERE host_id = %s",
                (d["public_key"], d["host_id"]),
            )
        cur.execute(
            "UPDATE view_hosts SET version = %s WHERE host_id = %s",
            (event.stream_version, event.stream_id.removeprefix("host-")),
        )

    def _workload(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        app_id, _, env = event.stream_id.removeprefix("workload-").rpartition(".")
        cur.execute(
            "SELECT state FROM view_workloads WHERE app_id = %s AND env = %s FOR UPDATE",
            (app_id, env),
        )
        row = cur.fetchone()
        state = workloads.WorkloadState.model_validate(row[0]) if row else workloads.WorkloadState()
        workloads.apply(state, event)
        cur.execute(
            """INSERT INTO view_workloads VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (app_id, env) DO UPDATE SET version = EXCLUDED.version,
                   state = EXCLUDED.state, updated_at = EXCLUDED.updated_at""",
            (
                app_id,
                env,
                event.stream_version,
                Jsonb(state.model_dump(mode="json")),
                event.recorded_at,
            ),
        )

    def _transition_fused(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        """``first_delivery`` + ``_host``'s version bump + ``_transition``, as one statement
        (the event types taken here change nothing else on a host)."""
        d = event.data
        reason = str(d.get("reason", ""))
        cur.execute(
            _transition_sql(event.type),
            {
                "stream": event.stream_id,
                "version": event.stream_version,
                "host": event.stream_id.removeprefix("host-")
                if event.stream_id.startswith("host-")
                else None,
                "at": event.recorded_at,
                "assigned_host": d.get("host_id") if event.type == "instance.assigned" else None,
                "reason": reason,
                "exit_code": d.get("exit_code"),
                "address": d.get("address"),
                "instance": d["instance_id"],
            },
        )

    def _transition(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        d = event.data
        cur.execute(
            "SELECT state FROM view_instances WHERE instance_id = %s FOR UPDATE",
            (d["instance_id"],),
        )
        row = cur.fetchone()
        if row is None:
            return
        new = next_state(InstanceState(row[0]), event.type)
        if new is None:
            return
        host = d.get("host_id") if event.type == "instance.assigned" else None
        reason = str(d.get("reason", ""))
        cur.execute(
            """UPDATE view_instances SET state = %s, state_since = %s,
                   host_id = coalesce(%s, host_id),
                   reason = CASE WHEN %s <> '' THEN %s
                                 WHEN %s IN ('starting', 'healthy') THEN '' ELSE reason END,
                   exit_code = coalesce(%s, exit_code),
                   address = coalesce(%s, address)
               WHERE instance_id = %s""",
            (
                new.value,
                event.recorded_at,
                host,
                reason,
                reason,
                new.value,
                d.get("exit_code"),
                d.get("address"),
                d["instance_id"],
            ),
        )


def _is_transition(event_type: str) -> bool:
    return event_type.startswith("instance.") and event_type != "instance.created"


@functools.cache
def _transition_sql(event_type: str) -> bytes:
    """The statement folding one ``event_type`` event, with ``next_state`` for that type
    written into it as a table of (current state, next state): only the pairs where the
    event changes something (none: a row that matches nothing)."""
    pairs = [(s.value, n.value) for s in InstanceState if (n := next_state(s, event_type))]
    assert all(_STATE_RE.match(v) for pair in pairs for v in pair)  # safe as literals
    table = ", ".join(f"('{old}', '{new}')" for old, new in pairs) or "(NULL, NULL)"
    return _TRANSITION_SQL.replace("{transitions}", table).encode()


_STATE_RE = re.compile(r"^[a-z_]+$")
# The guard's RETURNING row exists only on the first delivery (as in ``first_delivery``);
# the host's version moves whatever the instance does (as in ``_host``); the instance moves
# only from a state ``next_state`` accepts, to the state it gives (as in ``_transition``).
_TRANSITION_SQL = """
WITH guard AS (
    INSERT INTO view_scheduling_streams AS s VALUES (%(stream)s, %(version)s)
    ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version
    WHERE s.version < EXCLUDED.version RETURNING 1
), host AS (
    UPDATE view_hosts SET version = %(version)s
    WHERE host_id = %(host)s AND EXISTS (SELECT FROM guard)
)
UPDATE view_instances i SET state = m.new, state_since = %(at)s,
    host_id = coalesce(%(assigned_host)s, i.host_id),
    reason = CASE WHEN %(reason)s <> '' THEN %(reason)s
                  WHEN m.new IN ('starting', 'healthy') THEN '' ELSE i.reason END,
    exit_code = coalesce(%(exit_code)s, i.exit_code),
    address = coalesce(%(address)s, i.address)
FROM (VALUES {transitions}) AS m(old, new)
WHERE i.instance_id = %(instance)s AND i.state = m.old AND EXISTS (SELECT FROM guard)
"""
