"""`make bench` module: the dataplane scaled out over 1, 2 and 3 nodes on one etcd.

Test bed: `tests/scaleout/cluster.py` (dataplane nodes on an underlay bridge, a peer site,
a protected LAN, etcd on its own link; tunnel addresses steered to their owners).

* `tunnels_served.n<k>` / `throughput.n<k>`: six tunnels, iperf3 TCP through all of them at
  once from the peer site to the LAN host, with k = 1, 2, 3 nodes (the nodes join one by one);
  aggregate Mbit/s, and per node (`throughput.n<k>.<node>`: the tunnels it owned throughout
  the run, checked before and after). `tunnels_served` counts the tunnels that carried
  traffic. Tunnels move to a joining node by graceful hand-over, which passes the exact
  replay top, so their flows start at once despite the bulk replay block of 2^16. All of it
  on 2 shared cores, where every node, the single peer site (one worker carrying every
  tunnel), the iperf3 processes and etcd compete: the numbers show that ownership and
  traffic spread, not what separate machines would reach; the sum cannot grow past what
  two cores do for one encrypting and one decrypting side per packet.
* `failover_gap.p50` / `.p99`: 20 times, kill -9 the owner of a tunnel under a 1 kHz echo
  probe, measure the longest silence of its tunnels, restart it and let it rejoin.
* `resync_10k`: one node holding 10,000 Child SAs (written straight into etcd) is killed with
  SIGKILL and restarted; seconds until it carries all of them again (its old owner records
  expire with its old lease first: TTL 2 s). `cold_start_10k`: the same from a first start.

    ESPLANADE_BENCH_SECONDS (default 5)     length of each iperf3 run
    ESPLANADE_BENCH_KILLS (default 20)      failover samples
    ESPLANADE_BENCH_RESYNC_SAS (default 10000)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.records import Figure
from esplanade.cluster.rendezvous import choose
from tests.conditions import wait_until
from tests.netns_topology import stop_process
from tests.scaleout.cluster import LAN_HOST, ScaleCluster, peer_host, vip
from tests.scaleout.probe import EchoProbe

GROUP = "scaleout"
TUNNELS = 6
BULK = {"ESPLANADE_DATAPLANE__REPLAY_BLOCK": str(1 << 16), "ESPLANADE_DATAPLANE__SEQUENCE_BLOCK": str(1 << 20)}


def _figure(name: str, value: float, unit: str, *, higher: bool = True, notes: str = "") -> Figure:
    return Figure(name=name, value=value, unit=unit, higher_is_better=higher, group=GROUP, notes=notes)


# -- throughput over 1, 2, 3 nodes ------------------------------------------------------------
def _iperf_all(cluster: ScaleCluster, seconds: int) -> dict[int, float]:
    """Mbit/s received per tunnel, every tunnel at once."""
    servers = [
        subprocess.Popen(
            ["ip", "netns", "exec", cluster.lan_ns, "iperf3", "-s", "-1", "-B", LAN_HOST, "-p", str(5301 + t)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for t in range(cluster.tunnels)
    ]
    try:
        wait_until(
            lambda: all(
                f"{LAN_HOST}:{5301 + t}"
                in subprocess.run(
                    ["ip", "netns", "exec", cluster.lan_ns, "ss", "-ltnH"], capture_output=True, text=True
                ).stdout
                for t in range(cluster.tunnels)
            ),
            timeout=10,
            what="iperf3 servers",
        )
        clients = [
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    cluster.peer_node.name,
                    "iperf3",
                    "-c",
                    LAN_HOST,
                    "-p",
                    str(5301 + t),
                    "-B",
                    peer_host(t),
                    "-t",
                    str(seconds),
                    "-J",
                    "--connect-timeout",
                    "3000",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for t in range(cluster.tunnels)
        ]
        out: dict[int, float] = {}
        for t, client in enumerate(clients):
            try:
                stdout, _ = client.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                client.kill()
                client.communicate()
                print(f"   iperf3 through tunnel {t} stalled; counted as 0", flush=True)
                stdout = ""
            report: dict[str, Any] = json.loads(stdout or "{}")
            received = report.get("end", {}).get("sum_received", {}).get("bits_per_second", 0.0)
            out[t] = float(received) / 1e6
        return out
    finally:
        for server in servers:
            stop_process(server)


LIMITS = (
    "2 shared cores for all nodes, the peer site (1 worker, every tunnel), 12 iperf3 processes"
    " and etcd: the node count spreads the work, the cores cap the sum"
)


def throughput_by_node_count(workdir: Path, seconds: int) -> list[Figure]:
    figures: list[Figure] = []
    with ScaleCluster(workdir, nodes=3, tunnels=TUNNELS, settings=dict(BULK)) as cluster:
        cluster.start(nodes=1)
        cluster.install_tunnels()
        for count in (1, 2, 3):
            if count > 1:
                cluster.start_node(count - 1)
            expected = {m.name for m in cluster.members[:count]}
            target = {t: str(choose(vip(t), sorted(expected))) for t in range(cluster.tunnels)}
            wait_until(lambda target=target: cluster.owners() == target, timeout=30, what="rebalanced")
            owners = cluster.wait_owned(timeout=30)
            per_tunnel = _iperf_all(cluster, seconds)
            after = cluster.owners()
            if after != owners:  # the figures would be credited to the wrong nodes
                raise RuntimeError(f"owners changed during the iperf3 run: {owners} -> {after}")
            total = sum(per_tunnel.values())
            served = {name: sum(1 for node in owners.values() if node == name) for name in sorted(expected)}
            flowing = [t for t, mbit in per_tunnel.items() if mbit > 0]
            stalled = [t for t, mbit in per_tunnel.items() if mbit <= 0]
            by_tunnel = ", ".join(f"t{t}@{owners[t]} {per_tunnel[t]:.0f}" for t in sorted(per_tunnel))
            notes = f"tunnels per node {served}; Mbit/s per tunnel: {by_tunnel}" + (
                f"; STALLED (0 Mbit/s): {stalled}" if stalled else ""
            )
            print(f"   {count} node(s): {total:.0f} Mbit/s; {by_tunnel}", flush=True)
            figures.append(_figure(f"throughput.n{count}", total, "Mbit/s", notes=f"{LIMITS}; {notes}"))
            figures.append(
                _figure(
                    f"tunnels_served.n{count}",
                    float(len(flowing)),
                    "tunnels",
                    notes=f"tunnels with traffic in the iperf3 run, of {len(owners)} owned",
                )
            )
            for name in sorted(expected):
                mine = [t for t in per_tunnel if owners[t] == name]
                mbit = sum(per_tunnel[t] for t in mine)
                figures.append(
                    _figure(f"throughput.n{count}.{name}", mbit, "Mbit/s", notes=f"{len(mine)} tunnels: {mine}")
                )
    return figures


# -- failover gaps ---------------------------------------------------------------------------
def failover_gaps(workdir: Path, kills: int) -> list[Figure]:
    gaps: list[float] = []
    with ScaleCluster(workdir, nodes=3, tunnels=TUNNELS) as cluster:
        cluster.start()
        cluster.install_tunnels()
        cluster.wait_owned()
        assert cluster.peer is not None
        with EchoProbe(cluster.peer_node.name, cluster.lan_ns, TUNNELS) as probe:
            start = time.monotonic()
            wait_until(lambda: probe.all_flowing(start + 0.3), timeout=20, what="echoes")
            for k in range(kills):
                owners = cluster.wait_owned(timeout=30)
                victim = cluster.member(owners[k % TUNNELS])
                moved = [t for t, node in owners.items() if node == victim.name]
                killed = time.monotonic()
                victim.kill()
                cluster.wait_owned(timeout=30)
                since = time.monotonic() + 0.5
                wait_until(lambda since=since: probe.all_flowing(since), timeout=30, what="traffic resumed")
                end = time.monotonic()
                gaps.extend(probe.max_gap(t, killed, end) for t in moved)
                victim.service.start()
                cluster.wait_owned(timeout=30)
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, round(0.99 * (len(gaps) - 1)))]
    notes = f"{kills} kills, {len(gaps)} tunnel gaps, lease TTL 2 s, replay block 64; max {max(gaps):.3f} s"
    return [
        _figure("failover_gap.p50", statistics.median(gaps), "s", higher=False, notes=notes),
        _figure("failover_gap.p99", p99, "s", higher=False, notes=notes),
    ]


# -- resync of 10,000 SAs --------------------------------------------------------------------
WRITER = r"""
import asyncio, json, sys, time
from esplanade.ipsec.sa import ChildSaRecord, SecurityAssociation, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import ENCR_AES_GCM_16_128, Direction, Mode
from esplanade.store import schema
from esplanade.store.base import Put
from esplanade.store.etcd import EtcdStore
from esplanade.store.sealing import Keyring, Sealer, encode_document

