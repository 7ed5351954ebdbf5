"""The whole platform driven through the REST API and `esplanade ctl`, with a real strongSwan peer.

Site A runs `esplanade up` (keyexchange, dataplane on the userspace backend, policy, api) in
one namespace; strongSwan 5.9.8 (charon with kernel-libipsec) runs in another. A connection
defined through the API brings up the tunnel; `esplanade ctl sas` shows it with live
counters; `esplanade ctl terminate` makes strongSwan log the delete; the SSE stream of
`esplanade ctl events` carried the up and down events.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conditions import wait_until
from tests.keyexchange.interop import PSK, Charon, ss_conn
from tests.netns_topology import LinkEnd, linked_pair
from tests.platform_process import Platform

pytestmark = [pytest.mark.strongswan, pytest.mark.netns, pytest.mark.slow]

NS_ES, NS_SS = "apie-es", "apie-ss"
ES_IP, SS_IP = "198.18.71.1", "198.18.71.2"
ES_INNER, SS_INNER = "10.71.1.1", "10.71.2.1"
ES_NET, SS_NET = "10.71.1.0/24", "10.71.2.0/24"
ES_ID, SS_ID = "es.api-e2e.test", "ss.api-e2e.test"


@pytest.fixture
def namespaces() -> Iterator[None]:
    with linked_pair(LinkEnd(NS_ES, "apie0", ES_IP, ES_INNER), LinkEnd(NS_SS, "apie1", SS_IP, SS_INNER)):
        yield


@pytest.fixture
def charon(namespaces: None, tmp_path: Path) -> Iterator[Charon]:
    peer = Charon(tmp_path / "charon", ns=NS_SS)
    peer.start(log_level=2)
    secrets = f'    ike-pair {{\n        id-a = {SS_ID}\n        id-b = {ES_ID}\n        secret = "{PSK}"\n    }}'
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
    site = Platform(NS_ES, tmp_path / "esplanade")
    site.start()
    try:
        wait_until(site.all_serving, timeout=90, what="all four services SERVING")
        yield site
    finally:
        site.stop()


def _sas(platform: Platform) -> list[dict[str, Any]]:
    result = platform.ctl("sas", "-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    return list(json.loads(result.stdout))


def _child_bytes(platform: Platform) -> tuple[int, int]:
    (ike,) = _sas(platform)
    (child,) = ike["children"]
    return int(child["bytes_in"]), int(child["bytes_out"])


def _ping(count: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", NS_ES, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-I", ES_INNER, SS_INNER],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tunnel_through_the_api(platform: Platform, charon: Charon, tmp_path: Path) -> None:
    connection = {
        "name": "gw",
        "local_addrs": [ES_IP],
        "remote_addrs": [SS_IP],
        "local": {"auth": "psk", "id": ES_ID},
        "remote": {"auth": "psk", "id": SS_ID},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": [ES_NET], "remote_ts": [SS_NET], "esp_proposals": ["aes256gcm16"]}},
    }
    spec = tmp_path / "gw.yaml"
    spec.write_text(yaml.safe_dump(connection))
    created = platform.ctl("connections", "create", "-f", str(spec))
    assert created.returncode == 0, created.stdout + created.stderr
    shown = platform.ctl("connections", "get", "gw", "-o", "json")
    assert PSK not in shown.stdout and json.loads(shown.stdout)["psk"] == {"set": True}

    events_log = tmp_path / "events.jsonl"
    with events_log.open("wb") as sink:
        follower = platform.ctl_popen("events", "-o", "json", stdout=sink)
        try:
            # A policy change is an event too: once one shows, the stream is subscribed.
            def marker_seen() -> bool:
                status, _ = platform.api("PUT", "/api/v1/groups/stream-marker", {"description": "sync"})
                assert status in (200, 201), status
                return "stream-marker" in events_log.read_text()

            wait_until(marker_seen, timeout=30, interval=0.5, what="the SSE stream is live")
            initiated = platform.ctl("initiate", "gw")
            assert initiated.returncode == 0, initiated.stdout + initiated.stderr
            wait_until(
                lambda: (
                    print(_sas(platform))
                    or any(c.get("state") == "INSTALLED" for s in _sas(platform) for c in s["children"])
                ),
                timeout=30,
                what="the Child SA installed, as esplanade ctl sas shows it",
            )
            table = platform.ctl("sas")
            assert "gw" in table.stdout and "ESTABLISHED" in table.stdout and SS_IP in table.stdout

            before = _child_bytes(platform)
            ping = _ping(5)
            assert ping.returncode == 0, ping.stdout + ping.stderr
            wait_until(
                lambda: all(a > b for a, b in zip(_child_bytes(platform), before, strict=True)),
                timeout=15,
                what="live counters grow in both directions",
            )
            ss_counts = charon.swanctl("--list-sas", "--raw")
            assert "bytes-in" in ss_counts and "packets-out" in ss_counts

            (ike,) = _sas(platform)
            terminated = platform.ctl("terminate", ike["id"])
            assert terminated.returncode == 0, terminated.stdout + terminated.stderr
            wait_until(
                lambda: "received DELETE for IKE_SA" in charon.log_text() or "deleting IKE_SA" in charon.log_text(),
                timeout=20,
                what="strongSwan logs the delete",
            )
            wait_until(lambda: not _sas(platform), timeout=20, what="no SA left in esplanade ctl sas")
            wait_until(
                lambda: '"ike_down"' in events_log.read_text() or "ike_down" in events_log.read_text(),
                timeout=20,
                what="the ike_down event on the SSE stream",
            )
        finally:
            follower.terminate()
            follower.wait(10)
    kinds = events_log.read_text()
    for kind in ("ike_up", "child_up", "ike_down"):
        assert kind in kinds, f"{kind} missing from the event stream:\n{kinds[-2000:]}"
