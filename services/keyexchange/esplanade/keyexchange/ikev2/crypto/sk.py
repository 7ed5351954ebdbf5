"""Protection of the Encrypted (SK) and Encrypted Fragment (SKF) payloads (RFC 7296 §3.14).

AEAD transforms follow RFC 5282 (AES-GCM-16) and RFC 7634 (ChaCha20-Poly1305): the
associated data is the IKE header through the SK/SKF payload header, the nonce is the
4-byte salt from SK_e followed by the 8-byte explicit IV. AES-CBC uses a random IV and a
truncated HMAC (RFC 4868) over everything from the IKE header through the ciphertext.
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from esplanade.ipsec.transforms import EncrAlgorithm, EncrId, IntegAlgorithm
from esplanade.keyexchange.ikev2.errors import IntegrityCheckFailed

_IV_COUNTER = struct.Struct("!Q")


class SkCipher:
    """One direction of SK payload protection (keys SK_ei+SK_ai or SK_er+SK_ar)."""

    __slots__ = ("_aead", "_cbc_key", "_counter", "_integ", "_integ_key", "_salt", "encr")

    def __init__(self, encr: EncrAlgorithm, encr_key: bytes, integ: IntegAlgorithm | None, integ_key: bytes) -> None:
        if len(encr_key) != encr.keymat_bytes:
            raise ValueError(f"{encr.name} needs {encr.keymat_bytes} bytes of SK_e")
        self.encr = encr
        self._integ = integ
        self._integ_key = integ_key
        self._counter = 0
        key = encr_key[: encr.key_bytes]
        self._salt = encr_key[encr.key_bytes :]
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self._cbc_key = b""
        if encr.encr_id == EncrId.AES_GCM_16:
            self._aead = AESGCM(key)
        elif encr.encr_id == EncrId.CHACHA20_POLY1305:
            self._aead = ChaCha20Poly1305(key)
        elif encr.encr_id == EncrId.AES_CBC:
            if integ is None:
                raise ValueError("AES-CBC needs an integrity transform")
            self._cbc_key = key
        else:
            raise ValueError(f"{encr.name} is not supported for IKE")

    def __repr__(self) -> str:
        return f"SkCipher({self.encr.name}, {self._integ.name if self._integ else 'AEAD'})"

    @property
    def iv_counter(self) -> int:
        """The last explicit IV used by `seal` (AEAD); a restored SA continues above it."""
        return self._counter

    @iv_counter.setter
    def iv_counter(self, value: int) -> None:
        if value < self._counter:
            raise ValueError("the IV counter never goes back")
        self._counter = value

    @property
    def icv_len(self) -> int:
        if self._aead is not None:
            return 16
        assert self._integ is not None
        return self._integ.icv_bytes

    def overhead(self, plain_len: int) -> int:
        """Bytes of the SK body for a plaintext of `plain_len` (IV, padding, pad length, ICV)."""
        return self.sealed_len(plain_len) - plain_len

    def sealed_len(self, plain_len: int) -> int:
        block = 16 if self._aead is None else 1
        padded = plain_len + 1
        padded += (-padded) % block
        return self.encr.iv_bytes + padded + self.icv_len

    def seal(self, header: bytes, plaintext: bytes) -> bytes:
        """Return IV | ciphertext | ICV; `header` is the AAD (IKE header .. SK/SKF header)."""
        if self._aead is not None:
            self._counter += 1
            iv = _IV_COUNTER.pack(self._counter)
            return iv + self._aead.encrypt(self._salt + iv, plaintext + b"\0", header)
        pad = (-(len(plaintext) + 1)) % 16
        padded = plaintext + bytes(pad) + bytes((pad,))
        iv = os.urandom(16)
        enc = Cipher(algorithms.AES(self._cbc_key), modes.CBC(iv)).encryptor()
        ct = iv + enc.update(padded) + enc.finalize()
        assert self._integ is not None
        icv = hmac.digest(self._integ_key, header + ct, self._integ.hash_name)[: self._integ.icv_bytes]
        return ct + icv

    def open(self, header: bytes, body: bytes) -> bytes:
        """Verify and decrypt IV | ciphertext | ICV; return the inner payload bytes."""
        iv_len = self.encr.iv_bytes
        if len(body) < iv_len + self.icv_len + 1:
            raise IntegrityCheckFailed("encrypted payload too short")
        if self._aead is not None:
            iv = body[:iv_len]
            try:
                padded = self._aead.decrypt(self._salt + iv, body[iv_len:], header)
            except Exception:
                raise IntegrityCheckFailed("ICV mismatch") from None
        else:
            assert self._integ is not None
            icv_len = self._integ.icv_bytes
            mac = hmac.digest(self._integ_key, header + body[:-icv_len], self._integ.hash_name)[:icv_len]
            if not hmac.compare_digest(mac, body[-icv_len:]):
                raise IntegrityCheckFailed("ICV mismatch")
            ct = body[iv_len:-icv_len]
            if len(ct) % 16 or not ct:
                raise IntegrityCheckFailed("ciphertext is not a whole number of blocks")
            dec = Cipher(algorithms.AES(self._cbc_key), modes.CBC(body[:iv_len])).decryptor()
            padded = dec.update(ct) + dec.finalize()
        pad = padded[-1]
        if pad + 1 > len(padded):
            raise IntegrityCheckFailed("pad length beyond plaintext")
        return padded[: -pad - 1]
