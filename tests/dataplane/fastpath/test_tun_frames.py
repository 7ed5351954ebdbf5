"""TSO/USO splitting and GRO-style merging in C, against scapy's checksums and the datapath's
pure-Python reference (`esplanade.dataplane.userspace.segmentation`, once merged)."""

from __future__ import annotations

import importlib.util
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from esplanade.dataplane.fastpath.tun_frames import coalesce_frames, split_frames

GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 3, 4, 5
NEEDS_CSUM = 1


def vnet(
    gso_type: int, gso_size: int, csum_start: int, csum_offset: int, flags: int = NEEDS_CSUM, hdr_len: int = 0
) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def with_checksums(packet: bytes) -> bytes:
    """What scapy computes for the packet's IPv4 header and TCP/UDP checksums (RFC 1071)."""
    parsed: Any = IPv6(packet) if packet[0] >> 4 == 6 else IP(packet)
    if parsed.version == 4:
        del parsed.chksum
    layer = parsed[TCP] if TCP in parsed else parsed[UDP]
    del layer.chksum
    return bytes(parsed)


def pseudo_partial(packet: bytes) -> bytes:
    """The packet as a TSO sender leaves it: the L4 checksum field holds the pseudo-header sum only."""
    v6 = packet[0] >> 4 == 6
    l3 = 40 if v6 else 20
    src, dst = (packet[8:24], packet[24:40]) if v6 else (packet[12:16], packet[16:20])
    proto = packet[6] if v6 else packet[9]
    length = len(packet) - l3
    total = sum(struct.unpack(f"!{len(src) // 2}H", src)) + sum(struct.unpack(f"!{len(dst) // 2}H", dst))
    total += proto + length
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    field = l3 + (16 if proto == 6 else 6)
    return packet[:field] + struct.pack("!H", total) + packet[field + 2 :]


@st.composite
def super_packets(draw: st.DrawFn) -> tuple[bytes, int, bool, bool]:
    """(super-packet, mss, v6, udp)."""
    v6, udp = draw(st.booleans()), draw(st.booleans())
    payload = draw(st.binary(max_size=4000))
    mss = draw(st.sampled_from([1, 7, 100, 536, 1400, 1448, 9000]))
    if udp:
        l4: Any = UDP(sport=draw(st.integers(1, 65535)), dport=5201)
    else:
        options = draw(st.sampled_from([[], [("NOP", None), ("NOP", None), ("Timestamp", (7, 9))]]))
        flags = draw(st.sampled_from(["A", "PA", "FPA", "CA", "CPA"]))
        l4 = TCP(sport=40000, dport=5201, seq=draw(st.integers(0, (1 << 32) - 1)), ack=3, flags=flags, options=options)
    ip: Any = (
        IPv6(src="2001:db8::1", dst="2001:db8::2", tc=draw(st.integers(0, 255)))
        if v6
        else IP(
            src="10.0.0.1", dst="10.0.0.2", id=draw(st.integers(0, 65535)), flags="DF", tos=draw(st.integers(0, 255))
        )
    )
    return pseudo_partial(bytes(ip / l4 / Raw(payload))), mss, v6, udp


