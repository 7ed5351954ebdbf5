"""A zero-trust test bed in netns: an Esplanade gateway (policy + keyexchange + dataplane on one
embedded store), a private network behind it, strongSwan remote users on a shared WAN segment,
and a connector (an Esplanade site with `site.inbound: dial-out-only`) fronting one more network.
alice, bob and carol connect through `rw` (exact narrowing), dave (eng, like alice) through
`rw-coarse` (`access_narrowing: networks`).

    zt-u1, zt-u2 ... (charon, kernel-libipsec)      198.18.61.1x/24 --+
                                                                       | bridge ztbr0
    zt-gw  (Esplanade: dataplane, keyexchange, policy)  198.18.61.1/24 -+
           10.60.255.1/30 --- 10.60.255.2/30  zt-res: 10.60.1.10, 10.60.1.11 (resources on lo)
           virtual IPs 10.61.0.0/28 routed into esp0
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.store import schema
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer
from esplanade.v1 import dataplane_pb2, policy_pb2, policy_pb2_grpc
from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import wait_until
from tests.keyexchange import interop as ix
from tests.keyexchange.service.sites import REPO, Site, nsx, sh

GW_WAN = "198.18.61.1"
PRIVATE = "10.60.0.0/16"
EDGE_NET = "10.70.0.0/24"  # the connector's private network
APP = "10.70.0.5"  # a resource only the connector fronts
APP_NS = "zt-app"
CONNECTOR_WAN = "198.18.61.30"
CONNECTOR_ID = "edge.corp.test"
REACHABLE = f"{PRIVATE},{EDGE_NET}"
POOL = "10.61.0.0/28"
RES_NS = "zt-res"
WEB, CRM = "10.60.1.10", "10.60.1.11"  # neighbours in one subnet
PSK = "zero-trust-test-psk-0123456789abcdef"
GW_ID = "gw.corp.test"
POLICY_PORT = 50063
STREAM = [sys.executable, "-m", "tests.zerotrust.stamped_stream"]

POLICY_YAML = f"""
version: 1
sites:
  - {{id: hq, networks: [{PRIVATE}]}}
  - {{id: edge, networks: [{EDGE_NET}], description: "connector: dials out only"}}
groups:
  - {{id: eng}}
  - {{id: sales}}
  - {{id: contractors}}
identities:
  - {{id: alice, ike_ids: ["email:alice@corp.test"], groups: [eng]}}
  - {{id: bob, ike_ids: ["email:bob@corp.test"], groups: [sales]}}
  - {{id: carol, ike_ids: ["email:carol@corp.test"], groups: [contractors]}}
  - {{id: dave, ike_ids: ["email:dave@corp.test"], groups: [eng]}}
resources:
  - {{id: web, destination: {WEB}, protocol: tcp, ports: [8443], site: hq}}
  - {{id: crm, destination: {CRM}, protocol: tcp, ports: [9000], site: hq}}
  - {{id: app, destination: {APP}, protocol: tcp, ports: [17000], site: edge}}
rules:
  - {{id: eng-app, groups: [eng], resources: [app]}}
  - {{id: eng-web, groups: [eng], resources: [web]}}
  - {{id: sales-crm, groups: [sales], resources: [crm]}}
