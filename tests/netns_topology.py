"""Network-namespace test beds: N gateway nodes on one underlay, each with a protected "site".

    with Topology("dpth-", nodes=2) as topo:          # or the `topology` fixtures built on it
        a, b = topo.nodes
        a.run(["ping", "-c1", b.underlay_addr])
        proc = b.popen(["iperf3", "-s", "-B", b.site_addr])  # stopped at teardown

Layout (all names carry the caller's prefix plus a random tag, so runs never collide):

* two nodes: a veth pair `ul0`<->`ul0` between them, underlay 198.18.0.<i+1>/24 and
  fd18::<i+1>/64;
* three or more: a switch namespace `<prefix><tag>-sw` with a bridge, one veth per node;
* each node i protects site 10.80.<i+1>.0/24 (and fd80:0:<i+1>::/64). Without site hosts
  the node's own site address 10.80.<i+1>.1/32 sits on `lo` (as in strongSwan's test pair);
  with `site_hosts=True` a host namespace `<...>-h<i>` hangs off the node by veth `lan0`,
  the node is its router (10.80.<i+1>.1/24, forwarding on) and the host is .2.

Everything is built through pyroute2; programs run inside with `ip netns exec`. Teardown
(also on failure, also when build fails half-way) stops every process we started, then any
process left inside our namespaces, then deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import NetNS, netns

IFA_F_NODAD = 0x02


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run this thread inside namespace `name`; sockets and TUN devices opened here stay there."""
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


@dataclass(frozen=True)
class LinkEnd:
    """One side of `linked_pair`: its namespace, veth name, underlay address (/24 on the veth)
    and inner address (/32 on `lo`)."""

    netns: str
    device: str
    underlay: str
    inner: str


@contextlib.contextmanager
def linked_pair(a: LinkEnd, b: LinkEnd) -> Iterator[None]:
    """Two namespaces joined by one veth, with the fixed names and addresses a strongSwan peer's
    configuration names (Topology draws its own). Leftovers of an earlier run are removed first;
    both namespaces are deleted afterwards."""

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def remove() -> None:
        for end in (a, b):
            subprocess.run(["ip", "netns", "del", end.netns], capture_output=True)

    remove()
    ip("netns", "add", a.netns)
    ip("netns", "add", b.netns)
    ip("link", "add", a.device, "netns", a.netns, "type", "veth", "peer", "name", b.device, "netns", b.netns)
    for end in (a, b):
        ip("-n", end.netns, "addr", "add", f"{end.underlay}/24", "dev", end.device)
        ip("-n", end.netns, "addr", "add", f"{end.inner}/32", "dev", "lo")
        ip("-n", end.netns, "link", "set", "lo", "up")
        ip("-n", end.netns, "link", "set", end.device, "up")
    try:
        yield
    finally:
        remove()


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """A fresh namespace with `lo` up, removed afterwards (with anything still running in it)."""
    name = f"{prefix}{secrets.token_hex(3)}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield name
    finally:
        Topology._kill_leftovers(name)
        with contextlib.suppress(OSError):
            netns.remove(name)


