"""Errors of the host network (addresses, taps, firewall)::

    NetError                  net.error            (kind INTERNAL) the kernel refused
    ├── NetConfigInvalid      net.invalid          (ValidationFailed) a prefix, pool,
    │                                              name or port the host cannot use
    ├── AddressesExhausted    net.exhausted        (Unavailable) the host's prefix or
    │                                              IPv4 pool has no free address left
    ├── NetToolMissing        net.tool_missing     (Unavailable) ``nft`` / ``ip`` is
    │                                              not installed
    ├── TapConflict           net.tap_conflict     (Conflict) the tap's name is held by
    │                                              another link or another instance
    └── FirewallApplyFailed   net.firewall_failed  (kind INTERNAL) ``nft -f -``
                                                   rejected the ruleset

Netlink errors (``pyroute2.NetlinkError``) and failed commands are translated at the
boundary (``raise ... from exc``); callers never see a third-party exception.
"""

from __future__ import annotations

from ember.core.errors import Conflict, EmberError, Kind, Unavailable, ValidationFailed

__all__ = [
    "AddressesExhausted",
    "FirewallApplyFailed",
    "NetConfigInvalid",
    "NetError",
    "NetToolMissing",
    "TapConflict",
]


class NetError(EmberError):
    code = "net.error"
    kind = Kind.INTERNAL


class NetConfigInvalid(NetError, ValidationFailed):
    code = "net.invalid"
    kind = Kind.INVALID


class AddressesExhausted(NetError, Unavailable):
    code = "net.exhausted"
    kind = Kind.UNAVAILABLE


class NetToolMissing(NetError, Unavailable):
    code = "net.tool_missing"
    kind = Kind.UNAVAILABLE


class TapConflict(NetError, Conflict):
    code = "net.tap_conflict"
    kind = Kind.CONFLICT


class FirewallApplyFailed(NetError):
    code = "net.firewall_failed"
    kind = Kind.INTERNAL
