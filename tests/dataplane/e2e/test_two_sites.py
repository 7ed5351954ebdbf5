"""End to end: two sites in network namespaces, each running the real dataplane service (userspace
backend, own store), an SA pair installed through the gRPC API; real ping and iperf3 across,
tcpdump on the underlay as the witness of what leaves in clear."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from demo.manual_sites import SiteService, manual_sites, random_kek
from esplanade.dataplane.fastpath.hot_path import load_compiled
from esplanade.v1 import dataplane_pb2, ipsec_pb2
from tests.conditions import wait_until
from tests.dataplane.compiled_module import requires_compiled, skip_without_compiled
from tests.dataplane.e2e.underlay_capture import UnderlayCapture
from tests.netns_topology import Node

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PREFIX = "dps-"


def ping(node: Node, source: str, target: str, count: int = 5) -> int:
    out = node.run(["ping", "-n", "-c", str(count), "-i", "0.1", "-W", "2", "-I", source, target], timeout=30).stdout
    match = re.search(r"(\d+) received", out)
    return int(match.group(1)) if match else 0


def iperf3_tcp(client: Node, server: Node, seconds: int = 2) -> dict[str, Any]:
    server.popen(["iperf3", "-s", "-1", "-B", server.site_addr])
    wait_until(lambda: f"{server.site_addr}:5201" in server.run(["ss", "-ltnH"]).stdout, timeout=10, what="iperf3 -s")
    result = client.run(
        ["iperf3", "-c", server.site_addr, "-B", client.site_addr, "-t", str(seconds), "-J"], timeout=seconds + 30
    )
    report: dict[str, Any] = json.loads(result.stdout)
    assert "error" not in report, report.get("error")
    return report


def counters(site: SiteService) -> dataplane_pb2.GetCountersResponse:
    with site.client() as stub:
        reply: dataplane_pb2.GetCountersResponse = stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10)
    return reply


def packets(site: SiteService, direction: int) -> int:
    return sum(c.packets for c in counters(site).sas if c.direction == direction)


def hot_path(name: str) -> dict[str, str]:
    return {"ESPLANADE_DATAPLANE__HOT_PATH": name}


def worker_hot_paths(site: SiteService) -> set[str]:
    with site.client() as stub:
        details = stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10).details
    return {w["hot_path"] for w in json.loads(details["worker_status"])} | {details["hot_path"]}


@pytest.mark.parametrize("hot", ["compiled", "python"])
@pytest.mark.parametrize("udp", [True, False], ids=["esp-in-udp", "plain-esp"])
def test_ping_and_tcp_across_two_sites(tmp_path: Path, udp: bool, hot: str) -> None:
    skip_without_compiled(hot)
    with manual_sites(tmp_path, udp=udp, prefix=PREFIX, settings=hot_path(hot)) as (topo, site_a, site_b, keys):
        a, b = topo.nodes
        expression = "udp port 4500 or esp or icmp or tcp port 5201"
        with UnderlayCapture(a, tmp_path / "ul.pcap", expression) as capture:
            assert ping(a, a.site_addr, b.site_addr) == 5
            report = iperf3_tcp(a, b)
        assert capture.lossless, capture.report
        assert report["end"]["sum_received"]["bytes"] > 2_000_000
        assert packets(site_b, ipsec_pb2.DIRECTION_IN) > 1000
        assert packets(site_a, ipsec_pb2.DIRECTION_IN) > 5
        # what crossed the underlay: ESP under the right SPIs, in the right shape, and no inner packet in clear
        headers = list(capture.esp_headers())
        assert {h.spi for h in headers} == {keys.spi_ab, keys.spi_ba}
        assert {h.udp for h in headers} == {udp}
        assert capture.cleartext_between(a.site_addr, b.site_addr) == []
        with site_a.client() as stub:
            status = stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10)
        assert (status.backend, status.child_sas, status.policies) == ("userspace", 1, 2)
        assert worker_hot_paths(site_a) == worker_hot_paths(site_b) == {hot}
        assert status.details["hot_path_reason"] == f"dataplane.hot_path is {hot}"
        if hot == "compiled":  # who runs AES-GCM: our VAES code where this CPU has it, else OpenSSL
            module, _ = load_compiled()
            assert module is not None
            assert status.details["aes_gcm"] == (module.aesgcm_accelerated() or "openssl")
        else:
            assert "aes_gcm" not in status.details
        assert "userspace backend selected by configuration" in status.backend_reason
        assert status.details["outer"] == "udp+raw"
        # the TUN's MTU and the route's come from AES-GCM's overhead: 1500 - 20 - 8 - 8 - 8 - 16 - 2
        assert status.details["tun_mtu"] == "1438"
        route = a.run(["ip", "route", "show", b.site_net]).stdout
        assert "dev esp0" in route and f"src {a.site_addr}" in route and "mtu 1438" in route, route


@requires_compiled
@pytest.mark.parametrize("hot_a", ["compiled", "python"])
def test_a_compiled_site_and_a_python_site_carry_ping_and_tcp(tmp_path: Path, hot_a: str) -> None:
    """Same wire format: each end's hot path decrypts what the other's sealed (TSO and GRO on the
    compiled side, plain reads and merged writes on the Python side)."""
    hot_b = "python" if hot_a == "compiled" else "compiled"
    with manual_sites(tmp_path, prefix=PREFIX, settings=hot_path(hot_a), settings_b=hot_path(hot_b)) as (
        topo,
        site_a,
        site_b,
        _,
    ):
        a, b = topo.nodes
        assert worker_hot_paths(site_a) == {hot_a} and worker_hot_paths(site_b) == {hot_b}
        assert ping(a, a.site_addr, b.site_addr) == 5
        assert ping(b, b.site_addr, a.site_addr) == 5
        report = iperf3_tcp(a, b)
        assert report["end"]["sum_received"]["bytes"] > 2_000_000
        assert packets(site_b, ipsec_pb2.DIRECTION_IN) > 1000
        drops = {d.reason: d.packets for d in counters(site_b).drops}
        assert not drops.get("icv_failure") and not drops.get("malformed"), drops


def test_a_discard_policy_keeps_traffic_off_the_underlay(tmp_path: Path) -> None:
    with manual_sites(tmp_path, prefix=PREFIX) as (topo, site_a, _site_b, _):
        a, b = topo.nodes
        # a network site a reaches in clear over the underlay, as long as no policy covers it
        with b.netlink() as ns:
            ns.addr("add", index=ns.link_lookup(ifname="lo")[0], address="10.90.2.1", prefixlen=32)
        a.run(["ip", "route", "add", "10.90.2.0/24", "via", b.underlay_addr], check=True)
        b.run(["ip", "route", "add", a.site_addr, "via", a.underlay_addr], check=True)
        with UnderlayCapture(a, tmp_path / "before.pcap", "icmp") as before:
            assert ping(a, a.site_addr, "10.90.2.1", count=3) == 3
        assert len(before.cleartext_between(a.site_addr, "10.90.2.1")) >= 6, "the control: it does leave in clear"

        discard = ipsec_pb2.SpdPolicy(
            id="no-10-90",
            direction=ipsec_pb2.DIRECTION_OUT,
            local_ts=ipsec_pb2.TrafficSelector(text=a.site_net),
            remote_ts=ipsec_pb2.TrafficSelector(text="10.90.2.0/24"),
            action=ipsec_pb2.POLICY_ACTION_DISCARD,
            priority=100,
        )
        with site_a.client() as stub:
            stub.InstallPolicy(dataplane_pb2.InstallPolicyRequest(policy=discard), timeout=20)
        with UnderlayCapture(a, tmp_path / "after.pcap", "ip") as after:
            assert ping(a, a.site_addr, "10.90.2.1", count=5) == 0
            send_udp = (
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                f" s.bind(('{a.site_addr}', 0)); [s.sendto(b'leak', ('10.90.2.1', 9)) for _ in range(5)]"
            )
            assert a.run([sys.executable, "-c", send_udp]).returncode == 0
        assert after.lossless, after.report
        assert after.cleartext_between(a.site_addr, "10.90.2.1") == []
        drops = {d.reason: d.packets for d in counters(site_a).drops}
        assert drops.get("policy_discard", 0) >= 10  # 5 pings, 5 datagrams


def test_cleartext_from_the_protected_peer_subnet_is_discarded(tmp_path: Path) -> None:
    """RFC 4301 §5.2: once an inbound PROTECT policy covers b's site, the same traffic in clear is dropped."""
    with manual_sites(tmp_path, prefix=PREFIX) as (topo, site_a, site_b, _):
        a, b = topo.nodes
        with site_a.client() as stub:
            assert (
                "on: XFRM BLOCK"
                in stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10).details["cleartext_guard"]
            )
        assert ping(b, b.site_addr, a.site_addr, count=3) == 3  # through the tunnel
        # now the same addresses in clear: b routes a's site over the underlay instead of its TUN
        b.run(["ip", "route", "replace", a.site_addr, "via", a.underlay_addr], check=True)
        a.run(["ip", "route", "replace", b.site_addr, "via", b.underlay_addr], check=True)
        with UnderlayCapture(a, tmp_path / "clear.pcap", "icmp") as capture:
            assert ping(b, b.site_addr, a.site_addr, count=3) == 0
        assert capture.lossless, capture.report
        requests = [p for p in capture.cleartext_between(a.site_addr, b.site_addr) if p[20] == 8]
        assert len(requests) == 3, "the requests did arrive in clear, and were dropped there"
        stats = a.run(["cat", "/proc/net/xfrm_stat"]).stdout
        assert int(re.search(r"XfrmInPolBlock\s+(\d+)", stats).group(1)) >= 3  # type: ignore[union-attr]
        # and removing the inbound policies (both ways: the replies are cleartext for b) lifts the guard
        for site in (site_a, site_b):
            with site.client() as stub:
                stub.DeletePolicy(dataplane_pb2.DeletePolicyRequest(id="manual-ab-in"), timeout=20)
        assert ping(b, b.site_addr, a.site_addr, count=3) == 3


