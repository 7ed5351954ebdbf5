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
from esplanade.ipsec.spd import SpdPolicy
from esplanade.store import schema
from esplanade.store.base import KeyValue, Put, Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer, encode_document
from tests.dataplane.backend_doubles import FakeBackend
from tests.dataplane.child_sa_records import policy, record


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


class PolicyBatchBackend(BatchBackend):
    """BatchBackend that also installs policies in batches."""

    def __init__(self, persistence: StoreSaPersistence, refuse: frozenset[str] = frozenset()) -> None:
        super().__init__(persistence, refuse)
        self.policy_batches: list[list[str]] = []

    async def install_policies(self, policies: list[SpdPolicy]) -> list[DataplaneError | None]:
        self.policy_batches.append([p.id for p in policies])
        for p in policies:
            if p.id not in self.refuse:
                self.policies[p.id] = p
        return [DataplaneError("refused") if p.id in self.refuse else None for p in policies]


async def test_the_policies_of_one_batch_are_installed_together_and_removals_as_they_come(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    persistence = StoreSaPersistence(store, "n1")
    backend = PolicyBatchBackend(persistence, refuse=frozenset({"p2"}))
    reconciler = Reconciler(store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=persistence)
    first: list[tuple[str, KeyValue | None, int]] = []
    for pid in ("p0", "gone"):
        key = schema.spd_policy(pid)
        await store.put(key, encode_document(policy(pid).to_document()))
        first.append((key, await kv_of(store, key), await store.ping()))
    await reconciler._apply_policies(first)
    assert backend.policy_batches == [["p0", "gone"]]
    events = []
    for pid in ("p1", "p2", "p3"):
        key = schema.spd_policy(pid)
        await store.put(key, encode_document(policy(pid).to_document()))
        events.append((key, await kv_of(store, key), await store.ping()))
    await store.delete(schema.spd_policy("gone"))
    events.append((schema.spd_policy("gone"), None, await store.ping()))
    events.append((schema.spd_policy("p0"), await kv_of(store, schema.spd_policy("p0")), await store.ping()))
    await reconciler._apply_policies(events)
    assert backend.policy_batches[1:] == [["p1", "p2", "p3"]]  # p0 unchanged: no install
    assert backend.calls == ["unpolicy gone"]
    assert set(reconciler.installed_policies) == {"p0", "p1", "p3"}
    assert "refused" in reconciler.errors[schema.spd_policy("p2")]
    for key, _, revision in events:
        error = await reconciler.wait_applied(key, revision)
        assert (error is not None) == key.endswith("/p2")
