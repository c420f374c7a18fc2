"""Instance isolation with nftables: a pure renderer and an applier.

The agent owns one table, ``inet ember``, rendered as a whole from the instances on the
host (tap → org, addresses) and applied in one ``nft -f -`` transaction that deletes and
re-creates the table, so no packet ever sees a half-written policy. The policy
(docs/specs/host-network.md, "nftables"):

- a packet from a tap must carry that instance's own source address (anti-spoofing; a tap
  the table does not know sends nothing at all);
- tap → tap: accepted only when both taps belong to the same org;
- tap → the host itself (input): only neighbour discovery and replies to connections the
  host opened (plus ports the platform names explicitly); every host service is out of
  reach, on any of the host's addresses;
- tap → anywhere else (egress): replies only, unless the policy allows egress (then with
  masquerading of the instance ranges);
- the host and the edge reach instances freely (output and forwarding *to* taps are not
  restricted by this table).

Only interfaces named ``em-*`` are matched, so the table never touches other traffic. A
host firewall with its own ``forward`` policy of drop must let ``em-*`` through.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from ember.agent.net.addressing import TAP_PREFIX, AddressPlan, Lease, check_ifname
from ember.agent.net.errors import FirewallApplyFailed, NetConfigInvalid, NetToolMissing

__all__ = [
    "FAMILY",
    "TABLE",
    "Endpoint",
    "Firewall",
    "FirewallPolicy",
    "render_ruleset",
]

FAMILY = "inet"
TABLE = "ember"
_ORG_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_TAP_GLOB = f'"{TAP_PREFIX}*"'
_ND_TYPES = "nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert"


@dataclasses.dataclass(frozen=True, order=True)
class Endpoint:
    """One instance as the firewall sees it."""

    tap: str
    org_id: str
    ipv6: IPv6Address
    ipv4: IPv4Address | None = None

    @classmethod
    def from_lease(cls, lease: Lease, org_id: str) -> Endpoint:
        return cls(
            tap=lease.tap,
            org_id=org_id,
            ipv6=lease.ipv6,
            ipv4=lease.ipv4.ip if lease.ipv4 is not None else None,
        )


@dataclasses.dataclass(frozen=True)
class FirewallPolicy:
    """What instances may do beyond the isolation rules (all off by default)."""

    egress: bool = False
    """Instances may open connections to anything that is not a tap or the host."""
    masquerade: tuple[IPv4Network | IPv6Network, ...] = ()
    """Source ranges NATed to the host's address when leaving through a non-tap link."""
    host_tcp_ports: tuple[int, ...] = ()
    """Host ports instances may connect to (a platform service: a DNS resolver, ...)."""
    host_udp_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for port in (*self.host_tcp_ports, *self.host_udp_ports):
            if not 1 <= port <= 65535:
                raise NetConfigInvalid(f"bad host port {port}", detail={"field": "host_ports"})

    @classmethod
    def for_plan(
        cls,
        plan: AddressPlan,
        *,
        egress: bool = False,
        host_tcp_ports: Sequence[int] = (),
        host_udp_ports: Sequence[int] = (),
    ) -> FirewallPolicy:
        """Egress, when allowed, masquerades the plan's prefix and IPv4 pool (neither is
        routed beyond the host until the overlay arrives)."""
        ranges: tuple[IPv4Network | IPv6Network, ...] = ()
        if egress:
            ranges = (plan.ipv6_prefix,) + ((plan.ipv4_pool,) if plan.ipv4_pool else ())
        return cls(
            egress=egress,
            masquerade=ranges,
            host_tcp_ports=tuple(sorted(set(host_tcp_ports))),
            host_udp_ports=tuple(sorted(set(host_udp_ports))),
        )


def _check(endpoints: Sequence[Endpoint]) -> None:
    seen: dict[object, str] = {}
    for e in endpoints:
        check_ifname(e.tap)
        if not e.tap.startswith(TAP_PREFIX):
            raise NetConfigInvalid(f"tap {e.tap!r} does not start with {TAP_PREFIX!r}")
        if not _ORG_ID.match(e.org_id):
            raise NetConfigInvalid(f"org id {e.org_id!r} is not a plain identifier")
        for key in (e.tap, e.ipv6, e.ipv4):
            if key is None:
                continue
            if key in seen:
                raise NetConfigInvalid(f"{key} appears twice (taps {seen[key]} and {e.tap})")
            seen[key] = e.tap


def _elements(items: Sequence[str]) -> list[str]:
    if not items:
        return []
    body = [f"\t\t\t{item}," for item in items]
    body[-1] = body[-1].rstrip(",")
    return ["\t\telements = {", *body, "\t\t}"]


def _ports(proto: str, ports: Sequence[int]) -> list[str]:
    if not ports:
        return []
    return [f"\t\t{proto} dport {{ {', '.join(str(p) for p in sorted(ports))} }} accept"]


