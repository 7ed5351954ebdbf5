"""Per-SA state of the engine: keys and cipher objects, sequence counter and its reservation,
the replay window, lifetimes, counters and pending events.

State that the C batch loop must mirror is plain: `next_seq`, `reserved_upto`, `max_seq`,
`replay.top`/`replay.blocks`, the counters, and the marks (`seq_mark`, `packet_mark`,
`byte_mark`, `time_mark`) at which the slow path (events, reservation) has to run.

Sequence numbers and nonces. The AEAD explicit IV is the 64-bit sequence number (with or
without ESN). RFC 4106 §3.1 and RFC 7634 §2 only require that an IV never repeats under one
key; the sequence number of an SA never repeats (no wrap, RFC 4303 §3.3.3), and with
sequence reservation not even across a crash or failover: the sender only uses numbers
inside a block the shell has made durable (`ReserveSequence` -> `grant_sequence`), and a
successor starts at the persisted `upto + 1`. This is what strongSwan's libipsec and Linux's
`seqiv` do in effect (Linux seqiv XORs the number with a salt; any injective map is as good).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from esplanade.dataplane.esp.cipher_suites import EspCipher, Hmac, esp_cipher_for, integrity_for
from esplanade.dataplane.esp.counters import DropReason, TrafficCounters
from esplanade.dataplane.esp.events import (
    EspEvent,
    ExpiryReason,
    HardExpire,
    PersistReplayFloor,
    ReserveSequence,
    SequenceExhausted,
    SoftExpire,
)
from esplanade.dataplane.esp.replay import ReplayWindow
from esplanade.dataplane.esp.selector_match import SelectorPair
from esplanade.ipsec.sa import Lifetime, SecurityAssociation, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import Direction, IpProto, Mode

RandomBytes = Callable[[int], bytes]

MAX_SEQ_32 = (1 << 32) - 1
MAX_SEQ_64 = (1 << 64) - 1
_IV_POOL_BYTES = 4096


@dataclass(frozen=True, slots=True)
class SequenceReservation:
    """How the sender asks for durable sequence blocks.

    A `ReserveSequence` event asks for `block` more numbers when `low_water` or fewer remain
    in the granted range. Larger blocks mean fewer store writes; after a failover the
    successor skips what is left of the block, which costs nothing.
    """

    block: int = 1 << 20
    low_water: int = 1 << 18

    def __post_init__(self) -> None:
        if self.block <= 0 or not 0 <= self.low_water < self.block:
            raise ValueError("sequence reservation needs block > 0 and 0 <= low_water < block")


@dataclass(frozen=True, slots=True)
class ReplayPersistence:
    """How often an inbound SA asks to persist its replay floor (0: never)."""

    block: int = 1 << 16

    def __post_init__(self) -> None:
        if self.block < 0:
            raise ValueError("negative replay persistence block")


def default_soft_sequence_limit(esn: bool) -> int:
    """Where the sender asks for a rekey: 2^32 - 2^24 without ESN, 2^64 - 2^32 with."""
    return (1 << 64) - (1 << 32) if esn else (1 << 32) - (1 << 24)


OUTSIDE_SAMPLE_BYTES = 64  # header bytes kept of the last packet dropped outside the selectors


def _check_direction(association: SecurityAssociation, direction: Direction) -> None:
    if association.direction != direction:
        raise ValueError(f"SA {association.spi:#x} is not an {direction.name.lower()}bound SA")


def _outer_addresses(
    association: SecurityAssociation,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return _outer_pair(association.src, association.dst)


@functools.lru_cache(maxsize=1024)
def _outer_pair(
    src_text: str, dst_text: str
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The parsed outer addresses, shared per value (every SA between two gateways has the
    same; addresses are immutable). A ValueError is raised each time, never remembered."""
    src, dst = ipaddress.ip_address(src_text), ipaddress.ip_address(dst_text)
    if src.version != dst.version:
        raise ValueError("SA outer addresses mix IPv4 and IPv6")
    return src, dst


def _transforms(association: SecurityAssociation) -> tuple[EspCipher | None, Hmac | None]:
    """The cipher suite of an ESP SA, or the integrity algorithm of an AH SA."""
    if association.protocol == IpProto.ESP:
        assert association.encr is not None
        return esp_cipher_for(association.encr, association.encr_key, association.integ, association.integ_key), None
    assert association.integ is not None
    return None, integrity_for(association.integ, association.integ_key)


