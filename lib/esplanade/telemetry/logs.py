"""Structured JSON log lines carrying the current trace and span ids.

Secrets never reach a log: the code that holds keys does not log them, and key-holding
dataclass fields are excluded from reprs. This module only formats.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from opentelemetry import trace

# LogRecord attributes that are not "extra" fields a caller attached.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            line["trace_id"] = format(span_context.trace_id, "032x")
            line["span_id"] = format(span_context.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


def configure_logging(
    service: str, log_format: str = "json", level: str = "info", stream: TextIO | None = None
) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter(service) if log_format == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log per request at INFO would drown the service's own lines.
    for noisy in ("uvicorn.access", "httpx", "aetcd", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def configure_otlp_logs(service: str, otlp_endpoint: str | None, insecure: bool = True, processor: Any = None) -> Any:
    """Also export log records via OTLP (off unless an endpoint or a processor is given): the
    service's own log lines (a handler on the root logger) and records emitted on OpenTelemetry
    loggers directly (the flow log). Returns the LoggerProvider, or None."""
    if not otlp_endpoint and processor is None:
        return None
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    provider = LoggerProvider(resource=Resource.create({"service.name": f"esplanade-{service}"}))
    if processor is not None:
        provider.add_log_record_processor(processor)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        provider.add_log_record_processor(
            BatchLogRecordProcessor(OTLPLogExporter(endpoint=otlp_endpoint, insecure=insecure))
        )
    set_logger_provider(provider)
    logging.getLogger().addHandler(OtlpLogHandler(provider))
    return provider


class OtlpLogHandler(logging.Handler):
    """Hand each log line to an OpenTelemetry logger (trace context included by the SDK)."""

    def __init__(self, provider: Any) -> None:
        super().__init__(logging.INFO)
        self.logger = provider.get_logger("esplanade")

    def emit(self, record: logging.LogRecord) -> None:
        from opentelemetry._logs import SeverityNumber

        try:
            attributes = {
                k: v if isinstance(v, str | int | float | bool) else str(v)
                for k, v in record.__dict__.items()
                if k not in _STANDARD_ATTRS and not k.startswith("_")
            }
            attributes["logger"] = record.name
            self.logger.emit(
                timestamp=int(record.created * 1e9),
                severity_text=record.levelname,
                severity_number=_SEVERITY.get(record.levelno, SeverityNumber.INFO),
                body=record.getMessage(),
                attributes=attributes,
            )
        except Exception:
            self.handleError(record)


def _severities() -> dict[int, Any]:
    from opentelemetry._logs import SeverityNumber

    return {
        logging.DEBUG: SeverityNumber.DEBUG,
        logging.INFO: SeverityNumber.INFO,
        logging.WARNING: SeverityNumber.WARN,
        logging.ERROR: SeverityNumber.ERROR,
        logging.CRITICAL: SeverityNumber.FATAL,
    }


_SEVERITY = _severities()
