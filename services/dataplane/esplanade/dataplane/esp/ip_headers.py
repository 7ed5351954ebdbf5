"""Building outer IP headers and cutting IP packets where ESP or AH goes (transport mode).

Where ESP/AH goes in IPv6 (RFC 4303 §3.1.1, RFC 4302 §3.1.1): after hop-by-hop, routing
and fragment headers, and after destination options that precede a routing header (or
stand alone), as Linux (`ip6_find_1stfragopt`) places them; destination options that
follow a routing header go after ESP/AH.
"""

from __future__ import annotations

from typing import NamedTuple

from esplanade.dataplane.esp.checksum import checksum
from esplanade.dataplane.esp.packet import (
    IPV4_MIN_HEADER,
    IPV6_HEADER,
    PROTO_AH,
    PROTO_DSTOPTS,
    PROTO_FRAGMENT,
    PROTO_HOPOPT,
    PROTO_ROUTING,
    ipv6_extension_length,
)

DEFAULT_TTL = 64
MAX_IP_LENGTH = 0xFFFF
_FRAGMENT_OFFSET_AND_MORE = 0xFFF9  # IPv6 fragment header: offset (13 bits), reserved (2), M (1)


def ipv4_header(
    src: bytes,
    dst: bytes,
    protocol: int,
    payload_length: int,
    *,
    tos: int = 0,
    ttl: int = DEFAULT_TTL,
    ident: int = 0,
    dont_fragment: bool = False,
) -> bytes:
    """A 20-byte IPv4 header with its checksum."""
    total = IPV4_MIN_HEADER + payload_length
    header = bytearray(
        (
            0x45,
            tos,
            total >> 8,
            total & 0xFF,
            (ident >> 8) & 0xFF,
            ident & 0xFF,
            0x40 if dont_fragment else 0,
            0,
            ttl,
            protocol,
            0,
            0,
        )
    )
    header += src
    header += dst
    c = checksum(header)
    header[10] = c >> 8
    header[11] = c & 0xFF
    return bytes(header)


def ipv6_header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_length: int,
    *,
    traffic_class: int = 0,
    flow_label: int = 0,
    hop_limit: int = DEFAULT_TTL,
) -> bytes:
    first = 0x60000000 | (traffic_class << 20) | (flow_label & 0xFFFFF)
    return (
        first.to_bytes(4, "big")
        + bytes((payload_length >> 8, payload_length & 0xFF, next_header, hop_limit))
        + src
        + dst
    )


def outer_header(
    src: bytes,
    dst: bytes,
    protocol: int,
    payload_length: int,
    *,
    tos: int = 0,
    ttl: int = DEFAULT_TTL,
    ident: int = 0,
    dont_fragment: bool = False,
) -> bytes:
    """An IPv4 or IPv6 header (by the address length) for a payload of `payload_length`."""
    if len(src) == 4:
        return ipv4_header(
            src, dst, protocol, payload_length, tos=tos, ttl=ttl, ident=ident, dont_fragment=dont_fragment
        )
    return ipv6_header(src, dst, protocol, payload_length, traffic_class=tos, hop_limit=ttl)


def set_ipv4_checksum(header: bytearray, ihl: int) -> None:
    header[10] = 0
    header[11] = 0
    c = checksum(memoryview(header)[:ihl])
    header[10] = c >> 8
    header[11] = c & 0xFF


def traffic_class(packet: bytes | bytearray | memoryview) -> int:
    """The IPv4 TOS or IPv6 traffic class byte (DSCP and ECN)."""
    if packet[0] >> 4 == 4:
        return packet[1]
    return ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)


class IpsecPosition(NamedTuple):
    """Where an IPsec header sits, or goes, in an IP packet."""

    header_end: int  # offset of the ESP/AH header: everything before stays in clear
    next_header_offset: int  # offset of the byte naming the protocol that follows `header_end`
    protocol: int  # what that byte says now
    end: int  # end of the packet by its IP length


