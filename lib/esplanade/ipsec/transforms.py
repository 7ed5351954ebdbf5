"""IANA IKEv2 transform identifiers and the properties of each ESP/AH algorithm.

Numbers come from the IANA "Internet Key Exchange Version 2 (IKEv2) Parameters" registry
(RFC 7296 §3.3.2, RFC 9370 for the additional key exchanges). Every service uses these
names; nobody writes a bare transform number anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class TransformType(IntEnum):
    ENCR = 1
    PRF = 2
    INTEG = 3
    KE = 4  # "D-H" before RFC 9370
    ESN = 5
    ADDKE1 = 6
    ADDKE2 = 7
    ADDKE3 = 8
    ADDKE4 = 9
    ADDKE5 = 10
    ADDKE6 = 11
    ADDKE7 = 12


class EncrId(IntEnum):
    NULL = 11
    AES_CBC = 12
    AES_GCM_8 = 18
    AES_GCM_12 = 19
    AES_GCM_16 = 20
    CHACHA20_POLY1305 = 28


class PrfId(IntEnum):
    HMAC_SHA1 = 2
    HMAC_SHA2_256 = 5
    HMAC_SHA2_384 = 6
    HMAC_SHA2_512 = 7


class IntegId(IntEnum):
    NONE = 0
    HMAC_SHA1_96 = 2
    HMAC_SHA2_256_128 = 12
    HMAC_SHA2_384_192 = 13
    HMAC_SHA2_512_256 = 14


class KeId(IntEnum):
    """Key exchange methods (Diffie-Hellman groups and KEMs)."""

    NONE = 0
    MODP1024 = 2
    MODP2048 = 14
    MODP3072 = 15
    MODP4096 = 16
    ECP256 = 19
    ECP384 = 20
    ECP521 = 21
    CURVE25519 = 31
    CURVE448 = 32
    ML_KEM_512 = 35
    ML_KEM_768 = 36
    ML_KEM_1024 = 37


class EsnId(IntEnum):
    NO_ESN = 0
    ESN = 1


class ProtocolId(IntEnum):
    """Security protocol identifiers of IKEv2 proposals (RFC 7296 §3.3.1)."""

    IKE = 1
    AH = 2
    ESP = 3


class IpProto(IntEnum):
    """IP protocol numbers that the data plane handles by name."""

    ICMP = 1
    IPIP = 4
    TCP = 6
    UDP = 17
    IPV6 = 41
    ESP = 50
    AH = 51
    ICMPV6 = 58
    NO_NEXT_HEADER = 59  # RFC 4303 §2.6 dummy packets


class Mode(IntEnum):
    TRANSPORT = 0
    TUNNEL = 1


class Direction(IntEnum):
    IN = 0
    OUT = 1


@dataclass(frozen=True, slots=True)
class EncrAlgorithm:
    """An ESP encryption transform with a fixed key size.

    `key_bytes` is the cipher key; `salt_bytes` the part of KEYMAT appended to it for AEAD
    transforms (RFC 4106 §8.1, RFC 7634 §2). `iv_bytes` is the explicit IV on the wire.
    """

    name: str
    encr_id: EncrId
    key_bits: int
    salt_bytes: int
    iv_bytes: int
    block_bytes: int  # the payload is padded to a multiple of this (at least 4)
    icv_bytes: int  # 0 unless AEAD
    kernel_name: str

    @property
    def key_bytes(self) -> int:
        return self.key_bits // 8

    @property
    def keymat_bytes(self) -> int:
        """How many bytes of KEYMAT this transform takes (key plus salt)."""
        return self.key_bytes + self.salt_bytes

    @property
    def aead(self) -> bool:
        return self.icv_bytes > 0


@dataclass(frozen=True, slots=True)
class IntegAlgorithm:
    name: str
    integ_id: IntegId
    key_bytes: int
    icv_bytes: int
    hash_name: str  # hashlib / cryptography name
    kernel_name: str


ENCR_AES_GCM_16_128 = EncrAlgorithm("aes128gcm16", EncrId.AES_GCM_16, 128, 4, 8, 4, 16, "rfc4106(gcm(aes))")
ENCR_AES_GCM_16_256 = EncrAlgorithm("aes256gcm16", EncrId.AES_GCM_16, 256, 4, 8, 4, 16, "rfc4106(gcm(aes))")
ENCR_CHACHA20_POLY1305 = EncrAlgorithm(
    "chacha20poly1305", EncrId.CHACHA20_POLY1305, 256, 4, 8, 4, 16, "rfc7539esp(chacha20,poly1305)"
)
ENCR_AES_CBC_128 = EncrAlgorithm("aes128", EncrId.AES_CBC, 128, 0, 16, 16, 0, "cbc(aes)")
ENCR_AES_CBC_256 = EncrAlgorithm("aes256", EncrId.AES_CBC, 256, 0, 16, 16, 0, "cbc(aes)")
ENCR_NULL = EncrAlgorithm("null", EncrId.NULL, 0, 0, 0, 4, 0, "ecb(cipher_null)")

INTEG_HMAC_SHA2_256_128 = IntegAlgorithm("sha256", IntegId.HMAC_SHA2_256_128, 32, 16, "sha256", "hmac(sha256)")
INTEG_HMAC_SHA2_384_192 = IntegAlgorithm("sha384", IntegId.HMAC_SHA2_384_192, 48, 24, "sha384", "hmac(sha384)")
INTEG_HMAC_SHA2_512_256 = IntegAlgorithm("sha512", IntegId.HMAC_SHA2_512_256, 64, 32, "sha512", "hmac(sha512)")

ENCR_ALGORITHMS: dict[str, EncrAlgorithm] = {
    a.name: a
    for a in (
        ENCR_AES_GCM_16_128,
        ENCR_AES_GCM_16_256,
        ENCR_CHACHA20_POLY1305,
        ENCR_AES_CBC_128,
        ENCR_AES_CBC_256,
        ENCR_NULL,
    )
}
INTEG_ALGORITHMS: dict[str, IntegAlgorithm] = {
    a.name: a for a in (INTEG_HMAC_SHA2_256_128, INTEG_HMAC_SHA2_384_192, INTEG_HMAC_SHA2_512_256)
}


def encr_by_id(encr_id: int, key_bits: int | None) -> EncrAlgorithm:
    """Find the encryption transform for a (transform ID, KEY_LENGTH attribute) pair."""
    for alg in ENCR_ALGORITHMS.values():
        if alg.encr_id == encr_id and (alg.key_bits == (key_bits or 0) or alg.encr_id == EncrId.CHACHA20_POLY1305):
            return alg
    raise KeyError(f"unsupported encryption transform {encr_id} with key length {key_bits}")


def integ_by_id(integ_id: int) -> IntegAlgorithm:
    for alg in INTEG_ALGORITHMS.values():
        if alg.integ_id == integ_id:
            return alg
    raise KeyError(f"unsupported integrity transform {integ_id}")
