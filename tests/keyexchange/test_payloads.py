"""Wire format: every payload round-trips, agrees with scapy's IKEv2 dissector, and bad input
gets a typed error."""

from __future__ import annotations

import pytest
from scapy.contrib import ikev2 as sk

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import ProtocolId
from esplanade.keyexchange.ikev2.constants import (
    AuthMethod,
    CfgAttr,
    CfgType,
    ExchangeType,
    IdType,
    NotifyType,
)
from esplanade.keyexchange.ikev2.errors import InvalidSyntax, ParseError, Truncated, UnsupportedCriticalPayload
from esplanade.keyexchange.ikev2.message import Message, decode_message, encode_plain
from esplanade.keyexchange.ikev2.payloads import (
    AuthPayload,
    CertPayload,
    CertreqPayload,
    CpAttribute,
    CpPayload,
    DeletePayload,
    IdiPayload,
    IdrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    VendorPayload,
    decode_chain,
    encode_chain,
)
from esplanade.keyexchange.ikev2.proposals import ProposalSpec

SPI_I, SPI_R = bytes.fromhex("0102030405060708"), bytes.fromhex("1112131415161718")


def sample_payloads() -> list[Payload]:
    ike = ProposalSpec.parse("aes256gcm16-aes128gcm16-prfsha256-prfsha384-ecp256-x25519", ProtocolId.IKE)
    esp = ProposalSpec.parse("aes256-sha256-sha512-modp2048-esn-noesn", ProtocolId.ESP)
    return [
        SaPayload((ike.to_proposal(1, b""), esp.to_proposal(2, b"\x01\x02\x03\x04"))),
        KePayload(19, bytes(range(64))),
        NoncePayload(b"N" * 32),
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, b"s" * 20),
        NotifyPayload(NotifyType.REKEY_SA, protocol=ProtocolId.ESP, spi=b"\xaa\xbb\xcc\xdd"),
        IdiPayload(IdType.FQDN, b"a.test"),
        IdrPayload(IdType.IPV4_ADDR, bytes((192, 0, 2, 1))),
        CertPayload(4, b"\x30\x82" + b"c" * 50),
        CertreqPayload(4, b"h" * 40),
        AuthPayload(AuthMethod.PSK, b"a" * 32),
        CpPayload(CfgType.REQUEST, (CpAttribute(CfgAttr.INTERNAL_IP4_ADDRESS), CpAttribute(CfgAttr.INTERNAL_IP4_DNS))),
        TsiPayload((TrafficSelector.parse("10.1.0.0/16"), TrafficSelector.parse("10.9.0.0/24[tcp/443]"))),
        TsrPayload((TrafficSelector.parse("2001:db8::/32[udp/53]"),)),
        DeletePayload(ProtocolId.ESP, (b"\x00\x00\x10\x00", b"\x00\x00\x20\x00")),
        DeletePayload(ProtocolId.IKE),
        VendorPayload(b"esplanade"),
    ]


def test_roundtrip_every_payload() -> None:
    payloads = sample_payloads()
    first, data = encode_chain(payloads)
    back, off = decode_chain(data, first)
    assert back == payloads and off == len(data)


def test_message_agrees_with_scapy() -> None:
    msg = Message(SPI_I, SPI_R, ExchangeType.IKE_SA_INIT, 0, True, False, sample_payloads())
    raw = encode_plain(msg)
    pkt = sk.IKEv2(raw)
    assert pkt.init_SPI == SPI_I and pkt.resp_SPI == SPI_R and pkt.exch_type == 34 and pkt.length == len(raw)
    assert pkt.flags == 0x08 and pkt.version == 0x20
    sa = pkt[sk.IKEv2_SA]
    props = sa.prop
    assert props.proposal == 1 and props.trans_nb == 6
    transforms = []
    t = props.trans
    while t is not None and isinstance(t, sk.IKEv2_Transform):
        transforms.append((t.transform_type, t.transform_id))
        t = t.payload if isinstance(t.payload, sk.IKEv2_Transform) else None
    assert transforms[0] == (1, 20) and (4, 19) in transforms and (4, 31) in transforms
    assert pkt[sk.IKEv2_KE].group == 19 and bytes(pkt[sk.IKEv2_KE].ke) == bytes(range(64))
    assert bytes(pkt[sk.IKEv2_Nonce].nonce) == b"N" * 32
    assert pkt[sk.IKEv2_Notify].type == NotifyType.NAT_DETECTION_SOURCE_IP
    assert pkt[sk.IKEv2_IDi].IDtype == IdType.FQDN and bytes(pkt[sk.IKEv2_IDi].ID) == b"a.test"
    assert pkt[sk.IKEv2_AUTH].auth_type == AuthMethod.PSK
    tsi = pkt[sk.IKEv2_TSi]
    assert tsi.number_of_TSs == 2
    assert pkt[sk.IKEv2_Delete].proto == ProtocolId.ESP and pkt[sk.IKEv2_Delete].SPInum == 2
    assert decode_message(raw).payloads == msg.payloads


def test_scapy_built_message_decodes() -> None:
    pkt = (
        sk.IKEv2(init_SPI=SPI_I, resp_SPI=SPI_R, exch_type=37, flags="Initiator", id=7)
        / sk.IKEv2_Notify(type=16390, notify=b"cookie-data")
        / sk.IKEv2_Nonce(nonce=b"x" * 16)
    )
    msg = decode_message(bytes(pkt))
    assert msg.message_id == 7 and msg.exchange == 37 and msg.from_initiator and not msg.response
    assert msg.payloads == [NotifyPayload(16390, b"cookie-data"), NoncePayload(b"x" * 16)]


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b[:20], Truncated),
        (lambda b: b[:17] + b"\x30" + b[18:], ParseError),  # major version 3
        (lambda b: b[:24] + (len(b) + 1).to_bytes(4, "big") + b[28:], Truncated),
        (lambda b: b[:30] + b"\x00\x03" + b[32:], InvalidSyntax),  # first payload length 3
    ],
)
def test_malformed_headers(mutate: object, error: type) -> None:
    raw = encode_plain(Message(SPI_I, SPI_R, 34, 0, True, False, [NoncePayload(b"N" * 16)]))
    with pytest.raises(error):
        decode_message(mutate(raw))  # type: ignore[operator]


def test_unknown_payloads() -> None:
    # non-critical unknown payload: skipped, kept; critical: UNSUPPORTED_CRITICAL_PAYLOAD
    body = b"\x00\x00\x00\x08abcd"
    payloads, _ = decode_chain(body, 200)
    assert payloads[0].payload_type == 200  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedCriticalPayload) as exc:
        decode_chain(b"\x00\x80\x00\x08abcd", 200)
    assert exc.value.notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00\x08\x01\x01\x00\x05",  # proposal shorter than its header says
        b"\x01\x00\x00\x08\x01\x01\x00\x00",  # proposal "more" flag 1 (must be 0 or 2)
    ],
)
def test_bad_sa_payload(body: bytes) -> None:
    with pytest.raises(InvalidSyntax):
        SaPayload.decode_body(body)


def test_bad_nonce_ts_delete() -> None:
    with pytest.raises(InvalidSyntax):
        NoncePayload.decode_body(b"x" * 15)
    with pytest.raises(InvalidSyntax):
        TsiPayload.decode_body(b"\x01\x00\x00\x00\x07\x00\x00\x10\x00\x00\xff\xff\x0a\x00\x00\x01")  # 12 byte addrs
    with pytest.raises(InvalidSyntax):
        DeletePayload.decode_body(b"\x03\x04\x00\x02\x00\x00\x00\x01")
