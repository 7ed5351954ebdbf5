"""The entry points the datapath calls: one packet or a batch, ESP or AH, per SA.

Shapes:
- `encrypt` / `encrypt_batch`: ESP payloads (SPI .. ICV) for a UDP socket (ESP-in-UDP) or a
  raw IPPROTO_ESP socket, which add the outer headers.
- `protect` / `protect_batch`: complete IP packets (outer IP, UDP for ESP-in-UDP SAs, ESP or
  AH), for header-included raw sockets; the only shape for AH and for transport mode with
  IPv6 extension headers.
- `decrypt` / `decrypt_batch`: ESP payloads (as a UDP socket delivers them, after
  `classify_udp_payload` said ESP) -> inner packets.
- `unprotect` / `unprotect_batch`: complete IP packets -> inner packets.
- `decrypt_demux_batch`: ESP payloads of many SAs, looked up by SPI.

Batches return only what passed; every packet left out is counted in its SA's counters
(or the demultiplexer's, for unknown SPIs). Nothing raises on wire input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from esplanade.dataplane.esp.ah import protect_ah, unprotect_ah
from esplanade.dataplane.esp.counters import DropReason
from esplanade.dataplane.esp.esp_codec import (
    decrypt_esp,
    encrypt_esp,
    make_dummy_esp,
    protect_esp,
    unprotect_esp,
)
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa
from esplanade.dataplane.esp.spd import InboundSaTable
from esplanade.ipsec.transforms import IpProto


def _require_esp(sa: OutboundSa | InboundSa) -> None:
    if sa.protocol != IpProto.ESP:
        raise TypeError(f"SA {sa.spi:#x} is AH: use protect()/unprotect() for complete packets")


def encrypt(sa: OutboundSa, packet: bytes, now: float) -> bytes | None:
    _require_esp(sa)
    return encrypt_esp(sa, packet, now)


def encrypt_batch(sa: OutboundSa, packets: Iterable[bytes], now: float) -> list[bytes]:
    _require_esp(sa)
    out: list[bytes] = []
    append = out.append
    for packet in packets:
        esp = encrypt_esp(sa, packet, now)
        if esp is not None:
            append(esp)
    return out


def make_dummy(sa: OutboundSa, now: float, length: int | None = None) -> bytes | None:
    """A TFC dummy ESP payload (next header 59); the receiver drops it as "dummy"."""
    _require_esp(sa)
    return make_dummy_esp(sa, now, length)


def protect(sa: OutboundSa, packet: bytes, now: float) -> bytes | None:
    if sa.protocol == IpProto.AH:
        return protect_ah(sa, packet, now)
    return protect_esp(sa, packet, now)


def protect_batch(sa: OutboundSa, packets: Iterable[bytes], now: float) -> list[bytes]:
    one = protect_ah if sa.protocol == IpProto.AH else protect_esp
    out: list[bytes] = []
    for packet in packets:
        result = one(sa, packet, now)
        if result is not None:
            out.append(result)
    return out


def decrypt(sa: InboundSa, esp: bytes, now: float) -> bytes | None:
    _require_esp(sa)
    return decrypt_esp(sa, esp, now)


def decrypt_batch(sa: InboundSa, payloads: Iterable[bytes], now: float) -> list[bytes]:
    _require_esp(sa)
    out: list[bytes] = []
    append = out.append
    for esp in payloads:
        inner = decrypt_esp(sa, esp, now)
        if inner is not None:
            append(inner)
    return out


def unprotect(sa: InboundSa, packet: bytes, now: float) -> bytes | None:
    if sa.protocol == IpProto.AH:
        return unprotect_ah(sa, packet, now)
    return unprotect_esp(sa, packet, now)


def unprotect_batch(sa: InboundSa, packets: Iterable[bytes], now: float) -> list[bytes]:
    one = unprotect_ah if sa.protocol == IpProto.AH else unprotect_esp
    out: list[bytes] = []
    for packet in packets:
        result = one(sa, packet, now)
        if result is not None:
            out.append(result)
    return out


def decrypt_demux_batch(table: InboundSaTable, payloads: Sequence[bytes], now: float) -> list[tuple[InboundSa, bytes]]:
    """Decrypt ESP payloads of any installed SA; returns (SA, inner packet) for what passed."""
    out: list[tuple[InboundSa, bytes]] = []
    by_spi = table.by_spi
    for esp in payloads:
        sa = by_spi.get(int.from_bytes(esp[0:4], "big")) if len(esp) >= 8 else None
        if sa is None or sa.protocol != IpProto.ESP:
            table.counters.drop(DropReason.UNKNOWN_SPI if len(esp) >= 8 else DropReason.MALFORMED)
            continue
        inner = decrypt_esp(sa, esp, now)
        if inner is not None:
            out.append((sa, inner))
    return out
