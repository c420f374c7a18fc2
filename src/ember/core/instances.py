"""Instances: one microVM running one process type of one release in one environment.

Lifecycle (every transition is an event; docs/specs/events.md, "Instances")::

    pending ──assigned──> assigned ──> starting ──> healthy <──> unhealthy
       │                     │            │            │            │
       └──────────── stop_requested ──> stopping ──> stopped        │
                             any live state ──> failed | lost <─────┘

- ``instance.created`` / ``instance.stop_requested`` / ``placement.failed`` are the
  controller's, on the workload stream ``workload-<app_id>.<env>``;
- ``instance.assigned`` is the scheduler's, on the host's stream;
- ``instance.starting`` / ``instance.healthy`` / ``instance.unhealthy`` /
  ``instance.stopped`` / ``instance.failed`` are reported by the host agent, and
  ``instance.lost`` written by the controller when the host is marked down, on the
  instance's own stream ``instance-<instance_id>``.

An agent's report is a state it observed; a report that changes nothing (a repeat, or a
stale report about an instance that already ended) writes nothing.

Errors::

    ValidationFailed └── InvalidReport         instance.invalid_report
    NotFound         └── InstanceNotFound      instance.not_found
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from typing import Any

import pydantic

from ember.core.errors import NotFound, ValidationFailed
from ember.core.events import EventData, EventRegistry
from ember.core.manifest import canonical_json

REGISTRY = EventRegistry()


class InstanceNotFound(NotFound):
    code = "instance.not_found"


class InvalidReport(ValidationFailed):
    code = "instance.invalid_report"


class InstanceState(enum.StrEnum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def running(self) -> bool:
        """The VM is (or is about to be) up and counts against the host."""
        return self in (self.STARTING, self.HEALTHY, self.UNHEALTHY)


TERMINAL = frozenset({InstanceState.STOPPED, InstanceState.FAILED, InstanceState.LOST})
REPORTABLE = frozenset(
    {
        InstanceState.STARTING,
        InstanceState.HEALTHY,
        InstanceState.UNHEALTHY,
        InstanceState.STOPPED,
        InstanceState.FAILED,
    }
)


def instance_stream(instance_id: str) -> str:
    return f"instance-{instance_id}"


class InstanceSpec(pydantic.BaseModel):
    """Everything an agent needs to run the instance (part of ``instance.created``)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    release_version: int
    repository: str
    image_digest: str
    command: list[str] | None = None
    env: dict[str, str] = {}
    memory_mb: int
    cpus: float
    services: list[dict[str, Any]] = []
    kill_signal: str = "SIGTERM"
    kill_timeout_s: float = 5.0
    restart_policy: str = "on-failure"
    max_retries: int = 10
    secrets_version: int = 0
    restart_generation: int = 0

    @property
    def spec_hash(self) -> str:
        """What makes two instances interchangeable: everything but the release number,
        so a rollback to identical contents replaces nothing. (Not cached here:
        ``model_copy(update=...)`` would carry a stale value; ``workloads.Desired``
        caches it for the reconciler.)"""
        body = self.model_dump(mode="json", exclude={"release_version"})
        return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()[:32]


@REGISTRY.register
class InstanceCreated(EventData):
    event_type = "instance.created"
    instance_id: str
    app_id: str
    env: str
    process: str
    spec: InstanceSpec
    spec_hash: str
    rollout_id: str | None = None
    replaces: str | None = None


@REGISTRY.register
class InstanceStopRequested(EventData):
    event_type = "instance.stop_requested"
    instance_id: str
    reason: str


@REGISTRY.register
class PlacementFailed(EventData):
    """Some instances of a process fit on no host; recorded when the reason changes."""

    event_type = "placement.failed"
    app_id: str
    env: str
    process: str
    instance_ids: list[str]
    reason: str


@REGISTRY.register
class InstanceStarting(EventData):
    event_type = "instance.starting"
    instance_id: str
    host_id: str
    address: str | None = None
    """The instance's IP address, where the edge reaches it (an IP literal, no zone)."""


@REGISTRY.register
class InstanceHealthy(EventData):
    event_type = "instance.healthy"
    instance_id: str
    host_id: str
    address: str | None = None


@REGISTRY.register
class InstanceUnhealthy(EventData):
    event_type = "instance.unhealthy"
    instance_id: str
    host_id: str
    reason: str = ""


@REGISTRY.register
class InstanceStopped(EventData):
    event_type = "instance.stopped"
    instance_id: str
    host_id: str
    exit_code: int | None = None


