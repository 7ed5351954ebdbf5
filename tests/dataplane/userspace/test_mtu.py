"""ESP overhead arithmetic, RFC 4301 §8 DF handling, ICMP errors and MSS clamping (scapy as oracle)."""

from __future__ import annotations

from typing import Any

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.packet import Raw

from esplanade.dataplane.userspace.internet_checksum import verifies
from esplanade.dataplane.userspace.mtu import (
    MssClamp,
    MtuGuard,
    esp_overhead,
    fragment_ipv4,
    inner_mtu,
    opaque_overhead,
)
from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_AES_GCM_16_128,
    ENCR_CHACHA20_POLY1305,
    INTEG_HMAC_SHA2_256_128,
)
from tests.dataplane.userspace.packet_builders import checksum_ok


def test_overhead_of_common_transforms() -> None:
    gcm = esp_overhead(ENCR_AES_GCM_16_128, udp_encap=True)
    assert (gcm.fixed, gcm.block) == (20 + 8 + 8 + 8 + 16, 4)
    assert inner_mtu(1500, gcm) == 1438
    assert inner_mtu(1500, esp_overhead(ENCR_AES_GCM_16_128, udp_encap=False)) == 1446
    assert inner_mtu(1500, esp_overhead(ENCR_CHACHA20_POLY1305, udp_encap=True, outer_ipv6=True)) == 1418
    cbc = esp_overhead(ENCR_AES_CBC_128, INTEG_HMAC_SHA2_256_128, udp_encap=True)
    mtu = inner_mtu(1500, cbc)
    assert mtu == 1422
    # the definition: the largest inner size whose padded ESP packet still fits
    for size, fits in ((mtu, True), (mtu + 1, False)):
        padded = -(-(size + 2) // 16) * 16
        assert (cbc.fixed + padded <= 1500) is fits


def test_opaque_overhead_and_floor() -> None:
    assert inner_mtu(1500, opaque_overhead(8, udp_encap=True)) == 1464
    with pytest.raises(ValueError):
        inner_mtu(600, esp_overhead(ENCR_AES_GCM_16_128))


def _v4(size: int, df: bool = True, src: str = "10.80.1.2", proto: Any = None) -> bytes:
    l4 = proto if proto is not None else UDP(sport=1, dport=2)
    base = IP(src=src, dst="10.80.2.2", flags="DF" if df else 0, id=7) / l4
    return raw(base / Raw(b"\xab" * (size - len(raw(base)))))


def test_df_packet_too_big_gets_frag_needed_back() -> None:
    guard = MtuGuard(1438)
    small, big = _v4(1438), _v4(1500)
    fits, errors = guard.enforce([small, big], now=1.0)
    assert fits == [small]
    (error,) = errors
    assert not error.v6 and error.destination == "10.80.1.2"
    icmp = ICMP(error.message)
    assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, 1438)
    assert verifies(error.message)
    quoted = raw(icmp.payload)
    assert quoted[:28] == big[:28], "the quote starts with the offending IP header and 8 bytes"
    assert len(error.message) <= 576 - 20


def test_packet_without_df_is_fragmented_before_encapsulation() -> None:
    guard = MtuGuard(1438)
    big = _v4(3000, df=False)
    fits, errors = guard.enforce([big], now=1.0)
    assert errors == []
    assert len(fits) == 3 and all(len(f) <= 1438 for f in fits)
    payload = b""
    for i, fragment in enumerate(fits):
        header = IP(fragment)
        assert verifies(fragment[:20])
        assert header.frag * 8 == len(payload)
        assert bool(header.flags.MF) is (i < len(fits) - 1)
        payload += fragment[20:]
    assert payload == big[20:]
    assert fragment_ipv4(big, 20) == [], "no room for 8 payload bytes: not fragmentable"


def test_ipv6_too_big_gets_packet_too_big() -> None:
    guard = MtuGuard(1438)
    base = IPv6(src="fd80:0:1::2", dst="fd80:0:2::2") / UDP(sport=1, dport=2)
    big = raw(base / Raw(b"\x00" * (1500 - len(raw(base)))))
    small = raw(base / Raw(b"\x00" * 100))
    fits, errors = guard.enforce([small, big], now=1.0)
    assert fits == [small]
    (error,) = errors
    assert error.v6 and error.destination == "fd80:0:1::2"
    ptb = ICMPv6PacketTooBig(error.message)
    assert (ptb.type, ptb.mtu) == (2, 1438)
    assert len(error.message) <= 1280 - 40
    # IPv6 never goes below 1280: a 1280-byte packet passes even with a smaller inner MTU
    low = MtuGuard(1000)
    packet = raw(base / Raw(b"\x00" * (1280 - len(raw(base)))))
    assert low.enforce([packet], 0.0) == ([packet], [])


def test_no_icmp_error_about_icmp_errors_or_to_bad_sources() -> None:
    guard = MtuGuard(1000)
    error_in = _v4(1200, proto=ICMP(type=3, code=1))
    from_multicast = _v4(1200, src="224.0.0.5")
    fits, errors = guard.enforce([error_in, from_multicast], now=1.0)
    assert fits == [] and errors == []
    assert guard.counters["too_big_df"] == 2
    echo = _v4(1200, proto=ICMP(type=8))
    assert len(guard.enforce([echo], now=1.0)[1]) == 1


def test_icmp_errors_are_rate_limited() -> None:
    guard = MtuGuard(1000, icmp_rate=1.0, icmp_burst=2)
    big = _v4(1200)
    _, errors = guard.enforce([big, big, big], now=10.0)
    assert len(errors) == 2
    assert guard.counters["icmp_rate_limited"] == 1
    assert len(guard.enforce([big], now=11.5)[1]) == 1


def _syn(mss: int | None, v6: bool = False, flags: str = "S", extra: list[Any] | None = None) -> bytes:
    options: list[Any] = list(extra or [])
    if mss is not None:
        options.append(("MSS", mss))
    options += [("SAckOK", b""), ("WScale", 7)]
    ip: Any = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
    return raw(ip / TCP(sport=1234, dport=80, flags=flags, options=options))


def test_mss_of_syn_and_syn_ack_is_clamped_with_a_valid_checksum() -> None:
    clamp = MssClamp(1438)
    out = clamp.apply([_syn(1460), _syn(1460, flags="SA", extra=[("NOP", None)]), _syn(1440, v6=True)])
    assert dict(IP(out[0])[TCP].options)["MSS"] == 1398
    assert dict(IP(out[1])[TCP].options)["MSS"] == 1398
    assert dict(IPv6(out[2])[TCP].options)["MSS"] == 1438 - 60
    assert all(checksum_ok(p) for p in out)
    assert clamp.clamped == 3


def test_mss_clamp_leaves_other_packets_alone() -> None:
    clamp = MssClamp(1438)
    untouched = [
        _syn(1200),
        _syn(None),
        raw(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="A", options=[("MSS", 9000)])),
        raw(IP() / UDP()),
        b"\x45" + bytes(50),
    ]
    malformed = bytearray(_syn(1460))
    malformed[40:42] = b"\x05\x00"  # option of length 0
    untouched.append(bytes(malformed))
    assert clamp.apply(untouched) == untouched
    assert clamp.clamped == 0
