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
  expires or is revoked. `keepalive` extends it by its TTL. Writing with a lease that is
  gone raises `LeaseNotFound`. A backend may raise a tiny TTL to its minimum (etcd: about
  1.5x its election timeout, rounded up to seconds): use the TTL `grant_lease` returns.
  When the store restarts, every lease gets its full TTL again (etcd does this).
- **Compaction.** `compact(r)` forgets the history below `r`: the state at `r` and every
  later event stay readable and watchable; a watch starting below `r` gets a `Resync`.
- **Limits** (etcd's defaults, enforced by both backends so code that works on one works
  on the other): keys are non-empty; one transaction holds at most `MAX_TXN_OPS` conditions
  and at most `MAX_TXN_OPS` ops and touches a key at most once; one request is at most
  `MAX_REQUEST_BYTES`. Breaking a limit raises `ValueError` and writes nothing.
- **Errors.** Only `StoreError` subclasses (and `ValueError` for a request that breaks a
  limit) leave a backend: never a gRPC or SQLite exception.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Self

MAX_TXN_OPS = 128  # etcd --max-txn-ops default
MAX_REQUEST_BYTES = 1_500_000  # keys + values of one request; etcd --max-request-bytes is 1.5 MiB with framing


class StoreError(Exception):
    """Base of every error the store raises."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (etcd down, file unreadable). Retry later."""


class CasConflict(StoreError):
    """A compare-and-swap condition did not hold; nothing was written.

    `current` is the key as it is now (None if absent), read in the same atomic step, so a
    read-modify-write loop can retry from it without another round trip. The message
    carries revisions only, never the value.
    """

    def __init__(self, key: str, expected: int, actual: int, current: KeyValue | None = None) -> None:
        super().__init__(f"{key}: expected mod_revision {expected}, found {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual
        self.current = current


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
        """Events under `prefix` from `start_revision` (0: from the revision current when
        iteration starts; to miss nothing, `range` first and watch from its revision + 1).

        The iterator outlives backend outages (it resumes where it left off) and ends when
        the store is closed. Break out of it (or `aclose()` it) to stop watching.
        """

    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> Lease: ...

    @abc.abstractmethod
    async def keepalive(self, lease_id: int) -> int:
        """Extend the lease by its TTL; return the TTL. Raise LeaseNotFound if it is gone."""

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None:
        """Delete the lease and every key attached to it. Raise LeaseNotFound if it is gone."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget history below `revision` (a no-op if already compacted that far).

        Raises ValueError for a revision newer than the current one.
        """

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
