"""The kine-style log on SQLite: schema, the write operations, the reads.

Everything here is synchronous and runs in the embedded store's writer or reader threads.
A write operation is a closure `(db, state, now) -> result` applied inside the writer's
transaction; raising a StoreError (failed CAS, lease gone) or ValueError means it wrote
nothing (the writer rolls back its savepoint). See `esplanade.store.embedded` for the design.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esplanade.store.base import (
    CasConflict,
    Compare,
    Delete,
    EventType,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    StoreUnavailable,
    TxnResult,
    WatchEvent,
)
from esplanade.store.request_rules import (
    check_lease_ttl,
    check_put,
    check_txn,
    decode_key,
    encode_key,
    prefix_end,
)

SCHEMA_VERSION = 1

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    revision INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    key BLOB NOT NULL,
    deleted INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS log_revision ON log (revision);
CREATE UNIQUE INDEX IF NOT EXISTS log_key_revision ON log (key, revision);
CREATE TABLE IF NOT EXISTS current (
    key BLOB PRIMARY KEY,
    log_id INTEGER NOT NULL,
    lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS current_lease ON current (lease);
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    deadline REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_deadline ON lease (deadline);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 1), ('compact_revision', 0), ('schema', 1);
"""

_KV_COLUMNS = "l.key, l.value, l.create_revision, l.revision, l.version, l.lease"


def _kv(row: Sequence[Any]) -> KeyValue:
    return KeyValue(
        key=decode_key(row[0]),
        value=bytes(row[1]),
        create_revision=row[2],
        mod_revision=row[3],
        version=row[4],
        lease=row[5],
    )


def prefix_clause(prefix: str) -> tuple[str, tuple[bytes, ...]]:
    """SQL condition on column `key` (of alias l or c) for every key under `prefix`."""
    if not prefix:
        return "1", ()
    start = encode_key(prefix)
    end = prefix_end(start)
    if end is None:
        return "{col} >= ?", (start,)
    return "{col} >= ? AND {col} < ?", (start, end)


def database_error(path: Path, exc: sqlite3.Error) -> StoreUnavailable:
    return StoreUnavailable(f"embedded store {path}: {exc}")


class LeaseGone:
    """Result of a lease op that found the lease expired, after revoking it."""


LEASE_GONE = LeaseGone()


# ---------------------------------------------------------------------------------------
# The write side: what runs inside the writer thread's transaction.
# ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class WriteState:
    """The writer's view during one group transaction."""

    revision: int
    seq: int = 0
    written: list[tuple[int, bytes]] = field(default_factory=list)  # (revision, key) of every log row

    def next_revision(self) -> int:
        self.revision += 1
        self.seq = 0
        return self.revision


@dataclass(slots=True)
class _Current:
    log_id: int
    revision: int
    create_revision: int
    version: int


def _current(db: sqlite3.Connection, key: bytes) -> _Current | None:
    row = db.execute(
        "SELECT l.id, l.revision, l.create_revision, l.version FROM current c JOIN log l ON l.id = c.log_id"
        " WHERE c.key = ?",
        (key,),
    ).fetchone()
    return _Current(*row) if row else None


def _lease_alive(db: sqlite3.Connection, lease: int, now: float) -> bool:
    row = db.execute("SELECT deadline FROM lease WHERE id = ?", (lease,)).fetchone()
    return row is not None and row[0] > now


def _write_put(db: sqlite3.Connection, state: WriteState, key: bytes, value: bytes, lease: int) -> None:
    cur = _current(db, key)
    revision = state.revision
    state.seq += 1
    state.written.append((revision, key))
    log_id = db.execute(
        "INSERT INTO log (revision, seq, key, deleted, create_revision, prev_revision, version, lease, value)"
        " VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?)",
        (
            revision,
            state.seq,
            key,
            cur.create_revision if cur else revision,
            cur.revision if cur else 0,
            cur.version + 1 if cur else 1,
            lease,
            bytes(value),
        ),
    ).lastrowid
    db.execute("INSERT OR REPLACE INTO current (key, log_id, lease) VALUES (?, ?, ?)", (key, log_id, lease))


def _write_delete(db: sqlite3.Connection, state: WriteState, key: bytes, cur: _Current) -> None:
    state.seq += 1
    state.written.append((state.revision, key))
    db.execute(
        "INSERT INTO log (revision, seq, key, deleted, create_revision, prev_revision, version, lease, value)"
        " VALUES (?, ?, ?, 1, 0, ?, 0, 0, x'')",
        (state.revision, state.seq, key, cur.revision),
    )
    db.execute("DELETE FROM current WHERE key = ?", (key,))


