"""Routes that send protected (and to-be-discarded) traffic into the TUN, from the SPD.

An outbound PROTECT or DISCARD policy routes its remote networks into the TUN: the datapath
then encrypts or drops them, so nothing a policy covers leaves in clear. BYPASS ranges are
left to the host's own routes. Several policies may name one network: the route goes when
the last of them does.

Per route:
- the preferred source (as strongSwan's install_routes): a local address inside the
  policy's local selector, so the host's own traffic toward the remote site matches the SPD;
- the MTU of the Child SA the policy names: the largest inner packet whose ESP packet with
  that SA's transforms fits the outer path MTU (never above the TUN's own MTU); while that
  Child SA is not installed (not yet, or deleted) the route keeps the MTU it has (none on a
  new route);
- a pinned host route to the tunnel endpoint when the remote network contains it (a "protect
  everything" policy), so ESP and IKE to the peer do not loop back into the TUN.

All netlink work goes through `netconfig.LinkConfigurator` (pyroute2), never `ip`. One
configurator (one netlink socket) is opened at the first change that needs the kernel and kept
until `close()`; a change that leaves every route as it is (a policy joining a network that is
routed already, a re-pointed policy whose Child SA has the same MTU) sends no netlink message.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from esplanade.dataplane.userspace.mtu import esp_overhead, inner_mtu
from esplanade.dataplane.userspace.netconfig import LinkConfigurator, NetConfigError
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class _Route:
    network: Network
    policies: set[str] = field(default_factory=set)
    source: str = ""
    mtu: int = 0


def routed(policy: SpdPolicy) -> bool:
    """Does this policy route its remote networks into the TUN?"""
    return policy.direction == PolicyDirection.OUT and policy.action in (PolicyAction.PROTECT, PolicyAction.DISCARD)


class TunnelRoutes:
    def __init__(
        self,
        tun: str,
        tun_mtu: int,
        path_mtu: int,
        configurator: Callable[[], LinkConfigurator] = LinkConfigurator,
    ) -> None:
        self.tun = tun
        self.tun_mtu = tun_mtu
        self.path_mtu = path_mtu
        self._configurator = configurator
        self._routes: dict[Network, _Route] = {}
        self._pins: dict[str, set[Network]] = {}  # endpoint -> routes that cover it
        self._links: LinkConfigurator | None = None
        self._stack = contextlib.ExitStack()
        self.netlink_opens = 0  # configurators opened (one, unless a netlink error reset it)

    def _open(self) -> LinkConfigurator:
        if self._links is None:
            self._links = self._stack.enter_context(self._configurator())
            self.netlink_opens += 1
        return self._links

    def _reset(self) -> None:
        """After a netlink error: the next change opens a fresh socket (and looks the TUN up again)."""
        self.close()

    def close(self) -> None:
        self._links = None
        self._stack.close()
        self._stack = contextlib.ExitStack()

    def routes(self) -> list[dict[str, object]]:
        return [
            {"network": str(r.network), "source": r.source, "mtu": r.mtu, "policies": sorted(r.policies)}
            for r in self._routes.values()
        ]

    # -- sizes --------------------------------------------------------------------------
    def mtu_for(self, record: ChildSaRecord | None) -> int:
        if record is None:
            return 0
        sa = record.outbound
        if sa.encr is None:
            return 0
        outer_v6 = ipaddress.ip_address(sa.dst).version == 6
        try:
            mtu = inner_mtu(self.path_mtu, esp_overhead(sa.encr, sa.integ, sa.encap is not None, outer_v6))
        except ValueError:
            return 0
        return min(mtu, self.tun_mtu)

    # -- policies -----------------------------------------------------------------------
    def add_policy(self, policy: SpdPolicy, child: ChildSaRecord | None, endpoints: set[str]) -> None:
        """Route the policy's remote networks into the TUN. All or nothing (NetConfigError)."""
        if not routed(policy):
            return
        networks = policy.remote_ts.networks()
        if all(network in self._routes for network in networks):
            for network in networks:  # routed already for other policies: no netlink work
                self._routes[network].policies.add(policy.id)
            return
        added: list[Network] = []
        try:
            links = self._open()
            source = self._source_in(links, policy)
            mtu = self.mtu_for(child)
            for network in networks:
                route = self._routes.get(network)
                if route is None:
                    for endpoint in sorted(endpoints | ({policy.tunnel_dst} if policy.tunnel_dst else set())):
                        if ipaddress.ip_address(endpoint) in network:
                            self._pin(links, endpoint, network)
                    links.replace_route(str(network), self.tun, source=source, mtu=mtu)
                    self._routes[network] = _Route(network, {policy.id}, source, mtu)
                    added.append(network)
                else:
                    route.policies.add(policy.id)
        except (NetConfigError, ValueError):
            self._reset()
            with contextlib.suppress(NetConfigError, ValueError):
                links = self._open()
                for network in added:
                    self._drop(links, network, policy.id)
            for route in self._routes.values():
                route.policies.discard(policy.id)
            raise

    def replace_policy(
        self, previous: SpdPolicy, policy: SpdPolicy, child: ChildSaRecord | None, endpoints: set[str]
    ) -> None:
        """An installed policy changed (a rekey re-points `child_sa`). Its routes stay in place
        when it routes the same networks: deleting and re-adding them would leave a gap in
        which the host's packets (and its own ICMP replies) have no route at all."""
        same = routed(previous) and routed(policy) and previous.remote_ts == policy.remote_ts
        if same and all(network in self._routes for network in policy.remote_ts.networks()):
            self.update_child([policy], child)
            return
        self.remove_policy(previous)
        self.add_policy(policy, child, endpoints)

    def remove_policy(self, policy: SpdPolicy) -> None:
        if not routed(policy):
            return
        for network in list(self._routes):
            route = self._routes[network]
            if policy.id not in route.policies:
                continue
            if len(route.policies) > 1:  # other policies keep the route: no netlink work
                route.policies.discard(policy.id)
                continue
            self._drop(self._open(), network, policy.id)

    def update_child(self, policies: list[SpdPolicy], child: ChildSaRecord | None) -> None:
        """The Child SA these policies name changed: set their routes' MTU to its transforms.

        `child` None (the Child SA they name is not installed: not yet, or just deleted): the
        routes keep the MTU they have. With nothing to send the traffic with, no MTU is right,
        and the next Child SA (a rekey, a new setup) almost always has the same transforms;
        dropping to the TUN's MTU and back cost two route replaces per setup for nothing."""
        if child is None:
            return
        mtu = self.mtu_for(child)
        for policy in policies:
            if not routed(policy):
                continue
            for network in policy.remote_ts.networks():
                route = self._routes.get(network)
                if route is None or route.mtu == mtu:
                    continue
                try:
                    self._open().replace_route(str(network), self.tun, source=route.source, mtu=mtu)
                    route.mtu = mtu
                except NetConfigError as exc:  # the old MTU stays: too large, never wrong direction
                    self._reset()
                    log.warning("route MTU of %s not updated: %s", network, exc)

    # -- internals ----------------------------------------------------------------------
    def _drop(self, links: LinkConfigurator, network: Network, policy_id: str) -> None:
        route = self._routes.get(network)
        if route is None or policy_id not in route.policies:
            return
        route.policies.discard(policy_id)
        if route.policies:
            return
        del self._routes[network]
        try:
            links.delete_route(str(network), self.tun)
        except NetConfigError as exc:
            log.warning("route %s not removed: %s", network, exc)
        for endpoint, covering in list(self._pins.items()):
            covering.discard(network)
            if not covering:
                del self._pins[endpoint]
                try:
                    links.delete_host_route(endpoint)
                except NetConfigError as exc:
                    log.warning("pinned route to %s not removed: %s", endpoint, exc)

    def _pin(self, links: LinkConfigurator, endpoint: str, network: Network) -> None:
        if endpoint not in self._pins:
            links.pin_host_route(endpoint)
            self._pins[endpoint] = set()
        self._pins[endpoint].add(network)

    @staticmethod
    def _source_in(links: LinkConfigurator, policy: SpdPolicy) -> str:
        """A local address inside the policy's local selector ("" if there is none)."""
        local = policy.local_ts
        lo, hi = int(local.start_addr), int(local.end_addr)
        for address in links.local_addresses(local.version):
            if lo <= int(ipaddress.ip_address(address)) <= hi:
                return address
        return ""
