"""A bounded append-only journal in SQLite, with retention, filtered queries and JSON-lines export.

Each journal has a fixed set of indexed columns (time plus the fields operators filter on)
and stores the whole record as JSON. Retention keeps at most `max_rows` rows and nothing
older than `max_age_seconds`; trimming runs every `TRIM_EVERY` appends, so the file size
stays bounded without a trim per write.

Table and column names are checked identifiers fixed at construction; every value goes
through SQL parameters, which is why the f-string SQL below is safe (ruff S608).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

TRIM_EVERY = 1000


@dataclass(frozen=True)
class Page:
    records: list[dict[str, Any]]
    next_cursor: int | None  # pass back as `after_id` for the next page


class Journal:
    def __init__(
        self,
        path: Path,
        name: str,
        indexed: Sequence[str],
        max_rows: int = 1_000_000,
        max_age_seconds: float = 30 * 86400,
    ) -> None:
        if not name.isidentifier() or not all(c.isidentifier() for c in indexed):
            raise ValueError("journal and column names must be identifiers")
        self.path = path
        self.name = name
        self.indexed = tuple(indexed)
        self.max_rows = max_rows
        self.max_age_seconds = max_age_seconds
        self._lock = threading.Lock()
        self._since_trim = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        columns = "".join(f", {c} TEXT" for c in self.indexed)
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {name} (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL"
            f"{columns}, record TEXT NOT NULL)"
        )
        self._db.execute(f"CREATE INDEX IF NOT EXISTS {name}_time ON {name}(time)")
        for c in self.indexed:
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {name}_{c} ON {name}({c}, time)")

    def append(self, record: Mapping[str, Any]) -> int:
        return self.append_many([record])[-1]

    def append_many(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        columns = ", ".join(("time", *self.indexed, "record"))
        placeholders = ", ".join("?" for _ in range(len(self.indexed) + 2))
        sql = f"INSERT INTO {self.name} ({columns}) VALUES ({placeholders})"
        ids = []
        with self._lock:
            self._db.execute("BEGIN")
            for record in records:
                row: list[float | str | None] = [float(record.get("time", time.time()))]
                row += [_text(record.get(c)) for c in self.indexed]
                row.append(json.dumps(record, separators=(",", ":"), default=str))
                ids.append(int(self._db.execute(sql, row).lastrowid or 0))
            self._db.execute("COMMIT")
            self._since_trim += len(records)
            if self._since_trim >= TRIM_EVERY:
                self._trim()
                self._since_trim = 0
        return ids

    def _trim(self) -> None:
        cutoff = time.time() - self.max_age_seconds
        self._db.execute(f"DELETE FROM {self.name} WHERE time < ?", (cutoff,))
        self._db.execute(f"DELETE FROM {self.name} WHERE id <= (SELECT MAX(id) FROM {self.name}) - ?", (self.max_rows,))

    def trim(self) -> None:
        with self._lock:
            self._trim()

    def query(
        self,
        equals: Mapping[str, str] | None = None,
        since: float | None = None,
        until: float | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> Page:
        clauses: list[str] = ["id > ?"]
        args: list[float | str] = [after_id]
        for column, value in (equals or {}).items():
            if column not in self.indexed:
                raise ValueError(f"cannot filter {self.name} by {column!r}; filters: {', '.join(self.indexed)}")
            clauses.append(f"{column} = ?")
            args.append(value)
        if since is not None:
            clauses.append("time >= ?")
            args.append(since)
        if until is not None:
            clauses.append("time < ?")
            args.append(until)
        sql = f"SELECT id, record FROM {self.name} WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, [*args, limit + 1]).fetchall()
        records = [json.loads(r[1]) | {"id": r[0]} for r in rows[:limit]]
        return Page(records, rows[limit - 1][0] if len(rows) > limit else None)

    def iterate(self, **filters: Any) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            page = self.query(after_id=after, limit=1000, **filters)
            yield from page.records
            if page.next_cursor is None:
                return
            after = page.next_cursor

    def export_jsonl(self, out: TextIO, **filters: Any) -> int:
        """Write matching records as JSON lines (for a SIEM); return how many."""
        count = 0
        for record in self.iterate(**filters):
            out.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            count += 1
        return count

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM {self.name}").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
