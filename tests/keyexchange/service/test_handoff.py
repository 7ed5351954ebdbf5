"""The store side of the key handoff, on a real embedded store, driven by the IKE core's events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esplanade.keyexchange.child_sa_handoff import ChildSaHandoff, StoreStep, merge_steps
from esplanade.keyexchange.ikev2.events import ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed, InstallInboundSa
from esplanade.keyexchange.spi_reservations import SpiReservations
from esplanade.store import schema
from esplanade.store.base import MAX_TXN_OPS, Compare, Delete, Put
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer
from tests.keyexchange.peers import pair


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = EmbeddedStore(tmp_path / "store.db")
    await s.connect()
    yield s
    await s.close()


async def _handoff(store: EmbeddedStore, acks: list[tuple[str, str]] | None = None) -> ChildSaHandoff:
    spis = SpiReservations(store, "kx-test", size=16)
    await spis.fill()
    return ChildSaHandoff(
        store,
        Sealer(Keyring.generate()),
        spis,
        lambda ike, child: (acks if acks is not None else []).append((ike, child)),
    )


async def _keys(store: EmbeddedStore, *parts: str) -> dict[str, dict]:  # type: ignore[type-arg]
    kvs, _ = await store.range(schema.prefix(*parts))
    return {kv.key.rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}


async def test_spi_reservations_are_unique_and_leased(store: EmbeddedStore) -> None:
    lease = await store.grant_lease(30)
    spis = SpiReservations(store, "kx-test", size=8, lease=lambda: lease.id)
    taken = 0xABCDEF01
    await store.put(schema.spi_allocation(taken), b"{}")
    await spis.fill()
    reserved = await _keys(store, "spi")
    assert len(reserved) == 9 and all(v.get("state") == "reserved" for k, v in reserved.items() if k != f"{taken:08x}")
    got = {spis.take() for _ in range(8)}
    assert len(got) == 8 and taken not in got
    await store.revoke_lease(lease.id)  # an instance that dies takes its unused reservations along
    assert list(await _keys(store, "spi")) == [f"{taken:08x}"]


async def test_initiator_record_spd_and_spi_in_one_transaction(store: EmbeddedStore) -> None:
    net, a, _b = pair(id_prefix="kx1.")
    a.engine.initiate("ab", net.now)
    net.run()
    ev = a.of(ChildSaEstablished)[0]
    acks: list[tuple[str, str]] = []
    h = await _handoff(store, acks)
    h.handle(ev)
    await h.drain()
    records = await _keys(store, "sas", "child")
    assert list(records) == [ev.child_id] and records[ev.child_id]["inbound"]["encr_key"].startswith("sealed:v1:")
    spd = await _keys(store, "spd")
    assert {p["direction"] for p in spd.values()} == {"out", "in", "fwd"}
    assert {p["child_sa"] for p in spd.values()} == {ev.child_id}
    spi = (await _keys(store, "spi"))[f"{ev.record.inbound.spi:08x}"]
    assert spi["child_sa"] == ev.child_id
    kvs, _ = await store.range(schema.prefix("sas", "child"))
    spd_kvs, _ = await store.range(schema.prefix("spd"))
    assert {kv.mod_revision for kv in kvs + spd_kvs} == {kvs[0].mod_revision}  # one transaction


async def test_responder_waits_for_the_ack_and_rekeys_make_before_break(store: EmbeddedStore) -> None:
    net, a, b = pair(id_prefix="kx1.")
    b.auto_ack = False
    ike = a.engine.initiate("ab", net.now)
    net.run()
    acks: list[tuple[str, str]] = []
    h = await _handoff(store, acks)
    first = b.held_installs[0]
    h.handle(first)
    await h.drain()
    assert not acks
    await store.put(schema.install_ack(first.child_id, "dp1"), b"{}")
    h._seen_ack(schema.install_ack(first.child_id, "dp1"))
    assert acks == [(first.ike_sa, first.child_id)]
    b.engine.inbound_sa_installed(first.ike_sa, first.child_id, net.now)
    net.run()
    # rekey started by the initiator: b writes the new record, the policies stay on the old SA
    a.engine.rekey_child(ike, a.of(ChildSaEstablished)[0].child_id, net.now)
    net.run()
    second = b.held_installs[1]
    assert isinstance(second, InstallInboundSa) and second.record is not None
    h.handle(second)
    await h.drain()
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {first.child_id}
    assert set(await _keys(store, "sas", "child")) == {first.child_id, second.child_id}
    b.engine.inbound_sa_installed(second.ike_sa, second.child_id, net.now)
    net.run()
    for ev in b.events:
        if isinstance(ev, ChildSaRekeyed | ChildSaDeleted):
            h.handle(ev)
    await h.drain()
    # the initiator deleted the old SA: the policies moved to the new one in that transaction
    assert set(await _keys(store, "sas", "child")) == {second.child_id}
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {second.child_id}
    assert f"{first.record.inbound.spi:08x}" not in await _keys(store, "spi")  # type: ignore[union-attr]


async def test_an_in_band_install_notice_releases_the_response_once_and_only_for_its_child(
    store: EmbeddedStore,
) -> None:
    net, a, b = pair(id_prefix="kx1.")
    b.auto_ack = False
    a.engine.initiate("ab", net.now)
    net.run()
    acks: list[tuple[str, str]] = []
    h = await _handoff(store, acks)
    first = b.held_installs[0]
    h.handle(first)
    h.installed_in_band("kx9.other.c1")  # another instance's Child SA on this dataplane: nothing
    assert not acks
    h.installed_in_band(first.child_id)  # may come before our commit returns: the record is in
    assert acks == [(first.ike_sa, first.child_id)]
    await h.drain()
    # the store ack (and any node's) that follows changes nothing
    h._seen_ack(schema.install_ack(first.child_id, "dp1"))
    h._seen_ack(schema.install_ack(first.child_id, "dp2"))
    h.installed_in_band(first.child_id)
    assert acks == [(first.ike_sa, first.child_id)]
    assert h.counters["acks"] == 1 and h.counters["acks_in_band"] == 3


async def test_duplicate_child_sas_keep_the_policies_until_the_last_goes(store: EmbeddedStore) -> None:
    net, a, _b = pair(id_prefix="kx1.", a_over={"unique": "never"}, b_over={"unique": "never"})
    a.engine.initiate("ab", net.now)
    a.engine.initiate("ab", net.now)
    net.run()
    first, second = a.of(ChildSaEstablished)
    h = await _handoff(store)
    for ev in (first, second):
        h.handle(ev)
    await h.drain()
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {second.child_id}
    h.handle(ChildSaDeleted(second.ike_sa, second.child_id))
    await h.drain()
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {first.child_id}
    h.handle(ChildSaDeleted(first.ike_sa, first.child_id))
    await h.drain()
    assert not await _keys(store, "spd") and not await _keys(store, "sas", "child")


async def test_a_replacing_child_sa_and_the_old_ones_delete_in_flight_together(store: EmbeddedStore) -> None:
    """Reauthentication: the new IKE SA's Child SA is written while the old one's delete is
    queued right behind it; the SPD entries must end up on the new one, whatever commits first."""
    net, a, _b = pair(id_prefix="kx1.", a_over={"unique": "never"}, b_over={"unique": "never"})
    a.engine.initiate("ab", net.now)
    net.run()
    old = a.of(ChildSaEstablished)[0]
    h = await _handoff(store)
    h.handle(old)
    await h.drain()
    a.engine.initiate("ab", net.now)
    net.run()
    new = a.of(ChildSaEstablished)[1]
    h.handle(new)
    h.handle(ChildSaDeleted(old.ike_sa, old.child_id))  # no drain in between
    await h.drain()
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {new.child_id}
    assert set(await _keys(store, "sas", "child")) == {new.child_id}


async def test_two_instances_never_reserve_the_same_spi(store: EmbeddedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scale-out: instances draw SPIs independently; the CAS create in `spi/` settles every collision."""
    import itertools

    from esplanade.keyexchange import spi_reservations

    # both instances draw from the same short sequence, so most draws collide
    sequence = itertools.cycle(range(0x1000, 0x1000 + 24))
    monkeypatch.setattr(spi_reservations.os, "urandom", lambda n: next(sequence).to_bytes(n, "big"))
    first = SpiReservations(store, "kx-a", size=8)
    second = SpiReservations(store, "kx-b", size=8)
    await first.fill()
    await second.fill()
    a = {first.take() for _ in range(8)}
    b = {second.take() for _ in range(8)}
    assert len(a) == 8 and len(b) == 8 and not a & b
    owners = await _keys(store, "spi")
    assert all(owners[f"{spi:08x}"]["instance"] == "kx-a" for spi in a)
    assert all(owners[f"{spi:08x}"]["instance"] == "kx-b" for spi in b)


