"""Two sites in network namespaces, each with its own dataplane service, keyed by hand over gRPC.

    python -m demo.manual_sites            # builds the sites, pings across, prints the counters

Each site is a gateway namespace of `tests.netns_topology.Topology` (veth underlay
198.18.0.x, protected site 10.80.<i>.0/24) running the real dataplane service
(`esplanade serve dataplane`, userspace backend) on its own embedded store (or etcd), with
its gRPC API on a Unix socket. A manually keyed ESP SA pair and its policies are written
through the Dataplane API (InstallChildSa, InstallPolicy), exactly as keyexchange will do
once IKE negotiates them. Tests and benchmarks reuse `SiteService` and `install_tunnel`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc, ipsec_pb2
from tests.conditions import wait_until
from tests.netns_topology import Node, Topology, stop_process

DEMO_PREFIX = "dps-"


def random_kek() -> str:
    return f"demo:{base64.b64encode(secrets.token_bytes(32)).decode()}"


@dataclass
class SiteService:
    """One dataplane service process inside a test-bed node."""

    node: Node
    workdir: Path
    name: str
    kek: str
    store: str = "embedded"  # or "etcd"
    etcd_endpoint: str = ""
    settings: dict[str, str] = field(default_factory=dict)  # extra ESPLANADE_* variables
    proc: subprocess.Popen[Any] | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / f"{self.name}.grpc.sock"

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESPLANADE_")}
        env.update(
            {
                "ESPLANADE_KEK__VALUE": self.kek,
                "ESPLANADE_ENDPOINTS__DATAPLANE": self.target,
                "ESPLANADE_ENDPOINTS__METRICS_PORT_OFFSET": "0",
                "ESPLANADE_DATAPLANE__NODE": self.name,
                "ESPLANADE_DATAPLANE__BACKEND": "userspace",
                "ESPLANADE_DATAPLANE__WORKERS": "1",
                "ESPLANADE_DATAPLANE__LISTEN_ADDRESSES": f'["{self.node.underlay_addr}"]',
                "ESPLANADE_TELEMETRY__LOG_FORMAT": "text",
                "ESPLANADE_DATAPLANE__FLOW_LOG_PATH": str(self.workdir / f"{self.name}-flows.jsonl"),
            }
        )
        if self.store == "etcd":
            env["ESPLANADE_STORE__BACKEND"] = "etcd"
            env["ESPLANADE_STORE__ETCD_ENDPOINTS"] = f'["{self.etcd_endpoint}"]'
        else:
            env["ESPLANADE_STORE__BACKEND"] = "embedded"
            env["ESPLANADE_STORE__PATH"] = str(self.workdir / f"{self.name}-store.db")
        env.update(self.settings)
        return env

    def start(self, timeout: float = 30.0) -> SiteService:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        log = self.log_path.open("a")
        self.proc = self.node.popen(
            [sys.executable, "-m", "esplanade.cli.main", "serve", "dataplane"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
        )
        wait_until(self.serving, timeout=timeout, what=f"dataplane {self.name} serving ({self.log_path})")
        return self

    def serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"dataplane {self.name} exited with {self.proc.returncode}: {self.log()[-3000:]}")
        if not self.socket_path.exists():
            return False
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @contextlib.contextmanager
    def client(self) -> Iterator[dataplane_pb2_grpc.DataplaneStub]:
        with grpc.insecure_channel(self.target) as channel:
            yield dataplane_pb2_grpc.DataplaneStub(channel)

    def kill(self) -> None:
        """SIGKILL the service, as a crash would (its workers die with it: PR_SET_PDEATHSIG)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, grace=15)
        return self.proc.returncode


# -- manual keying ---------------------------------------------------------------------
@dataclass(frozen=True)
class TunnelKeys:
    """Keys and SPIs of one manually keyed Child SA pair between sites a and b."""

    spi_ab: int
    spi_ba: int
    key_ab: bytes = field(repr=False)
    key_ba: bytes = field(repr=False)
    encr: str = "aes128gcm16"
    integ: str = ""
    integ_key_ab: bytes = field(default=b"", repr=False)
    integ_key_ba: bytes = field(default=b"", repr=False)

    @classmethod
    def generate(cls, encr: str = "aes128gcm16", keymat: int = 20) -> TunnelKeys:
        return cls(
            spi_ab=0x10000000 | secrets.randbits(24),
            spi_ba=0x20000000 | secrets.randbits(24),
            key_ab=secrets.token_bytes(keymat),
            key_ba=secrets.token_bytes(keymat),
            encr=encr,
        )


def _sa(
    spi: int, src: str, dst: str, key: bytes, keys: TunnelKeys, integ_key: bytes, local: str, remote: str, udp: bool
) -> ipsec_pb2.SecurityAssociation:
    sa = ipsec_pb2.SecurityAssociation(
        spi=spi,
        src=src,
        dst=dst,
        encr=keys.encr,
        encr_key=key,
        integ=keys.integ,
        integ_key=integ_key,
        replay_window=1024,
        local_ts=[ipsec_pb2.TrafficSelector(text=local)],
        remote_ts=[ipsec_pb2.TrafficSelector(text=remote)],
    )
    if udp:
        sa.encap.CopyFrom(ipsec_pb2.UdpEncap(src_port=4500, dst_port=4500))
    return sa


