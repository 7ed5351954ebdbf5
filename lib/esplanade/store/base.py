"""The state store contract: an etcd v3 subset that both backends implement exactly.

Semantics (identical on etcd and on the embedded SQLite backend):

- **Revisions.** Every successful write (put, delete, transaction) advances the store-wide
  revision by one. Each key carries `create_revision`, `mod_revision` and `version`.
- **Compare-and-swap.** `put`/`delete` take `expect_mod_revision`; 0 means "the key must not
  exist". A mismatch raises `CasConflict` and writes nothing.
- **Transactions.** `commit()` applies a list of puts and deletes atomically if every
  condition holds, else nothing.
- **Watch.** `watch(prefix, start_revision)` yields batches of events in revision order and
  survives disconnects by resuming from the last delivered revision. If `start_revision` has
  been compacted away, it yields one `Resync` holding a consistent snapshot of the prefix
  and continues after it: a consumer never silently misses an event.
- **Leases.** A key written with a lease disappears (with a delete event) when the lease
  expires or is revoked. `keepalive` extends it by its TTL.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum


class StoreError(Exception):
    """Base of every error the store raises."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (etcd down, file unreadable). Retry later."""


class CasConflict(StoreError):
    """A compare-and-swap condition did not hold; nothing was written."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(f"{key}: expected mod_revision {expected}, found {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual


class LeaseNotFound(StoreError):
    """The lease expired or was revoked."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    kv: KeyValue  # for DELETE: key and mod_revision (the delete's revision); value empty
    prev_value: bytes | None = None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events of one or more revisions, in order. `revision` is the newest one covered."""

    revision: int
    events: tuple[WatchEvent, ...]


@dataclass(frozen=True, slots=True)
class Resync:
    """The watch fell behind a compaction: here is the whole prefix as of `revision`."""

    revision: int
    kvs: tuple[KeyValue, ...]


WatchItem = WatchBatch | Resync


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


@dataclass(frozen=True, slots=True)
class Compare:
    """Holds if the key's mod_revision equals `mod_revision` (0: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    failed: tuple[Compare, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


class Store(abc.ABC):
    """Async key-value store with etcd v3 semantics. Keys are str, values bytes."""

    backend_name: str = "abstract"

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> int:
        """Return the current revision; raise StoreUnavailable if the backend is down."""

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` in key order (at most `limit` if non-zero), and the revision."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None) -> int:
        """Write `key`; return the new revision. See the module doc for CAS."""

    @abc.abstractmethod
    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        """Delete `key`; return whether it existed."""

    @abc.abstractmethod
    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        """Apply every op atomically if every condition holds."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        """Events under `prefix` from `start_revision` (0: from now on)."""

    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> Lease: ...

    @abc.abstractmethod
    async def keepalive(self, lease_id: int) -> int:
        """Extend the lease by its TTL; return the TTL. Raise LeaseNotFound if it is gone."""

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None: ...

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget history at and below `revision`."""

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