def render_ruleset(endpoints: Iterable[Endpoint], policy: FirewallPolicy | None = None) -> str:
    """The ``nft -f`` script that replaces table ``inet ember`` (deterministic: the same
    instances in any order give the same text)."""
    policy = policy or FirewallPolicy()
    eps = sorted(endpoints)
    _check(eps)
    orgs = sorted({e.org_id for e in eps})
    chain_of = {org: f"org_{i}" for i, org in enumerate(orgs, start=1)}
    spoof = [
        "\t\tiifname . ip6 saddr != @instance_src6 drop",
        "\t\tiifname . ip saddr != @instance_src4 drop",
    ]
    lines = [
        "# Generated by the Ember agent (docs/specs/host-network.md); replaced as a whole.",
        f"table {FAMILY} {TABLE} {{}}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        '\tcomment "ember agent: instance isolation"',
        "",
        "\t# The source addresses each tap may send from (anything else is spoofed).",
        "\tset instance_src6 {",
        "\t\ttype ifname . ipv6_addr",
        *_elements([f'"{e.tap}" . {e.ipv6}' for e in eps]),
        "\t}",
        "",
        "\tset instance_src4 {",
        "\t\ttype ifname . ipv4_addr",
        *_elements([f'"{e.tap}" . {e.ipv4}' for e in eps if e.ipv4 is not None]),
        "\t}",
        "",
        "\t# Each tap's org: the chain that says which taps it may reach.",
        "\tmap instance_org {",
        "\t\ttype ifname : verdict",
        *_elements([f'"{e.tap}" : goto {chain_of[e.org_id]}' for e in eps]),
        "\t}",
        "",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        f"\t\tiifname {_TAP_GLOB} jump from_instance",
        "\t}",
        "",
        "\tchain from_instance {",
        *spoof,
        f"\t\toifname {_TAP_GLOB} iifname vmap @instance_org",
        f"\t\toifname {_TAP_GLOB} drop",
        "\t\tct state established,related accept",
        "\t\taccept" if policy.egress else "\t\tdrop",
        "\t}",
    ]
    for org in orgs:
        taps = ", ".join(f'"{e.tap}"' for e in eps if e.org_id == org)
        lines += [
            "",
            f"\tchain {chain_of[org]} {{",
            f'\t\tcomment "org {org}"',
            f"\t\toifname {{ {taps} }} accept",
            "\t\tdrop",
            "\t}",
        ]
    lines += [
        "",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\tiifname {_TAP_GLOB} jump instance_to_host",
        "\t}",
        "",
        "\tchain instance_to_host {",
        f"\t\ticmpv6 type {{ {_ND_TYPES} }} ip6 hoplimit 255 accept",
        *spoof,
        "\t\tct state established,related accept",
        *_ports("tcp", policy.host_tcp_ports),
        *_ports("udp", policy.host_udp_ports),
        "\t\tdrop",
        "\t}",
    ]
    if policy.masquerade:
        lines += [
            "",
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        ]
        for net in policy.masquerade:
            proto = "ip6" if net.version == 6 else "ip"
            lines.append(f"\t\toifname != {_TAP_GLOB} {proto} saddr {net} masquerade")
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


_REMOVE = f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"


class Firewall:
    """Applies rendered rulesets with ``nft -f -`` (in network namespace ``netns`` when
    given: ``ip netns exec``)."""

    def __init__(self, *, netns: str | None = None, nft: str = "nft") -> None:
        self.netns = netns
        self.nft = nft

    def sync(self, endpoints: Iterable[Endpoint], policy: FirewallPolicy | None = None) -> str:
        """Render and apply; returns the ruleset applied."""
        ruleset = render_ruleset(endpoints, policy)
        self.apply(ruleset)
        return ruleset

    def apply(self, ruleset: str) -> None:
        """One atomic transaction: either the whole ruleset is in force or nothing
        changed."""
        self._run(["-f", "-"], ruleset)

    def remove(self) -> None:
        """Delete the table (no-op when it does not exist)."""
        self._run(["-f", "-"], _REMOVE)

    def dump(self) -> str:
        """``nft list table inet ember`` ("" when the table does not exist)."""
        if f"table {FAMILY} {TABLE}" not in self._run(["list", "tables"], None):
            return ""
        return self._run(["list", "table", FAMILY, TABLE], None)

    def _run(self, args: list[str], stdin: str | None) -> str:
        if shutil.which(self.nft) is None:
            raise NetToolMissing(
                f"{self.nft} is not installed", hint="install the nftables package"
            )
        argv = [self.nft, *args]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        try:
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise FirewallApplyFailed(f"{' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise FirewallApplyFailed(
                f"nft {' '.join(args)} failed: {proc.stderr.strip()}",
                detail={"exit_code": proc.returncode, "stderr": proc.stderr[-4000:]},
            )
        return proc.stdout
