"""The scheduler's pure placement function (ember.core.placement).

Properties, over random clusters (host states, capacities, labels, regions, existing
allocations that may already overcommit a host, volumes on known and unknown hosts) and
random demands (counts or instance ids, volumes, labels, regions) and configs:

- accounting: every demanded instance is either placed exactly once or listed as unplaced
  exactly once, and for each demand the placed ones come first (a prefix);
- memory: on every host that receives something new, existing + new
  (memory_mb + per-VM overhead) <= memory_mb - reserve;
- CPU: on every host that receives something new, existing + new cpus <= vcpus * ratio;
- only ready hosts receive new instances; label and region constraints hold;
- volume locality: an instance with a volume lands on the volume's host;
- volume exclusivity: a volume already attached (by an existing allocation, or by an
  instance placed earlier in the plan) is attached to no new instance;
- completeness: an unplaced demand fits on none of its eligible hosts in the final state
  (so the planner never gives up while room is left), unless its volume is attached;
- spread: for a group G and a host h that received new replicas of G from a (non-volume)
  demand d — the last such demand — every host h' that is ready, matches d's constraints
  and still has room for one more instance of d at the end holds at least
  count(h, G) - 1 replicas of G, counting existing allocations plus new placements;
- determinism: the same input gives an equal plan, also when the snapshot's hosts and
  mappings are given in another order;
- equivalence: ``place`` gives exactly the plan of ``_reference_place`` (at the end of
  this file), the plain scan of every host for every instance that it replaced, over the
  clusters above and over denser ones (ties in free memory, demands larger than the
  cluster, many demands sharing a group or constraints);
- ``overcommitted`` finds no host in any plan ``place`` makes.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.core.errors import ValidationFailed
from ember.core.placement import (
    Allocation,
    Demand,
    GroupKey,
    Host,
    HostState,
    InvalidPlacementInput,
    Placement,
    PlacementConfig,
    Plan,
    Snapshot,
    Unplaced,
    overcommitted,
    place,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GROUPS = [GroupKey("app-1", "prod", "web"), GroupKey("app-1", "prod", "worker")]
GROUPS.append(GroupKey("app-2", "staging", "web"))
CPUS = [0.25, 0.5, 1.0, 2.0]  # binary fractions: float sums in the assertions are exact
LABELS = {"gpu": "a100", "disk": "ssd"}
REGIONS = ["ams", "iad"]
#: Sizes that, with the 32 MB overhead, fill power-of-two hosts exactly: capacity
#: boundaries (and an implementation that forgets the overhead) are hit often.
INSTANCE_MB = [128, 224, 256, 480, 992, 1000, 2016]


def label_subsets() -> st.SearchStrategy[dict[str, str]]:
    return st.sets(st.sampled_from(sorted(LABELS))).map(lambda ks: {k: LABELS[k] for k in ks})


@st.composite
def allocations(draw: st.DrawFn, host_index: int) -> tuple[Allocation, ...]:
    n = draw(st.integers(0, 4))
    return tuple(
        Allocation(
            instance_id=f"old-{host_index}-{i}",
            group=draw(st.sampled_from(GROUPS)),
            cpus=draw(st.sampled_from(CPUS)),
            memory_mb=draw(st.sampled_from(INSTANCE_MB)),
            volume_ids=draw(st.sampled_from([(), (), (), ("vol-0",), ("vol-1", "vol-9")])),
        )
        for i in range(n)
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    n = draw(st.integers(0, 7))
    hosts = tuple(
        Host(
            id=f"host-{i}",
            state=draw(st.sampled_from([*[HostState.READY] * 4, *HostState])),
            vcpus=draw(st.integers(1, 8)),
            memory_mb=draw(st.sampled_from([512, 1024, 2048, 4096, 8192, 16384])),
            labels=draw(label_subsets()),
            region=draw(st.sampled_from(REGIONS)),
            allocations=draw(allocations(i)),
        )
        for i in range(n)
    )
    host_ids = [h.id for h in hosts] + ["host-gone"]
    volumes = {f"vol-{i}": draw(st.sampled_from(host_ids)) for i in range(draw(st.integers(0, 4)))}
    versions = {h.id: draw(st.integers(0, 50)) for h in hosts}
    return Snapshot(hosts=hosts, volumes=volumes, versions=versions)


@st.composite
def demand_lists(draw: st.DrawFn, snapshot: Snapshot) -> list[Demand]:
    volume_ids = [*sorted(snapshot.volumes), "vol-missing"]
    out = []
    for i in range(draw(st.integers(0, 5))):
        group = draw(st.sampled_from(GROUPS))
        volume = draw(st.none() | st.sampled_from(volume_ids))
        if volume is not None:
            ids = (f"new-{i}-0",) if draw(st.booleans()) else ()
            count = 0 if ids else 1
        elif draw(st.booleans()):
            count, ids = draw(st.integers(0, 8)), ()
        else:
            count, ids = 0, tuple(f"new-{i}-{j}" for j in range(draw(st.integers(0, 5))))
        out.append(
            Demand(
                group=group,
                cpus=draw(st.sampled_from(CPUS)),
                memory_mb=draw(st.sampled_from(INSTANCE_MB)),
                count=count,
                instance_ids=ids,
                volume_id=volume,
                labels=draw(st.just({}) if draw(st.integers(0, 3)) else label_subsets()),
                region=draw(st.sampled_from([None, None, None, *REGIONS])),
            )
        )
    return out


configs = st.builds(
    PlacementConfig,
    cpu_oversubscription=st.sampled_from([1.0, 2.0, 4.0]),
    per_vm_overhead_mb=st.sampled_from([0, 32]),
    host_reserve_mb=st.sampled_from([0, 512]),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Snapshot, list[Demand], PlacementConfig, Plan]:
    snapshot = draw(snapshots())
    demands = draw(demand_lists(snapshot))
    config = draw(configs)
    return snapshot, demands, config, place(snapshot, demands, config)


# -- a model of the final state, computed independently of the implementation -----------


class Final:
    """Per-host usage after applying the plan to the snapshot."""

    def __init__(
        self, snapshot: Snapshot, demands: list[Demand], config: PlacementConfig, plan: Plan
    ):
        self.config = config
        self.hosts = {h.id: h for h in snapshot.hosts}
        self.mem: dict[str, int] = defaultdict(int)
        self.cpu: dict[str, float] = defaultdict(float)
        self.count: dict[tuple[str, GroupKey], int] = defaultdict(int)
        self.new: dict[str, list[Placement]] = defaultdict(list)
        self.old_volumes: set[str] = set()
        self.new_volumes: Counter[str] = Counter()
        for h in snapshot.hosts:
            for a in h.allocations:
                self.add(h.id, a.group, a.cpus, a.memory_mb)
                self.old_volumes.update(a.volume_ids)
        for p in plan.placements:
            d = demands[p.demand_index]
            self.add(p.host_id, d.group, d.cpus, d.memory_mb)
            self.new[p.host_id].append(p)
            if d.volume_id is not None:
                self.new_volumes[d.volume_id] += 1

    def add(self, host_id: str, group: GroupKey, cpus: float, memory_mb: int) -> None:
        self.mem[host_id] += memory_mb + self.config.per_vm_overhead_mb
        self.cpu[host_id] += cpus
        self.count[host_id, group] += 1

    def mem_cap(self, host: Host) -> int:
        return host.memory_mb - self.config.host_reserve_mb

    def cpu_cap(self, host: Host) -> float:
        return host.vcpus * self.config.cpu_oversubscription

    def eligible(self, host: Host, d: Demand) -> bool:
        return (
            host.state is HostState.READY
            and (d.region is None or host.region == d.region)
            and all(host.labels.get(k) == v for k, v in d.labels.items())
        )

    def has_room(self, host: Host, d: Demand) -> bool:
        return self.mem[host.id] + d.memory_mb + self.config.per_vm_overhead_mb <= self.mem_cap(
            host
        ) and self.cpu[host.id] + d.cpus <= self.cpu_cap(host)


# -- properties ----------------------------------------------------------------------------


@PROPERTY
@given(scenarios())
def test_every_demanded_instance_is_placed_or_unplaced_exactly_once(scenario):
    _, demands, _, plan = scenario
    placed: dict[int, list[object]] = defaultdict(list)
    for p in plan.placements:
        placed[p.demand_index].append(p.instance)
        assert p.group == demands[p.demand_index].group
    left: dict[int, list[object]] = defaultdict(list)
    for u in plan.unplaced:
        assert u.demand is demands[u.demand_index]
        assert u.instances and u.reason
        left[u.demand_index].extend(u.instances)
    for i, d in enumerate(demands):
        assert placed[i] + left[i] == list(d.instances)
    assert sum(len(d.instances) for d in demands) == len(plan.placements) + sum(
        len(u.instances) for u in plan.unplaced
    )


@settings(PROPERTY, max_examples=500)  # the core safety property: worth more examples
@given(scenarios())
def test_capacity_ready_constraints_and_volume_locality(scenario):
    snapshot, demands, config, plan = scenario
    final = Final(snapshot, demands, config, plan)
    for host_id, new in final.new.items():
        host = final.hosts[host_id]
        assert host.state is HostState.READY
        assert final.mem[host_id] <= final.mem_cap(host), "memory overcommitted"
        assert final.cpu[host_id] <= final.cpu_cap(host), "CPU above the ratio"
        for p in new:
            d = demands[p.demand_index]
            assert final.eligible(host, d)
            if d.volume_id is not None:
                assert snapshot.volumes[d.volume_id] == host_id
                assert d.volume_id not in final.old_volumes, "volume attached twice"
                assert final.new_volumes[d.volume_id] == 1, "volume attached twice"
    assert overcommitted(snapshot, demands, plan, config) == overcommitted(
        snapshot, [], Plan((), (), {}), config
    ), "only hosts already overcommitted in the snapshot may be"


@PROPERTY
@given(scenarios())
def test_unplaced_demands_fit_nowhere_they_are_allowed(scenario):
    snapshot, demands, config, plan = scenario
    final = Final(snapshot, demands, config, plan)
    for u in plan.unplaced:
        d = u.demand
        if u.reason.startswith(f"volume {d.volume_id} is already attached to instance "):
            assert d.volume_id in final.old_volumes or final.new_volumes[d.volume_id]
            continue
        # Otherwise it failed on its own merits (a later demand may still take the volume).
        candidates = list(final.hosts.values())
        if d.volume_id is not None:
            candidates = [h for h in candidates if h.id == snapshot.volumes.get(d.volume_id)]
        assert not [h.id for h in candidates if final.eligible(h, d) and final.has_room(h, d)]


@PROPERTY
@given(scenarios())
def test_replicas_spread_over_hosts_with_room(scenario):
    snapshot, demands, config, plan = scenario
    final = Final(snapshot, demands, config, plan)
    last_demand: dict[tuple[str, GroupKey], int] = {}
    for p in plan.placements:
        if demands[p.demand_index].volume_id is None:
            last_demand[p.host_id, p.group] = p.demand_index
    for (host_id, group), index in last_demand.items():
        d = demands[index]
        for other in final.hosts.values():
            if final.eligible(other, d) and final.has_room(other, d):
                assert final.count[host_id, group] <= final.count[other.id, group] + 1, (
                    f"{group} has {final.count[host_id, group]} on {host_id} but only "
                    f"{final.count[other.id, group]} on {other.id}, which had room"
                )


@PROPERTY
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_same_input_same_plan_whatever_the_order_of_hosts(scenario, seed):
    snapshot, demands, config, plan = scenario
    assert place(snapshot, demands, config) == plan
    rng = random.Random(seed)
    hosts = list(snapshot.hosts)
    rng.shuffle(hosts)
    volumes = list(snapshot.volumes.items())
    rng.shuffle(volumes)
    shuffled = Snapshot(hosts=tuple(hosts), volumes=dict(volumes), versions=snapshot.versions)
    again = place(shuffled, demands, config)
    assert again == plan
    assert dict(again.versions) == dict(snapshot.versions)


@st.composite
def dense_scenarios(draw: st.DrawFn) -> tuple[Snapshot, list[Demand], PlacementConfig]:
    """Clusters where ties and the later choices matter: few host sizes (equal free memory
    is common), ids not in creation order, demands larger than the cluster, many demands
    sharing a group, constraints or a volume, and CPU or memory running out."""
    ids = draw(st.lists(st.integers(0, 99), min_size=0, max_size=14, unique=True))
    hosts = tuple(
        Host(
            id=f"h{i}",
            state=draw(st.sampled_from([*[HostState.READY] * 6, *HostState])),
            vcpus=draw(st.integers(1, 4)),
            memory_mb=draw(st.sampled_from([1024, 2048, 2048, 4096])),
            labels=draw(label_subsets()),
            region=draw(st.sampled_from(REGIONS)),
            allocations=draw(allocations(i)),
        )
        for i in ids
    )
    host_ids = [h.id for h in hosts] + ["h-gone"]
    volumes = {f"vol-{i}": draw(st.sampled_from(host_ids)) for i in range(draw(st.integers(0, 4)))}
    snapshot = Snapshot(hosts=hosts, volumes=volumes)
    volume_ids = [*sorted(volumes), "vol-9"]
    demands = []
    for i in range(draw(st.integers(0, 12))):
        volume = draw(st.none() | st.none() | st.sampled_from(volume_ids))
        if volume is not None:
            count, instance_ids = (0, (f"v-{i}",)) if draw(st.booleans()) else (1, ())
        else:
            count, instance_ids = draw(st.integers(0, 30)), ()
        demands.append(
            Demand(
                group=draw(st.sampled_from(GROUPS)),
                cpus=draw(st.sampled_from([0.1, 0.25, 0.5, 1.0])),
                memory_mb=draw(st.sampled_from([96, 224, 256, 480])),
                count=count,
                instance_ids=instance_ids,
                volume_id=volume,
                labels=draw(st.just({}) if draw(st.booleans()) else label_subsets()),
                region=draw(st.sampled_from([None, None, *REGIONS])),
            )
        )
    config = draw(
        st.builds(
            PlacementConfig,
            cpu_oversubscription=st.sampled_from([0.5, 1.0, 1.5, 4.0]),
            per_vm_overhead_mb=st.sampled_from([0, 32]),
            host_reserve_mb=st.sampled_from([0, 512]),
        )
    )
    return snapshot, demands, config


@settings(PROPERTY, max_examples=500)
@given(scenarios())
def test_same_plan_as_the_reference_algorithm(scenario):
    snapshot, demands, config, plan = scenario
    assert plan == _reference_place(snapshot, demands, config)


@settings(PROPERTY, max_examples=500)
@given(dense_scenarios())
def test_same_plan_as_the_reference_algorithm_on_dense_clusters(scenario):
    snapshot, demands, config = scenario
    plan = place(snapshot, demands, config)
    assert plan == _reference_place(snapshot, demands, config)
    assert overcommitted(snapshot, demands, plan, config) == overcommitted(
        snapshot, [], Plan((), (), {}), config
    )


@pytest.mark.parametrize("seed", range(3))
def test_same_plan_as_the_reference_algorithm_at_a_larger_scale(seed):
    # Many demands reusing a few pools (label/region constraints) and groups, on a cluster
    # that fills up: the pools' orders must stay right across hundreds of demands.
    rng = random.Random(seed)
    hosts = tuple(
        Host(
            id=f"host-{rng.randrange(10**6):06d}-{i}",
            state=rng.choice([*[HostState.READY] * 8, HostState.CORDONED, HostState.DOWN]),
            vcpus=rng.choice([2, 4, 8]),
            memory_mb=rng.choice([4096, 8192, 8192]),
            labels=rng.choice([{}, {"disk": "ssd"}, LABELS]),
            region=rng.choice(REGIONS),
            allocations=tuple(
                Allocation(f"old-{i}-{j}", rng.choice(GROUPS), 0.5, 480)
                for j in range(rng.randrange(4))
            ),
        )
        for i in range(60)
    )
    groups = [GroupKey(f"app-{g}", "prod", "web") for g in range(40)] + GROUPS
    demands = [
        Demand(
            group=rng.choice(groups),
            cpus=rng.choice([0.25, 0.5, 1.0]),
            memory_mb=rng.choice([128, 256, 480, 1000]),
            count=rng.choice([1, 2, 5, 10, 40, 120]),
            labels=rng.choice([{}, {}, {"disk": "ssd"}, {"gpu": "a100"}]),
            region=rng.choice([None, None, *REGIONS]),
        )
        for _ in range(300)
    ]
    snapshot = Snapshot(hosts=hosts)
    plan = place(snapshot, demands)
    assert plan.placements and plan.unplaced  # the cluster fills up part way
    assert plan == _reference_place(snapshot, demands)
    assert overcommitted(snapshot, demands, plan) == []


# -- examples ------------------------------------------------------------------------------

WEB = GROUPS[0]


def host(
    host_id: str,
    state: HostState = HostState.READY,
    *,
    vcpus: int = 4,
    memory_mb: int = 4096,
    allocations: tuple[Allocation, ...] = (),
    labels: dict[str, str] | None = None,
    region: str = "ams",
) -> Host:
    return Host(host_id, state, vcpus, memory_mb, labels or {}, region, allocations)


def web(count: int = 1, **kw: object) -> Demand:
    kw.setdefault("cpus", 1.0)
    kw.setdefault("memory_mb", 256)
    return Demand(group=WEB, count=count, **kw)  # type: ignore[arg-type]


def reasons(plan: Plan) -> list[str]:
    return [u.reason for u in plan.unplaced]


def test_no_hosts():
    plan = place(Snapshot(hosts=()), [web(2)])
    assert plan.placements == ()
    assert plan.unplaced[0].instances == (0, 1)
    assert reasons(plan) == ["no hosts are registered"]


def test_all_hosts_unavailable():
    snap = Snapshot(
        hosts=(
            host("h1", HostState.CORDONED),
            host("h2", HostState.DOWN),
            host("h3", HostState.DRAINING),
            host("h4", HostState.CORDONED),
        )
    )
    assert reasons(place(snap, [web()])) == ["no host is ready (2 cordoned, 1 down, 1 draining)"]


def test_memory_reason_names_the_largest_free_host():
    snap = Snapshot(hosts=(host("host-1", memory_mb=1024), host("host-3", memory_mb=2048)))
    plan = place(snap, [web(memory_mb=2048)])
    assert reasons(plan) == [
        "no ready host has 2080 MB of free memory for a 2048 MB instance "
        "(+32 MB VM overhead) (largest free: 1536 MB on host-3)"
    ]


def test_cpu_reason():
    full = (Allocation("a", WEB, 3.5, 128),)
    snap = Snapshot(hosts=(host("h1", vcpus=1, allocations=full),))
    plan = place(snap, [web(cpus=1.0)])
    assert reasons(plan) == [
        "no ready host with enough free memory has 1 vCPUs free under 4x CPU "
        "oversubscription (most free: 0.5 on h1)"
    ]


def test_label_and_region_mismatch():
    snap = Snapshot(hosts=(host("h1", labels={"disk": "ssd"}), host("h2", HostState.CORDONED)))
    plan = place(snap, [web(labels={"gpu": "a100"}), web(region="iad")])
    assert reasons(plan) == [
        "no ready host matches labels gpu=a100",
        "no ready host matches region 'iad'",
    ]
    plan = place(snap, [web(labels={"disk": "ssd"}, region="ams")])
    assert [p.host_id for p in plan.placements] == ["h1"]


def test_volume_host_states_and_capacity():
    snap = Snapshot(
        hosts=(host("host-1"), host("host-2", HostState.DOWN), host("host-3", memory_mb=1024)),
        volumes={"vol-1": "host-2", "vol-2": "host-9", "vol-3": "host-3", "vol-4": "host-1"},
    )
    plan = place(
        snap,
        [
            web(volume_id="vol-1"),
            web(volume_id="vol-2"),
            web(volume_id="vol-3", memory_mb=1024),
            web(volume_id="vol-4", region="iad"),
            web(volume_id="vol-5"),
        ],
    )
    assert plan.placements == ()
    assert reasons(plan) == [
        "volume vol-1 is on host-2, which is down",
        "volume vol-2 is on host-9, which is not a registered host",
        "volume vol-3 is on host-3, which has 512 MB of free memory; a 1024 MB instance "
        "(+32 MB VM overhead) needs 1056 MB",
        "volume vol-4 is on host-1, which does not match region 'iad'",
        "volume vol-5 is not on any known host",
    ]


def test_volume_pins_even_against_spread():
    alloc = (Allocation("old", WEB, 1.0, 256),)
    snap = Snapshot(hosts=(host("h1", allocations=alloc), host("h2")), volumes={"vol-1": "h1"})
    plan = place(snap, [web(volume_id="vol-1")])
    assert [p.host_id for p in plan.placements] == ["h1"]


def test_volume_demands_are_placed_before_flexible_ones():
    # h1 has room for exactly one instance; the pinned demand must get it.
    snap = Snapshot(hosts=(host("h1", memory_mb=1312),), volumes={"vol-1": "h1"})
    plan = place(snap, [web(memory_mb=768), web(memory_mb=768, volume_id="vol-1")])
    assert [(p.demand_index, p.host_id) for p in plan.placements] == [(1, "h1")]
    assert [u.demand_index for u in plan.unplaced] == [0]


def test_tie_breaks_fewest_replicas_then_most_free_memory_then_host_id():
    existing = (Allocation("old", WEB, 1.0, 256),)
    snap = Snapshot(
        hosts=(
            host("d", memory_mb=8192, allocations=existing),  # most memory, but has one
            host("c", memory_mb=4096),
            host("b", memory_mb=4096),
            host("a", memory_mb=2048),
        )
    )
    plan = place(snap, [web(5, memory_mb=256)])
    # Nothing on a, b, c: b and c tie on free memory, b wins on id, then c, then a (less
    # memory). Now every host has one: d has the most free memory. Then b again.
    assert [p.host_id for p in plan.placements] == ["b", "c", "a", "d", "b"]


def test_spread_is_even_with_room_and_fills_existing_gaps_first():
    existing = tuple(Allocation(f"old-{i}", WEB, 0.25, 128) for i in range(3))
    snap = Snapshot(hosts=(host("h1", allocations=existing), host("h2"), host("h3")))
    plan = place(snap, [web(5, cpus=0.25, memory_mb=128)])
    assert Counter(p.host_id for p in plan.placements) == {"h2": 3, "h3": 2}


def test_partial_placement_lists_the_rest_with_instance_ids():
    snap = Snapshot(hosts=(host("h1", memory_mb=1024 + 512),), versions={"h1": 7})
    ids = ("i-a", "i-b", "i-c", "i-d")
    plan = place(snap, [Demand(WEB, cpus=0.5, memory_mb=480, instance_ids=ids)])
    assert [p.instance for p in plan.placements] == ["i-a", "i-b"]
    assert plan.unplaced[0].instances == ("i-c", "i-d")
    assert plan.unplaced[0].reason.startswith("no ready host has 512 MB of free memory")
    assert dict(plan.versions) == {"h1": 7}


def test_draining_and_cordoned_hosts_receive_nothing_new():
    snap = Snapshot(
        hosts=(host("h1", HostState.DRAINING), host("h2", HostState.CORDONED), host("h3"))
    )
    assert {p.host_id for p in place(snap, [web(4)]).placements} == {"h3"}


def test_memory_cap_counts_overhead_and_reserve_exactly():
    snap = Snapshot(hosts=(host("h1", memory_mb=2048),))
    plan = place(snap, [web(6, cpus=0.25, memory_mb=256)])
    # (2048 - 512 reserve) // (256 + 32) == 5, with 96 MB left over.
    assert len(plan.placements) == 5
    assert reasons(plan) == [
        "no ready host has 288 MB of free memory for a 256 MB instance "
        "(+32 MB VM overhead) (largest free: 96 MB on h1)"
    ]
    exact = place(snap, [web(6, cpus=0.25, memory_mb=224)])  # 6 * 256 == 1536
    assert len(exact.placements) == 6
    assert exact.unplaced == ()


def test_existing_overcommit_blocks_new_placements():
    heavy = (Allocation("old", WEB, 1.0, 4000),)
    snap = Snapshot(hosts=(host("h1", allocations=heavy),))
    plan = place(snap, [web(memory_mb=1)])
    assert plan.placements == ()
    assert "largest free: 0 MB on h1" in reasons(plan)[0]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Snapshot(hosts=(host("h1"), host("h1"))),
        lambda: web(2, instance_ids=("x",)),
        lambda: web(2, volume_id="vol-1"),
        lambda: web(0, volume_id="vol-1"),
        lambda: web(cpus=0),
        lambda: web(memory_mb=0),
        lambda: web(-1),
        lambda: Demand(WEB, cpus=1, memory_mb=1, instance_ids=("x", "x")),
        lambda: PlacementConfig(cpu_oversubscription=0),
        lambda: PlacementConfig(host_reserve_mb=-1),
    ],
)
def test_bad_input_is_refused_with_a_stable_code(build):
    with pytest.raises(InvalidPlacementInput) as err:
        build()
    assert isinstance(err.value, ValidationFailed)
    assert err.value.code == "placement.invalid_input"


def test_snapshot_is_frozen_against_later_mutation():
    labels = {"disk": "ssd"}
    volumes = {"vol-1": "h1"}
    h = host("h1", labels=labels)
    snap = Snapshot(hosts=(h,), volumes=volumes)
    labels["disk"] = "hdd"
    volumes["vol-1"] = "h2"
    assert h.labels["disk"] == "ssd"
    assert snap.volumes["vol-1"] == "h1"


def test_a_volume_attached_to_an_existing_instance_is_not_attached_again():
    old = (Allocation("i-9", WEB, 1.0, 256, volume_ids=("vol-1",)),)
    snap = Snapshot(hosts=(host("h1", allocations=old), host("h2")), volumes={"vol-1": "h1"})
    plan = place(snap, [web(volume_id="vol-1"), web(volume_id="vol-2")])
    assert plan.placements == ()
    assert reasons(plan) == [
        "volume vol-1 is already attached to instance i-9",
        "volume vol-2 is not on any known host",
    ]


def test_two_demands_for_one_volume_in_a_plan_place_only_the_first():
    snap = Snapshot(hosts=(host("h1"),), volumes={"vol-1": "h1", "vol-2": "h1"})
    plan = place(
        snap,
        [
            web(memory_mb=128),  # flexible demands go after the pinned ones
            web(volume_id="vol-1"),
            web(volume_id="vol-1"),
            Demand(WEB, cpus=1, memory_mb=256, instance_ids=("i-a",), volume_id="vol-2"),
            Demand(WEB, cpus=1, memory_mb=256, instance_ids=("i-b",), volume_id="vol-2"),
        ],
    )
    assert [(p.demand_index, p.instance) for p in plan.placements] == [(1, 0), (3, "i-a"), (0, 0)]
    assert plan.unplaced == (
        Unplaced(
            2,
            web(volume_id="vol-1"),
            (0,),
            "volume vol-1 is already attached to instance 0 of demand 1",
        ),
        Unplaced(
            4,
            Demand(WEB, cpus=1, memory_mb=256, instance_ids=("i-b",), volume_id="vol-2"),
            ("i-b",),
            "volume vol-2 is already attached to instance i-a",
        ),
    )


def test_a_volume_demand_that_is_not_placed_does_not_attach_the_volume():
    snap = Snapshot(hosts=(host("h1", memory_mb=1024), host("h2")), volumes={"vol-1": "h1"})
    plan = place(snap, [web(volume_id="vol-1", memory_mb=1024), web(volume_id="vol-1")])
    assert [(p.demand_index, p.host_id) for p in plan.placements] == [(1, "h1")]
    assert reasons(plan)[0].startswith("volume vol-1 is on h1, which has 512 MB of free memory")


def test_overcommitted_finds_a_hand_made_overcommitted_plan():
    existing = (Allocation("old", WEB, 1.0, 992),)  # 992 + 32 of the 1536 MB usable
    snap = Snapshot(hosts=(host("h1", memory_mb=2048, allocations=existing), host("h2")))
    demands = [web(2, memory_mb=224)]
    fits = place(snap, demands)
    assert overcommitted(snap, demands, fits) == []
    # Both on h1: 1024 + 2 * 256 == 1536 exactly fits; a third instance does not.
    exact = Plan((Placement(0, 0, WEB, "h1"), Placement(0, 1, WEB, "h1")), (), {})
    assert overcommitted(snap, demands, exact) == []
    over = [web(3, memory_mb=224)]
    three = Plan(tuple(Placement(0, i, WEB, "h1") for i in range(3)), (), {})
    assert overcommitted(snap, over, three) == ["h1"]
    # 992 + 3 * 224 == 1664 > 1536 even without the overhead; with no reserve it fits.
    assert overcommitted(snap, over, three, PlacementConfig(per_vm_overhead_mb=0)) == ["h1"]
    assert overcommitted(snap, over, three, PlacementConfig(host_reserve_mb=0)) == []
    assert overcommitted(snap, over, Plan((Placement(0, 0, WEB, "h9"),), (), {})) == ["h9"]
    heavy = Snapshot(hosts=(host("h1", allocations=(Allocation("old", WEB, 1.0, 4000),)),))
    assert overcommitted(heavy, [], Plan((), (), {})) == ["h1"]  # already, before any plan


# -- the reference oracle ------------------------------------------------------------------
#
# ``ember.core.placement.place`` as it was before it stopped scanning every host for every
# instance, kept verbatim (names prefixed) as the specification the fast version must match.


def _ref_millicpus(cpus: float) -> int:
    # Round to 1e-6 first so 0.1 * 1000 does not become 101 thousandths.
    return math.ceil(round(cpus * 1000, 6))


def _ref_fmt_cpus(millis: int) -> str:
    return f"{millis / 1000:g}"


@dataclasses.dataclass
class _RefLoad:
    """Mutable working copy of one host's remaining capacity while a plan is built."""

    host: Host
    free_mb: int
    free_millicpus: int
    per_group: dict[GroupKey, int]


