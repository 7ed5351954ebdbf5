"""Acceptance: the userspace datapath with the pass-through transform, between real namespaces.

Two gateway namespaces on a veth underlay, a TUN and an outer socket each, real ping and
iperf3 between the protected site addresses. What each test shows is in its name.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conditions import wait_until
from tests.dataplane.userspace.datapath_process import DatapathProcess, passthrough_pair_routes, worker_totals
from tests.netns_topology import Node, Topology

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = "dpth-"
IPERF_SECONDS = "2"


def _settings(local: Node, remote: Node, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "tun_name": "esp0",
        "routes": [remote.site_net, remote.site_net6],
        "route_source_v4": local.site_addr,
        "route_source_v6": local.site_addr6,
    }
    settings.update(overrides)
    return settings


@contextlib.contextmanager
def datapath_pair(
    tmp: Path, site_hosts: bool = False, **overrides: Any
) -> Iterator[tuple[Topology, DatapathProcess, DatapathProcess]]:
    raw = overrides.get("outer") == "raw"
    with Topology(PREFIX, 2, site_hosts=site_hosts) as topo:
        a, b = topo.nodes
        routes_a, routes_b = passthrough_pair_routes(a, b, port=0 if raw else 4500, v6=True)
        pa = DatapathProcess(a, tmp, _settings(a, b, **overrides), routes=routes_a)
        pb = DatapathProcess(b, tmp, _settings(b, a, **overrides), routes=routes_b)
        try:
            pa.start()
            pb.start()
            yield topo, pa, pb
        finally:
            codes = (pa.stop(), pb.stop())
            assert codes in ((0, 0), (None, None)), (
                f"datapaths exited with {codes}: {pa.log()[-2000:]} {pb.log()[-2000:]}"
            )


def _ping(node: Node, source: str, target: str, *args: str, host: bool = False, count: int = 3) -> str:
    result = node.run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", "-I", source, *args, target], host=host)
    return result.stdout + result.stderr


def _received(ping_output: str) -> int:
    match = re.search(r"(\d+) received", ping_output)
    return int(match.group(1)) if match else 0


def _iperf3(client: Node, server: Node, target: str, source: str, *args: str, host: bool = False) -> dict[str, Any]:
    server.popen(["iperf3", "-s", "-B", target], host=host)
    wait_until(
        lambda: f"{target}:5201" in server.run(["ss", "-ltnH"], host=host).stdout,
        timeout=10,
        what="iperf3 listening",
    )
    result = client.run(["iperf3", "-c", target, "-B", source, "-t", IPERF_SECONDS, "-J", *args], host=host, timeout=60)
    report: dict[str, Any] = json.loads(result.stdout)
    assert "error" not in report, report.get("error")
    return report


def _assert_traffic(topo: Topology) -> dict[str, Any]:
    a, b = topo.nodes
    out = _ping(a, a.site_addr, b.site_addr)
    assert _received(out) == 3, out
    report = _iperf3(a, b, b.site_addr, a.site_addr)
    received = report["end"]["sum_received"]["bytes"]
    assert received > 1_000_000, f"iperf3 moved only {received} bytes"
    return report


def test_ping_and_tcp_through_esp_in_udp_with_offloads(tmp_path: Path) -> None:
    with datapath_pair(tmp_path) as (topo, pa, pb):
        _assert_traffic(topo)
        a, b = topo.nodes
        out = _ping(a, a.site_addr6, b.site_addr6)
        assert _received(out) == 3, out
        status_a, status_b = pa.fresh_status(), pb.fresh_status()
        used = status_a["offloads_used"]
        assert used["vnet_hdr"] and used["udp_gso"] and used["udp_gro"] and used["merge_tcp"]
        assert status_a["sizes"] == {"esp_overhead": 8, "path_mtu": 1500, "inner_mtu": 1464, "tun_mtu": 1464}
        totals_b = worker_totals(status_b)
        assert totals_b["packets_in"] > 1000
        assert totals_b["tun_frames_written"] < totals_b["packets_in"] / 4, "TCP segments were merged for the TUN"
        outer_a = status_a["worker_status"][0]["outer"]
        assert outer_a["kind"] == "udp" and outer_a["counters"].get("gso_sends", 0) > 0


def test_ping_and_tcp_through_plain_esp_raw_socket(tmp_path: Path) -> None:
    with datapath_pair(tmp_path, outer="raw") as (topo, pa, _pb):
        _assert_traffic(topo)
        status = pa.fresh_status()
        assert status["outer"] == "raw"
        assert status["sizes"]["inner_mtu"] == 1500 - 20 - 8
        assert worker_totals(status)["datagrams_out"] > 1000


def test_fallback_without_any_offload(tmp_path: Path) -> None:
    with datapath_pair(tmp_path, offloads=False) as (topo, pa, pb):
        _assert_traffic(topo)
        used = pa.fresh_status()["offloads_used"]
        assert not (used["vnet_hdr"] or used["udp_gso"] or used["udp_gro"] or used["merge_tcp"])
        assert "offloads disabled by configuration" in used["reasons"]
        totals_b = worker_totals(pb.fresh_status())
        assert totals_b["tun_frames_written"] == totals_b["packets_in"]


def test_tun_tso_reference_path(tmp_path: Path) -> None:
    with datapath_pair(tmp_path, tun_offload_mode="tso") as (topo, pa, _pb):
        _assert_traffic(topo)
        status = pa.fresh_status()
        assert status["offloads_used"]["tun_offload"] != "0"
        assert worker_totals(status)["super_frames_split"] > 0, "the kernel handed over super-packets"


def test_offload_detection_is_reported(tmp_path: Path) -> None:
    with datapath_pair(tmp_path) as (_topo, pa, _pb):
        detected = pa.fresh_status()["offloads_detected"]
        for key in ("tun_vnet_hdr", "tun_multi_queue", "tun_csum", "tun_tso", "udp_gso", "udp_gro", "reuseport_cbpf"):
            assert detected[key] is True, key
        assert "tun_uso" in detected and detected["kernel"]


def test_too_big_packets_get_icmp_back_and_syns_are_clamped(tmp_path: Path) -> None:
    """TUN MTU 1500 above the tunnel's 1464: the datapath itself enforces RFC 4301 §8 and clamps MSS."""
    with datapath_pair(tmp_path, site_hosts=True, tun_mtu=1500) as (topo, pa, pb):
        a, b = topo.nodes
        assert a.host_addr and b.host_addr and a.host_addr6 and b.host_addr6
        assert _received(_ping(a, a.host_addr, b.host_addr, host=True)) == 3
        # first, before any host learns a path MTU: a SYN from a host on a 1500-byte LAN
        # announces MSS 1460; the peer's site must see 1424
        capture = b.popen(
            ["tcpdump", "-i", "lan0", "-nn", "-v", "-c", "1", "-l", "tcp[tcpflags] & tcp-syn != 0 and dst port 5201"],
            stdout=(tmp_path / "syn.txt").open("w"),
            stderr=(tmp_path / "syn.err").open("w"),
        )
        wait_until(lambda: "listening on" in (tmp_path / "syn.err").read_text(), timeout=10, what="tcpdump ready")
        _iperf3(a, b, b.host_addr, a.host_addr, host=True)
        capture.wait(timeout=10)
        syn = (tmp_path / "syn.txt").read_text()
        assert "mss 1424" in syn, syn
        assert pa.fresh_status()["worker_status"][0]["mss_clamped"] >= 1, "A clamped the SYN"
        assert pb.fresh_status()["worker_status"][0]["mss_clamped"] >= 1, "B clamped the SYN-ACK"
        # IPv4, DF clear (first, before the host learns the path MTU): fragmented before encapsulation, answered
        out = _ping(a, a.host_addr, b.host_addr, "-M", "dont", "-s", "1472", host=True, count=3)
        assert _received(out) >= 1, out
        # IPv4, DF set, 1500 bytes: ICMP "fragmentation needed" with the inner MTU comes back
        out = _ping(a, a.host_addr, b.host_addr, "-M", "do", "-s", "1472", host=True, count=2)
        assert "mtu = 1464" in out, out
        # IPv6: "packet too big" with the inner MTU
        out = _ping(a, a.host_addr6, b.host_addr6, "-M", "do", "-s", "1452", host=True, count=2)
        assert "mtu=1464" in out.replace(" ", "").lower() or "packettoobig" in out.replace(" ", "").lower(), out
        mtu_counters = pa.fresh_status()["worker_status"][0]["mtu"]
        assert mtu_counters["too_big_df"] >= 1 and mtu_counters["fragmented"] >= 1 and mtu_counters["too_big_v6"] >= 1


def test_each_sa_stays_on_its_owner_worker(tmp_path: Path) -> None:
    """Two workers per node, two SAs whose inbound SPIs differ in parity: each SA's packets meet one worker only."""
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        second_b = "10.80.2.129"
        b.run(["ip", "addr", "add", f"{second_b}/32", "dev", "lo"], check=True)
        low, high = "10.80.2.0/25", "10.80.2.128/25"
        # (network on b, SPI a->b = b's inbound, SPI b->a = a's inbound)
        sas = [(low, 0x3000, 0x4000), (high, 0x3001, 0x4001)]
        routes_a = [
            {"network": n, "endpoint": [b.underlay_addr, 4500], "spi_out": ab, "spi_in": ba} for n, ab, ba in sas
        ]
        # b routes by destination too: a's site is split the same way, one half per SA
        routes_b = [
            {"network": "10.80.1.0/25", "endpoint": [a.underlay_addr, 4500], "spi_out": 0x4000, "spi_in": 0x3000},
            {"network": "10.80.1.128/25", "endpoint": [a.underlay_addr, 4500], "spi_out": 0x4001, "spi_in": 0x3001},
        ]
        second_a = "10.80.1.129"
        a.run(["ip", "addr", "add", f"{second_a}/32", "dev", "lo"], check=True)
        pa = DatapathProcess(a, tmp_path, _settings(a, b, workers=2, routes=[b.site_net]), routes=routes_a).start()
        pb = DatapathProcess(b, tmp_path, _settings(b, a, workers=2, routes=[a.site_net]), routes=routes_b).start()
        try:
            assert _received(_ping(a, a.site_addr, b.site_addr)) == 3
            assert _received(_ping(a, second_a, second_b)) == 3
            _iperf3(a, b, b.site_addr, a.site_addr, "-P", "4")
            _iperf3(a, b, second_b, second_a, "-P", "4")
            for proc, name in ((pa, "a"), (pb, "b")):
                workers = proc.fresh_status()["worker_status"]
                assert len(workers) == 2
                owners: dict[str, set[int]] = {}
                for worker in workers:
                    transform = worker["transform"]
                    for spi in list(transform["packets_out"]) + list(transform["packets_in"]):
                        owners.setdefault(spi, set()).add(worker["worker"])
                assert len(owners) == 4, (name, owners)
                for spi, seen_by in owners.items():
                    assert len(seen_by) == 1, f"{name}: SPI {int(spi):#x} handled by workers {seen_by}"
                # the owner is the Child SA's inbound SPI mod 2: 0x?000 -> 0, 0x?001 -> 1
                for spi, seen_by in owners.items():
                    assert seen_by == {int(spi) % 2}, (name, hex(int(spi)), seen_by)
                assert all(w["loop"]["packets_out"] > 0 for w in workers), "both workers carried traffic"
        finally:
            assert (pa.stop(), pb.stop()) == (0, 0)