@requires_compiled  # its peer runs the compiled loop
def test_without_the_compiled_module_auto_falls_back_to_python_and_compiled_refuses_to_start(
    tmp_path: Path,
) -> None:
    """As if the package had been built without a C compiler: the import of the extension fails in
    the service (a sitecustomize blocks it). `auto` runs the Python lanes and says why; the tunnel
    carries ping and TCP (against a compiled peer); `compiled` does not start at all."""
    blocker = tmp_path / "no-espfast"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['esplanade.dataplane.fastpath._espfast'] = None  # ImportError on import\n"
    )
    without = {"PYTHONPATH": str(blocker), "ESPLANADE_DATAPLANE__HOT_PATH": "auto"}
    with manual_sites(
        tmp_path, prefix=PREFIX, settings=without, settings_b={**hot_path("compiled"), "PYTHONPATH": ""}
    ) as (
        topo,
        site_a,
        site_b,
        _,
    ):
        a, b = topo.nodes
        with site_a.client() as stub:
            details = stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10).details
        assert details["hot_path"] == "python"
        assert "compiled module is not available" in details["hot_path_reason"]
        assert worker_hot_paths(site_a) == {"python"} and worker_hot_paths(site_b) == {"compiled"}
        assert ping(a, a.site_addr, b.site_addr) == 5
        report = iperf3_tcp(a, b)
        assert report["end"]["sum_received"]["bytes"] > 2_000_000
        refused = SiteService(
            a, tmp_path, "refused", random_kek(), settings={**without, "ESPLANADE_DATAPLANE__HOT_PATH": "compiled"}
        )
        with pytest.raises(AssertionError, match="exited"):
            refused.start(timeout=20)
        assert "hot_path is compiled, but" in refused.log()