@REGISTRY.register
class InstanceFailed(EventData):
    event_type = "instance.failed"
    instance_id: str
    host_id: str
    reason: str
    exit_code: int | None = None


@REGISTRY.register
class InstanceLost(EventData):
    event_type = "instance.lost"
    instance_id: str
    host_id: str
    reason: str


_REPORT_EVENTS: dict[InstanceState, type[EventData]] = {
    InstanceState.STARTING: InstanceStarting,
    InstanceState.HEALTHY: InstanceHealthy,
    InstanceState.UNHEALTHY: InstanceUnhealthy,
    InstanceState.STOPPED: InstanceStopped,
    InstanceState.FAILED: InstanceFailed,
}


def decide_report(
    current: InstanceState,
    assigned_host: str | None,
    *,
    instance_id: str,
    host_id: str,
    state: str,
    exit_code: int | None = None,
    reason: str = "",
    address: str | None = None,
) -> list[EventData]:
    """The event for an agent's report about ``instance_id``, or nothing when the report
    changes nothing. Only the host the instance is assigned to may report on it.

    ``address`` (the instance's IP, where the edge reaches it) comes with ``starting`` or
    ``healthy``; a later report without one keeps the known address."""
    try:
        observed = InstanceState(state)
    except ValueError:
        observed = None
    if observed not in REPORTABLE:
        raise InvalidReport(
            f"an agent reports one of {', '.join(sorted(s.value for s in REPORTABLE))}, "
            f"not {state!r}",
            detail={"field": "state"},
        )
    assert observed is not None
    if address is not None:
        address = check_instance_address(address, observed)
    if assigned_host != host_id:
        raise InstanceNotFound(
            f"instance {instance_id} is not assigned to host {host_id}",
            detail={"instance_id": instance_id},
        )
    if observed == InstanceState.FAILED and not reason:
        reason = f"exited with code {exit_code}" if exit_code is not None else "failed"
    if current.terminal or current == observed:
        return []
    if current == InstanceState.STOPPING and observed in (
        InstanceState.STARTING,
        InstanceState.HEALTHY,
        InstanceState.UNHEALTHY,
    ):
        return []  # still shutting down; only the end matters now
    fields: dict[str, Any] = {"instance_id": instance_id, "host_id": host_id}
    if observed in (InstanceState.STOPPED, InstanceState.FAILED):
        fields["exit_code"] = exit_code
    if observed in (InstanceState.FAILED, InstanceState.UNHEALTHY):
        fields["reason"] = reason[:500]
    if address is not None:
        fields["address"] = address
    return [_REPORT_EVENTS[observed](**fields)]


def check_instance_address(address: str, observed: InstanceState) -> str:
    """An instance's address as reported: a unicast IP literal without zone or brackets,
    on a ``starting`` or ``healthy`` report; returned in its normal form."""
    if observed not in (InstanceState.STARTING, InstanceState.HEALTHY):
        raise InvalidReport(
            f"an address comes with a starting or healthy report, not {observed.value}",
            detail={"field": "address"},
        )
    try:
        ip = ipaddress.ip_address(address) if "%" not in address else None
    except ValueError:
        ip = None
    if ip is None or ip.is_unspecified or ip.is_multicast:
        raise InvalidReport(
            f"invalid instance address {address!r}: an IPv6 or IPv4 unicast address",
            detail={"field": "address"},
        )
    return str(ip)


_EVENT_STATE = {
    "instance.assigned": InstanceState.ASSIGNED,
    "instance.starting": InstanceState.STARTING,
    "instance.healthy": InstanceState.HEALTHY,
    "instance.unhealthy": InstanceState.UNHEALTHY,
    "instance.stop_requested": InstanceState.STOPPING,
    "instance.stopped": InstanceState.STOPPED,
    "instance.failed": InstanceState.FAILED,
    "instance.lost": InstanceState.LOST,
}


def next_state(current: InstanceState, event_type: str) -> InstanceState | None:
    """The state after ``event_type``, or None when the event changes nothing.

    Monotone where reports can race with the controller: an ended instance stays ended,
    and a stopping one only moves to an end; a stop of an instance no host has yet
    ends it at once."""
    target = _EVENT_STATE.get(event_type)
    if target is None or current.terminal or target == current:
        return None
    if target is InstanceState.STOPPING and current is InstanceState.PENDING:
        return InstanceState.STOPPED
    if current is InstanceState.STOPPING and not target.terminal:
        return None
    if target is InstanceState.ASSIGNED and current is not InstanceState.PENDING:
        return None
    return target
