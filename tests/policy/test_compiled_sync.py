"""The compiled-policy sync fails closed on store trouble: a lost watch reloads instead of
stopping for good, and documents land in the store in the order they were compiled (a DNS
refresh never writes back a grant that a later rule change revoked)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from esplanade.policy.compiled_sync import CompiledSync, DnsCache
from esplanade.policy.decode import encode_document, object_to_document
from esplanade.policy.model import KIND_OF
from esplanade.policy.policy_file import load_policy_yaml
from esplanade.policy.store_state import Generation
from esplanade.store import schema
from esplanade.store.base import Compare, Delete, Put, Store, StoreError, TxnResult, WatchItem
from esplanade.store.embedded import EmbeddedStore
from tests.conditions import async_wait_until, holds

POLICY = """
version: 1
sites:
  - {id: hq, networks: [10.50.0.0/16]}
groups:
  - {id: eng}
identities:
  - {id: alice, ike_ids: ["email:alice@corp.test"], groups: [eng]}
resources:
  - {id: web, destination: 10.50.1.10, protocol: tcp, ports: [443], site: hq}
  - {id: wiki, destination: wiki.corp.test, protocol: tcp, ports: [443], site: hq}
rules:
  - {id: eng-web, groups: [eng], resources: [web, wiki]}
"""
WITHOUT_RULE = POLICY.replace("rules:\n  - {id: eng-web, groups: [eng], resources: [web, wiki]}\n", "rules: []\n")


async def write_objects(store: Store, text: str) -> None:
    model = load_policy_yaml(text)
    wanted = {
        schema.policy_object(KIND_OF[type(obj)], obj.id): encode_document(object_to_document(obj))
        for obj in model.objects()
    }
    old, _ = await store.range(schema.prefix("policy"))
    for kv in old:
        if kv.key not in wanted and not kv.key.startswith(schema.prefix("policy", "compiled")):
            await store.delete(kv.key)
    for key, value in wanted.items():
        await store.put(key, value)


async def selectors_of(store: Store, identity: str) -> list[str] | None:
    kv = await store.get(schema.compiled_policy(identity))
    if kv is None:
        return None
    doc = json.loads(kv.value)
    return sorted(s for part in doc["parts"] for s in part["selectors"])


class StoreWrapper:
    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class LosesItsFirstWatch(StoreWrapper):
    """The connection to the store drops once, right after the first read."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.lost = 0

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        if self.lost == 0:
            self.lost += 1
            return self._broken()
        return self.inner.watch(prefix, start_revision)

    async def _broken(self) -> AsyncIterator[WatchItem]:
        raise StoreError("connection to the store lost")
        yield  # pragma: no cover


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with EmbeddedStore(tmp_path / "state.db") as opened:
        yield opened


async def test_a_lost_watch_reloads_so_later_revocations_still_reach_the_store(store: Store) -> None:
    await write_objects(store, POLICY)
    flaky = LosesItsFirstWatch(store)
    sync = CompiledSync(flaky)  # type: ignore[arg-type]
    task = asyncio.create_task(sync.run())
    try:
        await async_wait_until(lambda: selectors_of(store, "alice"), timeout=5, what="alice compiled")
        await async_wait_until(holds(lambda: flaky.lost == 1 and sync.ready.is_set()), timeout=5, what="reloaded")
        await write_objects(store, WITHOUT_RULE)

        async def revoked() -> bool:
            return await selectors_of(store, "alice") == []

        await async_wait_until(revoked, timeout=5, what="the revocation compiled after the outage")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class GatedCommits(StoreWrapper):
    """Holds back the first commit that writes a compiled document granting `held_selector`."""

    def __init__(self, inner: Store, held_selector: str) -> None:
        super().__init__(inner)
        self.held_selector = held_selector
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()
        self.held_written = asyncio.Event()
        self.delivered = 0  # the newest revision the watch handed over

    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        if not self.holding.is_set() and any(
            isinstance(op, Put) and self.held_selector.encode() in op.value for op in ops
        ):
            self.holding.set()
            await self.gate.wait()
            result = await self.inner.commit(conditions, ops)
            self.held_written.set()
            return result
        return await self.inner.commit(conditions, ops)

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        async for item in self.inner.watch(prefix, start_revision):
            self.delivered = max(self.delivered, item.revision)
            yield item


