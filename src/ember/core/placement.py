"""Placement: the scheduler's pure decision ``place(snapshot, demands) -> Plan``.

Nomad's model: the decision reads an immutable :class:`Snapshot` of the hosts and writes
nothing; a separate step appends the :class:`Plan` with ``Plan.versions`` as expected
stream versions, so a plan computed from stale state is rejected and recomputed.

Rules, in the order they filter hosts for one instance:

1. only ``ready`` hosts receive anything new (cordoned, draining and down hosts keep what
   they run but get nothing more);
2. a demand with a volume goes only to the host holding that volume;
3. required labels must all match, and the region must match when one is asked for;
4. memory is a hard cap: existing + new ``memory_mb + per_vm_overhead_mb`` never exceeds
   ``host memory_mb - host_reserve_mb``;
5. CPU is oversubscribed up to ``vcpus * cpu_oversubscription`` (accounted in thousandths
   of a vCPU, each instance rounded up, so rounding can only under-commit).

Among the hosts left, an instance goes to the host with the fewest instances of its group
(existing + placed so far in this plan), then the most free memory, then the smallest host
id. Demands pinned to a volume are placed first (they have exactly one candidate), then
the others, each in the order given. Host order in the snapshot and mapping order never
change the plan.

Errors (bad input is refused when the objects are built; nothing is half-placed)::

    ValidationFailed
    └── InvalidPlacementInput   placement.invalid_input
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TypeVar

from ember.core.errors import ValidationFailed

__all__ = [
    "Allocation",
    "Demand",
    "GroupKey",
    "Host",
    "HostState",
    "InvalidPlacementInput",
    "Placement",
    "PlacementConfig",
    "Plan",
    "Snapshot",
    "Unplaced",
    "place",
]


class InvalidPlacementInput(ValidationFailed):
    code = "placement.invalid_input"


class HostState(enum.StrEnum):
    READY = "ready"
    CORDONED = "cordoned"
    DRAINING = "draining"
    DOWN = "down"


@dataclasses.dataclass(frozen=True, order=True)
class GroupKey:
    """The replicas that spread across hosts: one process type of one app environment."""

    app_id: str
    env: str
    process: str

    def __str__(self) -> str:
        return f"{self.app_id}/{self.env}/{self.process}"


@dataclasses.dataclass(frozen=True)
class Allocation:
    """An instance already assigned to a host."""

    instance_id: str
    group: GroupKey
    cpus: float
    memory_mb: int
    volume_ids: tuple[str, ...] = ()


K = TypeVar("K")
V = TypeVar("V")


def _frozen_mapping(value: Mapping[K, V]) -> Mapping[K, V]:
    return MappingProxyType(dict(value))


@dataclasses.dataclass(frozen=True)
class Host:
    id: str
    state: HostState
    vcpus: int
    memory_mb: int
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    region: str = ""
    allocations: tuple[Allocation, ...] = ()

    def __post_init__(self) -> None:
        if self.vcpus < 0 or self.memory_mb < 0:
            raise InvalidPlacementInput(
                f"host {self.id} has negative capacity",
                detail={"field": "host", "host_id": self.id},
            )
        object.__setattr__(self, "labels", _frozen_mapping(self.labels))
        object.__setattr__(self, "allocations", tuple(self.allocations))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    hosts: tuple[Host, ...]
    volumes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Volume id -> the id of the host holding it."""
    versions: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Host id -> stream version read; passed through to ``Plan.versions``."""

    def __post_init__(self) -> None:
        ids = [h.id for h in self.hosts]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidPlacementInput(
                f"duplicate host ids in snapshot: {', '.join(dup)}",
                detail={"field": "hosts", "duplicates": dup},
            )
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "volumes", _frozen_mapping(self.volumes))
        object.__setattr__(self, "versions", _frozen_mapping(self.versions))


@dataclasses.dataclass(frozen=True)
class Demand:
    """New instances of one group: ``count`` anonymous ones, or the given ``instance_ids``.

    A volume attaches to one instance, so a demand with ``volume_id`` asks for exactly one.
    """

    group: GroupKey
    cpus: float
    memory_mb: int
    count: int = 0
    instance_ids: tuple[str, ...] = ()
    volume_id: str | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    region: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "instance_ids", tuple(self.instance_ids))
        object.__setattr__(self, "labels", _frozen_mapping(self.labels))
        problem = None
        if not (self.cpus > 0 and math.isfinite(self.cpus)):
            problem = "cpus must be a positive number"
        elif self.memory_mb <= 0:
            problem = "memory_mb must be positive"
        elif self.count < 0:
            problem = "count must not be negative"
        elif self.count and self.instance_ids:
            problem = "give either count or instance_ids, not both"
        elif len(set(self.instance_ids)) != len(self.instance_ids):
            problem = "instance_ids must be unique"
        elif self.volume_id is not None and len(self.instances) != 1:
            problem = "a demand with a volume asks for exactly one instance"
        if problem:
            raise InvalidPlacementInput(
                f"invalid demand for {self.group}: {problem}",
                detail={"field": "demand", "group": str(self.group)},
            )

    @property
    def instances(self) -> tuple[int | str, ...]:
        """The instance ids, or indices ``0..count-1`` when the demand gives a count."""
        if self.instance_ids:
            return self.instance_ids
        return tuple(range(self.count))


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    cpu_oversubscription: float = 4.0
    per_vm_overhead_mb: int = 32
    host_reserve_mb: int = 512

    def __post_init__(self) -> None:
        if not (self.cpu_oversubscription > 0 and math.isfinite(self.cpu_oversubscription)):
            raise InvalidPlacementInput(
                "cpu_oversubscription must be a positive number",
                detail={"field": "cpu_oversubscription"},
            )
        if self.per_vm_overhead_mb < 0 or self.host_reserve_mb < 0:
            raise InvalidPlacementInput(
                "per_vm_overhead_mb and host_reserve_mb must not be negative",
                detail={"field": "placement_config"},
            )


@dataclasses.dataclass(frozen=True)
class Placement:
    demand_index: int
    """Position of the demand in the ``demands`` argument."""
    instance: int | str
    """An element of ``Demand.instances``."""
    group: GroupKey
    host_id: str


@dataclasses.dataclass(frozen=True)
class Unplaced:
    """Instances of one demand that fit nowhere, and why (shown by ``ember status``).

    Free capacity only shrinks while placing, so once one instance of a demand does not
    fit, none of the demand's later instances fit either: they share one reason.
    """

    demand_index: int
    demand: Demand
    instances: tuple[int | str, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...]
    versions: Mapping[str, int]
    """The snapshot's host stream versions: the expected versions when appending."""


