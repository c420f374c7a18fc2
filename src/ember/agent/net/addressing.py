"""The host's addressing plan and the host-local allocator (pure: no I/O).

docs/specs/host-network.md is the contract. In short, per host:

- an IPv6 prefix (a /64 from config; by default the ULA ``fdXX:XXXX:XXXX::/64`` whose 40-bit
  global id is the start of ``sha256("ember-host:" + host_id)``); ``<prefix>::1`` is the
  host's own address on every tap, ``<prefix>::`` is never handed out;
- every instance gets one address of that prefix: the offset ``sha256(instance id)`` modulo
  the usable range, then the next free one (linear probing), so the same instance id gets
  the same address whenever it is free, whatever order instances come in;
- optionally an IPv4 ``/31`` per instance from a private pool (default ``10.200.0.0/16``):
  the even address is the host's side, the odd one the guest's (RFC 3021 point-to-point);
- a point-to-point tap per instance named ``em-`` + 12 base32 characters of
  ``sha256(instance id)`` (15 bytes, Linux's limit), probing on a collision;
- the guest's gateway is the link-local ``fe80::1`` (IPv6) and the host's ``/31`` side
  (IPv4); the guest's MAC is ``02:`` + 5 bytes of the instance id's hash.

:class:`LeaseTable` is the immutable state (instance id → :class:`Lease`) with
``allocate`` / ``release`` returning a new table; :class:`HostLocalAllocator` is the
:class:`AddressAllocator` the agent uses until the cluster IPAM (the overlay work) replaces
it. Leases are persisted by the caller (``ember.agent.net.store.LeaseStore``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Protocol

from ember.agent.guest_config import Network
from ember.agent.net.errors import AddressesExhausted, NetConfigInvalid

__all__ = [
    "DEFAULT_IPV4_POOL",
    "GUEST_GATEWAY_V6",
    "IFNAME_MAX",
    "TAP_PREFIX",
    "AddressAllocator",
    "AddressPlan",
    "HostLocalAllocator",
    "Lease",
    "LeaseTable",
    "check_ifname",
    "default_ipv6_prefix",
    "guest_mac",
    "pick_ipv4",
    "pick_ipv6",
    "tap_name",
]

TAP_PREFIX = "em-"
"""Every instance tap starts with this; the firewall matches ``em-*``. Not plain ``em``:
biosdevname calls on-board NICs ``em1``, ``em2``, and a host's uplink must never match."""
IFNAME_MAX = 15
"""Linux's ``IFNAMSIZ`` (16) less the terminating NUL."""
_TAP_HASH_CHARS = IFNAME_MAX - len(TAP_PREFIX)
_TAP_PROBES = 64
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase (as core.ids)
_IFNAME_BAD = re.compile(r"[/:\s]")

GUEST_GATEWAY_V6 = IPv6Address("fe80::1")
"""The host's link-local address on every tap: the guest's IPv6 default gateway."""
DEFAULT_IPV4_POOL = IPv4Network("10.200.0.0/16")
_HOST_OFFSET_V6 = 1  # <prefix>::1 is the host
_FIRST_INSTANCE_OFFSET_V6 = 2  # <prefix>:: is the subnet-router anycast address
_CGNAT = IPv4Network("100.64.0.0/10")


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).digest()


def default_ipv6_prefix(host_id: str) -> IPv6Network:
    """The host's default prefix: the ULA ``fd00::/8`` + a 40-bit global id taken from
    ``sha256("ember-host:" + host_id)`` (RFC 4193 asks for a pseudo-random one) + subnet 0,
    as a /64."""
    if not host_id:
        raise NetConfigInvalid("the host id is empty: it seeds the default IPv6 prefix")
    global_id = int.from_bytes(_digest(f"ember-host:{host_id}")[:5], "big")
    value = (0xFD << 120) | (global_id << 80)
    return IPv6Network((value, 64))


