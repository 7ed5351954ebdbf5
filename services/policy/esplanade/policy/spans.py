"""Resources as spans of packet space, and the elementary-interval sweep every index uses.

A `Span` is a box: one IP version, an address interval, one IP protocol (0: any) and a port
interval (ICMP: type<<8|code). A resource is one or more spans; a DNS-name resource has a
host span per resolved address and none while unresolved (fail closed).
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import NamedTuple, TypeVar

from esplanade.policy.model import IPAddress, Resource, ip_protocol

T = TypeVar("T")


class Span(NamedTuple):
    version: int
    lo: int
    hi: int
    proto: int
    plo: int
    phi: int


def resource_spans(resource: Resource, resolved: Sequence[IPAddress] = ()) -> tuple[Span, ...]:
    """The packet space a resource covers; `resolved` holds a DNS-name resource's addresses."""
    net = resource.destination.network
    if net is not None:
        ranges = [(net.version, int(net.network_address), int(net.broadcast_address))]
    else:
        ranges = [(a.version, int(a), int(a)) for a in sorted(set(resolved), key=lambda a: (a.version, int(a)))]
    out: list[Span] = []
    for version, lo, hi in ranges:
        proto = ip_protocol(resource.protocol, version)
        out.extend(Span(version, lo, hi, proto, p.start, p.end) for p in resource.port_ranges())
    return tuple(out)


def elementary_segments(items: Iterable[tuple[int, int, T]]) -> tuple[list[int], list[list[T]]]:
    """Cut [lo, hi] intervals into disjoint elementary segments.

    Returns `starts` (sorted) and `payloads`: segment i covers [starts[i], starts[i+1] - 1]
    (the last one up to infinity) and holds, in input order, the payload of every item that
    covers it. Gaps hold an empty list. Look up a point with ``bisect_right(starts, x) - 1``.
    """
    materialized = list(items)
    bounds = sorted({lo for lo, _, _ in materialized} | {hi + 1 for _, hi, _ in materialized})
    payloads: list[list[T]] = [[] for _ in bounds]
    for lo, hi, payload in materialized:
        for k in range(bisect_left(bounds, lo), bisect_left(bounds, hi + 1)):
            payloads[k].append(payload)
    return bounds, payloads


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of closed integer intervals, as sorted disjoint non-adjacent intervals."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def make_address(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
