"""The flow log: per identity, resource and flow (5-tuple), when it started and ended, its
bytes and packets, and the decision (allow or deny).

Kept per node in a bounded append-only SQLite journal (`Journal`: retention by row count and
age), never in the store. Every record may also go out as one JSON line to a file or stdout
(`export`), for a SIEM. The records come from `esplanade.dataplane.flow_meter`, which
aggregates and rate-limits them. With `telemetry.otlp_endpoint` set, each record also goes
out as an OTLP log record (event `esplanade.flow`).
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from opentelemetry._logs import get_logger

from esplanade.journal.sqlite_journal import Journal, Page

FILTERS = ("identity", "resource", "decision", "connection")
BYTES_PER_ROW = 512  # a generous estimate of one row with its indexes, to turn MB into rows


@dataclass(frozen=True, slots=True)
class FlowRecord:
    start: float  # wall-clock seconds
    end: float
    identity: str
    resource: str
    connection: str
    src: str
    dst: str
    protocol: int
    src_port: int
    dst_port: int
    direction: str  # in | out
    bytes: int
    packets: int
    decision: str  # allow | deny
    reason: str = ""
    node: str = ""
    flows: int = 1  # >1: an aggregate of this many flows (flood protection)

    def document(self) -> dict[str, Any]:
        return asdict(self) | {"time": self.end}


class FlowLog:
    def __init__(
        self,
        path: Path,
        max_rows: int = 1_000_000,
        max_age_seconds: float = 30 * 86400,
        export: TextIO | None = None,
    ) -> None:
        self.journal = Journal(path, "flows", FILTERS, max_rows, max_age_seconds)
        self.export = export
        self._export_lock = threading.Lock()
        self.written = 0
        # OTLP log export of each record (a no-op unless telemetry.otlp_endpoint is set)
        self._otel = get_logger("esplanade.flows")

    @classmethod
    def for_size(cls, path: Path, max_mb: int, max_age_seconds: float, export_to: str = "") -> FlowLog:
        """A flow log bounded to about `max_mb` megabytes; `export_to`: "" (off), "-" (stdout) or a file."""
        export: TextIO | None = None
        if export_to == "-":
            export = sys.stdout
        elif export_to:
            Path(export_to).parent.mkdir(parents=True, exist_ok=True)
            export = open(export_to, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        return cls(path, max(1000, max_mb * (1 << 20) // BYTES_PER_ROW), max_age_seconds, export)

    def record(self, flows: Sequence[FlowRecord]) -> None:
        if not flows:
            return
        documents = [f.document() for f in flows]
        self.journal.append_many(documents)
        self.written += len(documents)
        for document in documents:
            attributes = {k: str(document[k]) for k in FILTERS}
            self._otel.emit(body=document, attributes=attributes, event_name="esplanade.flow")
        if self.export is not None:
            with self._export_lock:
                for document in documents:
                    self.export.write(json.dumps(document, separators=(",", ":")) + "\n")
                self.export.flush()

    def query(
        self,
        equals: Mapping[str, str] | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> Page:
        return self.journal.query(equals=equals, since=since, until=until, after_id=after_id, limit=limit)

    def close(self) -> None:
        self.journal.close()
        if self.export is not None and self.export is not sys.stdout:
            self.export.close()