def expected_segments(packet: bytes, mss: int, v6: bool, udp: bool) -> list[bytes]:
    """The segments by hand, checksummed by scapy."""
    l3 = 40 if v6 else 20
    hlen = l3 + (8 if udp else (packet[l3 + 12] >> 4) * 4)
    head, payload = packet[:hlen], packet[hlen:]
    count = max(1, -(-len(payload) // mss))
    out = []
    for i in range(count):
        seg = bytearray(head + payload[i * mss : (i + 1) * mss])
        if v6:
            seg[4:6] = struct.pack("!H", len(seg) - 40)
        else:
            seg[2:4] = struct.pack("!H", len(seg))
            seg[4:6] = struct.pack("!H", (struct.unpack("!H", seg[4:6])[0] + i) & 0xFFFF)
        if udp:
            seg[l3 + 4 : l3 + 6] = struct.pack("!H", len(seg) - l3)
        else:
            seq = (struct.unpack("!I", seg[l3 + 4 : l3 + 8])[0] + i * mss) & 0xFFFFFFFF
            seg[l3 + 4 : l3 + 8] = struct.pack("!I", seq)
            if i != count - 1:
                seg[l3 + 13] &= ~0x09  # FIN, PSH on the last segment only
            if i:
                seg[l3 + 13] &= ~0x80  # CWR on the first only
        out.append(with_checksums(bytes(seg)))
    return out


@given(super_packets())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_split_matches_scapy(case: tuple[bytes, int, bool, bool]) -> None:
    packet, mss, v6, udp = case
    gso = GSO_UDP_L4 if udp else GSO_TCPV6 if v6 else GSO_TCPV4
    l3 = 40 if v6 else 20
    frame = vnet(gso, mss, l3, 6 if udp else 16) + packet
    got, dropped = split_frames([frame])
    assert dropped == 0
    assert got.to_list() == expected_segments(packet, mss, v6, udp)
    assert got.tags() == [0] * len(got)


@given(super_packets())
@settings(max_examples=100, deadline=None)
def test_needs_csum_completed(case: tuple[bytes, int, bool, bool]) -> None:
    packet, _, v6, udp = case
    l3 = 40 if v6 else 20
    frame = vnet(GSO_NONE, 0, l3, 6 if udp else 16) + packet
    got, dropped = split_frames([frame, vnet(GSO_NONE, 0, 0, 0, flags=0) + packet])
    assert dropped == 0
    assert got.to_list() == [with_checksums(packet), packet]  # the plain frame passes untouched


def tcp_flow(rng: random.Random, v6: bool, count: int, mss: int = 1400, sport: int = 40000) -> list[bytes]:
    seq = rng.getrandbits(32)
    out = []
    for i in range(count):
        size = mss if i < count - 1 else rng.choice([mss, mss // 2, 1])
        ip: Any = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2", id=100 + i)
        flags = "PA" if i == count - 1 and rng.random() < 0.5 else "A"
        out.append(bytes(ip / TCP(sport=sport, dport=5201, seq=seq, ack=9, flags=flags) / Raw(rng.randbytes(size))))
        seq = (seq + size) & 0xFFFFFFFF
    return out


@pytest.mark.parametrize("seed", range(20))
def test_merge_then_split_gives_the_packets_back(seed: int) -> None:
    """Consecutive segments of a flow become one GSO frame; splitting it reproduces them."""
    rng = random.Random(seed)
    flows = [tcp_flow(rng, v6=k % 2 == 1, count=rng.randint(1, 70), sport=40000 + k) for k in range(3)]
    stray = bytes(IP(src="10.0.0.9", dst="10.0.0.2") / TCP(flags="S") / Raw(b"x"))
    packets: list[bytes] = []
    cursors = [0] * len(flows)
    while any(c < len(f) for c, f in zip(cursors, flows, strict=True)):
        k = rng.choice([i for i, f in enumerate(flows) if cursors[i] < len(f)])
        take = rng.randint(1, 5)
        packets += flows[k][cursors[k] : cursors[k] + take]
        cursors[k] += take
        if rng.random() < 0.1:
            packets.append(stray)
    frames = coalesce_frames(packets)
    assert len(frames) < len(packets) or len(packets) <= 3
    resplit, dropped = split_frames(frames)
    assert dropped == 0
    back = resplit.to_list()
    for flow in flows:
        assert [p for p in back if p in flow] == flow  # each flow in order
    assert sorted(back) == sorted(packets)


def test_plain_frames_and_tags() -> None:
    udp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"abc"))
    frames = coalesce_frames([udp, b"\x00", udp])
    assert frames.to_list() == [bytes(10) + udp, bytes(10) + b"\x00", bytes(10) + udp]
    assert frames.tags() == [0, 1, 2]
    merged = coalesce_frames([udp, udp], merge_udp=True)
    assert len(merged) == 1 and merged.packet(0)[1] == GSO_UDP_L4


@given(st.lists(st.binary(max_size=200), max_size=30), st.booleans())
@settings(max_examples=300, deadline=None)
def test_garbage_never_crashes(frames: list[bytes], merge_udp: bool) -> None:
    got, dropped = split_frames(frames)
    assert dropped + len(set(got.tags())) <= len(frames)
    assert all(tag < len(frames) for tag in got.tags())
    merged = coalesce_frames(frames, merge_udp)
    assert len(merged) <= len(frames)
    for frame, tag in zip(merged, merged.tags(), strict=True):
        if frame[:10] == bytes(10):
            assert bytes(frame[10:]) == frames[tag]


def test_short_and_unsplittable_frames_are_dropped() -> None:
    tcp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP() / Raw(bytes(100)))
    cases = [
        b"",
        vnet(GSO_TCPV4, 10, 20, 16)[:9],
        vnet(GSO_UDP, 10, 20, 6) + tcp,  # UFO: not split here
        vnet(9, 10, 20, 16) + tcp,  # unknown type
        vnet(GSO_TCPV4, 0, 20, 16) + tcp,  # gso_size 0
        vnet(GSO_TCPV4, 10, 20, 16) + tcp[:30],  # shorter than its headers
        vnet(GSO_NONE, 0, 200, 16) + tcp,  # checksum offsets outside
        vnet(GSO_TCPV4, 10, 20, 16) + bytes((0x44,)) + tcp[1:],  # IHL 4
        vnet(GSO_TCPV4, 10, 20, 16) + tcp[:32] + bytes((0x40,)) + tcp[33:],  # TCP data offset 4
    ]
    got, dropped = split_frames(cases)
    assert (len(got), dropped) == (0, len(cases))


# -- the datapath's pure-Python reference --------------------------------------------------------
REFERENCE = "esplanade.dataplane.userspace.segmentation"


def _reference() -> Any:
    if importlib.util.find_spec("esplanade.dataplane.userspace") is None:
        pytest.skip("the userspace datapath (branch datapath) is not merged yet")
    return importlib.import_module(REFERENCE)


def _same_but_checksum_corner(ours: bytes, theirs: bytes) -> bool:
    """Equal, or differing only where a checksum of non-zero data summing to 0xFFFF is written:
    RFC 1071 (and Linux, scapy) give 0x0000, the reference's modulo arithmetic 0xFFFF."""
    if len(ours) != len(theirs):
        return False
    diff = [i for i in range(len(ours)) if ours[i] != theirs[i]]
    return not diff or (len(diff) == 2 and all(ours[i] == 0 and theirs[i] == 0xFF for i in diff))


@given(st.lists(super_packets(), max_size=8))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_split_matches_the_datapath_reference(cases: list[tuple[bytes, int, bool, bool]]) -> None:
    reference = _reference()
    frames = [
        vnet(GSO_UDP_L4 if udp else GSO_TCPV6 if v6 else GSO_TCPV4, mss, 40 if v6 else 20, 6 if udp else 16) + p
        for p, mss, v6, udp in cases
    ]
    theirs, their_drops = reference.frames_to_packets(frames)
    ours, our_drops = split_frames(frames)
    assert our_drops == their_drops
    assert all(_same_but_checksum_corner(a, b) for a, b in zip(ours.to_list(), theirs, strict=True))


@pytest.mark.parametrize("seed", range(30))
def test_merge_matches_the_datapath_reference(seed: int) -> None:
    reference = _reference()
    rng = random.Random(seed)
    packets = []
    for k in range(4):
        packets += tcp_flow(rng, v6=k % 2 == 1, count=rng.randint(1, 40), sport=40000 + k)
    rng.shuffle(packets)  # out of order: runs break where sequence numbers do not follow
    packets.sort(key=lambda p: rng.random() < 0.7)
    for merge_udp in (False, True):
        theirs = reference.coalesce_for_tun(packets, merge_udp)
        ours = coalesce_frames(packets, merge_udp).to_list()
        assert len(ours) == len(theirs)
        assert all(_same_but_checksum_corner(a, b) for a, b in zip(ours, theirs, strict=True))


@given(sizes=st.lists(st.sampled_from([1400, 1400, 1400, 700, 1, 1500]), max_size=80), tags=st.lists(st.integers(0, 2)))
@settings(max_examples=200, deadline=None)
def test_gso_runs_and_gro_segments(sizes: list[int], tags: list[int]) -> None:
    """GSO runs cover the batch in order, obey the limits and agree with the pure-Python planner;
    a GRO buffer cut by segment_spans gives the datagrams back."""
    from esplanade.dataplane.fastpath import PacketBatch
    from esplanade.dataplane.fastpath import packet_batch as pb

    packets = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    tag_list = [tags[i % len(tags)] if tags else 0 for i in range(len(packets))]
    batch = PacketBatch.from_packets(packets, tag_list)
    runs = batch.gso_runs(max_segments=16, max_bytes=20000)
    covered = 0
    for offset, length, segment, count, tag in runs:
        assert count <= 16 and length <= max(20000, segment)
        members = packets[covered : covered + count]
        assert bytes(batch.data[offset : offset + length]) == b"".join(members)
        assert all(len(m) == segment for m in members[:-1]) and len(members[-1]) <= segment
        assert set(tag_list[covered : covered + count]) == {tag}
        covered += count
    assert covered == len(packets)
    original = pb._compiled
    try:
        pb._compiled = lambda: None  # the pure-Python planner
        assert batch.gso_runs(max_segments=16, max_bytes=20000) == runs
        buffer = bytearray(b"".join(packets[:1] * 5 + [b"xy"]))
        spans_python = PacketBatch.from_segments(buffer, len(buffer), max(1, len(packets[0]) if packets else 1))
    finally:
        pb._compiled = original
    if packets:
        spans_c = PacketBatch.from_segments(buffer, len(buffer), max(1, len(packets[0])))
        assert spans_c.to_list() == spans_python.to_list() and bytes(spans_c.spans) == bytes(spans_python.spans)
        assert b"".join(spans_c.to_list()) == bytes(buffer)


@given(
    nbytes=st.integers(0, 5000),
    segment=st.integers(1, 1600),
    offset=st.integers(0, 70000),
    tag=st.integers(0, 2**32 - 1),
)
@settings(max_examples=200, deadline=None)
def test_segment_spans_at_an_offset_agree_with_python(nbytes: int, segment: int, offset: int, tag: int) -> None:
    """Several GRO reads in one buffer: each read's spans start at its offset (C and Python alike)."""
    from esplanade.dataplane.fastpath import packet_batch as pb

    ours = pb.segment_spans(nbytes, segment, tag, offset)
    original = pb._compiled
    try:
        pb._compiled = lambda: None
        theirs = pb.segment_spans(nbytes, segment, tag, offset)
    finally:
        pb._compiled = original
    assert bytes(ours) == bytes(theirs)
    words = memoryview(ours).cast("I")
    assert sum(words[1::3]) == nbytes and all(w >= offset for w in words[0::3])


def test_select_by_tag_turns_frame_decisions_into_packet_slots() -> None:
    from array import array

    from esplanade.dataplane.fastpath import PacketBatch
    from esplanade.dataplane.fastpath.esp_batch import SKIP, select_by_tag

    batch = PacketBatch.from_packets([b"a", b"b", b"c", b"d"], [0, 0, 2, 1])
    which = select_by_tag(batch, array("H", [7, SKIP, 3]))
    assert list(memoryview(which).cast("B").cast("H")) == [7, 7, 3, SKIP]
    with pytest.raises(IndexError):
        select_by_tag(batch, array("H", [7]))


def _syn(mss: int, v6: bool, options: bytes | None = None, flags: str = "S") -> bytes:
    opts = [("NOP", None), ("MSS", mss), ("SAckOK", b"")] if options is None else []
    tcp = TCP(sport=40000, dport=5201, flags=flags, options=opts)
    if options is not None:
        tcp = TCP(sport=40000, dport=5201, flags=flags, dataofs=5 + len(options) // 4) / Raw(options)
    ip: Any = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.1.0.1", dst="10.2.0.1")
    return bytes(ip / tcp)


@given(
    mss=st.integers(0, 0xFFFF),
    v6=st.booleans(),
    flags=st.sampled_from(["S", "SA", "A", "PA"]),
    junk=st.one_of(st.none(), st.binary(min_size=0, max_size=40).map(lambda b: b[: len(b) // 4 * 4])),
)
@settings(max_examples=300, deadline=None)
def test_clamp_mss_matches_the_datapath_clamp(mss: int, v6: bool, flags: str, junk: bytes | None) -> None:
    """The C clamp (in place, on a batch) against `userspace.mtu.MssClamp` (packet by packet)."""
    from esplanade.dataplane.fastpath import PacketBatch
    from esplanade.dataplane.fastpath.tun_frames import clamp_mss
    from esplanade.dataplane.userspace.mtu import MssClamp

    packet = _syn(mss, v6, junk, flags)
    reference = MssClamp(1438)
    expected = reference.apply([packet])
    batch = PacketBatch.from_packets([packet, packet[:30], packet])
    clamped = clamp_mss(batch, reference.mss_v4, reference.mss_v6)
    assert clamped == 2 * reference.clamped
    assert batch.to_list() == [expected[0], packet[:30], expected[0]]
    if reference.clamped:
        assert with_checksums(batch.to_list()[0]) == batch.to_list()[0]  # the checksum still verifies