@functools.lru_cache(maxsize=256)
def selector_pair_for(local: tuple[TrafficSelector, ...], remote: tuple[TrafficSelector, ...]) -> SelectorPair:
    """The compiled selectors of an SA, shared by every SA with the same ones (nothing changes
    a `SelectorPair` once built; the C engine copies what it needs)."""
    return SelectorPair(local, remote)


def check_association(association: SecurityAssociation, direction: Direction) -> None:
    """Raise the ValueError that building the `direction` SA (`InboundSa` / `OutboundSa`, with
    their defaults) from `association` would raise, without building it: the same checks and
    constructors (addresses, transforms and keys, replay window, selectors), without the
    per-SA state (counters, events, lifetimes, sequence marks), which cannot fail."""
    association.validate()
    _check_direction(association, direction)
    _outer_addresses(association)
    _transforms(association)
    if direction == Direction.IN:
        ReplayWindow(association.replay_window, association.esn, 0)
        selector_pair_for(association.local_ts, association.remote_ts)


class _SaBase:
    """Lifetimes (RFC 4301 §4.4.2.1), counters and the event queue shared by both directions."""

    spi: int
    spi_bytes: bytes
    outer_header_bytes: int
    direction: Direction
    protocol: IpProto
    tunnel: bool
    esn: bool
    encap: UdpEncap | None
    src: bytes
    dst: bytes
    cipher: EspCipher | None
    integrity: Hmac | None
    counters: TrafficCounters
    lifetime: Lifetime
    created_at: float
    soft_expired: ExpiryReason | None
    hard_expired: ExpiryReason | None
    packet_mark: float
    byte_mark: float
    time_mark: float
    _events: deque[EspEvent]

    def _init_common(
        self, association: SecurityAssociation, direction: Direction, now: float, created_at: float | None
    ) -> None:
        association.validate()
        _check_direction(association, direction)
        self.spi = association.spi
        self.direction = direction
        self.protocol = association.protocol
        self.tunnel = association.mode == Mode.TUNNEL
        self.esn = association.esn
        self.encap = association.encap
        src, dst = _outer_addresses(association)
        self.src, self.dst = src.packed, dst.packed
        self.spi_bytes = self.spi.to_bytes(4, "big")
        self.outer_header_bytes = 40 if src.version == 6 else 20
        self.cipher, self.integrity = _transforms(association)
        self.counters = TrafficCounters()
        self.lifetime = association.lifetime
        self.created_at = now if created_at is None else created_at
        self.soft_expired = None
        self.hard_expired = None
        self._events = deque()
        self._recompute_lifetime_marks()
        if now >= self.time_mark:
            self.on_time(now)

    # -- events ---------------------------------------------------------------------------
    def next_event(self) -> EspEvent | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[EspEvent]:
        """Drain all pending events."""
        out = list(self._events)
        self._events.clear()
        return out

    # -- lifetimes ------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """The next instant at which a seconds lifetime runs out, or None."""
        return None if math.isinf(self.time_mark) else self.time_mark

    def handle_timer(self, now: float) -> None:
        if now >= self.time_mark:
            self.on_time(now)

    poll = handle_timer

    def _recompute_lifetime_marks(self) -> None:
        lt = self.lifetime
        soft_pending = self.soft_expired is None
        if self.hard_expired is not None:
            self.packet_mark = self.byte_mark = self.time_mark = math.inf
            return
        packets = [v for v in (lt.soft_packets if soft_pending else 0, lt.hard_packets) if v]
        byte_limits = [v for v in (lt.soft_bytes if soft_pending else 0, lt.hard_bytes) if v]
        seconds = [v for v in (lt.soft_seconds if soft_pending else 0, lt.hard_seconds) if v]
        self.packet_mark = min(packets) if packets else math.inf
        self.byte_mark = min(byte_limits) if byte_limits else math.inf
        self.time_mark = self.created_at + min(seconds) if seconds else math.inf

    def _soft(self, reason: ExpiryReason) -> None:
        if self.soft_expired is None and self.hard_expired is None:
            self.soft_expired = reason
            self._events.append(SoftExpire(self.spi, self.direction, reason))

    def _hard(self, reason: ExpiryReason) -> None:
        if self.hard_expired is None:
            self.hard_expired = reason
            self._events.append(HardExpire(self.spi, self.direction, reason))

    def on_volume(self) -> None:
        """The packet or byte count reached a mark: emit what expired."""
        lt, c = self.lifetime, self.counters
        if lt.hard_packets and c.packets >= lt.hard_packets:
            self._hard(ExpiryReason.PACKETS)
        elif lt.hard_bytes and c.bytes >= lt.hard_bytes:
            self._hard(ExpiryReason.BYTES)
        elif lt.soft_packets and c.packets >= lt.soft_packets:
            self._soft(ExpiryReason.PACKETS)
        elif lt.soft_bytes and c.bytes >= lt.soft_bytes:
            self._soft(ExpiryReason.BYTES)
        self._recompute_lifetime_marks()

    def on_time(self, now: float) -> None:
        lt = self.lifetime
        age = now - self.created_at
        if lt.hard_seconds and age >= lt.hard_seconds:
            self._hard(ExpiryReason.SECONDS)
        elif lt.soft_seconds and age >= lt.soft_seconds:
            self._soft(ExpiryReason.SECONDS)
        self._recompute_lifetime_marks()

    def __repr__(self) -> str:
        mode = "tunnel" if self.tunnel else "transport"
        return f"{type(self).__name__}(spi={self.spi:#010x}, {self.protocol.name}, {mode}, esn={self.esn})"


