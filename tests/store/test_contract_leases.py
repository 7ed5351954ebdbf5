"""The lease contract: expiry deletes keys with delete events, keepalive, revoke; both backends."""

from __future__ import annotations

import asyncio
import time

import pytest

from esplanade.store.base import EventType, LeaseNotFound, Put, Store
from tests.conditions import async_wait_until
from tests.store.watch_collector import WatchCollector


async def test_expiry_deletes_the_keys_with_delete_events(store: Store) -> None:
    lease = await store.grant_lease(1)
    assert lease.id > 0 and lease.ttl >= 1
    start = await store.ping() + 1
    await store.put("/lease/a", b"a", lease=lease.id)
    await store.commit([], [Put("/lease/b", b"b", lease=lease.id), Put("/lease/kept", b"k")])
    kv = await store.get("/lease/a")
    assert kv is not None and kv.lease == lease.id

    watch = WatchCollector(store.watch("/lease/", start))
    try:
        granted = time.monotonic()

        async def deleted() -> bool:
            return await store.get("/lease/a") is None and await store.get("/lease/b") is None

        await async_wait_until(deleted, timeout=lease.ttl + 5, what="the lease to expire")
        assert time.monotonic() - granted >= lease.ttl - 0.5, "keys vanished long before the TTL"
        kept = await store.get("/lease/kept")
        assert kept is not None and kept.lease == 0

        async def two_deletes() -> bool:
            return len([e for e in watch.events if e.type == EventType.DELETE]) >= 2

        await async_wait_until(two_deletes, what="delete events for the leased keys")
        deletes = [e for e in watch.events if e.type == EventType.DELETE]
        assert sorted(e.kv.key for e in deletes) == ["/lease/a", "/lease/b"]
        assert deletes[0].kv.mod_revision == deletes[1].kv.mod_revision, "one revision for the whole lease"
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease.id)
        with pytest.raises(LeaseNotFound):
            await store.put("/lease/c", b"c", lease=lease.id)
    finally:
        await watch.stop()


async def test_keepalive_keeps_the_keys(store: Store) -> None:
    lease = await store.grant_lease(1)
    await store.put("/ka/x", b"x", lease=lease.id)
    until = time.monotonic() + lease.ttl * 2
    while time.monotonic() < until:
        assert await store.keepalive(lease.id) == lease.ttl
        assert await store.get("/ka/x") is not None
        await asyncio.sleep(lease.ttl / 4)
    assert await store.get("/ka/x") is not None


async def test_revoke_deletes_now_and_then_the_lease_is_gone(store: Store) -> None:
    lease = await store.grant_lease(60)
    await store.put("/rv/1", b"1", lease=lease.id)
    await store.put("/rv/2", b"2", lease=lease.id)
    before = await store.ping()
    await store.revoke_lease(lease.id)
    assert await store.range("/rv/") == ([], before + 1)
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await store.revoke_lease(lease.id)


async def test_rewriting_a_key_without_lease_detaches_it(store: Store) -> None:
    lease = await store.grant_lease(60)
    await store.put("/det/x", b"leased", lease=lease.id)
    await store.put("/det/x", b"free")
    await store.revoke_lease(lease.id)
    kv = await store.get("/det/x")
    assert kv is not None and kv.value == b"free" and kv.lease == 0


async def test_revoking_an_empty_lease_writes_nothing(store: Store) -> None:
    lease = await store.grant_lease(60)
    before = await store.ping()
    await store.revoke_lease(lease.id)
    assert await store.ping() == before


async def test_bad_ttl_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.grant_lease(0)
