from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from esplanade.journal import sqlite_journal
from esplanade.journal.audit import REDACTED, AuditLog
from esplanade.journal.sqlite_journal import Journal


def test_append_query_filter_and_paginate(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "flows", ("identity", "decision"))
    now = time.time()
    for i in range(25):
        journal.append({"time": now + i, "identity": f"u{i % 2}", "decision": "allow", "n": i})
    page = journal.query(equals={"identity": "u1"}, limit=5)
    assert [r["n"] for r in page.records] == [1, 3, 5, 7, 9]
    assert page.next_cursor is not None
    page2 = journal.query(equals={"identity": "u1"}, limit=5, after_id=page.next_cursor)
    assert [r["n"] for r in page2.records] == [11, 13, 15, 17, 19]
    ranged = journal.query(since=now + 20, until=now + 22)
    assert [r["n"] for r in ranged.records] == [20, 21]
    with pytest.raises(ValueError, match="cannot filter"):
        journal.query(equals={"nope": "x"})


def test_retention_bounds_rows_and_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_journal, "TRIM_EVERY", 10)
    journal = Journal(tmp_path / "j.db", "flows", ("identity",), max_rows=50, max_age_seconds=3600)
    old = time.time() - 7200
    journal.append_many([{"time": old, "identity": "old"}] * 5)
    journal.append_many([{"identity": "new", "n": i} for i in range(200)])
    assert journal.count() <= 50 + 10
    assert not journal.query(equals={"identity": "old"}).records


def test_export_json_lines(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "flows", ("identity",))
    journal.append_many([{"identity": "a", "n": i} for i in range(3)])
    out = io.StringIO()
    assert journal.export_jsonl(out) == 3
    assert [json.loads(line)["n"] for line in out.getvalue().splitlines()] == [0, 1, 2]


def test_audit_redacts_secrets_at_any_depth(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    audit.record(
        "admin",
        "connection.update",
        "connections/site-b",
        before={"local": {"auth": "psk", "psk": "old-secret-1"}},
        after={"local": {"auth": "psk", "psk": "new-secret-2"}, "children": [{"private_key": "pk"}]},
    )
    (entry,) = audit.query().records
    assert entry["before"]["local"]["psk"] == REDACTED
    assert entry["after"]["children"][0]["private_key"] == REDACTED
    raw = (tmp_path / "audit.db").read_bytes()
    assert b"old-secret-1" not in raw and b"new-secret-2" not in raw
