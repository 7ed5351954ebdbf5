"""`esplanade up` as a real process tree inside a network namespace, for acceptance tests.

The services keep their fixed ports (gRPC 50061-50063, HTTP 8080, UDP 500/4500, the TUN
device); the namespace keeps them from colliding with anything else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conditions import wait_until

SERVICES = ("keyexchange", "dataplane", "policy", "api")
BOOTSTRAP_TOKEN = "esp_test_bootstrap_token_0123456789abcdef"


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
            path.write_text(BOOTSTRAP_TOKEN + "\n")
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

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`esplanade ctl ...` inside the namespace, authenticated with the bootstrap token."""
        env = {**self.env, "ESPLANADE_CTL_URL": "http://127.0.0.1:8080", "ESPLANADE_CTL_TOKEN": BOOTSTRAP_TOKEN}
        return subprocess.run(
            self._in_netns(self._cli("ctl", *args)), env=env, capture_output=True, text=True, timeout=timeout
        )

    def ctl_popen(self, *args: str, stdout: object) -> subprocess.Popen[bytes]:
        env = {**self.env, "ESPLANADE_CTL_URL": "http://127.0.0.1:8080", "ESPLANADE_CTL_TOKEN": BOOTSTRAP_TOKEN}
        return subprocess.Popen(
            self._in_netns(self._cli("ctl", *args)), env=env, stdout=stdout, stderr=subprocess.STDOUT
        )

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
