"""The packet-path matcher: may this decapsulated packet go on? (stdlib + esplanade.ipsec only)

The dataplane applies one `PacketFilter` to every packet that comes out of an identity's
inbound SAs, so access holds even when the peer negotiated wider selectors than its rules,
and changes as soon as the filter is replaced on a live SA.

Layout, chosen for CPython: per (IP version, protocol) a sorted list of segment starts over
the address line and, per segment, either nothing (a gap), `ANY_PORT`, or two parallel
sorted lists of port-range starts and ends. A lookup is one dict get, one bisect over
addresses and at most one bisect over ports. Any-protocol selectors are folded into every
protocol table of their version, so one table answers; protocols without a table fall back
to the version's any-protocol table.

Ports: transport destination port, or ICMP type<<8|code, or -1 for a non-initial fragment.
A non-initial fragment carries no ports: it passes when its destination and protocol are
allowed for some port. It cannot be reassembled without the initial fragment, which was
checked with its ports, and a later fragment cannot rewrite the ports (they sit in the first
8 octets); initial fragments too short to hold the ports are malformed (RFC 1858).

Time: a filter may hold timed parts (rules with a time window). `allows(..., now)` compares
`now` (POSIX wall clock) with the next minute boundary and, past it, re-evaluates which timed
parts are active; windows have minute granularity and zone offsets are whole minutes, so
nothing can change between two boundaries. The shell may instead drive it with
`get_timer()` / `handle_timer(now)`.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from esplanade.ipsec.selectors import MAX_PORT, TrafficSelector

ANY_PORT = True
NON_INITIAL_FRAGMENT = -1

_Segment = tuple[list[int], list[int]] | bool | None
_Table = tuple[list[int], list[_Segment]]


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _build_table(items: list[tuple[int, int, int, int]]) -> _Table:
    """(lo, hi, port_lo, port_hi) boxes of one protocol -> (segment starts, segments)."""
    bounds = sorted({lo for lo, _, _, _ in items} | {hi + 1 for _, hi, _, _ in items})
    ports: list[list[tuple[int, int]]] = [[] for _ in bounds]
    for lo, hi, plo, phi in items:
        for k in range(bisect_left(bounds, lo), bisect_left(bounds, hi + 1)):
            ports[k].append((plo, phi))
    starts: list[int] = []
    segments: list[_Segment] = []
    for start, seg_ports in zip(bounds, ports, strict=True):
        merged = _merge(seg_ports)
        segment: _Segment
        if not merged:
            segment = None
        elif merged == [(0, MAX_PORT)]:
            segment = ANY_PORT
        else:
            segment = ([lo for lo, _ in merged], [hi for _, hi in merged])
        if segments and segments[-1] == segment:
            continue  # same as the segment before: extend it
        starts.append(start)
        segments.append(segment)
    return starts, segments


class SelectorTable:
    """An exact, static allow set built from traffic selectors."""

    __slots__ = ("_tables", "size")

    def __init__(self, selectors: Iterable[TrafficSelector]) -> None:
        boxes: dict[int, list[tuple[int, int, int, int]]] = {}
        for ts in selectors:
            if ts.opaque_ports:
                continue  # OPAQUE matches only packets whose ports are unavailable: never produced here
            key = (ts.version << 8) | ts.protocol
            boxes.setdefault(key, []).append((int(ts.start_addr), int(ts.end_addr), ts.start_port, ts.end_port))
        for key in list(boxes):
            any_key = key & ~0xFF
            if key != any_key and any_key in boxes:
                boxes[key] = boxes[key] + boxes[any_key]
        self._tables: dict[int, _Table] = {key: _build_table(items) for key, items in boxes.items()}
        self.size = sum(len(t[0]) for t in self._tables.values())

    def tables(self) -> dict[int, _Table]:
        """The built tables, keyed ``version << 8 | protocol`` (protocol 0: any), for compiled
        matchers (the dataplane's C loop). Read only."""
        return self._tables

    def allows(self, version: int, dst: int, proto: int, port: int) -> bool:
        tables = self._tables
        table = tables.get((version << 8) | proto) or tables.get(version << 8)
        if table is None:
            return False
        starts, segments = table
        segment = segments[bisect_right(starts, dst) - 1]  # index -1 is the trailing gap
        if segment is None:
            return False
        if segment is ANY_PORT or port < 0:
            return True
        los, his = segment  # type: ignore[misc]
        j = bisect_right(los, port) - 1
        return j >= 0 and port <= his[j]


class TimedPart(NamedTuple):
    selectors: Sequence[TrafficSelector]
    active: Callable[[float], bool]  # is the part's time window open at wall-clock `now`?


class PacketFilter:
    """The allow set of one identity's SAs: a static part and parts that follow the clock."""

    __slots__ = ("_active_key", "_refresh_at", "_static", "_table", "_timed")

    def __init__(
        self, static: Iterable[TrafficSelector], timed: Sequence[TimedPart] = (), now: float | None = None
    ) -> None:
        """`now` (wall clock), if given, opens the timed parts due now at once, not at the first packet."""
        self._static = list(static)
        self._timed = list(timed)
        self._active_key: tuple[bool, ...] | None = None
        self._table = SelectorTable(self._static)
        self._refresh_at = -math.inf if self._timed else math.inf
        if now is not None:
            self.handle_timer(now)

    @property
    def table(self) -> SelectorTable:
        """The allow set in force now: a new object whenever the timed parts change it."""
        return self._table

    def allows(self, version: int, dst: int, proto: int, port: int, now: float) -> bool:
        if now >= self._refresh_at:
            self.handle_timer(now)
        # SelectorTable.allows, inlined: this runs once per packet.
        tables = self._table._tables
        table = tables.get((version << 8) | proto) or tables.get(version << 8)
        if table is None:
            return False
        starts, segments = table
        segment = segments[bisect_right(starts, dst) - 1]
        if segment is None:
            return False
        if segment is ANY_PORT or port < 0:
            return True
        los, his = segment  # type: ignore[misc]
        j = bisect_right(los, port) - 1
        return j >= 0 and port <= his[j]

    def allows_packet(self, packet: bytes | bytearray | memoryview, now: float) -> bool:
        """Parse an inner IPv4/IPv6 packet and check it; a malformed packet is not allowed."""
        header = parse_inner_packet(packet)
        return header is not None and self.allows(header.version, header.dst, header.proto, header.dst_port, now)

    def get_timer(self) -> float | None:
        return None if not self._timed else self._refresh_at

    def handle_timer(self, now: float) -> None:
        if not self._timed:
            return
        key = tuple(part.active(now) for part in self._timed)
        if key != self._active_key:
            selectors = list(self._static)
            for part, on in zip(self._timed, key, strict=True):
                if on:
                    selectors.extend(part.selectors)
            self._table = SelectorTable(selectors)
            self._active_key = key
        self._refresh_at = (math.floor(now / 60) + 1) * 60.0


DENY_ALL = PacketFilter(())


class PacketHeader(NamedTuple):
    version: int
    src: int
    dst: int
    proto: int
    src_port: int  # -1: a non-initial fragment
    dst_port: int  # transport port, ICMP type<<8|code, or -1 (non-initial fragment)


_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options
_MAX_EXTENSIONS = 8


def _ports(packet: bytes | bytearray | memoryview, offset: int, proto: int) -> tuple[int, int] | None:
    if proto in (6, 17, 132, 136):  # TCP, UDP, SCTP, UDP-Lite: ports in the first 4 octets
        if len(packet) < offset + 4:
            return None
        return (packet[offset] << 8) | packet[offset + 1], (packet[offset + 2] << 8) | packet[offset + 3]
    if proto in (1, 58):
        if len(packet) < offset + 2:
            return None
        return 0, (packet[offset] << 8) | packet[offset + 1]
    return 0, 0


def parse_inner_packet(packet: bytes | bytearray | memoryview) -> PacketHeader | None:
    """The header fields the filter needs, or None for a malformed packet (drop and count it)."""
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < ihl:
            return None
        proto = packet[9]
        src = int.from_bytes(packet[12:16], "big")
        dst = int.from_bytes(packet[16:20], "big")
        offset = ((packet[6] & 0x1F) << 8) | packet[7]
        if offset:
            if offset == 1 and proto == 6:
                return None  # RFC 1858 §3.2: a fragment at offset 8 may overwrite TCP flags
            return PacketHeader(4, src, dst, proto, NON_INITIAL_FRAGMENT, NON_INITIAL_FRAGMENT)
        ports = _ports(packet, ihl, proto)
        if ports is None:
            return None
        return PacketHeader(4, src, dst, proto, ports[0], ports[1])
    if version == 6:
        if len(packet) < 40:
            return None
        src = int.from_bytes(packet[8:24], "big")
        dst = int.from_bytes(packet[24:40], "big")
        proto, at = packet[6], 40
        for _ in range(_MAX_EXTENSIONS + 1):
            if proto in _IPV6_EXTENSIONS:
                if len(packet) < at + 2:
                    return None
                proto, at = packet[at], at + (packet[at + 1] + 1) * 8
            elif proto == 44:  # fragment header
                if len(packet) < at + 8:
                    return None
                frag_offset = ((packet[at + 2] << 8) | packet[at + 3]) >> 3
                proto, at = packet[at], at + 8
                if frag_offset:
                    return PacketHeader(6, src, dst, proto, NON_INITIAL_FRAGMENT, NON_INITIAL_FRAGMENT)
            else:
                break
        else:
            return None  # too many extension headers
        ports = _ports(packet, at, proto)
        if ports is None:
            return None
        return PacketHeader(6, src, dst, proto, ports[0], ports[1])
    return None
