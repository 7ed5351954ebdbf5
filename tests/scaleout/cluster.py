"""A scale-out test bed: dataplane nodes sharing one etcd, a peer site, a protected LAN.

    with ScaleCluster(tmp_path, nodes=3, spare=1, tunnels=6) as cluster:
        cluster.start()                      # etcd, the peer, the first `nodes` dataplanes
        cluster.install_tunnels()            # manually keyed, through dp0's and the peer's gRPC
        cluster.owners()                     # {tunnel index: node name} from dataplane/owners/
        cluster.nodes[i].kill()              # kill -9 a node (its workers die with it)
        cluster.partition(i) / heal(i)       # its link to etcd down / up

Layout (all namespaces carry the prefix and a random tag; built with pyroute2):

* underlay bridge 198.18.0.0/24 (`tests.netns_topology.Topology`): dataplane node i is
  198.18.0.<i+1>, the peer site is the last topology node. Offloads off, so a capture sees
  every ESP packet as it was sent.
* tunnel t: the cluster's local tunnel address (VIP) 198.18.0.<101+t>, the peer endpoint
  198.18.0.<201+t> (a /32 on the peer's ul0, with a source route toward the VIP), the peer's
  protected network 10.70.<t>.0/24 (10.70.<t>.1 on its lo), the cluster's protected LAN
  10.90.0.0/24 with the inner gateway VIP 10.90.0.<101+t>.
* LAN: a namespace with a bridge; each dataplane node has `lan0` 10.90.0.<11+i>/24 on it; the
  LAN host 10.90.0.2 (an address on the bridge) routes 10.70.<t>.0/24 via 10.90.0.<101+t>.
* etcd: its own namespace with a bridge; each dataplane node reaches it on `et0`
  198.19.0.<1+i>/24, etcd listens on 198.19.0.100. `partition(i)` sets node i's `et0` down.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import NetNS, netns

from demo.manual_sites import SiteService, TunnelKeys, random_kek
from esplanade.v1 import dataplane_pb2, ipsec_pb2
from tests.conditions import wait_until
from tests.etcd_server import ETCDCTL_BINARY as ETCDCTL
from tests.etcd_server import EtcdServer
from tests.netns_topology import IFA_F_NODAD, Node, Topology, inside_netns

LAN_NET = "10.90.0.0/24"
LAN_HOST = "10.90.0.2"
ETCD_ADDR = "198.19.0.100"
REPLAY_BLOCK = 64
SEQUENCE_BLOCK = 1024
LEASE_SECONDS = 2


def vip(t: int) -> str:
    return f"198.18.0.{101 + t}"


def peer_endpoint(t: int) -> str:
    return f"198.18.0.{201 + t}"


def peer_net(t: int) -> str:
    return f"10.70.{t}.0/24"


def peer_host(t: int) -> str:
    return f"10.70.{t}.1"


def inner_vip(t: int) -> str:
    return f"10.90.0.{101 + t}"


class ClusterEtcd(EtcdServer):
    """etcd in its own namespace, listening on the address of the dedicated etcd link."""

    host = ETCD_ADDR

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass
class Tunnel:
    index: int
    keys: TunnelKeys
    child_id: str

    @property
    def spi_out(self) -> int:  # cluster -> peer
        return self.keys.spi_ab

    @property
    def spi_in(self) -> int:  # peer -> cluster
        return self.keys.spi_ba


def _sa(spi: int, src: str, dst: str, key: bytes, encr: str, local: str, remote: str) -> ipsec_pb2.SecurityAssociation:
    sa = ipsec_pb2.SecurityAssociation(
        spi=spi,
        src=src,
        dst=dst,
        encr=encr,
        encr_key=key,
        replay_window=1024,
        local_ts=[ipsec_pb2.TrafficSelector(text=local)],
        remote_ts=[ipsec_pb2.TrafficSelector(text=remote)],
    )
    sa.encap.CopyFrom(ipsec_pb2.UdpEncap(src_port=4500, dst_port=4500))
    return sa


def tunnel_child(tunnel: Tunnel, *, cluster_side: bool) -> ipsec_pb2.ChildSa:
    t, keys = tunnel.index, tunnel.keys
    local_addr, remote_addr = (vip(t), peer_endpoint(t)) if cluster_side else (peer_endpoint(t), vip(t))
    local_net, remote_net = (LAN_NET, peer_net(t)) if cluster_side else (peer_net(t), LAN_NET)
    # a = cluster, b = peer: spi_ab carries cluster -> peer
    spi_in, key_in = (keys.spi_ba, keys.key_ba) if cluster_side else (keys.spi_ab, keys.key_ab)
    spi_out, key_out = (keys.spi_ab, keys.key_ab) if cluster_side else (keys.spi_ba, keys.key_ba)
    return ipsec_pb2.ChildSa(
        id=tunnel.child_id,
        connection="manual",
        child=f"t{t}",
        ike_sa="manual",
        identity="peer" if cluster_side else "cluster",
        inbound=_sa(spi_in, remote_addr, local_addr, key_in, keys.encr, local_net, remote_net),
        outbound=_sa(spi_out, local_addr, remote_addr, key_out, keys.encr, local_net, remote_net),
        created_at=time.time(),
    )


def tunnel_policies(tunnel: Tunnel, *, cluster_side: bool) -> list[ipsec_pb2.SpdPolicy]:
    t = tunnel.index
    local_addr, remote_addr = (vip(t), peer_endpoint(t)) if cluster_side else (peer_endpoint(t), vip(t))
    local_net, remote_net = (LAN_NET, peer_net(t)) if cluster_side else (peer_net(t), LAN_NET)
    return [
        ipsec_pb2.SpdPolicy(
            id=f"{tunnel.child_id}-{name}",
            direction=direction,
            local_ts=ipsec_pb2.TrafficSelector(text=local_net),
            remote_ts=ipsec_pb2.TrafficSelector(text=remote_net),
            action=ipsec_pb2.POLICY_ACTION_PROTECT,
            priority=1000,
            child_sa=tunnel.child_id,
            tunnel_src=src,
            tunnel_dst=dst,
        )
        for name, direction, src, dst in (
            ("out", ipsec_pb2.DIRECTION_OUT, local_addr, remote_addr),
            ("in", ipsec_pb2.DIRECTION_IN, remote_addr, local_addr),
        )
    ]


@dataclass
class ClusterNode:
    index: int
    node: Node
    service: SiteService

    @property
    def name(self) -> str:
        return self.service.name

    def counters(self) -> dataplane_pb2.GetCountersResponse:
        with self.service.client() as stub:
            return stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10)

    def status(self) -> dict[str, str]:
        with self.service.client() as stub:
            return dict(stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10).details)

    def drops(self) -> dict[str, int]:
        return {d.reason: d.packets for d in self.counters().drops}

    def alive(self) -> bool:
        return self.service.proc is not None and self.service.proc.poll() is None

    def kill(self) -> None:
        self.service.kill()


@dataclass
class ScaleCluster:
    workdir: Path
    nodes: int = 3
    spare: int = 0  # extra dataplane namespaces, started later (joins)
    tunnels: int = 6
    prefix: str = "scl-"
    settings: dict[str, str] = field(default_factory=dict)
    topology: Topology | None = None
    etcd: ClusterEtcd | None = None
    members: list[ClusterNode] = field(default_factory=list)
    peer: SiteService | None = None
    tunnel_list: list[Tunnel] = field(default_factory=list)
    lan_ns: str = ""
    etcd_ns: str = ""
    _extra_ns: list[str] = field(default_factory=list)
    kek: str = field(default_factory=random_kek)

    # -- building -------------------------------------------------------------------------
    def __enter__(self) -> ScaleCluster:
        self.topology = Topology(self.prefix, self.nodes + self.spare + 1, offloads=False)
        try:
            self.topology.__enter__()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def peer_node(self) -> Node:
        assert self.topology is not None
        return self.topology.nodes[-1]

    @property
    def dp_nodes(self) -> list[Node]:
        assert self.topology is not None
        return self.topology.nodes[:-1]

    def _ns(self, suffix: str) -> str:
        assert self.topology is not None
        name = f"{self.prefix}{self.topology.tag}-{suffix}"
        netns.create(name)
        self._extra_ns.append(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        return name

    def _bridge(self, ns_name: str, cidr: str) -> int:
        with NetNS(ns_name) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            bridge = ns.link_lookup(ifname="br0")[0]
            ns.link("set", index=bridge, state="up")
            address, prefixlen = cidr.split("/")
            ns.addr("add", index=bridge, address=address, prefixlen=int(prefixlen))
            return int(bridge)

    def _attach(self, ns_name: str, bridge: int, node: Node, ifname: str, cidr: str, port: str) -> None:
        with NetNS(ns_name) as ns:
            ns.link("add", ifname=port, kind="veth", peer={"ifname": ifname, "net_ns_fd": node.name})
            idx = ns.link_lookup(ifname=port)[0]
            ns.link("set", index=idx, master=bridge, state="up")
        with NetNS(node.name) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.link("set", index=idx, state="up")
            address, prefixlen = cidr.split("/")
            ns.addr("add", index=idx, address=address, prefixlen=int(prefixlen))

    def _build(self) -> None:
        self.lan_ns = self._ns("lan")
        self.etcd_ns = self._ns("etcd")
        lan_bridge = self._bridge(self.lan_ns, f"{LAN_HOST}/24")
        etcd_bridge = self._bridge(self.etcd_ns, f"{ETCD_ADDR}/24")
        for i, node in enumerate(self.dp_nodes):
            self._attach(self.lan_ns, lan_bridge, node, "lan0", f"10.90.0.{11 + i}/24", f"l{i}")
            self._attach(self.etcd_ns, etcd_bridge, node, "et0", f"198.19.0.{1 + i}/24", f"e{i}")
            node.sysctl("net.ipv4.ip_forward", "1")
        with NetNS(self.lan_ns) as ns:
            for t in range(self.tunnels):
                ns.route("add", dst=peer_net(t), gateway=inner_vip(t))
        peer = self.peer_node
        with NetNS(peer.name) as ns:
            ul = ns.link_lookup(ifname="ul0")[0]
            lo = ns.link_lookup(ifname="lo")[0]
            for t in range(self.tunnels):
                ns.addr("add", index=ul, address=peer_endpoint(t), prefixlen=32, flags=IFA_F_NODAD)
                ns.addr("add", index=lo, address=peer_host(t), prefixlen=32)
                ns.route("add", dst=f"{vip(t)}/32", oif=ul, prefsrc=peer_endpoint(t))

    # -- services -------------------------------------------------------------------------
    def node_settings(self, i: int) -> dict[str, str]:
        assert self.etcd is not None
        inner = {vip(t): [f"lan0={inner_vip(t)}/24"] for t in range(self.tunnels)}
        return {
            "ESPLANADE_STORE__BACKEND": "etcd",
            "ESPLANADE_STORE__ETCD_ENDPOINTS": json.dumps([self.etcd.endpoint]),
            "ESPLANADE_STORE__TIMEOUT_SECONDS": "1",
            "ESPLANADE_DATAPLANE__LISTEN_ADDRESSES": "[]",
            "ESPLANADE_DATAPLANE__OWNERSHIP": "rendezvous",
            "ESPLANADE_DATAPLANE__LEASE_SECONDS": str(LEASE_SECONDS),
            "ESPLANADE_DATAPLANE__SEQUENCE_BLOCK": str(SEQUENCE_BLOCK),
            "ESPLANADE_DATAPLANE__REPLAY_BLOCK": str(REPLAY_BLOCK),
            "ESPLANADE_DATAPLANE__STEERING_INTERFACE": "ul0",
            "ESPLANADE_DATAPLANE__STEERING_INNER": json.dumps(inner),
            **self.settings,
        }

    def start(self, nodes: int | None = None) -> None:
        self.etcd = ClusterEtcd(self.workdir / "etcd", netns=self.etcd_ns)
        self.etcd.start()
        self.peer = SiteService(
            self.peer_node,
            self.workdir,
            "peer",
            self.kek,
            settings={"ESPLANADE_DATAPLANE__LISTEN_ADDRESSES": "[]"},
        )
        self.peer.start()
        for i, node in enumerate(self.dp_nodes):
            service = SiteService(node, self.workdir, f"dp{i}", self.kek, store="etcd", settings=self.node_settings(i))
            member = ClusterNode(i, node, service)
            member.service.etcd_endpoint = self.etcd.endpoint
            self.members.append(member)
        for member in self.members[: self.nodes if nodes is None else nodes]:
            member.service.start()

    def start_node(self, i: int) -> ClusterNode:
        member = self.members[i]
        member.service.start()
        return member

    def install_tunnels(self) -> list[Tunnel]:
        assert self.peer is not None
        for t in range(self.tunnels):
            tunnel = Tunnel(t, TunnelKeys.generate(), f"tunnel-{t}")
            self.tunnel_list.append(tunnel)
            for site, cluster_side in ((self.members[0].service, True), (self.peer, False)):
                with site.client() as stub:
                    child = tunnel_child(tunnel, cluster_side=cluster_side)
                    stub.InstallChildSa(dataplane_pb2.InstallChildSaRequest(child_sa=child), timeout=20)
                    for policy in tunnel_policies(tunnel, cluster_side=cluster_side):
                        stub.InstallPolicy(dataplane_pb2.InstallPolicyRequest(policy=policy), timeout=20)
        return self.tunnel_list

    # -- the store ------------------------------------------------------------------------
    def etcd_get(self, prefix: str) -> dict[str, dict[str, Any]]:
        assert self.etcd is not None
        with inside_netns(self.etcd_ns):
            out = self.etcd.etcdctl("get", "--prefix", prefix, "-w", "json").stdout
        reply = json.loads(out)
        result = {}
        for kv in reply.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            try:
                value = json.loads(base64.b64decode(kv["value"]))
            except ValueError:
                value = {}
            value["_lease"] = kv.get("lease", 0)
            value["_mod_revision"] = kv.get("mod_revision", 0)
            result[key] = value
        return result

    def owners(self) -> dict[int, str]:
        records = self.etcd_get("/esplanade/v1/dataplane/owners/")
        by_child = {key.rsplit("/", 1)[1]: value.get("node", "") for key, value in records.items()}
        return {t.index: by_child[t.child_id] for t in self.tunnel_list if t.child_id in by_child}

    def owner_history(self) -> list[tuple[str, str, str]]:
        """Every event on `dataplane/owners/` since revision 1: (PUT|DELETE, child id, node)."""
        assert self.etcd is not None
        command = [
            ETCDCTL,
            f"--endpoints={self.etcd.client_url}",
            "watch",
            "--prefix",
            "/esplanade/v1/dataplane/owners/",
            "--rev",
            "1",
            "-w",
            "json",
        ]
        with inside_netns(self.etcd_ns):
            try:
                out = subprocess.run(command, capture_output=True, timeout=2, env={"ETCDCTL_API": "3"}).stdout
            except subprocess.TimeoutExpired as expired:  # watch never ends by itself
                out = expired.stdout or b""
        return self.parse_watch(out.decode() if isinstance(out, bytes) else out)

    @staticmethod
    def parse_watch(text: str) -> list[tuple[str, str, str]]:
        events = []
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            for event in json.loads(line).get("Events") or []:
                kv = event["kv"]
                child = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]
                if event.get("type") == 1:
                    events.append(("DELETE", child, ""))
                else:
                    value = json.loads(base64.b64decode(kv.get("value", "")) or b"{}")
                    events.append(("PUT", child, str(value.get("node", ""))))
        return events

    def owner_history_violations(self) -> list[str]:
        """A claim over a live claim would show as two PUTs without a DELETE between them."""
        current: dict[str, str] = {}
        problems = []
        for kind, child, node in self.owner_history():
            if kind == "PUT":
                if child in current and current[child] != node:
                    problems.append(f"{child}: {node} claimed while {current[child]} held it")
                current[child] = node
            else:
                current.pop(child, None)
        return problems

    def members_in_store(self) -> dict[str, dict[str, Any]]:
        records = self.etcd_get("/esplanade/v1/dataplane/nodes/")
        return {key.rsplit("/", 1)[1]: value for key, value in records.items()}

    def installed_on(self, member: ClusterNode) -> set[str]:
        """Child SA ids whose outbound SA this node's backend carries."""
        return {c.child_sa for c in member.counters().sas if c.direction == ipsec_pb2.DIRECTION_OUT}

    def wait_owned(self, expect_nodes: set[str] | None = None, timeout: float = 30) -> dict[int, str]:
        """Every tunnel has an owner record naming a live member, and that member carries it."""

        def settled() -> dict[int, str] | None:
            owners = self.owners()
            if len(owners) != len(self.tunnel_list):
                return None
            live = {m.name: m for m in self.members if m.alive()}
            if any(node not in live for node in owners.values()):
                return None
            if expect_nodes is not None and set(owners.values()) != expect_nodes:
                return None
            for t, node in owners.items():
                if self.tunnel_list[t].child_id not in self.installed_on(live[node]):
                    return None
            return owners

        return wait_until(settled, timeout=timeout, what="every tunnel owned and installed")

    # -- failures -------------------------------------------------------------------------
    def member(self, name: str) -> ClusterNode:
        return next(m for m in self.members if m.name == name)

    def set_etcd_link(self, i: int, up: bool) -> None:
        with NetNS(self.dp_nodes[i].name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="et0")[0], state="up" if up else "down")

    def partition(self, i: int) -> None:
        self.set_etcd_link(i, False)

    def heal(self, i: int) -> None:
        self.set_etcd_link(i, True)

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        for member in self.members:
            with contextlib.suppress(Exception):
                member.service.stop()
        if self.peer is not None:
            with contextlib.suppress(Exception):
                self.peer.stop()
        if self.etcd is not None:
            self.etcd.stop()
        for name in reversed(self._extra_ns):
            Topology._kill_leftovers(name)
            with contextlib.suppress(OSError):
                netns.remove(name)
        self._extra_ns.clear()
        if self.topology is not None:
            self.topology.teardown()


def random_payload(size: int) -> bytes:
    return secrets.token_bytes(size)