def op_put(
    key: str, value: bytes, lease: int, expect: int | None
) -> Callable[[sqlite3.Connection, WriteState, float], int]:
    raw = encode_key(key)
    check_put(raw, value)

    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> int:
        if expect is not None:
            cur = _current(db, raw)
            actual = cur.revision if cur else 0
            if actual != expect:
                raise CasConflict(key, expect, actual, get_current(db, raw))
        if lease and not _lease_alive(db, lease, now):
            raise LeaseNotFound(f"lease {lease:x} expired or was revoked")
        state.next_revision()
        _write_put(db, state, raw, value, lease)
        return state.revision

    return apply


def op_delete(key: str, expect: int | None) -> Callable[[sqlite3.Connection, WriteState, float], bool]:
    raw = encode_key(key)

    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> bool:
        cur = _current(db, raw)
        if expect is not None and (cur.revision if cur else 0) != expect:
            raise CasConflict(key, expect, cur.revision if cur else 0, get_current(db, raw))
        if cur is None:
            return False
        state.next_revision()
        _write_delete(db, state, raw, cur)
        return True

    return apply


def op_commit(
    conditions: Sequence[Compare], ops: Sequence[Put | Delete]
) -> Callable[[sqlite3.Connection, WriteState, float], TxnResult]:
    check_txn(conditions, ops)
    conds = [(c, encode_key(c.key)) for c in conditions]
    steps = [(op, encode_key(op.key)) for op in ops]

    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> TxnResult:
        failed = []
        for cond, raw in conds:
            cur = _current(db, raw)
            if (cur.revision if cur else 0) != cond.mod_revision:
                failed.append(cond)
        if failed:
            return TxnResult(succeeded=False, revision=state.revision, failed=tuple(failed))
        for op, _ in steps:
            if isinstance(op, Put) and op.lease and not _lease_alive(db, op.lease, now):
                raise LeaseNotFound(f"lease {op.lease:x} expired or was revoked")
        changes: list[tuple[Put | Delete, bytes, _Current | None]] = []
        for op, raw in steps:
            cur = _current(db, raw)
            if isinstance(op, Put) or cur is not None:
                changes.append((op, raw, cur))
        if changes:
            state.next_revision()
            for op, raw, cur in changes:
                if isinstance(op, Put):
                    _write_put(db, state, raw, op.value, op.lease)
                else:
                    assert cur is not None
                    _write_delete(db, state, raw, cur)
        return TxnResult(succeeded=True, revision=state.revision)

    return apply


def _revoke(db: sqlite3.Connection, state: WriteState, lease_id: int) -> None:
    """Delete the lease's keys (one revision for all, as etcd does) and the lease."""
    keys = [row[0] for row in db.execute("SELECT key FROM current WHERE lease = ? ORDER BY key", (lease_id,))]
    if keys:
        state.next_revision()
        for key in keys:
            cur = _current(db, key)
            assert cur is not None
            _write_delete(db, state, key, cur)
    db.execute("DELETE FROM lease WHERE id = ?", (lease_id,))


def op_grant(ttl: int) -> Callable[[sqlite3.Connection, WriteState, float], Lease]:
    check_lease_ttl(ttl)

    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> Lease:
        while True:
            lease_id = secrets.randbits(63) or 1
            try:
                db.execute("INSERT INTO lease (id, ttl, deadline) VALUES (?, ?, ?)", (lease_id, ttl, now + ttl))
            except sqlite3.IntegrityError:
                continue
            return Lease(id=lease_id, ttl=ttl)

    return apply


def op_keepalive(lease_id: int) -> Callable[[sqlite3.Connection, WriteState, float], int | LeaseGone]:
    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> int | LeaseGone:
        row = db.execute("SELECT ttl, deadline FROM lease WHERE id = ?", (lease_id,)).fetchone()
        if row is None:
            raise LeaseNotFound(f"lease {lease_id:x} expired or was revoked")
        ttl, deadline = row
        if deadline <= now:
            _revoke(db, state, lease_id)
            return LEASE_GONE
        db.execute("UPDATE lease SET deadline = ? WHERE id = ?", (now + ttl, lease_id))
        return int(ttl)

    return apply


def op_revoke(lease_id: int) -> Callable[[sqlite3.Connection, WriteState, float], None]:
    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> None:
        if db.execute("SELECT 1 FROM lease WHERE id = ?", (lease_id,)).fetchone() is None:
            raise LeaseNotFound(f"lease {lease_id:x} expired or was revoked")
        _revoke(db, state, lease_id)

    return apply


