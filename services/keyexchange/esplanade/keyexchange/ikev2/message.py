"""IKEv2 messages: the header (RFC 7296 §3.1), payload chains, SK encryption, RFC 7383 fragments.

`decode_message` parses a datagram (without the non-ESP marker) into a `Message` whose
cleartext payloads are decoded and whose SK/SKF payload is left sealed; `open_message`
decrypts it with the IKE SA's inbound `SkCipher`. `encode_message` goes the other way and
splits into fragments when asked to.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from esplanade.keyexchange.ikev2.constants import (
    IKE_HEADER_LEN,
    IKE_VERSION,
    ExchangeType,
    HeaderFlag,
    PayloadType,
)
from esplanade.keyexchange.ikev2.crypto.sk import SkCipher
from esplanade.keyexchange.ikev2.errors import InvalidMajorVersion, Truncated
from esplanade.keyexchange.ikev2.payloads import (
    Payload,
    SkfPayload,
    SkPayload,
    decode_chain,
    encode_chain,
)

_HDR = struct.Struct("!8s8sBBBBII")
_GENERIC = struct.Struct("!BBH")
_SKF_HDR = struct.Struct("!BBHHH")
MAX_MESSAGE = 65535
_FLAG_I = int(HeaderFlag.INITIATOR)
_FLAG_R = int(HeaderFlag.RESPONSE)


@dataclass(frozen=True, slots=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    first_payload: int
    version: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & _FLAG_R)

    @property
    def from_initiator(self) -> bool:
        return bool(self.flags & _FLAG_I)


def parse_header(data: bytes) -> Header:
    if len(data) < IKE_HEADER_LEN:
        raise Truncated("datagram shorter than an IKE header")
    spi_i, spi_r, nxt, version, exchange, flags, mid, length = _HDR.unpack_from(data)
    if version >> 4 != 2:
        raise InvalidMajorVersion(f"IKE major version {version >> 4}")
    if length != len(data):
        raise Truncated(f"IKE header length {length} but datagram of {len(data)} bytes")
    return Header(spi_i, spi_r, nxt, version, exchange, flags, mid, length)


@dataclass(slots=True)
class Message:
    """One IKE message. `payloads` are the cleartext payloads (inner ones once opened)."""

    spi_i: bytes
    spi_r: bytes
    exchange: int
    message_id: int
    from_initiator: bool
    response: bool
    payloads: list[Payload] = field(default_factory=list)
    encrypted: bool = False
    # set on received messages
    raw: bytes = field(default=b"", repr=False)
    sealed: SkPayload | SkfPayload | None = field(default=None, repr=False)
    inner_plain: bytes = field(default=b"", repr=False)  # decrypted inner payload chain (IntAuth_P)

    @property
    def flags(self) -> int:
        return (_FLAG_I if self.from_initiator else 0) | (_FLAG_R if self.response else 0)

    def exchange_name(self) -> str:
        try:
            return ExchangeType(self.exchange).name
        except ValueError:
            return str(self.exchange)

    def header_bytes(self, first_payload: int, length: int) -> bytes:
        return _HDR.pack(
            self.spi_i, self.spi_r, first_payload, IKE_VERSION, self.exchange, self.flags, self.message_id, length
        )


def decode_message(data: bytes) -> Message:
    """Decode header and cleartext payloads; the SK/SKF payload, if any, stays sealed."""
    hdr = parse_header(data)
    payloads, _ = decode_chain(data[IKE_HEADER_LEN:], hdr.first_payload, outer=True)
    sealed: SkPayload | SkfPayload | None = None
    if payloads and isinstance(payloads[-1], SkPayload | SkfPayload):
        last = payloads.pop()
        assert isinstance(last, SkPayload | SkfPayload)
        sealed = last
    return Message(
        spi_i=hdr.spi_i,
        spi_r=hdr.spi_r,
        exchange=hdr.exchange,
        message_id=hdr.message_id,
        from_initiator=hdr.from_initiator,
        response=hdr.is_response,
        payloads=payloads,
        encrypted=sealed is not None,
        raw=data,
        sealed=sealed,
    )


def open_fragment(msg: Message, cipher: SkCipher) -> bytes:
    """Verify and decrypt the SK or SKF payload of `msg`; return the inner plaintext bytes."""
    assert msg.sealed is not None
    aad_len = len(msg.raw) - len(msg.sealed.data)
    return cipher.open(msg.raw[:aad_len], msg.sealed.data)


def open_message(msg: Message, cipher: SkCipher) -> None:
    """Decrypt an unfragmented SK message in place: `payloads` becomes the inner payloads."""
    assert isinstance(msg.sealed, SkPayload)
    plain = open_fragment(msg, cipher)
    finish_inner(msg, msg.sealed.first_inner, plain)


def finish_inner(msg: Message, first_inner: int, plain: bytes) -> None:
    msg.inner_plain = plain  # set first: a parse error below is then known to be authenticated
    inner, _ = decode_chain(plain, first_inner)
    msg.payloads = msg.payloads + inner


def encode_plain(msg: Message) -> bytes:
    first, body = encode_chain(msg.payloads)
    return msg.header_bytes(first, IKE_HEADER_LEN + len(body)) + body


def encode_encrypted(msg: Message, cipher: SkCipher, fragment_size: int = 0) -> tuple[list[bytes], bytes]:
    """Encrypt `msg.payloads` into one SK payload, or into SKF fragments of at most `fragment_size`.

    Returns (datagrams, inner plaintext) - the plaintext is what IntAuth_P needs.
    """
    first_inner, plain = encode_chain(msg.payloads)
    total_len = IKE_HEADER_LEN + 4 + cipher.sealed_len(len(plain))
    if not fragment_size or total_len <= fragment_size:
        sk_len = 4 + cipher.sealed_len(len(plain))
        header = msg.header_bytes(PayloadType.SK, IKE_HEADER_LEN + sk_len) + _GENERIC.pack(first_inner, 0, sk_len)
        return [header + cipher.seal(header, plain)], plain
    # RFC 7383 §2.5: every fragment is sealed on its own; only the first names the inner type
    room = fragment_size - IKE_HEADER_LEN - 8 - cipher.overhead(0)
    # overhead grows with CBC padding; leave a block of slack
    room -= 16
    if room < 64:
        raise ValueError(f"fragment size {fragment_size} leaves no room for data")
    chunks = [plain[i : i + room] for i in range(0, len(plain), room)]
    out = []
    for n, chunk in enumerate(chunks, 1):
        skf_len = 8 + cipher.sealed_len(len(chunk))
        header = msg.header_bytes(PayloadType.SKF, IKE_HEADER_LEN + skf_len) + _SKF_HDR.pack(
            first_inner if n == 1 else 0, 0, skf_len, n, len(chunks)
        )
        out.append(header + cipher.seal(header, chunk))
    return out, plain


def intauth_octets(msg: Message, plain: bytes) -> bytes:
    """IntAuth_A | IntAuth_P of an IKE_INTERMEDIATE message (RFC 9242 §3.3.2).

    The IKE header and SK header lengths are those of the message as if it were sent
    unfragmented with its inner payloads in cleartext.
    """
    first_inner = 0
    if msg.sealed is not None:
        first_inner = msg.sealed.first_inner
    elif msg.payloads:
        first_inner, _ = encode_chain(msg.payloads)
    header = msg.header_bytes(PayloadType.SK, IKE_HEADER_LEN + 4 + len(plain))
    return header + _GENERIC.pack(first_inner, 0, 4 + len(plain)) + plain
