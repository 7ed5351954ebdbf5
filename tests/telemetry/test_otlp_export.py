"""OTLP export from the whole platform to a real OTLP/gRPC endpoint.

`esplanade up` runs in a network namespace with `telemetry.otlp_endpoint` pointing at an OTLP
receiver (tests/telemetry/otlp_receiver.py: the collector's three export services over real
gRPC) in the same namespace. One API write must reach the receiver as one trace: the HTTP
server span, the audit span under it, the gRPC call and the policy service's span. Every
service must export its metrics and its log lines, and nothing exported may carry the
bootstrap token or the key-encryption key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conditions import wait_until
from tests.netns_topology import scratch_netns
from tests.platform_process import BOOTSTRAP_TOKEN, SERVICES, Platform

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
OTLP_PORT = 4317
WRITE = "PUT /api/v1/groups/{object_id}"  # the API span of the write, by its route
PUT_OBJECT = "/esplanade.v1.Policy/PutObject"


def service_name(resource: dict[str, Any]) -> str:
    for attribute in resource.get("attributes", []):
        if attribute["key"] == "service.name":
            return str(attribute["value"]["stringValue"])
    return ""


class Received:
    """What the receiver wrote so far, by signal and service."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8") if self.path.exists() else ""

    def requests(self, signal_name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.text().splitlines() if line.strip()]
        return [line["request"] for line in lines if line["signal"] == signal_name]

    def spans(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            (service_name(group.get("resource", {})), span)
            for request in self.requests("traces")
            for group in request.get("resourceSpans", [])
            for scope in group.get("scopeSpans", [])
            for span in scope.get("spans", [])
        ]

    def metric_names(self) -> dict[str, set[str]]:
        names: dict[str, set[str]] = {}
        for request in self.requests("metrics"):
            for group in request.get("resourceMetrics", []):
                service = service_name(group.get("resource", {}))
                for scope in group.get("scopeMetrics", []):
                    names.setdefault(service, set()).update(metric["name"] for metric in scope.get("metrics", []))
        return names

    def metric_scopes(self, service: str, name: str) -> set[str]:
        """The instrumentation scopes (meters) that export metric `name` from `service`."""
        return {
            scope.get("scope", {}).get("name", "")
            for request in self.requests("metrics")
            for group in request.get("resourceMetrics", [])
            if service_name(group.get("resource", {})) == service
            for scope in group.get("scopeMetrics", [])
            if any(metric["name"] == name for metric in scope.get("metrics", []))
        }

    def log_services(self) -> set[str]:
        return {
            service_name(group.get("resource", {}))
            for request in self.requests("logs")
            for group in request.get("resourceLogs", [])
            if any(scope.get("logRecords") for scope in group.get("scopeLogs", []))
        }


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns("otl-") as name:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name


@pytest.fixture
def received(netns: str, tmp_path: Path) -> Iterator[Received]:
    out = tmp_path / "otlp-requests.jsonl"
    argv = [sys.executable, "-m", "tests.telemetry.otlp_receiver", "--port", str(OTLP_PORT), "--out", str(out)]
    log = (tmp_path / "receiver.log").open("wb")
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", netns, *argv], cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        listening = ["ip", "netns", "exec", netns, "ss", "-ltnH", f"sport = :{OTLP_PORT}"]
        wait_until(
            lambda: bool(subprocess.run(listening, capture_output=True, text=True).stdout.strip()),
            timeout=20,
            what="OTLP receiver listening",
        )
        yield Received(out)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
        log.close()


def test_traces_metrics_and_logs_reach_an_otlp_endpoint(netns: str, received: Received, tmp_path: Path) -> None:
    platform = Platform(netns, tmp_path / "state")
    platform.env.update(
        {
            "ESPLANADE_TELEMETRY__OTLP_ENDPOINT": f"127.0.0.1:{OTLP_PORT}",
            # the SDK's own knobs: export every second, not every 60 s / 5 s
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_BLRP_SCHEDULE_DELAY": "200",
        }
    )
    platform.start()
    try:
        wait_until(platform.all_serving, timeout=60, what="all four services SERVING")
        status, _ = platform.api("PUT", "/api/v1/groups/otlp-marker", {"description": "exported"})
        assert status in (200, 201)

        def write_spans() -> dict[str, dict[str, Any]]:
            """The API write's spans by role, those of one trace: the HTTP server span, the
            audit middleware's, the gRPC client call and the policy service's server span."""
            found: dict[str, dict[str, Any]] = {}
            for service, span in received.spans():
                if service == "esplanade-api" and span["name"] == WRITE:
                    found["http"] = span
                elif service == "esplanade-api" and span["name"] == "PUT /api/v1/groups/otlp-marker":
                    found["audit"] = span
                elif service == "esplanade-api" and span["name"] == PUT_OBJECT:
                    found["client"] = span
                elif service == "esplanade-policy" and span["name"] == PUT_OBJECT:
                    found["server"] = span
            return found

        wait_until(lambda: len(write_spans()) == 4, timeout=30, what="the API write's spans in API and policy")
        spans = write_spans()
        assert len({span["traceId"] for span in spans.values()}) == 1, "one trace from the HTTP request down"
        assert spans["audit"]["parentSpanId"] == spans["http"]["spanId"]
        assert spans["server"]["parentSpanId"] == spans["client"]["spanId"]

        wanted = {f"esplanade-{name}" for name in SERVICES}
        wait_until(
            lambda: wanted <= set(received.metric_names()),
            timeout=30,
            what=f"metrics from every service (have {sorted(received.metric_names())})",
        )
        names = received.metric_names()
        assert "http.server.request.duration" in names["esplanade-api"]
        # exported once, by the API's own meter (FastAPI's native copy is off)
        assert received.metric_scopes("esplanade-api", "http.server.request.duration") == {"esplanade.api"}
        assert all("esplanade.store.request.duration" in names[service] for service in wanted)
        wait_until(
            lambda: wanted <= received.log_services(),
            timeout=30,
            what=f"log records from every service (have {sorted(received.log_services())})",
        )
    finally:
        assert platform.stop() == 0

    exported = received.text()
    assert BOOTSTRAP_TOKEN not in exported
    kek = (tmp_path / "state" / "kek").read_text().strip()
    assert kek and kek not in exported