@dataclass
class Node:
    index: int
    name: str  # network namespace
    underlay_addr: str
    underlay_addr6: str
    site_net: str
    site_addr: str  # the node's own address inside its site
    site_net6: str
    site_addr6: str
    host_ns: str | None = None  # site host behind the node, when built with site_hosts
    host_addr: str | None = None
    host_addr6: str | None = None
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def argv(self, args: list[str], host: bool = False) -> list[str]:
        where = self.host_ns if host else self.name
        if where is None:
            raise ValueError(f"node {self.name} has no site host")
        return ["ip", "netns", "exec", where, *args]

    def run(
        self, args: list[str], *, host: bool = False, timeout: float = 30.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(args, host), capture_output=True, text=True, timeout=timeout, check=check)

    def popen(self, args: list[str], *, host: bool = False, **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(args, host), start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def sysctl(self, key: str, value: str, host: bool = False) -> None:
        where = self.host_ns if host else self.name
        path = Path("/proc/sys") / key.replace(".", "/")
        subprocess.run(
            ["ip", "netns", "exec", str(where), "sh", "-c", f"echo {value} > {path}"], check=True, timeout=10
        )

    def netlink(self, host: bool = False) -> Any:
        """A pyroute2 NetNS handle (close it when done)."""
        return NetNS(self.host_ns if host else self.name)

    def namespaces(self) -> list[str]:
        return [self.name] + ([self.host_ns] if self.host_ns else [])


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """TERM the process group we started, then KILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


class Topology:
    def __init__(
        self,
        prefix: str,
        nodes: int = 2,
        *,
        site_hosts: bool = False,
        underlay_mtu: int = 1500,
        offloads: bool = True,
    ) -> None:
        if nodes < 2:
            raise ValueError("a topology has at least two nodes")
        self.prefix = prefix
        self.tag = secrets.token_hex(2)
        self.site_hosts = site_hosts
        self.underlay_mtu = underlay_mtu
        self.offloads = offloads
        base = f"{prefix}{self.tag}"
        self.switch_ns = f"{base}-sw" if nodes > 2 else None
        self.nodes = [
            Node(
                index=i,
                name=f"{base}-n{i}",
                underlay_addr=f"198.18.0.{i + 1}",
                underlay_addr6=f"fd18::{i + 1}",
                site_net=f"10.80.{i + 1}.0/24",
                site_addr=f"10.80.{i + 1}.1",
                site_net6=f"fd80:0:{i + 1}::/64",
                site_addr6=f"fd80:0:{i + 1}::1",
                host_ns=f"{base}-h{i}" if site_hosts else None,
                host_addr=f"10.80.{i + 1}.2" if site_hosts else None,
                host_addr6=f"fd80:0:{i + 1}::2" if site_hosts else None,
            )
            for i in range(nodes)
        ]
        self._created: list[str] = []

    # -- build ----------------------------------------------------------------------------
    def __enter__(self) -> Topology:
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    def _create_ns(self, name: str) -> None:
        if name in netns.listnetns():
            netns.remove(name)
        netns.create(name)
        self._created.append(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    def build(self) -> None:
        for node in self.nodes:
            self._create_ns(node.name)
            if node.host_ns:
                self._create_ns(node.host_ns)
        if self.switch_ns is None:
            a, b = self.nodes
            with NetNS(a.name) as ns:
                ns.link("add", ifname="ul0", kind="veth", peer={"ifname": "ul0", "net_ns_fd": b.name})
        else:
            self._create_ns(self.switch_ns)
            with NetNS(self.switch_ns) as sw:
                sw.link("add", ifname="br0", kind="bridge")
                bridge = sw.link_lookup(ifname="br0")[0]
                for node in self.nodes:
                    port = f"p{node.index}"
                    sw.link("add", ifname=port, kind="veth", peer={"ifname": "ul0", "net_ns_fd": node.name})
                    idx = sw.link_lookup(ifname=port)[0]
                    sw.link("set", index=idx, master=bridge, mtu=self.underlay_mtu, state="up")
                sw.link("set", index=bridge, state="up")
        for node in self.nodes:
            self._configure_node(node)
        if not self.offloads:
            for node in self.nodes:
                node.run(["ethtool", "-K", "ul0", "gro", "off", "gso", "off", "tso", "off", "tx", "off"], timeout=10)

    def _configure_node(self, node: Node) -> None:
        with NetNS(node.name) as ns:
            ul = ns.link_lookup(ifname="ul0")[0]
            ns.link("set", index=ul, mtu=self.underlay_mtu, state="up")
            ns.addr("add", index=ul, address=node.underlay_addr, prefixlen=24)
            ns.addr("add", index=ul, address=node.underlay_addr6, prefixlen=64, flags=IFA_F_NODAD)
            lo = ns.link_lookup(ifname="lo")[0]
            if node.host_ns is None:
                ns.addr("add", index=lo, address=node.site_addr, prefixlen=32)
                ns.addr("add", index=lo, address=node.site_addr6, prefixlen=128, flags=IFA_F_NODAD)
            else:
                ns.link("add", ifname="lan0", kind="veth", peer={"ifname": "lan0", "net_ns_fd": node.host_ns})
                lan = ns.link_lookup(ifname="lan0")[0]
                ns.link("set", index=lan, state="up")
                ns.addr("add", index=lan, address=node.site_addr, prefixlen=24)
                ns.addr("add", index=lan, address=node.site_addr6, prefixlen=64, flags=IFA_F_NODAD)
        if node.host_ns is not None:
            node.sysctl("net.ipv4.ip_forward", "1")
            node.sysctl("net.ipv6.conf.all.forwarding", "1")
            with NetNS(node.host_ns) as host:
                lan = host.link_lookup(ifname="lan0")[0]
                host.link("set", index=lan, state="up")
                host.addr("add", index=lan, address=str(node.host_addr), prefixlen=24)
                host.addr("add", index=lan, address=str(node.host_addr6), prefixlen=64, flags=IFA_F_NODAD)
                host.route("add", dst="0.0.0.0/0", gateway=node.site_addr)
                host.route("add", dst="::/0", gateway=node.site_addr6, family=10)

    # -- teardown -------------------------------------------------------------------------
    def teardown(self) -> None:
        for node in self.nodes:
            for proc in reversed(node.processes):
                stop_process(proc)
            node.processes.clear()
        existing = set(netns.listnetns())
        for name in reversed(self._created):
            if name not in existing:
                continue
            self._kill_leftovers(name)
            with contextlib.suppress(OSError):
                netns.remove(name)
        self._created.clear()

    @staticmethod
    def _kill_leftovers(name: str) -> None:
        """Processes still inside one of our namespaces were started by this test bed."""
        result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
        pids = [int(p) for p in result.stdout.split() if p.isdigit()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.02)
