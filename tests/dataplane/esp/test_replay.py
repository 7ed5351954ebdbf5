"""Anti-replay (RFC 4303 §3.4.3, RFC 6479): window semantics, through the engine and alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esplanade.dataplane.esp import DropReason, InboundSa, OutboundSa, decrypt, encrypt
from esplanade.dataplane.esp.replay import ReplayWindow
from tests.dataplane.esp.suites import SUITES, sa_pair

INNER = bytes.fromhex("4500001c000000004011f9c30a0000010a000002") + bytes.fromhex("0001000200080000")


def _pair(window: int = 64, esn: bool = False, suite: str = "aes128gcm16") -> tuple[OutboundSa, InboundSa]:
    s = SUITES[suite]
    out, inb = sa_pair(
        s, encr_key=bytes(s.encr_key_bytes), integ_key=bytes(s.integ_key_bytes), esn=esn, replay_window=window
    )
    return OutboundSa(out, 0.0, reserved_upto=1 << 62), InboundSa(inb, 0.0)


def _packets(sender: OutboundSa, n: int) -> list[bytes]:
    out = [encrypt(sender, INNER, 0.0) for _ in range(n)]
    assert all(p is not None for p in out)
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("suite", ["aes128gcm16", "aes128-sha256", "null-sha256"])
def test_duplicate_left_of_window_and_forgery_are_counted_drops(suite: str) -> None:
    sender, receiver = _pair(window=32, suite=suite)
    packets = _packets(sender, 100)
    assert decrypt(receiver, packets[0], 0.0) == INNER
    assert decrypt(receiver, packets[0], 0.0) is None  # duplicate
    assert receiver.counters.drops[DropReason.REPLAY] == 1
    assert decrypt(receiver, packets[99], 0.0) == INNER  # top = 100
    assert decrypt(receiver, packets[60], 0.0) is None  # seq 61 <= 100 - 32: left of the window
    assert receiver.counters.drops[DropReason.REPLAY] == 2
    assert decrypt(receiver, packets[70], 0.0) == INNER  # seq 71: inside the window
    forged = bytearray(packets[80])
    forged[-1] ^= 0x01
    assert decrypt(receiver, bytes(forged), 0.0) is None
    assert receiver.counters.drops[DropReason.ICV_FAILURE] == 1
    assert decrypt(receiver, packets[80], 0.0) == INNER  # the forgery did not mark 81 as seen
    assert receiver.counters.packets == 4


def test_window_does_not_advance_on_forged_packets() -> None:
    sender, receiver = _pair(window=64)
    packets = _packets(sender, 1000)
    assert decrypt(receiver, packets[10], 0.0) == INNER
    forged = bytearray(packets[999])
    forged[20] ^= 0xFF
    assert decrypt(receiver, bytes(forged), 0.0) is None
    assert receiver.replay.top == 11
    assert decrypt(receiver, packets[11], 0.0) == INNER  # would be left of the window had it moved


def test_out_of_order_within_window_accepted_exactly_once() -> None:
    sender, receiver = _pair(window=128)
    packets = _packets(sender, 200)
    order = list(range(199, 71, -1)) + list(range(72, 200))  # reverse, then all again
    accepted = [i for i in order if decrypt(receiver, packets[i], 0.0) is not None]
    assert sorted(accepted) == list(range(72, 200))
    assert receiver.counters.drops[DropReason.REPLAY] == 128


@pytest.mark.parametrize("window", [4096, 65536])
def test_large_windows(window: int) -> None:
    w = ReplayWindow(window, esn=False)
    assert w.accept(w.check(window + 10))
    assert w.check(10) == -1  # exactly W behind the top: left of the window
    assert w.check(11) == 11  # W - 1 behind: the oldest number inside
    for s in range(11, window + 10, 7):
        assert w.accept(w.check(s))
        assert w.check(s) == -1
    assert w.accept(w.check(3 * window))  # a jump of more than the ring clears everything
    assert w.check(2 * window + 1) == 2 * window + 1
    assert w.check(3 * window) == -1


def test_esn_wrap_across_2_32() -> None:
    sender, receiver = _pair(window=64, esn=True)
    sender.next_seq = (1 << 32) - 40
    receiver.replay = ReplayWindow(64, esn=True, floor=(1 << 32) - 41)
    packets = _packets(sender, 80)  # 2^32-40 .. 2^32+39
    assert packets[39][4:8] == b"\xff\xff\xff\xff"
    assert packets[40][4:8] == b"\x00\x00\x00\x00"  # seq_lo 0 is valid with ESN
    for p in packets[35:45]:
        assert decrypt(receiver, p, 0.0) == INNER
    assert receiver.replay.top == (1 << 32) + 4
    assert decrypt(receiver, packets[30], 0.0) == INNER  # late, from the old subspace (case B)
    assert decrypt(receiver, packets[38], 0.0) is None  # duplicate from the old subspace
    for p in packets[45:]:
        assert decrypt(receiver, p, 0.0) == INNER
    # A packet authenticated under the wrong high half fails its ICV; the window stays put.
    top = receiver.replay.top
    stale_sender, _ = _pair(window=64, esn=True)
    stale_sender.next_seq = 100  # seq_hi 0, seq_lo 100: inferred as 2^32+100
    assert decrypt(receiver, _packets(stale_sender, 1)[0], 0.0) is None
    assert receiver.counters.drops[DropReason.ICV_FAILURE] == 1
    assert receiver.replay.top == top


def test_without_esn_sequence_zero_is_invalid() -> None:
    w = ReplayWindow(64, esn=False)
    assert w.check(0) == -1


def test_window_zero_disables_anti_replay() -> None:
    sender, receiver = _pair(window=0)
    packets = _packets(sender, 3)
    for _ in range(3):
        assert decrypt(receiver, packets[0], 0.0) == INNER
    assert receiver.counters.drops[DropReason.REPLAY] == 0


def test_floor_rejects_at_and_below() -> None:
    w = ReplayWindow(64, esn=False, floor=1000)
    assert w.check(1000) == -1
    assert w.check(999) == -1
    assert w.check(900) == -1
    assert w.accept(w.check(1001))
    w2 = ReplayWindow(64, esn=False, floor=1000)
    assert w2.accept(w2.check(1063))  # same block as nothing above the floor was pre-marked
    assert w2.check(1001) == 1001


class _Reference:
    """The RFC 4303 window as a set: accept s iff s > top - W and s unseen."""

    def __init__(self, size: int) -> None:
        self.size, self.top, self.seen = size, 0, set[int]()

    def accept(self, s: int) -> bool:
        if s == 0 or s <= self.top - self.size or s in self.seen:
            return False
        self.seen.add(s)
        self.top = max(self.top, s)
        return True


@settings(max_examples=200, deadline=None)
@given(
    size=st.sampled_from([32, 64, 100, 1024, 4096]),
    steps=st.lists(st.tuples(st.integers(-5000, 200), st.booleans()), max_size=300),
)
def test_window_matches_reference_model(size: int, steps: list[tuple[int, bool]]) -> None:
    w, ref = ReplayWindow(size, esn=False), _Reference(size)
    for delta, verified in steps:
        s = max(0, ref.top + delta)
        checked = w.check(s)
        expected = ref.accept(s) if verified else (s != 0 and s > ref.top - size and s not in ref.seen)
        if verified:
            assert (checked >= 0 and w.accept(checked)) == expected
        else:
            assert (checked >= 0) == expected  # checked but never verified: no state change
        assert w.top == ref.top


def test_accept_rechecks_duplicates_within_a_batch() -> None:
    w = ReplayWindow(64, esn=False)
    a, b = w.check(5), w.check(5)  # both pass the check before either is verified
    assert a == b == 5
    assert w.accept(a)
    assert not w.accept(b)