def check_ifname(name: str) -> str:
    """``name`` if Linux accepts it as an interface name (1-15 bytes, no ``/``, ``:`` or
    whitespace, not ``.``/``..``); :class:`NetConfigInvalid` otherwise."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if not 1 <= size <= IFNAME_MAX or name in (".", "..") or _IFNAME_BAD.search(name):
        raise NetConfigInvalid(
            f"{name!r} is not a Linux interface name (1-{IFNAME_MAX} bytes, no '/', ':' or "
            "whitespace)",
            detail={"field": "ifname"},
        )
    return name


def tap_name(instance_id: str, taken: Mapping[str, str] | None = None) -> str:
    """The tap of ``instance_id``: ``em-`` + 12 base32 characters of a hash of the id.

    ``taken`` maps tap names in use to the instance holding each; a name held by another
    instance is skipped (the next probe hashes ``id + "\\0" + n``), so two instances never
    share a tap, and an instance always gets the name it holds."""
    if taken is None:
        taken = {}
    for probe in range(_TAP_PROBES):
        parts = (instance_id,) if probe == 0 else (instance_id, str(probe))
        value = int.from_bytes(_digest("tap", *parts), "big")
        chars = "".join(_ALPHABET[(value >> (5 * i)) & 31] for i in range(_TAP_HASH_CHARS))
        name = TAP_PREFIX + chars
        if taken.get(name, instance_id) == instance_id:
            return name
    raise AddressesExhausted(  # 2**60 names: only a broken `taken` gets here
        f"no free tap name for {instance_id} after {_TAP_PROBES} probes"
    )


def guest_mac(instance_id: str) -> str:
    """The guest NIC's MAC: locally administered unicast (``02:``) + 5 hash bytes."""
    tail = _digest("mac", instance_id)[:5]
    return ":".join(f"{b:02x}" for b in (0x02, *tail))


def _probe(key: bytes, low: int, count: int, used: Collection[int], *, what: str, hint: str) -> int:
    """The first offset in ``[low, low + count)`` not in ``used``, starting at the hash of
    ``key`` and going up (wrapping). ``used`` holds offsets within that range only."""
    if count <= 0 or len(used) >= count:
        raise AddressesExhausted(f"no free {what}: all {count} are in use", hint=hint)
    start = int.from_bytes(key[:16], "big") % count
    # At most len(used) + 1 steps: the check above guarantees a free slot.
    for step in range(len(used) + 1):
        offset = low + (start + step) % count
        if offset not in used:
            return offset
    raise AssertionError("unreachable: a free offset exists")  # pragma: no cover


def pick_ipv6(prefix: IPv6Network, instance_id: str, in_use: Iterable[IPv6Address]) -> IPv6Address:
    """The address of ``instance_id`` in ``prefix`` given the addresses ``in_use``
    (deterministic; ``<prefix>::`` and ``<prefix>::1`` are never returned)."""
    base = int(prefix.network_address)
    size = prefix.num_addresses
    low, count = _FIRST_INSTANCE_OFFSET_V6, size - _FIRST_INSTANCE_OFFSET_V6
    used = {int(a) - base for a in in_use if a in prefix}
    used = {o for o in used if o >= low}
    offset = _probe(
        _digest("ipv6", instance_id),
        low,
        count,
        used,
        what=f"IPv6 address in {prefix}",
        hint="give the host a larger prefix (a /64)",
    )
    return IPv6Address(base + offset)


