"""The host network with real taps, routes and nftables, inside network namespaces the
tests create (nothing touches the machine's own namespace).

A "host" namespace holds the taps :class:`TapNetwork` creates and the ``inet ember``
table. Each "guest" is a namespace of its own whose ``eth0`` is a tap too; a small relay
process opens the host's tap and the guest's tap and copies frames between them — exactly
what a VMM does with a tap, so the guest's kernel stack (configured as the platform init
configures a VM) stands in for the VM. Traffic is TCP (and UDP for spoofing) through
Python sockets started with ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.agent.net import (
    AddressPlan,
    Endpoint,
    Firewall,
    FirewallPolicy,
    Lease,
    LeaseTable,
    TapConflict,
    TapNetwork,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun"),
]

GOLDEN = Path(__file__).parent.parent / "unit" / "golden" / "net"
PY = sys.executable
SERVICE_PORT = 8080
HOST_PORT = 9090
ORG_A, ORG_B = "org_acme", "org_beta"
OUTSIDE_HOST_V6, OUTSIDE_V6 = "2001:db8:ff::1", "2001:db8:ff::2"
OUTSIDE_HOST_V4, OUTSIDE_V4 = "192.0.2.1", "192.0.2.2"

# The VMM stand-in: attach to the host's tap in the namespace it starts in, then create
# the guest's NIC (a tap named eth0) in the guest's namespace, and copy frames both ways.
RELAY = r"""
import ctypes, fcntl, os, select, struct, sys

def attach(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))
    return fd

host = attach(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
ns = os.open("/run/netns/" + sys.argv[2], os.O_RDONLY)
if libc.setns(ns, 0x40000000) != 0:
    raise OSError(ctypes.get_errno(), "setns")
guest = attach("eth0")
print("ready", flush=True)
peer = {host: guest, guest: host}
while True:
    for fd in select.select([host, guest], [], [])[0]:
        frame = os.read(fd, 65536)
        try:
            os.write(peer[fd], frame)
        except OSError:
            pass
"""

# A TCP service answering its name, and a UDP sink that logs who sent what.
SERVER = r"""
import socket, sys, threading
name, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    while True:
        data, addr = u.recvfrom(2048)
        with open(log, "a") as f:
            f.write(f"{addr[0]} {data.decode()}\n")

threading.Thread(target=udp, daemon=True).start()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(name.encode())
    except OSError:
        pass
    c.close()
"""

CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5) as c:
        c.settimeout(1.5)
        print(c.recv(100).decode())
except OSError as exc:
    print(f"failed: {exc}")
    sys.exit(1)
"""

SEND_UDP = r"""
import socket, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((src, 0))
s.sendto(payload.encode(), (dst, port))
"""


def sh(*argv: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=30, check=check, **kwargs
    )


def in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=False)


def connect_all(attempts: list[tuple[str, object, int]]) -> list[str | None]:
    """What the service at each ``(namespace, address, port)`` answered a TCP connection
    from that namespace (``None``: no connection); run in parallel (each failure waits
    out the client's timeout)."""
    procs = [
        subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", CLIENT, str(address), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ns, address, port in attempts
    ]
    results: list[str | None] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        results.append(out.strip() if proc.returncode == 0 else None)
    return results


def connect(ns: str, address: object, port: int) -> str | None:
    return connect_all([(ns, address, port)])[0]


@dataclasses.dataclass
class Guest:
    name: str
    org: str
    ns: str
    lease: Lease
    log: Path


