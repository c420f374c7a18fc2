"""The host network's pure parts: addressing plan, allocator, tap names, nftables ruleset.

The ruleset goldens live in ``golden/net/``; after a deliberate change of the policy, run
``EMBER_UPDATE_GOLDEN=1 pytest tests/unit/test_agent_net.py`` and review the diff (the
integration test applies every golden with the real ``nft``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.agent.guest_config import GuestConfig, parse, render
from ember.agent.net import (
    IFNAME_MAX,
    TAP_PREFIX,
    AddressesExhausted,
    AddressPlan,
    Endpoint,
    FirewallPolicy,
    HostLocalAllocator,
    Lease,
    LeaseStore,
    LeaseTable,
    NetConfigInvalid,
    check_ifname,
    default_ipv6_prefix,
    guest_mac,
    pick_ipv6,
    render_ruleset,
    tap_name,
)

GOLDEN = Path(__file__).parent / "golden" / "net"
instance_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=30
).map(lambda s: "i_" + s)


def small_plan() -> AddressPlan:
    """62 usable IPv6 addresses, 32 IPv4 /31s: small enough to exhaust."""
    return AddressPlan(IPv6Network("fd00:1:2:3::/122"), IPv4Network("10.200.7.0/26"))


# -- the plan -----------------------------------------------------------------------------


def test_default_prefix_is_a_ula_slash_64_derived_from_the_host_id() -> None:
    p = default_ipv6_prefix("h_01jabc")
    assert p.prefixlen == 64
    assert p.subnet_of(IPv6Network("fd00::/8"))
    assert p == default_ipv6_prefix("h_01jabc")
    assert p != default_ipv6_prefix("h_01jabd")
    # The subnet id (bits 48-63) is 0: the /48 is the host's, the /64 its first subnet.
    assert int(p.network_address) >> 64 & 0xFFFF == 0
    with pytest.raises(NetConfigInvalid):
        default_ipv6_prefix("")


def test_plan_from_configuration_strings() -> None:
    plan = AddressPlan.for_host("h1")
    assert plan.ipv6_prefix == default_ipv6_prefix("h1")
    assert plan.ipv4_pool == IPv4Network("10.200.0.0/16")
    assert plan.host_ipv6 == plan.ipv6_prefix[1]
    explicit = AddressPlan.for_host("h1", ipv6_prefix="2001:db8:5::/64", ipv4_pool=None)
    assert explicit.ipv6_prefix == IPv6Network("2001:db8:5::/64")
    assert explicit.ipv4_pool is None
    assert AddressPlan.for_host("h1", ipv4_pool="").ipv4_pool is None


@pytest.mark.parametrize(
    ("prefix", "pool"),
    [
        ("fe80::/64", "10.200.0.0/16"),  # link-local
        ("ff00::/64", "10.200.0.0/16"),  # multicast
        ("::1/128", "10.200.0.0/16"),  # loopback
        ("fd00::/127", "10.200.0.0/16"),  # too small
        ("fd00::1/64", "10.200.0.0/16"),  # host bits set
        ("not-a-prefix", "10.200.0.0/16"),
        ("fd00::/64", "8.8.8.0/24"),  # public IPv4
        ("fd00::/64", "10.0.0.0/31"),  # one /31 is not a pool
        ("fd00::/64", "169.254.0.0/16"),  # link-local IPv4
        ("fd00::/64", "127.0.0.0/8"),
    ],
)
def test_plan_rejects_unusable_ranges(prefix: str, pool: str) -> None:
    with pytest.raises(NetConfigInvalid):
        AddressPlan.for_host("h1", ipv6_prefix=prefix, ipv4_pool=pool)


# -- names --------------------------------------------------------------------------------


@given(instance_ids)
def test_tap_names_are_valid_linux_ifnames(instance_id: str) -> None:
    name = tap_name(instance_id)
    assert check_ifname(name) == name
    assert len(name) == IFNAME_MAX
    assert re.fullmatch(r"em-[0-9a-hjkmnp-tv-z]{12}", name)
    assert tap_name(instance_id) == name  # deterministic


def test_tap_name_probes_past_a_name_held_by_another_instance() -> None:
    first = tap_name("i_a")
    other = tap_name("i_a", {first: "i_b"})
    assert other != first and other.startswith(TAP_PREFIX)
    assert tap_name("i_a", {first: "i_a"}) == first  # its own name is not a collision
    third = tap_name("i_a", {first: "i_b", other: "i_c"})
    assert third not in (first, other)


def test_tap_name_gives_up_only_on_an_impossible_table() -> None:
    class Everything(dict[str, str]):
        def get(self, key: str, default: str | None = None) -> str:  # type: ignore[override]
            return "i_someone_else"

    with pytest.raises(AddressesExhausted):
        tap_name("i_a", Everything())


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a:b", "a b", "x" * 16, "é" * 8])
def test_check_ifname_rejects_what_linux_rejects(name: str) -> None:
    with pytest.raises(NetConfigInvalid):
        check_ifname(name)


@given(instance_ids)
def test_guest_mac_is_locally_administered_unicast(instance_id: str) -> None:
    mac = guest_mac(instance_id)
    assert re.fullmatch(r"02(:[0-9a-f]{2}){5}", mac)
    assert guest_mac(instance_id) == mac


# -- the allocator ------------------------------------------------------------------------

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 80)), max_size=120)


def _check_table(table: LeaseTable) -> None:
    leases = list(table.leases.values())
    plan = table.plan
    assert len({x.ipv6 for x in leases}) == len(leases)
    assert len({x.tap for x in leases}) == len(leases)
    assert len({x.ipv4 for x in leases}) == len(leases)
    assert len({x.mac for x in leases}) == len(leases)
    for x in leases:
        assert x.ipv6 in plan.ipv6_prefix
        assert x.ipv6 not in (plan.ipv6_prefix[0], plan.host_ipv6)
        assert x.host_ipv6 == plan.host_ipv6
        assert x.ipv4 is not None and plan.ipv4_pool is not None
        assert x.ipv4.network.prefixlen == 31 and x.ipv4.ip in plan.ipv4_pool
        assert int(x.ipv4.ip) % 2 == 1
        assert x.host_ipv4 == IPv4Interface((x.ipv4.ip - 1, 31))


@settings(max_examples=60, deadline=None)
@given(ops)
def test_allocations_are_unique_and_stable_under_any_sequence(
    steps: list[tuple[bool, int]],
) -> None:
    table = LeaseTable(small_plan())
    for allocate, n in steps:
        iid = f"i_{n}"
        if allocate:
            before = table.leases.get(iid)
            try:
                table, lease = table.allocate(iid)
            except AddressesExhausted:
                assert len(table.leases) >= 32  # the IPv4 pool is the smaller range
                continue
            if before is not None:
                assert lease == before  # a held lease is never changed
            assert table.allocate(iid) == (table, lease)  # idempotent
        else:
            table = table.release(iid)
            assert iid not in table.leases
        _check_table(table)


@settings(max_examples=60, deadline=None)
@given(st.lists(instance_ids, unique=True, min_size=1, max_size=20), st.randoms())
def test_an_allocation_depends_only_on_the_addresses_in_use(
    ids: list[str], rnd: random.Random
) -> None:
    """Allocating the same instances in another order, then the same new instance, gives
    the new one the same lease when the same addresses are in use (a restarted agent that
    lost nothing gets the same answer)."""
    plan = AddressPlan(IPv6Network("fd00::/64"))
    newcomer = "i_newcomer"
    table = LeaseTable(plan)
    for iid in ids:
        table, _ = table.allocate(iid)
    _, expected = table.allocate(newcomer)
    # The same in-use set, rebuilt from the saved leases in another order.
    shuffled = list(table.leases.values())
    rnd.shuffle(shuffled)
    again = LeaseTable(plan, {x.instance_id: x for x in shuffled})
    assert again.allocate(newcomer)[1] == expected


def test_the_first_choice_is_the_hash_and_collisions_probe_forward() -> None:
    prefix = IPv6Network("fd00::/64")
    first = pick_ipv6(prefix, "i_x", [])
    assert pick_ipv6(prefix, "i_x", []) == first
    assert pick_ipv6(prefix, "i_x", [first]) == first + 1
    assert pick_ipv6(prefix, "i_x", [first, first + 1]) == first + 2


def test_exhaustion_is_an_error_and_release_frees() -> None:
    plan = AddressPlan(IPv6Network("fd00::/126"), IPv4Network("10.200.0.0/16"))  # 2 usable
    table = LeaseTable(plan)
    table, a = table.allocate("i_a")
    table, b = table.allocate("i_b")
    assert {a.ipv6, b.ipv6} == {IPv6Address("fd00::2"), IPv6Address("fd00::3")}
    with pytest.raises(AddressesExhausted) as exc:
        table.allocate("i_c")
    assert exc.value.code == "net.exhausted" and exc.value.hint
    table = table.release("i_a")
    table, c = table.allocate("i_c")
    assert c.ipv6 == a.ipv6


def test_the_ipv4_pool_runs_out_too() -> None:
    plan = AddressPlan(IPv6Network("fd00::/64"), IPv4Network("10.200.0.0/30"))  # two /31s
    table = LeaseTable(plan)
    table, a = table.allocate("i_a")
    table, b = table.allocate("i_b")
    assert {str(a.ipv4), str(b.ipv4)} == {"10.200.0.1/31", "10.200.0.3/31"}
    with pytest.raises(AddressesExhausted):
        table.allocate("i_c")


def test_ipv6_only_plans_lease_no_ipv4() -> None:
    table, lease = LeaseTable(AddressPlan(IPv6Network("fd00::/64"), None)).allocate("i_a")
    assert lease.ipv4 is None and lease.host_ipv4 is None
    net = lease.guest_network()
    assert net.ipv4 is None and net.ipv4_gateway is None
    assert table.to_dict()["leases"][0].get("ipv4") is None


def test_a_table_refuses_inconsistent_leases() -> None:
    _, a = LeaseTable(small_plan()).allocate("i_a")
    with pytest.raises(NetConfigInvalid):
        LeaseTable(small_plan(), {"i_b": a})
    clash = Lease("i_b", tap_name("i_b"), a.ipv6, a.host_ipv6, guest_mac("i_b"))
    with pytest.raises(NetConfigInvalid):
        LeaseTable(small_plan(), {"i_a": a, "i_b": clash})
    with pytest.raises(NetConfigInvalid):
        LeaseTable(small_plan()).allocate("")


def test_lease_gives_the_guest_config_the_init_understands() -> None:
    _, lease = LeaseTable(small_plan()).allocate("i_a")
    net = lease.guest_network(mtu=1400, nameservers=("fd00::53",))
    assert net.ipv6 == f"{lease.ipv6}/128" and net.ipv6_gateway == "fe80::1"
    assert lease.host_ipv4 is not None and net.ipv4_gateway == str(lease.host_ipv4.ip)
    config = GuestConfig(argv=("/bin/true",), network=net)
    assert parse(render(config)).network == net


def test_tables_round_trip_through_json_and_the_lease_file(tmp_path: Path) -> None:
    plan = small_plan()
    table = LeaseTable(plan)
    for n in range(10):
        table, _ = table.allocate(f"i_{n}")
    data = json.loads(json.dumps(table.to_dict()))
    assert LeaseTable.from_dict(plan, data) == table
    store = LeaseStore(tmp_path / "net" / "leases.json")
    assert store.load(plan) == LeaseTable(plan)  # no file yet
    store.save(table)
    assert store.load(plan) == table
    assert [p.name for p in store.path.parent.iterdir()] == ["leases.json"]
    store.path.write_text("{not json")
    with pytest.raises(NetConfigInvalid):
        store.load(plan)
    with pytest.raises(NetConfigInvalid):
        LeaseTable.from_dict(plan, {"version": 1, "leases": [{"instance_id": "i_a"}]})
    bad = table.to_dict()
    bad["leases"][0]["ipv4"] = "10.200.7.2/31"  # the host's (even) side
    with pytest.raises(NetConfigInvalid):
        LeaseTable.from_dict(plan, bad)


def test_host_local_allocator_persists_before_handing_out(tmp_path: Path) -> None:
    plan = small_plan()
    store = LeaseStore(tmp_path / "leases.json")
    saved: list[LeaseTable] = []

    def persist(table: LeaseTable) -> None:
        store.save(table)
        saved.append(table)

    alloc = HostLocalAllocator(store.load(plan), on_change=persist)
    a = alloc.allocate("i_a")
    assert alloc.allocate("i_a") == a and len(saved) == 1  # no change, no write
    b = alloc.allocate("i_b")
    alloc.release("i_a")
    alloc.release("i_a")
    assert len(saved) == 3
    # A restarted agent reads the same leases back.
    restarted = HostLocalAllocator(store.load(plan))
    assert dict(restarted.leases()) == {"i_b": b}
    assert restarted.allocate("i_b") == b

    def failing(_: LeaseTable) -> None:
        raise OSError("disk full")

    broken = HostLocalAllocator(LeaseTable(plan), on_change=failing)
    with pytest.raises(OSError):
        broken.allocate("i_c")
    assert dict(broken.leases()) == {}  # not handed out, not remembered


# -- the ruleset --------------------------------------------------------------------------


def golden_endpoints() -> list[Endpoint]:
    return [
        Endpoint(
            "em-a1aaaaaaaaaa", "org_acme", IPv6Address("fd00:e::a1"), IPv4Address("10.200.0.1")
        ),
        Endpoint(
            "em-a2aaaaaaaaaa", "org_acme", IPv6Address("fd00:e::a2"), IPv4Address("10.200.0.3")
        ),
        Endpoint("em-b1bbbbbbbbbb", "org_beta", IPv6Address("fd00:e::b1"), None),
    ]


GOLDEN_CASES = {
    "default": (golden_endpoints(), None),
    "egress-and-host-ports": (
        golden_endpoints(),
        FirewallPolicy.for_plan(
            AddressPlan(IPv6Network("fd00:e::/64"), IPv4Network("10.200.0.0/16")),
            egress=True,
            host_tcp_ports=[8053, 53],
            host_udp_ports=[53],
        ),
    ),
    "empty": ([], None),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_ruleset_golden(case: str) -> None:
    endpoints, policy = GOLDEN_CASES[case]
    text = render_ruleset(endpoints, policy)
    path = GOLDEN / f"{case}.nft"
    if os.environ.get("EMBER_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden {path.name}: run with EMBER_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_every_golden_file_belongs_to_a_case() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.nft")) == sorted(GOLDEN_CASES)


def test_ruleset_does_not_depend_on_the_order_of_instances() -> None:
    eps = golden_endpoints()
    texts = {render_ruleset(list(p)) for p in itertools.permutations(eps)}
    assert len(texts) == 1


def test_ruleset_structure() -> None:
    text = render_ruleset(golden_endpoints())
    # Replaces the table in one transaction, touches only em-* interfaces.
    assert text.splitlines()[1:4] == [
        "table inet ember {}",
        "delete table inet ember",
        "table inet ember {",
    ]
    assert 'iifname "em-*" jump from_instance' in text
    assert 'iifname "em-*" jump instance_to_host' in text
    # One chain per org, listing exactly that org's taps, ending in drop.
    acme = re.search(r'chain org_1 \{\n\t\tcomment "org org_acme"\n(.*?)\n\t\}', text, re.S)
    assert acme is not None
    assert acme.group(1) == (
        '\t\toifname { "em-a1aaaaaaaaaa", "em-a2aaaaaaaaaa" } accept\n\t\tdrop'
    )
    assert '"em-b1bbbbbbbbbb" : goto org_2' in text
    # No egress, no NAT, no host port unless asked for.
    assert "masquerade" not in text and "dport" not in text


@pytest.mark.parametrize(
    "bad",
    [
        Endpoint("eth0", "org_a", IPv6Address("fd00::2")),  # not an instance tap
        Endpoint("em-x", 'org"; flush ruleset', IPv6Address("fd00::2")),  # injection
        Endpoint("em-x", "", IPv6Address("fd00::2")),
        Endpoint("em-" + "x" * 13, "org_a", IPv6Address("fd00::2")),  # too long
    ],
)
def test_ruleset_refuses_bad_endpoints(bad: Endpoint) -> None:
    with pytest.raises(NetConfigInvalid):
        render_ruleset([bad])


def test_ruleset_refuses_duplicates() -> None:
    a = Endpoint("em-a", "org_a", IPv6Address("fd00::2"), IPv4Address("10.200.0.1"))
    for dup in (
        Endpoint("em-a", "org_b", IPv6Address("fd00::3")),
        Endpoint("em-b", "org_b", IPv6Address("fd00::2")),
        Endpoint("em-b", "org_b", IPv6Address("fd00::3"), IPv4Address("10.200.0.1")),
    ):
        with pytest.raises(NetConfigInvalid):
            render_ruleset([a, dup])


def test_policy_rejects_bad_ports() -> None:
    with pytest.raises(NetConfigInvalid):
        FirewallPolicy(host_tcp_ports=(0,))
    with pytest.raises(NetConfigInvalid):
        FirewallPolicy(host_udp_ports=(70000,))


def test_endpoint_from_lease() -> None:
    _, lease = LeaseTable(small_plan()).allocate("i_a")
    ep = Endpoint.from_lease(lease, "org_a")
    assert ep.tap == lease.tap and ep.ipv6 == lease.ipv6
    assert lease.ipv4 is not None and ep.ipv4 == lease.ipv4.ip
