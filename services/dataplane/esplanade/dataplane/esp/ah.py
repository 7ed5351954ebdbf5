"""AH (RFC 4302): integrity for the whole packet, tunnel and transport mode, IPv4 and IPv6.

The ICV covers the IP header with its mutable fields zeroed (RFC 4302 §3.3.3.1): IPv4 TOS,
flags and fragment offset, TTL and header checksum, and mutable options (all but EOL, NOP,
the security options, router alert and SDMDD, RFC 4302 appendix A.1), which are zeroed whole;
IPv6 traffic class, flow label and hop limit, and the data of options whose "may change en
route" bit (0x20) is set (appendix A.2). A sender computes the ICV over a routing header as it
will arrive (segments left 0, final destination in the header) for routing types 0 and 2;
other routing types with segments left are refused. With ESN the high 32 bits of the
sequence number follow the packet in the ICV input (§3.3.3.1.2... appendix B).
AH cannot be UDP-encapsulated (RFC 3948): such SAs are refused when they are validated.
"""

from __future__ import annotations

import hmac

from esplanade.dataplane.esp.counters import DropReason
from esplanade.dataplane.esp.esp_codec import inner_ip_length, outbound_gate
from esplanade.dataplane.esp.ip_headers import (
    MAX_IP_LENGTH,
    find_ipsec_header,
    outer_header,
    rebuild_transport_packet,
    traffic_class,
    transport_insertion_point,
)
from esplanade.dataplane.esp.packet import (
    IPV4_MIN_HEADER,
    IPV6_HEADER,
    PROTO_AH,
    PROTO_DSTOPTS,
    PROTO_HOPOPT,
    PROTO_IPIP,
    PROTO_IPV6,
    PROTO_NONE,
    PROTO_ROUTING,
    parse_flow,
)
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa

AH_FIXED_BYTES = 12  # next header, payload length, reserved, SPI, sequence number
_IMMUTABLE_IPV4_OPTIONS = frozenset({0, 1, 2, 5, 6, 20, 21})  # option numbers (type & 0x1F)
_TUNNEL_NEXT_HEADER = {4: PROTO_IPIP, 6: PROTO_IPV6}


def ah_length(icv_bytes: int, ipv6: bool) -> int:
    """AH header length with ICV and its padding: 32-bit aligned for IPv4, 64-bit for IPv6 (§2.6)."""
    raw = AH_FIXED_BYTES + icv_bytes
    return raw + (-raw % (8 if ipv6 else 4))


def _zero_ipv4_options(buf: bytearray, ihl: int) -> bool:
    i = IPV4_MIN_HEADER
    while i < ihl:
        kind = buf[i]
        if kind == 0:  # end of option list: the rest is padding
            return True
        if kind == 1:
            i += 1
            continue
        if i + 1 >= ihl:
            return False
        length = buf[i + 1]
        if length < 2 or i + length > ihl:
            return False
        if kind & 0x1F not in _IMMUTABLE_IPV4_OPTIONS:
            buf[i : i + length] = bytes(length)
        i += length
    return True


def _zero_ipv6_options(buf: bytearray, start: int, end: int) -> bool:
    i = start + 2
    while i < end:
        kind = buf[i]
        if kind == 0:  # Pad1
            i += 1
            continue
        if i + 1 >= end:
            return False
        length = buf[i + 1]
        if i + 2 + length > end:
            return False
        if kind & 0x20:
            buf[i + 2 : i + 2 + length] = bytes(length)
        i += 2 + length
    return True


def _routing_as_received(buf: bytearray, start: int) -> bool:
    """Rewrite a routing header (and the destination) as the final destination will see it."""
    segments_left = buf[start + 3]
    if segments_left == 0:
        return True
    routing_type = buf[start + 2]
    length = (buf[start + 1] + 1) * 8
    if routing_type not in (0, 2) or (length - 8) % 16:
        return False
    count = (length - 8) // 16
    if segments_left > count:
        return False
    addresses = [bytes(buf[start + 8 + 16 * k : start + 24 + 16 * k]) for k in range(count)]
    final = addresses[-1]
    rotated = [bytes(buf[24:40]), *addresses[:-1]]
    for k, addr in enumerate(rotated):
        buf[start + 8 + 16 * k : start + 24 + 16 * k] = addr
    buf[24:40] = final
    buf[start + 3] = 0
    return True


