"""Dedicated IPv4 addresses: a paid add-on an org allocates from the platform's pool
(ADR 0007), so its routes can bind an address of their own (raw TCP on well-known ports,
TLS for clients without SNI).

One stream per address of the pool, ``ipv4-<address>``: keying the stream by the address
makes "an address belongs to one org at a time" an optimistic-concurrency check, as
tenancy does for names. It is also the address's record:

=================  =====================================================================
event              meaning
=================  =====================================================================
ipv4.allocated     ``{ip_id, address, org_id}``: the org holds the address from now on
                   (billing: ``dedicated_ipv4``, from ``recorded_at``)
ipv4.bound         ``{ip_id, address, route_id}``: a route binds the address
ipv4.unbound       ``{ip_id, address, route_id}``: that route was deleted
ipv4.released      ``{ip_id, address, org_id}``: back to the pool (only with no route bound)
=================  =====================================================================

Routes bind and unbind in the same append as their own ``route.created`` /
``route.deleted`` (ember.core.routes), so a release racing a route creation conflicts
instead of leaving a route on an address its org no longer holds. A released address gets
a new ``ip_id`` when it is allocated again.

Errors::

    NotFound  └── IpNotFound        ipv4.not_found      not the org's (or not allocated)
    Conflict  ├── IpInUse           ipv4.in_use         routes still bind it
              ├── PoolExhausted     ipv4.pool_exhausted every address is allocated
              └── AddressTaken      ipv4.taken          (internal: try the next address)
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Iterator

from ember.core.errors import Conflict, NotFound, ValidationFailed
from ember.core.events import EventData, EventRegistry, RecordedEvent

REGISTRY = EventRegistry()
BILLING = "dedicated_ipv4"
"""How a dedicated address appears on an invoice (shown with every address)."""
DEFAULT_POOL = "127.10.0.0/24"
"""Loopback, so development machines and tests bind their "dedicated" addresses locally."""


class IpNotFound(NotFound):
    code = "ipv4.not_found"


class IpInUse(Conflict):
    code = "ipv4.in_use"
    holders: tuple[str, ...] = ()
    """The routes bound to the address (for the service; never sent)."""


class PoolExhausted(Conflict):
    code = "ipv4.pool_exhausted"


class AddressTaken(Conflict):
    """The address was allocated meanwhile; the caller tries the next one."""

    code = "ipv4.taken"


@REGISTRY.register
class Ipv4Allocated(EventData):
    event_type = "ipv4.allocated"
    ip_id: str
    address: str
    org_id: str


@REGISTRY.register
class Ipv4Bound(EventData):
    event_type = "ipv4.bound"
    ip_id: str
    address: str
    route_id: str


@REGISTRY.register
class Ipv4Unbound(EventData):
    event_type = "ipv4.unbound"
    ip_id: str
    address: str
    route_id: str


@REGISTRY.register
class Ipv4Released(EventData):
    event_type = "ipv4.released"
    ip_id: str
    address: str
    org_id: str


def ipv4_stream(address: str) -> str:
    return f"ipv4-{address}"


# -- the pool ------------------------------------------------------------------------------


def parse_pool(text: str, field: str = "EMBER_EDGE_IPV4_POOL") -> tuple[ipaddress.IPv4Network, ...]:
    """``"203.0.113.0/28, 198.51.100.7"`` -> the networks, merged and in order."""
    networks: list[ipaddress.IPv4Network] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.IPv4Network(part, strict=False))
        except ValueError:
            raise ValidationFailed(
                f"{field}: {part!r} is not an IPv4 network or address",
                hint="e.g. 203.0.113.0/28 or 203.0.113.0/28,198.51.100.7 (comma-separated)",
                detail={"field": field},
            ) from None
    if not networks:
        raise ValidationFailed(
            f"{field} is empty", hint="e.g. 203.0.113.0/28", detail={"field": field}
        )
    return tuple(ipaddress.collapse_addresses(networks))


def pool_addresses(pool: Iterable[ipaddress.IPv4Network]) -> Iterator[str]:
    """Every allocatable address of the pool, lowest first (a network's own and broadcast
    addresses are left out, except in a /31 or /32)."""
    for network in pool:
        for address in network.hosts():
            yield str(address)


def check_address(text: str) -> str | None:
    """``text`` as a normalised IPv4 address, or None when it is not one."""
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        return None


# -- one address -----------------------------------------------------------------------------


@dataclasses.dataclass
class AddressState:
    """An address's stream folded: who holds it, and the routes that bind it."""

    address: str | None = None
    ip_id: str | None = None
    org_id: str | None = None
    routes: set[str] = dataclasses.field(default_factory=set)

    @property
    def allocated(self) -> bool:
        return self.ip_id is not None


def fold_address(events: Iterable[RecordedEvent]) -> AddressState:
    state = AddressState()
    for e in events:
        d = e.data
        if e.type == "ipv4.allocated":
            state = AddressState(d["address"], d["ip_id"], d["org_id"], set())
        elif e.type == "ipv4.released":
            state = AddressState(d["address"])
        elif e.type == "ipv4.bound" and d["ip_id"] == state.ip_id:
            state.routes.add(d["route_id"])
        elif e.type == "ipv4.unbound":
            state.routes.discard(d["route_id"])
    return state


def not_found(address: str, field: str = "address") -> IpNotFound:
    return IpNotFound(
        f"no dedicated address {address} in this org",
        hint="'ember ips list' shows the org's addresses; 'ember ips allocate-v4' adds one",
        detail={"field": field, "address": address},
    )


def decide_allocate(
    state: AddressState, *, address: str, org_id: str, ip_id: str
) -> list[EventData]:
    """Allocate a free address; AddressTaken when someone holds it (whoever it is)."""
    if state.allocated:
        raise AddressTaken(f"{address} is already allocated", detail={"address": address})
    return [Ipv4Allocated(ip_id=ip_id, address=address, org_id=org_id)]


def decide_release(state: AddressState, *, address: str, org_id: str) -> list[EventData]:
    """Release the org's address; another org's address is not found, like a free one."""
    if state.ip_id is None or state.org_id != org_id:
        raise not_found(address)
    if state.routes:
        n = len(state.routes)
        in_use = IpInUse(
            f"{address} is still used by {n} route{'s' if n != 1 else ''}",
            hint="delete the routes bound to it first ('ember routes list' in each app)",
            detail={"address": address, "routes": n},
        )
        in_use.holders = tuple(sorted(state.routes))
        raise in_use
    return [Ipv4Released(ip_id=state.ip_id, address=address, org_id=org_id)]


def decide_bind(
    state: AddressState, *, address: str, org_id: str, ip_id: str, route_id: str
) -> list[EventData]:
    """A route of ``org_id`` binds the address it holds as ``ip_id``."""
    if state.ip_id != ip_id or state.org_id != org_id:
        raise not_found(address, field="ip")
    return [Ipv4Bound(ip_id=ip_id, address=address, route_id=route_id)]


def decide_unbind(state: AddressState, *, route_id: str) -> list[EventData]:
    if state.ip_id is None or state.address is None or route_id not in state.routes:
        return []
    return [Ipv4Unbound(ip_id=state.ip_id, address=state.address, route_id=route_id)]
