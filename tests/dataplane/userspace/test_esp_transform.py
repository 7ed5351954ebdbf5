"""The crypto room (`EspTransform`): SPD decisions, SA control, sequence grants, and its fast
lane checked against the engine's general path (identical bytes, drops and state)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esplanade.dataplane.backend import DataplaneEventKind
from esplanade.dataplane.esp.cipher_suites import esp_cipher_for
from esplanade.dataplane.esp.counters import DropReason
from esplanade.dataplane.userspace.esp_transform import EspTransform
from esplanade.dataplane.userspace.sa_messages import policy_document
from esplanade.ipsec.sa import Lifetime
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import ENCR_AES_CBC_128, ENCR_CHACHA20_POLY1305, INTEG_HMAC_SHA2_256_128
from tests.dataplane.compiled_module import skip_without_compiled
from tests.dataplane.userspace.esp_pairs import (
    A_ADDR,
    B_ADDR,
    DEFAULT_HOT_PATH,
    SPI_AB,
    SPI_BA,
    Keys,
    control,
    install_message,
    keyed_pair,
    make_transform,
    policies,
)
from tests.dataplane.userspace.packet_builders import tcp_segments, udp_datagrams

A_HOST, B_HOST = "10.1.0.5", "10.2.0.9"
UDP_FROM_B = (B_ADDR, 4500)


@pytest.fixture(autouse=True, params=["python", "compiled"])
def hot_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs on both hot paths: the Python lanes and the compiled loop."""
    skip_without_compiled(request.param)
    DEFAULT_HOT_PATH[0] = request.param
    yield request.param
    DEFAULT_HOT_PATH[0] = "python"


def a_to_b(count: int = 4, size: int = 400) -> list[bytes]:
    return udp_datagrams(count, size, src=A_HOST, dst=B_HOST)


def drops(transform: EspTransform) -> dict[str, object]:
    reply = transform.handle_control("counters", {}, 0.0)
    return dict(reply["drops"])  # type: ignore[arg-type]


def sa_counters(transform: EspTransform) -> dict[tuple[str, int], tuple[int, int, int]]:
    reply = transform.handle_control("counters", {}, 0.0)
    return {(s["direction"], s["spi"]): (s["packets"], s["bytes"], s["top"]) for s in reply["sas"]}  # type: ignore[index, union-attr]


# -- traffic ---------------------------------------------------------------------------
def test_protected_packets_cross_and_come_back_unchanged() -> None:
    a, b = keyed_pair(Keys())
    packets = a_to_b() + tcp_segments(3, 900, src=A_HOST, dst=B_HOST)
    datagrams = a.outbound_batch(packets, 1.0)
    assert [d[0] for d in datagrams] == [(B_ADDR, 4500)] * len(packets)
    assert all(d[1][:4] == SPI_AB.to_bytes(4, "big") for d in datagrams)
    assert b.inbound_batch([((A_ADDR, 4500), d[1]) for d in datagrams], 1.0) == packets
    assert sa_counters(b)[("in", SPI_AB)][0] == len(packets)


def test_plain_esp_sas_send_to_port_zero_and_refuse_udp_arrivals() -> None:
    a, b = keyed_pair(Keys(udp=False))
    datagrams = a.outbound_batch(a_to_b(2), 1.0)
    assert [d[0] for d in datagrams] == [(B_ADDR, 0)] * 2
    assert b.inbound_batch([((A_ADDR, 4500), datagrams[0][1])], 1.0) == []  # came over UDP: wrong encapsulation
    assert drops(b) == {"encapsulation_mismatch": 1}
    assert len(b.inbound_batch([((A_ADDR, 0), datagrams[1][1])], 1.0)) == 1


def test_unmatched_discarded_and_bypass_packets_never_leave() -> None:
    a, _ = keyed_pair(Keys())
    elsewhere = udp_datagrams(2, 100, src=A_HOST, dst="10.99.0.1")  # no policy
    assert a.outbound_batch(elsewhere, 1.0) == []
    discard = make_transform()
    for policy in policies("a", action=PolicyAction.DISCARD):
        control(discard, "install_policy", policy=policy_document(policy))
    assert discard.outbound_batch(a_to_b(3), 1.0) == []
    assert drops(a) == {"no_policy": 2}
    assert drops(discard) == {"policy_discard": 3}