def icv_input(
    packet: bytes | bytearray | memoryview, ah_offset: int, icv_bytes: int, sending: bool
) -> bytearray | None:
    """A copy of `packet` with mutable fields and the ICV zeroed, or None if malformed.

    Only the `icv_bytes` of the ICV itself are zeroed: the alignment padding after it is
    chosen by the sender and covered by the ICV as sent (RFC 4302 §3.3.3.2.1).
    """
    buf = bytearray(packet)
    buf[ah_offset + AH_FIXED_BYTES : ah_offset + AH_FIXED_BYTES + icv_bytes] = bytes(icv_bytes)
    if buf[0] >> 4 == 4:
        ihl = (buf[0] & 0x0F) * 4
        buf[1] = 0
        buf[6] = buf[7] = 0
        buf[8] = 0
        buf[10] = buf[11] = 0
        return buf if _zero_ipv4_options(buf, ihl) else None
    buf[0] = 0x60
    buf[1] = buf[2] = buf[3] = 0
    buf[7] = 0
    offset, nh = IPV6_HEADER, buf[6]
    while offset < ah_offset:
        length = (buf[offset + 1] + 1) * 8
        if nh in (PROTO_HOPOPT, PROTO_DSTOPTS):
            if not _zero_ipv6_options(buf, offset, offset + length):
                return None
        elif nh == PROTO_ROUTING and sending and not _routing_as_received(buf, offset):
            return None
        nh = buf[offset]
        offset += length
    return buf