async def test_a_dns_refresh_never_writes_back_a_grant_revoked_meanwhile(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wiki.corp.test resolves; the write of alice's document with wiki is slow; meanwhile eng's
    rule goes. The store must end with alice granted nothing, not with the slow document."""

    async def resolve(name: str) -> list[str]:
        return ["10.50.9.9"]

    monkeypatch.setattr(DnsCache, "resolve", staticmethod(resolve))
    await write_objects(store, POLICY)
    gated = GatedCommits(store, "10.50.9.9/32")
    sync = CompiledSync(gated)  # type: ignore[arg-type]
    task = asyncio.create_task(sync.run())
    try:
        await asyncio.wait_for(gated.holding.wait(), 5)  # the DNS refresh's write is in flight
        _, before = await store.range(schema.prefix("policy"))
        await write_objects(store, WITHOUT_RULE)  # the rule's deletion first, at revision before + 1
        _, revision = await store.range(schema.prefix("policy"))
        await async_wait_until(holds(lambda: gated.delivered > before), timeout=5, what="removal delivered")
        gated.gate.set()
        await asyncio.wait_for(gated.held_written.wait(), 5)

        async def revoked() -> bool:
            return await selectors_of(store, "alice") == []

        await async_wait_until(revoked, timeout=5, what="alice granted nothing")
        await async_wait_until(holds(lambda: sync.revision >= revision), timeout=5, what="sync caught up")
        assert await selectors_of(store, "alice") == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class WatchOutages(StoreWrapper):
    """While `outage` is set, every watch breaks at once, and a live one at its next item."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.outage = True

    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        if self.outage:
            raise StoreError("connection to the store lost")
        async for item in self.inner.watch(prefix, start_revision):
            if self.outage:
                raise StoreError("connection to the store lost")
            yield item


async def test_a_new_outage_after_a_recovery_retries_from_the_first_delay(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("esplanade.policy.compiled_sync.LONGEST_RETRY_SECONDS", 0.4)
    await write_objects(store, POLICY)
    flaky = WatchOutages(store)
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0.001)

    sync = CompiledSync(flaky, sleep=sleep)  # type: ignore[arg-type]
    task = asyncio.create_task(sync.run())
    try:
        await async_wait_until(holds(lambda: len(delays) >= 5), timeout=5, what="a long outage")
        assert delays[:5] == [0.1, 0.2, 0.4, 0.4, 0.4]
        flaky.outage = False
        await async_wait_until(holds(sync.ready.is_set), timeout=5, what="recovered")
        healthy_since = asyncio.get_running_loop().time()
        await async_wait_until(
            holds(lambda: asyncio.get_running_loop().time() - healthy_since > 0.5), timeout=5, what="healthy a while"
        )
        delays.clear()
        flaky.outage = True
        await write_objects(store, WITHOUT_RULE)  # the live watch's next item finds the new outage
        await async_wait_until(holds(lambda: len(delays) >= 2), timeout=5, what="the new outage's retries")
        assert delays[:2] == [0.1, 0.2]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class RecordsCommits(StoreWrapper):
    """Keeps every value the sync writes."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.written: list[bytes] = []

    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        self.written += [op.value for op in ops if isinstance(op, Put)]
        return await self.inner.commit(conditions, ops)


MID_APPLY = """
version: 1
sites:
  - {id: hq, networks: [10.50.0.0/16]}
groups:
  - {id: eng}
  - {id: admins}
identities:
  - {id: alice, ike_ids: ["email:alice@corp.test"], groups: [admins]}
resources:
  - {id: web, destination: 10.50.1.10, protocol: tcp, ports: [443], site: hq}
  - {id: db, destination: 10.50.2.20, protocol: tcp, ports: [5432], site: hq}
rules:
  - {id: admins-all, groups: [admins], resources: [web, db]}
"""


async def test_a_sync_that_starts_during_a_chunked_apply_compiles_its_end_state_only(store: Store) -> None:
    """A chunked apply moves alice from eng to admins (identities chunk) and narrows admins to
    web (rules chunk). The sync (re)loads between the chunks: alice in admins with admins still
    granted db is neither policy, and no compiled document may ever say so."""
    await write_objects(store, MID_APPLY)
    lock = {"id": "0123456789abcdef", "actor": "test", "deadline": 4e9, "generation": 7}
    await store.put(schema.POLICY_GENERATION, Generation(0, 6).next_document(lock))
    recording = RecordsCommits(store)
    sync = CompiledSync(recording)  # type: ignore[arg-type]
    task = asyncio.create_task(sync.run())
    try:
        await async_wait_until(holds(sync.ready.is_set), timeout=5, what="sync loaded")
        narrowed_rule = load_policy_yaml(MID_APPLY.replace("[web, db]", "[web]")).rules["admins-all"]
        rule_document = encode_document(object_to_document(narrowed_rule))
        await store.put(schema.policy_object("rules", "admins-all"), rule_document)  # the rules chunk
        await store.put(schema.POLICY_GENERATION, Generation(0, 7).next_document())  # the lock released

        async def narrowed() -> bool:
            return await selectors_of(store, "alice") == ["10.50.1.10/32[tcp/443]"]

        await async_wait_until(narrowed, timeout=5, what="alice compiled from the applied policy")
        assert not [value for value in recording.written if b"10.50.2.20" in value]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_new_names_arriving_often_do_not_hold_back_the_periodic_re_resolution(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wiki.corp.test moves to another address; meanwhile resources with new names keep coming
    (each one resolved at once). The periodic refresh must still re-resolve wiki, or its old
    address stays granted for as long as new names keep coming."""
    monkeypatch.setattr("esplanade.policy.compiled_sync.DNS_REFRESH_SECONDS", 0.3)
    moved = asyncio.Event()

    async def resolve(name: str) -> list[str]:
        return ["10.50.9.10" if moved.is_set() else "10.50.9.9"] if name == "wiki.corp.test" else []

    monkeypatch.setattr(DnsCache, "resolve", staticmethod(resolve))
    await write_objects(store, POLICY)
    sync = CompiledSync(store)
    task = asyncio.create_task(sync.run())

    async def new_names() -> None:
        for i in range(1000):
            sync.dns(f"new{i}.corp.test")  # what the compiler does when it meets a new name
            await asyncio.sleep(0.05)

    trickle = asyncio.create_task(new_names())
    try:

        async def granted(address: str) -> bool:
            return f"{address}/32[tcp/443]" in (await selectors_of(store, "alice") or [])

        await async_wait_until(lambda: granted("10.50.9.9"), timeout=5, what="wiki resolved")
        moved.set()
        await async_wait_until(lambda: granted("10.50.9.10"), timeout=5, what="wiki re-resolved")
        assert not await granted("10.50.9.9")
    finally:
        trickle.cancel()
        task.cancel()
        await asyncio.gather(task, trickle, return_exceptions=True)
