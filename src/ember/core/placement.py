"""Placement: the scheduler's pure decision ``place(snapshot, demands) -> Plan``.

Nomad's model: the decision reads an immutable :class:`Snapshot` of the hosts and writes
nothing; a separate step appends the :class:`Plan` with ``Plan.versions`` as expected
stream versions, so a plan computed from stale state is rejected and recomputed.

Rules, in the order they filter hosts for one instance:

1. only ``ready`` hosts receive anything new (cordoned, draining and down hosts keep what
   they run but get nothing more);
2. a demand with a volume goes only to the host holding that volume, and nowhere while
   an instance has the volume attached (a volume attaches to one instance): an existing
   allocation listing it in ``volume_ids``, or an instance placed earlier in the same
   plan. That check comes before all others; its reason names the instance;
3. required labels must all match, and the region must match when one is asked for;
4. memory is a hard cap: existing + new ``memory_mb + per_vm_overhead_mb`` never exceeds
   ``host memory_mb - host_reserve_mb``;
5. CPU is oversubscribed up to ``vcpus * cpu_oversubscription`` (accounted in thousandths
   of a vCPU, each instance rounded up, so rounding can only under-commit).

Among the hosts left, an instance goes to the host with the fewest instances of its group
(existing + placed so far in this plan), then the most free memory, then the smallest host
id. Demands pinned to a volume are placed first (they have exactly one candidate), then
the others, each in the order given. Host order in the snapshot and mapping order never
change the plan. The choice is made without scanning every host for every instance (see
:class:`_Planner`); ``overcommitted`` checks a plan's memory for benchmarks and tests.

Errors (bad input is refused when the objects are built; nothing is half-placed)::

    ValidationFailed
    └── InvalidPlacementInput   placement.invalid_input
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
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
    "overcommitted",
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


@dataclasses.dataclass(eq=False)
class _Load:
    """Mutable working copy of one host's remaining capacity while a plan is built."""

    host: Host
    free_mb: int
    free_millicpus: int
    per_group: dict[GroupKey, int]
    listed: tuple[int, str] = (0, "")
    """This host's entry ``(-free_mb, host id)`` in every :class:`_Pool` order it is in."""
    pools: list[list[tuple[int, str]]] = dataclasses.field(default_factory=list)
    """The orders of the pools this host belongs to."""