def pick_ipv4(pool: IPv4Network, instance_id: str, in_use: Iterable[IPv4Address]) -> IPv4Network:
    """The ``/31`` of ``instance_id`` in ``pool`` given the guest (odd) addresses
    ``in_use`` (deterministic). Its first address is the host's side, the second the
    guest's."""
    base = int(pool.network_address)
    used = {(int(a) - base) // 2 for a in in_use if a in pool}
    slot = _probe(
        _digest("ipv4", instance_id),
        0,
        pool.num_addresses // 2,
        used,
        what=f"IPv4 /31 in {pool}",
        hint="give the host a larger IPv4 pool, or none (IPv6 only)",
    )
    return IPv4Network((base + 2 * slot, 31))


@dataclasses.dataclass(frozen=True)
class AddressPlan:
    """A host's network configuration (read once at start-up, passed down)."""

    ipv6_prefix: IPv6Network
    ipv4_pool: IPv4Network | None = DEFAULT_IPV4_POOL
    """``None``: instances get IPv6 only."""

    def __post_init__(self) -> None:
        p = self.ipv6_prefix
        if (
            not isinstance(p, IPv6Network)
            or not 16 <= p.prefixlen <= 126
            or p.is_link_local
            or p.is_multicast
            or p.is_loopback
            or p.is_unspecified
            or p.is_site_local
            or p.is_reserved
            or p.subnet_of(IPv6Network("::ffff:0:0/96"))
        ):
            raise NetConfigInvalid(
                f"IPv6 prefix {p} cannot hold instances: give a unicast (ULA or global) "
                "prefix between /16 and /126, normally a /64",
                detail={"field": "ipv6_prefix"},
            )
        v4 = self.ipv4_pool
        if v4 is not None and (
            not isinstance(v4, IPv4Network)
            or v4.prefixlen > 30
            or not (v4.is_private or v4.subnet_of(_CGNAT))
            or v4.is_loopback
            or v4.is_link_local
            or v4.is_multicast
            or v4.is_unspecified
        ):
            raise NetConfigInvalid(
                f"IPv4 pool {v4} cannot hold instances: give a private network "
                "(RFC 1918 or 100.64.0.0/10) of at least /30",
                detail={"field": "ipv4_pool"},
            )

    @classmethod
    def for_host(
        cls,
        host_id: str,
        *,
        ipv6_prefix: str | None = None,
        ipv4_pool: str | None = str(DEFAULT_IPV4_POOL),
    ) -> AddressPlan:
        """From configuration strings: ``ipv6_prefix`` ``None`` means the default ULA of
        ``host_id``; ``ipv4_pool`` ``None`` or ``""`` means IPv6 only."""
        try:
            prefix = (
                IPv6Network(ipv6_prefix, strict=True)
                if ipv6_prefix
                else default_ipv6_prefix(host_id)
            )
            pool = IPv4Network(ipv4_pool, strict=True) if ipv4_pool else None
        except ValueError as exc:
            raise NetConfigInvalid(f"bad network configuration: {exc}") from exc
        return cls(prefix, pool)

    @property
    def host_ipv6(self) -> IPv6Address:
        """The host's own address in the prefix (on every tap; the source of the host's
        and the edge's connections to instances)."""
        return self.ipv6_prefix[_HOST_OFFSET_V6]


@dataclasses.dataclass(frozen=True, order=True)
class Lease:
    """One instance's network identity on this host."""

    instance_id: str
    tap: str
    ipv6: IPv6Address
    host_ipv6: IPv6Address
    mac: str
    ipv4: IPv4Interface | None = None
    """The guest's side of the /31 (``10.200.x.y/31``, y odd), or ``None``."""

    @property
    def host_ipv4(self) -> IPv4Interface | None:
        """The host's side of the /31 (the guest's IPv4 gateway)."""
        if self.ipv4 is None:
            return None
        return IPv4Interface((self.ipv4.network.network_address, 31))

    def guest_network(
        self, *, mtu: int | None = None, nameservers: tuple[str, ...] = ()
    ) -> Network:
        """The guest's ``eth0`` for its config drive (docs/specs/guest-config.md)."""
        host4 = self.host_ipv4
        return Network(
            ipv6=f"{self.ipv6}/128",
            ipv6_gateway=str(GUEST_GATEWAY_V6),
            ipv4=str(self.ipv4) if self.ipv4 is not None else None,
            ipv4_gateway=str(host4.ip) if host4 is not None else None,
            mtu=mtu,
            nameservers=nameservers,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "instance_id": self.instance_id,
            "tap": self.tap,
            "ipv6": str(self.ipv6),
            "host_ipv6": str(self.host_ipv6),
            "mac": self.mac,
        }
        if self.ipv4 is not None:
            out["ipv4"] = str(self.ipv4)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lease:
        try:
            ipv4 = data.get("ipv4")
            lease = cls(
                instance_id=str(data["instance_id"]),
                tap=check_ifname(str(data["tap"])),
                ipv6=IPv6Address(data["ipv6"]),
                host_ipv6=IPv6Address(data["host_ipv6"]),
                mac=str(data["mac"]),
                ipv4=IPv4Interface(ipv4) if ipv4 else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NetConfigInvalid(f"bad lease {dict(data)!r}: {exc}") from exc
        if lease.ipv4 is not None and (
            lease.ipv4.network.prefixlen != 31 or int(lease.ipv4.ip) % 2 != 1
        ):
            raise NetConfigInvalid(f"bad lease IPv4 {lease.ipv4}: the odd address of a /31")
        return lease


@dataclasses.dataclass(frozen=True)
class LeaseTable:
    """The leases of one host (immutable; ``allocate`` / ``release`` return new tables)."""

    plan: AddressPlan
    leases: Mapping[str, Lease] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "leases", types.MappingProxyType(dict(self.leases)))
        seen: dict[object, str] = {}
        for iid, lease in self.leases.items():
            if iid != lease.instance_id:
                raise NetConfigInvalid(f"lease of {lease.instance_id} filed under {iid}")
            for key in (("tap", lease.tap), ("ipv6", lease.ipv6), ("ipv4", lease.ipv4)):
                if key[1] is None:
                    continue
                if key in seen:
                    raise NetConfigInvalid(
                        f"{key[0]} {key[1]} is leased to both {seen[key]} and {iid}"
                    )
                seen[key] = iid

    def allocate(self, instance_id: str) -> tuple[LeaseTable, Lease]:
        """The lease of ``instance_id``: the one it holds, else a new one (the table with
        it added is returned too)."""
        if not instance_id:
            raise NetConfigInvalid("the instance id is empty", detail={"field": "instance_id"})
        held = self.leases.get(instance_id)
        if held is not None:
            return self, held
        leases = self.leases.values()
        ipv6 = pick_ipv6(self.plan.ipv6_prefix, instance_id, [x.ipv6 for x in leases])
        ipv4 = None
        if self.plan.ipv4_pool is not None:
            net = pick_ipv4(self.plan.ipv4_pool, instance_id, [x.ipv4.ip for x in leases if x.ipv4])
            ipv4 = IPv4Interface((net.network_address + 1, 31))
        lease = Lease(
            instance_id=instance_id,
            tap=tap_name(instance_id, {x.tap: x.instance_id for x in leases}),
            ipv6=ipv6,
            host_ipv6=self.plan.host_ipv6,
            mac=guest_mac(instance_id),
            ipv4=ipv4,
        )
        return dataclasses.replace(self, leases={**self.leases, instance_id: lease}), lease

    def release(self, instance_id: str) -> LeaseTable:
        """The table without ``instance_id``'s lease (unchanged if it holds none)."""
        if instance_id not in self.leases:
            return self
        rest = {k: v for k, v in self.leases.items() if k != instance_id}
        return dataclasses.replace(self, leases=rest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "leases": [self.leases[k].to_dict() for k in sorted(self.leases)],
        }

    @classmethod
    def from_dict(cls, plan: AddressPlan, data: Mapping[str, Any]) -> LeaseTable:
        if data.get("version") != 1 or not isinstance(data.get("leases"), list):
            raise NetConfigInvalid("not a version-1 lease table")
        leases = [Lease.from_dict(item) for item in data["leases"]]
        return cls(plan, {x.instance_id: x for x in leases})


class AddressAllocator(Protocol):
    """Hands out instance addresses on this host. Today :class:`HostLocalAllocator`; the
    cluster IPAM (addresses recorded in the event log) implements the same port later."""

    def allocate(self, instance_id: str) -> Lease:
        """The instance's lease: the same one on every call until it is released."""
        ...

    def release(self, instance_id: str) -> None:
        """Free the instance's addresses and tap name (no-op when it holds none)."""
        ...

    def leases(self) -> Mapping[str, Lease]: ...


class HostLocalAllocator:
    """:class:`AddressAllocator` over a :class:`LeaseTable` held in memory. ``on_change``
    is called with the new table after every change (the agent persists it there)."""

    def __init__(
        self,
        table: LeaseTable,
        on_change: Callable[[LeaseTable], None] | None = None,
    ) -> None:
        self.table = table
        self._on_change = on_change

    def allocate(self, instance_id: str) -> Lease:
        table, lease = self.table.allocate(instance_id)
        self._set(table)
        return lease

    def release(self, instance_id: str) -> None:
        self._set(self.table.release(instance_id))

    def leases(self) -> Mapping[str, Lease]:
        return self.table.leases

    def _set(self, table: LeaseTable) -> None:
        if table is not self.table:
            # Persist first: a lease is only handed out once it is on disk.
            if self._on_change is not None:
                self._on_change(table)
            self.table = table
