"""Traffic selectors compiled to plain integers for the per-packet path.

A selector becomes ``(version, addr_lo, addr_hi, protocol, port_lo, port_hi)`` with
port_lo = -1 for "any port", so a match is a handful of integer comparisons.
"""

from __future__ import annotations

from collections.abc import Iterable

from esplanade.dataplane.esp.packet import FlowKey
from esplanade.ipsec.selectors import TrafficSelector

CompiledSelector = tuple[int, int, int, int, int, int]
ANY_PORT = -1


def compile_selector(ts: TrafficSelector) -> CompiledSelector:
    if ts.any_port:
        lo, hi = ANY_PORT, ANY_PORT
    elif ts.opaque_ports:
        lo, hi = -2, -2  # OPAQUE: matches only packets whose ports are unavailable
    else:
        lo, hi = ts.start_port, ts.end_port
    return (ts.version, int(ts.start_addr), int(ts.end_addr), ts.protocol, lo, hi)


def is_any(ts: TrafficSelector) -> bool:
    full = (1 << 32) - 1 if ts.version == 4 else (1 << 128) - 1
    return int(ts.start_addr) == 0 and int(ts.end_addr) == full and ts.protocol == 0 and ts.any_port


def selector_matches(sel: CompiledSelector, version: int, addr: int, protocol: int, port: int) -> bool:
    if sel[0] != version or not sel[1] <= addr <= sel[2]:
        return False
    if sel[3] and sel[3] != protocol:
        return False
    lo = sel[4]
    if lo == ANY_PORT:
        return True
    if lo == -2:
        return port < 0
    return lo <= port <= sel[5]


Ranges = tuple[tuple[int, int], ...]


class SelectorPair:
    """The local and remote selector lists of an SA (the SA covers their cross product).

    When no selector names a protocol or ports (site-to-site, the common case), the check
    after decapsulation reads the two addresses straight from the IP header
    (`inbound_allows_addresses`), about a tenth of the cost of a full `parse_flow`.
    """

    __slots__ = ("address_only", "local", "local_ranges", "match_all", "remote", "remote_ranges")

    def __init__(self, local: Iterable[TrafficSelector], remote: Iterable[TrafficSelector]) -> None:
        local_ts, remote_ts = list(local), list(remote)
        self.local = tuple(compile_selector(t) for t in local_ts)
        self.remote = tuple(compile_selector(t) for t in remote_ts)
        # No selectors, or "everything" on both sides of each IP version in use: nothing to check.
        self.match_all = (not local_ts and not remote_ts) or (
            all(is_any(t) for t in local_ts)
            and all(is_any(t) for t in remote_ts)
            and {t.version for t in local_ts} == {t.version for t in remote_ts} == {4, 6}
        )
        self.address_only = all(t.protocol == 0 and t.any_port for t in (*local_ts, *remote_ts))
        self.local_ranges: dict[int, Ranges] = {
            v: tuple((int(t.start_addr), int(t.end_addr)) for t in local_ts if t.version == v) for v in (4, 6)
        }
        self.remote_ranges: dict[int, Ranges] = {
            v: tuple((int(t.start_addr), int(t.end_addr)) for t in remote_ts if t.version == v) for v in (4, 6)
        }

    def inbound_allows_addresses(self, packet: bytes | bytearray | memoryview) -> bool:
        """`inbound_allows` for address-only selectors, on a decapsulated IP packet whose header
        length the caller has checked (>= 20 bytes for IPv4, >= 40 for IPv6)."""
        if packet[0] >> 4 == 4:
            src, dst, version = int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big"), 4
        else:
            src, dst, version = int.from_bytes(packet[8:24], "big"), int.from_bytes(packet[24:40], "big"), 6
        for lo, hi in self.remote_ranges[version]:
            if lo <= src <= hi:
                break
        else:
            return False
        for lo, hi in self.local_ranges[version]:  # noqa: SIM110 -- a plain loop beats any() here
            if lo <= dst <= hi:
                return True
        return False

    def inbound_allows(self, flow: FlowKey) -> bool:
        """A decapsulated packet: source in a remote selector, destination in a local one."""
        if self.match_all:
            return True
        version, protocol = flow.version, flow.protocol
        return any(selector_matches(s, version, flow.src, protocol, flow.src_port) for s in self.remote) and any(
            selector_matches(s, version, flow.dst, protocol, flow.dst_port) for s in self.local
        )

    def outbound_allows(self, flow: FlowKey) -> bool:
        if self.match_all:
            return True
        version, protocol = flow.version, flow.protocol
        return any(selector_matches(s, version, flow.src, protocol, flow.src_port) for s in self.local) and any(
            selector_matches(s, version, flow.dst, protocol, flow.dst_port) for s in self.remote
        )