def test_merged_steps_keep_the_conditions_and_the_last_op_of_each_key() -> None:
    a = StoreStep([Compare("/s/1", 5)], [Put("/r/1", b"a"), Put("/p/x", b"one")])
    b = StoreStep([], [Delete("/r/1"), Put("/p/x", b"two"), Put("/p/y", b"y")])
    merged = merge_steps([a, b])
    assert merged is not None
    conditions, ops = merged
    assert conditions == [Compare("/s/1", 5)]
    assert sorted(ops, key=lambda op: op.key) == [Put("/p/x", b"two"), Put("/p/y", b"y"), Delete("/r/1")]
    assert merge_steps([a, StoreStep([Compare("/s/1", 6)], [])]) is None  # one key, two revisions
    many = [StoreStep([], [Put(f"/k/{i}", b"v")]) for i in range(MAX_TXN_OPS + 1)]
    assert merge_steps(many) is None


async def test_queued_steps_of_one_traffic_share_transactions_and_end_as_one_by_one(store: EmbeddedStore) -> None:
    net, a, _b = pair(id_prefix="kx1.", a_over={"unique": "never"}, b_over={"unique": "never"})
    for _ in range(6):
        a.engine.initiate("ab", net.now)
    net.run()
    established = a.of(ChildSaEstablished)
    h = await _handoff(store)
    before = await store.ping()
    for ev in established:  # no drain in between: they queue behind the first commit
        h.handle(ev)
    for ev in established[:4]:
        h.handle(ChildSaDeleted(ev.ike_sa, ev.child_id))
    await h.drain()
    assert await store.ping() - before < len(established) + 4  # fewer transactions than steps
    assert h.counters.get("merged_commits", 0) >= 1
    assert set(await _keys(store, "sas", "child")) == {established[4].child_id, established[5].child_id}
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {established[5].child_id}
    spis = {k for k, v in (await _keys(store, "spi")).items() if "child_sa" in v}
    assert spis == {f"{ev.record.inbound.spi:08x}" for ev in established[4:]}


