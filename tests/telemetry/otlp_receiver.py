"""An OTLP/gRPC receiver for tests: the collector's three export services (traces, metrics,
logs) over real gRPC, writing every export request it receives as one JSON line
(`{"signal": ..., "request": <the request as protobuf JSON>}`) to a file.

Run it where the exporters can reach it (inside the platform's network namespace):

    python -m tests.telemetry.otlp_receiver --port 4317 --out requests.jsonl
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class RequestLog:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, signal_name: str, request: Any) -> None:
        line = json.dumps({"signal": signal_name, "request": MessageToDict(request)})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


def recording(base: type, response: type, signal_name: str, log: RequestLog) -> Any:
    """A servicer of one export service: each request goes to `log`, answered with an empty
    (full-success) response."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's name
            log.write(signal_name, request)
            return response()

    return Recording()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    log = RequestLog(args.out)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        recording(
            trace_service_pb2_grpc.TraceServiceServicer, trace_service_pb2.ExportTraceServiceResponse, "traces", log
        ),
        server,
    )
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
        recording(
            metrics_service_pb2_grpc.MetricsServiceServicer,
            metrics_service_pb2.ExportMetricsServiceResponse,
            "metrics",
            log,
        ),
        server,
    )
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(
        recording(logs_service_pb2_grpc.LogsServiceServicer, logs_service_pb2.ExportLogsServiceResponse, "logs", log),
        server,
    )
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
