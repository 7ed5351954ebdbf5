"""The store ledger of sequence blocks and replay floors (`StoreSaPersistence`), on both store backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from esplanade.dataplane.sa_persistence import ChildClaim
from esplanade.dataplane.sequence_ledger import StoreSaPersistence
from esplanade.store import schema
from esplanade.store.base import Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.etcd import EtcdStore
from tests.etcd_server import EtcdServer

SPI = 0xC0FFEE01


@pytest.fixture(params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "embedded":
        opened: Store = EmbeddedStore(tmp_path / "state.db")
    else:
        server: EtcdServer = request.getfixturevalue("etcd_server")
        opened = EtcdStore([server.endpoint], timeout=3.0)
    await opened.connect()
    try:
        yield opened
    finally:
        await opened.close()


async def stored(store: Store, key: str) -> dict[str, object]:
    kv = await store.get(key)
    assert kv is not None
    document: dict[str, object] = json.loads(kv.value)
    return document


async def test_a_successor_starts_after_everything_ever_reserved(store: Store) -> None:
    first = StoreSaPersistence(store, "n1")
    assert await first.start_outbound("c1", SPI, 1000) == (1, 1000)
    assert await first.reserve("c1", SPI, 1750) == 1750
    assert await first.reserve("c1", SPI, 2500) == 2500
    successor = StoreSaPersistence(store, "n1")  # the same node after a crash: a new incarnation
    assert await successor.start_outbound("c1", SPI, 1000) == (2501, 3500)
    assert (await stored(store, schema.sequence_reservation(SPI)))["upto"] == 3500


async def test_the_old_incarnation_may_not_reserve_after_a_successor_took_over(store: Store) -> None:
    old = StoreSaPersistence(store, "n1")
    await old.start_outbound("c1", SPI, 1000)
    successor = StoreSaPersistence(store, "n2")
    await successor.start_outbound("c1", SPI, 1000)
    assert await old.reserve("c1", SPI, 1750) is None  # two senders under one SA: the old one stops
    assert await successor.reserve("c1", SPI, 2750) == 2750


async def test_a_reservation_never_lowers_the_ledger(store: Store) -> None:
    ledger = StoreSaPersistence(store, "n1")
    await ledger.start_outbound("c1", SPI, 1000)
    assert await ledger.reserve("c1", SPI, 5000) == 5000
    assert await ledger.reserve("c1", SPI, 3000) == 5000  # already durable (a lost answer, retried)
    assert (await stored(store, schema.sequence_reservation(SPI)))["upto"] == 5000


async def test_replay_floors_only_rise_and_belong_to_their_child_sa(store: Store) -> None:
    ledger = StoreSaPersistence(store, "n1")
    assert await ledger.replay_floor("c1", SPI) == 0
    await ledger.persist_replay_floor("c1", SPI, 65536)
    await ledger.persist_replay_floor("c1", SPI, 4096)
    assert await ledger.replay_floor("c1", SPI) == 65536
    assert await ledger.replay_floor("another", SPI) == 0  # an earlier SA's floor is not ours
    await ledger.forget("c1", SPI, SPI + 1)
    assert await store.get(schema.replay_high_water(SPI)) is None


async def test_a_graceful_hand_over_sets_the_floor_to_the_exact_top(store: Store) -> None:
    old, new = StoreSaPersistence(store, "n1"), StoreSaPersistence(store, "n2")
    await old.persist_replay_floor("c1", SPI, 65536 + 700)  # block-ahead while it was running
    await old.hand_over_replay_floor("c1", SPI, 700)  # removed: it accepted nothing above 700
    assert await new.replay_floor("c1", SPI) == 700
    await old.hand_over_replay_floor("another", SPI, 5)  # never the floor of another SA
    assert await new.replay_floor("c1", SPI) == 700


async def test_a_new_child_sa_claims_its_block_in_one_transaction(store: Store) -> None:
    ledger = StoreSaPersistence(store, "n1")
    before = await store.ping()
    assert await ledger.start_child("c1", SPI, SPI + 1, 1000) == (1, 1000, 0)
    assert await store.ping() == before + 1  # one write, no other
    assert (await stored(store, schema.sequence_reservation(SPI)))["upto"] == 1000
    assert await store.get(schema.replay_high_water(SPI + 1)) is None
    assert ledger.fast_starts == 1


async def test_start_child_takes_the_general_path_when_a_key_exists(store: Store) -> None:
    first = StoreSaPersistence(store, "n1")
    assert await first.start_child("c1", SPI, SPI + 1, 1000) == (1, 1000, 0)
    await first.persist_replay_floor("c1", SPI + 1, 65536)
    successor = StoreSaPersistence(store, "n1")  # after a crash: after everything reserved, above the floor
    assert await successor.start_child("c1", SPI, SPI + 1, 1000) == (1001, 2000, 65536)
    assert successor.fast_starts == 0
    other = StoreSaPersistence(store, "n2")  # a floor of another SA on that inbound SPI is not ours
    assert (await other.start_child("c9", SPI + 7, SPI + 1, 1000))[2] == 0


async def test_forget_deletes_both_keys_in_one_transaction(store: Store) -> None:
    ledger = StoreSaPersistence(store, "n1")
    await ledger.start_child("c1", SPI, SPI + 1, 1000)
    await ledger.persist_replay_floor("c1", SPI + 1, 4096)
    before = await store.ping()
    await ledger.forget("c1", SPI + 1, SPI)
    assert await store.ping() == before + 1
    assert ledger.fast_forgets == 1
    assert await store.get(schema.sequence_reservation(SPI)) is None
    assert await store.get(schema.replay_high_water(SPI + 1)) is None


async def test_forget_leaves_a_shared_outbound_counter_to_the_child_sa_that_wrote_it(store: Store) -> None:
    """Two Child SAs toward different peers may get the same outbound SPI: they share one counter."""
    ledger = StoreSaPersistence(store, "n1")
    await ledger.start_child("c1", SPI, SPI + 1, 1000)
    assert await ledger.start_child("c2", SPI, SPI + 2, 1000) == (1001, 2000, 0)  # shared, general path
    await ledger.forget("c1", SPI + 1, SPI)
    assert (await stored(store, schema.sequence_reservation(SPI)))["child_sa"] == "c2"


async def test_forget_after_someone_else_wrote_takes_the_general_path(store: Store) -> None:
    ledger = StoreSaPersistence(store, "n1")
    await ledger.start_child("c1", SPI, SPI + 1, 1000)
    successor = StoreSaPersistence(store, "n1")
    await successor.start_outbound("c1", SPI, 1000)  # another incarnation took the SPI over
    await ledger.forget("c1", SPI + 1, SPI)
    assert ledger.fast_forgets == 0
    assert await store.get(schema.sequence_reservation(SPI)) is None  # it named c1: deleted, as before


async def test_the_first_replay_floor_is_claimed_with_the_block(store: Store) -> None:
    """The inbound SA asks for its first floor as it starts: it is durable already, no store work."""
    ledger = StoreSaPersistence(store, "n1")
    claims = [ChildClaim("c1", SPI, SPI + 1, 65536), ChildClaim("c2", SPI + 2, SPI + 3, 0)]
    before = await store.ping()
    assert await ledger.start_children(claims, 1000) == [(1, 1000, 0), (1, 1000, 0)]
    assert await store.ping() == before + 1
    assert (await stored(store, schema.replay_high_water(SPI + 1)))["upto"] == 65536
    assert await store.get(schema.replay_high_water(SPI + 3)) is None  # no replay window: no floor
    await ledger.persist_replay_floor("c1", SPI + 1, 65536)
    assert await store.ping() == before + 1
    await ledger.persist_replay_floor("c1", SPI + 1, 98304)  # the next one is written
    assert (await stored(store, schema.replay_high_water(SPI + 1)))["upto"] == 98304
    await ledger.forget("c1", SPI + 1, SPI)
    assert ledger.fast_forgets == 1
    assert await store.get(schema.replay_high_water(SPI + 1)) is None


async def test_a_batch_with_one_key_taken_claims_the_others_in_one_transaction(store: Store) -> None:
    earlier = StoreSaPersistence(store, "n1")
    await earlier.start_child("old", SPI + 2, SPI + 9, 1000)  # SPI + 2 carries an older counter
    ledger = StoreSaPersistence(store, "n1")
    claims = [ChildClaim("c1", SPI, SPI + 1), ChildClaim("c2", SPI + 2, SPI + 3), ChildClaim("c3", SPI + 4, SPI + 5)]
    before = await store.ping()
    assert await ledger.start_children(claims, 1000) == [(1, 1000, 0), (1001, 2000, 0), (1, 1000, 0)]
    assert await store.ping() == before + 2  # c1 and c3 together, c2 after reading
    assert ledger.fast_starts == 2


async def test_a_floor_asked_for_after_a_hand_over_is_written_again(store: Store) -> None:
    """The hand-over lowered the durable floor below what this incarnation remembered writing:
    a later ask for the old floor (the SA back on this node) must reach the store."""
    ledger = StoreSaPersistence(store, "n1")
    await ledger.persist_replay_floor("c1", SPI, 65536)
    await ledger.hand_over_replay_floor("c1", SPI, 700)
    await ledger.persist_replay_floor("c1", SPI, 65536)
    assert (await stored(store, schema.replay_high_water(SPI)))["upto"] == 65536