class Topology:
    """One host namespace with its taps and firewall, and guests attached by relays."""

    def __init__(self, tmp: Path) -> None:
        suffix = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.tmp = tmp
        self.suffix = suffix
        self.host_ns = f"emt-host-{suffix}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.plan = AddressPlan.for_host(f"test-{suffix}")
        self.table = LeaseTable(self.plan)
        self.guests: dict[str, Guest] = {}
        self.outside_ns = f"emt-out-{suffix}"
        self.taps = TapNetwork(netns=self.host_ns, uplinks=["up0"])
        self.firewall = Firewall(netns=self.host_ns)
        self.host_log = tmp / "host.udp"

    def boot(self) -> None:
        self.add_ns(self.host_ns)
        in_ns(self.host_ns, "ip", "link", "set", "lo", "up")
        # "The internet": a namespace behind the host's uplink up0, with a service of its
        # own and no route back to the instance ranges (only masquerading gets replies
        # home).
        self.add_ns(self.outside_ns)
        sh(
            "ip",
            "-n",
            self.host_ns,
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "out0",
            "netns",
            self.outside_ns,
        )
        for ns, dev, v6, v4 in (
            (self.host_ns, "up0", OUTSIDE_HOST_V6, OUTSIDE_HOST_V4),
            (self.outside_ns, "out0", OUTSIDE_V6, OUTSIDE_V4),
        ):
            sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.start(self.outside_ns, SERVER, "outside", str(SERVICE_PORT), str(tmp_out(self)))
        self.taps.prepare_host(self.plan)
        self.start(self.host_ns, SERVER, "host", str(HOST_PORT), str(self.host_log))

    def add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)

    def start(self, ns: str, code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        return proc

    def add_guest(self, name: str, org: str) -> Guest:
        self.table, lease = self.table.allocate(f"i_{name}_{self.suffix}")
        self.taps.create(lease)
        ns = f"emt-{name}-{self.suffix}"
        self.add_ns(ns)
        # The VMM opens the host's tap; the guest's NIC appears in the guest namespace.
        self.start(self.host_ns, RELAY, lease.tap, ns)
        self.configure_like_the_init(ns, lease)
        guest = Guest(name, org, ns, lease, self.tmp / f"{name}.udp")
        self.start(ns, SERVER, name, str(SERVICE_PORT), str(guest.log))
        self.guests[name] = guest
        return guest

    @staticmethod
    def configure_like_the_init(ns: str, lease: Lease) -> None:
        """What guest/init does with the config drive's network (see its setup_network)."""
        net = lease.guest_network()
        assert net.ipv6 and net.ipv6_gateway and net.ipv4 and net.ipv4_gateway
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=0"],
            ["ip", "link", "set", "eth0", "address", lease.mac, "up"],
            ["ip", "-6", "addr", "add", net.ipv6, "dev", "eth0", "nodad"],
            ["ip", "addr", "add", net.ipv4, "dev", "eth0"],
            [
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                net.ipv6_gateway,
                "dev",
                "eth0",
                "onlink",
            ],
            ["ip", "route", "add", "default", "via", net.ipv4_gateway, "dev", "eth0", "onlink"],
        ):
            proc = in_ns(ns, *cmd)
            assert proc.returncode == 0, f"{cmd}: {proc.stderr}"

    def sync_firewall(self, *, without: str | None = None) -> str:
        endpoints = [
            Endpoint.from_lease(g.lease, g.org) for g in self.guests.values() if g.name != without
        ]
        return self.firewall.sync(endpoints, FirewallPolicy())

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
        # Deleting a namespace destroys its taps, routes and nftables tables with it.
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


def tmp_out(topo: Topology) -> Path:
    return topo.tmp / "outside.udp"


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    for tool in ("ip", "nft", "sysctl"):
        assert shutil.which(tool), f"{tool} is missing: run `make bootstrap`"
    topo = Topology(tmp_path_factory.mktemp("net"))
    try:
        topo.boot()
        topo.add_guest("a1", ORG_A)
        topo.add_guest("a2", ORG_A)
        topo.add_guest("b1", ORG_B)
        yield topo
    finally:
        topo.close()


@pytest.fixture
def isolated(topo: Topology) -> Topology:
    topo.sync_firewall()
    return topo


def host_side_addresses(topo: Topology, guest: Guest) -> list[str]:
    """Every address a guest could try to reach the host on."""
    lease = guest.lease
    assert lease.host_ipv4 is not None
    other = next(g for g in topo.guests.values() if g is not guest)
    assert other.lease.host_ipv4 is not None
    return [
        str(lease.host_ipv6),
        "fe80::1%eth0",
        str(lease.host_ipv4.ip),
        str(other.lease.host_ipv4.ip),  # the host's side of another tap
    ]


def udp_received(log: Path, payload: str, wait_s: float) -> list[str]:
    deadline = time.monotonic() + wait_s
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        hits = [line for line in lines if line.endswith(" " + payload)]
        if hits or time.monotonic() > deadline:
            return hits
        time.sleep(0.05)


