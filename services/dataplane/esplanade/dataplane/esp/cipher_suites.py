"""ESP cipher suites: seal and open one ESP packet (SPI, sequence number, IV, ciphertext, ICV).

- AES-GCM-16 (RFC 4106) and ChaCha20-Poly1305 (RFC 7634): nonce = 4-byte salt || 8-byte
  explicit IV; AAD = SPI || seq (32-bit), or SPI || seq_hi || seq_lo with ESN (RFC 4106 §5,
  RFC 7634 §2.1). The explicit IV is chosen by the caller (the SA uses the 64-bit sequence
  number, see `sa_state`).
- AES-CBC (RFC 3602) with HMAC-SHA-256-128 / -384-192 / -512-256 (RFC 4868), and NULL
  encryption (RFC 2410) with HMAC: encrypt-then-MAC; the ICV covers SPI..ciphertext, followed
  by the (untransmitted) seq_hi with ESN (RFC 4303 §2.2.1, appendix A).

Per-SA objects are built once: the AEAD object, the HMAC inner/outer states, and for CBC a
single long-lived encryptor/decryptor (see `AesCbcHmac`). One SA is used by one thread at a time.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from esplanade.ipsec.transforms import EncrAlgorithm, EncrId, IntegAlgorithm

ESP_HEADER_BYTES = 8  # SPI + sequence number


class Hmac:
    """HMAC (RFC 2104) with the key schedule done once; the ICV is the truncated MAC."""

    __slots__ = ("_inner", "_outer", "icv_bytes")

    def __init__(self, hash_name: str, key: bytes, icv_bytes: int) -> None:
        block = hashlib.new(hash_name).block_size
        if len(key) > block:
            key = hashlib.new(hash_name, key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.new(hash_name, bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.new(hash_name, bytes(b ^ 0x5C for b in key))
        self.icv_bytes = icv_bytes

    def icv(self, data: bytes | bytearray | memoryview, trailer: bytes = b"") -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        if trailer:
            inner.update(trailer)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[: self.icv_bytes]

    def __repr__(self) -> str:
        return f"Hmac(icv_bytes={self.icv_bytes})"


class EspCipher(Protocol):
    counter_iv: bool  # the explicit IV is the 64-bit sequence number (AEAD); else random
    iv_bytes: int
    icv_bytes: int
    align: int  # the plaintext (payload, padding, pad length, next header) is a multiple of this

    def seal(self, header: bytes, iv: bytes, plaintext: bytearray, seq_hi: int | None) -> bytes:
        """The ESP packet: `header` (SPI, seq) || IV || ciphertext || ICV. May modify `plaintext`."""
        ...

    def open(self, packet: bytes, seq_hi: int | None) -> bytes | None:
        """The plaintext of a whole ESP packet, or None if its ICV does not verify.

        The caller has checked the length: at least header + IV + one alignment unit + ICV,
        and the ciphertext a multiple of `align`.
        """
        ...


def _seq_hi_bytes(seq_hi: int | None) -> bytes:
    return b"" if seq_hi is None else seq_hi.to_bytes(4, "big")


class Aead:
    """AES-GCM-16 or ChaCha20-Poly1305 with a 4-byte salt and an 8-byte explicit IV."""

    __slots__ = ("_aead", "_salt", "align", "counter_iv", "icv_bytes", "iv_bytes")

    def __init__(self, aead: AESGCM | ChaCha20Poly1305, salt: bytes) -> None:
        self.counter_iv = True
        self._aead = aead
        self._salt = salt
        self.iv_bytes = 8
        self.icv_bytes = 16
        self.align = 4

    @property
    def primitive(self) -> AESGCM | ChaCha20Poly1305:
        """The AEAD object, for batch loops that inline `seal`/`open` (they must mirror them)."""
        return self._aead

    @property
    def salt(self) -> bytes:
        return self._salt

    def seal(self, header: bytes, iv: bytes, plaintext: bytearray, seq_hi: int | None) -> bytes:
        aad = header if seq_hi is None else header[:4] + seq_hi.to_bytes(4, "big") + header[4:]
        return header + iv + self._aead.encrypt(self._salt + iv, plaintext, aad)

    def open(self, packet: bytes, seq_hi: int | None) -> bytes | None:
        aad = packet[:8] if seq_hi is None else packet[:4] + seq_hi.to_bytes(4, "big") + packet[4:8]
        try:
            return self._aead.decrypt(self._salt + packet[8:16], packet[16:], aad)
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return f"Aead({type(self._aead).__name__})"


class AesCbcHmac:
    """AES-CBC with a caller-chosen random IV, then HMAC over the ESP packet (encrypt-then-MAC).

    Creating a CBC context per packet costs ~5 us, so one encryptor and one decryptor live as
    long as the SA and run as a single continuing CBC stream. Continuing CBC would chain the
    packet's first block to the previous packet's last ciphertext block C; XORing the first
    plaintext block with IV xor C (and the first decrypted block with C xor IV) makes each
    packet exactly CBC under its own IV, as RFC 3602 specifies. Inputs are always whole
    blocks, so neither context ever buffers.
    """

    __slots__ = ("_dec", "_dec_chain", "_enc", "_enc_chain", "_mac", "align", "counter_iv", "icv_bytes", "iv_bytes")

    def __init__(self, key: bytes, mac: Hmac | None) -> None:
        self.counter_iv = False
        zero = bytes(16)
        self._enc = Cipher(algorithms.AES(key), modes.CBC(zero)).encryptor()
        self._dec = Cipher(algorithms.AES(key), modes.CBC(zero)).decryptor()
        self._enc_chain = 0
        self._dec_chain = 0
        self._mac = mac
        self.iv_bytes = 16
        self.icv_bytes = mac.icv_bytes if mac else 0
        self.align = 16

    def seal(self, header: bytes, iv: bytes, plaintext: bytearray, seq_hi: int | None) -> bytes:
        first = int.from_bytes(plaintext[:16], "big") ^ int.from_bytes(iv, "big") ^ self._enc_chain
        plaintext[:16] = first.to_bytes(16, "big")
        ciphertext = self._enc.update(plaintext)
        self._enc_chain = int.from_bytes(ciphertext[-16:], "big")
        body = header + iv + ciphertext
        if self._mac is None:
            return body
        return body + self._mac.icv(body, _seq_hi_bytes(seq_hi))

    def open(self, packet: bytes, seq_hi: int | None) -> bytes | None:
        end = len(packet) - self.icv_bytes
        if self._mac is not None and not hmac.compare_digest(
            packet[end:], self._mac.icv(memoryview(packet)[:end], _seq_hi_bytes(seq_hi))
        ):
            return None
        ciphertext = packet[24:end]
        plaintext = bytearray(self._dec.update(ciphertext))
        first = int.from_bytes(plaintext[:16], "big") ^ self._dec_chain ^ int.from_bytes(packet[8:24], "big")
        plaintext[:16] = first.to_bytes(16, "big")
        self._dec_chain = int.from_bytes(ciphertext[-16:], "big")
        return bytes(plaintext)

    def __repr__(self) -> str:
        return f"AesCbcHmac(icv_bytes={self.icv_bytes})"


class NullHmac:
    """NULL encryption (RFC 2410): the payload travels in clear, protected by the HMAC ICV."""

    __slots__ = ("_mac", "align", "counter_iv", "icv_bytes", "iv_bytes")

    def __init__(self, mac: Hmac) -> None:
        self.counter_iv = False
        self._mac = mac
        self.iv_bytes = 0
        self.icv_bytes = mac.icv_bytes
        self.align = 4

    def seal(self, header: bytes, iv: bytes, plaintext: bytearray, seq_hi: int | None) -> bytes:
        body = header + plaintext
        return body + self._mac.icv(body, _seq_hi_bytes(seq_hi))

    def open(self, packet: bytes, seq_hi: int | None) -> bytes | None:
        end = len(packet) - self.icv_bytes
        if not hmac.compare_digest(packet[end:], self._mac.icv(memoryview(packet)[:end], _seq_hi_bytes(seq_hi))):
            return None
        return packet[8:end]

    def __repr__(self) -> str:
        return f"NullHmac(icv_bytes={self.icv_bytes})"


def integrity_for(integ: IntegAlgorithm, key: bytes) -> Hmac:
    if len(key) != integ.key_bytes:
        raise ValueError(f"{integ.name} needs a {integ.key_bytes}-byte key, got {len(key)}")
    return Hmac(integ.hash_name, key, integ.icv_bytes)


def esp_cipher_for(
    encr: EncrAlgorithm,
    encr_key: bytes,
    integ: IntegAlgorithm | None,
    integ_key: bytes,
    *,
    allow_unauthenticated: bool = False,
) -> EspCipher:
    """The cipher suite for an ESP SA's transforms and KEYMAT.

    `allow_unauthenticated` permits AES-CBC without integrity, which no SA may use (RFC 8221
    §5); it exists only to check the engine against the RFC 3602 test packets.
    """
    if len(encr_key) != encr.keymat_bytes:
        raise ValueError(f"{encr.name} needs {encr.keymat_bytes} bytes of key material, got {len(encr_key)}")
    key, salt = encr_key[: encr.key_bytes], encr_key[encr.key_bytes :]
    if encr.encr_id == EncrId.AES_GCM_16:
        return Aead(AESGCM(key), salt)
    if encr.encr_id == EncrId.CHACHA20_POLY1305:
        return Aead(ChaCha20Poly1305(key), salt)
    mac = integrity_for(integ, integ_key) if integ is not None else None
    if encr.encr_id == EncrId.AES_CBC:
        if mac is None and not allow_unauthenticated:
            raise ValueError("AES-CBC needs an integrity transform")
        return AesCbcHmac(key, mac)
    if encr.encr_id == EncrId.NULL:
        if mac is None:
            raise ValueError("NULL encryption needs an integrity transform")
        return NullHmac(mac)
    raise ValueError(f"unsupported ESP encryption transform {encr.name}")