# -- the decision ------------------------------------------------------------------------


def _millicpus(cpus: float) -> int:
    # Round to 1e-6 first so 0.1 * 1000 does not become 101 thousandths.
    return math.ceil(round(cpus * 1000, 6))


def _fmt_cpus(millis: int) -> str:
    return f"{millis / 1000:g}"


@dataclasses.dataclass
class _Load:
    """Mutable working copy of one host's remaining capacity while a plan is built."""

    host: Host
    free_mb: int
    free_millicpus: int
    per_group: dict[GroupKey, int]


def _initial_load(host: Host, config: PlacementConfig) -> _Load:
    per_group: dict[GroupKey, int] = {}
    used_mb = 0
    used_millis = 0
    for a in host.allocations:
        per_group[a.group] = per_group.get(a.group, 0) + 1
        used_mb += a.memory_mb + config.per_vm_overhead_mb
        used_millis += _millicpus(a.cpus)
    cap_millis = math.floor(round(host.vcpus * config.cpu_oversubscription * 1000, 6))
    return _Load(
        host=host,
        free_mb=host.memory_mb - config.host_reserve_mb - used_mb,
        free_millicpus=cap_millis - used_millis,
        per_group=per_group,
    )


def _matches(host: Host, demand: Demand) -> bool:
    if demand.region is not None and host.region != demand.region:
        return False
    return all(host.labels.get(k) == v for k, v in demand.labels.items())


def _constraint_text(demand: Demand) -> str:
    parts = []
    if demand.region is not None:
        parts.append(f"region {demand.region!r}")
    if demand.labels:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(demand.labels.items()))
        parts.append(f"labels {labels}")
    return " and ".join(parts)


