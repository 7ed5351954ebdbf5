"""Edges the random batches rarely hit exactly: window bottoms and tops, ESN subspace changes,
the end of the 64-bit space, lifetime marks inside a batch, OPAQUE selectors, fragments
against port ranges. Every case runs through both cores and compares everything."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esplanade.dataplane.esp import encrypt
from esplanade.ipsec.sa import Lifetime
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.policy.filters import PacketFilter
from tests.dataplane.esp.suites import sa_pair
from tests.dataplane.fastpath.test_esp_differential import keys, seal_at
from tests.dataplane.fastpath.twins import (
    AEAD_SUITES,
    both_cores,
    compiled_module,
    inbound,
    inbound_state,
    inner_packets,
    outbound,
    outbound_state,
)

MAX32 = (1 << 32) - 1
MAX64 = (1 << 64) - 1
PACKET = bytes.fromhex("4500001c00000000401100000a0000010a000002") + struct.pack("!HHHH", 1, 53, 8, 0)


def edge_seqs(floor: int, window: int, max_seq: int, esn: bool) -> list[int]:
    w = window or (1 << 31)
    cands = {floor + d for d in (-w - 1, -w, -w + 1, -w + 2, -1, 0, 1, 2, w - 1, w, w + 1, 64, 65, 1000)}
    cands |= {floor + (1 << 31) + d for d in (-1, 0, 1)} | {floor - (1 << 31) + d for d in (0, 1)}
    if esn:
        base = floor >> 32 << 32
        cands |= {floor + (1 << 32), floor - (1 << 32), 5, base - w + 1, base - w, base + 1, base + (1 << 32) - 1}
    return sorted(s for s in cands if 1 <= s <= max_seq)


FLOORS = [0, 1, 100, 1000, MAX32 - 40, MAX32 - 1]
ESN_FLOORS = [*FLOORS, (1 << 32) + 2, (5 << 32) + 3, (5 << 32) + 40, MAX64 - 100, MAX64 - 1]


@pytest.mark.parametrize("window", [0, 32, 64, 65, 1024])
@pytest.mark.parametrize(("esn", "floor"), [(False, f) for f in FLOORS] + [(True, f) for f in ESN_FLOORS])
def test_replay_and_esn_edges(esn: bool, floor: int, window: int) -> None:
    suite = AEAD_SUITES[0]
    max_seq = MAX64 if esn else MAX32
    out_a, in_a = sa_pair(suite, **keys(suite), esn=esn, replay_window=window)
    sender = outbound(out_a, reserved_upto=max_seq)
    seqs = edge_seqs(floor, window, max_seq, esn)
    authentic = [seal_at(sender, s, PACKET) for s in seqs]
    tampered = [p[:-1] + bytes((p[-1] ^ 1,)) for p in authentic]
    batches = [
        tampered + authentic[::-1],  # forged packets first: they must not move the window
        authentic,
        authentic[::2] + tampered[1::2] + authentic[1::2],
    ]
    results = []
    for core in both_cores():
        sa = inbound(in_a, replay_floor=floor)
        core.install_inbound(sa, in_a)
        out = [core.decrypt(b, 1.0).to_list() for b in batches]
        results.append((out, inbound_state(sa), core.table_counters))
    assert results[0] == results[1]
    delivered, state = results[0][0], results[0][1]
    assert any(delivered), "the edge batch delivered nothing: the test would prove little"
    drops = state[3][2]
    assert drops["icv_failure"] > 0
    assert drops["replay"] > 0 or not window


@pytest.mark.parametrize("window", [32, 64, 65, 128, 1024])
@pytest.mark.parametrize("esn", [False, True], ids=["noesn", "esn"])
def test_window_bottom_after_the_window_moved(esn: bool, window: int) -> None:
    """Forged and authentic packets exactly at the bottom of a window that advanced by itself."""
    suite = AEAD_SUITES[2]
    out_a, in_a = sa_pair(suite, **keys(suite), esn=esn, replay_window=window)
    sender = outbound(out_a, reserved_upto=MAX32)
    for top in [t for t in (window + 10, 3 * 64 + 5, 1000, 5000) if t - window - 1 >= 1]:
        near = [top - window + d for d in (-1, 0, 1, 2)]
        authentic = {s: seal_at(sender, s, PACKET) for s in [top, *near]}
        forged = [authentic[s][:-1] + bytes((authentic[s][-1] ^ 0x80,)) for s in near]
        batch = forged + [authentic[s] for s in near] + [authentic[near[-1]]]
        results = []
        for core in both_cores():
            sa = inbound(in_a)
            core.install_inbound(sa, in_a)
            first = core.decrypt([authentic[top]], 1.0).to_list()
            results.append((first, core.decrypt(batch, 1.0).to_list(), inbound_state(sa)))
        assert results[0] == results[1]
        drops = results[0][2][3][2]
        # At or below top - W: two forged and two authentic replays; above it two forged ICV failures, one
        # duplicate. With ESN a number below the window belongs to the next 2^32 (RFC 4303 A2): it fails the ICV.
        assert (drops["replay"], drops["icv_failure"]) == ((1, 6) if esn else (5, 2))


def test_no_sequence_number_past_2_64() -> None:
    """Near the end of the 64-bit space a small low half infers a high half of 2^32: no such number."""
    suite = AEAD_SUITES[1]
    for window in (0, 64):
        out_a, in_a = sa_pair(suite, **keys(suite), esn=True, replay_window=window)
        sender = outbound(out_a, reserved_upto=MAX64)
        old = seal_at(sender, 5, PACKET)  # seq_hi 0: authentic, and 2^64 - 5 numbers ago
        for core in both_cores():
            sa = inbound(in_a, replay_floor=MAX64 - 100)
            core.install_inbound(sa, in_a)
            assert core.decrypt([old], 1.0).to_list() == []
            assert sa.counters.drops["replay"] == 1  # type: ignore[index]


@pytest.mark.parametrize(
    "lifetime",
    [
        Lifetime(soft_packets=2, hard_packets=3),
        Lifetime(hard_packets=1),
        Lifetime(soft_bytes=60, hard_bytes=100),
        Lifetime(soft_seconds=5, hard_seconds=10),
    ],
    ids=["packets", "one-packet", "bytes", "seconds"],
)
def test_lifetime_marks_inside_a_batch(lifetime: Lifetime) -> None:
    suite = AEAD_SUITES[0]
    out_a, in_a = sa_pair(suite, **keys(suite), lifetime=lifetime)
    clean_out, _ = sa_pair(suite, **keys(suite))
    payloads = [seal_at(outbound(clean_out, reserved_upto=100), s, PACKET) for s in range(1, 9)]
    results = []
    for core in both_cores():
        o, i = outbound(out_a, reserved_upto=100), inbound(in_a)
        core.install_outbound(o, out_a)
        core.install_inbound(i, in_a)
        sent = [len(core.encrypt([PACKET] * 8, t)) for t in (0.0, 6.0, 11.0)]
        got = [len(core.decrypt(payloads, t)) for t in (0.0, 6.0, 11.0)]
        results.append((sent, got, outbound_state(o), inbound_state(i)))
    assert results[0] == results[1]
    sent, got = results[0][0], results[0][1]
    if lifetime.hard_packets:
        assert sent == [lifetime.hard_packets, 0, 0] and got == [lifetime.hard_packets, 0, 0]
    elif lifetime.hard_bytes:
        assert sent == [4, 0, 0] and got == [4, 0, 0]  # 28-byte packets: the fourth reaches 100
    else:
        assert sent == [8, 8, 0] and got == [8, 0, 0]  # replays in the second decrypt batch


# -- inner selectors and filters against the Python reference, packet by packet --------------------
def _v4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


@st.composite
def selectors(draw: st.DrawFn, version: int) -> TrafficSelector:
    if version == 4:
        pool = ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.1.9", "192.0.2.7", "0.0.0.0", "255.255.255.255"]
    else:
        pool = [
            "2001:db8::1",
            "2001:db8::2",
            "2001:db8:1::9",
            "fd00::7",
            "::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ]
    a, b = sorted((ipaddress.ip_address(draw(st.sampled_from(pool))) for _ in range(2)), key=int)
    protocol = draw(st.sampled_from([0, 6, 17, 1, 58, 132]))
    kind = draw(st.sampled_from(["any", "range", "opaque", "one"]))
    if kind == "any":
        return TrafficSelector(a, b, protocol)
    if kind == "opaque":
        return TrafficSelector(a, b, protocol, 65535, 0)
    lo = draw(st.sampled_from([0, 22, 53, 80, 443, 2048, 5201, 32768, 65535]))
    hi = (
        lo if kind == "one" else draw(st.sampled_from([x for x in (0, 53, 443, 2303, 40000, 65535) if x >= lo] or [lo]))
    )
    return TrafficSelector(a, b, protocol, lo, hi)


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_inbound_selectors_identical(data: st.DataObject) -> None:
    """Every packet authentic and fresh, so each one reaches the selector check."""
    local = tuple(data.draw(st.lists(selectors(data.draw(st.sampled_from([4, 6]))), min_size=1, max_size=3)))
    remote = tuple(data.draw(st.lists(selectors(data.draw(st.sampled_from([4, 6]))), min_size=1, max_size=3)))
    packets = data.draw(st.lists(inner_packets(), min_size=1, max_size=30))
    suite = AEAD_SUITES[2]
    _out_a, in_a = sa_pair(suite, **keys(suite), local_ts=remote, remote_ts=local)
    clean_out, _ = sa_pair(suite, **keys(suite))
    sender = outbound(clean_out, reserved_upto=MAX32)
    payloads = []
    for packet in packets:
        esp = encrypt(sender, packet, 0.0)
        if esp is not None:
            payloads.append(esp)
    results = []
    for core in both_cores():
        sa = inbound(in_a)
        core.install_inbound(sa, in_a)
        got = core.decrypt(payloads, 0.0)
        results.append((got.to_list(), inbound_state(sa), core.drain_flows()))
    assert results[0] == results[1]


@st.composite
def packets_for_filters(draw: st.DrawFn) -> bytes:
    """Packets with the shapes the filter parser distinguishes, valid or not."""
    base = draw(inner_packets())
    shape = draw(st.sampled_from(["as is"] * 4 + ["v4frag", "v4frag1tcp", "v6ext", "v6many", "short"]))
    if shape == "v4frag" and len(base) >= 20 and base[0] >> 4 == 4:
        return base[:6] + struct.pack("!H", draw(st.integers(1, 0x1FFF))) + base[8:]
    if shape == "v4frag1tcp" and len(base) >= 20 and base[0] >> 4 == 4:
        return base[:6] + b"\x00\x01" + base[8:9] + b"\x06" + base[10:]
    if shape == "v6ext" and len(base) >= 40 and base[0] >> 4 == 6:
        ext = bytes((base[6], draw(st.integers(0, 3)))) + draw(st.binary(min_size=6, max_size=6))
        return base[:6] + bytes((draw(st.sampled_from([0, 43, 60, 44])),)) + base[7:40] + ext + base[40:]
    if shape == "v6many" and len(base) >= 40 and base[0] >> 4 == 6:
        n = draw(st.integers(7, 10))
        chain = b"".join(bytes((60, 0)) + bytes(6) for _ in range(n - 1)) + bytes((base[6], 0)) + bytes(6)
        return base[:6] + b"\x3c" + base[7:40] + chain + base[40:]
    if shape == "short":
        return base[: draw(st.integers(0, max(0, len(base))))]
    return base


@given(
    rules=st.lists(st.one_of(selectors(4), selectors(6)), max_size=8),
    packets=st.lists(packets_for_filters(), max_size=40),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_compiled_filter_matches_packet_filter(rules: list[TrafficSelector], packets: list[bytes]) -> None:
    from esplanade.dataplane.fastpath.filter_tables import compile_tables

    reference = PacketFilter(rules)
    compiled = compiled_module().Filter()
    compiled.load(compile_tables(reference.table))
    for packet in packets:
        assert compiled.allows_packet(packet) == reference.allows_packet(packet, 0.0), packet.hex()


@pytest.mark.parametrize("count", [7, 8, 9, 10])
def test_extension_header_chains(count: int) -> None:
    """parse_inner_packet walks at most 8 extension headers; a ninth makes the packet malformed."""
    from esplanade.dataplane.fastpath.filter_tables import compile_tables

    reference = PacketFilter([TrafficSelector.from_network("::/0")])
    compiled = compiled_module().Filter()
    compiled.load(compile_tables(reference.table))
    chain = b"".join(bytes((60, 0)) + bytes(6) for _ in range(count - 1)) + bytes((17, 0)) + bytes(6)
    udp = struct.pack("!HHHH", 1, 53, 8, 0)
    addr = ipaddress.IPv6Address("2001:db8::1").packed
    packet = struct.pack("!IHBB16s16s", 0x60000000, len(chain) + 8, 60, 64, addr, addr) + chain + udp
    assert reference.allows_packet(packet, 0.0) is (count <= 8)
    assert compiled.allows_packet(packet) is (count <= 8)


def test_fragments_against_port_ranges() -> None:
    """A non-initial fragment passes where its address and protocol allow some port (RFC 1858)."""
    rules = [TrafficSelector.from_network("10.0.0.0/24", 17, 53, 80)]
    reference = PacketFilter(rules)
    from esplanade.dataplane.fastpath.filter_tables import compile_tables

    compiled = compiled_module().Filter()
    compiled.load(compile_tables(reference.table))
    first = bytes.fromhex("4500001c00002000401100000a0000010a000002") + struct.pack("!HHHH", 1, 9999, 8, 0)
    later = bytes.fromhex("4500001c00000064401100000a0000010a000002") + bytes(8)
    tcp_at_8 = bytes.fromhex("4500001c00000001400600000a0000010a000002") + bytes(8)
    for packet, allowed in ((first, False), (later, True), (tcp_at_8, False)):
        assert reference.allows_packet(packet, 0.0) is allowed
        assert compiled.allows_packet(packet) is allowed
