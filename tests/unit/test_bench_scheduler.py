"""The scheduler benchmark's simulated cluster: the shape the results claim."""

from __future__ import annotations

import random

from ember.bench.scheduler import MAX_GROUP, _batches, make_hosts, make_instances
from ember.core.events import NewEvent
from ember.store.eventlog import StreamAppend


def test_instances_come_in_groups_of_1_to_20_on_workload_streams() -> None:
    streams = make_instances(random.Random(1), 4000)
    created = [e for events in streams.values() for e in events]
    assert len(created) == 4000
    assert len({e.instance_id for e in created}) == 4000
    groups: dict[tuple[str, str, str], list[int]] = {}
    for e in created:
        groups.setdefault((e.app_id, e.env, e.process), []).append(e.spec.memory_mb)
    assert all(1 <= len(sizes) <= MAX_GROUP for sizes in groups.values())
    assert all(len(set(sizes)) == 1 for sizes in groups.values())  # one size per group
    assert 300 <= len(groups) <= 500  # ~10 instances per group on average
    assert all(s == f"workload-{e.app_id}.{e.env}" for s, evs in streams.items() for e in evs)


def test_capacity_comfortably_exceeds_demand() -> None:
    rng = random.Random(2)
    hosts = make_hosts(rng, 1000)
    created = [e for evs in make_instances(rng, 20_000).values() for e in evs]
    assert len({h.host_id for h in hosts}) == 1000
    assert {h.region for h in hosts} and all(h.labels for h in hosts)
    demand = sum(e.spec.memory_mb + 32 for e in created)
    assert demand < 0.5 * sum(h.memory_mb - 512 for h in hosts)


def test_batches_keep_whole_stream_appends_under_the_event_budget() -> None:
    event = NewEvent("bench.x", {})
    appends = [StreamAppend(f"s-{n}", 0, [event] * (n % 7 + 1)) for n in range(100)]
    batches = list(_batches(appends, 10))
    assert [a for b in batches for a in b] == appends
    assert all(sum(len(a.events) for a in b) <= 10 for b in batches)
