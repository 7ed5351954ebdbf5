"""Differential tests: the compiled batch loop against the pure-Python engine.

Both cores get the same SAs (same keys, same starting state) and the same batches; their
outputs must be byte-identical, and afterwards every piece of SA state must be equal: sequence
numbers and reservations, replay window top and words, counters and drop reasons, lifetime
expiry, events, filter counts, flow records, the table's own drops.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esplanade.dataplane.esp import InboundSa, OutboundSa, encrypt
from esplanade.dataplane.fastpath import PacketBatch, outbound_selection
from esplanade.ipsec.sa import Lifetime, SecurityAssociation, TfcPolicy
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import Mode
from tests.dataplane.esp.suites import Suite, sa_pair
from tests.dataplane.fastpath.twins import (
    AEAD_SUITES,
    CBC_SUITE,
    both_cores,
    filter_specs,
    identity_pair,
    inbound,
    inbound_state,
    inner_packets,
    outbound,
    outbound_state,
    persistence,
    reservation,
)

SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX32 = (1 << 32) - 1
MAX64 = (1 << 64) - 1

ids = {"ids": lambda s: s.name}


def keys(suite: Suite, seed: int = 1) -> dict[str, bytes]:
    return {
        "encr_key": bytes((seed + i) % 256 for i in range(suite.encr_key_bytes)),
        "integ_key": bytes((seed * 3 + i) % 256 for i in range(suite.integ_key_bytes)),
    }


@st.composite
def lifetimes(draw: st.DrawFn) -> Lifetime:
    kind = draw(st.sampled_from(["none", "none", "packets", "bytes", "seconds"]))
    if kind == "packets":
        soft = draw(st.integers(1, 20))
        return Lifetime(soft_packets=soft, hard_packets=soft + draw(st.integers(1, 20)))
    if kind == "bytes":
        soft = draw(st.integers(1, 2000))
        return Lifetime(soft_bytes=soft, hard_bytes=soft + draw(st.integers(1, 2000)))
    if kind == "seconds":
        return Lifetime(soft_seconds=10, hard_seconds=20)
    return Lifetime()


def split(items: list[Any], cuts: list[int]) -> list[list[Any]]:
    out, start = [], 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(items))):
        out.append(items[start:cut])
        start = cut
    out.append(items[start:])
    return out


# -- encryption ------------------------------------------------------------------------------------
@pytest.mark.parametrize("outer", [4, 6])
@pytest.mark.parametrize("esn", [False, True], ids=["noesn", "esn"])
@pytest.mark.parametrize("suite", AEAD_SUITES, **ids)
@given(data=st.data())
@SLOW
def test_encrypt_identical(suite: Suite, esn: bool, outer: int, data: st.DataObject) -> None:
    max_seq = MAX64 if esn else MAX32
    start = data.draw(st.sampled_from([1, 1000, MAX32 - 5, *([MAX32 + 3, MAX64 - 5] if esn else [])]), "start")
    reserved = min(max_seq, max(0, start + data.draw(st.integers(-2, 30), "reserved")))
    lifetime = data.draw(lifetimes(), "lifetime")
    pad_to = data.draw(st.sampled_from([0, 0, 0, 61, 200]), "pad_to")
    block = data.draw(st.sampled_from([8, 1 << 20]), "block")
    soft_limit = data.draw(st.sampled_from([None, start + 3]), "soft_limit")
    packets = data.draw(st.lists(inner_packets(), max_size=40), "packets")
    cuts = data.draw(st.lists(st.integers(0, 40), max_size=3), "cuts")
    grant = data.draw(st.sampled_from([0, 5, 100]), "grant")
    out_a, _ = sa_pair(suite, **keys(suite), esn=esn, version=outer, lifetime=lifetime, tfc=TfcPolicy(pad_to=pad_to))

    results = []
    for core in both_cores():
        sa = outbound(
            out_a,
            next_seq=start,
            reserved_upto=reserved,
            reservation=reservation(block),
            soft_sequence_limit=soft_limit,
        )
        assert core.install_outbound(sa, out_a) == 0
        produced = []
        for n, batch in enumerate(split(packets, cuts)):
            got = core.encrypt(batch, now=15.0 * n)
            produced.append((got.to_list(), got.tags(), bytes(got.data)))
            if grant:
                sa.grant_sequence(sa.reserved_upto + grant)
        results.append((produced, outbound_state(sa), core.drain_flows()))
    assert results[0] == results[1]
    assert core.compiled_spis() == set()  # the Python core


@given(data=st.data())
@SLOW
def test_encrypt_mixed_sas_and_python_slots(data: st.DataObject) -> None:
    """AEAD slots run in C, CBC and transport-mode slots go through the Python engine, in order."""
    specs = [
        (AEAD_SUITES[0], Mode.TUNNEL, 0x1001),
        (CBC_SUITE, Mode.TUNNEL, 0x1002),
        (AEAD_SUITES[2], Mode.TRANSPORT, 0x1003),
        (AEAD_SUITES[1], Mode.TUNNEL, 0x1004),
    ]
    packets = data.draw(st.lists(inner_packets(valid_only=True), min_size=1, max_size=30), "packets")
    which = data.draw(st.lists(st.integers(0, len(specs) - 1), min_size=len(packets), max_size=len(packets)), "which")
    removed = data.draw(st.sampled_from([None, 0x1001, 0x1002]), "removed")
    results = []
    for core in both_cores():
        sas = []
        for suite, mode, spi in specs:
            out_a, _ = sa_pair(suite, **keys(suite, spi), spi=spi, mode=mode)
            sa = outbound(out_a, reserved_upto=1000)
            core.install_outbound(sa, out_a)
            sas.append(sa)
        got = core.encrypt(packets, 1.0, outbound_selection(which))
        first = (got.to_list(), got.tags())
        if removed is not None:
            core.remove_outbound(removed)
            assert core.generation == 1
            remaining = [core.outbound_index(s.spi) for s in sas if s.spi != removed]
            assert sorted(remaining) == list(range(len(specs) - 1))
            again = core.encrypt(packets, 2.0, outbound_selection([i % (len(specs) - 1) for i in which]))
            first += (again.to_list(), again.tags())
        results.append((first, [outbound_state(s) for s in sas], core.drain_flows()))
    assert results[0] == results[1]
    compiled, _ = both_cores()
    for suite, mode, spi in specs:
        out_a, _ = sa_pair(suite, **keys(suite), spi=spi, mode=mode)
        compiled.install_outbound(outbound(out_a), out_a)
    assert compiled.compiled_spis() == {0x1001, 0x1004}


# -- decryption ------------------------------------------------------------------------------------
def seal_at(sender: OutboundSa, seq: int, packet: bytes) -> bytes:
    sender.next_seq = seq
    esp = encrypt(sender, packet, 0.0)
    assert esp is not None
    return esp


def seal_raw(sender: OutboundSa, seq: int, plaintext: bytes, esn: bool) -> bytes:
    """An authentic ESP packet around any plaintext (bad padding, dummy, wrong next header...)."""
    assert sender.cipher is not None
    header = sender.spi_bytes + (seq & MAX32).to_bytes(4, "big")
    return sender.cipher.seal(header, seq.to_bytes(8, "big"), bytearray(plaintext), seq >> 32 if esn else None)


@st.composite
def crafted_plaintexts(draw: st.DrawFn) -> bytes:
    inner = draw(inner_packets())
    padlen = draw(st.integers(0, 12))
    good = draw(st.booleans())
    pad = bytes(range(1, padlen + 1)) if good else draw(st.binary(min_size=padlen, max_size=padlen))
    next_header = draw(st.sampled_from([4, 41, 59, 0, 17, 4, 41]))
    body = inner + pad
    body += bytes(-(len(body) + 2) % 4)  # keep the 4-byte alignment the length check wants
    trailer = bytes((min(255, padlen + draw(st.sampled_from([0, 0, 0, 1, 200]))), next_header))
    return body + trailer


@st.composite
def esp_batches(draw: st.DrawFn, sender: OutboundSa, esn: bool, floor: int, window: int, max_seq: int) -> list[bytes]:
    """ESP payloads around the receiver's window: mostly fresh, and duplicated, old, damaged,
    crafted, foreign ones, and numbers exactly at the window's edges."""
    low = max(1, floor - window - 3)
    high = min(max_seq, floor + 3 * max(window, 8) + 5)
    fresh = min(floor + 1, max_seq)

    def edge_seq() -> int:
        top = max(floor, fresh - 1)
        picks = [top - window, top - window + 1, top - window - 1, top, top + 1, top - 1, top + window]
        return draw(st.sampled_from([x for x in picks if 1 <= x <= max_seq] or [1]))

    seqs = st.integers(low, high)
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(
            st.sampled_from(["fresh"] * 8 + ["any", "edge", "dup", "flip", "cut", "runt", "spi", "crafted", "junk"])
        )
        if kind == "dup" and out:
            out.append(draw(st.sampled_from(out)))
        elif kind == "flip" and any(out):
            victim = bytearray(draw(st.sampled_from([p for p in out if p])))
            victim[draw(st.integers(0, len(victim) - 1))] ^= 1 << draw(st.integers(0, 7))
            out.append(bytes(victim))
        elif kind == "cut" and out:
            victim = draw(st.sampled_from(out))
            out.append(victim[: draw(st.integers(0, len(victim)))])
        elif kind == "runt":
            out.append(draw(st.binary(max_size=7)))
        elif kind == "spi":
            out.append(struct.pack("!I", draw(st.sampled_from([0x4242, 0, 0x1002]))) + draw(st.binary(max_size=80)))
        elif kind == "crafted":
            seq = fresh if draw(st.booleans()) else draw(seqs)
            out.append(seal_raw(sender, seq, draw(crafted_plaintexts()), esn))
            fresh = min(max_seq, max(fresh, seq + 1))
        elif kind == "junk":
            out.append(sender.spi_bytes + draw(st.binary(max_size=100)))
        else:
            seq = fresh if kind == "fresh" else edge_seq() if kind == "edge" else draw(seqs)
            out.append(seal_at(sender, seq, draw(inner_packets(valid_only=True))))
            fresh = min(max_seq, max(fresh, seq + draw(st.integers(1, 3))))
    return out