def _ref_initial_load(host: Host, config: PlacementConfig) -> _RefLoad:
    per_group: dict[GroupKey, int] = {}
    used_mb = 0
    used_millis = 0
    for a in host.allocations:
        per_group[a.group] = per_group.get(a.group, 0) + 1
        used_mb += a.memory_mb + config.per_vm_overhead_mb
        used_millis += _ref_millicpus(a.cpus)
    cap_millis = math.floor(round(host.vcpus * config.cpu_oversubscription * 1000, 6))
    return _RefLoad(
        host=host,
        free_mb=host.memory_mb - config.host_reserve_mb - used_mb,
        free_millicpus=cap_millis - used_millis,
        per_group=per_group,
    )


def _ref_matches(host: Host, demand: Demand) -> bool:
    if demand.region is not None and host.region != demand.region:
        return False
    return all(host.labels.get(k) == v for k, v in demand.labels.items())


def _ref_constraint_text(demand: Demand) -> str:
    parts = []
    if demand.region is not None:
        parts.append(f"region {demand.region!r}")
    if demand.labels:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(demand.labels.items()))
        parts.append(f"labels {labels}")
    return " and ".join(parts)


def _ref_state_summary(loads: Sequence[_RefLoad]) -> str:
    counts: dict[str, int] = {}
    for load in loads:
        counts[load.host.state.value] = counts.get(load.host.state.value, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def _reference_place(
    snapshot: Snapshot,
    demands: Sequence[Demand],
    config: PlacementConfig | None = None,
) -> Plan:
    """The placement algorithm before it was optimized: every host for every instance.

    Copied from ember.core.placement as the oracle ``place`` must agree with exactly; the
    one addition is the volume-attachment rule (marked below), written the plain way.
    """
    config = config or PlacementConfig()
    loads = [_ref_initial_load(h, config) for h in sorted(snapshot.hosts, key=lambda h: h.id)]
    by_id = {load.host.id: load for load in loads}
    overhead = config.per_vm_overhead_mb
    placements: list[Placement] = []
    unplaced: list[Unplaced] = []
    # Added: volume id -> the instance it is attached to.
    attached: dict[str, str] = {}
    for h in sorted(snapshot.hosts, key=lambda h: h.id):
        for a in h.allocations:
            for vol in a.volume_ids:
                attached.setdefault(vol, f"instance {a.instance_id}")

    order = sorted(range(len(demands)), key=lambda i: demands[i].volume_id is None)
    for index in order:
        demand = demands[index]
        need_mb = demand.memory_mb + overhead
        need_millis = _ref_millicpus(demand.cpus)
        if demand.volume_id in attached:  # added
            reason = (
                f"volume {demand.volume_id} is already attached to {attached[demand.volume_id]}"
            )
            unplaced.append(Unplaced(index, demand, demand.instances, reason))
            continue
        if demand.volume_id is not None:
            vol_host = snapshot.volumes.get(demand.volume_id)
            pinned = by_id.get(vol_host) if vol_host is not None else None
            eligible = [pinned] if pinned is not None else []
        else:
            eligible = loads
        eligible = [
            load
            for load in eligible
            if load.host.state is HostState.READY and _ref_matches(load.host, demand)
        ]
        instances = demand.instances
        for position, instance in enumerate(instances):
            best: _RefLoad | None = None
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
                        reason=_ref_reason(snapshot, loads, by_id, demand, config),
                    )
                )
                break
            best.free_mb -= need_mb
            best.free_millicpus -= need_millis
            best.per_group[demand.group] = best.per_group.get(demand.group, 0) + 1
            placements.append(Placement(index, instance, demand.group, best.host.id))
            if demand.volume_id is not None:  # added
                name = instance if isinstance(instance, str) else f"{instance} of demand {index}"
                attached[demand.volume_id] = f"instance {name}"

    return Plan(
        placements=tuple(placements),
        unplaced=tuple(unplaced),
        versions=MappingProxyType(dict(snapshot.versions)),
    )


