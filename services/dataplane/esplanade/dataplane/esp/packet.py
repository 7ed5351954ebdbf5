"""A small IPv4/IPv6 parser for what the SPD and the policy filters look at.

`parse_flow` yields the selector fields of a packet (RFC 4301 §4.4.1.1): addresses, the
upper-layer protocol after IPv6 extension headers, and ports, or ICMP type/code as
``type << 8 | code`` in both port fields. Non-first fragments carry no ports (-1), so only
any-port selectors match them. Malformed packets give None; nothing here raises.
"""

from __future__ import annotations

from typing import NamedTuple

PROTO_HOPOPT = 0
PROTO_ICMP = 1
PROTO_IPIP = 4
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_IPV6 = 41
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60
PROTO_SCTP = 132
PROTO_UDPLITE = 136
PROTO_DCCP = 33

IPV4_MIN_HEADER = 20
IPV6_HEADER = 40

_PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_UDPLITE, PROTO_DCCP})
_ICMP_PROTOCOLS = frozenset({PROTO_ICMP, PROTO_ICMPV6})
# Extension headers with the generic (next header, length in 8-octet units - 1) layout.
_GENERIC_EXTENSIONS = frozenset({PROTO_HOPOPT, PROTO_ROUTING, PROTO_DSTOPTS})
# Headers walked to find the upper layer (RFC 8200 §4; AH is skipped as in RFC 4301 §4.4.1.1).
_WALKED_EXTENSIONS = _GENERIC_EXTENSIONS | {PROTO_FRAGMENT, PROTO_AH}


class FlowKey(NamedTuple):
    version: int
    src: int
    dst: int
    protocol: int
    src_port: int  # -1: none (non-first fragment, or a protocol without ports)
    dst_port: int
    fragment: bool  # any fragment, first or not


def ip_version(packet: bytes | bytearray | memoryview) -> int:
    return packet[0] >> 4 if packet else 0


def ip_packet_length(packet: bytes | bytearray | memoryview) -> int:
    """Length the IP header claims for the whole packet, or -1 if it cannot be read."""
    n = len(packet)
    if n == 0:
        return -1
    version = packet[0] >> 4
    if version == 4:
        if n < IPV4_MIN_HEADER or (packet[0] & 0x0F) < 5:
            return -1
        return packet[2] << 8 | packet[3]
    if version == 6:
        if n < IPV6_HEADER:
            return -1
        return IPV6_HEADER + (packet[4] << 8 | packet[5])
    return -1


def ipv6_extension_length(packet: bytes | bytearray | memoryview, offset: int, header: int) -> int:
    """Length of the extension header `header` at `offset`, or -1 if truncated."""
    if offset + 8 > len(packet):
        return -1
    if header == PROTO_FRAGMENT:
        return 8
    if header == PROTO_AH:
        return (packet[offset + 1] + 2) * 4
    return (packet[offset + 1] + 1) * 8


def parse_flow(packet: bytes | bytearray | memoryview) -> FlowKey | None:
    n = len(packet)
    if n == 0:
        return None
    version = packet[0] >> 4
    fragment = False
    first_fragment = True
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or n < ihl:
            return None
        total = packet[2] << 8 | packet[3]
        if total < ihl or total > n:
            return None
        frag = (packet[6] << 8 | packet[7]) & 0x3FFF  # MF flag and offset
        if frag:
            fragment = True
            first_fragment = (frag & 0x1FFF) == 0
        src = int.from_bytes(packet[12:16], "big")
        dst = int.from_bytes(packet[16:20], "big")
        protocol = packet[9]
        offset = ihl
        end = total
    elif version == 6:
        if n < IPV6_HEADER:
            return None
        end = IPV6_HEADER + (packet[4] << 8 | packet[5])
        if end > n:
            return None
        src = int.from_bytes(packet[8:24], "big")
        dst = int.from_bytes(packet[24:40], "big")
        protocol = packet[6]
        offset = IPV6_HEADER
        while protocol in _WALKED_EXTENSIONS:
            length = ipv6_extension_length(packet, offset, protocol)
            if length < 0 or offset + length > end:
                return None
            if protocol == PROTO_FRAGMENT:
                fragment = True
                first_fragment = ((packet[offset + 2] << 8 | packet[offset + 3]) >> 3) == 0
            protocol = packet[offset]
            offset += length
            if not first_fragment:
                break
    else:
        return None
    if not first_fragment:
        return FlowKey(version, src, dst, protocol, -1, -1, True)
    if protocol in _PORT_PROTOCOLS:
        if offset + 4 > end:
            return None
        return FlowKey(
            version,
            src,
            dst,
            protocol,
            packet[offset] << 8 | packet[offset + 1],
            packet[offset + 2] << 8 | packet[offset + 3],
            fragment,
        )
    if protocol in _ICMP_PROTOCOLS:
        if offset + 2 > end:
            return None
        type_code = packet[offset] << 8 | packet[offset + 1]
        return FlowKey(version, src, dst, protocol, type_code, type_code, fragment)
    return FlowKey(version, src, dst, protocol, -1, -1, fragment)


def upper_layer(packet: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(protocol, offset) of the upper-layer header, or None for malformed packets and
    non-first fragments."""
    n = len(packet)
    if n == 0:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or n < ihl or (packet[6] << 8 | packet[7]) & 0x1FFF:
            return None
        return packet[9], ihl
    if version != 6 or n < IPV6_HEADER:
        return None
    protocol, offset = packet[6], IPV6_HEADER
    while protocol in _WALKED_EXTENSIONS:
        length = ipv6_extension_length(packet, offset, protocol)
        if length < 0 or offset + length > n:
            return None
        if protocol == PROTO_FRAGMENT and (packet[offset + 2] << 8 | packet[offset + 3]) >> 3:
            return None
        protocol = packet[offset]
        offset += length
    return protocol, offset
