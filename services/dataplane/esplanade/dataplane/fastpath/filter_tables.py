"""An identity's packet filter as the batch loops apply it.

The policy core's `PacketFilter` holds, per (IP version, protocol), sorted segment starts over
the destination address line and per segment a gap, "any port" or sorted port ranges
(`esplanade.policy.filters.SelectorTable`). `compile_tables` flattens that into arrays for the
compiled loop: per table the starts as two u64 arrays (high and low 64 bits of the address;
IPv4 in the low word), a kind byte per segment (0 gap, 1 any port, 2 port ranges), the first
index and count of its port ranges, and the port range starts and ends as u32 arrays. The C
lookup is the same two bisections as `SelectorTable.allows`.

`IdentityFilter` is what an identity's inbound SAs point at. Once per batch the core calls
`refresh(wall_now)`: timed parts (rules with time windows) open or close on the wall clock,
and when the allow set changed it is compiled again. Replacing an identity's filter
(`replace`) takes effect at the next batch for every SA that points at it.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from esplanade.policy.filters import ANY_PORT, PacketFilter, SelectorTable

_MASK64 = (1 << 64) - 1

CompiledTable = tuple[int, int, bytes, bytes, bytes, bytes, bytes, bytes, bytes]


def compile_tables(table: SelectorTable) -> list[CompiledTable]:
    out: list[CompiledTable] = []
    for key, (starts, segments) in sorted(table.tables().items()):
        version, protocol = key >> 8, key & 0xFF
        # A start past the address space (the end of a range reaching the top) can never be
        # found by a lookup; the C side has no 129-bit integers, so leave it out.
        limit = 1 << (32 if version == 4 else 128)
        hi, lo = array("Q"), array("Q")
        kinds = bytearray()
        first, count, port_lo, port_hi = array("I"), array("I"), array("I"), array("I")
        for start, segment in zip(starts, segments, strict=True):
            if start >= limit:
                continue
            hi.append(start >> 64)
            lo.append(start & _MASK64)
            first.append(len(port_lo))
            if segment is None:
                kinds.append(0)
                count.append(0)
            elif segment is ANY_PORT:
                kinds.append(1)
                count.append(0)
            else:
                los, his = segment  # type: ignore[misc]
                kinds.append(2)
                count.append(len(los))
                port_lo.extend(los)
                port_hi.extend(his)
        out.append(
            (
                version,
                protocol,
                hi.tobytes(),
                lo.tobytes(),
                bytes(kinds),
                first.tobytes(),
                count.tobytes(),
                port_lo.tobytes(),
                port_hi.tobytes(),
            )
        )
    return out


class FilterCounts:
    """Packets an identity's filter let through or dropped (the pure-Python twin of `_espfast.Filter`)."""

    __slots__ = ("allowed", "denied", "last_denied")

    def __init__(self) -> None:
        self.allowed = 0
        self.denied = 0
        self.last_denied: bytes | None = None

    def take_denied(self) -> bytes | None:
        """The head (64 bytes) of the last packet denied since the previous call, or None."""
        head, self.last_denied = self.last_denied, None
        return head

    def take_outside(self) -> bytes | None:
        """Always None: the pure-Python engine keeps the packets it drops outside an SA's
        selectors on the SA (`InboundSa.last_outside`); `_espfast.Filter` keeps the compiled
        loop's."""
        return None

    def load(self, tables: list[CompiledTable]) -> None:
        """The Python hot path checks the `SelectorTable` itself."""


class IdentityFilter:
    """One identity's filter, shared by all its inbound SAs."""

    def __init__(self, packet_filter: PacketFilter, counts: Any) -> None:
        """`counts`: an `_espfast.Filter` (compiled hot path) or a `FilterCounts`."""
        self.counts = counts
        self._filter = packet_filter
        self.table = packet_filter.table
        self._compile()

    @property
    def packet_filter(self) -> PacketFilter:
        return self._filter

    @property
    def allowed(self) -> int:
        return int(self.counts.allowed)

    @property
    def denied(self) -> int:
        return int(self.counts.denied)

    def _compile(self) -> None:
        self.table = self._filter.table
        self.counts.load(compile_tables(self.table))

    def replace(self, packet_filter: PacketFilter) -> None:
        self._filter = packet_filter
        self._compile()

    def next_refresh(self) -> float:
        timer = self._filter.get_timer()
        return math.inf if timer is None else timer

    def refresh(self, wall_now: float) -> None:
        """Open or close timed parts due at `wall_now` (POSIX time); recompile if the allow set changed."""
        if wall_now >= self.next_refresh():
            self._filter.handle_timer(wall_now)
        if self._filter.table is not self.table:
            self._compile()
