"""The audit log: every administrative change, with who, what, before/after and the result."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opentelemetry import trace

from esplanade.journal.sqlite_journal import Journal, Page

# Field names whose values never enter the audit log, at any depth.
SECRET_FIELDS = frozenset(
    {"psk", "secret", "private_key", "key", "keys", "token", "password", "encr_key", "integ_key", "kek"}
)
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """A copy of `value` with every secret-named field replaced by a marker."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if str(k).lower() in SECRET_FIELDS else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class AuditLog:
    def __init__(self, path: Path, max_rows: int = 1_000_000, max_age_seconds: float = 365 * 86400) -> None:
        self.journal = Journal(path, "audit", ("actor", "action", "target", "result"), max_rows, max_age_seconds)

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
        result: str = "ok",
        source: str = "",
        detail: str = "",
    ) -> int:
        span_context = trace.get_current_span().get_span_context()
        entry = {
            "time": time.time(),
            "actor": actor,
            "action": action,
            "target": target,
            "before": redact(before),
            "after": redact(after),
            "result": result,
            "source": source,
            "detail": detail,
            "trace_id": format(span_context.trace_id, "032x") if span_context.is_valid else "",
        }
        return self.journal.append(entry)

    def query(self, **filters: Any) -> Page:
        return self.journal.query(**filters)

    def close(self) -> None:
        self.journal.close()