"""


class Gateway(Site):
    def __init__(self, base: Path) -> None:
        super().__init__("zt-gw", 61, GW_WAN, "10.60.0.1", base)
        self.policy_proc: subprocess.Popen[bytes] | None = None
        self.policy_log = base / "policy.log"
        self.audit_path = base / "audit.db"
        self._policy_channel: grpc.Channel | None = None

    def start_dataplane(self, *extra: str, wait: bool = True) -> None:
        """`ZT_HOT_PATH=python` runs the gateway's dataplane on the pure-Python hot path (the lane a
        machine without a C compiler gets); default: the service's choice."""
        hot_path = os.environ.get("ZT_HOT_PATH", "")
        if hot_path and not extra:
            self._start_real_dataplane(wait=wait, ESPLANADE_DATAPLANE__HOT_PATH=hot_path)
            if wait:
                assert self.dp_details().get("hot_path") == hot_path, self.dp_details()
        else:
            super().start_dataplane(*extra, wait=wait)

    def start_policy(self) -> None:
        env = self.env(
            ESPLANADE_ENDPOINTS__POLICY=f"0.0.0.0:{POLICY_PORT}",
            ESPLANADE_POLICY__AUDIT_LOG_PATH=str(self.audit_path),
        )
        cmd = [sys.executable, "-m", "esplanade.cli.main", "serve", "policy"]
        with open(self.policy_log, "ab") as log:
            self.policy_proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
        wait_until(self._policy_serving, timeout=30, what="policy service serving")

    def _policy_serving(self) -> bool:
        if self.policy_proc is not None and self.policy_proc.poll() is not None:
            raise AssertionError(f"policy died: {self.policy_log.read_text(errors='replace')[-3000:]}")
        try:
            self.policy_stub().ListObjects(policy_pb2.ListObjectsRequest(kind="rules"), timeout=2)
        except grpc.RpcError:
            return False
        return True

    def policy_stub(self) -> policy_pb2_grpc.PolicyStub:
        if self._policy_channel is None:
            self._policy_channel = grpc.insecure_channel(f"{self.mgmt_ip}:{POLICY_PORT}")
        return policy_pb2_grpc.PolicyStub(self._policy_channel)

    def apply_policy(self, text: str) -> None:
        self.policy_stub().Apply(policy_pb2.ApplyRequest(yaml=text, actor="test"), timeout=10)

    def put_rule(self, rule: dict[str, Any]) -> None:
        doc = struct_pb2.Struct()
        doc.update(rule)
        obj = policy_pb2.PolicyObject(kind="rules", id=str(rule["id"]), document=doc)
        self.policy_stub().PutObject(policy_pb2.PutObjectRequest(object=obj, actor="test"), timeout=10)

    def delete_rule(self, rule_id: str) -> None:
        self.policy_stub().DeleteObject(
            policy_pb2.DeleteObjectRequest(kind="rules", id=rule_id, actor="security-team"), timeout=10
        )

    def compiled(self, identity: str) -> dict[str, Any] | None:
        docs = self.store_range("/esplanade/v1/policy/compiled/")
        raw = docs.get(identity)
        return None if raw is None else dict(json.loads(raw))

    def dp_details(self) -> dict[str, str]:
        return dict(self.dp_stub().GetStatus(dataplane_pb2.GetStatusRequest(), timeout=5).details)

    def stop(self) -> None:
        super().stop()
        if self.policy_proc is not None and self.policy_proc.poll() is None:
            self.policy_proc.terminate()
            try:
                self.policy_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.policy_proc.kill()
                self.policy_proc.wait(5)
        self.policy_proc = None
        if self._policy_channel is not None:
            self._policy_channel.close()
            self._policy_channel = None


def gateway_connection() -> dict[str, Any]:
    return {
        "local_addrs": [GW_WAN],
        "local": {"auth": "psk", "id": GW_ID},
        "remote": {"auth": "psk", "id": "%any"},
        "psk": PSK,
        "pools": ["users"],
        "encap": True,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": REACHABLE, "esp_proposals": ["aes256gcm16"]}},
    }


def gateway_coarse_connection() -> dict[str, Any]:
    """Remote access narrowed coarsely: to the site networks holding the grant, address-only (the
    dataplane's filter stays exact). It names dave exactly, so it wins over `rw`'s %any for him."""
    return {**gateway_connection(), "remote": {"auth": "psk", "id": "dave@corp.test"}, "access_narrowing": "networks"}


def gateway_connector_connection() -> dict[str, Any]:
    """The gateway's side of the connector's uplink: it only ever answers (no remote to dial)."""
    return {
        "local_addrs": [GW_WAN],
        "remote_addrs": [CONNECTOR_WAN],
        "local": {"auth": "psk", "id": GW_ID},
        "remote": {"auth": "psk", "id": CONNECTOR_ID},
        "psk": PSK,
        "encap": True,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": POOL, "remote_ts": EDGE_NET, "esp_proposals": ["aes256gcm16"]}},
    }


