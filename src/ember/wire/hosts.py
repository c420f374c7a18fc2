"""Request and response bodies of the host and agent routes (docs/specs/api.md, "Hosts").

Hosts are platform objects, not an org's: only platform operators reach these routes, and
a host's own node identity its agent routes (enrolment: ``AgentEnroll``, ADR-0015).
Numbers are checked by the server (ember.core.hosts.check_registration), which answers
422 ``host.invalid`` with ``detail.field``; the ranges below document that rule.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from ember.wire.models import Body


class HostRegister(Body):
    vcpus: int = Field(description="CPUs the host offers to instances (1-4096).", examples=[8])
    memory_mb: int = Field(
        description="Memory the host offers to instances, MiB (128-67108864).", examples=[16384]
    )
    disk_mb: int = Field(0, description="Disk for root filesystems and volumes, MiB.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="At most 64; keys: lowercase letters, digits, '.', '_', '/', '-'.",
    )
    region: str = Field("", description="At most 63 characters.", examples=["fra"])
    address: str = Field(
        "", max_length=255, description="Where the control plane and peers reach the host."
    )


class EnrollmentTokenCreate(Body):
    host_id: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        description="The only host the token may enrol; omitted: any host id (but a host "
        "that has a node identity is re-enrolled only with a token made for it).",
        examples=["web-1"],
    )
    expires_in_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Seconds until the token expires (60-604800)."
    )


class EnrollmentTokenCreated(BaseModel):
    token: str = Field(
        description="The one-time token (ember_agt_...). Shown once; only its hash is stored."
    )
    host_id: str | None
    expires_at: dt.datetime


class AgentEnroll(HostRegister):
    """The host's facts (as in ``PUT /v1/hosts/{host_id}``), its id and its public key,
    with the one-time token."""

    token: str = Field(min_length=1, max_length=100, description="The enrolment token.")
    host_id: str = Field(min_length=1, max_length=63, examples=["web-1"])
    public_key: str = Field(
        min_length=43,
        max_length=43,
        pattern=r"^[A-Za-z0-9_-]{43}$",
        description="The node's Ed25519 public key: raw 32 bytes, base64url without padding.",
    )


class Enrolled(BaseModel):
    host_id: str


class HostHeartbeat(Body):
    report: dict[str, object] = Field(
        default_factory=dict,
        description="Free-form facts from the agent (at most 64 KiB as JSON); kept with "
        "the last heartbeat only, never in the event log.",
    )


class HostUsage(BaseModel):
    instances: int = Field(description="Instances on the host that have not ended.")
    memory_mb: int = Field(description="Their memory, MiB (never more than the host's).")
    cpus: float = Field(description="Their CPUs (may exceed vcpus: CPU is oversubscribed).")


class Host(BaseModel):
    id: str
    state: str = Field(description="down | ready | cordoned | draining")
    admin_state: str = Field(description="ready | cordoned | draining (the operator's)")
    vcpus: int
    memory_mb: int
    disk_mb: int
    labels: dict[str, str]
    region: str
    address: str
    last_seen: dt.datetime | None = Field(description="The last heartbeat; null if none yet.")
    public_key: str | None = Field(
        None,
        description="The node identity's Ed25519 public key (base64url); null until the "
        "host's agent enrols.",
    )
    registered_at: dt.datetime
    state_since: dt.datetime
    usage: HostUsage


class HostInstance(BaseModel):
    instance_id: str
    app_id: str
    org: str | None = Field(description="The app's org name (null once the app is deleted).")
    app: str | None = Field(description="The app's name (null once the app is deleted).")
    env: str
    process: str
    state: str
    memory_mb: int
    cpus: float


class HostDetail(Host):
    instances: list[HostInstance] = Field(description="The host's instances that have not ended.")


class Allocation(BaseModel):
    instance_id: str
    org_id: str = Field(
        "",
        description="The app's org: the host's firewall lets instances of one org reach "
        "each other and no other org's.",
    )
    app_id: str
    env: str
    process: str
    state: str
    desired: Literal["run", "stop"] = Field(description="stop while the instance is stopping.")
    spec: dict[str, object] = Field(
        description="Everything needed to run the instance (ember.core.instances.InstanceSpec)."
    )


class Allocations(BaseModel):
    host_id: str
    cursor: str = Field(
        description="The scheduling views' position in the event log: the items are "
        "exactly the state at this cursor (watch from here)."
    )
    items: list[Allocation]


class AllocationEvent(BaseModel):
    type: Literal["added", "modified", "removed"] = Field(
        description="added: newly assigned to the host; modified: its state or desired "
        "changed; removed: it ended (stopped, failed, lost): stop and forget it."
    )
    allocation: Allocation = Field(
        description="The allocation as it is now (removed: its final state, desired stop)."
    )


class AllocationChanges(BaseModel):
    host_id: str
    cursor: str = Field(
        description="Applying the events to the allocations at the request's cursor gives "
        "exactly the allocations at this one (watch from here next)."
    )
    events: list[AllocationEvent] = Field(
        description="Each changed allocation once, by instance id; empty when the wait ran "
        "out. At least once: an event may repeat what the caller has already seen."
    )


class InstanceReport(Body):
    host_id: str = Field(min_length=1, max_length=63)
    state: str = Field(
        min_length=1,
        max_length=20,
        description="What the agent observed: starting | healthy | unhealthy | stopped | failed",
    )
    exit_code: int | None = Field(None, ge=-(2**31), le=2**31 - 1)
    reason: str = Field("", max_length=2000)
    address: str | None = Field(
        None,
        max_length=45,
        description="With starting or healthy: the instance's IP address (IPv6 or IPv4, "
        "no brackets or zone), where the edge reaches it.",
        examples=["fd00:e:1::a"],
    )


class InstanceReportAccepted(BaseModel):
    instance_id: str
    state: str = Field(description="The instance's state after the report.")
