"""The ``routes`` projection: routes, hostname claims, edge listeners and dedicated IPv4
addresses (migration 0008; the streams and rules are in ember.core.routes and
ember.core.ipv4).

Redelivery is harmless: ``view_routes_streams`` records the last version folded per
stream, and older or equal versions are skipped. ``hostname.bound`` / ``unbound`` and
``ipv4.bound`` / ``unbound`` only guard uniqueness; ``view_routes`` already says which
route binds what.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ember.core.events import RecordedEvent
from ember.store.projections import first_delivery

_STREAMS = ("routes-", "hostname-", "listener-", "ipv4-")


class RoutesProjection:
    name = "routes"
    tables = (
        "view_routes_streams",
        "view_routes",
        "view_hostname_claims",
        "view_listeners",
        "view_ipv4",
    )

    def apply(self, cur: psycopg.Cursor[Any], event: RecordedEvent) -> None:
        if not event.stream_id.startswith(_STREAMS):
            return
        if not first_delivery(cur, "view_routes_streams", event):
            return
        handler = getattr(self, "_" + event.type.replace(".", "_"), None)
        if handler is not None:
            handler(cur, event.data, event.recorded_at)

    def _route_created(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            """INSERT INTO view_routes VALUES
               (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (route_id) DO NOTHING""",
            (
                d["route_id"],
                d["org_id"],
                d["app_id"],
                d["env"],
                d["kind"],
                d["address"],
                d.get("ip_id"),
                d["port"],
                bool(d.get("port_auto", False)),
                d.get("hostname"),
                d["process"],
                d["backend_port"],
                d.get("proxy_protocol"),
                at,
            ),
        )

    def _route_deleted(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute("DELETE FROM view_routes WHERE route_id = %s", (d["route_id"],))

    def _hostname_claimed(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            """INSERT INTO view_hostname_claims VALUES (%s, %s, %s, %s)
               ON CONFLICT (hostname) DO UPDATE SET org_id = EXCLUDED.org_id,
                   verification = EXCLUDED.verification, claimed_at = EXCLUDED.claimed_at""",
            (d["hostname"], d["org_id"], d.get("verification", "none"), at),
        )

    def _hostname_released(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "DELETE FROM view_hostname_claims WHERE hostname = %s AND org_id = %s",
            (d["hostname"], d["org_id"]),
        )

    def _listener_claimed(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            """INSERT INTO view_listeners VALUES (%s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (scope, port) DO UPDATE SET kind = EXCLUDED.kind,
                   route_id = EXCLUDED.route_id, claimed_at = EXCLUDED.claimed_at""",
            (
                d.get("ip_id") or d["address"],
                d["port"],
                d["address"],
                d.get("ip_id"),
                d["kind"],
                d.get("route_id"),
                at,
            ),
        )

    def _listener_released(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "DELETE FROM view_listeners WHERE scope = %s AND port = %s AND route_id = %s",
            (d.get("ip_id") or d["address"], d["port"], d["route_id"]),
        )

    def _ipv4_allocated(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute(
            "INSERT INTO view_ipv4 VALUES (%s, %s, %s, %s) ON CONFLICT (ip_id) DO NOTHING",
            (d["ip_id"], d["address"], d["org_id"], at),
        )

    def _ipv4_released(self, cur: psycopg.Cursor[Any], d: Any, at: Any) -> None:
        cur.execute("DELETE FROM view_ipv4 WHERE ip_id = %s", (d["ip_id"],))
        # Its listeners belonged to this allocation (ember.core.routes.listener_stream).
        cur.execute("DELETE FROM view_listeners WHERE ip_id = %s", (d["ip_id"],))