def test_trap_policy_without_sa_raises_one_acquire_per_second() -> None:
    t = make_transform()
    for policy in policies("a", trap=True):
        control(t, "install_policy", policy=policy_document(policy))
    assert t.outbound_batch(a_to_b(5), 10.0) == []
    t.outbound_batch(a_to_b(5), 10.5)
    events = t.drain_events()
    assert [(e.kind, e.policy) for e in events] == [(DataplaneEventKind.ACQUIRE, "c1-out")]
    assert "10.1.0.5 -> 10.2.0.9 proto 17" in events[0].reason
    t.outbound_batch(a_to_b(1), 11.1)
    assert len(t.drain_events()) == 1
    assert drops(t) == {"no_sa": 11}


def test_decapsulated_packet_from_outside_the_selectors_is_a_policy_mismatch() -> None:
    a, b = keyed_pair(Keys())
    # A seals a packet from 10.7/16 through a wide policy of its own; B's SA covers only 10.1/16
    wide = SpdPolicy(
        "wide",
        PolicyDirection.OUT,
        TrafficSelector.any(),
        TrafficSelector.from_network("10.2.0.0/16"),
        priority=1,
        child_sa="c1",
    )
    control(a, "install_policy", policy=policy_document(wide))
    datagrams = a.outbound_batch(udp_datagrams(1, 64, src="10.7.0.1", dst=B_HOST), 1.0)
    assert len(datagrams) == 1
    assert b.inbound_batch([((A_ADDR, 4500), datagrams[0][1])], 1.0) == []
    assert drops(b) == {"policy_mismatch": 1}


def test_garbage_truncated_and_unknown_spi_are_counted_not_raised() -> None:
    _, b = keyed_pair(Keys())
    rng = random.Random(7)
    junk = [
        b"",
        b"\x01\x02\x03",
        SPI_AB.to_bytes(4, "big") + b"\x00\x00\x00\x01",  # header only
        SPI_AB.to_bytes(4, "big") + bytes(rng.randrange(256) for _ in range(61)),  # odd length
        SPI_AB.to_bytes(4, "big") + bytes(rng.randrange(256) for _ in range(200)),  # ICV fails
        (0x7777).to_bytes(4, "big") + bytes(100),
        bytes(rng.randrange(256) for _ in range(65000)),
    ]
    assert b.inbound_batch([(UDP_FROM_B, j) for j in junk], 1.0) == []
    counted = drops(b)
    assert sum(int(v) for v in counted.values()) == len(junk)  # type: ignore[call-overload]
    assert set(counted) <= {"malformed", "unknown_spi", "icv_failure"}


# -- control ------------------------------------------------------------------------------
def test_sequence_numbers_stop_at_the_granted_bound_and_resume_after_a_grant() -> None:
    a, _ = keyed_pair(Keys(), next_seq=101, reserved=104)
    messages = a.drain_messages()
    assert {"op": "reserve_sequence", "child_sa": "c1", "spi": SPI_AB, "upto": 104 + (1 << 20)} in messages
    sent = a.outbound_batch(a_to_b(6), 1.0)
    assert [int.from_bytes(d[1][4:8], "big") for d in sent] == [101, 102, 103, 104]
    assert drops(a) == {"sequence_unreserved": 2}
    control(a, "grant_sequence", spi=SPI_AB, upto=2000)
    assert [int.from_bytes(d[1][4:8], "big") for d in a.outbound_batch(a_to_b(2), 1.0)] == [105, 106]


def test_remove_forgets_the_sa_and_its_steering() -> None:
    a, _ = keyed_pair(Keys())
    control(a, "remove_sa", child_sa="c1")
    assert a.outbound_batch(a_to_b(1), 1.0) == []
    assert drops(a) == {"no_sa": 1}
    assert a.status()["child_sas_owned"] == 0


def test_update_keeps_sequence_window_and_counters() -> None:
    keys = Keys()
    a, b = keyed_pair(keys)
    first = a.outbound_batch(a_to_b(3), 1.0)
    b.inbound_batch([((A_ADDR, 4500), d[1]) for d in first], 1.0)
    keys.lifetime = Lifetime(soft_seconds=100, hard_seconds=200)
    control(a, "update_sa", **install_message(keys, "a"))
    control(b, "update_sa", **install_message(keys, "b"))
    again = a.outbound_batch(a_to_b(1), 2.0)
    assert int.from_bytes(again[0][1][4:8], "big") == 4
    assert b.inbound_batch([((A_ADDR, 4500), first[0][1])], 2.0) == []  # still a replay
    assert len(b.inbound_batch([((A_ADDR, 4500), again[0][1])], 2.0)) == 1
    assert sa_counters(b)[("in", SPI_AB)][:2][0] == 4
    assert b.get_timer() == 100.0


