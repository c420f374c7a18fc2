"""The host network of instances: addresses, taps, routes and isolation.

- ``addressing`` (pure): the host's :class:`AddressPlan` (IPv6 prefix, optional IPv4
  pool), tap names, :class:`Lease` and the immutable :class:`LeaseTable`; the
  :class:`AddressAllocator` port and its :class:`HostLocalAllocator` (the cluster IPAM of
  the overlay work replaces it later);
- ``store``: :class:`LeaseStore`, the lease table as a JSON file in the agent's data dir;
- ``taps`` (I/O): :class:`TapNetwork` creates / deletes / lists the taps, host addresses,
  routes and the few sysctls involved;
- ``firewall``: :func:`render_ruleset` (pure) renders table ``inet ember`` from the
  instances (tap → org); :class:`Firewall` applies it atomically with ``nft -f -``;
- ``errors``: the ``net.*`` error tree.

docs/specs/host-network.md is the contract. The order per instance is: allocate → create
the tap → apply the ruleset (a tap the table does not know can send nothing) → boot.
"""

from ember.agent.net.addressing import (
    DEFAULT_IPV4_POOL,
    GUEST_GATEWAY_V6,
    IFNAME_MAX,
    TAP_PREFIX,
    AddressAllocator,
    AddressPlan,
    HostLocalAllocator,
    Lease,
    LeaseTable,
    check_ifname,
    default_ipv6_prefix,
    guest_mac,
    pick_ipv4,
    pick_ipv6,
    tap_name,
)
from ember.agent.net.errors import (
    AddressesExhausted,
    FirewallApplyFailed,
    NetConfigInvalid,
    NetError,
    NetToolMissing,
    TapConflict,
)
from ember.agent.net.firewall import Endpoint, Firewall, FirewallPolicy, render_ruleset
from ember.agent.net.store import LeaseStore
from ember.agent.net.taps import ALIAS_PREFIX, TapInfo, TapNetwork

__all__ = [
    "ALIAS_PREFIX",
    "DEFAULT_IPV4_POOL",
    "GUEST_GATEWAY_V6",
    "IFNAME_MAX",
    "TAP_PREFIX",
    "AddressAllocator",
    "AddressPlan",
    "AddressesExhausted",
    "Endpoint",
    "Firewall",
    "FirewallApplyFailed",
    "FirewallPolicy",
    "HostLocalAllocator",
    "Lease",
    "LeaseStore",
    "LeaseTable",
    "NetConfigInvalid",
    "NetError",
    "NetToolMissing",
    "TapConflict",
    "TapInfo",
    "TapNetwork",
    "check_ifname",
    "default_ipv6_prefix",
    "guest_mac",
    "pick_ipv4",
    "pick_ipv6",
    "render_ruleset",
    "tap_name",
]
