"""Observability of the whole platform against a real strongSwan peer.

Site A runs `esplanade up` in one namespace; strongSwan 5.9.8 (kernel-libipsec, key dumps at
log level 4) in another. After a known traffic run (N pings and an iperf3 of known bytes):

- the dataplane counters, the flow log, the Prometheus metrics and strongSwan's own counters
  agree (flow log = metrics = dataplane counters exactly; strongSwan within protocol overhead);
- every named metric is on the /metrics of its service and parses with prometheus_client;
- a connection whose peer is dead shows tunnel_up 0, and `esplanade ctl status` says why;
- the marker PSK and the tunnel's derived keys (from strongSwan's key dumps) are planted for
  the session-end scan of every log (tests/log_secrets.py), and checked here at once too.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conditions import wait_until
from tests.keyexchange.interop import Charon, parse_key_dumps, ss_conn
from tests.log_secrets import find_leaks, logs_under, plant, planted
from tests.netns_topology import LinkEnd, linked_pair
from tests.platform_process import Platform

pytestmark = [pytest.mark.strongswan, pytest.mark.netns, pytest.mark.slow]

NS_ES, NS_SS = "obs-es", "obs-ss"
ES_IP, SS_IP, DEAD_IP = "198.18.73.1", "198.18.73.2", "198.18.73.9"
ES_INNER, SS_INNER = "10.73.1.1", "10.73.2.1"
ES_NET, SS_NET = "10.73.1.0/24", "10.73.2.0/24"
ES_ID, SS_ID = "es.obs.test", "ss.obs.test"
MARKER_PSK = "obs-marker-psk-5f1d0c9e7a3b42e8"  # planted: must never show in a log
PINGS, PING_SIZE = 20, 100  # ICMP echo of 100 data bytes: 128-byte IPv4 packets
IPERF_BYTES, IPERF_DATAGRAM = 1 << 20, 1024  # UDP: 1024 datagrams, 1052-byte IPv4 packets
# per packet, what may differ between the two sides' byte counts (none expected: both count
# the inner packet), and packets that are not ours (none expected either)
OVERHEAD_PER_PACKET = 64

METRICS: dict[int, list[str]] = {  # port -> metric families (names as prometheus_client parses them)
    51061: [
        "esplanade_ike_sas",
        "esplanade_ike_child_sas",
        "esplanade_ike_negotiations",
        "esplanade_ike_rekeys",
        "esplanade_tunnel_up",
        "esplanade_store_request_duration_seconds",
    ],
    51062: [
        "esplanade_dataplane_traffic_bytes",
        "esplanade_dataplane_packets",
        "esplanade_dataplane_drops",
        "esplanade_store_request_duration_seconds",
    ],
    51063: ["esplanade_policy_decisions", "esplanade_store_request_duration_seconds"],
    8080: ["http_server_request_duration_seconds"],
}


@pytest.fixture
def namespaces() -> Iterator[None]:
    with linked_pair(LinkEnd(NS_ES, "obs0", ES_IP, ES_INNER), LinkEnd(NS_SS, "obs1", SS_IP, SS_INNER)):
        yield


@pytest.fixture
def charon(namespaces: None, tmp_path: Path) -> Iterator[Charon]:
    peer = Charon(tmp_path / "charon", ns=NS_SS)
    peer.start(log_level=4)  # prints the derived keys: the oracle for the log scan
    secrets = (
        f'    ike-pair {{\n        id-a = {SS_ID}\n        id-b = {ES_ID}\n        secret = "{MARKER_PSK}"\n    }}'
    )
    peer.load(
        ss_conn(local_id=SS_ID, remote_id=ES_ID, local_ip=SS_IP, remote_ip=ES_IP, local_ts=SS_NET, remote_ts=ES_NET),
        secrets,
    )
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def platform(namespaces: None, tmp_path: Path) -> Iterator[Platform]:
    plant(MARKER_PSK, "the marker PSK of the observability test")
    site = Platform(NS_ES, tmp_path / "esplanade")
    site.env.update(
        {
            "ESPLANADE_DATAPLANE__FLOW_LOG_INTERVAL_SECONDS": "0.5",
            "ESPLANADE_DATAPLANE__FLOW_LOG_IDLE_TIMEOUT_SECONDS": "60",
            "ESPLANADE_DATAPLANE__FLOW_LOG_EXPORT": str(tmp_path / "esplanade" / "flows-export.jsonl"),
            "ESPLANADE_KEYEXCHANGE__COUNTERS_INTERVAL_SECONDS": "1",
        }
    )
    site.start()
    try:
        wait_until(site.all_serving, timeout=90, what="all four services SERVING")
        yield site
    finally:
        site.stop()


def ns_run(ns: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


def scrape(port: int) -> str:
    result = ns_run(NS_ES, "curl", "-sf", f"http://127.0.0.1:{port}/metrics", timeout=15)
    assert result.returncode == 0, f"/metrics on {port}: {result.stderr}"
    return result.stdout


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
        out.setdefault(family.name, [])
    return out


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples(text).get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def ctl_json(platform: Platform, *args: str) -> Any:
    result = platform.ctl(*args, "-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def sa_counters(platform: Platform) -> dict[str, tuple[int, int]]:
    """Dataplane counters of the tunnel: direction -> (bytes, packets), summed over its SAs."""
    data = ctl_json(platform, "counters")
    out = {"in": (0, 0), "out": (0, 0)}
    for sa in data["sas"]:
        b, p = out[sa["direction"]]
        out[sa["direction"]] = (b + int(sa["bytes"]), p + int(sa["packets"]))
    return out


def flow_totals(platform: Platform) -> dict[str, tuple[int, int]]:
    out = {"in": (0, 0), "out": (0, 0)}
    for flow in ctl_json(platform, "logs", "flows", "--connection", "gw", "--active"):
        b, p = out[flow["direction"]]
        out[flow["direction"]] = (b + int(flow["bytes"]), p + int(flow["packets"]))
    return out


def strongswan_counters(charon: Charon) -> dict[str, int]:
    raw = charon.swanctl("--list-sas", "--raw")
    return {k: int(v) for k, v in re.findall(r"(bytes-in|bytes-out|packets-in|packets-out)=(\d+)", raw)}


def test_traffic_metrics_flows_status_and_no_secrets_in_logs(
    platform: Platform, charon: Charon, tmp_path: Path
) -> None:
    gw = {
        "name": "gw",
        "local_addrs": [ES_IP],
        "remote_addrs": [SS_IP],
        "local": {"auth": "psk", "id": ES_ID},
        "remote": {"auth": "psk", "id": SS_ID},
        "psk": MARKER_PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": [ES_NET], "remote_ts": [SS_NET], "esp_proposals": ["aes256gcm16"]}},
    }
    dead = {
        **gw,
        "name": "dead",
        "remote_addrs": [DEAD_IP],
        "retransmit": {"timeout": 1, "base": 1.0, "tries": 1},
        "children": {"net": {"local_ts": ["10.73.9.0/24"], "remote_ts": ["10.73.8.0/24"]}},
    }
    for connection in (gw, dead):
        spec = tmp_path / f"{connection['name']}.yaml"
        spec.write_text(yaml.safe_dump(connection))
        created = platform.ctl("connections", "create", "-f", str(spec))
        assert created.returncode == 0, created.stdout + created.stderr

    for name in ("gw", "dead"):
        initiated = platform.ctl("initiate", name)
        assert initiated.returncode == 0, initiated.stdout + initiated.stderr
    wait_until(
        lambda: any(c["state"] == "INSTALLED" for s in ctl_json(platform, "sas") for c in s["children"]),
        timeout=30,
        what="the Child SA of gw installed",
    )

    # -- a dead peer: tunnel_up 0, and why, in ctl status ------------------------------------
    def tunnels() -> dict[str, dict[str, Any]]:
        return {t["connection"]: t for t in ctl_json(platform, "status")["tunnels"]}

    wait_until(lambda: "TIMEOUT" in tunnels()["dead"]["reason"], timeout=30, what="dead's timeout in ctl status")
    status = tunnels()
    assert status["gw"]["up"] and status["gw"]["reason"] == "established"
    assert not status["dead"]["up"] and "ike_init failed: TIMEOUT" in status["dead"]["reason"], status["dead"]
    kx = scrape(51061)
    assert value(kx, "esplanade_tunnel_up", connection="dead") == 0
    assert value(kx, "esplanade_tunnel_up", connection="gw") == 1
    assert value(kx, "esplanade_ike_negotiations_total", connection="dead", outcome="failed", reason="TIMEOUT") >= 1
    shown = platform.ctl("status")
    assert shown.returncode == 0 and "DOWN" in shown.stdout and "dead" in shown.stdout

    # -- a known traffic run ----------------------------------------------------------------------
    before_dp, before_ss = sa_counters(platform), strongswan_counters(charon)
    ping = ns_run(NS_ES, "ping", "-c", str(PINGS), "-s", str(PING_SIZE), "-i", "0.05", "-I", ES_INNER, SS_INNER)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # iperf3 over UDP, paced (no loss on the way: strongSwan's userspace ESP drops bursts), and
    # the server's own account of what arrived
    server_report = tmp_path / "iperf3-server.json"
    server = subprocess.Popen(
        ["ip", "netns", "exec", NS_SS, "iperf3", "-s", "-1", "-B", SS_INNER, "-p", "5273", "-J"],
        stdout=server_report.open("wb"),
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: "5273" in ns_run(NS_SS, "ss", "-ltnH").stdout, timeout=10, what="iperf3 server listening")
        client = ns_run(
            NS_ES,
            *("iperf3", "-c", SS_INNER, "-B", ES_INNER, "-p", "5273", "-J"),
            *("-u", "-b", "20M", "-l", str(IPERF_DATAGRAM), "-n", str(IPERF_BYTES)),
            timeout=60,
        )
        assert client.returncode == 0, client.stdout[-2000:] + client.stderr
    finally:
        server.wait(30)
    sent = json.loads(client.stdout)["end"]["sum"]
    assert sent["bytes"] == IPERF_BYTES, sent
    # the server stops counting at the end of the test, a datagram or two before the last one
    # arrives; what it did count came without loss
    received = json.loads(server_report.read_text())["end"]["sum_received"]
    assert received["lost_packets"] == 0 and received["packets"] >= IPERF_BYTES // IPERF_DATAGRAM - 16, received

    # a garbage datagram on UDP 4500 (an SA nobody has): a counted drop
    ns_run(
        NS_SS,
        "python3",
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f" s.sendto(bytes.fromhex('deadbeef00000001') + bytes(48), ('{ES_IP}', 4500))",
    )
    check = platform.api(
        "POST",
        "/api/v1/policy/check",
        {"identity": "nobody", "flow": {"src": ES_INNER, "dst": SS_INNER, "protocol": "tcp", "dst_port": 22}},
    )
    assert check[0] == 200, check

    # counters settle: the flow log and metrics catch up with the dataplane counters
    def agreed() -> bool:
        dp, flows = sa_counters(platform), flow_totals(platform)
        dp_metrics = scrape(51062)
        metrics = {
            d: (
                int(value(dp_metrics, "esplanade_dataplane_traffic_bytes_total", connection="gw", direction=d)),
                int(value(dp_metrics, "esplanade_dataplane_packets_total", connection="gw", direction=d)),
            )
            for d in ("in", "out")
        }
        print("dataplane", dp, "flows", flows, "metrics", metrics)
        return dp == flows == metrics and dp["out"][1] > 0

    wait_until(agreed, timeout=30, interval=0.5, what="flow log = metrics = dataplane counters")
    dp, ss = sa_counters(platform), strongswan_counters(charon)
    sent_bytes = dp["out"][0] - before_dp["out"][0]
    sent_packets = dp["out"][1] - before_dp["out"][1]
    got_bytes = dp["in"][0] - before_dp["in"][0]
    got_packets = dp["in"][1] - before_dp["in"][1]
    # what we know we sent: the pings and iperf3's payload (plus TCP/IP headers and its control connection)
    known = PINGS * (PING_SIZE + 28) + (IPERF_BYTES // IPERF_DATAGRAM) * (IPERF_DATAGRAM + 28)
    assert known <= sent_bytes <= known + 20_000  # + iperf3's TCP control connection
    assert PINGS + IPERF_BYTES // IPERF_DATAGRAM <= sent_packets <= PINGS + IPERF_BYTES // IPERF_DATAGRAM + 100
    assert got_packets >= PINGS and got_bytes >= PINGS * (PING_SIZE + 28)
    # the peer's view of the same run
    ss_in = ss["bytes-in"] - before_ss.get("bytes-in", 0)
    ss_in_packets = ss["packets-in"] - before_ss.get("packets-in", 0)
    ss_out = ss["bytes-out"] - before_ss.get("bytes-out", 0)
    ss_out_packets = ss["packets-out"] - before_ss.get("packets-out", 0)
    assert abs(ss_in_packets - sent_packets) <= 2, (ss, dp)
    assert abs(ss_out_packets - got_packets) <= 2, (ss, dp)
    assert abs(ss_in - sent_bytes) <= OVERHEAD_PER_PACKET * max(2, abs(ss_in_packets - sent_packets) + 2), (ss, dp)
    assert abs(ss_out - got_bytes) <= OVERHEAD_PER_PACKET * max(2, abs(ss_out_packets - got_packets) + 2), (ss, dp)
    # the flow records carry the identity and the tunnel's 5-tuple
    flows = ctl_json(platform, "logs", "flows", "--identity", SS_ID, "--active")
    assert {(f["src"], f["dst"], f["direction"]) for f in flows} >= {(ES_NET, SS_NET, "out"), (SS_NET, ES_NET, "in")}
    assert all(f["decision"] == "allow" for f in flows)

    # -- every named metric exists and parses ----------------------------------------------------
    for port, names in METRICS.items():
        families = samples(scrape(port))
        missing = [n for n in names if n not in families]
        assert not missing, f"missing on :{port}/metrics: {missing}"
    assert value(scrape(51062), "esplanade_dataplane_drops_total") >= 1
    assert value(scrape(51063), "esplanade_policy_decisions_total", decision="deny", point="check") >= 1
    api_metrics = scrape(8080)
    route = "/api/v1/connections/{name}/initiate"
    assert value(api_metrics, "http_server_request_duration_seconds_count", **{"http_route": route}) >= 2
    # bounded labels: no SPI (in hex or decimal) in any series, and no label named after one
    spis = [c[k] for sa in ctl_json(platform, "sas") for c in sa["children"] for k in ("spi_in", "spi_out")]
    for port in METRICS:
        text = scrape(port)
        for spi in spis:
            assert spi not in text and str(int(spi, 16)) not in text, (port, spi)
        assert not [n for family in samples(text).values() for labels, _ in family for n in labels if "spi" in n]

    # -- secrets: the tunnel's derived keys from strongSwan's key dumps, and the marker PSK ---------
    keys = [data for label, data in parse_key_dumps(charon.log_text()) if _is_key(label) and len(data) >= 16]
    assert keys, "strongSwan printed no keys at log level 4"
    for data in keys:
        plant(data, "a derived key of the observability test tunnel")
    platform.stop()
    leaks = find_leaks(logs_under(tmp_path), planted())
    assert not leaks, leaks
    logs = logs_under(tmp_path)
    assert any(p.name == "up.log" for p in logs), logs
    assert MARKER_PSK not in (tmp_path / "esplanade" / "up.log").read_text()


def _is_key(label: str) -> bool:
    lowered = label.lower()
    return "sk_" in lowered or "key" in lowered or "secret" in lowered