# -- without the table: the controls ------------------------------------------------------


def test_without_the_table_everything_reaches_everything(topo: Topology) -> None:
    """The negative results below are the firewall's doing: without table inet ember the
    same connections succeed."""
    topo.firewall.remove()
    assert topo.firewall.dump() == ""
    a1, b1 = topo.guests["a1"], topo.guests["b1"]
    assert connect(a1.ns, b1.lease.ipv6, SERVICE_PORT) == "b1"
    assert b1.lease.ipv4 is not None
    assert connect(a1.ns, b1.lease.ipv4.ip, SERVICE_PORT) == "b1"
    for address in host_side_addresses(topo, a1):
        assert connect(a1.ns, address, HOST_PORT) == "host", address
    # A spoofed source gets through too.
    spoofed = str(topo.plan.ipv6_prefix[0xBAD])
    added = in_ns(a1.ns, "ip", "-6", "addr", "add", f"{spoofed}/128", "dev", "eth0", "nodad")
    assert added.returncode == 0, added.stderr
    try:
        send = (spoofed, str(b1.lease.ipv6), str(SERVICE_PORT), "s0")
        assert in_ns(a1.ns, PY, "-c", SEND_UDP, *send).returncode == 0
        assert udp_received(b1.log, "s0", 5) == [f"{spoofed} s0"]
    finally:
        in_ns(a1.ns, "ip", "-6", "addr", "del", f"{spoofed}/128", "dev", "eth0")


# -- with the table -----------------------------------------------------------------------


def test_the_host_reaches_every_instance(isolated: Topology) -> None:
    for guest in isolated.guests.values():
        assert connect(isolated.host_ns, guest.lease.ipv6, SERVICE_PORT) == guest.name
        assert guest.lease.ipv4 is not None
        assert connect(isolated.host_ns, guest.lease.ipv4.ip, SERVICE_PORT) == guest.name


def test_instances_of_one_org_reach_each_other(isolated: Topology) -> None:
    a1, a2 = isolated.guests["a1"], isolated.guests["a2"]
    for src, dst in ((a1, a2), (a2, a1)):
        assert connect(src.ns, dst.lease.ipv6, SERVICE_PORT) == dst.name
        assert dst.lease.ipv4 is not None
        assert connect(src.ns, dst.lease.ipv4.ip, SERVICE_PORT) == dst.name


def test_instances_of_other_orgs_are_unreachable(isolated: Topology) -> None:
    g = isolated.guests
    attempts: list[tuple[str, object, int]] = []
    for src, dst in ((g["a1"], g["b1"]), (g["b1"], g["a1"]), (g["b1"], g["a2"])):
        assert dst.lease.ipv4 is not None
        attempts += [
            (src.ns, dst.lease.ipv6, SERVICE_PORT),
            (src.ns, dst.lease.ipv4.ip, SERVICE_PORT),
        ]
    assert connect_all(attempts) == [None] * len(attempts), attempts


def test_instances_cannot_reach_host_services(isolated: Topology) -> None:
    attempts: list[tuple[str, object, int]] = [
        (guest.ns, address, HOST_PORT)
        for guest in isolated.guests.values()
        for address in host_side_addresses(isolated, guest)
    ]
    assert connect_all(attempts) == [None] * len(attempts), attempts
    # The host's service itself is up (the control test reaches it without the table).
    assert connect(isolated.host_ns, isolated.plan.host_ipv6, HOST_PORT) == "host"


def test_spoofed_sources_are_dropped(isolated: Topology) -> None:
    """a1 sends to a2 (same org: allowed) from b1's address (another org's instance) and
    from a free address of the prefix: only the source check stops those. Its own address
    still gets through."""
    a1, a2, b1 = (isolated.guests[n] for n in ("a1", "a2", "b1"))
    sources = [str(b1.lease.ipv6), str(isolated.plan.ipv6_prefix[0xBAD])]
    for address in sources:
        in_ns(a1.ns, "ip", "-6", "addr", "add", f"{address}/128", "dev", "eth0", "nodad")
    try:
        for n, address in enumerate(sources):
            send = (address, str(a2.lease.ipv6), str(SERVICE_PORT), f"spoof{n}")
            assert in_ns(a1.ns, PY, "-c", SEND_UDP, *send).returncode == 0
        honest = (str(a1.lease.ipv6), str(a2.lease.ipv6), str(SERVICE_PORT), "honest")
        assert in_ns(a1.ns, PY, "-c", SEND_UDP, *honest).returncode == 0
        assert udp_received(a2.log, "honest", 5) == [f"{a1.lease.ipv6} honest"]
        for n in range(len(sources)):
            assert udp_received(a2.log, f"spoof{n}", 0.5) == []
    finally:
        for address in sources:
            in_ns(a1.ns, "ip", "-6", "addr", "del", f"{address}/128", "dev", "eth0")


