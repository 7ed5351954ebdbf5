"""Key encoding and the contract's request limits, shared by both backends.

Keys are `str` at the API and bytes on the wire and on disk. They are encoded as UTF-8 with
`surrogateescape`, so a key some other tool wrote with invalid UTF-8 still round-trips.
Ranges compare raw bytes (etcd's order, and SQLite's BINARY collation on BLOBs).
"""

from __future__ import annotations

from collections.abc import Sequence

from esplanade.store.base import MAX_REQUEST_BYTES, MAX_TXN_OPS, Compare, Delete, Put


def encode_key(key: str) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, not {type(key).__name__}")
    if not key:
        raise ValueError("store keys must not be empty")
    return key.encode("utf-8", "surrogateescape")


def decode_key(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with `prefix`; None: no end (all keys)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return None


def check_value(value: bytes) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"store values are bytes, not {type(value).__name__}")


def check_put(key: bytes, value: bytes) -> None:
    check_value(value)
    if len(key) + len(value) > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {len(key) + len(value)} bytes exceeds the store limit of {MAX_REQUEST_BYTES}")


def check_lease_ttl(ttl: int) -> None:
    if not isinstance(ttl, int) or ttl < 1:
        raise ValueError(f"lease TTL must be a whole number of seconds >= 1, got {ttl!r}")


def check_txn(conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> None:
    """Raise ValueError if the transaction breaks a limit of the contract."""
    if len(conditions) > MAX_TXN_OPS or len(ops) > MAX_TXN_OPS:
        raise ValueError(f"a transaction holds at most {MAX_TXN_OPS} conditions and {MAX_TXN_OPS} ops")
    size = 0
    for cond in conditions:
        if not isinstance(cond, Compare):
            raise TypeError(f"conditions are Compare, not {type(cond).__name__}")
        if cond.mod_revision < 0:
            raise ValueError(f"negative mod_revision in condition on {cond.key!r}")
        size += len(encode_key(cond.key))
    seen: set[bytes] = set()
    for op in ops:
        if not isinstance(op, Put | Delete):
            raise TypeError(f"ops are Put or Delete, not {type(op).__name__}")
        key = encode_key(op.key)
        if key in seen:
            raise ValueError(f"transaction touches key {op.key!r} twice")
        seen.add(key)
        size += len(key)
        if isinstance(op, Put):
            check_value(op.value)
            size += len(op.value)
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"transaction of {size} bytes exceeds the store limit of {MAX_REQUEST_BYTES}")
