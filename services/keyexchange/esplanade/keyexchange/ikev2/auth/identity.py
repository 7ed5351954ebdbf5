"""IKE identities (RFC 7296 §3.5) and how they match certificates.

Text forms follow strongSwan: an IP literal is ID_IPV4_ADDR/ID_IPV6_ADDR, ``user@host`` is
ID_RFC822_ADDR, ``@host`` or a bare name is ID_FQDN, ``C=.., O=.., CN=..`` is ID_DER_ASN1_DN,
``%any`` matches everything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from esplanade.keyexchange.ikev2.auth.der import decode_name
from esplanade.keyexchange.ikev2.constants import IdType

_DN_KEYS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "E": NameOID.EMAIL_ADDRESS,
    "SN": NameOID.SURNAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
}


def parse_dn(text: str) -> x509.Name:
    """Parse strongSwan's ``C=XX, O=Org, CN=name`` (most significant RDN first)."""
    attrs = []
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key.strip() not in _DN_KEYS:
            raise ValueError(f"bad DN component {part.strip()!r}")
        attrs.append(x509.NameAttribute(_DN_KEYS[key.strip()], value.strip()))
    return x509.Name(attrs)


@dataclass(frozen=True, slots=True)
class Identity:
    id_type: int
    data: bytes

    ANY_TYPE = 0  # %any: only for matching a peer, never sent

    @classmethod
    def parse(cls, text: str) -> Identity:
        text = text.strip()
        if text in ("%any", ""):
            return cls(cls.ANY_TYPE, b"")
        try:
            ip = ipaddress.ip_address(text)
            return cls(IdType.IPV4_ADDR if ip.version == 4 else IdType.IPV6_ADDR, ip.packed)
        except ValueError:
            pass
        if text.startswith("@#"):
            return cls(IdType.KEY_ID, bytes.fromhex(text[2:]))
        if text.startswith("@"):
            return cls(IdType.FQDN, text[1:].encode())
        if "=" in text:
            return cls(IdType.DER_ASN1_DN, parse_dn(text).public_bytes())
        if "@" in text:
            return cls(IdType.RFC822_ADDR, text.encode())
        return cls(IdType.FQDN, text.encode())

    @property
    def is_any(self) -> bool:
        return self.id_type == self.ANY_TYPE

    def __str__(self) -> str:
        if self.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
            try:
                return str(ipaddress.ip_address(self.data))
            except ValueError:
                return self.data.hex()
        if self.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
            return self.data.decode("utf-8", "replace")
        if self.id_type == IdType.DER_ASN1_DN:
            try:
                return ", ".join(reversed(decode_name(self.data).rfc4514_string().split(",")))
            except ValueError:
                return "DN:" + self.data.hex()
        if self.is_any:
            return "%any"
        return f"{self.id_type}:{self.data.hex()}"

    def matches(self, other: Identity) -> bool:
        """Does the received identity `other` satisfy this configured one?"""
        if self.is_any:
            return True
        if self.id_type != other.id_type:
            return False
        if self.id_type == IdType.DER_ASN1_DN:
            try:
                return decode_name(self.data) == decode_name(other.data)
            except ValueError:
                return False
        if self.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
            return self.data.lower() == other.data.lower()
        return self.data == other.data

    def matches_certificate(self, cert: x509.Certificate) -> bool:
        """Is this identity the certificate's subject DN or one of its subjectAltNames (RFC 4945 §3)?"""
        if self.id_type == IdType.DER_ASN1_DN:
            try:
                return decode_name(self.data) == cert.subject
            except ValueError:
                return False
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        if self.id_type == IdType.FQDN:
            name = self.data.decode("ascii", "replace").lower()
            return name in (n.lower() for n in san.get_values_for_type(x509.DNSName))
        if self.id_type == IdType.RFC822_ADDR:
            name = self.data.decode("ascii", "replace").lower()
            return name in (n.lower() for n in san.get_values_for_type(x509.RFC822Name))
        if self.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
            try:
                ip = ipaddress.ip_address(self.data)
            except ValueError:
                return False
            return ip in san.get_values_for_type(x509.IPAddress)
        return False


def identity_of_certificate(cert: x509.Certificate) -> Identity:
    """The default identity of a certificate: its subject DN (as strongSwan does)."""
    return Identity(IdType.DER_ASN1_DN, cert.subject.public_bytes())