SA_SELECTORS = [
    ((), ()),
    ((TrafficSelector.from_network("10.0.0.0/30"),), (TrafficSelector.from_network("10.0.0.0/31"),)),
    (
        (TrafficSelector.from_network("10.0.0.0/24", 17), TrafficSelector.from_network("2001:db8::/64")),
        (TrafficSelector.from_network("0.0.0.0/0", 17, 53, 53), TrafficSelector.from_network("::/0")),
    ),
    ((TrafficSelector.any(4), TrafficSelector.any(6)), (TrafficSelector.any(4), TrafficSelector.any(6))),
    (
        (TrafficSelector.from_network("10.0.0.0/24", 17, 65535, 0), TrafficSelector.from_network("::/0", 6, 80, 443)),
        (TrafficSelector.from_network("10.0.0.0/24", 17), TrafficSelector.from_network("2001:db8::/32", 0, 0, 0)),
    ),
]


@pytest.mark.parametrize("esn", [False, True], ids=["noesn", "esn"])
@pytest.mark.parametrize("suite", AEAD_SUITES, **ids)
@given(data=st.data())
@SLOW
def test_decrypt_identical(suite: Suite, esn: bool, data: st.DataObject) -> None:
    max_seq = MAX64 if esn else MAX32
    window = data.draw(st.sampled_from([0, 32, 64, 65, 128, 1024]), "window")
    floors = [0, 1, 100, 1000, MAX32 - 40]
    if esn:
        floors += [MAX32 + 20, (5 << 32) + 3, MAX64 - 100]
    floor = data.draw(st.sampled_from(floors), "floor")
    lifetime = data.draw(lifetimes(), "lifetime")
    local, remote = data.draw(st.sampled_from(SA_SELECTORS), "selectors")
    persist = data.draw(st.sampled_from([0, 4, 1 << 16]), "persist")
    spec = data.draw(filter_specs(), "filter")
    out_a, in_a = sa_pair(
        suite, **keys(suite), esn=esn, replay_window=window, lifetime=lifetime, local_ts=remote, remote_ts=local
    )
    sender = outbound(dataclasses.replace(out_a, lifetime=Lifetime()), reserved_upto=max_seq)
    batches = [data.draw(esp_batches(sender, esn, floor, window, max_seq), f"batch{i}") for i in range(2)]
    wall = data.draw(st.sampled_from([None, 60.0, 200.0]), "wall")

    results = []
    cores = both_cores()
    identities = identity_pair(cores, spec)
    for core, identity in zip(cores, identities, strict=True):
        sa = inbound(in_a, replay_floor=floor, replay_persistence=persistence(persist))
        core.install_inbound(sa, in_a, identity)
        produced = []
        for n, batch in enumerate(batches):
            got = core.decrypt(batch, now=15.0 * n, wall_now=None if wall is None else wall * (n + 1))
            produced.append((got.to_list(), got.tags()))
        counts = None if identity is None else (identity.allowed, identity.denied)
        results.append((produced, inbound_state(sa), counts, core.drain_flows(), core.table_counters))
    assert results[0] == results[1]


