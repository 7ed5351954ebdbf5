"""TokenVerifier's cache never outlives what the store says: nothing is cached until the
watch on token records runs, and a verification that read a record before a change caches
nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from esplanade.api.auth import Scope, TokenVerifier, new_token, token_document
from esplanade.store import schema
from esplanade.store.base import KeyValue, Store
from esplanade.store.embedded import EmbeddedStore
from tests.conditions import async_wait_until, holds


class CountedGets:
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.gets = 0
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str) -> KeyValue | None:
        self.gets += 1
        found = await self.inner.get(key)
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return found


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with EmbeddedStore(tmp_path / "state.db") as opened:
        yield opened


async def a_token(store: Store) -> tuple[str, str]:
    token_id, token = new_token()
    await store.put(schema.api_token(token_id), json.dumps(token_document("t", Scope.OPERATOR, token)).encode())
    return token_id, token


async def test_nothing_is_cached_until_changes_are_followed(store: Store) -> None:
    _, token = await a_token(store)
    counted = CountedGets(store)
    verifier = TokenVerifier(counted, cache_seconds=600)  # type: ignore[arg-type]
    assert await verifier.verify(token) is not None
    assert await verifier.verify(token) is not None
    assert counted.gets == 2
    follower = asyncio.create_task(verifier.follow_changes())
    try:
        await async_wait_until(_following(verifier, token, counted), timeout=5, what="cached once followed")
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    gets = counted.gets
    assert await verifier.verify(token) is not None  # the watch ended: the cache is gone with it
    assert counted.gets == gets + 1


async def test_a_verification_that_read_before_a_change_caches_nothing(store: Store) -> None:
    token_id, token = await a_token(store)
    counted = CountedGets(store)
    verifier = TokenVerifier(counted, cache_seconds=600)  # type: ignore[arg-type]
    follower = asyncio.create_task(verifier.follow_changes())
    try:
        await async_wait_until(_following(verifier, token, counted), timeout=5, what="following")
        verifier.forget(token_id)
        counted.gate = asyncio.Event()
        in_flight = asyncio.create_task(verifier.verify(token))
        await counted.reading.wait()  # it holds the record as it was
        seen = verifier._generation
        await store.delete(schema.api_token(token_id))  # revoked meanwhile
        await async_wait_until(holds(lambda: verifier._generation > seen), timeout=5, what="the watch saw it")
        counted.gate.set()
        assert await in_flight is not None  # it answered from what it read...
        counted.gate = None
        assert await verifier.verify(token) is None  # ...but did not cache it
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


def _following(verifier: TokenVerifier, token: str, counted: CountedGets) -> Any:
    async def cached() -> bool:
        before = counted.gets
        await verifier.verify(token)
        await verifier.verify(token)
        return counted.gets == before + 1

    return cached