endpoint, kek, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sealer = Sealer(Keyring.parse(kek, "bench kek"))

def sa(direction, spi, n):
    local = f"198.51.{n // 250}.{n % 250 + 1}"
    src, dst = ("203.0.113.1", local) if direction == Direction.IN else (local, "203.0.113.1")
    return SecurityAssociation(spi=spi, direction=direction, src=src, dst=dst, mode=Mode.TUNNEL,
        encr=ENCR_AES_GCM_16_128, encr_key=bytes(20), encap=UdpEncap(),
        replay_window=64 if direction == Direction.IN else 0,
        local_ts=(TrafficSelector.from_network(f"10.{n // 250}.{n % 250}.0/24"),),
        remote_ts=(TrafficSelector.from_network("172.31.0.0/16"),))

async def main():
    store = EtcdStore([endpoint])
    await store.connect()
    ops = []
    for n in range(count):
        rec = ChildSaRecord(f"bulk-{n}", "bulk", "net", "bulk", "peer", sa(Direction.IN, 0x100000 + n, n),
                            sa(Direction.OUT, 0x200000 + n, n), time.time())
        key = schema.child_sa(rec.id)
        ops.append(Put(key, encode_document(rec.to_document(sealer.bind(key).seal))))
    for i in range(0, len(ops), 100):
        await store.commit([], ops[i:i + 100])
    await store.close()

