"""Traffic steering for scale-out: the owner of a tunnel holds its addresses.

Each Child SA's local tunnel address (`inbound.dst`) is a virtual address that only its owner
node holds (the rendezvous affinity key, so every SA behind one address lives on one node).
Optionally, inner gateway addresses (the next hop the protected LAN uses toward the remote
networks of that tunnel) move with it (`dataplane.steering.inner`). When ownership moves:

* the old owner first stops carrying the SAs, then removes the addresses (and the source
  routes below), and only then deletes its owner record;
* the new owner claims the record, installs the SAs, adds the addresses and announces them
  (gratuitous ARP / unsolicited NA, sent twice), so neighbours switch within milliseconds.

Outbound ESP leaves from the tunnel address: the sockets are bound to the wildcard address,
so the owner adds a host route to each peer endpoint with that address as preferred source
(proto `STEERING_PROTO`). One peer endpoint served from two tunnel addresses on one node
would need a per-packet source, which the datapath does not set: the first one wins and the
conflict is counted (`source_conflicts`).

This is keepalived / strongSwan ClusterIP style steering for nodes that share an L2 segment
(bare metal, a hostNetwork DaemonSet); `docs/scale-out.md` says why, and what a LoadBalancer
Service in front of the pods would need instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from esplanade.dataplane.address_announcement import announce
from esplanade.ipsec.sa import ChildSaRecord

log = logging.getLogger(__name__)

STEERING_PROTO = 189  # rtnetlink protocol of the source routes we add (188: pinned endpoint routes)
ADDRESS_LABEL_SUFFIX = ":t"  # IPv4 label of our tunnel addresses ("ul0:t"), to sweep leftovers
IFA_F_NODAD = 0x02


@dataclass(frozen=True)
class SteeringSettings:
    interface: str  # outer interface that holds the tunnel addresses
    inner: dict[str, list[str]] = field(default_factory=dict)  # tunnel address -> ["lan0=10.9.0.1/24"]
    announcements: int = 2
    announce_interval: float = 0.05


def _split_inner(spec: str) -> tuple[str, str]:
    interface, _, cidr = spec.partition("=")
    if not interface or not cidr:
        raise ValueError(f"inner steering address {spec!r} is not INTERFACE=ADDRESS/PREFIX")
    ipaddress.ip_interface(cidr)
    return interface, cidr


class TunnelSteering:
    """Holds exactly the addresses of the tunnels this node owns (`apply` after every change)."""

    def __init__(self, settings: SteeringSettings, netlink: Any, sender: Callable[[str, bytes, str], None] = announce):
        self.settings = settings
        self.ipr = netlink  # pyroute2 IPRoute-like (the service passes netconfig's thread wrapper)
        self.send = sender
        self.addresses: dict[tuple[str, str], str] = {}  # (interface, cidr) -> tunnel address it serves
        self.routes: dict[str, str] = {}  # peer endpoint -> source address
        self.counters: dict[str, int] = {"addresses_added": 0, "addresses_removed": 0, "announcements": 0}
        self.counters.update(source_conflicts=0, errors=0)
        self._lock = threading.Lock()
        for addresses in settings.inner.values():
            for spec in addresses:
                _split_inner(spec)

    # -- what we want ---------------------------------------------------------------------
    def wanted(self, owned: list[ChildSaRecord]) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
        addresses: dict[tuple[str, str], str] = {}
        routes: dict[str, str] = {}
        for record in sorted(owned, key=lambda r: r.id):
            local, peer = record.inbound.dst, record.outbound.dst
            host = ipaddress.ip_address(local)
            addresses[(self.settings.interface, f"{host}/{host.max_prefixlen}")] = local
            for spec in self.settings.inner.get(local, []):
                addresses[_split_inner(spec)] = local
            if peer in routes and routes[peer] != local:
                self.counters["source_conflicts"] += 1
                continue
            routes[peer] = local
        return addresses, routes

    # -- applying -------------------------------------------------------------------------
    def apply(self, owned: list[ChildSaRecord]) -> None:
        with self._lock:
            addresses, routes = self.wanted(owned)
            for peer in [p for p, s in self.routes.items() if routes.get(p) != s]:
                self._delete_route(peer)
            for key in [k for k in self.addresses if k not in addresses]:
                self._delete_address(*key)
            added: list[tuple[str, str]] = []
            for key, local in addresses.items():
                if key not in self.addresses and self._add_address(*key):
                    self.addresses[key] = local
                    added.append(key)
            for peer, source in routes.items():
                if self.routes.get(peer) != source and self._replace_route(peer, source):
                    self.routes[peer] = source
            if added:
                self._announce(added)

    def _index(self, interface: str) -> int:
        found = self.ipr.link_lookup(ifname=interface)
        if not found:
            raise ValueError(f"no interface {interface}")
        return int(found[0])

    def _add_address(self, interface: str, cidr: str) -> bool:
        iface = ipaddress.ip_interface(cidr)
        spec: dict[str, Any] = {
            "index": self._index(interface),
            "address": str(iface.ip),
            "prefixlen": iface.network.prefixlen,
        }
        if iface.version == 4:
            spec["label"] = interface + ADDRESS_LABEL_SUFFIX
        else:
            spec["flags"] = IFA_F_NODAD
        try:
            self.ipr.addr("replace", **spec)
        except Exception as exc:
            self.counters["errors"] += 1
            log.error("tunnel address %s on %s not added: %s", cidr, interface, exc)
            return False
        self.counters["addresses_added"] += 1
        return True

    def _delete_address(self, interface: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        try:
            self.ipr.addr("del", index=self._index(interface), address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except Exception as exc:
            if getattr(exc, "code", 0) not in (99, 19):  # EADDRNOTAVAIL, ENODEV: gone already
                self.counters["errors"] += 1
                log.error("tunnel address %s on %s not removed: %s", cidr, interface, exc)
        self.addresses.pop((interface, cidr), None)
        self.counters["addresses_removed"] += 1

    def _replace_route(self, peer: str, source: str) -> bool:
        host = ipaddress.ip_address(peer)
        try:
            found = self.ipr.route("get", dst=peer)
            spec: dict[str, Any] = {
                "dst": f"{host}/{host.max_prefixlen}",
                "oif": found[0].get("RTA_OIF") if found else self._index(self.settings.interface),
                "prefsrc": source,
                "proto": STEERING_PROTO,
            }
            gateway = found[0].get("RTA_GATEWAY") if found else None
            if gateway:
                spec["gateway"] = gateway
            self.ipr.route("replace", **spec)
        except Exception as exc:
            self.counters["errors"] += 1
            log.error("source route to %s from %s not added: %s", peer, source, exc)
            return False
        return True

    def _delete_route(self, peer: str) -> None:
        host = ipaddress.ip_address(peer)
        try:
            self.ipr.route("del", dst=f"{host}/{host.max_prefixlen}", proto=STEERING_PROTO)
        except Exception as exc:
            if getattr(exc, "code", 0) != 3:
                log.warning("source route to %s not removed: %s", peer, exc)
        self.routes.pop(peer, None)

    def _mac(self, interface: str) -> bytes:
        links = self.ipr.get_links(self._index(interface))
        text = links[0].get("IFLA_ADDRESS") or links[0].get_attr("IFLA_ADDRESS")
        return bytes.fromhex(str(text).replace(":", ""))

    def _announce(self, added: list[tuple[str, str]], rounds: int | None = None) -> None:
        rounds = self.settings.announcements if rounds is None else rounds
        if rounds <= 0:
            return
        for interface, cidr in added:
            if (interface, cidr) not in self.addresses:
                continue  # moved away again meanwhile
            try:
                self.send(interface, self._mac(interface), str(ipaddress.ip_interface(cidr).ip))
                self.counters["announcements"] += 1
            except OSError as exc:
                self.counters["errors"] += 1
                log.warning("announcement of %s on %s failed: %s", cidr, interface, exc)
        if rounds > 1:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.call_later(self.settings.announce_interval, self._announce, added, rounds - 1)

    # -- start and stop -------------------------------------------------------------------
    def sweep(self) -> None:
        """Remove what a killed predecessor left: our labelled addresses, the configured inner
        addresses, our source routes."""
        with self._lock:
            interfaces = {self.settings.interface} | {
                _split_inner(s)[0] for specs in self.settings.inner.values() for s in specs
            }
            inner = {_split_inner(s)[1] for specs in self.settings.inner.values() for s in specs}
            for interface in interfaces:
                try:
                    index = self._index(interface)
                except ValueError:
                    continue
                for entry in self.ipr.get_addr(index=index):
                    address = entry.get("IFA_ADDRESS") or entry.get_attr("IFA_ADDRESS")
                    label = entry.get("IFA_LABEL") or entry.get_attr("IFA_LABEL") or ""
                    prefixlen = entry["prefixlen"]
                    cidr = f"{address}/{prefixlen}"
                    if str(label).endswith(ADDRESS_LABEL_SUFFIX) or cidr in inner:
                        self._delete_address(interface, cidr)
            for route in self.ipr.get_routes(proto=STEERING_PROTO):
                dst = route.get("RTA_DST") or route.get_attr("RTA_DST")
                if dst:
                    self._delete_route(str(dst))
            self.addresses.clear()
            self.routes.clear()

    def status(self) -> dict[str, str]:
        out = {f"steering_{k}": str(v) for k, v in self.counters.items()}
        out["steering_addresses"] = ",".join(sorted(c for _, c in self.addresses))
        return out