def _state_summary(loads: Sequence[_Load]) -> str:
    counts: dict[str, int] = {}
    for load in loads:
        counts[load.host.state.value] = counts.get(load.host.state.value, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def place(
    snapshot: Snapshot,
    demands: Sequence[Demand],
    config: PlacementConfig = PlacementConfig(),
) -> Plan:
    """Assign each demanded instance to a host, or say why it cannot be placed."""
    loads = [_initial_load(h, config) for h in sorted(snapshot.hosts, key=lambda h: h.id)]
    by_id = {load.host.id: load for load in loads}
    overhead = config.per_vm_overhead_mb
    placements: list[Placement] = []
    unplaced: list[Unplaced] = []

    order = sorted(range(len(demands)), key=lambda i: demands[i].volume_id is None)
    for index in order:
        demand = demands[index]
        need_mb = demand.memory_mb + overhead
        need_millis = _millicpus(demand.cpus)
        if demand.volume_id is not None:
            vol_host = snapshot.volumes.get(demand.volume_id)
            pinned = by_id.get(vol_host) if vol_host is not None else None
            eligible = [pinned] if pinned is not None else []
        else:
            eligible = loads
        eligible = [
            load
            for load in eligible
            if load.host.state is HostState.READY and _matches(load.host, demand)
        ]
        instances = demand.instances
        for position, instance in enumerate(instances):
            best: _Load | None = None
            best_key: tuple[int, int, str] | None = None
            for load in eligible:
                if load.free_mb < need_mb or load.free_millicpus < need_millis:
                    continue
                key = (load.per_group.get(demand.group, 0), -load.free_mb, load.host.id)
                if best_key is None or key < best_key:
                    best, best_key = load, key
            if best is None:
                unplaced.append(
                    Unplaced(
                        demand_index=index,
                        demand=demand,
                        instances=instances[position:],
                        reason=_reason(snapshot, loads, by_id, demand, config),
                    )
                )
                break
            best.free_mb -= need_mb
            best.free_millicpus -= need_millis
            best.per_group[demand.group] = best.per_group.get(demand.group, 0) + 1
            placements.append(Placement(index, instance, demand.group, best.host.id))

    return Plan(
        placements=tuple(placements),
        unplaced=tuple(unplaced),
        versions=_frozen_mapping(snapshot.versions),
    )


def _reason(
    snapshot: Snapshot,
    loads: Sequence[_Load],
    by_id: Mapping[str, _Load],
    demand: Demand,
    config: PlacementConfig,
) -> str:
    """Why no host can take one more instance of ``demand`` (the first filter that fails)."""
    if demand.volume_id is not None:
        return _volume_reason(snapshot, by_id, demand.volume_id, demand, config)
    return _cluster_reason(loads, demand, config)


def _sized(demand: Demand, config: PlacementConfig) -> str:
    return f"a {demand.memory_mb} MB instance (+{config.per_vm_overhead_mb} MB VM overhead)"


def _volume_reason(
    snapshot: Snapshot,
    by_id: Mapping[str, _Load],
    vol: str,
    demand: Demand,
    config: PlacementConfig,
) -> str:
    need_mb = demand.memory_mb + config.per_vm_overhead_mb
    host_id = snapshot.volumes.get(vol)
    if host_id is None:
        return f"volume {vol} is not on any known host"
    load = by_id.get(host_id)
    if load is None:
        return f"volume {vol} is on {host_id}, which is not a registered host"
    where = f"volume {vol} is on {host_id}, which"
    if load.host.state is not HostState.READY:
        return f"{where} is {load.host.state.value}"
    if not _matches(load.host, demand):
        return f"{where} does not match {_constraint_text(demand)}"
    if load.free_mb < need_mb:
        return (
            f"{where} has {max(load.free_mb, 0)} MB of free memory; "
            f"{_sized(demand, config)} needs {need_mb} MB"
        )
    return (
        f"{where} has {_fmt_cpus(max(load.free_millicpus, 0))} vCPUs free under "
        f"{config.cpu_oversubscription:g}x CPU oversubscription; "
        f"the instance needs {_fmt_cpus(_millicpus(demand.cpus))}"
    )


def _cluster_reason(loads: Sequence[_Load], demand: Demand, config: PlacementConfig) -> str:
    need_mb = demand.memory_mb + config.per_vm_overhead_mb
    if not loads:
        return "no hosts are registered"
    ready = [load for load in loads if load.host.state is HostState.READY]
    if not ready:
        return f"no host is ready ({_state_summary(loads)})"
    matching = [load for load in ready if _matches(load.host, demand)]
    constraints = _constraint_text(demand)
    if not matching:
        return f"no ready host matches {constraints}"
    subject = f"no ready host matching {constraints}" if constraints else "no ready host"
    with_memory = [load for load in matching if load.free_mb >= need_mb]
    if not with_memory:
        top = min(matching, key=lambda load: (-load.free_mb, load.host.id))
        return (
            f"{subject} has {need_mb} MB of free memory for {_sized(demand, config)} "
            f"(largest free: {max(top.free_mb, 0)} MB on {top.host.id})"
        )
    top = min(with_memory, key=lambda load: (-load.free_millicpus, load.host.id))
    return (
        f"{subject} with enough free memory has {_fmt_cpus(_millicpus(demand.cpus))} "
        f"vCPUs free under {config.cpu_oversubscription:g}x CPU oversubscription "
        f"(most free: {_fmt_cpus(max(top.free_millicpus, 0))} on {top.host.id})"
    )
