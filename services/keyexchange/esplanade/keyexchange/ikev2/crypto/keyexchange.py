"""Key exchange methods (RFC 7296 §3.4, RFC 5903, RFC 8031, RFC 9370 with ML-KEM).

One object per exchange and side. A Diffie-Hellman initiator and responder both send
`public_value()` and feed the peer's value to `process_peer()`. For a KEM the initiator
sends its encapsulation key and decapsulates the responder's ciphertext; the responder
calls `process_peer()` first (encapsulating) and then sends the ciphertext.
Peer values are validated (§2.12): range for MODP, on-curve for ECP, length for the rest.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dh, ec, mlkem, x25519

from esplanade.ipsec.transforms import KeId
from esplanade.keyexchange.ikev2.errors import CryptoError

# RFC 3526 §3 and §4
MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
MODP_3072_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200C"
    "BBE117577A615D6C770988C0BAD946E208E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)


class KeyExchange:
    """One side of one key exchange."""

    method: ClassVar[KeId]
    public_len: ClassVar[int] = 0  # expected length of the peer's value (0: variable)

    def public_value(self) -> bytes:
        raise NotImplementedError

    def process_peer(self, value: bytes) -> None:
        raise NotImplementedError

    @property
    def shared_secret(self) -> bytes:
        secret: bytes | None = getattr(self, "_secret", None)
        if secret is None:
            raise CryptoError("key exchange not complete")
        return secret

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method.name})"


class _Modp(KeyExchange):
    """MODP groups (RFC 3526). cryptography deprecates finite-field DH; the groups stay for
    interoperability (strongSwan's defaults carry them), so its warning is silenced here."""

    prime: ClassVar[int]
    _params: ClassVar[dh.DHParameters | None] = None

    def __init__(self, private_value: int | None = None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._init(private_value)

    def _init(self, private_value: int | None) -> None:
        cls = type(self)
        if cls._params is None:
            cls._params = dh.DHParameterNumbers(cls.prime, 2).parameters()
        if private_value is None:
            self._key = cls._params.generate_private_key()
        else:
            pub = pow(2, private_value, cls.prime)
            self._key = dh.DHPrivateNumbers(
                private_value, dh.DHPublicNumbers(pub, cls._params.parameter_numbers())
            ).private_key()
        self._size = (cls.prime.bit_length() + 7) // 8
        self._secret: bytes | None = None

    def public_value(self) -> bytes:
        return self._key.public_key().public_numbers().y.to_bytes(self._size, "big")

    def process_peer(self, value: bytes) -> None:
        if len(value) != self._size:
            raise CryptoError(f"{self.method.name} public value of {len(value)} bytes, expected {self._size}")
        y = int.from_bytes(value, "big")
        if not 1 < y < self.prime - 1:
            raise CryptoError(f"{self.method.name} public value out of range (RFC 7296 §2.12)")
        assert self._params is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = dh.DHPublicNumbers(y, self._params.parameter_numbers()).public_key()
            secret = self._key.exchange(peer)
        self._secret = secret.rjust(self._size, b"\0")


class Modp2048(_Modp):
    method = KeId.MODP2048
    prime = MODP_2048_P
    public_len = 256


class Modp3072(_Modp):
    method = KeId.MODP3072
    prime = MODP_3072_P
    public_len = 384


class _Ecp(KeyExchange):
    curve: ClassVar[ec.EllipticCurve]
    coord_len: ClassVar[int]

    def __init__(self, private_value: int | None = None) -> None:
        if private_value is None:
            self._key = ec.generate_private_key(self.curve)
        else:
            self._key = ec.derive_private_key(private_value, self.curve)
        self._secret: bytes | None = None

    def public_value(self) -> bytes:
        nums = self._key.public_key().public_numbers()
        return nums.x.to_bytes(self.coord_len, "big") + nums.y.to_bytes(self.coord_len, "big")

    def process_peer(self, value: bytes) -> None:
        # RFC 5903 §7: x || y, no point-format byte
        if len(value) != 2 * self.coord_len:
            raise CryptoError(f"{self.method.name} public value of {len(value)} bytes, expected {2 * self.coord_len}")
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(self.curve, b"\x04" + value)
            self._secret = self._key.exchange(ec.ECDH(), peer).rjust(self.coord_len, b"\0")
        except ValueError:
            raise CryptoError(f"{self.method.name} public value is not a point on the curve") from None


class Ecp256(_Ecp):
    method = KeId.ECP256
    curve = ec.SECP256R1()
    coord_len = 32
    public_len = 64


class Ecp384(_Ecp):
    method = KeId.ECP384
    curve = ec.SECP384R1()
    coord_len = 48
    public_len = 96


class Ecp521(_Ecp):
    method = KeId.ECP521
    curve = ec.SECP521R1()
    coord_len = 66
    public_len = 132


class Curve25519(KeyExchange):
    method = KeId.CURVE25519
    public_len = 32

    def __init__(self, private_value: bytes | None = None) -> None:
        if private_value is None:
            self._key = x25519.X25519PrivateKey.generate()
        else:
            self._key = x25519.X25519PrivateKey.from_private_bytes(private_value)
        self._secret: bytes | None = None

    def public_value(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def process_peer(self, value: bytes) -> None:
        if len(value) != 32:
            raise CryptoError(f"Curve25519 public value of {len(value)} bytes, expected 32")
        try:
            secret = self._key.exchange(x25519.X25519PublicKey.from_public_bytes(value))
        except ValueError:
            raise CryptoError("Curve25519 public value gives an all-zero shared secret (RFC 8031 §2)") from None
        if secret == bytes(32):
            raise CryptoError("Curve25519 public value gives an all-zero shared secret (RFC 8031 §2)")
        self._secret = secret


class MlKem768(KeyExchange):
    """ML-KEM-768 (FIPS 203) as an IKEv2 key exchange (draft-ietf-ipsecme-ikev2-mlkem)."""

    method = KeId.ML_KEM_768
    EK_LEN = 1184
    CT_LEN = 1088

    def __init__(self, initiator: bool) -> None:
        self._initiator = initiator
        self._key = mlkem.MLKEM768PrivateKey.generate() if initiator else None
        self._ciphertext = b""
        self._secret: bytes | None = None

    def public_value(self) -> bytes:
        if self._key is not None:
            return self._key.public_key().public_bytes_raw()
        if not self._ciphertext:
            raise CryptoError("ML-KEM responder has no ciphertext before the peer's key")
        return self._ciphertext

    def process_peer(self, value: bytes) -> None:
        if self._key is not None:
            if len(value) != self.CT_LEN:
                raise CryptoError(f"ML-KEM-768 ciphertext of {len(value)} bytes, expected {self.CT_LEN}")
            try:
                self._secret = self._key.decapsulate(value)
            except ValueError:
                raise CryptoError("ML-KEM-768 ciphertext does not decapsulate") from None
            return
        if len(value) != self.EK_LEN:
            raise CryptoError(f"ML-KEM-768 encapsulation key of {len(value)} bytes, expected {self.EK_LEN}")
        try:
            peer = mlkem.MLKEM768PublicKey.from_public_bytes(value)
            self._secret, self._ciphertext = peer.encapsulate()
        except (ValueError, UnsupportedAlgorithm):
            raise CryptoError("ML-KEM-768 encapsulation key fails the FIPS 203 check") from None


_DH_METHODS: dict[int, type[KeyExchange]] = {
    KeId.MODP2048: Modp2048,
    KeId.MODP3072: Modp3072,
    KeId.ECP256: Ecp256,
    KeId.ECP384: Ecp384,
    KeId.ECP521: Ecp521,
    KeId.CURVE25519: Curve25519,
}

SUPPORTED_METHODS = frozenset([*_DH_METHODS, KeId.ML_KEM_768])


def new_key_exchange(method: int, initiator: bool) -> KeyExchange:
    """A fresh key exchange of `method` for one side; KeyError if unsupported."""
    if method == KeId.ML_KEM_768:
        return MlKem768(initiator)
    return _DH_METHODS[method]()
