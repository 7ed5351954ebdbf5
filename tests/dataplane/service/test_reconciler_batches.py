"""A watch batch is applied as one: the newest event per key, one install batch, one store
transaction for the acks, one for the acks and ledger entries of the Child SAs that go."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from esplanade.dataplane.backend import DataplaneError
from esplanade.dataplane.ownership import SaOwnership
from esplanade.dataplane.reconciler import Reconciler, newest_per_key
from esplanade.dataplane.sa_persistence import ChildClaim
from esplanade.dataplane.sequence_ledger import StoreSaPersistence
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.store import schema
from esplanade.store.base import KeyValue, Put, Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer, encode_document
from tests.dataplane.service.test_reconciler import FakeBackend, policy, record


class BatchBackend(FakeBackend):
    """FakeBackend that also installs in batches, claiming sequence blocks as the real one does."""

    def __init__(self, persistence: StoreSaPersistence, refuse: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.persistence = persistence
        self.refuse = refuse
        self.batches: list[list[str]] = []

    async def install_child_sas(self, records: list[ChildSaRecord]) -> list[DataplaneError | None]:
        self.batches.append([r.id for r in records])
        ok = [r for r in records if r.id not in self.refuse]
        await self.persistence.start_children([ChildClaim(r.id, r.outbound.spi, r.inbound.spi) for r in ok], 1000)
        for r in ok:
            self.children[r.id] = r
        return [DataplaneError("refused") if r.id in self.refuse else None for r in records]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with EmbeddedStore(tmp_path / "state.db") as opened:
        yield opened


def sealed(sealer: Sealer, rec: ChildSaRecord) -> Put:
    key = schema.child_sa(rec.id)
    return Put(key, encode_document(rec.to_document(sealer.bind(key).seal)))


async def kv_of(store: Store, key: str) -> KeyValue:
    kv = await store.get(key)
    assert kv is not None
    return kv


def test_the_newest_event_of_each_key_counts() -> None:
    kv = KeyValue("k", b"", 1, 1, 1)
    latest = newest_per_key([("a", kv, 1), ("b", kv, 2), ("a", None, 3), ("c", kv, 4), ("b", kv, 5)])
    assert list(latest.items()) == [("a", (None, 3)), ("c", (kv, 4)), ("b", (kv, 5))]


async def test_one_batch_installs_together_and_acks_in_one_transaction(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    persistence = StoreSaPersistence(store, "n1")
    backend = BatchBackend(persistence, refuse=frozenset({"c3"}))
    reconciler = Reconciler(store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=persistence)
    records = [record(f"c{i}", 0x1000 + 16 * i) for i in range(5)]
    await store.commit([], [sealed(sealer, r) for r in records])
    events = [(schema.child_sa(r.id), await kv_of(store, schema.child_sa(r.id)), 2) for r in records]
    before = await store.ping()
    await reconciler._apply_children(events)
    assert backend.batches == [[r.id for r in records]]
    assert await store.ping() == before + 2  # one ledger transaction, one for the acks
    acks, _ = await store.range(schema.prefix("dataplane", "acks"))
    assert sorted(kv.key for kv in acks) == sorted(schema.install_ack(f"c{i}", "n1") for i in (0, 1, 2, 4))
    assert {json.loads(kv.value)["inbound_spi"] for kv in acks} == {0x1000 + 16 * i for i in (0, 1, 2, 4)}
    assert set(reconciler.installed) == {"c0", "c1", "c2", "c4"}
    assert "refused" in reconciler.errors[schema.child_sa("c3")]
    for i in (0, 1, 2, 4):
        reservation = json.loads((await kv_of(store, schema.sequence_reservation(0x1000 + 16 * i + 1))).value)
        assert (reservation["upto"], reservation["child_sa"]) == (1000, f"c{i}")

    # all of them go in one batch: acks and ledger entries in one transaction
    for r in records:
        await store.delete(schema.child_sa(r.id))
    before = await store.ping()
    await reconciler._apply_children([(schema.child_sa(r.id), None, before) for r in records])
    assert await store.ping() == before + 1
    assert reconciler.installed == {} and backend.children == {}
    assert (await store.range(schema.prefix("dataplane")))[0] == []


async def test_a_policy_changed_several_times_in_one_batch_is_installed_once(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    persistence = StoreSaPersistence(store, "n1")
    backend = BatchBackend(persistence)
    reconciler = Reconciler(store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=persistence)
    key = schema.spd_policy("p1")
    events = []
    for n in range(3):
        changed = policy("p1")
        document = {**changed.to_document(), "priority": 100 + n}
        await store.put(key, encode_document(document))
        events.append((key, await kv_of(store, key), await store.ping()))
    await reconciler._apply_policies(events)
    assert backend.calls == ["policy p1"]
    assert backend.policies["p1"].priority == 102
    assert await reconciler.wait_applied(key, events[0][2]) is None  # earlier revisions count as applied


async def test_the_watch_hands_one_transaction_over_as_one_batch(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    persistence = StoreSaPersistence(store, "n1")
    backend = BatchBackend(persistence)
    reconciler = Reconciler(store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=persistence)
    task = asyncio.create_task(reconciler.run())
    try:
        await asyncio.wait_for(reconciler.ready.wait(), 10)
        records = [record(f"w{i}", 0x2000 + 16 * i) for i in range(3)]
        result = await store.commit([], [sealed(sealer, r) for r in records])
        for r in records:
            assert await asyncio.wait_for(reconciler.wait_applied(schema.child_sa(r.id), result.revision), 10) is None
        assert backend.batches == [["w0", "w1", "w2"]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
