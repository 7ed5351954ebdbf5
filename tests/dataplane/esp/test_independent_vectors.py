"""Packets produced by another independent implementation (OpenDataPlane's IPsec validation
suite, test/validation/api/ipsec/test_vectors.h): AH and NULL/AES-CBC + HMAC-SHA-256 ESP,
IPv4 and IPv6 (with a hop-by-hop header), transport, tunnel and ESP-in-UDP.
Not RFC vectors, but a second opinion on AH mutable-field handling and IPv6 placement.
SPI 0x7b, sequence number 1, cipher key 0xa5 x 16, HMAC key 0x5a x 32. The SPI lies in the
range IANA reserves (1-255, RFC 4303 §2.1) that `SecurityAssociation.validate` rightly
refuses, so these tests validate everything else with an allowed SPI.
"""

from __future__ import annotations

from dataclasses import replace

from esplanade.dataplane.esp import InboundSa, OutboundSa, encrypt, protect, unprotect
from esplanade.ipsec.sa import SecurityAssociation, UdpEncap
from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_NULL,
    INTEG_HMAC_SHA2_256_128,
    Direction,
    IpProto,
    Mode,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


ICMP = h("0800fb37 12340000 babe0123 4567cafe") + bytes(range(0x5C))
IPV4_ICMP = h("45000080 00000000 4001ac27 c0a86f02 c0a8de02") + ICMP
V6_SRC, V6_DST = "2001:db8::211:43ff:fe4a:d70a", "2001:db8::16"
V6_ADDRS = h("20010db8000000000211 43fffe4ad70a 20010db8000000000000000000000016")
IPV6_ICMP = h("60000000 00740040") + V6_ADDRS + h("3a000100 01000100") + ICMP
HMAC_KEY = b"\x5a" * 32


class _ReservedSpiSa(SecurityAssociation):
    def validate(self) -> None:
        SecurityAssociation.validate(replace(self, spi=0x100))  # the base check, with an allowed SPI


def _sa(
    direction: Direction, *, src: str, dst: str, protocol: IpProto = IpProto.ESP, **kw: object
) -> SecurityAssociation:
    fields: dict[str, object] = {"encr": ENCR_NULL} if protocol == IpProto.ESP else {}
    fields.update(kw)
    return _ReservedSpiSa(
        spi=0x7B,
        direction=direction,
        src=src,
        dst=dst,
        protocol=protocol,
        integ=INTEG_HMAC_SHA2_256_128,
        integ_key=HMAC_KEY,
        **fields,  # type: ignore[arg-type]
    )


def _roundtrip(expected: bytes, plain: bytes, **kw: object) -> None:
    sender = OutboundSa(_sa(Direction.OUT, **kw), 0.0, reserved_upto=10)  # type: ignore[arg-type]
    assert protect(sender, plain, 0.0) == expected
    receiver = InboundSa(_sa(Direction.IN, **kw), 0.0)  # type: ignore[arg-type]
    assert unprotect(receiver, expected, 0.0) == plain


def test_ah_ipv4_transport() -> None:
    expected = (
        h("4500009c 00000000 4033abd9 c0a86f02 c0a8de02")
        + h("01050000 0000007b 00000001 6c2ef71f7c7039a34a7701479e457351")
        + ICMP
    )
    _roundtrip(expected, IPV4_ICMP, src="192.168.111.2", dst="192.168.222.2", protocol=IpProto.AH, mode=Mode.TRANSPORT)


def test_ah_ipv6_transport_after_hop_by_hop() -> None:
    expected = (
        h("60000000 00940040")
        + V6_ADDRS
        + h("33000100 01000100")
        + h("3a060000 0000007b 00000001 d9148727201ac266c1ca992b8aae2f27 00000000")
        + ICMP
    )
    _roundtrip(expected, IPV6_ICMP, src=V6_SRC, dst=V6_DST, protocol=IpProto.AH, mode=Mode.TRANSPORT)


def test_esp_null_sha256_ipv4_transport() -> None:
    expected = (
        h("4500009c 00000000 4032abda c0a86f02 c0a8de02 0000007b 00000001")
        + ICMP
        + h("01020201 e981cd659b250b33e2f383f16d14b41f")
    )
    _roundtrip(expected, IPV4_ICMP, src="192.168.111.2", dst="192.168.222.2", mode=Mode.TRANSPORT)


def test_esp_null_sha256_ipv4_transport_in_udp() -> None:
    expected = (
        h("450000a4 00000000 4011abf3 c0a86f02 c0a8de02 11941194 00900000 0000007b 00000001")
        + ICMP
        + h("01020201 e981cd659b250b33e2f383f16d14b41f")
    )
    _roundtrip(expected, IPV4_ICMP, src="192.168.111.2", dst="192.168.222.2", mode=Mode.TRANSPORT, encap=UdpEncap())


def test_esp_null_sha256_ipv6_transport_after_hop_by_hop() -> None:
    expected = (
        h("60000000 00900040")
        + V6_ADDRS
        + h("32000100 01000100 0000007b 00000001")
        + ICMP
        + h("0102023a 20a6897b0a525bca9856d1fe56c7a45b")
    )
    _roundtrip(expected, IPV6_ICMP, src=V6_SRC, dst=V6_DST, mode=Mode.TRANSPORT)


def test_esp_null_sha256_tunnel_payload() -> None:
    expected = h("0000007b 00000001") + IPV4_ICMP + h("01020204 738df69a26064da1883765ab0de9953b")
    for src, dst in (("10.0.111.2", "10.0.222.2"), ("2001:db8::211:43ff:fe4a:d70a", "2001:db8::16")):
        sender = OutboundSa(_sa(Direction.OUT, src=src, dst=dst), 0.0, reserved_upto=10)
        assert encrypt(sender, IPV4_ICMP, 0.0) == expected


def test_esp_aes_cbc_sha256_ipv4_transport() -> None:
    iv = h("96fa745678e4bb0c9e6e4aeb44d9f2e6")
    expected = (
        h("450000ac 00000000 4032abca c0a86f02 c0a8de02 0000007b 00000001")
        + iv
        + h(
            """2fb3a6fe2c2ece653a57e3095d663632 b1c25958b6e59ea207f8264a64f51601
            518ee54b072c4b23fa4e6edb35c71d30 42d90fba8a697e29e7bd15e9359e81e7
            9ec97d669958ec4529d0a4fdf1e75b3e 2a771d8f2b73baf872d2a00b90b9739c
            de3cc3b89197c428fa6da841b683c8aa 8a391007 0297bb1c 59b77033 a426a2b8"""
        )
    )
    kw = {"src": "192.168.111.2", "dst": "192.168.222.2", "mode": Mode.TRANSPORT, "encr": ENCR_AES_CBC_128}
    sender = OutboundSa(
        _sa(Direction.OUT, encr_key=b"\xa5" * 16, **kw),  # type: ignore[arg-type]
        0.0,
        reserved_upto=10,
        random_bytes=lambda n: iv + bytes(n - len(iv)),
    )
    assert protect(sender, IPV4_ICMP, 0.0) == expected
    receiver = InboundSa(_sa(Direction.IN, encr_key=b"\xa5" * 16, **kw), 0.0)  # type: ignore[arg-type]
    assert unprotect(receiver, expected, 0.0) == IPV4_ICMP