class OutboundSa(_SaBase):
    """The sending side of an ESP or AH SA."""

    def __init__(
        self,
        association: SecurityAssociation,
        now: float,
        *,
        created_at: float | None = None,
        next_seq: int = 1,
        reserved_upto: int = 0,
        reservation: SequenceReservation | None = None,
        soft_sequence_limit: int | None = None,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        """`next_seq` and `reserved_upto`: for a successor after failover, both come from the
        store: ``next_seq = persisted_upto + 1``, ``reserved_upto = persisted_upto``.
        `random_bytes` is the CSPRNG for AES-CBC IVs and dummy payloads (tests inject one)."""
        self._init_common(association, Direction.OUT, now, created_at)
        self.max_seq = MAX_SEQ_64 if self.esn else MAX_SEQ_32
        if not next_seq >= 1:
            raise ValueError("sequence numbers start at 1")
        self.next_seq = next_seq
        self.reserved_upto = min(reserved_upto, self.max_seq)
        self.requested_upto = self.reserved_upto
        self.reservation = reservation or SequenceReservation()
        self.soft_sequence_limit = (
            default_soft_sequence_limit(self.esn) if soft_sequence_limit is None else soft_sequence_limit
        )
        self._soft_sequence_sent = False
        self._exhausted_sent = False
        self.tfc_pad_to = association.tfc.pad_to
        self.dummy_interval = association.tfc.dummy_interval_ms / 1000.0
        self.random_bytes = random_bytes
        self._iv_pool = b""
        self._iv_pos = 0
        self.seq_mark = 0
        self._sequence_slow_path(peek=True)

    # -- sequence numbers -----------------------------------------------------------------
    def take_sequence(self) -> int:
        """The next sequence number to send, or -1 (a counted drop) if none may be used."""
        seq = self.next_seq
        if seq < self.seq_mark:
            self.next_seq = seq + 1
            return seq
        return self._sequence_slow_path()

    def _sequence_slow_path(self, peek: bool = False) -> int:
        seq = self.next_seq
        if seq > self.max_seq:
            if peek:
                self._recompute_seq_mark()
                return 0
            self.counters.drop(DropReason.SEQUENCE_EXHAUSTED)
            if not self._exhausted_sent:
                self._exhausted_sent = True
                self._events.append(SequenceExhausted(self.spi))
            self._recompute_seq_mark()
            return -1
        self._maybe_request_block(seq)
        if seq >= self.soft_sequence_limit and not self._soft_sequence_sent:
            self._soft_sequence_sent = True
            self._soft(ExpiryReason.SEQUENCE)
        if peek:
            self._recompute_seq_mark()
            return 0
        if seq > self.reserved_upto:
            self.counters.drop(DropReason.SEQUENCE_UNRESERVED)
            self._recompute_seq_mark()
            return -1
        self.next_seq = seq + 1
        self._recompute_seq_mark()
        return seq

    def _maybe_request_block(self, seq: int) -> None:
        if self.requested_upto > self.reserved_upto:
            return  # a request is outstanding
        remaining = self.reserved_upto - seq + 1
        if remaining > self.reservation.low_water:
            return
        upto = min(max(self.reserved_upto, seq - 1) + self.reservation.block, self.max_seq)
        if upto > self.reserved_upto:
            self.requested_upto = upto
            self._events.append(ReserveSequence(self.spi, upto))

    def _recompute_seq_mark(self) -> None:
        marks = [self.reserved_upto + 1, self.max_seq + 1]
        if self.requested_upto <= self.reserved_upto and self.reserved_upto < self.max_seq:
            marks.append(self.reserved_upto - self.reservation.low_water + 1)
        if not self._soft_sequence_sent:
            marks.append(self.soft_sequence_limit)
        self.seq_mark = min(marks)

    def grant_sequence(self, upto: int) -> None:
        """The shell persisted `upto`: numbers up to it may be sent."""
        upto = min(upto, self.max_seq)
        if upto > self.reserved_upto:
            self.reserved_upto = upto
        if self.requested_upto < self.reserved_upto:
            self.requested_upto = self.reserved_upto
        self._sequence_slow_path(peek=True)

    def random_iv(self, size: int) -> bytes:
        if not size:
            return b""
        pos = self._iv_pos
        if pos + size > len(self._iv_pool):
            self._iv_pool = self.random_bytes(_IV_POOL_BYTES)
            pos = 0
        self._iv_pos = pos + size
        return self._iv_pool[pos : pos + size]


class InboundSa(_SaBase):
    """The receiving side of an ESP or AH SA."""

    def __init__(
        self,
        association: SecurityAssociation,
        now: float,
        *,
        created_at: float | None = None,
        replay_floor: int = 0,
        replay_persistence: ReplayPersistence | None = None,
        nat_original_addresses: tuple[str, str] | None = None,
    ) -> None:
        """`replay_floor`: for a successor after failover, the persisted floor (every number at
        or below it is rejected). `nat_original_addresses`: the peer's (source, destination)
        before NAT, from NAT-OA (RFC 3948 §3.1.2), for the transport-mode checksum fix-up."""
        self._init_common(association, Direction.IN, now, created_at)
        self.replay = ReplayWindow(association.replay_window, self.esn, replay_floor)
        self.selectors = selector_pair_for(association.local_ts, association.remote_ts)
        # The head of the last decapsulated packet dropped outside `selectors` (policy_mismatch),
        # for the decision log's 5-tuple; taken (and cleared) by the dataplane's drop poll.
        self.last_outside: bytes | None = None
        self.nat_original: bytes | None = None
        if nat_original_addresses is not None:
            o_src, o_dst = (ipaddress.ip_address(a).packed for a in nat_original_addresses)
            if len(o_src) != len(self.src) or len(o_dst) != len(self.dst):
                raise ValueError("NAT original addresses differ in IP version from the SA")
            self.nat_original = o_src + o_dst
        persistence = replay_persistence or ReplayPersistence()
        self.persist_block = persistence.block if association.replay_window else 0
        self.persist_mark = math.inf
        if self.persist_block:
            self._request_floor()

    def drop_outside_selectors(self, inner: bytes | bytearray | memoryview) -> None:
        """Count a decapsulated packet outside `selectors` (policy_mismatch) and keep its head."""
        self.counters.drop(DropReason.POLICY_MISMATCH)
        self.last_outside = bytes(inner[:OUTSIDE_SAMPLE_BYTES])

    def _request_floor(self) -> None:
        upto = self.replay.top + self.persist_block
        self._events.append(PersistReplayFloor(self.spi, upto))
        self.persist_mark = upto - self.persist_block // 2

    def on_replay_top(self) -> None:
        """The window top reached the persistence mark: ask to persist the next floor."""
        if self.persist_block and self.replay.top >= self.persist_mark:
            self._request_floor()
