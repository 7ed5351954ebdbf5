"""Wire input never raises: arbitrary bytes and mutated valid packets are counted drops."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esplanade.dataplane.esp import (
    DropReason,
    InboundSa,
    InboundSaTable,
    OutboundSa,
    classify_udp_payload,
    decrypt,
    decrypt_demux_batch,
    encrypt,
    parse_flow,
    protect,
    unprotect,
)
from esplanade.dataplane.esp.cipher_suites import esp_cipher_for
from esplanade.dataplane.esp.esp_codec import build_esp_packet
from esplanade.dataplane.esp.ip_headers import find_ipsec_header, transport_insertion_point
from esplanade.dataplane.esp.packet import upper_layer
from esplanade.ipsec.transforms import IpProto, Mode
from tests.dataplane.esp.suites import SUITES, sa_pair

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VARIANTS = [
    ("aes128gcm16", Mode.TUNNEL, 4, False, False),
    ("aes256-sha512", Mode.TUNNEL, 6, True, False),
    ("null-sha256", Mode.TRANSPORT, 4, False, True),
    ("chacha20poly1305", Mode.TRANSPORT, 6, True, False),
    ("ah-sha256", Mode.TRANSPORT, 4, False, False),
    ("ah-sha384", Mode.TUNNEL, 6, True, False),
]


def _sas(variant: tuple[str, Mode, int, bool, bool]) -> tuple[OutboundSa, InboundSa]:
    name, mode, version, esn, natt = variant
    suite = SUITES[name]
    out, inb = sa_pair(
        suite,
        encr_key=bytes(range(suite.encr_key_bytes)),
        integ_key=bytes(range(suite.integ_key_bytes)),
        mode=mode,
        version=version,
        esn=esn,
        natt=natt,
    )
    return OutboundSa(out, 0.0, reserved_upto=1 << 40), InboundSa(inb, 0.0)


@functools.cache
def _sample(version: int) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    if version == 4:
        return bytes(IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=5, dport=80) / (b"a" * 50))
    return bytes(IPv6(src="2001:db8::1", dst="2001:db8:ffff::2") / TCP(sport=5, dport=80) / (b"a" * 50))


def _one_drop_or_one_packet(sa: InboundSa | OutboundSa, call: object) -> None:
    before_packets, before_drops = sa.counters.packets, sa.counters.dropped
    result = call() if callable(call) else None
    if result is None:
        assert sa.counters.dropped == before_drops + 1
        assert sa.counters.packets == before_packets
    else:
        assert sa.counters.packets == before_packets + 1
        assert sa.counters.dropped == before_drops


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] + "-" + v[1].name.lower() for v in VARIANTS])
@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(variant: tuple[str, Mode, int, bool, bool], data: bytes) -> None:
    sender, receiver = _sas(variant)
    _one_drop_or_one_packet(receiver, lambda: unprotect(receiver, data, 0.0))
    if receiver.protocol == IpProto.ESP:
        _one_drop_or_one_packet(receiver, lambda: decrypt(receiver, data, 0.0))
        _one_drop_or_one_packet(sender, lambda: encrypt(sender, data, 0.0))
    _one_drop_or_one_packet(sender, lambda: protect(sender, data, 0.0))
    parse_flow(data)
    upper_layer(data)
    transport_insertion_point(data)
    for proto in (17, 50, 51):
        find_ipsec_header(data, proto)
    classify_udp_payload(data)


@st.composite
def mutations(draw: st.DrawFn, packet: bytes) -> bytes:
    buf = bytearray(packet)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=40))
        elif op == "insert" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(buf)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] + "-" + v[1].name.lower() for v in VARIANTS])
@FUZZ
@given(data=st.data())
def test_mutated_valid_packets(variant: tuple[str, Mode, int, bool, bool], data: st.DataObject) -> None:
    sender, receiver = _sas(variant)
    packet = _sample(variant[2])
    protected = protect(sender, packet, 0.0)
    assert protected is not None
    mutated = data.draw(mutations(protected))
    _one_drop_or_one_packet(receiver, lambda: unprotect(receiver, mutated, 0.0))
    if receiver.protocol == IpProto.ESP:
        esp = encrypt(sender, packet, 0.0)
        assert esp is not None
        mutated_esp = data.draw(mutations(esp))
        _one_drop_or_one_packet(receiver, lambda: decrypt(receiver, mutated_esp, 0.0))


@FUZZ
@given(payloads=st.lists(st.binary(max_size=80), max_size=20))
def test_demultiplexer_counts_what_it_cannot_place(payloads: list[bytes]) -> None:
    _, receiver = _sas(VARIANTS[0])
    table = InboundSaTable()
    table.add(receiver)
    out = decrypt_demux_batch(table, payloads, 0.0)
    assert len(out) + table.counters.dropped + receiver.counters.dropped == len(payloads)


# -- authentic packets with malformed contents (the sender is hostile but has the keys) ----
GCM = SUITES["aes128gcm16"]
KEY = bytes(range(20))


def _authentic(body: bytes, nh: int, *, raw_trailer: bytes | None = None, seq: int = 1) -> bytes:
    cipher = esp_cipher_for(GCM.encr, KEY, None, b"")  # type: ignore[arg-type]
    if raw_trailer is None:
        return build_esp_packet(cipher, 0x1000, seq, seq.to_bytes(8, "big"), body, nh)
    plaintext = bytearray(body + raw_trailer)
    header = (0x1000).to_bytes(4, "big") + seq.to_bytes(4, "big")
    return cipher.seal(header, seq.to_bytes(8, "big"), plaintext, None)


@pytest.mark.parametrize(
    ("name", "body", "nh", "trailer", "mode"),
    [
        ("padding-not-1-2-3", b"\x45" + bytes(19), 4, b"\x09\x09\x02\x04", Mode.TUNNEL),
        ("pad-length-beyond-payload", b"", 4, b"\x00\x00\xff\x04", Mode.TUNNEL),
        ("tunnel-next-header-tcp", _sample(4), 6, None, Mode.TUNNEL),
        ("tunnel-ipv6-packet-said-ipv4", _sample(6), 4, None, Mode.TUNNEL),
        ("tunnel-inner-length-too-big", bytes.fromhex("45000100") + _sample(4)[4:], 4, None, Mode.TUNNEL),
        ("tunnel-empty", b"", 4, None, Mode.TUNNEL),
        ("transport-hop-by-hop-after-esp", b"abcd", 0, None, Mode.TRANSPORT),
    ],
)
def test_authentic_but_malformed_contents(name: str, body: bytes, nh: int, trailer: bytes | None, mode: Mode) -> None:
    _, inb = sa_pair(GCM, encr_key=KEY, integ_key=b"", mode=mode)
    receiver = InboundSa(inb, 0.0)
    assert decrypt(receiver, _authentic(body, nh, raw_trailer=trailer), 0.0) is None
    assert receiver.counters.drops[DropReason.MALFORMED] == 1, receiver.counters.nonzero_drops()
    assert receiver.counters.drops[DropReason.ICV_FAILURE] == 0
    assert receiver.replay.top == 1  # authentic: the window moved


def test_tunnel_tfc_padding_after_the_inner_packet_is_removed() -> None:
    _, inb = sa_pair(GCM, encr_key=KEY, integ_key=b"")
    receiver = InboundSa(inb, 0.0)
    inner = _sample(4)
    assert decrypt(receiver, _authentic(inner + bytes(37), 4), 0.0) == inner
