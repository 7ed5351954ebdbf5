"""Merging for TUN writes and splitting of super-packets, checked against scapy-built packets.

The oracle: a merged frame, split again by the independent reference splitter, must give
back the original packets byte for byte (checksums recomputed from scratch included).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.compat import raw
from scapy.layers.inet import IP, TCP, IPOption

from esplanade.dataplane.userspace.internet_checksum import IPPROTO_TCP, pseudo_header_sum, verifies
from esplanade.dataplane.userspace.segmentation import (
    MAX_MERGED_SEGMENTS,
    SegmentationError,
    coalesce_for_tun,
    complete_checksum,
    frames_to_packets,
    split_super_packet,
)
from esplanade.dataplane.userspace.vnet_header import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR_LEN,
    GsoType,
    VnetHeader,
)
from tests.dataplane.userspace.packet_builders import checksum_ok, tcp_segments, udp_datagrams


def _roundtrip(frames: list[bytes]) -> list[bytes]:
    packets, dropped = frames_to_packets(frames)
    assert dropped == 0
    return packets


def test_one_tcp_flow_merges_into_one_gso_frame_and_splits_back_exactly() -> None:
    segments = tcp_segments(10, 1000, last_flags="PA")
    frames = coalesce_for_tun(segments)
    assert len(frames) == 1
    header = VnetHeader.unpack(frames[0])
    assert header.gso_type == GsoType.TCPV4
    assert header.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert header.gso_size == 1000
    assert header.hdr_len == 40 and header.csum_start == 20 and header.csum_offset == 16
    packet = frames[0][VNET_HDR_LEN:]
    assert len(packet) == 40 + 10 * 1000
    assert int.from_bytes(packet[2:4], "big") == len(packet)
    assert packet[33] & 0x08, "PSH of the last segment is kept"
    # the IPv4 header checksum is complete; the TCP field holds the pseudo-header sum only
    assert verifies(packet[:20])
    expected_pseudo = pseudo_header_sum(packet[12:16], packet[16:20], IPPROTO_TCP, len(packet) - 20)
    assert int.from_bytes(packet[36:38], "big") == expected_pseudo
    # finishing the partial checksum gives a valid TCP checksum over the super-packet
    assert checksum_ok(complete_checksum(header, packet))
    assert _roundtrip(frames) == segments


def test_short_last_segment_merges_and_ends_the_frame() -> None:
    segments = tcp_segments(5, 1200, last_size=300) + tcp_segments(2, 1200, seq=1000 + 4 * 1200 + 300, first_id=105)
    frames = coalesce_for_tun(segments)
    assert len(frames) == 2, "nothing may follow a short segment in the same frame"
    assert _roundtrip(frames) == segments


def test_ipv6_tcp_flow_merges() -> None:
    segments = tcp_segments(8, 1200, v6=True)
    frames = coalesce_for_tun(segments)
    assert len(frames) == 1
    header = VnetHeader.unpack(frames[0])
    assert header.gso_type == GsoType.TCPV6 and header.csum_start == 40
    packet = frames[0][VNET_HDR_LEN:]
    assert int.from_bytes(packet[4:6], "big") == len(packet) - 40
    assert _roundtrip(frames) == segments


def test_timestamps_option_must_match() -> None:
    same = tcp_segments(4, 1000, options=[("NOP", None), ("NOP", None), ("Timestamp", (5, 6))])
    assert len(coalesce_for_tun(same)) == 1
    assert _roundtrip(coalesce_for_tun(same)) == same
    other = tcp_segments(
        1, 1000, seq=1000 + 4000, first_id=104, options=[("NOP", None), ("NOP", None), ("Timestamp", (7, 6))]
    )
    frames = coalesce_for_tun(same + other)
    assert len(frames) == 2
    assert _roundtrip(frames) == same + other


def test_unmergeable_segments_pass_through_unchanged() -> None:
    syn = tcp_segments(1, 0, flags="S")
    gap = tcp_segments(1, 1000, seq=1000) + tcp_segments(1, 1000, seq=9000, first_id=101)
    other_ack = tcp_segments(1, 1000) + tcp_segments(1, 1000, seq=2000, ack=78, first_id=101)
    bigger_later = tcp_segments(1, 500) + tcp_segments(1, 1000, seq=1500, first_id=101)
    fin = tcp_segments(2, 1000, last_flags="FA")
    for case in (syn, gap, other_ack, bigger_later, fin):
        frames = coalesce_for_tun(case)
        assert len(frames) == len(case)
        assert [f[VNET_HDR_LEN:] for f in frames] == case
        assert all(f[:VNET_HDR_LEN] == bytes(VNET_HDR_LEN) for f in frames)


def test_fragments_and_ip_options_are_left_alone() -> None:
    (segment,) = tcp_segments(1, 1000)
    fragment = bytearray(segment)
    fragment[6] |= 0x20  # MF
    with_options = raw(
        IP(src="10.0.0.1", dst="10.0.0.2", options=[IPOption(b"\x01\x01\x01\x00")]) / TCP(flags="A") / (b"x" * 100)
    )
    for packet in (bytes(fragment), with_options):
        frames = coalesce_for_tun([packet, packet])
        assert [f[VNET_HDR_LEN:] for f in frames] == [packet, packet]


def test_interleaved_flows_each_merge_and_keep_their_order() -> None:
    a = tcp_segments(6, 1000, sport=1111)
    b = tcp_segments(6, 1000, sport=2222, seq=50_000)
    mixed = [p for pair in zip(a, b, strict=True) for p in pair]
    frames = coalesce_for_tun(mixed)
    assert len(frames) == 2
    packets = _roundtrip(frames)
    assert [p for p in packets if TCP(p[20:]).sport == 1111] == a
    assert [p for p in packets if TCP(p[20:]).sport == 2222] == b


def test_frame_size_and_segment_count_are_bounded() -> None:
    segments = tcp_segments(MAX_MERGED_SEGMENTS + 10, 100)
    frames = coalesce_for_tun(segments)
    assert len(frames) == 2
    big = tcp_segments(60, 1400)
    frames = coalesce_for_tun(big)
    assert all(len(f) - VNET_HDR_LEN <= 0xFFFF for f in frames)
    assert _roundtrip(frames) == big


def test_sequence_wraparound_merges() -> None:
    segments = tcp_segments(4, 1000, seq=0xFFFFFFFF - 1500)
    frames = coalesce_for_tun(segments)
    assert len(frames) == 1
    assert _roundtrip(frames) == segments


def test_udp_merges_only_when_asked() -> None:
    datagrams = udp_datagrams(20, 64, last_size=10)
    assert len(coalesce_for_tun(datagrams, merge_udp=False)) == 20
    frames = coalesce_for_tun(datagrams, merge_udp=True)
    assert len(frames) == 1
    header = VnetHeader.unpack(frames[0])
    assert header.gso_type == GsoType.UDP_L4 and header.gso_size == 64 and header.csum_offset == 6
    assert _roundtrip(frames) == datagrams
    v6 = udp_datagrams(7, 100, v6=True)
    frames = coalesce_for_tun(v6, merge_udp=True)
    assert len(frames) == 1
    assert _roundtrip(frames) == v6


def test_runt_and_garbage_pass_through() -> None:
    junk = [b"", b"\x45", b"\x60" + bytes(10), bytes(100)]
    frames = coalesce_for_tun([j for j in junk if j])
    assert [f[VNET_HDR_LEN:] for f in frames] == [j for j in junk if j]


def test_split_rejects_nonsense() -> None:
    header = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=GsoType.TCPV4, gso_size=0)
    try:
        split_super_packet(header, tcp_segments(1, 100)[0])
    except SegmentationError:
        pass
    else:
        raise AssertionError("gso_size 0 accepted")
    bad_offsets = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=5000, csum_offset=16)
    packets, dropped = frames_to_packets([bad_offsets.pack() + tcp_segments(1, 100)[0], b"\x00"])
    assert packets == [] and dropped == 2


def test_complete_checksum_of_partial_packet() -> None:
    (segment,) = tcp_segments(1, 700)
    partial = bytearray(segment)
    partial[36:38] = pseudo_header_sum(segment[12:16], segment[16:20], IPPROTO_TCP, len(segment) - 20).to_bytes(
        2, "big"
    )
    header = VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=20, csum_offset=16)
    assert complete_checksum(header, bytes(partial)) == segment


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 4), st.sampled_from([1, 200, 1000])),
        min_size=1,
        max_size=8,
    )
)
def test_any_interleaving_of_runs_survives_merge_and_split(runs: list[tuple[int, int, int]]) -> None:
    """Random runs of segments from three flows: per-flow byte streams come back unchanged."""
    next_seq = {0: 1000, 1: 1000, 2: 1000}
    next_id = {0: 0, 1: 0, 2: 0}
    packets: list[bytes] = []
    for flow, count, size in runs:
        segs = tcp_segments(count, size, sport=1000 + flow, seq=next_seq[flow], first_id=next_id[flow])
        next_seq[flow] += count * size
        next_id[flow] += count
        packets.extend(segs)
    frames = coalesce_for_tun(packets)
    assert len(frames) <= len(packets)
    back = _roundtrip(frames)
    for flow in range(3):
        original = [p for p in packets if TCP(p[20:]).sport == 1000 + flow]
        returned = [p for p in back if TCP(p[20:]).sport == 1000 + flow]
        assert returned == original


def _tso_frame(packet: bytes, gso_type: GsoType = GsoType.TCPV4, gso_size: int = 100) -> bytes:
    header = VnetHeader(
        flags=VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type=gso_type,
        gso_size=gso_size,
        hdr_len=40,
        csum_start=20,
        csum_offset=16,
    )
    return header.pack() + packet


def test_tso_frame_with_tcp_data_offset_below_five_is_a_counted_drop() -> None:
    """Was an IndexError out of split_super_packet (a dead worker); now a drop like the C split."""
    good = tcp_segments(1, 1000)[0]
    for offset in range(5):
        bad = bytearray(good)
        bad[32] = offset << 4 | (bad[32] & 0x0F)
        for cut in (40, 41, 52, len(bad)):
            packets, dropped = frames_to_packets([_tso_frame(bytes(bad[:cut]))])
            assert (packets, dropped) == ([], 1), (offset, cut)


def test_tso_frame_with_bad_ip_header_length_or_version_is_a_counted_drop() -> None:
    good = tcp_segments(1, 1000)[0]
    for first in (0x40, 0x41, 0x44, 0x00, 0x70, 0xF5):
        bad = bytes((first,)) + good[1:]
        packets, dropped = frames_to_packets([_tso_frame(bad), _tso_frame(bad, GsoType.UDP_L4)])
        assert (packets, dropped) == ([], 2), hex(first)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=0, max_size=200),
    st.sampled_from([GsoType.TCPV4, GsoType.TCPV6, GsoType.UDP_L4]),
    st.integers(0, 2000),
)
def test_split_never_raises_anything_but_segmentation_error(packet: bytes, gso_type: GsoType, size: int) -> None:
    packets, dropped = frames_to_packets([_tso_frame(packet, gso_type, size)])
    assert dropped + (len(packets) > 0) >= 1
