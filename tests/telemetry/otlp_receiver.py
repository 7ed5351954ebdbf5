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


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, log: RequestLog) -> None:
        self.log = log

    def Export(self, request: Any, context: Any) -> Any:
        self.log.write("traces", request)
        return trace_service_pb2.ExportTraceServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, log: RequestLog) -> None:
        self.log = log

    def Export(self, request: Any, context: Any) -> Any:
        self.log.write("metrics", request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, log: RequestLog) -> None:
        self.log = log

    def Export(self, request: Any, context: Any) -> Any:
        self.log.write("logs", request)
        return logs_service_pb2.ExportLogsServiceResponse()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    log = RequestLog(args.out)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(log), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(log), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(log), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