def connector_uplink() -> dict[str, Any]:
    """The connector dials out to the gateway (IKE initiator) and carries its network to the users."""
    return {
        "local_addrs": [CONNECTOR_WAN],
        "remote_addrs": [GW_WAN],
        "local": {"auth": "psk", "id": CONNECTOR_ID},
        "remote": {"auth": "psk", "id": GW_ID},
        "psk": PSK,
        "encap": True,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": EDGE_NET, "remote_ts": POOL, "esp_proposals": ["aes256gcm16"]}},
    }


DIAL_OUT_ONLY = {"ESPLANADE_SITE__INBOUND": "dial-out-only", "ESPLANADE_SITE__MANAGEMENT_INTERFACES": '["mgmt0"]'}


class Connector(Site):
    """An Esplanade site (dataplane + keyexchange) that fronts `APP` and accepts nothing inbound:
    both services run with `site.inbound: dial-out-only` (the dataplane installs its nftables table,
    keyexchange answers no IKE_SA_INIT); only the test's management link (mgmt0) gets in."""

    def __init__(self, base: Path) -> None:
        super().__init__("zt-conn", 62, CONNECTOR_WAN, "10.70.0.1", base)

    def start_dataplane(self, *extra: str, wait: bool = True) -> None:
        self._start_real_dataplane(wait=wait, **DIAL_OUT_ONLY)

    def start_keyexchange(self, *, wait: bool = True, **extra: str) -> None:
        super().start_keyexchange(wait=wait, **DIAL_OUT_ONLY, **extra)

    def build(self) -> None:
        self.create_netns()
        nsx(self.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        nsx(self.ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        sh("ip", "link", "add", "wan0", "netns", self.ns, "type", "veth", "peer", "name", "ztc0", "netns", "zt-gw")
        nsx(self.ns, "ip", "addr", "add", f"{self.wan_ip}/24", "dev", "wan0")
        nsx(self.ns, "ip", "link", "set", "wan0", "up")
        nsx("zt-gw", "ip", "link", "set", "ztc0", "master", "ztbr0")
        nsx("zt-gw", "ip", "link", "set", "ztc0", "up")
        sh("ip", "netns", "del", APP_NS, check=False)
        sh("ip", "netns", "add", APP_NS)
        nsx(APP_NS, "ip", "link", "set", "lo", "up")
        nsx(APP_NS, "ip", "addr", "add", f"{APP}/32", "dev", "lo")
        sh("ip", "link", "add", "lan0", "netns", APP_NS, "type", "veth", "peer", "name", "ztapp0", "netns", self.ns)
        nsx(APP_NS, "ip", "addr", "add", "10.70.255.2/30", "dev", "lan0")
        nsx(APP_NS, "ip", "link", "set", "lan0", "up")
        nsx(APP_NS, "ip", "route", "add", POOL, "via", "10.70.255.1")
        nsx(self.ns, "ip", "addr", "add", "10.70.255.1/30", "dev", "ztapp0")
        nsx(self.ns, "ip", "link", "set", "ztapp0", "up")
        nsx(self.ns, "ip", "route", "add", f"{APP}/32", "via", "10.70.255.2")

    def destroy(self) -> None:
        self.stop()
        sh("ip", "netns", "del", APP_NS, check=False)
        self.delete_netns()


class RemoteUser:
    """A strongSwan 5.9.8 remote-access client in its own netns on the WAN bridge."""

    def __init__(self, name: str, index: int, ike_id: str, base: Path) -> None:
        self.ns = f"zt-{name}"
        self.ip = f"198.18.61.{10 + index}"
        self.ike_id = ike_id
        self.veth = f"ztu{index}"
        self.charon = ix.Charon(base / name, ns=self.ns)

    def create(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "netns", "add", self.ns)
        nsx(self.ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "wan0", "netns", self.ns, "type", "veth", "peer", "name", self.veth, "netns", "zt-gw")
        nsx(self.ns, "ip", "addr", "add", f"{self.ip}/24", "dev", "wan0")
        nsx(self.ns, "ip", "link", "set", "wan0", "up")
        nsx("zt-gw", "ip", "link", "set", self.veth, "master", "ztbr0")
        nsx("zt-gw", "ip", "link", "set", self.veth, "up")

    def connect(self, check: bool = True) -> None:
        self.charon.start(log_level=2)
        conn = f"""
    rw {{
        version = 2
        local_addrs = {self.ip}
        remote_addrs = {GW_WAN}
        encap = yes
        vips = 0.0.0.0
        proposals = aes256gcm16-prfsha256-ecp256
        local {{
            auth = psk
            id = {self.ike_id}
        }}
        remote {{
            auth = psk
            id = {GW_ID}
        }}
        children {{
            net {{
                remote_ts = {REACHABLE}
                esp_proposals = aes256gcm16
                mode = tunnel
                start_action = none
                close_action = none
            }}
        }}
    }}"""
        secrets = f"""
    ike-gw {{
        id-a = {self.ike_id}
        id-b = {GW_ID}
        secret = "{PSK}"
    }}"""
        self.charon.load(conn, secrets)
        self.charon.swanctl("--initiate", "--child", "net", "--ike", "rw", "--timeout", "30", timeout=40, check=check)

    def sas(self) -> str:
        return self.charon.swanctl("--list-sas", check=False)

    def virtual_ip(self) -> str:
        out = nsx(self.ns, "ip", "-4", "-o", "addr", "show").stdout
        for line in out.splitlines():
            addr = line.split()[3].split("/")[0]
            if addr.startswith("10.61."):
                return addr
        raise AssertionError(f"no virtual IP in {self.ns}: {out}")

    def tunnel_routes(self) -> list[str]:
        """The destinations strongSwan routes into the tunnel (its table 220)."""
        out = nsx(self.ns, "ip", "-4", "route", "show", "table", "220", check=False).stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.strip())

    def destroy(self) -> None:
        self.charon.stop()
        sh("ip", "netns", "del", self.ns, check=False)


def build_network(gw: Gateway) -> None:
    gw.create_netns()
    nsx(gw.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    nsx(gw.ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
    nsx(gw.ns, "ip", "link", "add", "ztbr0", "type", "bridge")
    nsx(gw.ns, "ip", "addr", "add", f"{GW_WAN}/24", "dev", "ztbr0")
    nsx(gw.ns, "ip", "link", "set", "ztbr0", "up")
    sh("ip", "netns", "del", RES_NS, check=False)
    sh("ip", "netns", "add", RES_NS)
    nsx(RES_NS, "ip", "link", "set", "lo", "up")
    for addr in (WEB, CRM):
        nsx(RES_NS, "ip", "addr", "add", f"{addr}/32", "dev", "lo")
    sh("ip", "link", "add", "lan0", "netns", RES_NS, "type", "veth", "peer", "name", "ztres0", "netns", gw.ns)
    nsx(RES_NS, "ip", "addr", "add", "10.60.255.2/30", "dev", "lan0")
    nsx(RES_NS, "ip", "link", "set", "lan0", "up")
    nsx(RES_NS, "ip", "route", "add", POOL, "via", "10.60.255.1")
    nsx(gw.ns, "ip", "addr", "add", "10.60.255.1/30", "dev", "ztres0")
    nsx(gw.ns, "ip", "link", "set", "ztres0", "up")
    nsx(gw.ns, "ip", "route", "add", "10.60.1.0/24", "via", "10.60.255.2")


def teardown_network(gw: Gateway) -> None:
    sh("ip", "netns", "del", RES_NS, check=False)
    gw.delete_netns()


class StampedServer:
    """`stamped_stream serve` in the resource namespace: every received line with its time."""

    def __init__(self, addr: str, port: int, out: Path) -> None:
        self.out = out
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", RES_NS, *STREAM, "serve", addr, str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "listening"

    def lines(self) -> list[tuple[float, int, float]]:
        """(received at, seq, sent at) of every line the server got."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.out.read_text().splitlines():
                received, seq, sent = line.split()
                out.append((float(received), int(seq), float(sent)))
        return out

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def stamped_sender(
    user: RemoteUser, src: str, addr: str, port: int, seconds: float, out: Path
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        ["ip", "netns", "exec", user.ns, *STREAM, "send", src, addr, str(port), str(seconds), "0.02", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=open(out.with_suffix(".err"), "ab"),
        env=env,
        cwd=REPO,
    )


def tcp_reaches(who: RemoteUser | str, src: str, addr: str, port: int, timeout: float = 2.0, sport: int = 0) -> bool:
    """Can a user (or a namespace) open a TCP connection from `src` ("": any), port `sport` (0: any),
    to addr:port?"""
    code = (
        "import socket,sys\n"
        f"s=socket.socket(); s.settimeout({timeout}); s.bind(('{src}',{sport}))\n"
        f"sys.exit(0 if s.connect_ex(('{addr}',{port}))==0 else 1)\n"
    )
    ns = who if isinstance(who, str) else who.ns
    r = nsx(ns, sys.executable, "-c", code, check=False, timeout=timeout + 10)
    return r.returncode == 0


class Listener:
    """A TCP listener in the resource namespace that accepts anything (for reachability probes)."""

    def __init__(self, addr: str, port: int, ns: str = RES_NS) -> None:
        code = (
            "import socket,time\n"
            f"s=socket.create_server(('{addr}',{port})); print('up',flush=True)\n"
            "while True:\n    c,_=s.accept(); c.close()\n"
        )
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@dataclass
class Bed:
    gw: Gateway
    alice: RemoteUser  # eng
    bob: RemoteUser  # sales
    carol: RemoteUser  # contractors: granted nothing, her Child SA is refused
    dave: RemoteUser  # eng, through the coarsely narrowed connection `rw-coarse`
    connector: Connector | None
    base: Path


@contextlib.contextmanager
def zero_trust_bed(base: Path, with_connector: bool = True) -> Iterator[Bed]:
    """The gateway with the policy applied, the connector's uplink up (optional), alice and bob
    connected and carol refused."""
    gw = Gateway(base / "gw")
    alice = RemoteUser("u1", 1, "alice@corp.test", base)
    bob = RemoteUser("u2", 2, "bob@corp.test", base)
    carol = RemoteUser("u3", 3, "carol@corp.test", base)
    dave = RemoteUser("u4", 4, "dave@corp.test", base)
    users = (alice, bob, carol, dave)
    connector = Connector(base / "connector") if with_connector else None
    try:
        build_network(gw)
        for user in users:
            user.create()
        if connector is not None:
            connector.build()
        gw.start_dataplane()
        nsx(gw.ns, "ip", "route", "add", POOL, "dev", "esp0", "src", gw.inner_ip)
        nsx(gw.ns, "ip", "route", "add", EDGE_NET, "dev", "esp0", "src", gw.inner_ip)
        gw.start_policy()
        gw.apply_policy(POLICY_YAML)
        wait_until(
            lambda: gw.compiled("alice") and gw.compiled("bob") and gw.compiled("dave"), timeout=10, what="compiled"
        )
        gw.start_keyexchange()
        gw.load_pool("users", {"addrs": POOL})
        gw.load("rw", gateway_connection())
        gw.load("rw-coarse", gateway_coarse_connection())
        if connector is not None:
            gw.load("edge", gateway_connector_connection())
            connector.start_dataplane()
            nsx(connector.ns, "ip", "route", "add", POOL, "dev", "esp0", "src", connector.inner_ip)
            connector.start_keyexchange()
            connector.load("uplink", connector_uplink())
            connector.kx_stub().Initiate(kx.InitiateRequest(connection="uplink"))
            wait_until(lambda: gw.established("edge") and connector.established("uplink"), timeout=20, what="uplink")
        for user in (alice, bob, dave):
            user.connect()
        carol.connect(check=False)
        wait_until(lambda: len(gw.established("rw")) == 2, timeout=20, what="alice and bob up")
        wait_until(lambda: len(gw.established("rw-coarse")) == 1, timeout=20, what="dave up")
        yield Bed(gw, alice, bob, carol, dave, connector, base)
    finally:
        for user in users:
            user.destroy()
        if connector is not None:
            connector.destroy()
        gw.stop()
        teardown_network(gw)


def decision_lines(path: Path, kind: str) -> list[str]:
    return [
        line for line in path.read_text(errors="replace").splitlines() if "esplanade.decisions" in line and kind in line
    ]


def gateway_record(gw: Gateway, identity: str) -> ChildSaRecord:
    sealer = Sealer(Keyring.parse(gw.kek, "gw kek"))

    async def read() -> ChildSaRecord:
        store = EmbeddedStore(gw.store_path)
        await store.connect()
        try:
            kvs, _ = await store.range(schema.prefix("sas", "child"))
            for kv in kvs:
                rec = ChildSaRecord.from_document(json.loads(kv.value), sealer.bind(kv.key).open)
                if rec.identity == identity:
                    return rec
            raise AssertionError(f"no Child SA of {identity}")
        finally:
            await store.close()

    return asyncio.run(read())


def send_esp(user: RemoteUser, record: ChildSaRecord, datagrams: list[bytes]) -> None:
    encap = record.inbound.encap
    assert encap is not None
    hexes = [d.hex() for d in datagrams]
    code = (
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for h in {hexes!r}: s.sendto(bytes.fromhex(h), ('{record.inbound.dst}', {encap.dst_port}))\n"
    )
    nsx(user.ns, "python3", "-c", code)


def tcp_syn(src: str, dst: str, dport: int) -> bytes:
    tcp = bytearray((40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + b"\x50\x02\xff\xff" + bytes(4))
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + b"\x00\x06" + len(tcp).to_bytes(2, "big")
    tcp[16:18] = checksum(pseudo + bytes(tcp)).to_bytes(2, "big")
    hdr = bytearray(
        b"\x45\x00"
        + (20 + len(tcp)).to_bytes(2, "big")
        + b"\x00\x01\x00\x00\x40\x06\x00\x00"
        + socket.inet_aton(src)
        + socket.inet_aton(dst)
    )
    hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + bytes(tcp)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ike_sa_init(dst: str) -> bytes:
    """A real IKE_SA_INIT request toward `dst` (what a scanner or a misdirected gateway would send)."""
    config = ConnectionConfig.from_dict("probe", {**connector_uplink(), "remote_addrs": [dst]})
    dispatcher = IkeDispatcher([config], now=0.0)
    dispatcher.initiate("probe", 0.0)
    return dispatcher.datagrams_to_send()[0].data


def udp_answered(ns: str, addr: str, port: int, payload: bytes, timeout: float = 1.5) -> bool:
    """Does anything answer a datagram sent from namespace `ns` to addr:port (4500: with the
    non-ESP marker, RFC 3948)? ICMP port-unreachable counts as an answer too."""
    data = (b"\x00\x00\x00\x00" + payload if port == 4500 else payload).hex()
    code = (
        "import socket,sys\n"
        f"s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('{addr}',{port})); s.settimeout({timeout})\n"
        f"s.send(bytes.fromhex('{data}'))\n"
        "try:\n    s.recv(65535)\nexcept socket.timeout:\n    sys.exit(1)\nexcept OSError:\n    sys.exit(0)\n"
        "sys.exit(0)\n"
    )
    return nsx(ns, sys.executable, "-c", code, check=False, timeout=timeout + 10).returncode == 0


def nft_tables(ns: str) -> str:
    return nsx(ns, "nft", "list", "tables", check=False).stdout
