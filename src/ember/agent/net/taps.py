"""Tap devices, host addresses and routes (I/O: netlink through pyroute2).

For every instance (a :class:`~ember.agent.net.addressing.Lease`), :meth:`TapNetwork.create`
makes, idempotently:

- a persistent tap ``em-…`` (owned by ``owner_uid``/``owner_gid`` when given, so an
  unprivileged Firecracker can open it), its alias ``ember:<instance id>`` (how a restarted
  agent knows whose tap it is: :meth:`TapNetwork.list_taps`), up;
- on it, the host's side: ``fe80::1/64`` (the guest's gateway), ``<prefix>::1/128`` (the
  host's source address towards instances) and the ``/31``'s even address;
- the route ``<instance address>/128 dev <tap>`` (IPv4: the ``/31`` is connected);
- IPv4 forwarding on that tap (per interface: the host does not become an IPv4 router on
  its other links; ``uplinks`` get it too), no router advertisements accepted from it;
- with ``ndp_proxy_uplink``, a proxy neighbour entry for the instance's address on the
  uplink (only when the prefix is on-link there rather than routed to the host).

:meth:`TapNetwork.prepare_host` sets what is shared: IPv6 forwarding and ``unreachable``
routes for the whole prefix and pool (traffic to a free address stops at the host
instead of following the default route out).

Every operation runs in network namespace ``netns`` when given (tests; a jailer netns).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from ipaddress import IPv4Network, IPv6Network
from typing import Any

# pyroute2 ships no type information.
from pyroute2 import IPRoute, NetlinkError  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY  # type: ignore[import-untyped]

from ember.agent.net.addressing import (
    GUEST_GATEWAY_V6,
    TAP_PREFIX,
    AddressPlan,
    Lease,
    check_ifname,
)
from ember.agent.net.errors import NetConfigInvalid, NetError, NetToolMissing, TapConflict

__all__ = ["ALIAS_PREFIX", "TapInfo", "TapNetwork"]

ALIAS_PREFIX = "ember:"
_IFF_UP = 0x1
_TUN_TYPE_TAP = 2
_NO_OWNER = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class TapInfo:
    """A tap found on the host."""

    name: str
    index: int
    instance_id: str | None
    """From the alias ``ember:<instance id>``; ``None`` when the alias is missing."""
    owner_uid: int | None
    owner_gid: int | None
    up: bool
    carrier: bool
    """A VMM has the tap open."""


def _nl(what: str, exc: NetlinkError | OSError) -> NetError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    name = errno.errorcode.get(code, str(code)) if isinstance(code, int) else "?"
    return NetError(f"{what}: {exc} ({name})", detail={"errno": code})


class TapNetwork:
    def __init__(
        self,
        *,
        netns: str | None = None,
        forwarding: bool = True,
        uplinks: Sequence[str] = (),
        ndp_proxy_uplink: str | None = None,
    ) -> None:
        """``forwarding``: instances reach each other (same org) and, through ``uplinks``,
        the outside; without it they only talk to the host. ``uplinks``: the links
        instance traffic leaves and comes back through (egress; the overlay later): IPv4
        forwarding is switched on there too, since IPv4 decides per *incoming* link.
        ``ndp_proxy_uplink``: answer neighbour solicitations for instance addresses on
        that link (only when the prefix is on-link there instead of routed to the host)."""
        for name in (*uplinks, *([ndp_proxy_uplink] if ndp_proxy_uplink else [])):
            check_ifname(name)
        self.netns = netns
        self.forwarding = forwarding
        self.uplinks = tuple(uplinks)
        self.ndp_proxy_uplink = ndp_proxy_uplink

    # -- shared host state --------------------------------------------------------------

    def prepare_host(self, plan: AddressPlan) -> None:
        """Forwarding, proxy NDP and the ``unreachable`` routes of the plan (idempotent)."""
        nets: list[IPv6Network | IPv4Network] = [plan.ipv6_prefix]
        if plan.ipv4_pool is not None:
            nets.append(plan.ipv4_pool)
        with self._ipr() as ipr:
            for net in nets:
                self._call(
                    f"unreachable route {net}",
                    ipr.route,
                    "replace",
                    dst=str(net),
                    type="unreachable",
                    family=10 if net.version == 6 else 2,
                )
            for uplink in (*self.uplinks, *filter(None, [self.ndp_proxy_uplink])):
                self._index(ipr, uplink)
        settings: list[tuple[str, str]] = []
        if self.forwarding:
            # IPv6 has no per-interface forwarding switch on Debian 12's kernel. Hosts
            # that take their own address by SLAAC need accept_ra=2 on the uplink.
            settings.append(("net/ipv6/conf/all/forwarding", "1"))
            settings += [(f"net/ipv4/conf/{up}/forwarding", "1") for up in self.uplinks]
        if self.ndp_proxy_uplink is not None:
            settings.append((f"net/ipv6/conf/{self.ndp_proxy_uplink}/proxy_ndp", "1"))
        self._sysctl(settings)

    def unprepare_host(self, plan: AddressPlan) -> None:
        """Remove the plan's ``unreachable`` routes (idempotent). The forwarding and
        proxy-NDP switches stay: other software on the host may rely on them."""
        nets: list[IPv6Network | IPv4Network] = [plan.ipv6_prefix]
        if plan.ipv4_pool is not None:
            nets.append(plan.ipv4_pool)
        with self._ipr() as ipr:
            for net in nets:
                try:
                    ipr.route(
                        "del",
                        dst=str(net),
                        type="unreachable",
                        family=10 if net.version == 6 else 2,
                    )
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENOENT):
                        raise _nl(f"remove unreachable route {net}", exc) from exc

    # -- taps ---------------------------------------------------------------------------

    def create(
        self,
        lease: Lease,
        *,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
        mtu: int | None = None,
    ) -> TapInfo:
        """The instance's tap with its addresses and route; re-running it on an existing
        tap completes whatever is missing."""
        name = self._tap_name(lease.tap)
        alias = ALIAS_PREFIX + lease.instance_id
        with self._ipr() as ipr:
            existing = self._find(ipr, name)
            if existing is None:
                self._call(
                    f"create tap {name}",
                    ipr.link,
                    "add",
                    ifname=name,
                    kind="tuntap",
                    mode="tap",
                    ifr={
                        "no_pi": True,
                        "one_queue": False,
                        "vnet_hdr": False,
                        "multi_queue": False,
                    },
                    **({"uid": owner_uid} if owner_uid is not None else {}),
                    **({"gid": owner_gid} if owner_gid is not None else {}),
                )
            else:
                self._check_ours(existing, lease.instance_id, owner_uid, owner_gid)
            index = self._index(ipr, name)
            link: dict[str, Any] = {"ifalias": alias, "state": "up"}
            if mtu is not None:
                link["mtu"] = mtu
            self._call(f"set up {name}", ipr.link, "set", index=index, **link)
            self._sysctl(self._tap_settings(name, lease))
            addrs = [(str(GUEST_GATEWAY_V6), 64), (str(lease.host_ipv6), 128)]
            host4 = lease.host_ipv4
            if host4 is not None:
                addrs.append((str(host4.ip), 31))
            for address, prefixlen in addrs:
                self._add_address(ipr, index, name, address, prefixlen)
            self._call(
                f"route {lease.ipv6}/128 dev {name}",
                ipr.route,
                "replace",
                dst=f"{lease.ipv6}/128",
                oif=index,
            )
            if self.ndp_proxy_uplink is not None:
                uplink = self._index(ipr, self.ndp_proxy_uplink)
                self._call(
                    f"proxy ndp {lease.ipv6} on {self.ndp_proxy_uplink}",
                    ipr.neigh,
                    "replace",
                    dst=str(lease.ipv6),
                    ifindex=uplink,
                    flags=NTF_PROXY,
                    family=10,
                )
            info = self._find(ipr, name)
        if info is None:
            raise NetError(f"tap {name} vanished while it was being set up")
        return info

    def delete(self, tap: Lease | str) -> bool:
        """Remove the tap (its addresses and routes go with it); ``False`` when it was
        already gone."""
        name = self._tap_name(tap.tap if isinstance(tap, Lease) else tap)
        with self._ipr() as ipr:
            if isinstance(tap, Lease) and self.ndp_proxy_uplink is not None:
                uplink = self._lookup(ipr, self.ndp_proxy_uplink)
                if uplink is not None:
                    try:
                        ipr.neigh(
                            "del", dst=str(tap.ipv6), ifindex=uplink, flags=NTF_PROXY, family=10
                        )
                    except NetlinkError as exc:
                        if exc.code != errno.ENOENT:
                            raise _nl(f"remove proxy ndp {tap.ipv6}", exc) from exc
            info = self._find(ipr, name)
            if info is None:
                return False
            try:
                ipr.link("del", index=info.index)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False
                raise _nl(f"delete tap {name}", exc) from exc
        return True

    def list_taps(self) -> list[TapInfo]:
        """Every ``em-*`` tap, sorted by name (adoption after an agent restart)."""
        with self._ipr() as ipr:
            try:
                links = list(ipr.get_links())
            except NetlinkError as exc:
                raise _nl("list links", exc) from exc
        taps = [t for t in (self._tap_info(m) for m in links) if t is not None]
        return sorted(taps, key=lambda t: t.name)

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _tap_name(name: str) -> str:
        check_ifname(name)
        if not name.startswith(TAP_PREFIX):
            raise NetConfigInvalid(f"{name!r} is not an instance tap ({TAP_PREFIX}*)")
        return name

    @contextmanager
    def _ipr(self) -> Iterator[IPRoute]:
        try:
            ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        except (NetlinkError, OSError) as exc:
            raise _nl(f"netlink (netns {self.netns or 'host'})", exc) from exc
        try:
            yield ipr
        finally:
            ipr.close()

    @staticmethod
    def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (NetlinkError, OSError) as exc:
            raise _nl(what, exc) from exc

    def _lookup(self, ipr: IPRoute, name: str) -> int | None:
        found = self._call(f"look up {name}", ipr.link_lookup, ifname=name)
        return int(found[0]) if found else None

    def _index(self, ipr: IPRoute, name: str) -> int:
        index = self._lookup(ipr, name)
        if index is None:
            raise NetError(f"no link {name} (netns {self.netns or 'host'})")
        return index

    def _find(self, ipr: IPRoute, name: str) -> TapInfo | None:
        index = self._lookup(ipr, name)
        if index is None:
            return None
        try:
            msgs = list(ipr.get_links(index))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise _nl(f"read link {name}", exc) from exc
        info = self._tap_info(msgs[0]) if msgs else None
        if info is None:
            raise TapConflict(
                f"{name} exists but is not a tap",
                hint=f"remove the link ({'ip link del ' + name}) or free the name",
            )
        return info

    @staticmethod
    def _tap_info(msg: Any) -> TapInfo | None:
        name = msg.get_attr("IFLA_IFNAME")
        if not name or not name.startswith(TAP_PREFIX):
            return None
        if msg.get(("linkinfo", "kind")) != "tun":
            return None
        data = msg.get(("linkinfo", "data"))
        if data is None or data.get_attr("IFLA_TUN_TYPE") != _TUN_TYPE_TAP:
            return None
        alias = msg.get_attr("IFLA_IFALIAS") or ""
        uid = data.get_attr("IFLA_TUN_OWNER")
        gid = data.get_attr("IFLA_TUN_GROUP")
        return TapInfo(
            name=name,
            index=int(msg["index"]),
            instance_id=alias[len(ALIAS_PREFIX) :] if alias.startswith(ALIAS_PREFIX) else None,
            owner_uid=None if uid in (None, _NO_OWNER) else int(uid),
            owner_gid=None if gid in (None, _NO_OWNER) else int(gid),
            up=bool(msg["flags"] & _IFF_UP),
            carrier=bool(msg.get_attr("IFLA_CARRIER")),
        )

    @staticmethod
    def _check_ours(
        info: TapInfo, instance_id: str, owner_uid: int | None, owner_gid: int | None
    ) -> None:
        if info.instance_id not in (None, instance_id):
            raise TapConflict(
                f"tap {info.name} belongs to instance {info.instance_id}, not {instance_id}"
            )
        # The owner is fixed at creation; a VMM of another uid could not open the tap.
        if owner_uid is not None and info.owner_uid != owner_uid:
            raise TapConflict(
                f"tap {info.name} is owned by uid {info.owner_uid}, not {owner_uid}",
                hint="delete the tap (the instance's VM must be stopped) and create it again",
            )
        if owner_gid is not None and info.owner_gid != owner_gid:
            raise TapConflict(f"tap {info.name} has group {info.owner_gid}, not {owner_gid}")

    def _add_address(
        self, ipr: IPRoute, index: int, name: str, address: str, prefixlen: int
    ) -> None:
        try:
            # No duplicate address detection: the plan guarantees uniqueness, and DAD
            # would leave the address unusable for a second after every create.
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _nl(f"address {address}/{prefixlen} on {name}", exc) from exc

    def _tap_settings(self, name: str, lease: Lease) -> list[tuple[str, str]]:
        settings = [
            (f"net/ipv6/conf/{name}/accept_ra", "0"),
            (f"net/ipv6/conf/{name}/autoconf", "0"),
        ]
        if self.forwarding and lease.ipv4 is not None:
            settings.append((f"net/ipv4/conf/{name}/forwarding", "1"))
        return settings

    def _sysctl(self, settings: Sequence[tuple[str, str]]) -> None:
        """Write ``/proc/sys`` entries of the namespace (a child in ``netns`` when set:
        ``/proc/sys/net`` shows the namespace of the process that opens it)."""
        if not settings:
            return
        if self.netns is None:
            for key, value in settings:
                try:
                    with open(os.path.join("/proc/sys", key), "w") as f:
                        f.write(value)
                except OSError as exc:
                    raise NetError(f"sysctl {key}={value}: {exc}") from exc
            return
        script = 'while [ $# -gt 0 ]; do printf %s "$2" > "/proc/sys/$1" || exit 1; shift 2; done'
        argv = ["ip", "netns", "exec", self.netns, "sh", "-c", script, "sh"]
        for key, value in settings:
            argv += [key, value]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError as exc:
            raise NetToolMissing("ip (iproute2) is not installed") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise NetError(f"sysctl in netns {self.netns}: {exc}") from exc
        if proc.returncode != 0:
            raise NetError(f"sysctl in netns {self.netns}: {proc.stderr.strip()}")