def child_sa_for(
    local: Node,
    remote: Node,
    keys: TunnelKeys,
    *,
    local_is_a: bool,
    udp: bool,
    child_id: str,
    networks: tuple[str, str] | None = None,
) -> ipsec_pb2.ChildSa:
    """The Child SA as `local` installs it (inbound = what `remote` sends). `networks`: (local,
    remote) traffic selectors instead of the two site networks."""
    local_net, remote_net = networks or (local.site_net, remote.site_net)
    spi_in, spi_out = (keys.spi_ba, keys.spi_ab) if local_is_a else (keys.spi_ab, keys.spi_ba)
    key_in, key_out = (keys.key_ba, keys.key_ab) if local_is_a else (keys.key_ab, keys.key_ba)
    ik_in, ik_out = (keys.integ_key_ba, keys.integ_key_ab) if local_is_a else (keys.integ_key_ab, keys.integ_key_ba)
    return ipsec_pb2.ChildSa(
        id=child_id,
        connection="manual",
        child="net",
        ike_sa="manual",
        identity=remote.name,
        inbound=_sa(spi_in, remote.underlay_addr, local.underlay_addr, key_in, keys, ik_in, local_net, remote_net, udp),
        outbound=_sa(
            spi_out, local.underlay_addr, remote.underlay_addr, key_out, keys, ik_out, local_net, remote_net, udp
        ),
        created_at=time.time(),
    )


def tunnel_policies(
    local: Node, remote: Node, child_id: str, networks: tuple[str, str] | None = None
) -> list[ipsec_pb2.SpdPolicy]:
    """OUT and IN PROTECT policies; the template's outer addresses as seen in each direction."""
    local_net, remote_net = networks or (local.site_net, remote.site_net)
    return [
        ipsec_pb2.SpdPolicy(
            id=f"{child_id}-{name}",
            direction=direction,
            local_ts=ipsec_pb2.TrafficSelector(text=local_net),
            remote_ts=ipsec_pb2.TrafficSelector(text=remote_net),
            action=ipsec_pb2.POLICY_ACTION_PROTECT,
            priority=1000,
            child_sa=child_id,
            tunnel_src=src,
            tunnel_dst=dst,
        )
        for name, direction, src, dst in (
            ("out", ipsec_pb2.DIRECTION_OUT, local.underlay_addr, remote.underlay_addr),
            ("in", ipsec_pb2.DIRECTION_IN, remote.underlay_addr, local.underlay_addr),
        )
    ]


def install_tunnel(
    a: SiteService,
    b: SiteService,
    keys: TunnelKeys | None = None,
    *,
    udp: bool = True,
    child_id: str = "manual-ab",
    networks: tuple[str, str] | None = None,
) -> TunnelKeys:
    """Install the SA pair and its policies on both sites through the Dataplane gRPC API.
    `networks`: (a's side, b's side) selectors instead of the two site networks."""
    keys = keys or TunnelKeys.generate()
    for site, peer, is_a in ((a, b, True), (b, a, False)):
        nets = None if networks is None else (networks if is_a else (networks[1], networks[0]))
        with site.client() as stub:
            child = child_sa_for(site.node, peer.node, keys, local_is_a=is_a, udp=udp, child_id=child_id, networks=nets)
            stub.InstallChildSa(dataplane_pb2.InstallChildSaRequest(child_sa=child), timeout=20)
            for policy in tunnel_policies(site.node, peer.node, child_id, nets):
                stub.InstallPolicy(dataplane_pb2.InstallPolicyRequest(policy=policy), timeout=20)
    return keys


def counters_text(site: SiteService) -> str:
    with site.client() as stub:
        reply = stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10)
    lines = [f"{site.name}:"]
    for sa in reply.sas:
        direction = "in " if sa.direction == ipsec_pb2.DIRECTION_IN else "out"
        lines.append(f"  {sa.child_sa} {direction} spi {sa.spi:#010x}: {sa.packets} packets, {sa.bytes} bytes")
    drops = ", ".join(f"{d.reason}={d.packets}" for d in reply.drops) or "none"
    lines.append(f"  drops: {drops}")
    return "\n".join(lines)


@contextlib.contextmanager
def manual_sites(
    workdir: Path,
    *,
    udp: bool = True,
    prefix: str = DEMO_PREFIX,
    settings: dict[str, str] | None = None,
    settings_b: dict[str, str] | None = None,
) -> Iterator[tuple[Topology, SiteService, SiteService, TunnelKeys]]:
    """Two sites with a manually keyed tunnel between them, torn down afterwards. `settings`
    (ESPLANADE_* variables) go to both sites, `settings_b` on top of them to site b only."""
    kek = random_kek()
    with Topology(prefix, 2) as topo:
        a, b = topo.nodes
        site_a = SiteService(a, workdir, "site-a", kek, settings=dict(settings or {}))
        site_b = SiteService(b, workdir, "site-b", kek, settings={**(settings or {}), **(settings_b or {})})
        try:
            site_a.start()
            site_b.start()
            keys = install_tunnel(site_a, site_b, udp=udp)
            yield topo, site_a, site_b, keys
        finally:
            site_a.stop()
            site_b.stop()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="esplanade-demo-") as tmp, manual_sites(Path(tmp)) as (topo, sa, sb, _):
        a, b = topo.nodes
        print(f"site a: {a.site_net} behind {a.underlay_addr}; site b: {b.site_net} behind {b.underlay_addr}")
        ping = a.run(["ping", "-n", "-c", "5", "-i", "0.2", "-I", a.site_addr, b.site_addr], timeout=30)
        print(ping.stdout.strip())
        print(counters_text(sa))
        print(counters_text(sb))
        return 0 if ping.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
