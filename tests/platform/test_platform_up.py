"""`esplanade up`: four services, health, durability across SIGKILL, and riding out an etcd outage.

Each test runs the platform inside its own network namespace, so the services' fixed ports
(gRPC 50061-50063, HTTP 8080, UDP 500/4500, the TUN device) never collide with anything.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conditions import wait_until
from tests.etcd_server import EtcdServer
from tests.netns_topology import scratch_netns
from tests.platform_process import Platform

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def platform_netns() -> Iterator[str]:
    with scratch_netns("plat-") as name:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name


def test_up_serves_survives_sigkill_and_stops_cleanly(platform_netns: str, tmp_path: Path) -> None:
    platform = Platform(platform_netns, tmp_path / "state")
    platform.start()
    try:
        wait_until(platform.all_serving, timeout=60, what="all four services SERVING")
        assert platform.readyz() == 200
        for i in range(5):
            status, _ = platform.api("PUT", f"/api/v1/groups/g{i}", {"description": f"group {i}"})
            assert status in (200, 201), status
        platform.sigkill()

        platform.start()
        wait_until(platform.all_serving, timeout=60, what="SERVING again after a SIGKILL restart")
        for i in range(5):
            status, body = platform.api("GET", f"/api/v1/groups/g{i}")
            assert status == 200 and isinstance(body, dict) and body["description"] == f"group {i}"
    finally:
        assert platform.stop() == 0
    wait_until(lambda: not platform._listening(8080), timeout=20, what="ports free after Ctrl-C")


def test_services_follow_an_etcd_outage_without_restarting(platform_netns: str, tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path / "etcd", netns=platform_netns)
    etcd.start()
    platform = Platform(platform_netns, tmp_path / "state", ["--etcd", etcd.endpoint])
    platform.start()
    try:
        wait_until(platform.all_serving, timeout=60, what="all four services SERVING on etcd")
        status, _ = platform.api("PUT", "/api/v1/groups/before-outage", {"description": "written before"})
        assert status in (200, 201)
        pids_before = _service_pids(platform)

        etcd.kill()
        wait_until(
            lambda: all(s != "SERVING" for s in platform.health().values()) and platform.readyz() == 503,
            timeout=30,
            what="NOT_SERVING and /readyz 503 while etcd is down",
        )
        etcd.start()
        wait_until(platform.all_serving, timeout=60, what="recovery once etcd is back")
        assert platform.readyz() == 200
        assert _service_pids(platform) == pids_before, "a service was restarted"
        status, body = platform.api("GET", "/api/v1/groups/before-outage")
        assert status == 200 and isinstance(body, dict) and body["description"] == "written before"
    finally:
        platform.stop()
        etcd.stop()


def _service_pids(platform: Platform) -> set[int]:
    assert platform.process is not None
    out = subprocess.run(["pgrep", "-P", str(platform.process.pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}