@given(data=st.data())
@SLOW
def test_decrypt_demultiplexes_mixed_sas(data: st.DataObject) -> None:
    """Several SAs in one batch, C and Python slots interleaved; batches given as PacketBatch too."""
    specs = [
        (AEAD_SUITES[0], 0x2001, False, Mode.TUNNEL),
        (AEAD_SUITES[1], 0x2002, True, Mode.TUNNEL),
        (CBC_SUITE, 0x2003, True, Mode.TUNNEL),
        (AEAD_SUITES[2], 0x2004, False, Mode.TRANSPORT),
    ]
    senders, pairs = [], []
    for suite, spi, esn, mode in specs:
        out_a, in_a = sa_pair(suite, **keys(suite, spi), spi=spi, esn=esn, mode=mode)
        pairs.append(in_a)
        senders.append(outbound(out_a, reserved_upto=MAX32))
    payloads: list[bytes] = []
    for _ in range(data.draw(st.integers(0, 30), "count")):
        k = data.draw(st.integers(0, len(specs) - 1))
        seq = data.draw(st.integers(1, 70))
        transport = specs[k][3] == Mode.TRANSPORT
        payloads.append(seal_at(senders[k], seq, data.draw(inner_packets(valid_only=True, whole_datagrams=transport))))
    as_batch = data.draw(st.booleans(), "as_batch")
    removed = data.draw(st.sampled_from([None, 0x2001, 0x2003]), "removed")
    results = []
    for core in both_cores():
        sas = [inbound(in_a) for in_a in pairs]
        for sa, in_a in zip(sas, pairs, strict=True):
            core.install_inbound(sa, in_a)
        first = core.decrypt(PacketBatch.from_packets(payloads) if as_batch else payloads, 1.0)
        if removed is not None:
            assert core.remove_inbound(removed) is not None
        second = core.decrypt(payloads, 2.0)
        results.append(
            (first.to_list(), first.tags(), second.to_list(), [inbound_state(s) for s in sas], core.table_counters)
        )
    assert results[0] == results[1]


