"""Sequence reservation and exhaustion, lifetimes, TFC and dummy packets, selector checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from esplanade.dataplane.esp import (
    DropReason,
    ExpiryReason,
    HardExpire,
    InboundSa,
    OutboundSa,
    PersistReplayFloor,
    ReplayPersistence,
    ReserveSequence,
    SequenceExhausted,
    SequenceReservation,
    SoftExpire,
    decrypt,
    encrypt,
    make_dummy,
)
from esplanade.dataplane.esp.sa_state import check_association
from esplanade.ipsec.sa import Lifetime, SecurityAssociation, TfcPolicy
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import Direction
from tests.dataplane.esp.suites import SUITES, sa_pair

GCM = SUITES["aes128gcm16"]
KEY = bytes(range(20))


def ipv4_udp(src: str = "10.1.0.1", dst: str = "10.2.0.1", sport: int = 1000, dport: int = 53, size: int = 0) -> bytes:
    from scapy.layers.inet import IP, UDP

    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / (b"x" * size))


PACKET = ipv4_udp()


def expiries(sa: OutboundSa | InboundSa) -> list[object]:
    return [e for e in sa.events() if isinstance(e, SoftExpire | HardExpire)]


def _pair(**kw: object) -> tuple[OutboundSa, InboundSa]:
    sender_kw = {
        k: kw.pop(k) for k in list(kw) if k in ("next_seq", "reserved_upto", "reservation", "soft_sequence_limit")
    }
    out, inb = sa_pair(GCM, encr_key=KEY, integ_key=b"", **kw)  # type: ignore[arg-type]
    sender_kw.setdefault("reserved_upto", 1 << 40)
    return OutboundSa(out, 0.0, **sender_kw), InboundSa(inb, 0.0)  # type: ignore[arg-type]


# -- sequence reservation ------------------------------------------------------------------
def test_new_sender_asks_for_a_block_and_sends_nothing_unreserved() -> None:
    sender, _ = _pair(reserved_upto=0, reservation=SequenceReservation(block=100, low_water=10))
    assert sender.events() == [ReserveSequence(sender.spi, 100)]
    assert encrypt(sender, PACKET, 0.0) is None
    assert sender.counters.drops[DropReason.SEQUENCE_UNRESERVED] == 1
    assert sender.next_seq == 1  # the number was not used
    assert sender.events() == []  # the request is outstanding: not repeated
    sender.grant_sequence(100)
    sent = [encrypt(sender, PACKET, 0.0) for _ in range(100)]
    assert all(sent)
    assert [int.from_bytes(p[4:8], "big") for p in sent if p] == list(range(1, 101))
    # at 10 left (seq 91) the next block was asked for
    assert sender.events() == [ReserveSequence(sender.spi, 200)]
    assert encrypt(sender, PACKET, 0.0) is None
    assert sender.counters.drops[DropReason.SEQUENCE_UNRESERVED] == 1 + 1
    sender.grant_sequence(200)
    esp = encrypt(sender, PACKET, 0.0)
    assert esp is not None and int.from_bytes(esp[4:8], "big") == 101


def test_successor_resumes_after_the_persisted_block_and_never_reuses_a_nonce() -> None:
    reservation = SequenceReservation(block=50, low_water=5)
    first, receiver = _pair(reserved_upto=0, reservation=reservation)
    persisted = 0
    seen: set[bytes] = set()
    for event in first.events():
        assert isinstance(event, ReserveSequence)
        persisted = event.upto
    first.grant_sequence(persisted)
    for _ in range(30):
        esp = encrypt(first, PACKET, 0.0)
        assert esp is not None
        seen.add(esp[8:16])  # the AEAD explicit IV
    # crash: the successor starts from the store
    out, _ = sa_pair(GCM, encr_key=KEY, integ_key=b"")
    second = OutboundSa(out, 1.0, next_seq=persisted + 1, reserved_upto=persisted, reservation=reservation)
    assert second.events() == [ReserveSequence(second.spi, persisted + 50)]
    assert encrypt(second, PACKET, 1.0) is None  # nothing until the new block is durable
    second.grant_sequence(persisted + 50)
    for _ in range(30):
        esp = encrypt(second, PACKET, 1.0)
        assert esp is not None
        assert esp[8:16] not in seen
        assert decrypt(receiver, esp, 1.0) == PACKET  # the receiver's window just moves on


def test_exhaustion_without_esn_stops_sending_without_wrap() -> None:
    sender, _ = _pair(next_seq=(1 << 32) - 2)
    sent = [encrypt(sender, PACKET, 0.0) for _ in range(4)]
    assert sent[0] is not None and sent[1] is not None and sent[2] is None and sent[3] is None
    assert int.from_bytes(sent[1][4:8], "big") == (1 << 32) - 1
    assert sender.counters.drops[DropReason.SEQUENCE_EXHAUSTED] == 2
    events = sender.events()
    assert events.count(SequenceExhausted(sender.spi)) == 1
    assert SoftExpire(sender.spi, Direction.OUT, ExpiryReason.SEQUENCE) in events


def test_esn_sender_crosses_2_32() -> None:
    sender, receiver = _pair(next_seq=(1 << 32) - 1, esn=True)
    receiver.replay.top = (1 << 32) - 2
    for expected in ((1 << 32) - 1, 1 << 32, (1 << 32) + 1):
        esp = encrypt(sender, PACKET, 0.0)
        assert esp is not None
        assert esp[8:16] == expected.to_bytes(8, "big")  # the IV is the 64-bit number
        assert decrypt(receiver, esp, 0.0) == PACKET
    assert sender.counters.drops[DropReason.SEQUENCE_EXHAUSTED] == 0


def test_soft_sequence_limit_is_configurable() -> None:
    sender, _ = _pair(soft_sequence_limit=3)
    for _ in range(5):
        encrypt(sender, PACKET, 0.0)
    assert expiries(sender) == [SoftExpire(sender.spi, Direction.OUT, ExpiryReason.SEQUENCE)]


def test_inbound_persists_its_replay_floor_ahead_of_the_window() -> None:
    out, inb = sa_pair(GCM, encr_key=KEY, integ_key=b"")
    sender = OutboundSa(out, 0.0, reserved_upto=1 << 40)
    receiver = InboundSa(inb, 0.0, replay_persistence=ReplayPersistence(block=100))
    assert receiver.events() == [PersistReplayFloor(receiver.spi, 100)]
    for _ in range(49):
        assert decrypt(receiver, encrypt(sender, PACKET, 0.0) or b"", 0.0) == PACKET
    assert receiver.events() == []
    decrypt(receiver, encrypt(sender, PACKET, 0.0) or b"", 0.0)  # top 50: half the block used
    assert receiver.events() == [PersistReplayFloor(receiver.spi, 150)]
    # failover: the successor refuses everything at or below the persisted floor
    successor = InboundSa(inb, 1.0, replay_floor=150)
    replayed = [encrypt(sender, PACKET, 0.0) for _ in range(120)]  # 51..170
    accepted = [p for p in replayed if p and decrypt(successor, p, 1.0)]
    assert len(accepted) == 20  # 151..170
    assert successor.counters.drops[DropReason.REPLAY] == 100


# -- lifetimes -----------------------------------------------------------------------------
def test_packet_lifetimes() -> None:
    sender, receiver = _pair(lifetime=Lifetime(soft_packets=3, hard_packets=5))
    results = [encrypt(sender, PACKET, 0.0) for _ in range(7)]
    assert [r is not None for r in results] == [True] * 5 + [False] * 2
    assert sender.counters.drops[DropReason.LIFETIME] == 2
    assert expiries(sender) == [
        SoftExpire(sender.spi, Direction.OUT, ExpiryReason.PACKETS),
        HardExpire(sender.spi, Direction.OUT, ExpiryReason.PACKETS),
    ]
    for r in results[:5]:
        decrypt(receiver, r or b"", 0.0)
    assert decrypt(receiver, results[0] or b"", 0.0) is None
    assert receiver.counters.drops[DropReason.LIFETIME] == 1
    assert [type(e) for e in expiries(receiver)] == [SoftExpire, HardExpire]


def test_byte_lifetimes_count_inner_bytes() -> None:
    sender, _ = _pair(lifetime=Lifetime(soft_bytes=len(PACKET) * 2, hard_bytes=len(PACKET) * 3 + 1))
    for _ in range(4):
        assert encrypt(sender, PACKET, 0.0) is not None
    assert encrypt(sender, PACKET, 0.0) is None
    assert [e.reason for e in expiries(sender)] == [ExpiryReason.BYTES, ExpiryReason.BYTES]  # type: ignore[attr-defined]


def test_seconds_lifetimes_from_creation_time() -> None:
    out, inb = sa_pair(GCM, encr_key=KEY, integ_key=b"", lifetime=Lifetime(soft_seconds=10, hard_seconds=20))
    sender = OutboundSa(out, 105.0, created_at=100.0, reserved_upto=100)
    assert sender.get_timer() == 110.0
    assert encrypt(sender, PACKET, 109.9) is not None
    assert expiries(sender) == []
    sender.handle_timer(110.0)
    assert expiries(sender) == [SoftExpire(sender.spi, Direction.OUT, ExpiryReason.SECONDS)]
    assert sender.get_timer() == 120.0
    assert encrypt(sender, PACKET, 119.0) is not None
    assert encrypt(sender, PACKET, 120.0) is None  # checked on the packet path too
    assert expiries(sender) == [HardExpire(sender.spi, Direction.OUT, ExpiryReason.SECONDS)]
    assert sender.get_timer() is None
    # created already past its hard lifetime (e.g. restored late): refuses from the start
    late = InboundSa(inb, 200.0, created_at=100.0)
    assert late.hard_expired == ExpiryReason.SECONDS


# -- TFC -----------------------------------------------------------------------------------
def test_tfc_padding_is_added_and_stripped() -> None:
    sender, receiver = _pair(tfc=TfcPolicy(pad_to=600))
    esp = encrypt(sender, PACKET, 0.0)
    assert esp is not None
    assert len(esp) >= 8 + 8 + 600 + 2 + 16
    assert decrypt(receiver, esp, 0.0) == PACKET
    big = ipv4_udp(size=900)
    esp = encrypt(sender, big, 0.0)
    assert esp is not None and len(esp) < 8 + 8 + len(big) + 2 + 4 + 16
    assert decrypt(receiver, esp, 0.0) == big


def test_tfc_padding_is_tunnel_mode_only() -> None:
    from esplanade.ipsec.transforms import Mode

    sender, _ = _pair(tfc=TfcPolicy(pad_to=600), mode=Mode.TRANSPORT)
    esp = encrypt(sender, PACKET, 0.0)
    assert esp is not None and len(esp) < 100


def test_dummy_packets_are_dropped_silently_as_dummy() -> None:
    sender, receiver = _pair(tfc=TfcPolicy(pad_to=200, dummy_interval_ms=100))
    dummy = make_dummy(sender, 0.0)
    assert dummy is not None and len(dummy) >= 8 + 8 + 200 + 2 + 16
    assert decrypt(receiver, dummy, 0.0) is None
    assert receiver.counters.drops[DropReason.DUMMY] == 1
    assert receiver.counters.drops[DropReason.ICV_FAILURE] == 0
    assert decrypt(receiver, dummy, 0.0) is None  # it consumed its sequence number
    assert receiver.counters.drops[DropReason.REPLAY] == 1
    empty = make_dummy(sender, 0.0, length=0)
    assert empty is not None and decrypt(receiver, empty, 0.0) is None
    assert receiver.counters.drops[DropReason.DUMMY] == 2


# -- selectors -----------------------------------------------------------------------------
def test_decapsulated_packet_outside_selectors_is_a_policy_mismatch() -> None:
    local = (TrafficSelector.parse("10.1.0.0/16"),)
    remote = (TrafficSelector.parse("10.2.0.0/24[udp/53]"),)
    sender, receiver = _pair(local_ts=local, remote_ts=remote)
    # the receiver's local side is the sender's remote side
    ok = encrypt(sender, ipv4_udp("10.1.0.1", "10.2.0.1", 1000, 53), 0.0)
    wrong_port = encrypt(sender, ipv4_udp("10.1.0.1", "10.2.0.1", 1000, 54), 0.0)
    wrong_src = encrypt(sender, ipv4_udp("10.9.0.1", "10.2.0.1", 1000, 53), 0.0)
    assert ok is not None and wrong_port is not None and wrong_src is not None
    # receiver: inbound packets must come from its remote (10.1/16) to its local (10.2.0/24 udp 53)
    assert decrypt(receiver, ok, 0.0) is not None
    assert decrypt(receiver, wrong_port, 0.0) is None
    assert decrypt(receiver, wrong_src, 0.0) is None
    assert receiver.counters.drops[DropReason.POLICY_MISMATCH] == 2


@pytest.mark.parametrize("bad", [b"", b"\x45", b"\x00" * 40, bytes.fromhex("4500ffff") + bytes(16)])
def test_malformed_inner_packets_are_counted_on_send(bad: bytes) -> None:
    sender, _ = _pair()
    assert encrypt(sender, bad, 0.0) is None
    assert sender.counters.drops[DropReason.MALFORMED] == 1
    assert sender.next_seq == 1


def _builds(build: Callable[[], object]) -> str:
    try:
        build()
    except ValueError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_check_association_refuses_exactly_what_building_the_sa_refuses(suite: str) -> None:
    """The userspace backend's dry run (`check_association`) and the SA constructors agree:
    the same error for each broken association, none for a good one."""
    s = SUITES[suite]
    out, inb = sa_pair(s, encr_key=bytes(s.encr_key_bytes), integ_key=bytes(s.integ_key_bytes))
    cases: list[tuple[SecurityAssociation, Direction]] = [(inb, Direction.IN), (out, Direction.OUT)]
    for sa, direction in list(cases):
        cases += [
            (replace(sa, direction=Direction.OUT if direction == Direction.IN else Direction.IN), direction),
            (replace(sa, dst="2001:db8::2"), direction),
            (replace(sa, spi=5), direction),
            (replace(sa, encr_key=sa.encr_key + b"x"), direction),
            (replace(sa, integ_key=sa.integ_key + b"x"), direction),
            (replace(sa, replay_window=-1), direction),
            (replace(sa, integ=None, integ_key=b""), direction),
            (replace(sa, lifetime=Lifetime(soft_seconds=10, hard_seconds=5)), direction),
        ]
    refused = 0
    for sa, direction in cases:
        build: Callable[[], object] = (
            (lambda sa=sa: InboundSa(sa, 0.0)) if direction == Direction.IN else (lambda sa=sa: OutboundSa(sa, 0.0))
        )
        expected = _builds(build)
        assert _builds(lambda sa=sa, direction=direction: check_association(sa, direction)) == expected, (sa, direction)
        refused += bool(expected)
    assert refused >= 6


def _fragments() -> list[bytes]:
    from scapy.layers.inet import IP, UDP, fragment
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment

    from tests.dataplane.esp.suites import ADDRESSES

    v4 = fragment(IP(src=ADDRESSES[4][0], dst=ADDRESSES[4][1]) / UDP(sport=1, dport=2) / (b"x" * 100), fragsize=48)
    v6 = IPv6(src=ADDRESSES[6][0], dst=ADDRESSES[6][1])
    return [
        bytes(v4[0]),  # first fragment (MF)
        bytes(v4[-1]),  # last fragment (offset)
        bytes(v6 / IPv6ExtHdrFragment(m=1, id=7) / UDP(sport=1, dport=2) / (b"x" * 16)),
        bytes(v6 / IPv6ExtHdrFragment(offset=3, id=7) / (b"x" * 16)),
    ]


@pytest.mark.parametrize("suite", ["aes128gcm16", "ah-sha256"])
@pytest.mark.parametrize("index", range(4))
def test_transport_mode_refuses_fragments(suite: str, index: int) -> None:
    """RFC 4303 §3.3.4 / RFC 4302 §3.3.4: transport mode is applied only to whole datagrams
    (fragmentation happens after IPsec; a fragment is for tunnel mode)."""
    from esplanade.dataplane.esp import protect
    from esplanade.ipsec.transforms import Mode

    packet = _fragments()[index]
    s = SUITES[suite]
    out, _ = sa_pair(
        s,
        encr_key=bytes(s.encr_key_bytes),
        integ_key=bytes(s.integ_key_bytes),
        mode=Mode.TRANSPORT,
        version=packet[0] >> 4,
    )
    sender = OutboundSa(out, 0.0, reserved_upto=10)
    assert protect(sender, packet, 0.0) is None
    assert sender.counters.drops[DropReason.MALFORMED] == 1
    assert sender.next_seq == 1
