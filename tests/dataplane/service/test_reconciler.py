"""The reconciler makes the backend follow the store: at start, on every change, after a Resync."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from esplanade.dataplane.backend import (
    DataplaneError,
    Unsupported,
)
from esplanade.dataplane.ownership import OwnerRecord, SaOwnership
from esplanade.dataplane.reconciler import Reconciler
from esplanade.dataplane.sa_persistence import MemorySaPersistence
from esplanade.ipsec.sa import ChildSaRecord, Lifetime
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import Mode
from esplanade.store import schema
from esplanade.store.base import Resync, Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer, encode_document
from tests.conditions import async_wait_until
from tests.dataplane.backend_doubles import FakeBackend
from tests.dataplane.child_sa_records import policy, put_record, record


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with EmbeddedStore(tmp_path / "state.db") as opened:
        yield opened


async def test_what_the_store_holds_at_start_is_installed_then_changes_follow(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    await put_record(store, sealer, record("before", 0x1000))
    await store.put(schema.spd_policy("p1"), encode_document(policy("p1").to_document()))
    backend, persistence = FakeBackend(), MemorySaPersistence()
    reconciler = Reconciler(store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=persistence)
    task = asyncio.create_task(reconciler.run())
    try:
        await asyncio.wait_for(reconciler.ready.wait(), 10)
        assert backend.calls == ["policy p1", "install before"]
        assert await store.get(schema.install_ack("before", "n1")) is not None

        revision = await put_record(store, sealer, record("later", 0x2000))
        assert await reconciler.wait_applied(schema.child_sa("later"), revision) is None
        assert "later" in backend.children and await store.get(schema.install_ack("later", "n1")) is not None

        revision = await put_record(store, sealer, record("later", 0x2000, lifetime=Lifetime(hard_seconds=60)))
        assert await reconciler.wait_applied(schema.child_sa("later"), revision) is None
        assert backend.calls[-1] == "update later"

        refused = await put_record(store, sealer, record("transport", 0x3000, mode=Mode.TRANSPORT))
        error = await reconciler.wait_applied(schema.child_sa("transport"), refused)
        assert isinstance(error, Unsupported)
        assert "transport" not in backend.children and "transport" in str(reconciler.errors)

        persistence.replay[0x2000] = 99
        await store.delete(schema.child_sa("later"))
        await async_wait_until(lambda: _async_value("later" not in backend.children), timeout=10, what="uninstalled")
        assert await store.get(schema.install_ack("later", "n1")) is None
        assert 0x2000 not in persistence.replay, "a deleted Child SA's ledger entries go with it"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unreadable_records_are_reported_not_installed(store: Store) -> None:
    other = Sealer(Keyring.generate("other"))
    revision = await put_record(store, other, record("foreign", 0x4000))
    backend = FakeBackend()
    reconciler = Reconciler(
        store, Sealer(Keyring.generate()), backend, "n1", ownership=SaOwnership("n1"), persistence=MemorySaPersistence()
    )
    task = asyncio.create_task(reconciler.run())
    try:
        error = await asyncio.wait_for(reconciler.wait_applied(schema.child_sa("foreign"), revision), 10)
        assert error is not None and "not a readable Child SA" in str(error)
        assert backend.children == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_resync_removes_what_vanished_and_installs_what_appeared(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    backend = FakeBackend()
    reconciler = Reconciler(
        store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=MemorySaPersistence()
    )
    await put_record(store, sealer, record("old", 0x5000))
    await reconciler._apply_child(schema.child_sa("old"), await store.get(schema.child_sa("old")), 1)
    await store.delete(schema.child_sa("old"))
    await put_record(store, sealer, record("new", 0x6000))
    kvs, revision = await store.range(schema.prefix("sas", "child"))
    await reconciler._resync_children(Resync(revision, tuple(kvs)))
    assert set(backend.children) == {"new"}


async def _async_value(value: bool) -> bool:
    return value


async def test_a_policy_naming_a_child_sa_not_seen_yet_waits_for_it(store: Store) -> None:
    """A rekey writes the new record and the re-pointed policy in one transaction; the two
    prefixes are watched separately, so the policy may come first: it waits for the record
    (never pointing traffic at an SA not installed yet), and on its own after a bound."""
    sealer = Sealer(Keyring.generate())
    backend = FakeBackend()
    reconciler = Reconciler(
        store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=MemorySaPersistence()
    )
    reconciler.ready.set()
    old = record("old", 0x7000)
    await put_record(store, sealer, old)
    await reconciler._apply_child(schema.child_sa("old"), await store.get(schema.child_sa("old")), 1)
    moved = SpdPolicy(
        "p1",
        PolicyDirection.OUT,
        TrafficSelector.from_network("10.1.0.0/16"),
        TrafficSelector.from_network("10.2.0.0/16"),
        child_sa="new",
    )
    await store.put(schema.spd_policy("p1"), encode_document(moved.to_document()))
    kv = await store.get(schema.spd_policy("p1"))
    await reconciler._apply_policy(kv.key, kv, kv.mod_revision)  # type: ignore[union-attr]
    assert "p1" not in backend.policies  # the record of "new" has not been seen yet
    await put_record(store, sealer, record("new", 0x7001))
    await reconciler._apply_child(schema.child_sa("new"), await store.get(schema.child_sa("new")), 3)
    assert backend.calls[-2:] == ["install new", "policy p1"]
    # a policy naming a Child SA that never comes is applied after the bound (fail closed)
    ghost = SpdPolicy(
        "p2",
        PolicyDirection.OUT,
        TrafficSelector.from_network("10.1.0.0/16"),
        TrafficSelector.from_network("10.3.0.0/16"),
        child_sa="ghost",
    )
    await store.put(schema.spd_policy("p2"), encode_document(ghost.to_document()))
    kv = await store.get(schema.spd_policy("p2"))
    await reconciler._apply_policy(kv.key, kv, kv.mod_revision)  # type: ignore[union-attr]
    assert "p2" not in backend.policies
    await async_wait_until(lambda: _async_value("p2" in backend.policies), timeout=5, what="applied after the bound")


class BatchingBackend(FakeBackend):
    """A backend with `install_child_sas`: fresh installs arrive together."""

    async def install_child_sas(self, records: list[ChildSaRecord]) -> list[DataplaneError | None]:
        self.calls.append("batch " + " ".join(r.id for r in records))
        outcomes: list[DataplaneError | None] = []
        for rec in records:
            if rec.inbound.mode == Mode.TRANSPORT:
                outcomes.append(Unsupported("no transport mode here"))
            else:
                self.children[rec.id] = rec
                outcomes.append(None)
        return outcomes


async def test_fresh_installs_go_together_after_the_removals_and_failures_stay_per_sa(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    backend = BatchingBackend()
    reconciler = Reconciler(
        store, sealer, backend, "n1", ownership=SaOwnership("n1"), persistence=MemorySaPersistence()
    )
    await put_record(store, sealer, record("gone", 0x8000))
    await reconciler._apply_child(schema.child_sa("gone"), await store.get(schema.child_sa("gone")), 1)
    await store.delete(schema.child_sa("gone"))
    reconciler.records.pop("gone")
    for rec in (record("a", 0x9000), record("b", 0x9100), record("t", 0x9200, mode=Mode.TRANSPORT)):
        await put_record(store, sealer, rec)
        reconciler.records[rec.id] = rec
    backend.calls.clear()

    errors = await reconciler.reevaluate(["a", "gone", "b", "t"])

    assert backend.calls == ["delete gone", "batch a b t"]
    assert set(errors) == {"t"} and "transport" in errors["t"]
    assert set(reconciler.installed) == {"a", "b"}
    assert await store.get(schema.install_ack("a", "n1")) is not None
    assert await store.get(schema.install_ack("t", "n1")) is None


async def test_reevaluate_moves_sas_through_the_hooks_and_offline_leaves_the_store_alone(store: Store) -> None:
    """Ownership moved: SAs taken over get the enforcement hook before their ack; SAs given up
    while the store is out of reach leave the backend only (acks and ledger stay for the next owner)."""
    sealer = Sealer(Keyring.generate())
    backend, persistence = BatchingBackend(), MemorySaPersistence()
    ownership = SaOwnership("n1", mode="rendezvous", lease_id=lambda: 7)
    reconciler = Reconciler(store, sealer, backend, "n1", ownership=ownership, persistence=persistence, lease=lambda: 0)
    seen: list[str] = []

    async def installed(rec: ChildSaRecord) -> None:
        assert await store.get(schema.install_ack(rec.id, "n1")) is None  # the hook goes before the ack
        seen.append(f"installed {rec.id}")

    async def removed(child_id: str) -> None:
        seen.append(f"removed {child_id}")

    reconciler.on_installed.append(installed)
    reconciler.on_removed.append(removed)
    for rec in (record("a", 0x9000), record("b", 0x9100)):
        await put_record(store, sealer, rec)
        reconciler.records[rec.id] = rec
    assert await reconciler.reevaluate(["a", "b"]) == {}
    assert backend.calls == []  # not owned yet: nothing to do

    ownership.owners = {c: OwnerRecord("n1", 7, 1) for c in ("a", "b")}
    assert await reconciler.reevaluate(["a", "b"]) == {}
    assert backend.calls == ["batch a b"]
    assert seen == ["installed a", "installed b"]
    assert await store.get(schema.install_ack("a", "n1")) is not None
    await persistence.start_child("a", 0x9001, 0x9000, 1000)
    await store.delete(schema.child_sa("a"))
    reconciler.records.pop("a")  # gone from the store too: online this would forget its ledger

    ownership.lease_valid = lambda: False  # partition
    assert await reconciler.reevaluate(["a", "b"], offline=True) == {}
    assert backend.calls[1:] == ["delete a", "delete b"]
    assert seen[2:] == ["removed a", "removed b"]
    assert reconciler.installed == {}
    assert await store.get(schema.install_ack("a", "n1")) is not None  # goes with the lease
    assert await store.get(schema.install_ack("b", "n1")) is not None
    assert 0x9001 in persistence.sequence  # the ledger entries stay