async def test_a_lost_spi_reservation_fails_only_its_own_child_sa(store: EmbeddedStore) -> None:
    net, a, _b = pair(id_prefix="kx1.", a_over={"unique": "never"}, b_over={"unique": "never"})
    for _ in range(3):
        a.engine.initiate("ab", net.now)
    net.run()
    first, second, third = a.of(ChildSaEstablished)
    h = await _handoff(store)
    failed: list[str] = []
    h.on_write_failed = lambda ike, child, reason: failed.append(child)
    h.handle(first)
    await h.drain()
    # someone else took the second one's reserved SPI meanwhile
    await store.put(schema.spi_allocation(second.record.inbound.spi), b'{"instance": "other"}')
    h.handle(second)
    h.handle(third)
    await h.drain()
    assert failed == [second.child_id]
    assert set(await _keys(store, "sas", "child")) == {first.child_id, third.child_id}
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {third.child_id}
    assert (await _keys(store, "spi"))[f"{second.record.inbound.spi:08x}"] == {"instance": "other"}  # left alone
    h.handle(ChildSaDeleted(third.ike_sa, third.child_id))
    await h.drain()
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {first.child_id}


async def test_a_child_sa_deleted_before_its_install_failed_spares_the_spi_key_it_never_held(
    store: EmbeddedStore,
) -> None:
    net, a, _b = pair(id_prefix="kx1.", a_over={"unique": "never"}, b_over={"unique": "never"})
    for _ in range(2):
        a.engine.initiate("ab", net.now)
    net.run()
    first, second = a.of(ChildSaEstablished)
    h = await _handoff(store)
    await store.put(schema.spi_allocation(first.record.inbound.spi), b'{"instance": "other"}')
    h.handle(first)
    h.handle(ChildSaDeleted(first.ike_sa, first.child_id))  # queued with its install: one batch
    h.handle(second)
    await h.drain()
    assert [child for _ike, child, _why in h.failures] == [first.child_id]
    assert (await _keys(store, "spi"))[f"{first.record.inbound.spi:08x}"] == {"instance": "other"}
    assert set(await _keys(store, "sas", "child")) == {second.child_id}
    assert {p["child_sa"] for p in (await _keys(store, "spd")).values()} == {second.child_id}