def _ref_reason(
    snapshot: Snapshot,
    loads: Sequence[_RefLoad],
    by_id: Mapping[str, _RefLoad],
    demand: Demand,
    config: PlacementConfig,
) -> str:
    """Why no host can take one more instance of ``demand`` (the first filter that fails)."""
    if demand.volume_id is not None:
        return _ref_volume_reason(snapshot, by_id, demand.volume_id, demand, config)
    return _ref_cluster_reason(loads, demand, config)


def _ref_sized(demand: Demand, config: PlacementConfig) -> str:
    return f"a {demand.memory_mb} MB instance (+{config.per_vm_overhead_mb} MB VM overhead)"


def _ref_volume_reason(
    snapshot: Snapshot,
    by_id: Mapping[str, _RefLoad],
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
    if not _ref_matches(load.host, demand):
        return f"{where} does not match {_ref_constraint_text(demand)}"
    if load.free_mb < need_mb:
        return (
            f"{where} has {max(load.free_mb, 0)} MB of free memory; "
            f"{_ref_sized(demand, config)} needs {need_mb} MB"
        )
    return (
        f"{where} has {_ref_fmt_cpus(max(load.free_millicpus, 0))} vCPUs free under "
        f"{config.cpu_oversubscription:g}x CPU oversubscription; "
        f"the instance needs {_ref_fmt_cpus(_ref_millicpus(demand.cpus))}"
    )


def _ref_cluster_reason(loads: Sequence[_RefLoad], demand: Demand, config: PlacementConfig) -> str:
    need_mb = demand.memory_mb + config.per_vm_overhead_mb
    if not loads:
        return "no hosts are registered"
    ready = [load for load in loads if load.host.state is HostState.READY]
    if not ready:
        return f"no host is ready ({_ref_state_summary(loads)})"
    matching = [load for load in ready if _ref_matches(load.host, demand)]
    constraints = _ref_constraint_text(demand)
    if not matching:
        return f"no ready host matches {constraints}"
    subject = f"no ready host matching {constraints}" if constraints else "no ready host"
    with_memory = [load for load in matching if load.free_mb >= need_mb]
    if not with_memory:
        top = min(matching, key=lambda load: (-load.free_mb, load.host.id))
        return (
            f"{subject} has {need_mb} MB of free memory for {_ref_sized(demand, config)} "
            f"(largest free: {max(top.free_mb, 0)} MB on {top.host.id})"
        )
    top = min(with_memory, key=lambda load: (-load.free_millicpus, load.host.id))
    return (
        f"{subject} with enough free memory has {_ref_fmt_cpus(_ref_millicpus(demand.cpus))} "
        f"vCPUs free under {config.cpu_oversubscription:g}x CPU oversubscription "
        f"(most free: {_ref_fmt_cpus(max(top.free_millicpus, 0))} on {top.host.id})"
    )
