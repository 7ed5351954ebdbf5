"""IKEv2 payloads (RFC 7296 §3.2-§3.16, RFC 7383 §2.5): exact encoding and decoding.

Each payload class knows its type and encodes/decodes its body (everything after the
4-byte generic payload header). `decode_chain` walks a chain of payloads and raises a
typed `ParseError` for anything malformed; `encode_chain` writes one.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from esplanade.ipsec.selectors import TrafficSelector, TsType
from esplanade.ipsec.transforms import ProtocolId
from esplanade.keyexchange.ikev2.constants import (
    ATTR_KEY_LENGTH,
    CertEncoding,
    CfgAttr,
    CfgType,
    NotifyType,
    PayloadType,
)
from esplanade.keyexchange.ikev2.errors import InvalidSyntax, UnsupportedCriticalPayload

_GENERIC = struct.Struct("!BBH")
_TRANSFORM = struct.Struct("!BBHBBH")
_PROPOSAL = struct.Struct("!BBHBBBB")
_ATTR_TV = struct.Struct("!HH")
_TS_HDR = struct.Struct("!BBHHH")
_NOTIFY = struct.Struct("!BBH")
_DELETE = struct.Struct("!BBH")
_KE = struct.Struct("!HH")
_SKF = struct.Struct("!HH")
_CP_ATTR = struct.Struct("!HH")

CRITICAL = 0x80


class Payload:
    """Base class; `TYPE` is the payload type written into the previous next-payload field."""

    TYPE: ClassVar[PayloadType]
    critical: bool = False

    def encode_body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_body(cls, body: bytes) -> Payload:
        raise NotImplementedError


# -- SA (§3.3) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transform:
    type: int
    id: int
    key_length: int | None = None
    # other attributes are kept verbatim so an unknown one can be refused (§3.3.6)
    unknown_attrs: tuple[int, ...] = ()

    def encode(self, last: bool) -> bytes:
        attrs = b"" if self.key_length is None else _ATTR_TV.pack(0x8000 | ATTR_KEY_LENGTH, self.key_length)
        return _TRANSFORM.pack(0 if last else 3, 0, 8 + len(attrs), self.type, 0, self.id) + attrs


@dataclass(frozen=True, slots=True)
class Proposal:
    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def encode(self, last: bool) -> bytes:
        body = b"".join(t.encode(i == len(self.transforms) - 1) for i, t in enumerate(self.transforms))
        return (
            _PROPOSAL.pack(
                0 if last else 2,
                0,
                8 + len(self.spi) + len(body),
                self.number,
                self.protocol,
                len(self.spi),
                len(self.transforms),
            )
            + self.spi
            + body
        )

    def transforms_of(self, ttype: int) -> list[Transform]:
        return [t for t in self.transforms if t.type == ttype]


def _decode_attrs(data: bytes) -> tuple[int | None, tuple[int, ...]]:
    key_length: int | None = None
    unknown: list[int] = []
    off = 0
    while off < len(data):
        if off + 4 > len(data):
            raise InvalidSyntax("transform attribute truncated")
        atype, value = _ATTR_TV.unpack_from(data, off)
        if atype & 0x8000:
            off += 4
            if atype & 0x7FFF == ATTR_KEY_LENGTH:
                key_length = value
            else:
                unknown.append(atype & 0x7FFF)
        else:  # TLV: value is the length
            if off + 4 + value > len(data):
                raise InvalidSyntax("transform attribute length beyond transform")
            unknown.append(atype)
            off += 4 + value
    return key_length, tuple(unknown)


def _decode_transforms(data: bytes, count: int) -> tuple[Transform, ...]:
    out: list[Transform] = []
    off = 0
    for i in range(count):
        if off + 8 > len(data):
            raise InvalidSyntax("transform truncated")
        more, _, length, ttype, _, tid = _TRANSFORM.unpack_from(data, off)
        if length < 8 or off + length > len(data):
            raise InvalidSyntax("bad transform length")
        last = i == count - 1
        if (more == 0) != last or more not in (0, 3):
            raise InvalidSyntax("transform last/more flag disagrees with the transform count")
        key_length, unknown = _decode_attrs(data[off + 8 : off + length])
        out.append(Transform(ttype, tid, key_length, unknown))
        off += length
    if off != len(data):
        raise InvalidSyntax("trailing bytes after the last transform")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SaPayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.SA
    proposals: tuple[Proposal, ...]

    def encode_body(self) -> bytes:
        return b"".join(p.encode(i == len(self.proposals) - 1) for i, p in enumerate(self.proposals))

    @classmethod
    def decode_body(cls, body: bytes) -> SaPayload:
        proposals: list[Proposal] = []
        off = 0
        while True:
            if off + 8 > len(body):
                raise InvalidSyntax("proposal truncated")
            more, _, length, num, proto, spi_size, ntrans = _PROPOSAL.unpack_from(body, off)
            if length < 8 + spi_size or off + length > len(body):
                raise InvalidSyntax("bad proposal length")
            if more not in (0, 2):
                raise InvalidSyntax("bad proposal last/more flag")
            spi = body[off + 8 : off + 8 + spi_size]
            transforms = _decode_transforms(body[off + 8 + spi_size : off + length], ntrans)
            proposals.append(Proposal(num, proto, spi, transforms))
            off += length
            if more == 0:
                break
        if off != len(body):
            raise InvalidSyntax("trailing bytes after the last proposal")
        if not proposals:
            raise InvalidSyntax("SA payload without proposals")
        return cls(tuple(proposals))


# -- KE (§3.4) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KePayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.KE
    group: int
    data: bytes = field(repr=False)

    def encode_body(self) -> bytes:
        return _KE.pack(self.group, 0) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> KePayload:
        if len(body) < 4:
            raise InvalidSyntax("KE payload too short")
        group, _ = _KE.unpack_from(body)
        return cls(group, bytes(body[4:]))


# -- ID (§3.5) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdPayload(Payload):
    id_type: int
    data: bytes

    def encode_body(self) -> bytes:
        return bytes((self.id_type, 0, 0, 0)) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> IdPayload:
        if len(body) < 4:
            raise InvalidSyntax("ID payload too short")
        return cls(body[0], bytes(body[4:]))


@dataclass(frozen=True, slots=True)
class IdiPayload(IdPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.IDI


@dataclass(frozen=True, slots=True)
class IdrPayload(IdPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.IDR


# -- CERT, CERTREQ (§3.6, §3.7) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertPayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.CERT
    encoding: int
    data: bytes = field(repr=False)

    def encode_body(self) -> bytes:
        return bytes((self.encoding,)) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> CertPayload:
        if len(body) < 1:
            raise InvalidSyntax("CERT payload too short")
        return cls(body[0], bytes(body[1:]))


@dataclass(frozen=True, slots=True)
class CertreqPayload(Payload):
    """Certificate request: for X.509, a concatenation of SHA-1 hashes of CA public keys."""

    TYPE: ClassVar[PayloadType] = PayloadType.CERTREQ
    encoding: int = CertEncoding.X509_SIGNATURE
    data: bytes = b""

    def encode_body(self) -> bytes:
        return bytes((self.encoding,)) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> CertreqPayload:
        if len(body) < 1:
            raise InvalidSyntax("CERTREQ payload too short")
        return cls(body[0], bytes(body[1:]))

    @property
    def authorities(self) -> list[bytes]:
        if self.encoding != CertEncoding.X509_SIGNATURE:
            return []
        return [self.data[i : i + 20] for i in range(0, len(self.data) - len(self.data) % 20, 20)]


# -- AUTH, Nonce (§3.8, §3.9) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthPayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.AUTH
    method: int
    data: bytes = field(repr=False)

    def encode_body(self) -> bytes:
        return bytes((self.method, 0, 0, 0)) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> AuthPayload:
        if len(body) < 4:
            raise InvalidSyntax("AUTH payload too short")
        return cls(body[0], bytes(body[4:]))


MIN_NONCE = 16
MAX_NONCE = 256


@dataclass(frozen=True, slots=True)
class NoncePayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.NONCE
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> NoncePayload:
        if not MIN_NONCE <= len(body) <= MAX_NONCE:
            raise InvalidSyntax(f"nonce of {len(body)} bytes (RFC 7296 §3.9: 16..256)")
        return cls(bytes(body))


# -- Notify, Delete, Vendor ID (§3.10-§3.12) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class NotifyPayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.NOTIFY
    type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""

    def encode_body(self) -> bytes:
        return _NOTIFY.pack(self.protocol, len(self.spi), self.type) + self.spi + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> NotifyPayload:
        if len(body) < 4:
            raise InvalidSyntax("Notify payload too short")
        proto, spi_size, ntype = _NOTIFY.unpack_from(body)
        if 4 + spi_size > len(body):
            raise InvalidSyntax("Notify SPI beyond payload")
        return cls(ntype, bytes(body[4 + spi_size :]), proto, bytes(body[4 : 4 + spi_size]))

    def __repr__(self) -> str:
        try:
            name = NotifyType(self.type).name
        except ValueError:
            name = str(self.type)
        return f"NotifyPayload({name}, {len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class DeletePayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.DELETE
    protocol: int
    spis: tuple[bytes, ...] = ()

    def encode_body(self) -> bytes:
        size = 0 if self.protocol == ProtocolId.IKE else 4
        return _DELETE.pack(self.protocol, size, len(self.spis)) + b"".join(self.spis)

    @classmethod
    def decode_body(cls, body: bytes) -> DeletePayload:
        if len(body) < 4:
            raise InvalidSyntax("Delete payload too short")
        proto, size, count = _DELETE.unpack_from(body)
        if proto == ProtocolId.IKE:
            if size != 0 or count != 0 or len(body) != 4:
                raise InvalidSyntax("IKE SA Delete carries SPIs")
            return cls(proto, ())
        if proto not in (ProtocolId.ESP, ProtocolId.AH) or size != 4:
            raise InvalidSyntax("Delete payload with bad protocol or SPI size")
        if len(body) != 4 + size * count:
            raise InvalidSyntax("Delete payload length disagrees with its SPI count")
        return cls(proto, tuple(bytes(body[4 + i * 4 : 8 + i * 4]) for i in range(count)))


@dataclass(frozen=True, slots=True)
class VendorPayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.VENDOR
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> VendorPayload:
        return cls(bytes(body))


# -- Traffic selectors (§3.13) -------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _address(packed: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(packed)


@dataclass(frozen=True, slots=True)
class TsPayload(Payload):
    selectors: tuple[TrafficSelector, ...]

    def encode_body(self) -> bytes:
        out = [bytes((len(self.selectors), 0, 0, 0))]
        for ts in self.selectors:
            addr_len = 4 if ts.version == 4 else 16
            out.append(_TS_HDR.pack(ts.ts_type, ts.protocol, 8 + 2 * addr_len, ts.start_port, ts.end_port))
            out.append(ts.start_addr.packed)
            out.append(ts.end_addr.packed)
        return b"".join(out)

    @classmethod
    def decode_body(cls, body: bytes) -> TsPayload:
        if len(body) < 4:
            raise InvalidSyntax("TS payload too short")
        count = body[0]
        if count == 0:
            raise InvalidSyntax("TS payload without selectors")
        off = 4
        out: list[TrafficSelector] = []
        for _ in range(count):
            if off + 8 > len(body):
                raise InvalidSyntax("traffic selector truncated")
            ts_type, proto, length, sport, eport = _TS_HDR.unpack_from(body, off)
            if ts_type == TsType.IPV4_ADDR_RANGE:
                alen = 4
            elif ts_type == TsType.IPV6_ADDR_RANGE:
                alen = 16
            else:
                raise InvalidSyntax(f"unsupported traffic selector type {ts_type}")
            if length != 8 + 2 * alen or off + length > len(body):
                raise InvalidSyntax("bad traffic selector length")
            start = _address(bytes(body[off + 8 : off + 8 + alen]))
            end = _address(bytes(body[off + 8 + alen : off + length]))
            try:
                out.append(TrafficSelector(start, end, proto, sport, eport))
            except ValueError as exc:
                raise InvalidSyntax(f"invalid traffic selector: {exc}") from None
            off += length
        if off != len(body):
            raise InvalidSyntax("trailing bytes after the last traffic selector")
        return cls(tuple(out))


@dataclass(frozen=True, slots=True)
class TsiPayload(TsPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.TSI


@dataclass(frozen=True, slots=True)
class TsrPayload(TsPayload):
    TYPE: ClassVar[PayloadType] = PayloadType.TSR


# -- Configuration (§3.15) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpAttribute:
    type: int
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class CpPayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.CP
    cfg_type: int
    attributes: tuple[CpAttribute, ...] = ()

    def encode_body(self) -> bytes:
        out = [bytes((self.cfg_type, 0, 0, 0))]
        for a in self.attributes:
            out.append(_CP_ATTR.pack(a.type & 0x7FFF, len(a.value)) + a.value)
        return b"".join(out)

    @classmethod
    def decode_body(cls, body: bytes) -> CpPayload:
        if len(body) < 4:
            raise InvalidSyntax("CP payload too short")
        if body[0] not in tuple(CfgType):
            raise InvalidSyntax(f"unknown CFG type {body[0]}")
        attrs: list[CpAttribute] = []
        off = 4
        while off < len(body):
            if off + 4 > len(body):
                raise InvalidSyntax("CP attribute truncated")
            atype, alen = _CP_ATTR.unpack_from(body, off)
            if off + 4 + alen > len(body):
                raise InvalidSyntax("CP attribute beyond payload")
            attrs.append(CpAttribute(atype & 0x7FFF, bytes(body[off + 4 : off + 4 + alen])))
            off += 4 + alen
        return cls(body[0], tuple(attrs))

    def values(self, attr: CfgAttr) -> list[bytes]:
        return [a.value for a in self.attributes if a.type == attr]


# -- Encrypted payloads (§3.14, RFC 7383 §2.5) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class SkPayload(Payload):
    """The Encrypted payload as it is on the wire: IV, ciphertext and ICV, undecoded.

    `first_inner` is the next-payload value of its generic header: the type of the first
    payload inside.
    """

    TYPE: ClassVar[PayloadType] = PayloadType.SK
    first_inner: int
    data: bytes = field(repr=False)

    def encode_body(self) -> bytes:
        return self.data


@dataclass(frozen=True, slots=True)
class SkfPayload(Payload):
    TYPE: ClassVar[PayloadType] = PayloadType.SKF
    first_inner: int
    number: int
    total: int
    data: bytes = field(repr=False)

    def encode_body(self) -> bytes:
        return _SKF.pack(self.number, self.total) + self.data


@dataclass(frozen=True, slots=True)
class UnknownPayload(Payload):
    """A non-critical payload we do not understand: skipped (§2.5), kept for completeness."""

    payload_type: int
    body: bytes

    def encode_body(self) -> bytes:
        return self.body


_DECODERS: dict[int, type[Payload]] = {
    PayloadType.SA: SaPayload,
    PayloadType.KE: KePayload,
    PayloadType.IDI: IdiPayload,
    PayloadType.IDR: IdrPayload,
    PayloadType.CERT: CertPayload,
    PayloadType.CERTREQ: CertreqPayload,
    PayloadType.AUTH: AuthPayload,
    PayloadType.NONCE: NoncePayload,
    PayloadType.NOTIFY: NotifyPayload,
    PayloadType.DELETE: DeletePayload,
    PayloadType.VENDOR: VendorPayload,
    PayloadType.TSI: TsiPayload,
    PayloadType.TSR: TsrPayload,
    PayloadType.CP: CpPayload,
}


def _decode_one(ptype: int, body: bytes) -> Payload:
    decoder = _DECODERS[ptype]
    if ptype in (PayloadType.IDI, PayloadType.IDR):
        p = IdPayload.decode_body(body)
        return decoder(p.id_type, p.data)  # type: ignore[call-arg]
    if ptype in (PayloadType.TSI, PayloadType.TSR):
        t = TsPayload.decode_body(body)
        return decoder(t.selectors)  # type: ignore[call-arg]
    return decoder.decode_body(body)


def decode_chain(data: bytes, first: int, *, outer: bool = False) -> tuple[list[Payload], int]:
    """Decode a payload chain; return the payloads and the offset where decoding stopped.

    With `outer`, an SK/SKF payload ends the chain: its body runs to the end of `data`
    and is returned undecoded (it must be the last payload, RFC 7296 §3.14).
    """
    out: list[Payload] = []
    ptype = first
    off = 0
    while ptype != PayloadType.NONE:
        if off + 4 > len(data):
            raise InvalidSyntax("payload header truncated")
        nxt, flags, length = _GENERIC.unpack_from(data, off)
        if length < 4 or off + length > len(data):
            raise InvalidSyntax(f"payload type {ptype} has bad length {length}")
        body = data[off + 4 : off + length]
        if ptype == PayloadType.SK:
            if not outer:
                raise InvalidSyntax("SK payload nested in an encrypted payload")
            if off + length != len(data):
                raise InvalidSyntax("SK payload is not the last payload")
            out.append(SkPayload(nxt, body))
            return out, off + length
        if ptype == PayloadType.SKF:
            if not outer:
                raise InvalidSyntax("SKF payload nested in an encrypted payload")
            if off + length != len(data) or len(body) < 4:
                raise InvalidSyntax("SKF payload is not the last payload or too short")
            number, total = _SKF.unpack_from(body)
            if number == 0 or total == 0 or number > total:
                raise InvalidSyntax("SKF fragment number out of range")
            out.append(SkfPayload(nxt, number, total, body[4:]))
            return out, off + length
        if ptype in _DECODERS:
            payload = _decode_one(ptype, body)
        elif flags & CRITICAL:
            raise UnsupportedCriticalPayload(ptype)
        else:
            payload = UnknownPayload(ptype, body)
        out.append(payload)
        off += length
        ptype = nxt
    if off != len(data):
        raise InvalidSyntax("trailing bytes after the last payload")
    return out, off


def payload_type(p: Payload) -> int:
    return p.payload_type if isinstance(p, UnknownPayload) else int(p.TYPE)


def encode_chain(payloads: Sequence[Payload], trailing_type: int = PayloadType.NONE) -> tuple[int, bytes]:
    """Encode payloads; return (type of the first payload, bytes).

    `trailing_type` is the next-payload value of the last one (SK when an Encrypted
    payload follows the cleartext ones).
    """
    parts: list[bytes] = []
    for i, p in enumerate(payloads):
        nxt = payload_type(payloads[i + 1]) if i + 1 < len(payloads) else trailing_type
        if isinstance(p, SkPayload | SkfPayload):
            nxt = p.first_inner
        body = p.encode_body()
        parts.append(_GENERIC.pack(nxt, CRITICAL if p.critical else 0, 4 + len(body)))
        parts.append(body)
    first = payload_type(payloads[0]) if payloads else trailing_type
    return first, b"".join(parts)


def find(payloads: Iterable[Payload], cls: type[Payload]) -> list[Payload]:
    return [p for p in payloads if isinstance(p, cls)]


def notifies(payloads: Iterable[Payload]) -> list[NotifyPayload]:
    return [p for p in payloads if isinstance(p, NotifyPayload)]


def notify_of(payloads: Iterable[Payload], ntype: NotifyType) -> NotifyPayload | None:
    for p in payloads:
        if isinstance(p, NotifyPayload) and p.type == ntype:
            return p
    return None
