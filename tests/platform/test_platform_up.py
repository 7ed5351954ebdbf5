"""`esplanade up`: four services, health, durability across SIGKILL, and riding out an etcd outage.

Each test runs the platform inside its own network namespace, so the services' fixed ports
(gRPC 50061-50063, HTTP 8080, UDP 500/4500, the TUN device) never collide with anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conditions import wait_until
from tests.etcd_server import EtcdServer
from tests.netns_topology import scratch_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("keyexchange", "dataplane", "policy", "api")


class Platform:
    """`esplanade up` in a namespace, and `esplanade health` / HTTP probes against it."""

    def __init__(self, netns: str, state_dir: Path, extra_args: list[str] | None = None) -> None:
        self.netns = netns
        self.state_dir = state_dir
        self.extra_args = extra_args or []
        kek = state_dir / "kek"
        if not kek.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(self._cli("kek", "generate", "--output", str(kek)), check=True, capture_output=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "ESPLANADE_KEK__FILE": str(kek),
            "ESPLANADE_TELEMETRY__LOG_FORMAT": "json",
            "ESPLANADE_DATAPLANE__TUN_NAME": "esp-up",
            "ESPLANADE_API__BOOTSTRAP_TOKEN_FILE": str(self._token_file()),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "up.log"

    def _token_file(self) -> Path:
        path = self.state_dir / "bootstrap-token"
        if not path.exists():
            path.write_text("esp_test_bootstrap_token_0123456789abcdef\n")
        return path

    @staticmethod
    def _cli(*args: str) -> list[str]:
        return [sys.executable, "-m", "esplanade.cli.main", *args]

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def start(self) -> None:
        argv = self._in_netns(self._cli("up", "--state-dir", str(self.state_dir), *self.extra_args))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def health(self) -> dict[str, str]:
        """Every service's status as `esplanade health` reports it (exit 0 = all SERVING)."""
        result = subprocess.run(
            self._in_netns(self._cli("health")), env=self.env, capture_output=True, text=True, timeout=30
        )
        states = {}
        for line in result.stdout.splitlines():
            for name in SERVICES:
                if f" {name} " in f" {line} ".replace("│", " "):
                    states[name] = (
                        "NOT_SERVING" if "NOT_SERVING" in line else ("SERVING" if "SERVING" in line else "UNREACHABLE")
                    )
        return states

    def readyz(self) -> int:
        result = subprocess.run(
            self._in_netns(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8080/readyz"]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return int(result.stdout or 0)

    def all_serving(self) -> bool:
        states = self.health()
        return len(states) == len(SERVICES) and all(s == "SERVING" for s in states.values())

    def sigkill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        # The children die with their parent (PR_SET_PDEATHSIG): the ports must come free.
        wait_until(lambda: not self._listening(8080), timeout=20, what="services gone after SIGKILL")

    def _listening(self, port: int) -> bool:
        out = subprocess.run(self._in_netns(["ss", "-ltnH", f"sport = :{port}"]), capture_output=True, text=True)
        return bool(out.stdout.strip())

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        token = self._token_file().read_text().strip()
        argv = ["curl", "-s", "-X", method, "-H", f"Authorization: Bearer {token}", "-w", "\n%{http_code}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        result = subprocess.run(
            self._in_netns([*argv, f"http://127.0.0.1:8080{path}"]), capture_output=True, text=True, timeout=30
        )
        text, _, code = result.stdout.rpartition("\n")
        return int(code or 0), (json.loads(text) if text.strip() else None)


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