@pytest.mark.parametrize(("outer", "workers"), [("udp", 1), ("raw", 2)])
def test_ipv6_outer_network(tmp_path: Path, outer: str, workers: int) -> None:
    """ESP over an IPv6 underlay, inner IPv4: ESP-in-UDP on a dual-stack socket, and plain ESP with SPI filters."""
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        port = 0 if outer == "raw" else 4500
        route_a = {"network": b.site_net, "endpoint": [b.underlay_addr6, port], "spi_out": 0x1001, "spi_in": 0x2002}
        route_b = {"network": a.site_net, "endpoint": [a.underlay_addr6, port], "spi_out": 0x2002, "spi_in": 0x1001}
        common = {"outer": outer, "workers": workers, "bind_address": "::"}
        pa = DatapathProcess(a, tmp_path, _settings(a, b, routes=[b.site_net], **common), routes=[route_a])
        pb = DatapathProcess(b, tmp_path, _settings(b, a, routes=[a.site_net], **common), routes=[route_b])
        try:
            pa.start()
            pb.start()
            _assert_traffic(topo)
            status = pa.fresh_status()
            overhead = 40 + (8 if outer == "udp" else 0) + 8
            assert status["sizes"]["inner_mtu"] == 1500 - overhead
        finally:
            assert (pa.stop(), pb.stop()) == (0, 0)


def test_deleting_the_tun_stops_the_datapath_instead_of_spinning(tmp_path: Path) -> None:
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        routes_a, _ = passthrough_pair_routes(a, b)
        pa = DatapathProcess(a, tmp_path, _settings(a, b, routes=[b.site_net]), routes=routes_a).start()
        assert a.run(["ip", "link", "del", "esp0"]).returncode == 0
        assert pa.proc is not None
        wait_until(lambda: pa.proc is not None and pa.proc.poll() is not None, timeout=15, what="datapath exit")
        assert pa.proc.returncode == 1, "a dead worker stops the node with a failure code (fail closed)"
        assert "died" in pa.log()
