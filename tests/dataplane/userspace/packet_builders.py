"""Packets for the tests, built by scapy (an independent encoder: lengths and checksums are its own)."""

from __future__ import annotations

from typing import Any

from scapy.compat import raw
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw


def tcp_segments(
    count: int,
    size: int = 1000,
    *,
    v6: bool = False,
    src: str | None = None,
    dst: str | None = None,
    sport: int = 40000,
    dport: int = 5201,
    seq: int = 1000,
    ack: int = 77,
    flags: str = "A",
    last_flags: str | None = None,
    options: list[Any] | None = None,
    last_size: int | None = None,
    first_id: int = 100,
    df: bool = True,
) -> list[bytes]:
    out = []
    offset = 0
    for i in range(count):
        length = last_size if (last_size is not None and i == count - 1) else size
        payload = bytes((seq + offset + j) & 0xFF for j in range(length))
        seg_flags = last_flags if (last_flags is not None and i == count - 1) else flags
        tcp = TCP(sport=sport, dport=dport, seq=(seq + offset) & 0xFFFFFFFF, ack=ack, flags=seg_flags, window=502)
        if options:
            tcp.options = options
        if v6:
            ip: Any = IPv6(src=src or "fd00::1", dst=dst or "fd00::2", hlim=64)
        else:
            ip = IP(
                src=src or "10.0.0.1",
                dst=dst or "10.0.0.2",
                id=(first_id + i) & 0xFFFF,
                ttl=64,
                flags="DF" if df else 0,
            )
        out.append(raw(ip / tcp / Raw(payload)))
        offset += length
    return out


def udp_datagrams(
    count: int,
    size: int = 64,
    *,
    v6: bool = False,
    src: str | None = None,
    dst: str | None = None,
    sport: int = 40000,
    dport: int = 5201,
    last_size: int | None = None,
    first_id: int = 100,
) -> list[bytes]:
    out = []
    for i in range(count):
        length = last_size if (last_size is not None and i == count - 1) else size
        payload = bytes((i + j) & 0xFF for j in range(length))
        if v6:
            ip: Any = IPv6(src=src or "fd00::1", dst=dst or "fd00::2", hlim=64)
        else:
            ip = IP(src=src or "10.0.0.1", dst=dst or "10.0.0.2", id=(first_id + i) & 0xFFFF, ttl=64, flags="DF")
        out.append(raw(ip / UDP(sport=sport, dport=dport) / Raw(payload)))
    return out


def checksum_ok(packet: bytes) -> bool:
    """Does scapy recompute the same IP/L4 checksums that the packet carries?"""
    parsed: Any = IPv6(packet) if packet[0] >> 4 == 6 else IP(packet)
    layers = [parsed] if packet[0] >> 4 == 4 else []
    l4 = parsed.getlayer(TCP) or parsed.getlayer(UDP)
    if l4 is not None:
        layers.append(l4)
    for layer in layers:
        carried = layer.chksum
        layer.chksum = None
        rebuilt: Any = IPv6(raw(parsed)) if packet[0] >> 4 == 6 else IP(raw(parsed))
        expected = (rebuilt if layer is parsed else rebuilt.getlayer(type(layer))).chksum
        layer.chksum = carried
        if carried != expected:
            return False
    return True
