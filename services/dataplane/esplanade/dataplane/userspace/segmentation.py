"""GRO-style merging of packets written to the TUN, and TSO/USO splitting of packets read from it.

Write side (`coalesce_for_tun`): consecutive TCP segments of one flow (contiguous sequence
numbers, same ACK, same options, equal sizes but a shorter last one) become one super-packet
with a virtio_net_hdr (GSO_TCPV4/TCPV6, NEEDS_CSUM). The TCP checksum field then holds only
the pseudo-header sum, as the kernel's own GSO expects; the kernel delivers or re-segments
it. UDP datagrams of one 5-tuple merge the same way into GSO_UDP_L4 when the TUN accepts
USO (kernel 6.2+). This is wireguard-go's `tun/offload_linux.go` rule set; it turns dozens
of write(2) calls into one, the largest single gain measured for a Python datapath here.

Read side (`split_super_packet`, `complete_checksum`): when TSO/USO/CSUM offloads were
negotiated the kernel hands over super-packets and partial checksums. Splitting and
checksumming them in Python costs more than it saves (reference measurements), so this is
the reference path that keeps the offloaded mode correct until the compiled loop takes over.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from esplanade.dataplane.userspace.internet_checksum import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    checksum,
    pseudo_header_sum,
)
from esplanade.dataplane.userspace.vnet_header import (
    PLAIN_VNET_HDR,
    TCP_CSUM_OFFSET,
    UDP_CSUM_OFFSET,
    VNET_HDR_LEN,
    GsoType,
    VnetHeader,
    VnetHeaderError,
    pack_gso_header,
)

MAX_IP_TOTAL = 0xFFFF
MAX_MERGED_SEGMENTS = 64

_TCP_FLAG_FIN = 0x01
_TCP_FLAG_PSH = 0x08
_TCP_FLAG_CWR = 0x80
_TCP_ACK = 0x10
_TCP_ACK_PSH = 0x18


class SegmentationError(ValueError):
    """A super-packet or partial-checksum packet that cannot be split or completed."""


# Fixed header prefixes, one unpack per packet (cheaper than a dozen slices in CPython):
# IPv4 (IHL 5) + TCP up to the flags: ver/ihl, tos, total, id, frag, ttl, proto, addrs+ports, seq, ack, doff, flags
_V4_TCP = struct.Struct("!BBHHHBB2x12sIIBB")
# IPv6 + TCP: ver/tc/flow, payload length, next header, hop limit, addrs+ports, seq, ack, doff, flags
_V6_TCP = struct.Struct("!IHBB36sIIBB")
# IPv4 (IHL 5) + UDP: ver/ihl, tos, total, frag, ttl, proto, addrs+ports, udp length
_V4_UDP = struct.Struct("!BBH2xHBB2x12sH")
_V6_UDP = struct.Struct("!IHBB36sH")

_CLOSED = -1


class _Merge:
    """One super-packet under construction: the first packet, the rest, and what the next must match.

    `next_seq` is _CLOSED once nothing more may join (a short or PSH segment, a full frame).
    `limit` is the largest payload the next segment may carry.
    """

    __slots__ = ("first", "gso_size", "hlen", "l3len", "limit", "next_seq", "parts", "psh", "sig", "total", "udp", "v6")

    def __init__(self, first: bytes, l3len: int, hlen: int, plen: int, sig: object, udp: bool, v6: bool) -> None:
        self.first = first
        self.l3len = l3len
        self.hlen = hlen
        self.gso_size = plen
        self.total = len(first)
        self.limit = min(plen, MAX_IP_TOTAL - self.total)
        self.next_seq = 0
        self.sig = sig
        self.parts: list[bytes] = [first]
        self.psh = False
        self.udp = udp
        self.v6 = v6

    def add(self, packet: bytes, plen: int) -> None:
        parts = self.parts
        parts.append(packet)
        total = self.total = self.total + plen
        self.limit = min(self.gso_size, MAX_IP_TOTAL - total)
        if plen < self.gso_size or len(parts) >= MAX_MERGED_SEGMENTS:
            self.next_seq = _CLOSED

    def build(self) -> bytes:
        if len(self.parts) == 1:
            return PLAIN_VNET_HDR + self.first
        first = self.first
        hlen = self.hlen
        l3 = self.l3len
        header = bytearray(first[:hlen])
        total = self.total
        if self.v6:
            header[4:6] = (total - 40).to_bytes(2, "big")
            src, dst = first[8:24], first[24:40]
        else:
            header[2:4] = total.to_bytes(2, "big")
            header[10:12] = b"\x00\x00"
            header[10:12] = checksum(header[:20]).to_bytes(2, "big")
            src, dst = first[12:16], first[16:20]
        l4len = total - l3
        if self.udp:
            header[l3 + 4 : l3 + 6] = l4len.to_bytes(2, "big")
            header[l3 + 6 : l3 + 8] = pseudo_header_sum(src, dst, IPPROTO_UDP, l4len).to_bytes(2, "big")
            vnet = pack_gso_header(GsoType.UDP_L4, hlen, self.gso_size, l3, UDP_CSUM_OFFSET)
        else:
            if self.psh:
                header[l3 + 13] |= _TCP_FLAG_PSH
            header[l3 + 16 : l3 + 18] = pseudo_header_sum(src, dst, IPPROTO_TCP, l4len).to_bytes(2, "big")
            vnet = pack_gso_header(
                GsoType.TCPV6 if self.v6 else GsoType.TCPV4, hlen, self.gso_size, l3, TCP_CSUM_OFFSET
            )
        return vnet + bytes(header) + b"".join([p[hlen:] for p in self.parts])


def coalesce_for_tun(packets: Sequence[bytes], merge_udp: bool = False) -> list[bytes]:
    """Frames (virtio_net_hdr + packet) for TUN writes, with mergeable runs merged.

    Packets that cannot merge pass through unchanged with a plain header. Order within a
    flow is kept; flows may interleave differently than they arrived. TCP segments merge
    when they have: the same addresses and ports, contiguous sequence numbers, the same
    ACK number, TOS/traffic class, TTL/hop limit, DF bit, header length and options,
    flags ACK (PSH allowed on the last one only), and the size of the first (the last may
    be shorter); at most MAX_MERGED_SEGMENTS and 64 KiB per frame. IPv4 with options,
    fragments and IPv6 with extension headers pass unmerged.
    """
    out: list[bytes | _Merge] = []
    tcp_open: dict[bytes, _Merge] = {}
    udp_open: dict[bytes, _Merge] = {}
    plain = PLAIN_VNET_HDR
    sig: tuple[object, ...]
    for pkt in packets:
        n = len(pkt)
        b0 = pkt[0] if n > 28 else 0
        if b0 == 0x45:
            proto = pkt[9]
            if proto == IPPROTO_TCP and n > 40:
                _vihl, tos, total, _id, frag, ttl, _p, key, seq, ack, doff, flags = _V4_TCP.unpack_from(pkt)
                hlen = 20 + (doff >> 4) * 4
                plen = n - hlen
                mergeable_flags = flags in (_TCP_ACK, _TCP_ACK_PSH)
                if total != n or frag & 0x3FFF or plen <= 0 or hlen < 40 or not mergeable_flags:
                    out.append(plain + pkt)
                    continue
                sig = (ack, tos, ttl, frag, hlen, pkt[40:hlen] if hlen > 40 else b"")
                m = tcp_open.get(key)
                if m is not None and m.next_seq == seq and plen <= m.limit and m.sig == sig:
                    m.add(pkt, plen)
                    if m.next_seq != _CLOSED:
                        m.next_seq = (seq + plen) & 0xFFFFFFFF
                    if flags == _TCP_ACK_PSH:
                        m.next_seq = _CLOSED
                        m.psh = True
                    continue
                m = _Merge(pkt, 20, hlen, plen, sig, False, False)
                m.next_seq = _CLOSED if flags == _TCP_ACK_PSH else (seq + plen) & 0xFFFFFFFF
                tcp_open[key] = m
                out.append(m)
                continue
            if proto == IPPROTO_UDP and merge_udp:
                _vihl, tos, total, frag, ttl, _p, key, ulen = _V4_UDP.unpack_from(pkt)
                plen = n - 28
                if total != n or frag & 0x3FFF or plen <= 0 or ulen != n - 20:
                    out.append(plain + pkt)
                    continue
                sig = (tos, ttl, frag)
                m = udp_open.get(key)
                if m is not None and m.next_seq == 0 and plen <= m.limit and m.sig == sig:
                    m.add(pkt, plen)
                    continue
                m = _Merge(pkt, 20, 28, plen, sig, True, False)
                udp_open[key] = m
                out.append(m)
                continue
        elif b0 >> 4 == 6 and n > 48:
            nh = pkt[6]
            if nh == IPPROTO_TCP and n > 60:
                vtf, payload_len, _nh, hop, key, seq, ack, doff, flags = _V6_TCP.unpack_from(pkt)
                hlen = 40 + (doff >> 4) * 4
                plen = n - hlen
                if payload_len + 40 != n or plen <= 0 or hlen < 60 or (flags != _TCP_ACK and flags != _TCP_ACK_PSH):
                    out.append(plain + pkt)
                    continue
                sig = (ack, vtf, hop, hlen, pkt[60:hlen] if hlen > 60 else b"")
                m = tcp_open.get(key)
                if m is not None and m.next_seq == seq and plen <= m.limit and m.sig == sig:
                    m.add(pkt, plen)
                    if m.next_seq != _CLOSED:
                        m.next_seq = (seq + plen) & 0xFFFFFFFF
                    if flags == _TCP_ACK_PSH:
                        m.next_seq = _CLOSED
                        m.psh = True
                    continue
                m = _Merge(pkt, 40, hlen, plen, sig, False, True)
                m.next_seq = _CLOSED if flags == _TCP_ACK_PSH else (seq + plen) & 0xFFFFFFFF
                tcp_open[key] = m
                out.append(m)
                continue
            if nh == IPPROTO_UDP and merge_udp:
                vtf, payload_len, _nh, hop, key, ulen = _V6_UDP.unpack_from(pkt)
                plen = n - 48
                if payload_len + 40 != n or plen <= 0 or ulen != n - 40:
                    out.append(plain + pkt)
                    continue
                sig = (vtf, hop)
                m = udp_open.get(key)
                if m is not None and m.next_seq == 0 and plen <= m.limit and m.sig == sig:
                    m.add(pkt, plen)
                    continue
                m = _Merge(pkt, 40, 48, plen, sig, True, True)
                udp_open[key] = m
                out.append(m)
                continue
        out.append(plain + pkt)
    return [item if isinstance(item, bytes) else item.build() for item in out]


# -- read side: super-packets and partial checksums --------------------------------------


def complete_checksum(header: VnetHeader, packet: bytes) -> bytes:
    """Finish a NEEDS_CSUM packet: the field already holds the pseudo-header sum."""
    start, field = header.csum_start, header.csum_start + header.csum_offset
    if start >= len(packet) or field + 2 > len(packet):
        raise SegmentationError("checksum offsets point outside the packet")
    value = checksum(memoryview(packet)[start:])
    if value == 0 and header.csum_offset == UDP_CSUM_OFFSET:
        value = 0xFFFF
    return packet[:field] + value.to_bytes(2, "big") + packet[field + 2 :]


def split_super_packet(header: VnetHeader, packet: bytes) -> list[bytes]:
    """Packets on the wire for one frame read from the TUN: checksummed, at most gso_size of payload each."""
    if not header.is_gso:
        return [complete_checksum(header, packet) if header.needs_csum else packet]
    if header.gso_size <= 0:
        raise SegmentationError("GSO frame with gso_size 0")
    if not packet:
        raise SegmentationError("empty GSO frame")
    # Every length below comes from the wire (the host's stack, or whoever writes to the TUN):
    # each is checked before use, so a bad frame is a SegmentationError (a counted drop).
    version = packet[0] >> 4
    if version not in (4, 6):
        raise SegmentationError(f"GSO frame of IP version {version}")
    v6 = version == 6
    l3 = 40 if v6 else (packet[0] & 0x0F) * 4
    if l3 < 20:
        raise SegmentationError("IPv4 header length below 5 words")
    if len(packet) < l3 + 8:
        raise SegmentationError("GSO frame shorter than its headers")
    if header.gso_type in (GsoType.TCPV4, GsoType.TCPV6):
        if len(packet) < l3 + 20:
            raise SegmentationError("TCP GSO frame shorter than its headers")
        if packet[l3 + 12] >> 4 < 5:
            raise SegmentationError("TCP data offset below 5 words")
        return _split_tcp(packet, l3, header.gso_size, v6)
    if header.gso_type == GsoType.UDP_L4:
        return _split_udp(packet, l3, header.gso_size, v6)
    raise SegmentationError(f"GSO type {header.gso_type.name} is not split here")


def _addresses(packet: bytes, v6: bool) -> tuple[bytes, bytes]:
    return (packet[8:24], packet[24:40]) if v6 else (packet[12:16], packet[16:20])


def _finish_l3(seg: bytearray, v6: bool, ip_id_step: int) -> None:
    total = len(seg)
    if v6:
        seg[4:6] = (total - 40).to_bytes(2, "big")
        return
    seg[2:4] = total.to_bytes(2, "big")
    if ip_id_step:
        seg[4:6] = ((int.from_bytes(seg[4:6], "big") + ip_id_step) & 0xFFFF).to_bytes(2, "big")
    seg[10:12] = b"\x00\x00"
    ihl = (seg[0] & 0x0F) * 4
    seg[10:12] = checksum(seg[:ihl]).to_bytes(2, "big")


def _split_tcp(packet: bytes, l3: int, mss: int, v6: bool) -> list[bytes]:
    hlen = l3 + (packet[l3 + 12] >> 4) * 4
    if hlen > len(packet):
        raise SegmentationError("TCP header runs past the frame")
    head, payload = packet[:hlen], packet[hlen:]
    src, dst = _addresses(packet, v6)
    seq0 = int.from_bytes(packet[l3 + 4 : l3 + 8], "big")
    flags = packet[l3 + 13]
    count = max(1, -(-len(payload) // mss))
    out: list[bytes] = []
    for i in range(count):
        chunk = payload[i * mss : (i + 1) * mss]
        seg = bytearray(head)
        seg += chunk
        seg[l3 + 4 : l3 + 8] = ((seq0 + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        seg_flags = flags
        if i != count - 1:
            seg_flags &= ~(_TCP_FLAG_FIN | _TCP_FLAG_PSH)
        if i != 0:
            seg_flags &= ~_TCP_FLAG_CWR
        seg[l3 + 13] = seg_flags
        _finish_l3(seg, v6, i)
        seg[l3 + 16 : l3 + 18] = b"\x00\x00"
        l4 = memoryview(seg)[l3:]
        value = checksum(l4, pseudo_header_sum(src, dst, IPPROTO_TCP, len(l4)))
        seg[l3 + 16 : l3 + 18] = value.to_bytes(2, "big")
        out.append(bytes(seg))
    return out


def _split_udp(packet: bytes, l3: int, size: int, v6: bool) -> list[bytes]:
    hlen = l3 + 8
    head, payload = packet[:hlen], packet[hlen:]
    src, dst = _addresses(packet, v6)
    count = max(1, -(-len(payload) // size))
    out: list[bytes] = []
    for i in range(count):
        seg = bytearray(head)
        seg += payload[i * size : (i + 1) * size]
        _finish_l3(seg, v6, i)
        seg[l3 + 4 : l3 + 6] = (len(seg) - l3).to_bytes(2, "big")
        seg[l3 + 6 : l3 + 8] = b"\x00\x00"
        l4 = memoryview(seg)[l3:]
        value = checksum(l4, pseudo_header_sum(src, dst, IPPROTO_UDP, len(l4))) or 0xFFFF
        seg[l3 + 6 : l3 + 8] = value.to_bytes(2, "big")
        out.append(bytes(seg))
    return out


def frames_to_packets(frames: Sequence[bytes]) -> tuple[list[bytes], int]:
    """Parse TUN frames (vnet header + packet) into wire packets; count frames that were dropped."""
    packets: list[bytes] = []
    dropped = 0
    for frame in frames:
        try:
            header = VnetHeader.unpack(frame)
            packets.extend(split_super_packet(header, frame[VNET_HDR_LEN:]))
        except (VnetHeaderError, SegmentationError):
            dropped += 1
    return packets, dropped
