"""RFC 3948 helpers, checksums, the packet parser and AH's routing-header prediction."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting

from esplanade.dataplane.esp import (
    InboundSa,
    OutboundSa,
    UdpPayloadKind,
    classify_udp_payload,
    nat_keepalive,
    parse_flow,
    protect,
    unprotect,
)
from esplanade.dataplane.esp.ah import icv_input
from esplanade.dataplane.esp.checksum import checksum, update_checksum
from esplanade.dataplane.esp.natt import transport_checksum_fixup, udp_header
from esplanade.ipsec.transforms import Mode
from tests.dataplane.esp.suites import SUITES, sa_pair


def test_classify_udp_4500() -> None:
    assert classify_udp_payload(nat_keepalive()) == UdpPayloadKind.NAT_KEEPALIVE
    assert classify_udp_payload(b"\x00\x00\x00\x00" + b"ike...") == UdpPayloadKind.IKE
    assert classify_udp_payload(b"\x00\x00\x10\x00" + bytes(20)) == UdpPayloadKind.ESP
    assert classify_udp_payload(b"\x00\x00\x10") == UdpPayloadKind.INVALID
    assert classify_udp_payload(b"") == UdpPayloadKind.INVALID


def test_udp_header_checksums() -> None:
    v6src, v6dst = bytes.fromhex("20010db8" + "00" * 11 + "01"), bytes.fromhex("20010db8" + "00" * 11 + "02")
    payload = b"\x00\x00\x10\x00" + bytes(range(61))
    v4 = udp_header(b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 4500, 4500, payload)
    assert v4[6:8] == b"\x00\x00"  # RFC 3948 §2.1: zero over IPv4
    v6 = udp_header(v6src, v6dst, 4500, 4500, payload)
    packet = IPv6(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=17, plen=8 + len(payload))) + v6 + payload)
    sent = packet[UDP].chksum
    del packet[UDP].chksum
    assert IPv6(bytes(packet))[UDP].chksum == sent  # scapy computes the same


def test_incremental_checksum_matches_recompute() -> None:
    data = bytearray(bytes(range(40)))
    c = checksum(data)
    new = bytearray(data)
    new[10:14] = b"\xde\xad\xbe\xef"
    assert update_checksum(c, bytes(data[10:14]), bytes(new[10:14])) == checksum(new)


def test_transport_natt_checksum_fixup() -> None:
    # the peer (behind NAT, really 10.0.0.5) built the packet for 192.0.2.1; it arrives from 198.51.100.9
    for l4 in (TCP(sport=1, dport=2) / b"payload", UDP(sport=1, dport=2) / b"payload!"):
        original = IP(bytes(IP(src="10.0.0.5", dst="192.0.2.1") / l4))
        received = bytearray(bytes(original))
        received[12:16] = bytes([198, 51, 100, 9])
        fixed = transport_checksum_fixup(bytes(received), bytes([10, 0, 0, 5, 192, 0, 2, 1]))
        layer = TCP if l4.haslayer(TCP) else UDP
        p = IP(fixed)
        got = p[layer].chksum
        del p[layer].chksum
        assert IP(bytes(p))[layer].chksum == got


def test_transport_natt_fixup_inside_the_engine() -> None:
    s = SUITES["aes128gcm16"]
    out, inb = sa_pair(s, encr_key=bytes(20), integ_key=b"", mode=Mode.TRANSPORT, natt=True)
    inner = bytes(IP(src="10.0.0.5", dst="192.0.2.77") / TCP(sport=1, dport=2) / b"data")
    # the sender's packet carries its private address; the receiver sees the SA's addresses
    sender = OutboundSa(out, 0.0, reserved_upto=10)
    receiver = InboundSa(inb, 0.0, nat_original_addresses=("10.0.0.5", "192.0.2.77"))
    sent = protect(sender, inner, 0.0)
    assert sent is not None
    natted = bytearray(sent)
    natted[12:20] = bytes(IP(src="192.0.2.1", dst="198.51.100.2"))[12:20]  # what the SA sees
    got = unprotect(receiver, bytes(natted), 0.0)
    assert got is not None
    p = IP(got)
    assert p.src == "192.0.2.1"
    chk = p[TCP].chksum
    del p[TCP].chksum
    assert IP(bytes(p))[TCP].chksum == chk


def test_parse_flow() -> None:
    f = parse_flow(bytes(IP(src="1.2.3.4", dst="5.6.7.8") / UDP(sport=7, dport=9)))
    assert f is not None and (f.version, f.protocol, f.src_port, f.dst_port) == (4, 17, 7, 9)
    v6 = bytes(IPv6(src="::1", dst="::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(segleft=0) / TCP(dport=443))
    f6 = parse_flow(v6)
    assert f6 is not None and f6.protocol == 6 and f6.dst_port == 443
    frag = bytes(IPv6(src="::1", dst="::2") / IPv6ExtHdrFragment(offset=8, nh=6) / (b"x" * 8))
    ff = parse_flow(frag)
    assert ff is not None and ff.fragment and ff.src_port == -1
    assert parse_flow(b"") is None
    assert parse_flow(bytes(IP(src="1.2.3.4", dst="5.6.7.8", proto=6) / b"\x00\x01")) is None  # truncated TCP


def test_ah_icv_input_predicts_the_routing_header_at_the_destination() -> None:
    sending = IPv6(
        bytes(
            IPv6(src="2001:db8::1", dst="2001:db8::a")
            / IPv6ExtHdrRouting(addresses=["2001:db8::b", "2001:db8::c"], segleft=2)
            / TCP()
        )
    )
    arriving = sending.copy()
    arriving.dst = "2001:db8::c"
    arriving[IPv6ExtHdrRouting].addresses = ["2001:db8::a", "2001:db8::b"]
    arriving[IPv6ExtHdrRouting].segleft = 0
    at = 40 + 8 + 32  # an AH header would sit after the routing header
    tail = bytes(12)
    s = icv_input(bytes(sending) + tail, at, 0, sending=True)
    r = icv_input(bytes(IPv6(bytes(arriving))) + tail, at, 0, sending=False)
    assert s is not None and r is not None and s == r
