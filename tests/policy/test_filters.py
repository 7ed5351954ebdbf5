"""The packet-path matcher and the inner-packet parser it relies on."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.packet import Raw

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.policy.filters import DENY_ALL, PacketFilter, SelectorTable, TimedPart, parse_inner_packet


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def table(*selectors: str) -> SelectorTable:
    return SelectorTable(TrafficSelector.parse(s) for s in selectors)


def test_ports_protocols_and_address_edges() -> None:
    t = table("10.0.0.0/24[tcp/443]", "10.0.0.128/25[tcp/22]", "10.0.1.5[udp/53-54]", "fd00::/64[tcp/80]")
    assert t.allows(4, ip("10.0.0.0"), 6, 443)
    assert t.allows(4, ip("10.0.0.255"), 6, 443)
    assert not t.allows(4, ip("10.0.1.0"), 6, 443)
    assert not t.allows(4, ip("9.255.255.255"), 6, 443)
    assert not t.allows(4, ip("10.0.0.127"), 6, 22)
    assert t.allows(4, ip("10.0.0.128"), 6, 22) and t.allows(4, ip("10.0.0.128"), 6, 443)
    assert not t.allows(4, ip("10.0.0.128"), 6, 23)
    assert not t.allows(4, ip("10.0.0.1"), 17, 443)
    assert t.allows(4, ip("10.0.1.5"), 17, 54) and not t.allows(4, ip("10.0.1.5"), 17, 55)
    assert t.allows(6, ip("fd00::ffff"), 6, 80) and not t.allows(6, ip("fd00:0:0:1::"), 6, 80)
    assert not t.allows(6, ip("10.0.0.1"), 6, 443)  # an IPv6 address equal to an IPv4 integer


def test_any_protocol_folds_into_every_protocol() -> None:
    t = table("10.0.0.0/24[tcp/443]", "10.0.0.5")
    assert t.allows(4, ip("10.0.0.5"), 6, 1)
    assert t.allows(4, ip("10.0.0.5"), 47, 0)  # GRE: no table of its own, any-protocol table
    assert t.allows(4, ip("10.0.0.6"), 6, 443) and not t.allows(4, ip("10.0.0.6"), 6, 1)
    assert not t.allows(4, ip("10.0.0.6"), 47, 0)


def test_icmp_type_and_code() -> None:
    t = table("10.0.0.1[icmp/2048-2303]", "10.0.0.1[icmp/769]")  # echo request, any code; unreachable/host
    assert t.allows(4, ip("10.0.0.1"), 1, 8 << 8)
    assert t.allows(4, ip("10.0.0.1"), 1, (3 << 8) | 1)
    assert not t.allows(4, ip("10.0.0.1"), 1, (3 << 8) | 3)
    assert not t.allows(4, ip("10.0.0.1"), 1, 0)  # echo reply


def test_non_initial_fragments_pass_where_some_port_is_allowed() -> None:
    t = table("10.0.0.1[udp/53]")
    assert t.allows(4, ip("10.0.0.1"), 17, -1)
    assert not t.allows(4, ip("10.0.0.2"), 17, -1)
    assert not t.allows(4, ip("10.0.0.1"), 6, -1)


def test_empty_filter_denies_everything() -> None:
    assert not DENY_ALL.allows(4, ip("10.0.0.1"), 6, 443, 0.0)
    assert not table().allows(6, 0, 0, 0)


def test_timed_part_opens_and_closes_at_minute_boundaries() -> None:
    calls: list[float] = []

    def window(now: float) -> bool:
        calls.append(now)
        return 600.0 <= now < 1200.0

    f = PacketFilter(TrafficSelector.parse(s) for s in ["10.0.0.1[tcp/22]"])
    assert f.get_timer() is None
    timed = TimedPart([TrafficSelector.parse("10.0.0.2")], window)
    f = PacketFilter([TrafficSelector.parse("10.0.0.1[tcp/22]")], [timed])
    assert not f.allows(4, ip("10.0.0.2"), 6, 1, 599.0)
    assert f.get_timer() == 600.0
    assert f.allows(4, ip("10.0.0.1"), 6, 22, 599.5)
    assert len(calls) == 1  # no re-evaluation inside the minute
    assert f.allows(4, ip("10.0.0.2"), 6, 1, 600.0)
    assert not f.allows(4, ip("10.0.0.2"), 6, 1, 1200.0)
    f.handle_timer(1300.0)
    assert f.get_timer() == 1320.0


# -- parsing -----------------------------------------------------------------------------------


def test_parse_ipv4_tcp_udp_icmp() -> None:
    h = parse_inner_packet(bytes(IP(src="10.8.0.2", dst="10.0.0.1") / TCP(sport=40000, dport=443)))
    assert h == (4, ip("10.8.0.2"), ip("10.0.0.1"), 6, 40000, 443)
    with_options = IP(src="10.8.0.2", dst="10.0.0.1", ihl=6, options=b"\x01\x01\x01\x01") / UDP(dport=53)
    h = parse_inner_packet(bytes(with_options))
    assert h is not None and (h.proto, h.dst_port) == (17, 53)
    h = parse_inner_packet(bytes(IP(src="10.8.0.2", dst="10.0.0.1") / ICMP(type=3, code=4)))
    assert h is not None and (h.proto, h.src_port, h.dst_port) == (1, 0, (3 << 8) | 4)


def test_parse_ipv4_fragments() -> None:
    datagram = IP(src="10.8.0.2", dst="10.0.0.1") / UDP(dport=53) / Raw(b"x" * 64)
    frags = [bytes(p) for p in fragment(datagram, fragsize=32)]
    head = parse_inner_packet(frags[0])
    assert head is not None and head.dst_port == 53
    second = parse_inner_packet(frags[1])
    assert second is not None and (second.proto, second.src_port, second.dst_port) == (17, -1, -1)
    # RFC 1858: a TCP fragment at offset 8 could rewrite the flags of an allowed first fragment
    assert parse_inner_packet(bytes(IP(dst="10.0.0.1", proto=6, frag=1) / Raw(b"x" * 8))) is None


def test_parse_ipv6_with_extension_headers_and_fragments() -> None:
    pkt = IPv6(src="fd99::2", dst="fd00::1") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(dport=8443)
    h = parse_inner_packet(bytes(pkt))
    assert h == (6, ip("fd99::2"), ip("fd00::1"), 6, 20, 8443)
    h = parse_inner_packet(bytes(IPv6(dst="fd00::1") / ICMPv6EchoRequest()))
    assert h is not None and (h.proto, h.dst_port) == (58, 128 << 8)
    h = parse_inner_packet(bytes(IPv6(dst="fd00::1") / IPv6ExtHdrFragment(offset=0, m=1, nh=17) / UDP(dport=53)))
    assert h is not None and (h.proto, h.dst_port) == (17, 53)
    h = parse_inner_packet(bytes(IPv6(dst="fd00::1") / IPv6ExtHdrFragment(offset=4, nh=17) / Raw(b"x" * 16)))
    assert h is not None and (h.proto, h.dst_port) == (17, -1)


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45" + b"\x00" * 10,  # shorter than a header
        bytes(IP(dst="10.0.0.1") / TCP())[:22],  # too short for the ports
        bytes(IP(dst="10.0.0.1", ihl=15) / TCP())[:40],  # header longer than the packet
        bytes(IPv6(dst="fd00::1") / TCP())[:30],
        bytes(IPv6(dst="fd00::1") / IPv6ExtHdrHopByHop())[:41],
        bytes(IPv6(dst="fd00::1") / TCP())[:42],
        b"\x00" * 40,  # version 0
        bytes(IPv6(dst="fd00::1", nh=0)),  # a hop-by-hop header that is not there
    ],
)
def test_malformed_packets_are_refused(packet: bytes) -> None:
    assert parse_inner_packet(packet) is None
    assert not PacketFilter([TrafficSelector.parse("0.0.0.0/0")]).allows_packet(packet, 0.0)


def test_too_many_extension_headers_are_refused() -> None:
    chain = IPv6(dst="fd00::1")
    for _ in range(9):
        chain = chain / IPv6ExtHdrDestOpt()
    assert parse_inner_packet(bytes(chain / TCP(dport=1))) is None


def test_allows_packet() -> None:
    f = PacketFilter([TrafficSelector.parse("10.0.0.0/24[tcp/443]")])
    assert f.allows_packet(bytes(IP(dst="10.0.0.9") / TCP(dport=443)), 0.0)
    assert not f.allows_packet(bytes(IP(dst="10.0.0.9") / TCP(dport=444)), 0.0)