def test_refusals_answer_errors_without_raising() -> None:
    t = make_transform()
    assert t.handle_control("install_sa", {"child_sa": "x"}, 0.0)["ok"] is False
    assert t.handle_control("nonsense", {}, 0.0)["ok"] is False
    message = install_message(Keys(), "a")
    message["outbound"]["encr_key"] = "00" * 3  # wrong length
    reply = t.handle_control("install_sa", message, 0.0)
    assert reply["ok"] is False and "key material" in str(reply["error"])
    assert "00" * 3 not in str(reply["error"])
    assert t.handle_control("install_sa", {**install_message(Keys(), "a"), "owner": 3}, 0.0)["ok"] is False


def test_lifetime_events_come_out_of_the_timer() -> None:
    a, _ = keyed_pair(Keys(lifetime=Lifetime(soft_seconds=10, hard_seconds=20)))
    assert a.get_timer() == 10.0
    a.handle_timer(10.5)
    kinds = [(e.kind, e.spi) for e in a.drain_events()]
    assert (DataplaneEventKind.SOFT_EXPIRE, SPI_AB) in kinds and (DataplaneEventKind.SOFT_EXPIRE, SPI_BA) in kinds
    a.handle_timer(20.0)
    assert {e.kind for e in a.drain_events()} == {DataplaneEventKind.HARD_EXPIRE}
    assert a.outbound_batch(a_to_b(1), 21.0) == []
    assert drops(a) == {"lifetime": 1}


def test_identity_filter_drops_what_the_identity_may_not_reach() -> None:
    """The identity's packet filter (on top of the SA's selectors) on both hot paths; it survives
    an update of the SA and can be lifted."""
    keys = Keys()
    a, b = keyed_pair(keys)
    control(b, "set_filter", child_sa="c1", selectors=[f"{B_HOST}/32[tcp/5201]"])
    allowed = tcp_segments(3, 500, src=A_HOST, dst=B_HOST)
    denied = a_to_b(2, 100) + tcp_segments(1, 500, src=A_HOST, dst=B_HOST, dport=22)

    def deliver(packets: list[bytes], now: float) -> list[bytes]:
        return b.inbound_batch([((A_ADDR, 4500), d[1]) for d in a.outbound_batch(packets, now)], now)

    assert deliver(allowed + denied, 1.0) == allowed
    assert drops(b) == {"identity_filter": 3}
    keys.lifetime = Lifetime(soft_seconds=100, hard_seconds=200)
    control(b, "update_sa", 2.0, **install_message(keys, "b"))
    assert deliver(denied + allowed, 2.0) == allowed
    assert drops(b) == {"identity_filter": 6}
    control(b, "set_filter", child_sa="c1", selectors=None)
    assert deliver(denied, 3.0) == denied
    assert drops(b) == {"identity_filter": 6}
    assert b.handle_control("set_filter", {"child_sa": "c1", "selectors": ["nonsense"]}, 3.0)["ok"] is False
    assert b.handle_control("set_filter", {"child_sa": "nope", "selectors": None}, 3.0)["ok"] is False


def test_an_sa_installed_with_its_filter_is_filtered_from_its_first_packet(hot_path: str) -> None:
    """A live SA reinstalled (dataplane restart, takeover) while its peer is sending: the filter
    comes in the install message, so no packet passes between the install and a later set_filter."""
    keys = Keys()
    a = make_transform(True, hot_path=hot_path)  # type: ignore[arg-type]
    b = make_transform(True, hot_path=hot_path)  # type: ignore[arg-type]
    control(a, "install_sa", 0.0, **install_message(keys, "a"))
    refused = b.handle_control("install_sa", {**install_message(keys, "b"), "filter": ["nonsense"]}, 0.0)
    assert refused["ok"] is False and not b.children  # a bad filter installs nothing
    control(b, "install_sa", 0.0, filter=[f"{B_HOST}/32[tcp/5201]"], **install_message(keys, "b"))
    for transform, side in ((a, "a"), (b, "b")):
        for policy in policies(side):
            control(transform, "install_policy", 0.0, policy=policy_document(policy))
    allowed = tcp_segments(2, 500, src=A_HOST, dst=B_HOST)
    denied = tcp_segments(1, 500, src=A_HOST, dst=B_HOST, dport=22)
    delivered = b.inbound_batch([((A_ADDR, 4500), d[1]) for d in a.outbound_batch(denied + allowed, 1.0)], 1.0)
    assert delivered == allowed
    assert drops(b) == {"identity_filter": 1}


