"""A simulated host agent (tests only; the real agent is `ember server agent`).

It does what an agent does with its allocations, minus the microVMs: heartbeats, reports
``starting`` then ``healthy`` for instances it was assigned, ``stopped`` for those the
controller asks to stop, and ``failed`` for images it is told are broken. Two transports:
:class:`StoreTransport` (the event log and views directly, for controller tests without
an API) and :class:`HttpTransport` (the control-plane API, for end-to-end tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any, Protocol

import httpx
from psycopg.types.json import Jsonb

from ember.core.events import Metadata, NewEvent
from ember.core.instances import InstanceState, decide_report, instance_stream
from ember.store.eventlog import EventLog


class Transport(Protocol):
    def heartbeat(self, host_id: str) -> None: ...

    def allocations(self, host_id: str) -> list[dict[str, Any]]: ...

    def report(
        self,
        instance_id: str,
        host_id: str,
        state: str,
        exit_code: int | None,
        reason: str,
        address: str | None = None,
    ) -> None: ...


@dataclasses.dataclass
class SimAgent:
    """One simulated host. ``health_delay``: passes an instance spends ``starting``;
    ``failing_digests``: images whose instances fail instead of becoming healthy."""

    transport: Transport
    host_id: str
    health_delay: int = 0
    failing_digests: Collection[str] = ()
    address: Callable[[str], str | None] = lambda _iid: None
    """The address an instance reports (where the edge reaches it); None: no address."""
    _starting: dict[str, int] = dataclasses.field(default_factory=dict)

    def step(self) -> int:
        """Heartbeat, then converge every allocation one step; returns reports sent."""
        self.transport.heartbeat(self.host_id)
        sent = 0
        for alloc in self.transport.allocations(self.host_id):
            iid, state = alloc["instance_id"], InstanceState(alloc["state"])
            target = self._next(iid, state, alloc)
            if target is None:
                continue
            state_value, exit_code, reason = target
            address = self.address(iid) if state_value in ("starting", "healthy") else None
            self.transport.report(iid, self.host_id, state_value, exit_code, reason, address)
            sent += 1
        return sent

    def _next(
        self, iid: str, state: InstanceState, alloc: dict[str, Any]
    ) -> tuple[str, int | None, str] | None:
        if state is InstanceState.STOPPING:
            return ("stopped", 0, "")
        if state is InstanceState.ASSIGNED:
            self._starting[iid] = 0
            return ("starting", None, "")
        if state is InstanceState.STARTING:
            if alloc["spec"]["image_digest"] in self.failing_digests:
                return ("failed", 3, "exited with code 3 during boot")
            waited = self._starting.get(iid, 0)
            if waited < self.health_delay:
                self._starting[iid] = waited + 1
                return None
            return ("healthy", None, "")
        return None


class StoreTransport:
    """Straight to the event log and views, the way the API's handlers do it."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def heartbeat(self, host_id: str) -> None:
        with self.log.db.connection() as conn:
            conn.execute(
                "INSERT INTO host_heartbeats VALUES (%s, clock_timestamp(), %s) "
                "ON CONFLICT (host_id) DO UPDATE SET last_seen = EXCLUDED.last_seen",
                (host_id, Jsonb({})),
            )

    def allocations(self, host_id: str) -> list[dict[str, Any]]:
        with self.log.db.connection() as conn:
            rows = conn.execute(
                "SELECT instance_id, state, spec FROM view_instances WHERE host_id = %s "
                "AND state NOT IN ('stopped', 'failed', 'lost') ORDER BY instance_id",
                (host_id,),
            ).fetchall()
        return [{"instance_id": r[0], "state": r[1], "spec": r[2]} for r in rows]

    def report(
        self,
        instance_id: str,
        host_id: str,
        state: str,
        exit_code: int | None,
        reason: str,
        address: str | None = None,
    ) -> None:
        with self.log.db.connection() as conn:
            row = conn.execute(
                "SELECT state, host_id FROM view_instances WHERE instance_id = %s",
                (instance_id,),
            ).fetchone()
        assert row is not None
        events = decide_report(
            InstanceState(row[0]),
            row[1],
            instance_id=instance_id,
            host_id=host_id,
            state=state,
            exit_code=exit_code,
            reason=reason,
            address=address,
        )
        if events:
            stream = instance_stream(instance_id)
            meta = Metadata(actor=f"agent:{host_id}")
            self.log.append(
                stream,
                self.log.stream_version(stream),
                [NewEvent.of(e, meta) for e in events],
            )


class HttpTransport:
    """Through the control-plane API, as the real agent will (operator token for now)."""

    def __init__(self, client: httpx.Client, token: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}

    def _ok(self, response: httpx.Response) -> httpx.Response:
        assert response.status_code < 300, (response.request.url, response.text)
        return response

    def heartbeat(self, host_id: str) -> None:
        self._ok(self.client.post(f"/v1/hosts/{host_id}/heartbeat", headers=self.headers))

    def allocations(self, host_id: str) -> list[dict[str, Any]]:
        body = self._ok(
            self.client.get(f"/v1/hosts/{host_id}/allocations", headers=self.headers)
        ).json()
        items: list[dict[str, Any]] = body["items"]
        return items

    def report(
        self,
        instance_id: str,
        host_id: str,
        state: str,
        exit_code: int | None,
        reason: str,
        address: str | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "host_id": host_id,
            "state": state,
            "exit_code": exit_code,
            "reason": reason,
        }
        if address is not None:
            body["address"] = address
        self._ok(
            self.client.post(
                f"/v1/instances/{instance_id}/reports", headers=self.headers, json=body
            )
        )
