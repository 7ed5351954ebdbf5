"""The access check: may this identity send this packet, now, from there, with that posture?

`AccessIndex` is one compiled allow set (built by `compiler` for every set of groups that
some identity has): per IP version, the address line cut into elementary segments, each
holding the grants that cover it, in decision order. A check is one bisect and a scan of
the few grants on that segment, whatever the number of rules.

The decision is deterministic: among the grants that allow the packet, the one of the
smallest rule id wins (and within a rule, its first matching resource). A denial names
the first rule whose resource matched but whose conditions failed, if any.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from esplanade.policy.conditions import ConnectFacts, condition_failure
from esplanade.policy.model import ICMP_V4, ICMP_V6, Conditions, IPAddress
from esplanade.policy.spans import Span, elementary_segments

DEFAULT_DENY = "default-deny"


class Action(Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class FiveTuple:
    """A flow as seen inside the tunnel (the decapsulated packet).

    For ICMP and ICMPv6, `src_port` is 0 and `dst_port` is type<<8|code, the encoding of
    traffic selectors (RFC 7296 §3.13.1); use `FiveTuple.icmp`. For protocols without ports
    both ports are 0.
    """

    src: IPAddress
    dst: IPAddress
    protocol: int
    src_port: int = 0
    dst_port: int = 0

    @classmethod
    def icmp(cls, src: IPAddress, dst: IPAddress, icmp_type: int, code: int = 0) -> FiveTuple:
        proto = ICMP_V4 if dst.version == 4 else ICMP_V6
        return cls(src, dst, proto, 0, (icmp_type << 8) | code)

    @classmethod
    def parse(cls, src: str, dst: str, protocol: int, src_port: int = 0, dst_port: int = 0) -> FiveTuple:
        return cls(ipaddress.ip_address(src), ipaddress.ip_address(dst), protocol, src_port, dst_port)

    def __str__(self) -> str:
        names = {6: "tcp", 17: "udp", ICMP_V4: "icmp", ICMP_V6: "icmpv6"}
        proto = names.get(self.protocol, str(self.protocol))
        if self.protocol in (ICMP_V4, ICMP_V6):
            return f"{proto} {self.src} -> {self.dst} type {self.dst_port >> 8} code {self.dst_port & 0xFF}"
        if self.protocol in (6, 17):
            return f"{proto} {self.src}:{self.src_port} -> {self.dst}:{self.dst_port}"
        return f"{proto} {self.src} -> {self.dst}"


@dataclass(frozen=True, slots=True)
class CheckContext:
    """`now` is POSIX wall-clock seconds (time windows are wall-clock); `source` is the
    client's outer (underlay) address; `posture` the tags it reported at connect time."""

    now: float
    source: IPAddress | None = None
    posture: frozenset[str] = frozenset()

    @property
    def facts(self) -> ConnectFacts:
        return ConnectFacts(self.source, self.posture)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str  # the allowing rule's id, or "default-deny"
    reason: str
    resource: str = ""  # the resource the rule granted (allow) or that matched (conditional deny)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


def deny_unknown_identity(identity: str) -> Decision:
    return Decision(Action.DENY, DEFAULT_DENY, f"unknown identity '{identity}'")


NO_RULE = Decision(Action.DENY, DEFAULT_DENY, "no rule grants this flow")


class Grant(NamedTuple):
    """One rule's resource span, as the evaluator scans it."""

    rule: str
    resource: str
    proto: int
    plo: int
    phi: int
    conditions: Conditions | None  # None: unconditional


@dataclass(slots=True)
class AccessIndex:
    """The compiled allow set of one set of groups."""

    tables: dict[int, tuple[list[int], list[tuple[Grant, ...]]]] = field(default_factory=dict)

    @classmethod
    def build(cls, grants: Iterable[tuple[Span, Grant]]) -> AccessIndex:
        """`grants` in decision order (rule id, then resource position in the rule)."""
        by_version: dict[int, list[tuple[int, int, Grant]]] = {}
        for span, grant in grants:
            by_version.setdefault(span.version, []).append((span.lo, span.hi, grant))
        tables = {}
        for version, items in by_version.items():
            starts, payloads = elementary_segments(items)
            tables[version] = (starts, [tuple(p) for p in payloads])
        return cls(tables)

    def check(self, flow: FiveTuple, context: CheckContext) -> Decision:
        table = self.tables.get(flow.dst.version)
        if table is None:
            return NO_RULE
        starts, segments = table
        i = bisect_right(starts, int(flow.dst)) - 1
        if i < 0:
            return NO_RULE
        proto, port = flow.protocol, flow.dst_port
        failed: tuple[Grant, str] | None = None
        for grant in segments[i]:
            if (grant.proto and grant.proto != proto) or not grant.plo <= port <= grant.phi:
                continue
            if grant.conditions is None:
                return _allow(grant)
            failure = condition_failure(grant.conditions, context.facts, context.now)
            if failure is None:
                return _allow(grant)
            if failed is None:
                failed = (grant, failure)
        if failed is not None:
            grant, failure = failed
            return Decision(
                Action.DENY,
                DEFAULT_DENY,
                f"rule '{grant.rule}' grants resource '{grant.resource}' but {failure}",
                grant.resource,
            )
        return NO_RULE


def _allow(grant: Grant) -> Decision:
    return Decision(Action.ALLOW, grant.rule, f"rule '{grant.rule}' grants resource '{grant.resource}'", grant.resource)