def test_set_filters_applies_many_and_reports_each_failure() -> None:
    a, b = keyed_pair(Keys())
    reply = b.handle_control(
        "set_filters",
        {
            "filters": [
                {"child_sa": "c1", "selectors": [f"{B_HOST}/32[tcp/5201]"]},
                {"child_sa": "nope", "selectors": None},
                {"child_sa": "c1", "selectors": ["nonsense"]},
            ]
        },
        1.0,
    )
    assert reply["ok"] is True and set(reply["errors"]) == {"nope", "c1"}  # type: ignore[arg-type]
    denied = tcp_segments(1, 100, src=A_HOST, dst=B_HOST, dport=22)
    assert b.inbound_batch([((A_ADDR, 4500), d[1]) for d in a.outbound_batch(denied, 1.0)], 1.0) == []
    assert drops(b) == {"identity_filter": 1}  # the first, valid filter of c1 stands
    assert b.handle_control("set_filters", {"filters": "x"}, 1.0)["ok"] is False


def test_filter_drops_reports_denials_per_child_sa_with_sampled_headers(hot_path: str) -> None:
    """What the policy enforcer polls: per-Child-SA denial counts and the headers of denied
    packets, drained by each call: every one (bounded) on the Python lanes, the last one per SA
    on the compiled lane."""
    a, b = keyed_pair(Keys())
    control(b, "set_filter", child_sa="c1", selectors=[f"{B_HOST}/32[tcp/5201]"])
    denied = tcp_segments(2, 100, src=A_HOST, dst=B_HOST, dport=22)
    b.inbound_batch([((A_ADDR, 4500), d[1]) for d in a.outbound_batch(denied, 1.0)], 1.0)
    reply = b.handle_control("filter_drops", {}, 1.0)
    assert reply["denied"] == {"c1": 2}
    samples = reply["samples"]
    assert isinstance(samples, list)
    if hot_path == "python":
        assert [child for child, _ in samples] == ["c1", "c1"]
    else:
        assert [child for child, _ in samples] == ["c1"]
    assert bytes.fromhex(samples[-1][1]) == denied[-1][:64]
    again = b.handle_control("filter_drops", {}, 1.5)
    assert again["denied"] == {"c1": 2} and again["samples"] == []  # counts stay, samples drain


def test_filter_drops_samples_the_flow_of_packets_outside_a_governed_sas_selectors() -> None:
    """A governed SA (one with an identity filter) whose peer sends what its narrowed selectors do
    not cover: `policy_mismatch` drops, and `filter_drops` gives the count and the header of the
    last such packet since the previous call (the decision log's 5-tuple), on both hot paths."""
    a, b = keyed_pair(Keys())
    control(b, "set_filter", child_sa="c1", selectors=[f"{B_HOST}/32[tcp/5201]"])
    wide = SpdPolicy(
        "wide",
        PolicyDirection.OUT,
        TrafficSelector.any(),
        TrafficSelector.from_network("10.9.0.0/16"),
        priority=1,
        child_sa="c1",
    )
    control(a, "install_policy", policy=policy_document(wide))
    outside = tcp_segments(1, 100, src=A_HOST, dst="10.9.0.7", dport=22) + tcp_segments(
        1, 100, src=A_HOST, dst="10.9.0.8", dport=8443
    )
    datagrams = a.outbound_batch(outside, 1.0)
    assert len(datagrams) == 2
    assert b.inbound_batch([((A_ADDR, 4500), d[1]) for d in datagrams], 1.0) == []
    assert drops(b) == {"policy_mismatch": 2}
    reply = b.handle_control("filter_drops", {}, 1.0)
    assert reply["outside_selectors"] == {"c1": 2} and reply["denied"] == {}
    assert reply["outside_samples"] == [["c1", outside[-1][:64].hex()]]
    again = b.handle_control("filter_drops", {}, 1.5)
    assert again["outside_selectors"] == {"c1": 2} and again["outside_samples"] == []


