"""Sizes: what ESP adds, the inner MTU that follows, and what to do with packets that do not fit.

Overhead of a tunnel-mode ESP packet (RFC 4303 §2, RFC 3948 §2.1)::

    outer IP (20 | 40) + UDP (8, ESP-in-UDP only) + SPI/seq (8) + IV
    + payload padded so that payload + 2 is a multiple of the block size + pad length/next header (2)
    + ICV (AEAD tag, or the truncated HMAC)

`inner_mtu(path_mtu, ...)` is the largest inner packet whose ESP packet still fits in
`path_mtu`. The TUN MTU is normally set to it, so the host never hands us a larger packet;
with a larger TUN MTU (several peers with different path MTUs behind one TUN, or a PMTU that
shrank) `MtuGuard` enforces it per packet, following RFC 4301 §8.1/§8.2:

* IPv4 with DF set: drop, and send ICMP "fragmentation needed" (type 3, code 4) with the
  inner MTU as next-hop MTU back to the inner sender (RFC 1191).
* IPv4 with DF clear: fragment the inner packet before encapsulation (each fragment is
  then its own ESP packet), so the outer packet never fragments.
* IPv6: drop, and send ICMPv6 "packet too big" (type 2) with max(1280, inner MTU) (RFC 8201).

ICMP errors are rate limited (token bucket, RFC 1812 §4.3.2.8, RFC 4443 §2.4(f)) and never
sent about ICMP errors, non-first fragments, or to unspecified/multicast/broadcast sources.
They leave through raw ICMP sockets, so the kernel picks a local source address by route
and delivers them like any locally generated ICMP.

The outer DF bit (RFC 4301 §8.1) is a socket property here: `DfPolicy.SET` sets
IP_PMTUDISC_DO on the outer socket, `CLEAR` sets IP_PMTUDISC_DONT. Copying DF from each
inner header would need a socket per DF value; we do not offer it.

`MssClamp` rewrites the MSS option of TCP SYNs in both directions down to inner MTU minus
the IP and TCP headers, with an RFC 1624 incremental checksum update.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from enum import Enum

from esplanade.dataplane.userspace.internet_checksum import (
    IPPROTO_ICMPV6,
    checksum,
    incremental_update,
)
from esplanade.ipsec.transforms import EncrAlgorithm, IntegAlgorithm

IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
ESP_HEADER = 8  # SPI + sequence number
ESP_TRAILER = 2  # pad length + next header
IPV6_MIN_MTU = 1280
IPV4_MIN_MTU = 576  # every IPv4 host must accept this (RFC 791); below it we do not go
ICMP_ERROR_QUOTE_V4 = 576 - IPV4_HEADER - 8
ICMP_ERROR_QUOTE_V6 = IPV6_MIN_MTU - IPV6_HEADER - 8

IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
IP_PMTUDISC_DO = 2
SOL_RAW = 255
ICMP_FILTER = 1
ICMP6_FILTER = 1

_ICMPV4_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})


class DfPolicy(Enum):
    SET = "set"
    CLEAR = "clear"


@dataclass(frozen=True, slots=True)
class EspOverhead:
    """Bytes ESP adds: `fixed` always, plus padding up to the next multiple of `block`."""

    fixed: int
    block: int

    def fits(self, path_mtu: int) -> int:
        """The largest inner packet whose ESP packet is at most `path_mtu` bytes."""
        room = path_mtu - self.fixed
        return (room // self.block) * self.block - ESP_TRAILER


def esp_overhead(
    encr: EncrAlgorithm,
    integ: IntegAlgorithm | None = None,
    udp_encap: bool = True,
    outer_ipv6: bool = False,
) -> EspOverhead:
    fixed = (IPV6_HEADER if outer_ipv6 else IPV4_HEADER) + (UDP_HEADER if udp_encap else 0)
    fixed += ESP_HEADER + encr.iv_bytes + (encr.icv_bytes if encr.aead else (integ.icv_bytes if integ else 0))
    return EspOverhead(fixed=fixed, block=max(4, encr.block_bytes))


def opaque_overhead(transform_bytes: int, udp_encap: bool = True, outer_ipv6: bool = False) -> EspOverhead:
    """Overhead of a transform that reports its worst case as one number (no block rounding left)."""
    fixed = (IPV6_HEADER if outer_ipv6 else IPV4_HEADER) + (UDP_HEADER if udp_encap else 0) + transform_bytes
    return EspOverhead(fixed=fixed - ESP_TRAILER, block=1)


def inner_mtu(path_mtu: int, overhead: EspOverhead) -> int:
    value = overhead.fits(path_mtu)
    if value < IPV4_MIN_MTU:
        raise ValueError(f"path MTU {path_mtu} leaves {value} bytes for inner packets, below {IPV4_MIN_MTU}")
    return value


# -- ICMP errors ---------------------------------------------------------------------------


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _icmpv4_frag_needed(packet: bytes, mtu: int) -> bytes:
    body = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + packet[:ICMP_ERROR_QUOTE_V4]
    return body[:2] + checksum(body).to_bytes(2, "big") + body[4:]


def _icmpv6_packet_too_big(packet: bytes, mtu: int) -> bytes:
    # the kernel computes the ICMPv6 checksum (pseudo-header included) for raw ICMPv6 sockets
    return struct.pack("!BBHI", 2, 0, 0, mtu) + packet[:ICMP_ERROR_QUOTE_V6]


def _may_answer_v4(packet: bytes) -> bool:
    if packet[6] & 0x1F or packet[7]:  # a non-first fragment
        return False
    src = ipaddress.IPv4Address(packet[12:16])
    if src.is_unspecified or src.is_multicast or src == ipaddress.IPv4Address("255.255.255.255"):
        return False
    if packet[9] == 1:
        ihl = (packet[0] & 0x0F) * 4
        if len(packet) <= ihl or packet[ihl] in _ICMPV4_ERROR_TYPES:
            return False
    return True


def _may_answer_v6(packet: bytes) -> bool:
    src = ipaddress.IPv6Address(packet[8:24])
    if src.is_unspecified or src.is_multicast:
        return False
    return not (packet[6] == IPPROTO_ICMPV6 and len(packet) > 40 and packet[40] < 128)


def fragment_ipv4(packet: bytes, mtu: int) -> list[bytes]:
    """RFC 791 fragmentation of an IPv4 packet (DF clear) into pieces of at most `mtu` bytes."""
    ihl = (packet[0] & 0x0F) * 4
    header, payload = bytearray(packet[:ihl]), packet[ihl:]
    chunk = ((mtu - ihl) // 8) * 8
    if chunk <= 0:
        return []
    base_offset = int.from_bytes(packet[6:8], "big") & 0x1FFF
    more_after = bool(packet[6] & 0x20)
    pieces: list[bytes] = []
    for start in range(0, len(payload), chunk):
        data = payload[start : start + chunk]
        last = start + chunk >= len(payload)
        head = bytearray(header)
        flags_offset = base_offset + start // 8
        if not last or more_after:
            flags_offset |= 0x2000
        head[6:8] = flags_offset.to_bytes(2, "big")
        head[2:4] = (ihl + len(data)).to_bytes(2, "big")
        head[10:12] = b"\x00\x00"
        head[10:12] = checksum(head).to_bytes(2, "big")
        pieces.append(bytes(head) + data)
    return pieces


class IcmpErrorSender:
    """Raw ICMP/ICMPv6 sockets that only send (every incoming type is filtered out)."""

    def __init__(self) -> None:
        self.drops: Counter[str] = Counter()
        self.sent = 0
        self._v4: socket.socket | None = None
        self._v6: socket.socket | None = None

    def _socket(self, v6: bool) -> socket.socket | None:
        existing = self._v6 if v6 else self._v4
        if existing is not None:
            return existing
        try:
            if v6:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMPV6)
                sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, b"\xff" * 32)
                self._v6 = sock
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMP)
                sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", 0xFFFFFFFF))
                self._v4 = sock
            sock.setblocking(False)
            return sock
        except OSError as exc:
            self.drops[f"socket_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
            return None

    def send(self, v6: bool, destination: str, message: bytes) -> None:
        sock = self._socket(v6)
        if sock is None:
            return
        try:
            sock.sendto(message, (destination, 0))
            self.sent += 1
        except OSError as exc:
            self.drops[f"send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1

    def close(self) -> None:
        for sock in (self._v4, self._v6):
            if sock is not None:
                sock.close()
        self._v4 = self._v6 = None


@dataclass(frozen=True, slots=True)
class IcmpError:
    v6: bool
    destination: str
    message: bytes


class MtuGuard:
    """Enforces the inner MTU on packets read from the TUN (only when the TUN MTU is larger)."""

    def __init__(self, mtu: int, icmp_rate: float = 100.0, icmp_burst: int = 50) -> None:
        self.mtu = mtu
        self.mtu_v6 = max(IPV6_MIN_MTU, mtu)
        self.bucket = TokenBucket(icmp_rate, icmp_burst)
        self.counters: Counter[str] = Counter()

    def enforce(self, packets: list[bytes], now: float) -> tuple[list[bytes], list[IcmpError]]:
        """The packets that may enter the tunnel (fragments included), and the ICMP errors to send."""
        mtu = self.mtu
        if not packets or max(map(len, packets)) <= mtu:
            return packets, []
        fits: list[bytes] = []
        errors: list[IcmpError] = []
        for packet in packets:
            if len(packet) <= mtu:
                fits.append(packet)
            elif packet[0] >> 4 == 4 and len(packet) >= IPV4_HEADER:
                self._too_big_v4(packet, now, fits, errors)
            elif packet[0] >> 4 == 6 and len(packet) >= IPV6_HEADER:
                if len(packet) <= self.mtu_v6:
                    fits.append(packet)  # never below 1280 for IPv6: let the outer packet fragment
                    continue
                self.counters["too_big_v6"] += 1
                if _may_answer_v6(packet) and self._allow(now):
                    src = str(ipaddress.IPv6Address(packet[8:24]))
                    errors.append(IcmpError(True, src, _icmpv6_packet_too_big(packet, self.mtu_v6)))
            else:
                self.counters["malformed"] += 1
        return fits, errors

    def _too_big_v4(self, packet: bytes, now: float, fits: list[bytes], errors: list[IcmpError]) -> None:
        if packet[6] & 0x40:  # DF
            self.counters["too_big_df"] += 1
            if _may_answer_v4(packet) and self._allow(now):
                src = str(ipaddress.IPv4Address(packet[12:16]))
                errors.append(IcmpError(False, src, _icmpv4_frag_needed(packet, self.mtu)))
            return
        pieces = fragment_ipv4(packet, self.mtu)
        if not pieces:
            self.counters["unfragmentable"] += 1
            return
        self.counters["fragmented"] += 1
        fits.extend(pieces)

    def _allow(self, now: float) -> bool:
        if self.bucket.take(now):
            self.counters["icmp_errors"] += 1
            return True
        self.counters["icmp_rate_limited"] += 1
        return False


# -- MSS clamping --------------------------------------------------------------------------


class MssClamp:
    """Lower the MSS option of TCP SYN and SYN-ACK segments to what the tunnel carries."""

    def __init__(self, mtu: int) -> None:
        self.mss_v4 = mtu - IPV4_HEADER - 20
        self.mss_v6 = max(IPV6_MIN_MTU, mtu) - IPV6_HEADER - 20
        self.clamped = 0

    def apply(self, packets: list[bytes]) -> list[bytes]:
        out = packets
        for i, packet in enumerate(packets):
            if len(packet) < 40:
                continue
            b0 = packet[0]
            if b0 == 0x45 and (packet[9] != 6 or not packet[33] & 0x02):
                continue  # the common case first: IPv4 without options, not a TCP SYN
            if b0 >> 4 == 4:
                if packet[9] != 6 or packet[6] & 0x1F or packet[7]:
                    continue
                l4 = (b0 & 0x0F) * 4
                limit = self.mss_v4
            elif b0 >> 4 == 6:
                if packet[6] != 6 or len(packet) < 60:
                    continue
                l4 = IPV6_HEADER
                limit = self.mss_v6
            else:
                continue
            if len(packet) < l4 + 20 or not packet[l4 + 13] & 0x02:  # SYN
                continue
            clamped = self._clamp(packet, l4, limit)
            if clamped is not None:
                if out is packets:
                    out = list(packets)
                out[i] = clamped
                self.clamped += 1
        return out

    @staticmethod
    def _clamp(packet: bytes, l4: int, limit: int) -> bytes | None:
        end = l4 + (packet[l4 + 12] >> 4) * 4
        pos = l4 + 20
        if end > len(packet):
            return None
        while pos < end:
            kind = packet[pos]
            if kind == 0:  # end of option list
                return None
            if kind == 1:  # no-op
                pos += 1
                continue
            if pos + 1 >= end:
                return None
            size = packet[pos + 1]
            if size < 2 or pos + size > end:
                return None
            if kind == 2 and size == 4:
                mss = int.from_bytes(packet[pos + 2 : pos + 4], "big")
                if mss <= limit:
                    return None
                old_sum = int.from_bytes(packet[l4 + 16 : l4 + 18], "big")
                if (pos + 2 - l4) & 1:  # the value straddles two 16-bit words: it adds byte-swapped
                    new_sum = incremental_update(old_sum, _swap16(mss), _swap16(limit))
                else:
                    new_sum = incremental_update(old_sum, mss, limit)
                buf = bytearray(packet)
                buf[pos + 2 : pos + 4] = limit.to_bytes(2, "big")
                buf[l4 + 16 : l4 + 18] = new_sum.to_bytes(2, "big")
                return bytes(buf)
            pos += size
        return None


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def outer_df_option(policy: DfPolicy) -> tuple[int, int, int]:
    """The setsockopt (level, name, value) for the outer IPv4 DF bit."""
    return socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO if policy is DfPolicy.SET else IP_PMTUDISC_DONT