def test_a_tap_missing_from_the_table_sends_nothing(isolated: Topology) -> None:
    """The order is: create the tap, apply the table, boot. A tap the table does not know
    (yet) is cut off: even replies to the host are dropped."""
    b1 = isolated.guests["b1"]
    isolated.sync_firewall(without="b1")
    try:
        assert connect(isolated.host_ns, b1.lease.ipv6, SERVICE_PORT) is None
    finally:
        isolated.sync_firewall()
    assert connect(isolated.host_ns, b1.lease.ipv6, SERVICE_PORT) == "b1"


def test_the_applied_table_is_the_rendered_one(isolated: Topology) -> None:
    dump = isolated.firewall.dump()
    assert "table inet ember" in dump
    for guest in isolated.guests.values():
        assert f'"{guest.lease.tap}" . {guest.lease.ipv6}' in dump
    # Applying again is one more transaction replacing the table, not an addition.
    isolated.sync_firewall()
    assert isolated.firewall.dump() == dump


def test_egress_only_when_the_policy_allows_it(isolated: Topology) -> None:
    a1, b1 = isolated.guests["a1"], isolated.guests["b1"]
    outside = [(a1.ns, OUTSIDE_V6, SERVICE_PORT), (a1.ns, OUTSIDE_V4, SERVICE_PORT)]
    assert connect_all(outside) == [None, None]
    isolated.firewall.sync(
        [Endpoint.from_lease(g.lease, g.org) for g in isolated.guests.values()],
        FirewallPolicy.for_plan(isolated.plan, egress=True),
    )
    try:
        assert connect_all(outside) == ["outside", "outside"]
        # Egress opens the outside only: other orgs and the host stay closed.
        closed = [
            (a1.ns, b1.lease.ipv6, SERVICE_PORT),
            (a1.ns, a1.lease.host_ipv6, HOST_PORT),
            (a1.ns, OUTSIDE_HOST_V6, HOST_PORT),  # the host's uplink address is the host
        ]
        assert connect_all(closed) == [None, None, None]
    finally:
        isolated.sync_firewall()


@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("*.nft")))
def test_every_golden_ruleset_is_accepted_by_nft(topo: Topology, golden: str) -> None:
    firewall = Firewall(netns=topo.host_ns)
    try:
        firewall.apply((GOLDEN / golden).read_text())
        assert "table inet ember" in firewall.dump()
    finally:
        topo.sync_firewall()


# -- taps ---------------------------------------------------------------------------------


@pytest.fixture
def bare_ns() -> Iterator[str]:
    name = f"emt-bare-{os.getpid()}-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    proc = sh("ip", "-n", ns, "-j", *args)
    return list(json.loads(proc.stdout or "[]"))


