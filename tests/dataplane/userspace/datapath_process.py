"""Run the userspace datapath (diagnostic runner) inside a test-bed node and read its status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conditions import wait_until
from tests.netns_topology import Node, stop_process

RUNNER = "esplanade.dataplane.userspace.diagnostic_node"


def passthrough_pair_routes(
    a: Node, b: Node, *, port: int = 4500, spis: tuple[int, int] = (0x1001, 0x2002), v6: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pass-through routes for a<->b: a sends under spis[0] (b's inbound), b under spis[1]."""
    a_to_b, b_to_a = spis
    routes_a = [
        {"network": b.site_net, "endpoint": [b.underlay_addr, port], "spi_out": a_to_b, "spi_in": b_to_a},
    ]
    routes_b = [
        {"network": a.site_net, "endpoint": [a.underlay_addr, port], "spi_out": b_to_a, "spi_in": a_to_b},
    ]
    if v6:
        routes_a.append(
            {"network": b.site_net6, "endpoint": [b.underlay_addr, port], "spi_out": a_to_b, "spi_in": b_to_a}
        )
        routes_b.append(
            {"network": a.site_net6, "endpoint": [a.underlay_addr, port], "spi_out": b_to_a, "spi_in": a_to_b}
        )
    return routes_a, routes_b


class DatapathProcess:
    def __init__(
        self, node: Node, workdir: Path, settings: dict[str, Any], *, env: dict[str, str] | None = None, **extra: Any
    ) -> None:
        self.node = node
        self.env = env
        self.workdir = workdir
        self.status_path = workdir / f"{node.name}-status.json"
        self.log_path = workdir / f"{node.name}-datapath.log"
        self.config_path = workdir / f"{node.name}-datapath.json"
        self.config = {
            "settings": {"diagnostic_transform": True, **settings},
            "status_file": str(self.status_path),
            "status_interval": 0.2,
            **extra,
        }
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 20.0) -> DatapathProcess:
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.status_path.unlink(missing_ok=True)
        log = self.log_path.open("w")
        self.proc = self.node.popen(
            [sys.executable, "-m", RUNNER, str(self.config_path)], stdout=log, stderr=log, env=self.env
        )
        wait_until(self._ready, timeout=timeout, what=f"datapath in {self.node.name} up ({self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"datapath exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
        status = self.status()
        workers = status.get("worker_status") or []
        return bool(workers) and all("loop" in w for w in workers)

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_path.read_text()))
        except (OSError, ValueError):
            return {}

    def fresh_status(self, timeout: float = 10.0) -> dict[str, Any]:
        """A status written after this call (the runner rewrites it every 0.2 s)."""
        before = self.status_path.stat().st_mtime_ns if self.status_path.exists() else 0
        wait_until(
            lambda: self.status_path.exists() and self.status_path.stat().st_mtime_ns > before,
            timeout=timeout,
            what="a fresh datapath status",
        )
        return self.status()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, grace=10)
        return self.proc.returncode


def worker_totals(status: dict[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for worker in status.get("worker_status", []):
        for key, value in worker.get("loop", {}).items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals
