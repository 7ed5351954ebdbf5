"""ESP encapsulation and decapsulation (RFC 4303), tunnel and transport mode, with UDP (RFC 3948).

Two shapes of output and input:
- the ESP payload (SPI .. ICV) without outer IP header, for UDP and raw sockets that add it
  (`encrypt_esp` / `decrypt_esp`);
- complete IP packets ([outer IP] [UDP] ESP ...), for header-included raw sockets and tests
  (`protect_esp` / `unprotect_esp`).

Nothing here raises on wire input: every refusal is `None` plus one counted `DropReason`.
"""

from __future__ import annotations

from esplanade.dataplane.esp.checksum import update_checksum
from esplanade.dataplane.esp.cipher_suites import ESP_HEADER_BYTES, EspCipher
from esplanade.dataplane.esp.counters import DropReason
from esplanade.dataplane.esp.ip_headers import (
    MAX_IP_LENGTH,
    find_ipsec_header,
    outer_header,
    rebuild_transport_packet,
    traffic_class,
    transport_insertion_point,
)
from esplanade.dataplane.esp.natt import (
    UDP_HEADER_BYTES,
    transport_checksum_fixup,
    udp_header,
    udp_payload,
)
from esplanade.dataplane.esp.packet import (
    IPV4_MIN_HEADER,
    IPV6_HEADER,
    PROTO_ESP,
    PROTO_HOPOPT,
    PROTO_IPIP,
    PROTO_IPV6,
    PROTO_NONE,
    PROTO_UDP,
    parse_flow,
)
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa

PADDING = bytes(range(1, 256))  # RFC 4303 §2.4: padding bytes are 1, 2, 3, ...
_TUNNEL_NEXT_HEADER = {4: PROTO_IPIP, 6: PROTO_IPV6}
_ECN_MASK = 0x03
_ECN_CE = 0x03


def inner_ip_length(packet: bytes | bytearray | memoryview, limit: int) -> int:
    """Length of the IP packet at the start of `packet` if it is plausible and fits `limit`, else -1."""
    if limit < 1:
        return -1
    version = packet[0] >> 4
    if version == 4:
        if limit < IPV4_MIN_HEADER or (packet[0] & 0x0F) < 5:
            return -1
        length = packet[2] << 8 | packet[3]
        return length if (packet[0] & 0x0F) * 4 <= length <= limit else -1
    if version == 6:
        if limit < IPV6_HEADER:
            return -1
        length = IPV6_HEADER + (packet[4] << 8 | packet[5])
        return length if length <= limit else -1
    return -1


def _max_esp_bytes(sa: OutboundSa, header_bytes: int) -> int:
    udp = UDP_HEADER_BYTES if sa.encap is not None else 0
    # IPv4 total length counts the header; the IPv6 payload length does not count the fixed 40.
    fixed = header_bytes if len(sa.src) == 4 else header_bytes - IPV6_HEADER
    return MAX_IP_LENGTH - fixed - udp


def esp_plaintext(body: bytes | bytearray | memoryview, next_header: int, pad_to: int, align: int) -> bytearray:
    """Payload, TFC padding (zeros up to `pad_to`), padding 1, 2, 3, ..., pad length, next header."""
    size = len(body)
    tfc = pad_to - size if pad_to > size else 0
    padlen = -(size + tfc + 2) % align
    plaintext = bytearray(body)
    if tfc:
        plaintext += bytes(tfc)
    plaintext += PADDING[:padlen]
    plaintext.append(padlen)
    plaintext.append(next_header)
    return plaintext


def build_esp_packet(
    cipher: EspCipher,
    spi: int,
    seq: int,
    iv: bytes,
    body: bytes | bytearray | memoryview,
    next_header: int,
    *,
    pad_to: int = 0,
    esn: bool = False,
) -> bytes:
    """One ESP packet (SPI .. ICV) with an explicit IV: the pure codec under `seal_esp`."""
    header = spi.to_bytes(4, "big") + (seq & 0xFFFFFFFF).to_bytes(4, "big")
    plaintext = esp_plaintext(body, next_header, pad_to, cipher.align)
    return cipher.seal(header, iv, plaintext, seq >> 32 if esn else None)


def seal_esp(
    sa: OutboundSa,
    body: bytes | bytearray | memoryview,
    next_header: int,
    pad_to: int,
    accounted: int,
    header_bytes: int,
) -> bytes | None:
    """Build one ESP packet around `body` (an inner packet or a transport payload) for `sa`.

    The per-packet path: `build_esp_packet` inlined, so keep the two in step.
    """
    cipher = sa.cipher
    if cipher is None:
        raise TypeError("not an ESP SA")
    size = len(body)
    tfc = pad_to - size if pad_to > size else 0
    padlen = -(size + tfc + 2) % cipher.align
    total = ESP_HEADER_BYTES + cipher.iv_bytes + size + tfc + padlen + 2 + cipher.icv_bytes
    if total > _max_esp_bytes(sa, header_bytes):
        sa.counters.drop(DropReason.MALFORMED)
        return None
    seq = sa.take_sequence()
    if seq < 0:
        return None
    plaintext = bytearray(body)
    if tfc:
        plaintext += bytes(tfc)
    plaintext += _TRAILERS[padlen][next_header]
    iv = seq.to_bytes(8, "big") if cipher.counter_iv else sa.random_iv(cipher.iv_bytes)
    header = sa.spi_bytes + (seq & 0xFFFFFFFF).to_bytes(4, "big")
    out = cipher.seal(header, iv, plaintext, seq >> 32 if sa.esn else None)
    c = sa.counters
    c.packets += 1
    c.bytes += accounted
    if c.packets >= sa.packet_mark or c.bytes >= sa.byte_mark:
        sa.on_volume()
    return out


# Padding, pad length and next header for every (pad length, next header): one concatenation per packet.
_TRAILERS = [[PADDING[:p] + bytes((p, nh)) for nh in range(256)] for p in range(16)]


def outbound_gate(sa: OutboundSa, now: float) -> bool:
    if now >= sa.time_mark:
        sa.on_time(now)
    if sa.hard_expired is not None:
        sa.counters.drop(DropReason.LIFETIME)
        return False
    return True


def encrypt_esp(sa: OutboundSa, packet: bytes, now: float) -> bytes | None:
    """The ESP payload (SPI, seq, IV, ciphertext, ICV) protecting `packet`, or None (counted).

    Tunnel mode: `packet` is the inner IP packet, TFC-padded up to `tfc.pad_to`. Transport
    mode: `packet` is the IP packet whose upper-layer payload is protected; its IP header is
    not part of the result (use `protect_esp` to get the whole packet).
    """
    if not outbound_gate(sa, now):
        return None
    if sa.tunnel:
        n = len(packet)
        nh = _TUNNEL_NEXT_HEADER.get(packet[0] >> 4, 0) if n else 0
        if not nh or inner_ip_length(packet, n) != n:
            sa.counters.drop(DropReason.MALFORMED)
            return None
        return seal_esp(sa, packet, nh, sa.tfc_pad_to, n, sa.outer_header_bytes)
    pos = transport_insertion_point(packet)
    if pos is None:
        sa.counters.drop(DropReason.MALFORMED)
        return None
    return seal_esp(sa, memoryview(packet)[pos.header_end : pos.end], pos.protocol, 0, pos.end, pos.header_end)


def make_dummy_esp(sa: OutboundSa, now: float, length: int | None = None) -> bytes | None:
    """A TFC dummy packet (next header 59, RFC 4303 §2.6) of `length` random bytes
    (default: the SA's `tfc.pad_to`), as an ESP payload."""
    if not outbound_gate(sa, now):
        return None
    size = sa.tfc_pad_to if length is None else length
    body = sa.random_bytes(size) if size > 0 else b""
    return seal_esp(sa, body, PROTO_NONE, 0, 0, sa.outer_header_bytes)


def _wrap_outer(sa: OutboundSa, esp: bytes, src: bytes, dst: bytes) -> tuple[int, bytes]:
    if sa.encap is None:
        return PROTO_ESP, esp
    return PROTO_UDP, udp_header(src, dst, sa.encap.src_port, sa.encap.dst_port, esp) + esp


def protect_esp(sa: OutboundSa, packet: bytes, now: float) -> bytes | None:
    """`packet` protected as a complete IP packet: [outer IP] [UDP] ESP."""
    if sa.tunnel:
        esp = encrypt_esp(sa, packet, now)
        if esp is None:
            return None
        protocol, payload = _wrap_outer(sa, esp, sa.src, sa.dst)
        # RFC 4301 §5.1.2.1 / RFC 6040 normal mode: copy DSCP and ECN; copy DF from IPv4.
        df = packet[0] >> 4 == 4 and bool(packet[6] & 0x40)
        ident = (esp[6] << 8 | esp[7]) if len(sa.src) == 4 else 0
        header = outer_header(
            sa.src, sa.dst, protocol, len(payload), tos=traffic_class(packet), ident=ident, dont_fragment=df
        )
        return header + payload
    if not outbound_gate(sa, now):
        return None
    pos = transport_insertion_point(packet)
    if pos is None:
        sa.counters.drop(DropReason.MALFORMED)
        return None
    esp = seal_esp(sa, memoryview(packet)[pos.header_end : pos.end], pos.protocol, 0, pos.end, pos.header_end)
    if esp is None:
        return None
    if packet[0] >> 4 == 4:
        src, dst = packet[12:16], packet[16:20]
    else:
        src, dst = packet[8:24], packet[24:40]
    protocol, payload = _wrap_outer(sa, esp, src, dst)
    out = rebuild_transport_packet(memoryview(packet)[: pos.header_end], pos.next_header_offset, protocol, payload)
    assert out is not None  # seal_esp checked the size
    return out


def decrypt_esp(
    sa: InboundSa, esp: bytes, now: float, transport_header: tuple[bytes | memoryview, int] | None = None
) -> bytes | None:
    """The packet inside an ESP payload (SPI .. ICV), or None (counted).

    Tunnel mode: the inner IP packet (TFC padding removed). Transport mode: the IP packet
    rebuilt from `transport_header` (the cleartext header bytes and the offset of the
    protocol byte to restore), or from the SA's outer addresses if none is given.
    """
    c = sa.counters
    if now >= sa.time_mark:
        sa.on_time(now)
    if sa.hard_expired is not None:
        c.drop(DropReason.LIFETIME)
        return None
    cipher = sa.cipher
    if cipher is None:
        raise TypeError("not an ESP SA")
    body = len(esp) - ESP_HEADER_BYTES - cipher.iv_bytes - cipher.icv_bytes
    if body < cipher.align or body % cipher.align:
        c.drop(DropReason.MALFORMED)
        return None
    if esp[0:4] != sa.spi_bytes:
        c.drop(DropReason.UNKNOWN_SPI)
        return None
    replay = sa.replay
    seq = replay.check(int.from_bytes(esp[4:8], "big"))
    if seq < 0:
        c.drop(DropReason.REPLAY)
        return None
    plaintext = cipher.open(esp, seq >> 32 if sa.esn else None)
    if plaintext is None:
        c.drop(DropReason.ICV_FAILURE)
        return None
    # Authentic from here on: the window moves even if the content turns out malformed.
    if not replay.accept(seq):
        c.drop(DropReason.REPLAY)
        return None
    if replay.top >= sa.persist_mark:
        sa.on_replay_top()
    n = len(plaintext)
    padlen = plaintext[n - 2]
    next_header = plaintext[n - 1]
    data_len = n - 2 - padlen
    if data_len < 0 or (padlen and plaintext[data_len : n - 2] != PADDING[:padlen]):
        c.drop(DropReason.MALFORMED)
        return None
    if next_header == PROTO_NONE:
        c.drop(DropReason.DUMMY)
        return None
    if sa.tunnel:
        if _TUNNEL_NEXT_HEADER.get(plaintext[0] >> 4 if data_len else 0) != next_header:
            c.drop(DropReason.MALFORMED)
            return None
        length = inner_ip_length(plaintext, data_len)
        if length < 0:
            c.drop(DropReason.MALFORMED)
            return None
        inner = plaintext[:length] if length != n else plaintext
    else:
        if next_header == PROTO_HOPOPT:
            c.drop(DropReason.MALFORMED)
            return None
        payload = memoryview(plaintext)[:data_len]
        if transport_header is None:
            fixed = 0 if len(sa.src) == 16 else IPV4_MIN_HEADER
            rebuilt = None
            if fixed + data_len <= MAX_IP_LENGTH:
                rebuilt = outer_header(sa.src, sa.dst, next_header, data_len) + payload
        else:
            rebuilt = rebuild_transport_packet(transport_header[0], transport_header[1], next_header, payload)
        if rebuilt is None:
            c.drop(DropReason.MALFORMED)
            return None
        inner = rebuilt
        if sa.nat_original is not None:
            inner = transport_checksum_fixup(inner, sa.nat_original)
    selectors = sa.selectors
    if selectors.match_all:
        pass
    elif selectors.address_only:
        # Protocol and ports are unconstrained: the addresses decide, read from the header
        # that inner_ip_length / the rebuild above already checked.
        if not selectors.inbound_allows_addresses(inner):
            sa.drop_outside_selectors(inner)
            return None
    else:
        flow = parse_flow(inner)
        if flow is None:
            c.drop(DropReason.MALFORMED)
            return None
        if not selectors.inbound_allows(flow):
            sa.drop_outside_selectors(inner)
            return None
    c.packets += 1
    c.bytes += len(inner)
    if c.packets >= sa.packet_mark or c.bytes >= sa.byte_mark:
        sa.on_volume()
    return inner


def _propagate_ecn(outer_tc: int, inner: bytes) -> bytes:
    """RFC 6040 §4.2 decapsulation: an outer CE marks an ECN-capable inner packet CE."""
    if outer_tc & _ECN_MASK != _ECN_CE:
        return inner
    if inner[0] >> 4 == 4:
        if inner[1] & _ECN_MASK in (0, _ECN_CE):
            return inner
        out = bytearray(inner)
        old = out[1]
        out[1] = old | _ECN_CE
        # Incremental header checksum update (RFC 1624) for the changed TOS byte.
        c = update_checksum(out[10] << 8 | out[11], bytes((out[0], old)), bytes((out[0], out[1])))
        out[10], out[11] = c >> 8, c & 0xFF
        return bytes(out)
    tc = ((inner[0] & 0x0F) << 4) | (inner[1] >> 4)
    if tc & _ECN_MASK in (0, _ECN_CE):
        return inner
    out = bytearray(inner)
    out[1] |= _ECN_CE << 4
    return bytes(out)


def unprotect_esp(sa: InboundSa, packet: bytes, now: float) -> bytes | None:
    """The packet inside a complete IP packet carrying ESP (or ESP-in-UDP for UDP SAs)."""
    if sa.encap is not None:
        pos = find_ipsec_header(packet, PROTO_UDP)
        bounds = udp_payload(packet, pos) if pos is not None else None
        if pos is None or bounds is None:
            sa.counters.drop(DropReason.MALFORMED)
            return None
        start, end = bounds
        if end - start >= 4 and packet[start : start + 4] == b"\x00\x00\x00\x00":
            sa.counters.drop(DropReason.MALFORMED)  # IKE (non-ESP marker), not for the ESP engine
            return None
    else:
        pos = find_ipsec_header(packet, PROTO_ESP)
        if pos is None:
            sa.counters.drop(DropReason.MALFORMED)
            return None
        start, end = pos.header_end, pos.end
    esp = packet[start:end]
    header = None if sa.tunnel else (memoryview(packet)[: pos.header_end], pos.next_header_offset)
    inner = decrypt_esp(sa, esp, now, header)
    if inner is None or not sa.tunnel:
        return inner
    return _propagate_ecn(traffic_class(packet), inner)
