"""ESP-in-UDP (RFC 3948): what arrives on UDP 4500, NAT keepalives, UDP headers, and the
transport-mode checksum fix-up after NAT.
"""

from __future__ import annotations

from enum import Enum

from esplanade.dataplane.esp.checksum import checksum, ones_sum, pseudo_header_sum, update_checksum
from esplanade.dataplane.esp.ip_headers import IpsecPosition
from esplanade.dataplane.esp.packet import PROTO_TCP, PROTO_UDP, upper_layer

NATT_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"
UDP_HEADER_BYTES = 8


class UdpPayloadKind(Enum):
    IKE = "ike"  # starts with the non-ESP marker: hand to keyexchange without the marker
    NAT_KEEPALIVE = "nat_keepalive"  # the single byte 0xFF: drop (RFC 3948 §2.3)
    ESP = "esp"
    INVALID = "invalid"  # too short to be any of them


def classify_udp_payload(payload: bytes | bytearray | memoryview) -> UdpPayloadKind:
    """Classify a datagram received on UDP 4500 (RFC 3948 §2.2, §2.3)."""
    n = len(payload)
    if n == 1 and payload[0] == 0xFF:
        return UdpPayloadKind.NAT_KEEPALIVE
    if n >= 4 and payload[0] == 0 and payload[1] == 0 and payload[2] == 0 and payload[3] == 0:
        return UdpPayloadKind.IKE
    if n >= 8:
        return UdpPayloadKind.ESP  # SPI is never 0 (RFC 4303 §2.1): the first 4 bytes differ from the marker
    return UdpPayloadKind.INVALID


def nat_keepalive() -> bytes:
    return NAT_KEEPALIVE


def udp_header(src: bytes, dst: bytes, src_port: int, dst_port: int, payload: bytes | bytearray | memoryview) -> bytes:
    """The UDP header for `payload`. IPv4: checksum 0 (RFC 3948 §2.1). IPv6: computed (RFC 8200 §8.1)."""
    length = UDP_HEADER_BYTES + len(payload)
    head = bytes((src_port >> 8, src_port & 0xFF, dst_port >> 8, dst_port & 0xFF, length >> 8, length & 0xFF))
    if len(src) == 4:
        return head + b"\x00\x00"
    c = checksum(payload, pseudo_header_sum(src, dst, PROTO_UDP, length) + ones_sum(head))
    return head + (c or 0xFFFF).to_bytes(2, "big")


def udp_payload(packet: bytes | bytearray | memoryview, position: IpsecPosition) -> tuple[int, int] | None:
    """Bounds (start, end) of the UDP payload of a packet whose UDP header is at `position`."""
    start = position.header_end
    if start + UDP_HEADER_BYTES > position.end:
        return None
    length = packet[start + 4] << 8 | packet[start + 5]
    if length < UDP_HEADER_BYTES or start + length != position.end:
        return None
    return start + UDP_HEADER_BYTES, position.end


def transport_checksum_fixup(packet: bytes, original: bytes) -> bytes:
    """RFC 3948 §3.1.2: after transport-mode decapsulation behind NAT, fix the TCP/UDP checksum.

    The peer computed it over its own view of the addresses, `original` (source + destination
    from NAT-OA); the packet now carries the addresses as received. The update is incremental
    (RFC 1624), so it keeps the checksum valid exactly when it was valid at the peer. A UDP
    checksum of 0 over IPv4 means "none" and stays 0. Non-TCP/UDP packets pass unchanged.
    """
    version = packet[0] >> 4
    current = packet[12:20] if version == 4 else packet[8:40]
    if current == original:
        return packet
    found = upper_layer(packet)
    if found is None:
        return packet
    protocol, offset = found
    if protocol not in (PROTO_TCP, PROTO_UDP):
        return packet
    at = offset + (16 if protocol == PROTO_TCP else 6)
    if at + 2 > len(packet):
        return packet
    old = packet[at] << 8 | packet[at + 1]
    if protocol == PROTO_UDP and old == 0 and version == 4:
        return packet
    new = update_checksum(old, original, current)
    if protocol == PROTO_UDP and new == 0:
        new = 0xFFFF
    out = bytearray(packet)
    out[at] = new >> 8
    out[at + 1] = new & 0xFF
    return bytes(out)