def op_expire(lease_ids: Sequence[int]) -> Callable[[sqlite3.Connection, WriteState, float], int]:
    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> int:
        expired = 0
        for lease_id in lease_ids:
            row = db.execute("SELECT deadline FROM lease WHERE id = ?", (lease_id,)).fetchone()
            if row is not None and row[0] <= now:  # another process may have swept or renewed it
                _revoke(db, state, lease_id)
                expired += 1
        return expired

    return apply


def op_renew_all() -> Callable[[sqlite3.Connection, WriteState, float], None]:
    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> None:
        db.execute("UPDATE lease SET deadline = ? + ttl", (now,))

    return apply


def op_compact(revision: int) -> Callable[[sqlite3.Connection, WriteState, float], None]:
    def apply(db: sqlite3.Connection, state: WriteState, now: float) -> None:
        compacted = db.execute("SELECT value FROM meta WHERE name = 'compact_revision'").fetchone()[0]
        if revision > state.revision:
            raise ValueError(f"cannot compact revision {revision}: it is in the future (current {state.revision})")
        if revision <= compacted:
            return
        db.execute(
            "DELETE FROM log WHERE revision < :r AND (deleted = 1 OR EXISTS ("
            " SELECT 1 FROM log n WHERE n.key = log.key AND n.revision > log.revision AND n.revision <= :r))",
            {"r": revision},
        )
        db.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (revision,))

    return apply


WriteOp = Callable[[sqlite3.Connection, WriteState, float], Any]


def get_current(db: sqlite3.Connection, key: bytes) -> KeyValue | None:
    row = db.execute(
        f"SELECT {_KV_COLUMNS} FROM current c JOIN log l ON l.id = c.log_id WHERE c.key = ?",  # noqa: S608 - constant
        (key,),
    ).fetchone()
    return _kv(row) if row else None


# -- reads (reader threads) ------------------------------------------------------------
def read_revision(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])


def read_revisions(db: sqlite3.Connection) -> tuple[int, int]:
    rows = dict(db.execute("SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')").fetchall())
    return int(rows["revision"]), int(rows["compact_revision"])


def expired_leases(db: sqlite3.Connection, now: float) -> list[int]:
    return [row[0] for row in db.execute("SELECT id FROM lease WHERE deadline <= ? LIMIT 64", (now,))]


def snapshot(db: sqlite3.Connection, prefix: str, limit: int) -> tuple[list[KeyValue], int]:
    """The prefix and the revision, read in one transaction (a consistent snapshot)."""
    clause, params = prefix_clause(prefix)
    # Only constants and placeholders go into the SQL text.
    sql = (
        f"SELECT {_KV_COLUMNS} FROM current c JOIN log l ON l.id = c.log_id"  # noqa: S608
        f" WHERE {clause.format(col='c.key')} ORDER BY c.key"
    )
    if limit:
        sql += f" LIMIT {int(limit)}"
    db.execute("BEGIN")
    try:
        revision = read_revision(db)
        kvs = [_kv(row) for row in db.execute(sql, params)]
    finally:
        db.execute("COMMIT")
    return kvs, revision


def fetch_events(
    db: sqlite3.Connection, clause: str, params: tuple[bytes, ...], after: int, upto: int
) -> list[WatchEvent] | None:
    """Events with after < revision <= upto, in order; None if compaction took some."""
    db.execute("BEGIN")
    try:
        compacted = db.execute("SELECT value FROM meta WHERE name = 'compact_revision'").fetchone()[0]
        if after + 1 < compacted:
            return None
        # Only constants and placeholders go into the SQL text.
        sql = (
            "SELECT l.key, l.value, l.create_revision, l.revision, l.version, l.lease, l.deleted, p.value"  # noqa: S608
            " FROM log l LEFT JOIN log p ON p.key = l.key AND p.revision = l.prev_revision"
            f" WHERE l.revision > ? AND l.revision <= ? AND {clause.format(col='l.key')} ORDER BY l.id"
        )
        rows = db.execute(
            sql,
            (after, upto, *params),
        ).fetchall()
    finally:
        db.execute("COMMIT")
    events = []
    for row in rows:
        prev = bytes(row[7]) if row[7] is not None else None
        if row[6]:
            kv = KeyValue(key=decode_key(row[0]), value=b"", create_revision=0, mod_revision=row[3], version=0)
            events.append(WatchEvent(type=EventType.DELETE, kv=kv, prev_value=prev))
        else:
            events.append(WatchEvent(type=EventType.PUT, kv=_kv(row[:6]), prev_value=prev))
    return events
