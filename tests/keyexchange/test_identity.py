"""Identities (RFC 7296 §3.5): parsing, matching, certificate subjects and subjectAltNames."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509

from esplanade.keyexchange.ikev2.auth.der import DerError, decode_name
from esplanade.keyexchange.ikev2.auth.identity import Identity, identity_of_certificate
from esplanade.keyexchange.ikev2.constants import IdType
from tests.keyexchange import pki


@pytest.mark.parametrize(
    ("text", "id_type", "data"),
    [
        ("192.0.2.7", IdType.IPV4_ADDR, bytes((192, 0, 2, 7))),
        ("2001:db8::1", IdType.IPV6_ADDR, ipaddress.ip_address("2001:db8::1").packed),
        ("gw.example.org", IdType.FQDN, b"gw.example.org"),
        ("@gw.example.org", IdType.FQDN, b"gw.example.org"),
        ("alice@example.org", IdType.RFC822_ADDR, b"alice@example.org"),
        ("@#0a0b", IdType.KEY_ID, b"\x0a\x0b"),
    ],
)
def test_parse(text: str, id_type: int, data: bytes) -> None:
    ident = Identity.parse(text)
    assert (ident.id_type, ident.data) == (id_type, data)


def test_dn_roundtrip_and_matching() -> None:
    ident = Identity.parse("C=XX, O=Esplanade test, CN=a.test")
    assert ident.id_type == IdType.DER_ASN1_DN
    assert str(ident) == "C=XX, O=Esplanade test, CN=a.test"
    assert decode_name(ident.data) == x509.Name.from_rfc4514_string("CN=a.test,O=Esplanade test,C=XX")
    assert ident.matches(Identity.parse("C=XX,O=Esplanade test,CN=a.test"))
    assert not ident.matches(Identity.parse("C=XX, O=Other, CN=a.test"))
    with pytest.raises(DerError):
        decode_name(b"\x30\x05\x31\x03\x02\x01\x00")


def test_matching_rules() -> None:
    assert Identity.parse("%any").matches(Identity.parse("x.test"))
    assert Identity.parse("GW.example.org").matches(Identity.parse("gw.EXAMPLE.org"))
    assert not Identity.parse("gw.example.org").matches(Identity.parse("192.0.2.1"))


def test_certificate_identities() -> None:
    ca = pki.make_ca()
    leaf = pki.issue(ca, "a.test", san=["a.test", "alt.a.test"])
    assert Identity.parse("a.test").matches_certificate(leaf.cert)
    assert Identity.parse("alt.a.test").matches_certificate(leaf.cert)
    assert not Identity.parse("b.test").matches_certificate(leaf.cert)
    assert identity_of_certificate(leaf.cert).matches_certificate(leaf.cert)
    assert Identity.parse("C=XX, O=Esplanade test, CN=a.test").matches_certificate(leaf.cert)
    assert not Identity.parse("alice@a.test").matches_certificate(leaf.cert)
