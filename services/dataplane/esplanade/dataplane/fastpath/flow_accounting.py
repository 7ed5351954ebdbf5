"""Flow accounting: packets and bytes per (SPI, direction, 5-tuple), drained by the shell.

The compiled loop keeps a fixed open-addressing table (`_espfast.FlowTable`); this module
holds the record type and the pure-Python table with identical semantics: the fields come
from `esplanade.policy.filters.parse_inner_packet` (ports: transport ports, ICMP
``(0, type << 8 | code)``, ``-1`` for non-initial fragments; a packet it cannot parse is
counted under version 0), bytes are inner packet lengths, and once `limit` flows are held a
new flow's packets go to the overflow counters until the next drain.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from esplanade.policy.filters import PacketHeader, parse_inner_packet

INBOUND = 0
OUTBOUND = 1
DEFAULT_FLOW_CAPACITY = 4096


class FlowRecord(NamedTuple):
    spi: int
    direction: int  # INBOUND (decrypted) or OUTBOUND (encrypted)
    version: int  # 4, 6, or 0 for packets that did not parse
    src: bytes
    dst: bytes
    protocol: int
    src_port: int
    dst_port: int
    packets: int
    bytes: int


class FlowTable(Protocol):
    overflow_packets: int
    overflow_bytes: int

    @property
    def count(self) -> int: ...

    @property
    def limit(self) -> int: ...

    def drain(self) -> list[tuple[int, int, int, bytes, bytes, int, int, int, int, int]]: ...


def table_size(capacity: int) -> tuple[int, int]:
    """(slots, limit) for a requested capacity: slots a power of two >= 16, 3/4 of them usable."""
    if not 1 <= capacity <= 1 << 24:
        raise ValueError("flow table capacity must be 1 .. 2^24")
    slots = 16
    while slots < capacity:
        slots <<= 1
    return slots, slots // 4 * 3


_FlowKey = tuple[int, int, int, bytes, bytes, int, int, int]


def flow_key(spi: int, direction: int, header: PacketHeader | None) -> _FlowKey:
    if header is None:
        return (spi, direction, 0, b"", b"", 0, 0, 0)
    size = 4 if header.version == 4 else 16
    return (
        spi,
        direction,
        header.version,
        header.src.to_bytes(size, "big"),
        header.dst.to_bytes(size, "big"),
        header.proto,
        header.src_port,
        header.dst_port,
    )


class PythonFlowTable:
    """The reference flow table (and the one the pure-Python hot path uses)."""

    def __init__(self, capacity: int = DEFAULT_FLOW_CAPACITY) -> None:
        _, self._limit = table_size(capacity)
        self._flows: dict[_FlowKey, list[int]] = {}
        self.overflow_packets = 0
        self.overflow_bytes = 0

    @property
    def count(self) -> int:
        return len(self._flows)

    @property
    def limit(self) -> int:
        return self._limit

    def add(self, spi: int, direction: int, header: PacketHeader | None, length: int) -> None:
        key = flow_key(spi, direction, header)
        entry = self._flows.get(key)
        if entry is not None:
            entry[0] += 1
            entry[1] += length
        elif len(self._flows) >= self._limit:
            self.overflow_packets += 1
            self.overflow_bytes += length
        else:
            self._flows[key] = [1, length]

    def add_packet(self, spi: int, direction: int, packet: bytes | bytearray | memoryview) -> None:
        self.add(spi, direction, parse_inner_packet(packet), len(packet))

    def drain(self) -> list[tuple[int, int, int, bytes, bytes, int, int, int, int, int]]:
        out = [(*key, packets, size) for key, (packets, size) in self._flows.items()]
        self._flows = {}
        return out


def records(raw: list[tuple[int, int, int, bytes, bytes, int, int, int, int, int]]) -> list[FlowRecord]:
    """Drained tuples as sorted `FlowRecord`s."""
    return sorted(FlowRecord(*r) for r in raw)