def test_chained_batches_and_outputs_owned_by_each_batch() -> None:
    """Encrypt output feeds decrypt as a PacketBatch; a later batch does not touch an earlier result."""
    suite = AEAD_SUITES[0]
    out_a, in_a = sa_pair(suite, **keys(suite))
    for core in both_cores():
        core.install_outbound(outbound(out_a, reserved_upto=100), out_a)
        core.install_inbound(inbound(in_a), in_a)
        packets = [bytes.fromhex("4500001c00000000401100000a0000010a000002") + bytes((i,)) * 8 for i in range(5)]
        first = core.encrypt(packets, 0.0)
        snapshot = bytes(first.data)
        view = first.packet(0)  # an outstanding view must not block the next batch
        second = core.encrypt(packets, 0.0)
        assert bytes(first.data) == snapshot and bytes(view) == snapshot[: len(view)]
        assert second.to_list() != first.to_list()
        assert core.decrypt(first, 0.0).to_list() == packets


def test_state_written_back_between_batches() -> None:
    """The Python objects are the state: a change made between batches is honoured by the next."""
    suite = AEAD_SUITES[1]
    out_a, _in_a = sa_pair(suite, **keys(suite))
    compiled, python = both_cores()
    for core in (compiled, python):
        sa = outbound(out_a, reserved_upto=10)
        core.install_outbound(sa, out_a)
        packet = bytes.fromhex("4500001c00000000401100000a0000010a000002") + bytes(8)
        assert len(core.encrypt([packet] * 12, 0.0)) == 10  # 1..10 reserved
        assert sa.next_seq == 11
        sa.grant_sequence(20)
        assert len(core.encrypt([packet] * 3, 0.0)) == 3
        assert sa.next_seq == 14
        assert sa.counters.drops["sequence_unreserved"] == 2  # type: ignore[index]


