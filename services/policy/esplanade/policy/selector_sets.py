"""Allow sets as traffic selectors and routes: merged, and coarsened to fit a payload.

`selectors_from_spans` gives the exact allow set as few selectors as the sweep finds: per
protocol, addresses cut into elementary segments, neighbouring segments with the same ports
joined, and whatever an any-protocol selector already covers left out. It is exact, not
globally minimal (covering a union of boxes with fewest boxes is NP-hard).

`coarsen` widens a list to at most `limit` selectors (a TS payload counts them in one
octet, RFC 7296 §3.13), dropping ports, then protocols, then filling the smallest address
gaps. Coarse selectors stay safe because the dataplane filter enforces the exact set on
every decapsulated packet; they only let more packets reach that filter.

`routes` is the address part alone as CIDR blocks, for INTERNAL_IP4_SUBNET /
INTERNAL_IP6_SUBNET (RFC 7296 §3.15.1): a split-tunnel route list cannot carry ports.

`network_selectors` is the coarse narrowing of a connection with ``access_narrowing:
networks``: address-only selectors for the site networks that hold the granted addresses.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable

from esplanade.ipsec.selectors import ANY_PROTOCOL, MAX_PORT, TrafficSelector
from esplanade.policy.model import IPNetwork
from esplanade.policy.spans import Span, elementary_segments, make_address, merge_ranges

IKE_MAX_SELECTORS = 255  # "Number of TSs" is one octet


def span_of(ts: TrafficSelector) -> Span:
    return Span(ts.version, int(ts.start_addr), int(ts.end_addr), ts.protocol, ts.start_port, ts.end_port)


def selector_of(span: Span) -> TrafficSelector:
    return TrafficSelector(
        make_address(span.version, span.lo), make_address(span.version, span.hi), span.proto, span.plo, span.phi
    )


def selectors_from_spans(spans: Iterable[Span]) -> list[TrafficSelector]:
    return [selector_of(s) for s in merged_spans(spans)]


_PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}  # as TrafficSelector prints them


def selector_text(span: Span) -> str:
    """``str(selector_of(span))``, without building the selector (the compiler writes thousands)."""
    lo, hi = span.lo, span.hi
    size = hi - lo + 1
    if version_is_4 := span.version == 4:
        start = f"{lo >> 24}.{(lo >> 16) & 255}.{(lo >> 8) & 255}.{lo & 255}"
    else:
        start = str(ipaddress.IPv6Address(lo))
    if size & (size - 1) == 0 and lo & (size - 1) == 0:
        addr = f"{start}/{(32 if version_is_4 else 128) - size.bit_length() + 1}"
    elif version_is_4:
        addr = f"{start}-{hi >> 24}.{(hi >> 16) & 255}.{(hi >> 8) & 255}.{hi & 255}"
    else:
        addr = f"{start}-{ipaddress.IPv6Address(hi)}"
    any_port = span.plo == 0 and span.phi == MAX_PORT
    if span.proto == ANY_PROTOCOL and any_port:
        return addr
    proto = _PROTOCOL_NAMES.get(span.proto, str(span.proto)) if span.proto else ""
    if any_port:
        port = ""
    elif span.plo == span.phi:
        port = str(span.plo)
    else:
        port = f"{span.plo}-{span.phi}"
    return f"{addr}[{proto}/{port}]"


def merged_spans(spans: Iterable[Span]) -> list[Span]:
    """The exact union of `spans` as few, sorted spans (see the module doc)."""
    by_key: dict[tuple[int, int], list[tuple[int, int, tuple[int, int]]]] = {}
    for s in spans:
        by_key.setdefault((s.version, s.proto), []).append((s.lo, s.hi, (s.plo, s.phi)))
    any_proto: dict[int, tuple[list[int], list[int]]] = {}
    for version in {v for v, _ in by_key}:
        items = by_key.get((version, ANY_PROTOCOL), [])
        whole = merge_ranges((lo, hi) for lo, hi, ports in items if ports == (0, MAX_PORT))
        any_proto[version] = ([lo for lo, _ in whole], [hi for _, hi in whole])
    out: list[Span] = []
    for (version, proto), items in sorted(by_key.items()):
        los, his = any_proto[version]
        for lo, hi, ports in compact_segments(items):
            if proto != ANY_PROTOCOL:
                k = bisect_right(los, lo) - 1
                if k >= 0 and hi <= his[k]:
                    continue  # an any-protocol selector already covers it
            out.extend(Span(version, lo, hi, proto, plo, phi) for plo, phi in ports)
    out.sort()
    return out


def compact_segments(
    items: Iterable[tuple[int, int, tuple[int, int]]],
) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """(lo, hi, port range) items of one protocol -> disjoint (lo, hi, merged port ranges)."""
    starts, payloads = elementary_segments(items)
    out: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
    for i, payload in enumerate(payloads[:-1]):
        if not payload:
            continue
        ports = tuple(merge_ranges(payload))
        lo, hi = starts[i], starts[i + 1] - 1
        if out and out[-1][1] + 1 == lo and out[-1][2] == ports:
            out[-1] = (out[-1][0], hi, ports)
        else:
            out.append((lo, hi, ports))
    return out


def coarsen(selectors: list[TrafficSelector], limit: int = IKE_MAX_SELECTORS) -> list[TrafficSelector]:
    """At most `limit` (>= 2) selectors covering at least every packet `selectors` cover."""
    limit = max(limit, 2)
    if len(selectors) <= limit:
        return selectors
    spans = [s._replace(plo=0, phi=MAX_PORT) for s in map(span_of, selectors)]
    out = selectors_from_spans(spans)
    if len(out) <= limit:
        return out
    spans = [s._replace(proto=ANY_PROTOCOL) for s in spans]
    ranges: dict[int, list[tuple[int, int]]] = {}
    for s in spans:
        ranges.setdefault(s.version, []).append((s.lo, s.hi))
    merged = {version: merge_ranges(r) for version, r in ranges.items()}
    merged = _fill_smallest_gaps(merged, limit)
    return [
        selector_of(Span(version, lo, hi, ANY_PROTOCOL, 0, MAX_PORT))
        for version in sorted(merged)
        for lo, hi in merged[version]
    ]


def _fill_smallest_gaps(merged: dict[int, list[tuple[int, int]]], limit: int) -> dict[int, list[tuple[int, int]]]:
    excess = sum(len(r) for r in merged.values()) - limit
    if excess <= 0:
        return merged
    gaps = sorted((r[i + 1][0] - r[i][1], version, i) for version, r in merged.items() for i in range(len(r) - 1))
    closed = {(version, i) for _, version, i in gaps[:excess]}
    out: dict[int, list[tuple[int, int]]] = {}
    for version, r in merged.items():
        joined: list[tuple[int, int]] = []
        for i, (lo, hi) in enumerate(r):
            if joined and (version, i - 1) in closed:
                joined[-1] = (joined[-1][0], hi)
            else:
                joined.append((lo, hi))
        out[version] = joined
    return out


def routes(selectors: Iterable[TrafficSelector], limit: int = 0) -> list[IPNetwork]:
    """The CIDR blocks covering every selector's addresses; at most `limit` (0: no limit).

    Over the limit, each address range becomes its smallest covering block, and then the
    ranges with the smallest gaps between them are joined, one at a time, until it fits.
    """
    ranges: dict[int, list[tuple[int, int]]] = {}
    for ts in selectors:
        ranges.setdefault(ts.version, []).append((int(ts.start_addr), int(ts.end_addr)))
    merged = {version: merge_ranges(r) for version, r in ranges.items()}
    nets = _cidrs(merged)
    if not limit or len(nets) <= limit:
        return nets
    while True:
        blocks = {version: merge_ranges(_block(version, lo, hi) for lo, hi in r) for version, r in merged.items()}
        count = sum(len(r) for r in blocks.values())
        if count <= max(limit, len(blocks)):
            return _cidrs(blocks)
        merged = _fill_smallest_gaps(blocks, count - 1)


def _block(version: int, lo: int, hi: int) -> tuple[int, int]:
    """The smallest CIDR block holding [lo, hi], as a range."""
    host_bits = (lo ^ hi).bit_length()
    mask = (1 << host_bits) - 1
    return lo & ~mask, (lo & ~mask) | mask


def _cidrs(merged: dict[int, list[tuple[int, int]]]) -> list[IPNetwork]:
    nets: list[IPNetwork] = []
    for version in sorted(merged):
        for lo, hi in merged[version]:
            nets.extend(ipaddress.summarize_address_range(make_address(version, lo), make_address(version, hi)))
    return nets


def network_selectors(
    selectors: Iterable[TrafficSelector], networks: Iterable[IPNetwork], limit: int = IKE_MAX_SELECTORS
) -> list[TrafficSelector]:
    """Address-only selectors covering every address of `selectors`, each widened to the smallest
    of `networks` (the sites' networks) that holds all its addresses, or left as it is when none
    does; merged, and coarsened to `limit`. Protocols and ports are left to the packet filter."""
    by_version: dict[int, list[tuple[int, int]]] = {}
    for net in networks:
        by_version.setdefault(net.version, []).append((int(net.network_address), int(net.broadcast_address)))
    for blocks in by_version.values():
        blocks.sort(key=lambda b: b[1] - b[0])  # smallest first
    ranges: dict[int, list[tuple[int, int]]] = {}
    for ts in selectors:
        lo, hi = int(ts.start_addr), int(ts.end_addr)
        for nlo, nhi in by_version.get(ts.version, ()):
            if nlo <= lo and hi <= nhi:
                lo, hi = nlo, nhi
                break
        ranges.setdefault(ts.version, []).append((lo, hi))
    out = [
        selector_of(Span(version, lo, hi, ANY_PROTOCOL, 0, MAX_PORT))
        for version in sorted(ranges)
        for lo, hi in merge_ranges(ranges[version])
    ]
    return coarsen(out, limit)