# -- the fast lane against the engine's general path ------------------------------------------
def _malformed(keys: Keys, seq: int, kind: int) -> bytes:
    """An authentic ESP packet (right key, right ICV) whose content is wrong in one way."""
    cipher = esp_cipher_for(keys.encr, keys.key_ab, keys.integ, keys.integ_ab)
    inner = a_to_b(1, 60)[0]
    header = SPI_AB.to_bytes(4, "big") + seq.to_bytes(4, "big")
    iv = seq.to_bytes(8, "big")
    if kind == 0:  # bad padding bytes
        plaintext = inner + b"\x09\x09" + bytes((2, 4))
    elif kind == 1:  # next header says IPv6, packet is IPv4
        plaintext = inner + b"\x01\x02" + bytes((2, 41))
    elif kind == 2:  # dummy packet (next header 59)
        plaintext = b"\x00" * 14 + bytes((0, 59))
    elif kind == 3:  # inner length larger than the payload
        broken = bytearray(inner)
        broken[2:4] = (len(inner) + 40).to_bytes(2, "big")
        plaintext = bytes(broken) + b"\x01\x02" + bytes((2, 4))
    else:  # pad length beyond the payload
        plaintext = b"\x45\x00" + bytes((250, 4))
    return cipher.seal(header, iv, bytearray(plaintext), None)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["aes128gcm16", "chacha20poly1305", "aes128-sha256"]),
    st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=60),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_fast_lane_matches_the_engine_packet_for_packet(suite: str, script: list[int], seed: int) -> None:
    """The Python fast lane, or the compiled loop (by the `hot_path` fixture), against the engine."""
    rng = random.Random(seed)
    if suite == "aes128-sha256":
        keys = Keys(
            encr=ENCR_AES_CBC_128,
            integ=INTEG_HMAC_SHA2_256_128,
            key_ab=rng.randbytes(16),
            key_ba=rng.randbytes(16),
            integ_ab=rng.randbytes(32),
            integ_ba=rng.randbytes(32),
        )
    elif suite == "chacha20poly1305":
        keys = Keys(encr=ENCR_CHACHA20_POLY1305, key_ab=rng.randbytes(36), key_ba=rng.randbytes(36))
    else:
        keys = Keys(key_ab=rng.randbytes(20), key_ba=rng.randbytes(20))
    # small blocks: sequence reservations, their exhaustion and replay-floor requests happen often
    small = {"block": 64, "replay_block": 32, "reserved": rng.randrange(20, 120)}
    fast_a, fast_b = keyed_pair(keys, fast_lane=True, **small)
    slow_a, slow_b = keyed_pair(keys, fast_lane=False, hot_path="python", **small)
    assert bool(fast_b.lanes_in_use()) == keys.encr.aead
    sent: list[bytes] = []
    now = 1.0
    for step in script:
        if step <= 3:  # send a batch; AEAD output is deterministic, CBC IVs are random
            packets = a_to_b(rng.randrange(1, 12), rng.randrange(20, 1400)) + tcp_segments(
                1, rng.randrange(1, 1400), src=A_HOST, dst=B_HOST
            )
            got_fast = fast_a.outbound_batch(packets, now)
            got_slow = slow_a.outbound_batch(packets, now)
            assert [d[0] for d in got_fast] == [d[0] for d in got_slow]
            if keys.encr.aead:
                assert got_fast == got_slow
            sent.extend(d[1] for d in got_fast)
            delivered = [((A_ADDR, 4500), d) for d in (d[1] for d in got_fast)]
        elif step <= 5 and sent:  # replays and reordering
            delivered = [((A_ADDR, 4500), rng.choice(sent)) for _ in range(rng.randrange(1, 5))]
        elif step == 6 and sent:  # corrupted
            victim = bytearray(rng.choice(sent))
            victim[rng.randrange(8, len(victim))] ^= 1 << rng.randrange(8)
            delivered = [((A_ADDR, 4500), bytes(victim))]
        elif step == 7 and keys.encr.aead:  # authentic but malformed
            top = max((int.from_bytes(s[4:8], "big") for s in sent), default=0)
            delivered = [((A_ADDR, 4500), _malformed(keys, top + rng.randrange(1, 200), rng.randrange(5)))]
        elif step == 8 and sent:  # truncated
            delivered = [((A_ADDR, 4500), rng.choice(sent)[: rng.randrange(0, 40)])]
        else:
            now += rng.choice([0.0, 0.5])
            continue
        assert fast_b.inbound_batch(delivered, now) == slow_b.inbound_batch(delivered, now)
    assert sa_counters(fast_a) == sa_counters(slow_a)
    assert sa_counters(fast_b) == sa_counters(slow_b)
    assert drops(fast_b) == drops(slow_b)
    fast_in, slow_in = fast_b.children["c1"].inbound, slow_b.children["c1"].inbound
    assert (fast_in.replay.top, fast_in.replay.blocks) == (slow_in.replay.top, slow_in.replay.blocks)
    assert fast_b.drain_messages() == slow_b.drain_messages()
    assert fast_a.drain_messages() == slow_a.drain_messages()
    assert fast_a.drain_events() == slow_a.drain_events()
    assert drops(fast_a) == drops(slow_a)
    assert DropReason.REPLAY  # the enum the counters use
