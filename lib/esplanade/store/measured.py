"""A Store that records the latency and outcome of every request it forwards.

`esplanade.store.request.duration` (seconds, histogram) by `operation` (get, range, put,
delete, commit, grant_lease, keepalive, revoke_lease, compact, ping) and `outcome` (ok,
error). Watches are long-lived streams, not requests: they pass through unmeasured.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from esplanade.store.base import Compare, Delete, KeyValue, Lease, Put, Store, TxnResult, WatchItem
from esplanade.telemetry.metrics import meter

T = TypeVar("T")


class MeasuredStore(Store):
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.backend_name = inner.backend_name
        self._duration = meter("store").create_histogram(
            "esplanade.store.request.duration", unit="s", description="Latency of store requests by operation"
        )

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await call
            outcome = "ok"
            return result
        finally:
            attrs = {"operation": operation, "outcome": outcome, "backend": self.backend_name}
            self._duration.record(time.perf_counter() - started, attrs)

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> int:
        return await self._timed("ping", self.inner.ping())

    async def get(self, key: str) -> KeyValue | None:
        return await self._timed("get", self.inner.get(key))

    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        return await self._timed("range", self.inner.range(prefix, limit=limit))

    async def put(self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None) -> int:
        return await self._timed(
            "put", self.inner.put(key, value, lease=lease, expect_mod_revision=expect_mod_revision)
        )

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        return await self._timed("delete", self.inner.delete(key, expect_mod_revision=expect_mod_revision))

    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        return await self._timed("commit", self.inner.commit(conditions, ops))

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        return self.inner.watch(prefix, start_revision)

    async def grant_lease(self, ttl: int) -> Lease:
        return await self._timed("grant_lease", self.inner.grant_lease(ttl))

    async def keepalive(self, lease_id: int) -> int:
        return await self._timed("keepalive", self.inner.keepalive(lease_id))

    async def revoke_lease(self, lease_id: int) -> None:
        await self._timed("revoke_lease", self.inner.revoke_lease(lease_id))

    async def compact(self, revision: int) -> None:
        await self._timed("compact", self.inner.compact(revision))
