"""The same SAs in a compiled and a pure-Python batch core, and what to compare between them."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from esplanade.dataplane.esp import InboundSa, OutboundSa
from esplanade.dataplane.esp.sa_state import ReplayPersistence, SequenceReservation
from esplanade.dataplane.fastpath import CompiledEspBatch, EspBatchCore, IdentityFilter, PythonEspBatch, load_compiled
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.policy.filters import PacketFilter, TimedPart
from tests.dataplane.esp.suites import SUITES

AEAD_SUITES = [SUITES["aes128gcm16"], SUITES["aes256gcm16"], SUITES["chacha20poly1305"]]
CBC_SUITE = SUITES["aes128-sha256"]


def compiled_module() -> Any:
    module, why = load_compiled()
    assert module is not None, why  # the dev install builds it: a missing module is a failure here
    return module


def both_cores(flow_capacity: int = 4096) -> tuple[EspBatchCore, EspBatchCore]:
    return CompiledEspBatch(compiled_module(), flow_capacity), PythonEspBatch(flow_capacity)


def deterministic_random(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def outbound(association: SecurityAssociation, **kw: Any) -> OutboundSa:
    kw.setdefault("random_bytes", deterministic_random(7))
    return OutboundSa(association, 0.0, **kw)


def inbound(association: SecurityAssociation, **kw: Any) -> InboundSa:
    return InboundSa(association, 0.0, **kw)


def outbound_state(sa: OutboundSa) -> tuple[object, ...]:
    return (
        sa.next_seq,
        sa.reserved_upto,
        sa.requested_upto,
        sa.seq_mark,
        dataclasses.astuple(sa.counters),
        sa.soft_expired,
        sa.hard_expired,
        sa.events(),
    )


def inbound_state(sa: InboundSa) -> tuple[object, ...]:
    return (
        sa.replay.top,
        list(sa.replay.blocks),
        sa.persist_mark,
        dataclasses.astuple(sa.counters),
        sa.soft_expired,
        sa.hard_expired,
        sa.events(),
    )


# -- inner packets ----------------------------------------------------------------------------
V4 = [bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), bytes([10, 0, 1, 9]), bytes([192, 0, 2, 7])]
V6 = [ipaddress.IPv6Address(a).packed for a in ("2001:db8::1", "2001:db8::2", "2001:db8:1::9", "fd00::7")]
PORTS = [0, 22, 53, 80, 443, 5201, 40000]
PROTOCOLS = [6, 17, 1, 58, 132, 47]


def _l4(proto: int, sport: int, dport: int, payload: bytes) -> bytes:
    if proto in (6, 17, 132):
        return struct.pack("!HH", sport, dport) + payload
    if proto in (1, 58):
        return bytes((dport >> 8, dport & 0xFF)) + payload
    return payload


@st.composite
def inner_packets(
    draw: st.DrawFn, version: int | None = None, valid_only: bool = False, whole_datagrams: bool = False
) -> bytes:
    """IP packets; `whole_datagrams`: no fragments (what transport mode protects, RFC 4303 §3.3.4)."""
    v = version or draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from(PROTOCOLS))
    sport, dport = draw(st.sampled_from(PORTS)), draw(st.sampled_from([*PORTS, 2048, 32768, 0]))
    payload = draw(st.binary(max_size=48))
    body = _l4(proto, sport, dport, payload)
    if v == 4:
        frag = draw(
            st.sampled_from([0, 0, 0, 0x4000] if whole_datagrams else [0, 0, 0, 0x4000, 0x2000, 0x0001, 0x0064])
        )
        src, dst = draw(st.sampled_from(V4)), draw(st.sampled_from(V4))
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, draw(st.integers(0, 255)), 20 + len(body), 7, frag, 64, proto, 0, src, dst
        )
        packet = header + body
    else:
        src, dst = draw(st.sampled_from(V6)), draw(st.sampled_from(V6))
        ext = draw(st.sampled_from([b"", b"", b"hop", b"frag0"] + ([] if whole_datagrams else [b"frag9"])))
        nh = proto
        prefix = b""
        if ext == b"hop":
            prefix, nh = bytes((proto, 0)) + bytes(6), 0
        elif ext.startswith(b"frag"):
            offset = 0 if ext == b"frag0" else 9 << 3
            prefix, nh = bytes((proto, 0)) + struct.pack("!HI", offset, 1), 44
        body = prefix + body
        header = struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, 64, src, dst)
        packet = header + body
    if valid_only:
        return packet
    damage = draw(st.sampled_from(["none"] * 10 + ["long", "short", "version", "empty", "tiny"]))
    if damage == "long":
        packet = packet + b"\x00" * draw(st.integers(1, 5))  # shorter total length than the data
    elif damage == "short":
        packet = packet[: max(1, len(packet) - draw(st.integers(1, 8)))]
    elif damage == "version":
        packet = bytes((0x50 | (packet[0] & 0x0F),)) + packet[1:]
    elif damage == "empty":
        packet = b""
    elif damage == "tiny":
        packet = packet[:3]
    return packet


# -- identity filters ----------------------------------------------------------------------------
RULES = [
    TrafficSelector.from_network("10.0.0.0/31"),
    TrafficSelector.from_network("10.0.0.2/32", 6, 22, 22),
    TrafficSelector.from_network("10.0.0.0/24", 17, 53, 80),
    TrafficSelector.from_network("10.0.1.0/24", 1, 0x0800, 0x08FF),
    TrafficSelector.from_network("0.0.0.0/0", 6, 443, 443),
    TrafficSelector.from_network("2001:db8::/127"),
    TrafficSelector.from_network("2001:db8::/32", 6, 5201, 5201),
    TrafficSelector.from_network("2001:db8::2/128", 58, 0x8000, 0x80FF),
    TrafficSelector.from_network("::/0", 17, 0, 65535),
    TrafficSelector.from_network("255.255.255.0/24"),
    TrafficSelector.from_network("ffff::/16", 6),
]


FilterSpec = tuple[tuple[TrafficSelector, ...], tuple[tuple[tuple[TrafficSelector, ...], float], ...]]


@st.composite
def filter_specs(draw: st.DrawFn) -> FilterSpec | None:
    """None (no filter) or (static rules, timed parts as (rules, opening time))."""
    if draw(st.booleans()):
        return None
    static = tuple(draw(st.lists(st.sampled_from(RULES), max_size=6)))
    timed: list[tuple[tuple[TrafficSelector, ...], float]] = []
    if draw(st.booleans()):
        opens = draw(st.sampled_from([0.0, 120.0, 1e12]))
        timed.append((tuple(draw(st.lists(st.sampled_from(RULES), max_size=3))), opens))
    return static, tuple(timed)


def build_filter(spec: FilterSpec) -> PacketFilter:
    static, timed = spec
    parts = [TimedPart(rules, lambda now, o=opens: now >= o) for rules, opens in timed]
    return PacketFilter(static, parts)


def identity_pair(
    cores: tuple[EspBatchCore, EspBatchCore], spec: FilterSpec | None
) -> tuple[IdentityFilter | None, IdentityFilter | None]:
    """The same filter built once per core (filters with timed parts hold state)."""
    if spec is None:
        return None, None
    return cores[0].identity_filter(build_filter(spec)), cores[1].identity_filter(build_filter(spec))


def reservation(block: int) -> SequenceReservation:
    return SequenceReservation(block=block, low_water=block // 4)


def persistence(block: int) -> ReplayPersistence:
    return ReplayPersistence(block=block)
