"""Hosts: the machines that run instances, as streams ``host-<host_id>``.

A host's stream holds what changes its capacity or what it may receive: registration,
the operator's cordon / uncordon / drain, the controller's down / recovered verdicts,
``instance.assigned`` (the scheduler's plans), and ``host.identity_bound`` (the node
identity's public key, from enrolment: ember.core.enrollment, ADR-0015). A plan is
appended to the streams of the hosts it uses with the versions it read as expected
versions, so a plan computed before a cordon or another plan is refused and recomputed
(ADR-0014).

Heartbeats are not events: they only move a host's ``last_seen`` (docs/specs/events.md,
"Hosts"); the controller turns a silence longer than the heartbeat timeout into
``host.marked_down`` and a heartbeat after that into ``host.recovered``.

State shown to users: ``down`` while marked down, otherwise the operator's state
(``ready``, ``cordoned``, ``draining``).

Errors::

    NotFound  └── HostNotFound        host.not_found
    ValidationFailed └── InvalidHost  host.invalid
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Mapping

import pydantic

from ember.core.errors import NotFound, ValidationFailed
from ember.core.events import EventData, EventRegistry, RecordedEvent
from ember.core.placement import HostState

REGISTRY = EventRegistry()
HOST_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
LABEL_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,62}$")


class HostNotFound(NotFound):
    code = "host.not_found"


class InvalidHost(ValidationFailed):
    code = "host.invalid"


def host_stream(host_id: str) -> str:
    return f"host-{host_id}"


@REGISTRY.register
class HostRegistered(EventData):
    """First registration, or a later one that changed what the host reports."""

    event_type = "host.registered"
    host_id: str
    vcpus: int
    memory_mb: int
    disk_mb: int
    labels: dict[str, str] = pydantic.Field(default_factory=dict)
    region: str = ""
    address: str = ""


@REGISTRY.register
class HostIdentityBound(EventData):
    """The host's agent enrolled: requests signed with this Ed25519 key (raw 32 bytes,
    base64url without padding) act for the host. A later one replaces the key (rotation)."""

    event_type = "host.identity_bound"
    host_id: str
    public_key: str


@REGISTRY.register
class HostCordoned(EventData):
    event_type = "host.cordoned"
    host_id: str


@REGISTRY.register
class HostUncordoned(EventData):
    event_type = "host.uncordoned"
    host_id: str


@REGISTRY.register
class HostDrainStarted(EventData):
    event_type = "host.drain_started"
    host_id: str


@REGISTRY.register
class HostMarkedDown(EventData):
    event_type = "host.marked_down"
    host_id: str
    reason: str


@REGISTRY.register
class HostRecovered(EventData):
    event_type = "host.recovered"
    host_id: str


@REGISTRY.register
class InstanceAssigned(EventData):
    """The scheduler put an instance on this host (it counts against the host's memory
    from now until the instance ends)."""

    event_type = "instance.assigned"
    host_id: str
    instance_id: str
    app_id: str
    env: str
    process: str
    memory_mb: int
    cpus: float
    volume_ids: list[str] = pydantic.Field(default_factory=list)


@dataclasses.dataclass
class HostRecord:
    """A host's stream folded (decisions need only this, not the whole view)."""

    registered: HostRegistered | None = None
    admin_state: HostState = HostState.READY
    down: bool = False
    public_key: str | None = None
    version: int = 0

    @property
    def state(self) -> HostState:
        return HostState.DOWN if self.down else self.admin_state


def fold_host(events: Iterable[RecordedEvent]) -> HostRecord:
    rec = HostRecord()
    for e in events:
        rec.version = e.stream_version
        if e.type == "host.registered":
            rec.registered = HostRegistered.model_validate(e.data)
        elif e.type == "host.cordoned":
            rec.admin_state = HostState.CORDONED
        elif e.type == "host.uncordoned":
            rec.admin_state = HostState.READY
        elif e.type == "host.drain_started":
            rec.admin_state = HostState.DRAINING
        elif e.type == "host.marked_down":
            rec.down = True
        elif e.type == "host.recovered":
            rec.down = False
        elif e.type == "host.identity_bound":
            rec.public_key = str(e.data["public_key"])
    return rec


def check_registration(
    host_id: str,
    *,
    vcpus: int,
    memory_mb: int,
    disk_mb: int,
    labels: Mapping[str, str],
    region: str,
) -> None:
    def bad(field: str, message: str) -> InvalidHost:
        return InvalidHost(message, detail={"field": field})

    if not HOST_ID_RE.match(host_id or ""):
        raise bad("host_id", f"invalid host id {host_id!r}: lowercase letters, digits and '-'")
    if not 1 <= vcpus <= 4096:
        raise bad("vcpus", "vcpus must be between 1 and 4096")
    if not 128 <= memory_mb <= 64 * 1024 * 1024:
        raise bad("memory_mb", "memory_mb must be between 128 and 67108864")
    if not 0 <= disk_mb <= 1 << 40:
        raise bad("disk_mb", "disk_mb must be between 0 and 2^40")
    if len(labels) > 64:
        raise bad("labels", "at most 64 labels")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key) or len(value) > 63:
            raise bad("labels", f"invalid label {key!r}={value!r}")
    if len(region) > 63:
        raise bad("region", "region has at most 63 characters")


def decide_register(rec: HostRecord, new: HostRegistered) -> list[EventData]:
    """Idempotent: re-registering with the same facts writes nothing."""
    return [] if rec.registered == new else [new]


def decide_bind(rec: HostRecord, new: HostRegistered, public_key: str) -> list[EventData]:
    """Enrolment on the host's stream: the registration (when its facts are new) and the
    identity (when the key is new). Enrolling again with the same facts and key writes
    nothing here."""
    events = decide_register(rec, new)
    if rec.public_key != public_key:
        events.append(HostIdentityBound(host_id=new.host_id, public_key=public_key))
    return events


def decide_admin(rec: HostRecord, host_id: str, action: str) -> list[EventData]:
    """``cordon`` / ``uncordon`` / ``drain``; repeating the current state writes nothing."""
    if rec.registered is None:
        raise HostNotFound(f"no host {host_id!r}", hint="'ember hosts list' shows the hosts")
    target = {
        "cordon": (HostState.CORDONED, HostCordoned),
        "uncordon": (HostState.READY, HostUncordoned),
        "drain": (HostState.DRAINING, HostDrainStarted),
    }
    if action not in target:
        raise InvalidHost(f"unknown host action {action!r}", detail={"field": "action"})
    state, event = target[action]
    if rec.admin_state is state:
        return []
    return [event(host_id=host_id)]


@dataclasses.dataclass(frozen=True)
class Liveness:
    host_id: str
    down: bool
    last_seen: dt.datetime


def liveness_changes(
    hosts: Iterable[Liveness], now: dt.datetime, timeout_s: float
) -> tuple[list[HostMarkedDown], list[HostRecovered]]:
    """Hosts silent for longer than ``timeout_s`` go down; a down host heard from again
    within the timeout recovers."""
    down: list[HostMarkedDown] = []
    recovered: list[HostRecovered] = []
    for h in sorted(hosts, key=lambda h: h.host_id):
        silent = (now - h.last_seen).total_seconds()
        if not h.down and silent > timeout_s:
            down.append(
                HostMarkedDown(
                    host_id=h.host_id,
                    reason=f"no heartbeat for {silent:.0f}s (timeout {timeout_s:g}s)",
                )
            )
        elif h.down and silent <= timeout_s:
            recovered.append(HostRecovered(host_id=h.host_id))
    return down, recovered
