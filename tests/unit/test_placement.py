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
- completeness: an unplaced demand fits on none of its eligible hosts in the final state
  (so the planner never gives up while room is left);
- spread: for a group G and a host h that received new replicas of G from a (non-volume)
  demand d — the last such demand — every host h' that is ready, matches d's constraints
  and still has room for one more instance of d at the end holds at least
  count(h, G) - 1 replicas of G, counting existing allocations plus new placements;
- determinism: the same input gives an equal plan, also when the snapshot's hosts and
  mappings are given in another order.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

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
        for h in snapshot.hosts:
            for a in h.allocations:
                self.add(h.id, a.group, a.cpus, a.memory_mb)
        for p in plan.placements:
            d = demands[p.demand_index]
            self.add(p.host_id, d.group, d.cpus, d.memory_mb)
            self.new[p.host_id].append(p)

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


@PROPERTY
@given(scenarios())
def test_unplaced_demands_fit_nowhere_they_are_allowed(scenario):
    snapshot, demands, config, plan = scenario
    final = Final(snapshot, demands, config, plan)
    for u in plan.unplaced:
        d = u.demand
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