def _initial_load(host: Host, config: PlacementConfig) -> _Load:
    per_group: dict[GroupKey, int] = {}
    used_mb = 0
    used_millis = 0
    for a in host.allocations:
        per_group[a.group] = per_group.get(a.group, 0) + 1
        used_mb += a.memory_mb + config.per_vm_overhead_mb
        used_millis += _millicpus(a.cpus)
    cap_millis = math.floor(round(host.vcpus * config.cpu_oversubscription * 1000, 6))
    free_mb = host.memory_mb - config.host_reserve_mb - used_mb
    return _Load(
        host=host,
        free_mb=free_mb,
        free_millicpus=cap_millis - used_millis,
        per_group=per_group,
        listed=(-free_mb, host.id),
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


@dataclasses.dataclass(eq=False)
class _Pool:
    """The ready hosts matching one (labels, region) constraint, most free memory first.

    ``order`` holds ``(-free_mb, host id)`` and is kept sorted as placements shrink hosts
    (see :meth:`_Planner.relist`), so demands with the same constraints share one filter.
    """

    order: list[tuple[int, str]]
    members: frozenset[str]


class _Planner:
    """The working state of one :func:`place` call.

    The choice for one instance is the minimum of ``(instances of the group on the host,
    -free_mb, host id)`` over the eligible hosts that still fit it. It is found without
    scanning every host, using two facts that hold while one demand is being placed:

    - free capacity only shrinks, so a host that does not fit the demand now never will
      again during that demand;
    - only the chosen host changes, and it then holds the group; so among hosts without
      the group, the order by ``(-free_mb, host id)`` taken when the demand starts stays
      the order, and the first one that fits wins (a group count of 0 beats any other).

    So a demand first walks its pool's order once, taking hosts without the group; when
    none is left it continues with a heap of the hosts holding the group (few, or the
    demand is large), keyed like the choice. The pools' orders are brought up to date after
    each demand.
    """

    def __init__(self, snapshot: Snapshot, config: PlacementConfig) -> None:
        self.loads = [_initial_load(h, config) for h in sorted(snapshot.hosts, key=_host_id)]
        self.by_id = {load.host.id: load for load in self.loads}
        self.holding: dict[GroupKey, dict[str, _Load]] = {}
        """Group -> the hosts with at least one instance of it (existing or placed)."""
        for load in self.loads:
            for group in load.per_group:
                self.holding.setdefault(group, {})[load.host.id] = load
        self.pools: dict[tuple[frozenset[tuple[str, str]], str | None], _Pool] = {}

    def pool(self, demand: Demand) -> _Pool:
        key = (frozenset(demand.labels.items()), demand.region)
        found = self.pools.get(key)
        if found is None:
            members = [
                load
                for load in self.loads
                if load.host.state is HostState.READY and _matches(load.host, demand)
            ]
            found = _Pool(
                order=sorted(load.listed for load in members),
                members=frozenset(load.host.id for load in members),
            )
            for load in members:
                load.pools.append(found.order)
            self.pools[key] = found
        return found

    def take(self, load: _Load, group: GroupKey, need_mb: int, need_millis: int) -> None:
        load.free_mb -= need_mb
        load.free_millicpus -= need_millis
        load.per_group[group] = load.per_group.get(group, 0) + 1
        self.holding.setdefault(group, {})[load.host.id] = load

    def relist(self, touched: Iterable[_Load]) -> None:
        """Move hosts whose free memory changed to their new place in every pool order."""
        for load in touched:
            new = (-load.free_mb, load.host.id)
            if new == load.listed:
                continue
            for order in load.pools:
                del order[bisect.bisect_left(order, load.listed)]
                bisect.insort(order, new)
            load.listed = new

    def choose(self, demand: Demand, need_mb: int, need_millis: int) -> list[_Load]:
        """The hosts for ``demand``'s instances, in order, placing them as it goes.

        Shorter than ``demand.instances`` when the next instance fits nowhere.
        """
        group = demand.group
        count = len(demand.instances)
        pool = self.pool(demand)
        by_id = self.by_id
        chosen: list[_Load] = []
        # Hosts without the group, in the order taken when the demand started (``relist``
        # brings it up to date only after the demand).
        for neg_free_mb, host_id in pool.order:
            if len(chosen) == count or -neg_free_mb < need_mb:
                break  # done, or the rest have no more free memory than this one had
            load = by_id[host_id]
            if load.free_millicpus < need_millis or load.per_group.get(group):
                continue  # too little CPU, or holds the group (maybe since just now)
            self.take(load, group, need_mb, need_millis)
            chosen.append(load)
        if len(chosen) < count:
            # Every host left that fits holds the group.
            heap = [
                (load.per_group[group], -load.free_mb, host_id)
                for host_id, load in self.holding.get(group, {}).items()
                if host_id in pool.members
                and load.free_mb >= need_mb
                and load.free_millicpus >= need_millis
            ]
            heapq.heapify(heap)
            while heap and len(chosen) < count:
                _, _, host_id = heapq.heappop(heap)
                load = by_id[host_id]
                if load.free_mb < need_mb or load.free_millicpus < need_millis:
                    continue  # it will not fit this demand again
                self.take(load, group, need_mb, need_millis)
                chosen.append(load)
                heapq.heappush(heap, (load.per_group[group], -load.free_mb, host_id))
        self.relist(chosen)
        return chosen


def _host_id(host: Host) -> str:
    return host.id


def _attached_text(instance: int | str, demand_index: int | None) -> str:
    if demand_index is None or isinstance(instance, str):
        return f"instance {instance}"
    return f"instance {instance} of demand {demand_index}"


def place(
    snapshot: Snapshot,
    demands: Sequence[Demand],
    config: PlacementConfig = PlacementConfig(),
) -> Plan:
    """Assign each demanded instance to a host, or say why it cannot be placed."""
    planner = _Planner(snapshot, config)
    loads, by_id = planner.loads, planner.by_id
    overhead = config.per_vm_overhead_mb
    placements: list[Placement] = []
    unplaced: list[Unplaced] = []
    # Volume id -> who has it attached: existing allocations, then this plan's placements.
    attached: dict[str, str] = {}
    for load in loads:
        for a in load.host.allocations:
            for volume_id in a.volume_ids:
                attached.setdefault(volume_id, _attached_text(a.instance_id, None))

    order = sorted(range(len(demands)), key=lambda i: demands[i].volume_id is None)
    for index in order:
        demand = demands[index]
        need_mb = demand.memory_mb + overhead
        need_millis = _millicpus(demand.cpus)
        instances = demand.instances
        vol = demand.volume_id
        if vol is not None:  # exactly one instance, at most one candidate
            if vol in attached:
                reason = f"volume {vol} is already attached to {attached[vol]}"
                unplaced.append(Unplaced(index, demand, instances, reason))
                continue
            vol_host = snapshot.volumes.get(vol)
            pinned = by_id.get(vol_host) if vol_host is not None else None
            if (
                pinned is None
                or pinned.host.state is not HostState.READY
                or not _matches(pinned.host, demand)
                or pinned.free_mb < need_mb
                or pinned.free_millicpus < need_millis
            ):
                reason = _reason(snapshot, loads, by_id, demand, config)
                unplaced.append(Unplaced(index, demand, instances, reason))
                continue
            planner.take(pinned, demand.group, need_mb, need_millis)
            planner.relist([pinned])
            placements.append(Placement(index, instances[0], demand.group, pinned.host.id))
            attached[vol] = _attached_text(instances[0], index)
            continue
        chosen = planner.choose(demand, need_mb, need_millis)
        for instance, load in zip(instances[: len(chosen)], chosen, strict=True):
            placements.append(Placement(index, instance, demand.group, load.host.id))
        if len(chosen) < len(instances):
            reason = _reason(snapshot, loads, by_id, demand, config)
            unplaced.append(Unplaced(index, demand, instances[len(chosen) :], reason))

    return Plan(
        placements=tuple(placements),
        unplaced=tuple(unplaced),
        versions=_frozen_mapping(snapshot.versions),
    )


def overcommitted(
    snapshot: Snapshot,
    demands: Sequence[Demand],
    plan: Plan,
    config: PlacementConfig = PlacementConfig(),
) -> list[str]:
    """The ids of the hosts whose memory the plan, applied to the snapshot, overcommits.

    A check for benchmarks and tests: a host is listed (sorted by id) when its existing
    allocations plus the plan's placements on it, each with ``per_vm_overhead_mb``, exceed
    ``memory_mb - host_reserve_mb``. ``demands`` is the argument the plan was made from
    (placements carry no sizes). A host already overcommitted in the snapshot is listed
    even if the plan adds nothing to it; a placement on a host missing from the snapshot
    counts as overcommitting it.
    """
    overhead = config.per_vm_overhead_mb
    used: dict[str, int] = {}
    for h in snapshot.hosts:
        used[h.id] = sum(a.memory_mb + overhead for a in h.allocations)
    for p in plan.placements:
        used[p.host_id] = used.get(p.host_id, 0) + demands[p.demand_index].memory_mb + overhead
    caps = {h.id: h.memory_mb - config.host_reserve_mb for h in snapshot.hosts}
    return sorted(
        host_id for host_id, mb in used.items() if host_id not in caps or mb > caps[host_id]
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
