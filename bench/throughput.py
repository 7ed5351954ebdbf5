"""Throughput, small-packet rate and added latency: bare veth vs Esplanade's userspace datapath vs strongSwan.

    python -m bench.throughput [--seconds 5] [--only bare,esplanade-aes128gcm16,...] [--output FILE]
                               [--workers 1] [--parallel 1] [--realtime PRIO]

Every scenario gets a fresh two-namespace test bed (tests/netns_topology.py: veth underlay,
site address on lo) and measures, in one run, side by side:

* `tcp_throughput`   iperf3 TCP, site to site (bare: underlay to underlay), Mbit/s received
* `udp64_rate`       iperf3 UDP with 64-byte payloads at unlimited rate, packets/s received
* `rtt_added`        ping RTT through the tunnel minus the bare-veth RTT, µs
* `cpu_per_packet`   datapath CPU per inner packet during the TCP run, µs (sender and receiver)

Scenarios: `bare` (no tunnel), `esplanade-passthrough` (pass-through transform: the rooms'
own cost, no crypto), `esplanade-aes128gcm16` / `esplanade-aes256gcm16` / `esplanade-chacha20poly1305`
(the real dataplane service on each node, userspace backend with the ESP engine, an SA pair
keyed by hand through its gRPC API: `demo/manual_sites.py`), `strongswan-aes128gcm16` /
`strongswan-aes256gcm16` / `strongswan-chacha20poly1305` (charon 5.9.8 + kernel-libipsec,
keyed by IKEv2 itself). Both Esplanade and strongSwan use ESP-in-UDP on 4500.
Output: a JSON list of records on stdout (and in --output)::

    {"name", "value", "unit", "peer", "peer_value", "ratio", "better"}

`ratio` is value / peer_value; `better` says whether higher or lower wins. Esplanade records
name the strongSwan scenario with the same transform as their peer (passthrough: aes128gcm16);
strongSwan records name bare veth. This is a 2-core machine shared with other work: read the
numbers with the load average printed on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.strongswan_pair import StrongSwanPair
from demo.manual_sites import SiteService, TunnelKeys, install_tunnel, random_kek
from esplanade.v1 import dataplane_pb2, ipsec_pb2
from tests.conditions import wait_until
from tests.dataplane.userspace.datapath_process import DatapathProcess, passthrough_pair_routes
from tests.netns_topology import Node, Topology, stop_process

PREFIX = "dpth-"
REPO = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "bare",
    "esplanade-passthrough",
    "esplanade-aes128gcm16",
    "esplanade-aes256gcm16",
    "esplanade-chacha20poly1305",
    "esplanade-python-aes128gcm16",
    "esplanade-python-aes256gcm16",
    "esplanade-python-chacha20poly1305",
    "strongswan-aes128gcm16",
    "strongswan-aes256gcm16",
    "strongswan-chacha20poly1305",
)
KEYMAT_BYTES = {"aes128gcm16": 20, "aes256gcm16": 36, "chacha20poly1305": 36}
CLK_TCK = os.sysconf("SC_CLK_TCK")
STRONGSWAN = "strongswan-5.9.8-libipsec"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    scenario: str
    tcp_mbps: float = 0.0
    tcp_retransmits: int = 0
    udp64_pps: float = 0.0
    rtt_us: float = 0.0
    cpu_us_per_packet_sender: float | None = None
    cpu_us_per_packet_receiver: float | None = None
    notes: list[str] = field(default_factory=list)


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _iperf_server(node: Node, address: str) -> None:
    node.popen(["iperf3", "-s", "-B", address])
    wait_until(lambda: f"{address}:5201" in node.run(["ss", "-ltnH"]).stdout, timeout=10, what="iperf3 server")


def _iperf(client: Node, target: str, source: str, seconds: int, *args: str) -> dict[str, Any]:
    result = client.run(["iperf3", "-c", target, "-B", source, "-t", str(seconds), "-J", *args], timeout=seconds + 30)
    report: dict[str, Any] = json.loads(result.stdout or "{}")
    if "error" in report or "end" not in report:
        raise RuntimeError(f"iperf3 failed: {report.get('error', result.stderr[-500:])}")
    return report


def _ping_rtt_us(client: Node, source: str, target: str) -> float:
    out = client.run(["ping", "-n", "-q", "-c", "50", "-i", "0.02", "-I", source, target], timeout=30).stdout
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not match:
        raise RuntimeError(f"ping failed: {out[-300:]}")
    return float(match.group(1)) * 1000


def measure(
    result: Result,
    a: Node,
    b: Node,
    source: str,
    target: str,
    seconds: int,
    parallel: int,
    cpu_pids: tuple[list[int], list[int]] | None = None,
    packet_counters: Any = None,
) -> None:
    _iperf_server(b, target)
    result.rtt_us = _ping_rtt_us(a, source, target)
    ticks0 = (_cpu_ticks(cpu_pids[0]), _cpu_ticks(cpu_pids[1])) if cpu_pids else (0, 0)
    packets0 = packet_counters() if packet_counters else None
    tcp = _iperf(a, target, source, seconds, "-P", str(parallel))
    ticks1 = (_cpu_ticks(cpu_pids[0]), _cpu_ticks(cpu_pids[1])) if cpu_pids else (0, 0)
    packets1 = packet_counters() if packet_counters else None
    end = tcp["end"]
    result.tcp_mbps = end["sum_received"]["bits_per_second"] / 1e6
    result.tcp_retransmits = int(end["sum_sent"].get("retransmits", 0))
    if packets0 is not None and packets1 is not None:
        sent, received = packets1[0] - packets0[0], packets1[1] - packets0[1]
        if sent > 0:
            result.cpu_us_per_packet_sender = (ticks1[0] - ticks0[0]) / CLK_TCK / sent * 1e6
        if received > 0:
            result.cpu_us_per_packet_receiver = (ticks1[1] - ticks0[1]) / CLK_TCK / received * 1e6
    udp = _iperf(a, target, source, seconds, "-u", "-l", "64", "-b", "0")
    udp_sum = udp["end"]["sum"]
    result.udp64_pps = (udp_sum["packets"] - udp_sum.get("lost_packets", 0)) / max(udp_sum["seconds"], 1e-9)
    result.notes.append(f"load average after: {os.getloadavg()[0]:.2f}")
    log(
        f"{result.scenario} (load {os.getloadavg()[0]:.2f}): "
        f"TCP {result.tcp_mbps:.0f} Mbit/s ({result.tcp_retransmits} retr), "
        f"UDP64 {result.udp64_pps:.0f} pps, RTT {result.rtt_us:.0f} µs, "
        f"CPU/pkt {result.cpu_us_per_packet_sender} / {result.cpu_us_per_packet_receiver} µs"
    )


def measure_tcp_pairs(
    result: Result,
    a: Node,
    b: Node,
    pairs: list[tuple[str, str]],
    seconds: int,
    parallel: int,
    cpu_pids: tuple[list[int], list[int]],
    packet_counters: Any,
) -> None:
    """TCP only, one iperf3 client per (source, target) pair at once (one Child SA each): the sum."""
    for _, target in pairs:
        _iperf_server(b, target)
    ticks0 = (_cpu_ticks(cpu_pids[0]), _cpu_ticks(cpu_pids[1]))
    packets0 = packet_counters()
    clients = [
        a.popen(
            ["iperf3", "-c", target, "-B", source, "-t", str(seconds), "-J", "-P", str(parallel)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for source, target in pairs
    ]
    reports = [json.loads(c.communicate(timeout=seconds + 30)[0] or "{}") for c in clients]
    ticks1 = (_cpu_ticks(cpu_pids[0]), _cpu_ticks(cpu_pids[1]))
    packets1 = packet_counters()
    for report in reports:
        if "error" in report or "end" not in report:
            raise RuntimeError(f"iperf3 failed: {report.get('error', report)}")
    result.tcp_mbps = sum(r["end"]["sum_received"]["bits_per_second"] for r in reports) / 1e6
    result.tcp_retransmits = sum(int(r["end"]["sum_sent"].get("retransmits", 0)) for r in reports)
    sent, received = packets1[0] - packets0[0], packets1[1] - packets0[1]
    if sent > 0:
        result.cpu_us_per_packet_sender = (ticks1[0] - ticks0[0]) / CLK_TCK / sent * 1e6
    if received > 0:
        result.cpu_us_per_packet_receiver = (ticks1[1] - ticks0[1]) / CLK_TCK / received * 1e6
    log(
        f"{result.scenario} ({len(pairs)} SAs, load {os.getloadavg()[0]:.2f}): TCP {result.tcp_mbps:.0f} Mbit/s "
        f"({result.tcp_retransmits} retr), CPU/pkt {result.cpu_us_per_packet_sender} / "
        f"{result.cpu_us_per_packet_receiver} µs"
    )


def run_bare(seconds: int, parallel: int) -> Result:
    result = Result("bare")
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        measure(result, a, b, a.underlay_addr, b.underlay_addr, seconds, parallel)
    return result


def run_passthrough(
    scenario: str, seconds: int, parallel: int, workers: int, workdir: Path, realtime: int = 0
) -> Result:
    """The I/O rooms with the diagnostic pass-through transform: what the rooms cost without crypto."""
    result = Result(scenario)
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        routes_a, routes_b = passthrough_pair_routes(a, b)
        settings = {"tun_name": "esp0", "workers": workers, "realtime_priority": realtime}
        pa = DatapathProcess(
            a, workdir, {**settings, "routes": [b.site_net], "route_source_v4": a.site_addr}, routes=routes_a
        )
        pb = DatapathProcess(
            b, workdir, {**settings, "routes": [a.site_net], "route_source_v4": b.site_addr}, routes=routes_b
        )
        try:
            pa.start()
            pb.start()
            assert pa.proc is not None and pb.proc is not None
            pids = (_children(pa.proc.pid), _children(pb.proc.pid))

            def packets() -> tuple[int, int]:
                sa, sb = pa.fresh_status(), pb.fresh_status()
                out = sum(w["loop"]["packets_out"] for w in sa["worker_status"])
                received = sum(w["loop"]["datagrams_in"] for w in sb["worker_status"])
                return out, received

            measure(result, a, b, a.site_addr, b.site_addr, seconds, parallel, pids, packets)
        finally:
            pa.stop()
            pb.stop()
    return result


def run_esplanade(
    scenario: str, seconds: int, parallel: int, workers: int, workdir: Path, realtime: int = 0, sas: int = 1
) -> Result:
    """The real dataplane service on both nodes, manually keyed SA pairs installed over gRPC: one,
    or with `sas` > 1 one per address pair 10.80.1.k <-> 10.80.2.k (inbound SPIs alternating odd
    and even, so with two workers each worker owns half of them), one iperf3 client each."""
    result = Result(scenario)
    encr = transform_of(scenario)
    hot_path = "python" if scenario.startswith("esplanade-python-") else "compiled"
    kek = random_kek()
    settings = {
        "ESPLANADE_DATAPLANE__HOT_PATH": hot_path,
        "ESPLANADE_DATAPLANE__WORKERS": str(workers),
        "ESPLANADE_DATAPLANE__REALTIME_PRIORITY": str(realtime),
        "ESPLANADE_TELEMETRY__LOG_LEVEL": "warning",
    }
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        site_a = SiteService(a, workdir, f"{scenario}-a", kek, settings=settings)
        site_b = SiteService(b, workdir, f"{scenario}-b", kek, settings=settings)
        try:
            site_a.start()
            site_b.start()
            pairs = [(a.site_addr, b.site_addr)]
            all_keys = [TunnelKeys.generate(encr, KEYMAT_BYTES[encr])]
            if sas == 1:
                install_tunnel(site_a, site_b, all_keys[0])
            else:
                pairs = [
                    (a.site_addr.rsplit(".", 1)[0] + f".{k + 1}", b.site_addr.rsplit(".", 1)[0] + f".{k + 1}")
                    for k in range(sas)
                ]
                all_keys = []
                for k, (source, target) in enumerate(pairs):
                    if k:
                        a.run(["ip", "addr", "add", f"{source}/32", "dev", "lo"], check=True)
                        b.run(["ip", "addr", "add", f"{target}/32", "dev", "lo"], check=True)
                    generated = TunnelKeys.generate(encr, KEYMAT_BYTES[encr])
                    keys = dataclasses.replace(
                        generated, spi_ab=generated.spi_ab & ~1 | k % 2, spi_ba=generated.spi_ba & ~1 | k % 2
                    )
                    install_tunnel(
                        site_a, site_b, keys, child_id=f"manual-ab-{k}", networks=(f"{source}/32", f"{target}/32")
                    )
                    all_keys.append(keys)
            assert site_a.proc is not None and site_b.proc is not None
            pids = (_children(site_a.proc.pid), _children(site_b.proc.pid))

            def sa_packets(site: SiteService, spis: set[int], direction: int) -> int:
                with site.client() as stub:
                    reply = stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10)
                return sum(c.packets for c in reply.sas if c.spi in spis and c.direction == direction)

            def packets() -> tuple[int, int]:
                spis = {k.spi_ab for k in all_keys}
                return (
                    sa_packets(site_a, spis, ipsec_pb2.DIRECTION_OUT),
                    sa_packets(site_b, spis, ipsec_pb2.DIRECTION_IN),
                )

            if sas == 1:
                measure(result, a, b, a.site_addr, b.site_addr, seconds, parallel, pids, packets)
            else:
                measure_tcp_pairs(result, a, b, pairs, seconds, parallel, pids, packets)
            with site_a.client() as stub:
                details = stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10).details
            result.notes.append(f"offloads used: {details.get('offloads', '')}")
            result.notes.append(f"hot path: {details.get('hot_path', '')} ({details.get('hot_path_reason', '')})")
            for site in (site_a, site_b):
                with site.client() as stub:
                    workers_seen = json.loads(
                        stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10).details.get("worker_status", "[]")
                    )
                for w in workers_seen:
                    loop = w.get("loop") or {}
                    result.notes.append(
                        f"{site.name} worker {w.get('worker')}: "
                        + ", ".join(
                            f"{k} {loop.get(k)}"
                            for k in ("packets_out", "datagrams_in", "handed_off_out", "handed_off_in", "wakeups")
                        )
                    )
            log(f"{scenario}: " + "; ".join(result.notes))
        finally:
            site_a.stop()
            site_b.stop()
    return result


def run_strongswan(scenario: str, seconds: int, parallel: int, workdir: Path, realtime: int = 0) -> Result:
    result = Result(scenario)
    proposal = scenario.split("-", 1)[1]
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        pair = StrongSwanPair(a, b, workdir, proposal)
        pair.start()
        pids = ([pair.charon_pids[a.name]], [pair.charon_pids[b.name]])
        if realtime:
            for pid in pids[0] + pids[1]:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(realtime))

        def packets() -> tuple[int, int]:
            def grab(node: Node, key: str) -> int:
                return sum(int(v) for v in re.findall(rf"{key}=(\d+)", pair.counters(node)))

            return grab(a, "packets-out"), grab(b, "packets-in")

        measure(result, a, b, a.site_addr, b.site_addr, seconds, parallel, pids, packets)
        for node in (a, b):
            for proc in node.processes:
                stop_process(proc)
    return result


def transform_of(scenario: str) -> str:
    """esplanade-aes128gcm16, esplanade-python-aes128gcm16, strongswan-aes128gcm16 -> aes128gcm16"""
    return scenario.rsplit("-", 1)[1]


def records(results: dict[str, Result]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    bare = results.get("bare")

    def rtt_added(r: Result) -> float:
        return r.rtt_us - (bare.rtt_us if bare else 0.0)

    def add(name: str, value: float | None, unit: str, better: str, peer: str | None, peer_value: float | None) -> None:
        if value is None:
            return
        ratio = value / peer_value if peer_value else None
        out.append(
            {
                "name": name,
                "value": round(value, 3),
                "unit": unit,
                "peer": peer,
                "peer_value": round(peer_value, 3) if peer_value is not None else None,
                "ratio": round(ratio, 3) if ratio is not None else None,
                "better": better,
            }
        )

    for scenario, r in results.items():
        if scenario == "bare":
            add("tcp_throughput.bare-veth", r.tcp_mbps, "Mbit/s", "higher", None, None)
            add("udp64_rate.bare-veth", r.udp64_pps, "packets/s", "higher", None, None)
            add("rtt.bare-veth", r.rtt_us, "µs", "lower", None, None)
            continue
        if scenario.startswith("strongswan"):
            peer_name, peer = "bare-veth", bare
        else:
            transform = "aes128gcm16" if scenario.endswith("passthrough") else transform_of(scenario)
            peer_name = f"strongswan-{transform}"
            peer = results.get(peer_name)
        label = scenario if not scenario.startswith("strongswan") else f"{STRONGSWAN}-{scenario.split('-', 1)[1]}"
        add(f"tcp_throughput.{label}", r.tcp_mbps, "Mbit/s", "higher", peer_name, peer.tcp_mbps if peer else None)
        if bare and peer is not bare:
            add(f"tcp_share_of_bare.{label}", r.tcp_mbps, "Mbit/s", "higher", "bare-veth", bare.tcp_mbps)
        add(f"udp64_rate.{label}", r.udp64_pps, "packets/s", "higher", peer_name, peer.udp64_pps if peer else None)
        if bare:
            peer_rtt = rtt_added(peer) if peer and peer is not bare else None
            add(f"rtt_added.{label}", rtt_added(r), "µs", "lower", peer_name if peer_rtt else None, peer_rtt)
        for side in ("sender", "receiver"):
            value = getattr(r, f"cpu_us_per_packet_{side}")
            peer_value = getattr(peer, f"cpu_us_per_packet_{side}") if peer and peer is not bare else None
            add(f"cpu_per_packet_{side}.{label}", value, "µs", "lower", peer_name if peer_value else None, peer_value)
    return out


def run_scenarios(
    wanted: list[str], seconds: int, parallel: int = 1, workers: int = 1, realtime: int = 0, sas: int = 1
) -> dict[str, Result]:
    """Measure each scenario in turn on a fresh test bed; a scenario that fails is logged and left out."""
    log(f"kernel {os.uname().release}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="esplanade-bench-") as tmp:
        for scenario in wanted:
            log(f"scenario {scenario}")
            try:
                if scenario == "bare":
                    results[scenario] = run_bare(seconds, parallel)
                elif scenario == "esplanade-passthrough":
                    results[scenario] = run_passthrough(scenario, seconds, parallel, workers, Path(tmp), realtime)
                elif scenario.startswith("esplanade"):
                    results[scenario] = run_esplanade(scenario, seconds, parallel, workers, Path(tmp), realtime, sas)
                else:
                    results[scenario] = run_strongswan(scenario, seconds, parallel, Path(tmp), realtime)
            except Exception as exc:  # one broken scenario must not hide the others
                log(f"scenario {scenario} failed: {exc!r}")
    log(f"load after: {os.getloadavg()}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="TCP streams per iperf3 client")
    parser.add_argument(
        "--sas", type=int, default=1, help="Esplanade only: Child SAs, one iperf3 client each (TCP throughput only)"
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--realtime",
        type=int,
        default=0,
        help="SCHED_FIFO priority for the datapath workers and for every charon thread (0: off)",
    )
    args = parser.parse_args(argv)
    wanted = [s for s in args.only.split(",") if s]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    results = run_scenarios(wanted, args.seconds, args.parallel, args.workers, args.realtime, args.sas)
    output = records(results)
    text = json.dumps(output, indent=1, ensure_ascii=False)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return 0 if len(results) == len(wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