def test_create_is_idempotent_and_complete(bare_ns: str) -> None:
    plan = AddressPlan.for_host("h-taps")
    _, lease = LeaseTable(plan).allocate("i_one")
    taps = TapNetwork(netns=bare_ns)
    taps.prepare_host(plan)
    first = taps.create(lease, owner_uid=4242, owner_gid=4243)
    again = taps.create(lease, owner_uid=4242)
    assert first == again
    assert (first.name, first.instance_id, first.owner_uid, first.owner_gid) == (
        lease.tap,
        "i_one",
        4242,
        4243,
    )
    assert first.up and not first.carrier  # no VMM attached yet
    (link,) = ip_json(bare_ns, "-d", "link", "show", "dev", lease.tap)
    assert link["ifalias"] == "ember:i_one"
    assert link["linkinfo"]["info_data"]["type"] == "tap"
    addrs = {(a["local"], a["prefixlen"]) for a in link_addrs(bare_ns, lease.tap)}
    assert lease.host_ipv4 is not None
    assert {("fe80::1", 64), (str(plan.host_ipv6), 128), (str(lease.host_ipv4.ip), 31)} <= addrs
    routes6 = ip_json(bare_ns, "-6", "route", "show")
    assert {"dst": str(lease.ipv6), "dev": lease.tap} in [
        {"dst": r["dst"], "dev": r.get("dev")} for r in routes6
    ]
    assert {"dst": str(plan.ipv6_prefix), "type": "unreachable"} in [
        {"dst": r["dst"], "type": r.get("type")} for r in routes6
    ]
    sysctl = in_ns(
        bare_ns,
        "sysctl",
        "-n",
        f"net.ipv4.conf.{lease.tap}.forwarding",
        "net.ipv6.conf.all.forwarding",
        f"net.ipv6.conf.{lease.tap}.accept_ra",
    )
    assert sysctl.stdout.split() == ["1", "1", "0"]

    # Deleting an address by hand, then create again: it comes back.
    sh("ip", "-n", bare_ns, "addr", "del", f"{plan.host_ipv6}/128", "dev", lease.tap)
    taps.create(lease)
    assert (str(plan.host_ipv6), 128) in {
        (a["local"], a["prefixlen"]) for a in link_addrs(bare_ns, lease.tap)
    }

    # A restarted agent finds the tap (and whose it is) by name prefix.
    assert [(t.name, t.instance_id) for t in TapNetwork(netns=bare_ns).list_taps()] == [
        (lease.tap, "i_one")
    ]
    assert taps.delete(lease) is True
    assert taps.delete(lease) is False
    assert taps.delete(lease.tap) is False
    assert taps.list_taps() == []
    assert ip_json(bare_ns, "link", "show", "dev", "lo")  # the namespace is still fine


def link_addrs(ns: str, dev: str) -> list[dict[str, Any]]:
    (info,) = ip_json(ns, "addr", "show", "dev", dev)
    return list(info["addr_info"])


def test_create_refuses_what_is_not_its_tap(bare_ns: str) -> None:
    plan = AddressPlan.for_host("h-conflict")
    table, a = LeaseTable(plan).allocate("i_a")
    taps = TapNetwork(netns=bare_ns)
    taps.create(a, owner_uid=1000)
    # Another instance's lease naming the same tap (a corrupt lease file).
    intruder = dataclasses.replace(a, instance_id="i_intruder")
    with pytest.raises(TapConflict):
        taps.create(intruder)
    with pytest.raises(TapConflict):
        taps.create(a, owner_uid=2000)  # a Firecracker of another uid could not open it
    # A link of another kind under a tap's name.
    table, b = table.allocate("i_b")
    sh("ip", "-n", bare_ns, "link", "add", b.tap, "type", "veth", "peer", "name", "emtpeer")
    with pytest.raises(TapConflict):
        taps.create(b)
    assert [t.name for t in taps.list_taps()] == [a.tap]  # the veth is not listed


def test_proxy_ndp_on_an_uplink(bare_ns: str) -> None:
    """Only for a prefix that is on-link at the uplink: the host answers neighbour
    solicitations there for each instance's address."""
    sh("ip", "-n", bare_ns, "link", "add", "up0", "type", "veth", "peer", "name", "up0peer")
    plan = AddressPlan.for_host("h-ndp", ipv6_prefix="2001:db8:7::/64")
    _, lease = LeaseTable(plan).allocate("i_ndp")
    taps = TapNetwork(netns=bare_ns, ndp_proxy_uplink="up0")
    taps.prepare_host(plan)
    taps.create(lease)
    proxied = sh("ip", "-n", bare_ns, "-6", "neigh", "show", "proxy", "dev", "up0").stdout
    assert str(lease.ipv6) in proxied
    sysctl = in_ns(bare_ns, "sysctl", "-n", "net.ipv6.conf.up0.proxy_ndp")
    assert sysctl.stdout.strip() == "1"
    assert taps.delete(lease)
    proxied = sh("ip", "-n", bare_ns, "-6", "neigh", "show", "proxy", "dev", "up0").stdout
    assert str(lease.ipv6) not in proxied