def test_which_out_of_range_is_an_error_not_a_crash() -> None:
    compiled, _ = both_cores()
    suite = AEAD_SUITES[0]
    out_a, _ = sa_pair(suite, **keys(suite))
    compiled.install_outbound(outbound(out_a), out_a)
    with pytest.raises(IndexError):
        compiled.encrypt([b"\x45" * 20], 0.0, outbound_selection([3]))
    with pytest.raises(ValueError):
        compiled.encrypt([b"\x45" * 20, b"\x45" * 20], 0.0, outbound_selection([0]))


def test_identity_filter_from_another_core_is_refused() -> None:
    compiled, python = both_cores()
    suite = AEAD_SUITES[0]
    _, in_a = sa_pair(suite, **keys(suite))
    from esplanade.policy.filters import PacketFilter

    with pytest.raises(TypeError):
        compiled.install_inbound(inbound(in_a), in_a, python.identity_filter(PacketFilter(())))
    with pytest.raises(TypeError):
        python.install_inbound(inbound(in_a), in_a, compiled.identity_filter(PacketFilter(())))


def test_association_must_match_the_state() -> None:
    compiled, python = both_cores()
    suite = AEAD_SUITES[0]
    out_a, in_a = sa_pair(suite, **keys(suite))
    other: SecurityAssociation = sa_pair(suite, **keys(suite), spi=0x9999)[0]
    for core in (compiled, python):
        with pytest.raises(ValueError):
            core.install_outbound(outbound(out_a), other)
        with pytest.raises(ValueError):
            core.install_inbound(inbound(in_a), out_a)  # type: ignore[arg-type]
    assert isinstance(inbound(in_a), InboundSa)


@given(data=st.data())
@SLOW
def test_non_esp_datagrams_go_to_the_shell(data: st.DataObject) -> None:
    """A GRO read may hold IKE (non-ESP marker) and keepalives: with `non_esp` they are handed back, not dropped."""
    suite = AEAD_SUITES[0]
    out_a, in_a = sa_pair(suite, **keys(suite))
    sender = outbound(out_a, reserved_upto=MAX32)
    pool = [
        seal_at(sender, s, bytes.fromhex("4500001c00000000401100000a0000010a000002") + bytes(8)) for s in range(1, 6)
    ]
    pool += [b"\xff", b"\x00\x00\x00\x00ike", b"\x00\x00\x00\x00", b"\x00\x00\x00", b"\xff\xff"]
    batch = data.draw(st.lists(st.sampled_from(pool), max_size=20))
    divert = data.draw(st.booleans())
    results = []
    for core in both_cores():
        core.install_inbound(inbound(in_a), in_a)
        non_esp: list[int] | None = [] if divert else None
        got = core.decrypt(PacketBatch.from_packets(batch), 0.0, non_esp=non_esp)
        results.append((got.to_list(), non_esp, core.table_counters))
    assert results[0] == results[1]
    if divert:
        expected = [i for i, p in enumerate(batch) if p == b"\xff" or p[:4] == bytes(4)]
        assert results[0][1] == expected