asyncio.run(main())
"""


def resync(workdir: Path, count: int) -> list[Figure]:
    settings = {
        "ESPLANADE_DATAPLANE__STEERING_INTERFACE": "",
        "ESPLANADE_DATAPLANE__STEERING_INNER": "{}",
        "ESPLANADE_DATAPLANE__SEQUENCE_BLOCK": str(1 << 20),
        "ESPLANADE_DATAPLANE__REPLAY_BLOCK": str(1 << 16),
    }
    with ScaleCluster(workdir, nodes=1, tunnels=0, settings=settings) as cluster:
        cluster.start(nodes=0)
        assert cluster.etcd is not None
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                cluster.etcd_ns,
                sys.executable,
                "-c",
                WRITER,
                cluster.etcd.endpoint,
                cluster.kek,
                str(count),
            ],
            check=True,
            timeout=600,
        )
        node = cluster.members[0]

        def carried() -> bool:
            return node.alive() and node.status().get("owned_sas") == str(count)

        started = time.monotonic()
        node.service.start(timeout=120)
        wait_until(carried, timeout=900, interval=0.5, what=f"{count} SAs carried")
        cold = time.monotonic() - started
        node.kill()
        started = time.monotonic()
        node.service.start(timeout=120)
        wait_until(carried, timeout=900, interval=0.5, what=f"{count} SAs carried again")
        warm = time.monotonic() - started
    notes = f"{count} Child SAs, one node, userspace backend (1 worker), etcd; includes the 2 s lease expiry"
    return [
        _figure(f"cold_start_{count // 1000}k", cold, "s", higher=False, notes=notes),
        _figure(f"resync_{count // 1000}k", warm, "s", higher=False, notes=notes),
    ]


def run() -> list[Figure]:
    seconds = int(os.environ.get("ESPLANADE_BENCH_SECONDS", "5"))
    kills = int(os.environ.get("ESPLANADE_BENCH_KILLS", "20"))
    count = int(os.environ.get("ESPLANADE_BENCH_RESYNC_SAS", "10000"))
    parts = os.environ.get("ESPLANADE_BENCH_SCALEOUT_PARTS", "throughput,failover,resync").split(",")
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="scl-bench-") as tmp:
        base = Path(tmp)
        if "throughput" in parts:
            figures += throughput_by_node_count(base / "throughput", seconds)
        if "failover" in parts:
            figures += failover_gaps(base / "failover", kills)
        if "resync" in parts:
            figures += resync(base / "resync", count)
    return figures
