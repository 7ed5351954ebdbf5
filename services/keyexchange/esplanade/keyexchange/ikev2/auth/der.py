"""The little DER that IKE authentication needs: TLVs, OIDs and X.501 Names (ID_DER_ASN1_DN)."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.name import _ASN1Type

_STRING_TAGS = {0x0C: _ASN1Type.UTF8String, 0x13: _ASN1Type.PrintableString, 0x16: _ASN1Type.IA5String,
                0x14: _ASN1Type.T61String, 0x1E: _ASN1Type.BMPString, 0x1C: _ASN1Type.UniversalString}  # fmt: skip


class DerError(ValueError):
    pass


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(ln))) + ln + content


def read_tlv(data: bytes, off: int) -> tuple[int, bytes, int]:
    """(tag, content, offset after) of the TLV at `off`."""
    if off + 2 > len(data):
        raise DerError("DER truncated")
    tag, ln = data[off], data[off + 1]
    off += 2
    if ln & 0x80:
        n = ln & 0x7F
        if n == 0 or n > 3 or off + n > len(data):
            raise DerError("bad DER length")
        ln = int.from_bytes(data[off : off + n], "big")
        off += n
    if off + ln > len(data):
        raise DerError("DER value truncated")
    return tag, data[off : off + ln], off + ln


def oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


def oid_text(content: bytes) -> str:
    if not content:
        raise DerError("empty OID")
    parts = [min(content[0] // 40, 2), content[0] - 40 * min(content[0] // 40, 2)]
    v = 0
    for b in content[1:]:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(v)
            v = 0
    return ".".join(map(str, parts))


def decode_name(der: bytes) -> x509.Name:
    """Decode a DER X.501 Name (RDNSequence) as IKE carries it in ID_DER_ASN1_DN."""
    tag, seq, end = read_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise DerError("a DN is one DER SEQUENCE")
    rdns: list[x509.RelativeDistinguishedName] = []
    off = 0
    while off < len(seq):
        tag, rdn, off = read_tlv(seq, off)
        if tag != 0x31:
            raise DerError("RDN is not a SET")
        attrs = []
        p = 0
        while p < len(rdn):
            tag, atv, p = read_tlv(rdn, p)
            if tag != 0x30:
                raise DerError("attribute is not a SEQUENCE")
            t, oid_c, q = read_tlv(atv, 0)
            vt, value, _ = read_tlv(atv, q)
            if t != 0x06:
                raise DerError("attribute without OID")
            text = value.decode("utf-16-be" if vt == 0x1E else "utf-8", "replace")
            try:
                attrs.append(x509.NameAttribute(x509.ObjectIdentifier(oid_text(oid_c)), text, _STRING_TAGS.get(vt)))
            except ValueError as exc:
                raise DerError(f"bad DN attribute: {exc}") from None
        if not attrs:
            raise DerError("empty RDN")
        rdns.append(x509.RelativeDistinguishedName(attrs))
    return x509.Name(rdns)