def protect_ah(sa: OutboundSa, packet: bytes, now: float) -> bytes | None:
    """`packet` protected with AH, as a complete IP packet, or None (counted)."""
    integrity = sa.integrity
    if integrity is None:
        raise TypeError("not an AH SA")
    if not outbound_gate(sa, now):
        return None
    c = sa.counters
    ipv6 = len(sa.src) == 16
    if sa.tunnel:
        nh = _TUNNEL_NEXT_HEADER.get(packet[0] >> 4, 0) if packet else 0
        if not nh or inner_ip_length(packet, len(packet)) != len(packet):
            c.drop(DropReason.MALFORMED)
            return None
        header: bytes | memoryview = b""
        nh_offset = 6 if ipv6 else 9
        payload: bytes | memoryview = packet
    else:
        pos = transport_insertion_point(packet)
        if pos is None:
            c.drop(DropReason.MALFORMED)
            return None
        ipv6 = packet[0] >> 4 == 6
        header = memoryview(packet)[: pos.header_end]
        nh, nh_offset = pos.protocol, pos.next_header_offset
        payload = memoryview(packet)[pos.header_end : pos.end]
    ah_len = ah_length(integrity.icv_bytes, ipv6)
    fixed = len(header) if header else (IPV6_HEADER if ipv6 else IPV4_MIN_HEADER)
    if (fixed - (IPV6_HEADER if ipv6 else 0)) + ah_len + len(payload) > MAX_IP_LENGTH:
        c.drop(DropReason.MALFORMED)
        return None
    seq = sa.take_sequence()
    if seq < 0:
        return None
    ah = bytes((nh, ah_len // 4 - 2, 0, 0)) + sa.spi.to_bytes(4, "big") + (seq & 0xFFFFFFFF).to_bytes(4, "big")
    ah += bytes(ah_len - AH_FIXED_BYTES)
    if sa.tunnel:
        header = outer_header(
            sa.src, sa.dst, PROTO_AH, ah_len + len(payload), tos=traffic_class(packet), ident=seq & 0xFFFF
        )
    out = rebuild_transport_packet(header, nh_offset, PROTO_AH, ah + bytes(payload))
    assert out is not None
    ah_offset = len(header)
    zeroed = icv_input(out, ah_offset, integrity.icv_bytes, sending=True)
    if zeroed is None:
        c.drop(DropReason.MALFORMED)  # a routing header we cannot predict; the number is skipped
        return None
    icv = integrity.icv(zeroed, (seq >> 32).to_bytes(4, "big") if sa.esn else b"")
    result = bytearray(out)
    result[ah_offset + AH_FIXED_BYTES : ah_offset + AH_FIXED_BYTES + len(icv)] = icv
    c.packets += 1
    c.bytes += len(packet)
    if c.packets >= sa.packet_mark or c.bytes >= sa.byte_mark:
        sa.on_volume()
    return bytes(result)


def unprotect_ah(sa: InboundSa, packet: bytes, now: float) -> bytes | None:
    """The packet inside an AH-protected IP packet, or None (counted)."""
    integrity = sa.integrity
    if integrity is None:
        raise TypeError("not an AH SA")
    c = sa.counters
    if now >= sa.time_mark:
        sa.on_time(now)
    if sa.hard_expired is not None:
        c.drop(DropReason.LIFETIME)
        return None
    pos = find_ipsec_header(packet, PROTO_AH)
    if pos is None:
        c.drop(DropReason.MALFORMED)
        return None
    ah_offset = pos.header_end
    ipv6 = packet[0] >> 4 == 6
    expected = ah_length(integrity.icv_bytes, ipv6)
    if ah_offset + AH_FIXED_BYTES > pos.end or (packet[ah_offset + 1] + 2) * 4 != expected:
        c.drop(DropReason.MALFORMED)
        return None
    if ah_offset + expected > pos.end:
        c.drop(DropReason.MALFORMED)
        return None
    if int.from_bytes(packet[ah_offset + 4 : ah_offset + 8], "big") != sa.spi:
        c.drop(DropReason.UNKNOWN_SPI)
        return None
    replay = sa.replay
    seq = replay.check(int.from_bytes(packet[ah_offset + 8 : ah_offset + 12], "big"))
    if seq < 0:
        c.drop(DropReason.REPLAY)
        return None
    zeroed = icv_input(memoryview(packet)[: pos.end], ah_offset, integrity.icv_bytes, sending=False)
    if zeroed is None:
        c.drop(DropReason.MALFORMED)
        return None
    icv = integrity.icv(zeroed, (seq >> 32).to_bytes(4, "big") if sa.esn else b"")
    received = packet[ah_offset + AH_FIXED_BYTES : ah_offset + AH_FIXED_BYTES + len(icv)]
    if not hmac.compare_digest(icv, received):
        c.drop(DropReason.ICV_FAILURE)
        return None
    if not replay.accept(seq):
        c.drop(DropReason.REPLAY)
        return None
    if replay.top >= sa.persist_mark:
        sa.on_replay_top()
    next_header = packet[ah_offset]
    payload = memoryview(packet)[ah_offset + expected : pos.end]
    if next_header == PROTO_NONE:
        c.drop(DropReason.DUMMY)
        return None
    if sa.tunnel:
        if not payload or _TUNNEL_NEXT_HEADER.get(payload[0] >> 4) != next_header:
            c.drop(DropReason.MALFORMED)
            return None
        length = inner_ip_length(payload, len(payload))
        if length < 0:
            c.drop(DropReason.MALFORMED)
            return None
        inner = bytes(payload[:length])
    else:
        if next_header == PROTO_HOPOPT:
            c.drop(DropReason.MALFORMED)
            return None
        rebuilt = rebuild_transport_packet(memoryview(packet)[:ah_offset], pos.next_header_offset, next_header, payload)
        if rebuilt is None:
            c.drop(DropReason.MALFORMED)
            return None
        inner = rebuilt
    selectors = sa.selectors
    if not selectors.match_all:
        flow = parse_flow(inner)
        if flow is None:
            c.drop(DropReason.MALFORMED)
            return None
        if not selectors.inbound_allows(flow):
            c.drop(DropReason.POLICY_MISMATCH)
            return None
    c.packets += 1
    c.bytes += len(inner)
    if c.packets >= sa.packet_mark or c.bytes >= sa.byte_mark:
        sa.on_volume()
    return inner
