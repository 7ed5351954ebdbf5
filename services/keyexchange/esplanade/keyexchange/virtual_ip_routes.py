"""Remote-access client side: the virtual IP a responder assigned (CP, RFC 7296 §3.15) goes
on the dataplane's TUN, and only the split-tunnel subnets it announced are routed into it,
with the virtual IP as preferred source. Everything else keeps the host's own routes.

Uses the dataplane's netconfig (`LinkConfigurator`, pyroute2) in this namespace, on one
worker thread (pyroute2's synchronous API runs its own event loop, and the order of adds and
removes must hold); removed again when the IKE SA goes. Addresses only ever go on the TUN.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from esplanade.keyexchange.ikev2.events import Event, IkeSaDeleted, IkeSaEstablished

if TYPE_CHECKING:  # pyroute2 and netconfig load when a virtual IP first needs them (slow imports)
    from esplanade.dataplane.userspace.netconfig import LinkConfigurator

log = logging.getLogger(__name__)


def link_configurator() -> LinkConfigurator:
    from esplanade.dataplane.userspace.netconfig import LinkConfigurator

    return LinkConfigurator()


@dataclass
class _Applied:
    addresses: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)


class VirtualIpRoutes:
    def __init__(self, tun: str, configurator: Callable[[], LinkConfigurator] = link_configurator) -> None:
        self.tun = tun
        self.configurator = configurator
        self.applied: dict[str, _Applied] = {}  # IKE SA id -> what we configured for it
        self.errors = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="virtual-ip")
        self.last: Future[None] | None = None
        self._with_vips: set[str] = set()  # IKE SAs with a virtual IP (the event loop's view)

    def handle(self, ev: Event) -> None:
        if isinstance(ev, IkeSaEstablished) and ev.initiator and ev.virtual_ips:
            self._with_vips.add(ev.ike_sa)
            self.last = self._worker.submit(self._apply, ev)
        elif isinstance(ev, IkeSaEstablished) and ev.rekey_of in self._with_vips:
            self._with_vips.add(ev.ike_sa)
            self.last = self._worker.submit(self._moved, ev.rekey_of, ev.ike_sa)
        elif isinstance(ev, IkeSaDeleted) and ev.ike_sa in self._with_vips:
            self._with_vips.discard(ev.ike_sa)
            self.last = self._worker.submit(self._remove, ev.ike_sa)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def _moved(self, old: str, new: str) -> None:
        if old in self.applied:  # IKE rekey: the same addresses carry on
            self.applied[new] = self.applied.pop(old)

    def _apply(self, ev: IkeSaEstablished) -> None:
        from esplanade.dataplane.userspace.netconfig import NetConfigError

        done = _Applied()
        try:
            with self.configurator() as cfg:
                for vip in ev.virtual_ips:
                    ip = ipaddress.ip_address(vip)
                    cfg.add_address(self.tun, f"{ip}/{ip.max_prefixlen}")
                    done.addresses.append(str(ip))
                for subnet in ev.split_subnets:
                    net = ipaddress.ip_network(subnet, strict=False)
                    source = next((a for a in done.addresses if ipaddress.ip_address(a).version == net.version), "")
                    cfg.replace_route(str(net), self.tun, source=source)
                    done.routes.append(str(net))
        except (NetConfigError, ValueError) as exc:
            self.errors += 1
            log.warning("cannot configure the virtual IP of %s on %s: %s", ev.ike_sa, self.tun, exc)
        self.applied[ev.ike_sa] = done
        log.info(
            "virtual IP %s on %s, split routes %s", ",".join(done.addresses), self.tun, ",".join(done.routes) or "none"
        )

    def _remove(self, ike: str) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        from esplanade.dataplane.userspace.netconfig import NetConfigError

        done = self.applied.pop(ike, None)
        if done is None:
            return
        if any(done.addresses == other.addresses for other in self.applied.values()):
            return  # a reauthenticated IKE SA got the same address and still uses it
        try:
            with self.configurator() as cfg:
                for net in done.routes:
                    cfg.delete_route(net, self.tun)
            with IPRoute() as ipr:
                index = ipr.link_lookup(ifname=self.tun)
                for addr in done.addresses:
                    ip = ipaddress.ip_address(addr)
                    if index:
                        ipr.addr("del", index=index[0], address=addr, prefixlen=ip.max_prefixlen)
        except (NetConfigError, NetlinkError) as exc:
            self.errors += 1
            log.warning("cannot remove the virtual IP of %s from %s: %s", ike, self.tun, exc)
