"""Traffic selectors become kernel selectors that match exactly the same packets."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esplanade.dataplane.kernel.xfrm_selector import (
    MAX_KERNEL_SELECTORS,
    SelectorError,
    XfrmSelector,
    kernel_selectors,
    port_blocks,
    selector_matches,
)
from esplanade.ipsec.selectors import TrafficSelector


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_port_blocks_cover_a_range_exactly(a: int, b: int) -> None:
    start, end = min(a, b), max(a, b)
    blocks = port_blocks(start, end)
    if (start, end) == (0, 65535):
        assert blocks == [(0, 0)]
        return
    covered = start
    for port, mask in blocks:
        size = (~mask & 0xFFFF) + 1
        assert port == covered and port & ~mask & 0xFFFF == 0  # contiguous, aligned
        covered += size
    assert covered == end + 1
    assert len(blocks) <= 32


def test_port_blocks_examples() -> None:
    assert port_blocks(443, 443) == [(443, 0xFFFF)]
    assert port_blocks(8080, 8083) == [(8080, 0xFFFC)]
    assert port_blocks(1024, 65535) == [
        (1024, 0xFC00),
        (2048, 0xF800),
        (4096, 0xF000),
        (8192, 0xE000),
        (16384, 0xC000),
        (32768, 0x8000),
    ]


SMALL_V4 = st.integers(int(ipaddress.IPv4Address("10.0.0.0")), int(ipaddress.IPv4Address("10.0.0.40")))
PORTS = st.integers(0, 70)


@st.composite
def traffic_selectors(draw: st.DrawFn) -> TrafficSelector:
    lo, hi = sorted((draw(SMALL_V4), draw(SMALL_V4)))
    any_port = draw(st.booleans())
    plo, phi = (0, 65535) if any_port else sorted((draw(PORTS), draw(PORTS)))
    protocol = draw(st.sampled_from([0, 6, 17]))
    return TrafficSelector(ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi), protocol, plo, phi)


@settings(max_examples=150, deadline=None)
@given(traffic_selectors(), traffic_selectors(), st.data())
def test_kernel_selectors_match_exactly_what_the_traffic_selectors_match(
    src: TrafficSelector, dst: TrafficSelector, data: st.DataObject
) -> None:
    try:
        selectors = kernel_selectors(src, dst)
    except SelectorError as exc:
        if "two protocols" in str(exc):
            return
        assert "kernel selectors" in str(exc)
        return
    assert 1 <= len(selectors) <= MAX_KERNEL_SELECTORS
    for _ in range(25):
        s = ipaddress.IPv4Address(data.draw(SMALL_V4))
        d = ipaddress.IPv4Address(data.draw(SMALL_V4))
        proto = data.draw(st.sampled_from([6, 17, 1]))
        sport, dport = data.draw(PORTS), data.draw(PORTS)
        wanted = src.matches(s, proto, sport) and dst.matches(d, proto, dport)
        got = any(selector_matches(sel, str(s), str(d), proto, sport, dport) for sel in selectors)
        assert got == wanted, (s, d, proto, sport, dport)


def test_cidr_pair_is_one_selector() -> None:
    (sel,) = kernel_selectors(TrafficSelector.parse("10.1.0.0/24"), TrafficSelector.parse("10.2.0.0/16[tcp/443]"))
    assert sel == XfrmSelector(2, "10.1.0.0", "10.2.0.0", 24, 16, 6, 0, 0, 443, 0xFFFF)


def test_address_range_splits_into_cidrs() -> None:
    sels = kernel_selectors(TrafficSelector.parse("10.0.0.1-10.0.0.6"), TrafficSelector.parse("0.0.0.0/0"))
    assert [(s.saddr, s.prefixlen_s) for s in sels] == [
        ("10.0.0.1", 32),
        ("10.0.0.2", 31),
        ("10.0.0.4", 31),
        ("10.0.0.6", 32),
    ]


def test_icmp_type_and_code_go_to_source_and_destination_port() -> None:
    echo_request = TrafficSelector.parse("10.0.0.0/8[icmp/2048]")  # type 8, code 0
    (sel,) = kernel_selectors(TrafficSelector.parse("10.1.0.0/16[icmp]"), echo_request)
    assert (sel.sport, sel.sport_mask, sel.dport, sel.dport_mask) == (8, 0xFF, 0, 0xFF)
    any_code = TrafficSelector.parse("10.0.0.0/8[icmp/768-1023]")  # type 3, any code
    (sel,) = kernel_selectors(any_code, TrafficSelector.parse("0.0.0.0/0[icmp]"))
    assert (sel.sport, sel.sport_mask, sel.dport, sel.dport_mask) == (3, 0xFF, 0, 0)
    v6 = kernel_selectors(TrafficSelector.parse("::/0[ipv6-icmp/34560]"), TrafficSelector.parse("::/0"))
    assert (v6[0].sport, v6[0].dport, v6[0].proto) == (135, 0, 58)


@pytest.mark.parametrize(
    ("src", "dst", "why"),
    [
        ("10.0.0.0/8", "::/0", "mixes IPv4 and IPv6"),
        ("10.0.0.0/8[tcp]", "10.0.0.0/8[udp]", "two protocols"),
        ("0.0.0.1-255.255.255.254[tcp/1-65534]", "10.0.0.0/8[tcp/3-60000]", "kernel selectors"),
    ],
)
def test_inexpressible_selectors_are_refused_with_a_reason(src: str, dst: str, why: str) -> None:
    with pytest.raises(SelectorError, match=why):
        kernel_selectors(TrafficSelector.parse(src), TrafficSelector.parse(dst))


def test_opaque_ports_are_refused() -> None:
    opaque = TrafficSelector(ipaddress.IPv4Address("10.0.0.0"), ipaddress.IPv4Address("10.0.0.255"), 6, 65535, 0)
    with pytest.raises(SelectorError, match="OPAQUE"):
        kernel_selectors(opaque, TrafficSelector.parse("10.0.0.0/8"))