def transport_insertion_point(packet: bytes | bytearray | memoryview) -> IpsecPosition | None:
    """Where ESP/AH is inserted into `packet` (transport mode), or None if it is malformed or a
    fragment (transport mode protects whole datagrams, RFC 4303 §3.3.4, RFC 4302 §3.3.4)."""
    n = len(packet)
    if n == 0:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or n < ihl:
            return None
        total = packet[2] << 8 | packet[3]
        if total < ihl or total > n:
            return None
        if (packet[6] << 8 | packet[7]) & 0x3FFF:
            return None  # a fragment: transport mode protects whole datagrams only (RFC 4303 §3.3.4)
        return IpsecPosition(ihl, 9, packet[9], total)
    if version != 6 or n < IPV6_HEADER:
        return None
    end = IPV6_HEADER + (packet[4] << 8 | packet[5])
    if end > n:
        return None
    offset, nh_offset, nh = IPV6_HEADER, 6, packet[6]
    routing_seen = False
    while nh in (PROTO_HOPOPT, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DSTOPTS):
        if nh == PROTO_DSTOPTS and routing_seen:
            break
        if nh == PROTO_HOPOPT and offset != IPV6_HEADER:
            return None  # hop-by-hop is only allowed right after the IPv6 header
        routing_seen = routing_seen or nh == PROTO_ROUTING
        length = ipv6_extension_length(packet, offset, nh)
        if length < 0 or offset + length > end:
            return None
        if nh == PROTO_FRAGMENT and (packet[offset + 2] << 8 | packet[offset + 3]) & _FRAGMENT_OFFSET_AND_MORE:
            return None  # a fragment (an atomic fragment is a whole datagram): RFC 4303 §3.3.4
        nh_offset, nh = offset, packet[offset]
        offset += length
    return IpsecPosition(offset, nh_offset, nh, end)


def find_ipsec_header(packet: bytes | bytearray | memoryview, protocol: int) -> IpsecPosition | None:
    """Locate the first `protocol` header (ESP 50, AH 51, UDP 17) of a received packet."""
    n = len(packet)
    if n == 0:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or n < ihl:
            return None
        total = packet[2] << 8 | packet[3]
        if total < ihl or total > n or packet[9] != protocol:
            return None
        if (packet[6] << 8 | packet[7]) & 0x3FFF:
            return None  # a fragment: IPsec processing happens after reassembly (RFC 4303 §3.4.1)
        return IpsecPosition(ihl, 9, protocol, total)
    if version != 6 or n < IPV6_HEADER:
        return None
    end = IPV6_HEADER + (packet[4] << 8 | packet[5])
    if end > n:
        return None
    offset, nh_offset, nh = IPV6_HEADER, 6, packet[6]
    while nh != protocol:
        if nh not in (PROTO_HOPOPT, PROTO_ROUTING, PROTO_DSTOPTS) or (nh == PROTO_AH and protocol != PROTO_AH):
            return None  # fragments, unknown headers, or a different upper layer
        length = ipv6_extension_length(packet, offset, nh)
        if length < 0 or offset + length > end:
            return None
        nh_offset, nh = offset, packet[offset]
        offset += length
    return IpsecPosition(offset, nh_offset, nh, end)


def rebuild_transport_packet(
    header: bytes | bytearray | memoryview, next_header_offset: int, protocol: int, payload: bytes | memoryview
) -> bytes | None:
    """`header` (IP header and the extension headers before ESP/AH) + `payload`, with the
    protocol byte, the length fields and the IPv4 header checksum set. None if too long."""
    out = bytearray(header)
    out[next_header_offset] = protocol
    if out[0] >> 4 == 4:
        total = len(out) + len(payload)
        if total > MAX_IP_LENGTH:
            return None
        out[2] = total >> 8
        out[3] = total & 0xFF
        set_ipv4_checksum(out, (out[0] & 0x0F) * 4)
    else:
        plen = len(out) - IPV6_HEADER + len(payload)
        if plen > MAX_IP_LENGTH:
            return None
        out[4] = plen >> 8
        out[5] = plen & 0xFF
    out += payload
    return bytes(out)
