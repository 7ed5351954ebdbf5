"""Stateless COOKIEs (RFC 7296 §2.6): Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>).

The secret rotates; a cookie made with the previous secret is still accepted so initiators
caught by a rotation do not fail.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct

ROTATE_AFTER = 120.0


class CookieJar:
    def __init__(self, now: float) -> None:
        self._version = 0
        self._secret = os.urandom(32)
        self._previous: tuple[int, bytes] | None = None
        self._rotated_at = now

    def _rotate_if_due(self, now: float) -> None:
        if now - self._rotated_at >= ROTATE_AFTER:
            self.rotate(now)

    def rotate(self, now: float) -> None:
        self._previous = (self._version, self._secret)
        self._version = (self._version + 1) & 0xFFFFFFFF
        self._secret = os.urandom(32)
        self._rotated_at = now

    @staticmethod
    def _mac(secret: bytes, ni: bytes, ip: str, spi_i: bytes) -> bytes:
        return hmac.digest(secret, ni + ipaddress.ip_address(ip).packed + spi_i, hashlib.sha256)[:16]

    def make(self, ni: bytes, ip: str, spi_i: bytes, now: float) -> bytes:
        self._rotate_if_due(now)
        return struct.pack("!I", self._version) + self._mac(self._secret, ni, ip, spi_i)

    def check(self, cookie: bytes, ni: bytes, ip: str, spi_i: bytes, now: float) -> bool:
        self._rotate_if_due(now)
        if len(cookie) != 20:
            return False
        version = struct.unpack("!I", cookie[:4])[0]
        candidates = [(self._version, self._secret)]
        if self._previous is not None:
            candidates.append(self._previous)
        for v, secret in candidates:
            if v == version and hmac.compare_digest(cookie[4:], self._mac(secret, ni, ip, spi_i)):
                return True
        return False
