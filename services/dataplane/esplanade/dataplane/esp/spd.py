"""The userspace SPD (RFC 4301 §4.4.1): ordered policies, outbound lookup by selectors,
inbound SAs by SPI, and the inbound cleartext check of RFC 4301 §5.2.

Order: lower `priority` first (as in XFRM); among equal priorities the more specific entry
(narrower remote range, then local range, a named protocol, narrower ports), then the order
of installation. The first matching entry decides.

Lookup cost: entries are indexed per (direction, IP version) by elementary intervals of the
remote address (the destination of outbound packets, the source of inbound ones): a bisect
finds the entries whose remote range covers the address, in order, and only those are
checked. With a few hundred policies a lookup checks a handful of entries.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from esplanade.dataplane.esp.counters import DropReason, TrafficCounters
from esplanade.dataplane.esp.packet import FlowKey, parse_flow
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa
from esplanade.dataplane.esp.selector_match import ANY_PORT, compile_selector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import IpProto


class SpdDecision(NamedTuple):
    action: PolicyAction
    policy: SpdPolicy | None  # None: no entry matched (the SPD's default action applies)
    sa: OutboundSa | None  # PROTECT with an installed SA; None means "acquire one" if policy.trap


@dataclass(slots=True)
class SpdCounters:
    protect: int = 0
    bypass: int = 0
    discard: int = 0
    no_sa: int = 0  # PROTECT, but no SA installed for the policy's Child SA
    malformed: int = 0
    cleartext_from_protected: int = 0  # RFC 4301 §5.2: cleartext where policy demands IPsec


# (policy, version, local_lo, local_hi, remote_lo, remote_hi, protocol, lport_lo, lport_hi, rport_lo, rport_hi)
_Entry = tuple[SpdPolicy, int, int, int, int, int, int, int, int, int, int]


def _span(lo: int, hi: int) -> int:
    return hi - lo if lo >= 0 else 1 << 17


def _specificity(policy: SpdPolicy) -> tuple[int, int, int, int, int]:
    local, remote = policy.local_ts, policy.remote_ts
    lp = compile_selector(local)
    rp = compile_selector(remote)
    return (
        int(remote.end_addr) - int(remote.start_addr),
        int(local.end_addr) - int(local.start_addr),
        0 if (local.protocol or remote.protocol) else 1,
        _span(rp[4], rp[5]),
        _span(lp[4], lp[5]),
    )


def _port_ok(lo: int, hi: int, port: int) -> bool:
    if lo == ANY_PORT:
        return True
    if lo == -2:
        return port < 0
    return lo <= port <= hi


class _Index:
    """Entries of one (direction group, IP version), by elementary intervals of the remote address."""

    __slots__ = ("boundaries", "buckets")

    def __init__(self, entries: list[_Entry]) -> None:
        points = {0}
        for e in entries:
            points.add(e[4])
            points.add(e[5] + 1)
        self.boundaries = sorted(points)
        self.buckets: list[tuple[_Entry, ...]] = [
            tuple(e for e in entries if e[4] <= start <= e[5]) for start in self.boundaries
        ]

    def lookup(self, local: int, remote: int, protocol: int, local_port: int, remote_port: int) -> SpdPolicy | None:
        bucket = self.buckets[bisect.bisect_right(self.boundaries, remote) - 1]
        for e in bucket:
            if not e[2] <= local <= e[3]:
                continue
            if e[6] and e[6] != protocol:
                continue
            if _port_ok(e[7], e[8], local_port) and _port_ok(e[9], e[10], remote_port):
                return e[0]
        return None


class InboundSaTable:
    """Inbound ESP/AH SAs by SPI (RFC 4301 §4.1: unicast SAs are found by SPI alone)."""

    __slots__ = ("by_spi", "counters")

    def __init__(self) -> None:
        self.by_spi: dict[int, InboundSa] = {}
        self.counters = TrafficCounters()  # drops that belong to no SA: unknown SPI, runts

    def add(self, sa: InboundSa) -> None:
        if sa.spi in self.by_spi:
            raise ValueError(f"inbound SPI {sa.spi:#x} is already installed")
        self.by_spi[sa.spi] = sa

    def remove(self, spi: int) -> InboundSa | None:
        return self.by_spi.pop(spi, None)

    def get(self, spi: int) -> InboundSa | None:
        return self.by_spi.get(spi)

    def __len__(self) -> int:
        return len(self.by_spi)

    def __iter__(self) -> Iterator[InboundSa]:
        return iter(self.by_spi.values())

    def lookup_esp(self, esp: bytes) -> InboundSa | None:
        """The ESP SA for an ESP payload, or None (counted: unknown SPI, or malformed)."""
        if len(esp) < 8:
            self.counters.drop(DropReason.MALFORMED)
            return None
        sa = self.by_spi.get(int.from_bytes(esp[0:4], "big"))
        if sa is None or sa.protocol != IpProto.ESP:
            self.counters.drop(DropReason.UNKNOWN_SPI)
            return None
        return sa


class Spd:
    """Policies, the outbound SAs they point at (by Child SA id), and the inbound SA table."""

    def __init__(
        self,
        *,
        outbound_default: PolicyAction = PolicyAction.DISCARD,
        inbound_default: PolicyAction = PolicyAction.BYPASS,
    ) -> None:
        """Defaults for packets no entry matches: RFC 4301 §5.1 discards unmatched outbound
        traffic; inbound cleartext that no entry claims is let through (it is not ours)."""
        self.outbound_default = outbound_default
        self.inbound_default = inbound_default
        self._policies: dict[str, SpdPolicy] = {}
        self._order: dict[str, int] = {}
        self._installed = 0
        self._sas: dict[str, OutboundSa] = {}
        self._indexes: dict[tuple[bool, int], _Index] | None = None
        self.inbound = InboundSaTable()
        self.counters = SpdCounters()

    # -- configuration --------------------------------------------------------------------
    def add_policy(self, policy: SpdPolicy) -> None:
        """Install or replace (same id) a policy."""
        if policy.local_ts.version != policy.remote_ts.version:
            raise ValueError(f"policy {policy.id} mixes IPv4 and IPv6 selectors")
        if policy.id not in self._order:
            self._installed += 1
            self._order[policy.id] = self._installed
        self._policies[policy.id] = policy
        self._indexes = None

    def remove_policy(self, policy_id: str) -> SpdPolicy | None:
        self._order.pop(policy_id, None)
        self._indexes = None
        return self._policies.pop(policy_id, None)

    def policies(self) -> list[SpdPolicy]:
        """All policies in lookup order."""
        return sorted(self._policies.values(), key=self._sort_key)

    def bind_outbound(self, child_sa: str, sa: OutboundSa) -> None:
        """PROTECT policies naming `child_sa` now send through `sa` (rekey: bind the new one)."""
        self._sas[child_sa] = sa

    def unbind_outbound(self, child_sa: str) -> OutboundSa | None:
        return self._sas.pop(child_sa, None)

    def _sort_key(self, p: SpdPolicy) -> tuple[int, tuple[int, int, int, int, int], int]:
        return (p.priority, _specificity(p), self._order[p.id])

    def _build(self) -> dict[tuple[bool, int], _Index]:
        groups: dict[tuple[bool, int], list[_Entry]] = {}
        for p in self.policies():
            outbound = p.direction == PolicyDirection.OUT
            loc, rem = compile_selector(p.local_ts), compile_selector(p.remote_ts)
            if loc[3] and rem[3] and loc[3] != rem[3]:
                continue  # local and remote name different protocols: matches nothing
            proto = loc[3] or rem[3]
            entry: _Entry = (p, loc[0], loc[1], loc[2], rem[1], rem[2], proto, loc[4], loc[5], rem[4], rem[5])
            groups.setdefault((outbound, loc[0]), []).append(entry)
        return {key: _Index(entries) for key, entries in groups.items()}

    def _index(self, outbound: bool, version: int) -> _Index | None:
        if self._indexes is None:
            self._indexes = self._build()
        return self._indexes.get((outbound, version))

    # -- lookups --------------------------------------------------------------------------
    def match_outbound(self, flow: FlowKey) -> SpdPolicy | None:
        index = self._index(True, flow.version)
        if index is None:
            return None
        return index.lookup(flow.src, flow.dst, flow.protocol, flow.src_port, flow.dst_port)

    def match_inbound(self, flow: FlowKey) -> SpdPolicy | None:
        """IN (and FWD) policies: the packet's destination is local, its source remote."""
        index = self._index(False, flow.version)
        if index is None:
            return None
        return index.lookup(flow.dst, flow.src, flow.protocol, flow.dst_port, flow.src_port)

    def lookup_outbound(self, packet: bytes) -> SpdDecision:
        """What to do with a packet about to leave: PROTECT (with its SA), BYPASS or DISCARD."""
        flow = parse_flow(packet)
        if flow is None:
            self.counters.malformed += 1
            return SpdDecision(PolicyAction.DISCARD, None, None)
        policy = self.match_outbound(flow)
        action = self.outbound_default if policy is None else policy.action
        c = self.counters
        if action == PolicyAction.PROTECT:
            sa = self._sas.get(policy.child_sa) if policy is not None else None
            if sa is None:
                c.no_sa += 1
            else:
                c.protect += 1
            return SpdDecision(action, policy, sa)
        if action == PolicyAction.BYPASS:
            c.bypass += 1
        else:
            c.discard += 1
        return SpdDecision(action, policy, None)

    def accept_inbound_cleartext(self, packet: bytes) -> bool:
        """RFC 4301 §5.2: may this packet, which arrived without IPsec, be delivered?

        No, if an inbound policy says it should have been protected (PROTECT) or says DISCARD.
        """
        flow = parse_flow(packet)
        c = self.counters
        if flow is None:
            c.malformed += 1
            return False
        policy = self.match_inbound(flow)
        action = self.inbound_default if policy is None else policy.action
        if action == PolicyAction.BYPASS:
            c.bypass += 1
            return True
        if action == PolicyAction.PROTECT:
            c.cleartext_from_protected += 1
        else:
            c.discard += 1
        return False
