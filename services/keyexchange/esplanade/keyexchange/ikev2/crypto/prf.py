"""The IKEv2 pseudo-random functions and prf+ (RFC 7296 §2.13)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from esplanade.ipsec.transforms import PrfId


@dataclass(frozen=True, slots=True)
class Prf:
    prf_id: PrfId
    hash_name: str
    output_bytes: int

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hash_name)

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ (§2.13): T1 | T2 | ... with Tn = prf(K, Tn-1 | S | n), n up to 255."""
        out = bytearray()
        t = b""
        n = 1
        while len(out) < length:
            if n > 255:
                raise ValueError("prf+ asked for more than 255 blocks")
            t = hmac.digest(key, t + seed + bytes((n,)), self.hash_name)
            out += t
            n += 1
        return bytes(out[:length])


PRFS: dict[int, Prf] = {
    PrfId.HMAC_SHA1: Prf(PrfId.HMAC_SHA1, "sha1", 20),
    PrfId.HMAC_SHA2_256: Prf(PrfId.HMAC_SHA2_256, "sha256", 32),
    PrfId.HMAC_SHA2_384: Prf(PrfId.HMAC_SHA2_384, "sha384", 48),
    PrfId.HMAC_SHA2_512: Prf(PrfId.HMAC_SHA2_512, "sha512", 64),
}


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data, usedforsecurity=False).digest()
