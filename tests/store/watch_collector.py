"""Run a store watch in the background and collect what it yields."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from esplanade.store.base import EventType, Resync, WatchBatch, WatchEvent, WatchItem


class WatchCollector:
    def __init__(self, items: AsyncIterator[WatchItem]) -> None:
        self.items: list[WatchItem] = []
        self.error: BaseException | None = None
        self._iterator = items
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for item in self._iterator:
                self.items.append(item)
        except Exception as exc:
            self.error = exc
            raise

    @property
    def events(self) -> list[WatchEvent]:
        return [e for item in self.items if isinstance(item, WatchBatch) for e in item.events]

    @property
    def resyncs(self) -> list[Resync]:
        return [item for item in self.items if isinstance(item, Resync)]

    def summary(self) -> list[tuple[str, str, bytes, int]]:
        """(put|delete, key, value, revision) for every event, in order."""
        return [
            ("put" if e.type == EventType.PUT else "delete", e.kv.key, e.kv.value, e.kv.mod_revision)
            for e in self.events
        ]

    @property
    def done(self) -> bool:
        return self._task.done()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await self._iterator.aclose()  # type: ignore[attr-defined]
