"""Links, addresses and routes for the userspace datapath, over netlink (pyroute2), never `ip`.

`LinkConfigurator` works in the current network namespace (`IPRoute`) or in a named one
(`NetNS`). Everything is idempotent (`replace` semantics) so a restart re-applies cleanly.
The TUN's addresses and routes vanish with the device when the last queue closes, so a
start-up that fails half-way leaves nothing behind once the process exits.
"""

from __future__ import annotations

import asyncio
import ipaddress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

PIN_PROTO = 188  # rtnetlink protocol marking the host routes we pin to tunnel endpoints


class NetConfigError(RuntimeError):
    """A netlink request the kernel refused; the message names the object, never secrets."""


@dataclass(frozen=True, slots=True)
class TunLinkConfig:
    """How the TUN device should look: MTU, queue length, addresses, routes for protected networks."""

    name: str
    mtu: int
    txqlen: int = 1000
    addresses: tuple[str, ...] = ()  # "10.0.0.1/32", "fd00::1/128"
    routes: tuple[str, ...] = ()  # remote protected networks, routed into the TUN
    route_source_v4: str = ""  # preferred source for locally generated traffic into the tunnel
    route_source_v6: str = ""
    route_table: int = 254  # main
    route_metric: int = 0


class _NetlinkThread:
    """pyroute2's sync API runs its own asyncio loop and refuses to work where one is already
    running (the dataplane service). There, every call runs on one private thread, which
    `close()` joins, so no thread outlives the configurator (workers are forked later)."""

    def __init__(self, netns: str | None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        try:
            self._ipr = self._executor.submit(lambda: NetNS(netns) if netns else IPRoute()).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._ipr, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                result = method(*args, **kwargs)
                if result is None or isinstance(result, list | tuple | int | str):
                    return result
                return list(result)  # materialize generators on the netlink thread

            return self._executor.submit(run).result()

        return call

    def close(self) -> None:
        try:
            self._executor.submit(self._ipr.close).result()
        finally:
            self._executor.shutdown(wait=True)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class LinkConfigurator:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        # name -> ifindex, looked up once per configurator (a link dump each time otherwise);
        # a long-lived configurator is dropped after any netlink error, and its cache with it
        self._indexes: dict[str, int] = {}
        if _loop_running():
            self._ipr: Any = _NetlinkThread(netns)
        else:
            self._ipr = NetNS(netns) if netns else IPRoute()

    def __enter__(self) -> LinkConfigurator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._ipr.close()

    def _where(self) -> str:
        return f" in netns {self.netns}" if self.netns else ""

    def index_of(self, name: str) -> int:
        index = self._indexes.get(name)
        if index is not None:
            return index
        found = self._ipr.link_lookup(ifname=name)
        if not found:
            raise NetConfigError(f"no interface {name}{self._where()}")
        self._indexes[name] = int(found[0])
        return int(found[0])

    def _request(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except NetlinkError as exc:
            raise NetConfigError(f"{what}{self._where()}: {exc.args[-1] if exc.args else exc}") from None

    def set_link(self, name: str, *, mtu: int | None = None, txqlen: int | None = None, up: bool = True) -> None:
        index = self.index_of(name)
        attrs: dict[str, Any] = {}
        if mtu is not None:
            attrs["mtu"] = mtu
        if txqlen is not None:
            attrs["txqlen"] = txqlen
        if attrs:
            self._request(f"set {name} {attrs}", self._ipr.link, "set", index=index, **attrs)
        self._request(
            f"set {name} {'up' if up else 'down'}", self._ipr.link, "set", index=index, state="up" if up else "down"
        )

    def add_address(self, name: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        index = self.index_of(name)
        self._request(
            f"add address {cidr} to {name}",
            self._ipr.addr,
            "replace",
            index=index,
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
        )

    def replace_route(
        self, network: str, name: str, *, source: str = "", table: int = 254, metric: int = 0, mtu: int = 0
    ) -> None:
        net = ipaddress.ip_network(network, strict=False)
        spec: dict[str, Any] = {"dst": str(net), "oif": self.index_of(name), "table": table}
        if metric:
            spec["priority"] = metric
        if source:
            spec["prefsrc"] = source
        if mtu:
            spec["metrics"] = {"mtu": mtu}
        self._request(f"route {net} via {name}", self._ipr.route, "replace", **spec)

    def delete_route(self, network: str, name: str, *, table: int = 254) -> None:
        net = ipaddress.ip_network(network, strict=False)
        try:
            self._ipr.route("del", dst=str(net), oif=self.index_of(name), table=table)
        except NetlinkError as exc:
            if exc.code != 3:  # ESRCH: already gone
                raise NetConfigError(f"delete route {net}{self._where()}: {exc}") from None

    def local_addresses(self, version: int) -> list[str]:
        """Every address configured on any interface of this namespace, of one IP version."""
        family = 10 if version == 6 else 2
        found = self._request("list addresses", self._ipr.get_addr, family=family)
        return [str(a.get("IFA_ADDRESS") or a.get_attr("IFA_ADDRESS")) for a in found]

    def pin_host_route(self, address: str) -> None:
        """A host route to `address` along the path it takes now (before a wider route into
        the TUN would capture it): the outer packets to a tunnel endpoint must never loop."""
        routes = self._request(f"route get {address}", self._ipr.route, "get", dst=address)
        if not routes:
            raise NetConfigError(f"no route to {address}{self._where()}")
        route = routes[0]
        host = ipaddress.ip_address(address)
        spec: dict[str, Any] = {"dst": f"{host}/{host.max_prefixlen}", "oif": route.get("RTA_OIF"), "proto": PIN_PROTO}
        gateway = route.get("RTA_GATEWAY")
        if gateway:
            spec["gateway"] = gateway
        self._request(f"pin route to {address}", self._ipr.route, "replace", **spec)

    def delete_host_route(self, address: str) -> None:
        host = ipaddress.ip_address(address)
        try:
            self._ipr.route("del", dst=f"{host}/{host.max_prefixlen}", proto=PIN_PROTO)
        except NetlinkError as exc:
            if exc.code != 3:
                raise NetConfigError(f"delete pinned route {address}{self._where()}: {exc}") from None

    def link_mtu(self, name: str) -> int:
        links = self._request(f"get {name}", self._ipr.get_links, self.index_of(name))
        return int(links[0].get("IFLA_MTU") or links[0].get("mtu"))

    def path_mtu(self, destination: str) -> int:
        """The MTU toward an outer destination: the route's mtu metric, else its device's MTU."""
        routes = self._request(f"route get {destination}", self._ipr.route, "get", dst=destination)
        if not routes:
            raise NetConfigError(f"no route to {destination}{self._where()}")
        route = routes[0]
        metrics = route.get("RTA_METRICS")
        if metrics is not None:
            mtu = metrics.get("RTAX_MTU")
            if mtu:
                return int(mtu)
        oif = route.get("RTA_OIF")
        links = self._request(f"get link {oif}", self._ipr.get_links, oif)
        return int(links[0].get("IFLA_MTU"))

    def configure_tun(self, config: TunLinkConfig) -> None:
        """MTU, queue length, link up, addresses, then routes (the order routes with prefsrc need)."""
        self.set_link(config.name, mtu=config.mtu, txqlen=config.txqlen, up=True)
        for cidr in config.addresses:
            self.add_address(config.name, cidr)
        for network in config.routes:
            v6 = ipaddress.ip_network(network, strict=False).version == 6
            self.replace_route(
                network,
                config.name,
                source=config.route_source_v6 if v6 else config.route_source_v4,
                table=config.route_table,
                metric=config.route_metric,
            )
