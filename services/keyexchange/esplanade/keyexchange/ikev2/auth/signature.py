"""Signature authentication: RFC 7427 digital signatures (method 14) and the legacy methods.

Legacy: method 1 is RSASSA-PKCS1-v1_5 with SHA-1 (RFC 7296 §3.8), methods 9/10/11 are
ECDSA with SHA-256/384/512 on P-256/384/521 and a raw r||s signature (RFC 4754).
Method 14 carries an ASN.1 AlgorithmIdentifier; we produce and accept PKCS#1 v1.5,
RSASSA-PSS and ECDSA with SHA-2 (RFC 7427 Appendix A).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from esplanade.keyexchange.ikev2.auth.der import oid as der_oid
from esplanade.keyexchange.ikev2.auth.der import oid_text, read_tlv, tlv
from esplanade.keyexchange.ikev2.constants import AuthMethod, HashAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_OID_RSA_PSS = "1.2.840.113549.1.1.10"
_OID_MGF1 = "1.2.840.113549.1.1.8"
_HASH_OIDS = {
    "2.16.840.1.101.3.4.2.1": HashAlgorithm.SHA2_256,
    "2.16.840.1.101.3.4.2.2": HashAlgorithm.SHA2_384,
    "2.16.840.1.101.3.4.2.3": HashAlgorithm.SHA2_512,
    "1.3.14.3.2.26": HashAlgorithm.SHA1,
}
_RSA_PKCS1_OIDS = {
    "1.2.840.113549.1.1.5": HashAlgorithm.SHA1,
    "1.2.840.113549.1.1.11": HashAlgorithm.SHA2_256,
    "1.2.840.113549.1.1.12": HashAlgorithm.SHA2_384,
    "1.2.840.113549.1.1.13": HashAlgorithm.SHA2_512,
}
_ECDSA_OIDS = {
    "1.2.840.10045.4.3.2": HashAlgorithm.SHA2_256,
    "1.2.840.10045.4.3.3": HashAlgorithm.SHA2_384,
    "1.2.840.10045.4.3.4": HashAlgorithm.SHA2_512,
}
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    HashAlgorithm.SHA1: hashes.SHA1,
    HashAlgorithm.SHA2_256: hashes.SHA256,
    HashAlgorithm.SHA2_384: hashes.SHA384,
    HashAlgorithm.SHA2_512: hashes.SHA512,
}
SUPPORTED_HASHES = (HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512)


class SignatureError(Exception):
    pass


# -- AlgorithmIdentifiers (RFC 7427 Appendix A) -------------------------------------------


def _hash_algid(h: HashAlgorithm) -> bytes:
    dotted = next(k for k, v in _HASH_OIDS.items() if v == h)
    return tlv(0x30, der_oid(dotted) + b"\x05\x00")


def algorithm_identifier(key: PrivateKey, h: HashAlgorithm, pss: bool) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        dotted = next(k for k, v in _ECDSA_OIDS.items() if v == h)
        return tlv(0x30, der_oid(dotted))
    if pss:
        salt = _HASHES[h]().digest_size
        params = tlv(
            0x30,
            tlv(0xA0, _hash_algid(h))
            + tlv(0xA1, tlv(0x30, der_oid(_OID_MGF1) + _hash_algid(h)))
            + tlv(0xA2, tlv(0x02, bytes((salt,)))),
        )
        return tlv(0x30, der_oid(_OID_RSA_PSS) + params)
    dotted = next(k for k, v in _RSA_PKCS1_OIDS.items() if v == h)
    return tlv(0x30, der_oid(dotted) + b"\x05\x00")


@dataclass(frozen=True, slots=True)
class SignatureScheme:
    kind: str  # "pkcs1", "pss", "ecdsa"
    hash: HashAlgorithm
    salt_length: int = 0


def parse_algorithm_identifier(der: bytes) -> SignatureScheme:
    tag, seq, end = read_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise SignatureError("AlgorithmIdentifier is not one DER SEQUENCE")
    tag, oid_c, off = read_tlv(seq, 0)
    if tag != 0x06:
        raise SignatureError("AlgorithmIdentifier without OID")
    dotted = oid_text(oid_c)
    if dotted in _ECDSA_OIDS:
        return SignatureScheme("ecdsa", _ECDSA_OIDS[dotted])
    if dotted in _RSA_PKCS1_OIDS:
        return SignatureScheme("pkcs1", _RSA_PKCS1_OIDS[dotted])
    if dotted == _OID_RSA_PSS:
        h, salt = HashAlgorithm.SHA1, 20
        tag, params, _ = read_tlv(seq, off)
        p = 0
        while p < len(params):
            t, val, p = read_tlv(params, p)
            if t == 0xA0:
                _, algid, _ = read_tlv(val, 0)
                _, hoid, _ = read_tlv(algid, 0)
                h = _HASH_OIDS.get(oid_text(hoid), HashAlgorithm.SHA1)
            elif t == 0xA2:
                _, sv, _ = read_tlv(val, 0)
                salt = int.from_bytes(sv, "big")
        return SignatureScheme("pss", h, salt)
    raise SignatureError(f"unsupported signature algorithm {dotted}")


# -- sign / verify -------------------------------------------------------------------------


def legacy_method(key: PrivateKey) -> AuthMethod:
    if isinstance(key, rsa.RSAPrivateKey):
        return AuthMethod.RSA_SIG
    size = key.curve.key_size
    return {256: AuthMethod.ECDSA_256, 384: AuthMethod.ECDSA_384, 521: AuthMethod.ECDSA_521}[size]


def _legacy_ecdsa_hash(method: int) -> HashAlgorithm:
    return {
        AuthMethod.ECDSA_256: HashAlgorithm.SHA2_256,
        AuthMethod.ECDSA_384: HashAlgorithm.SHA2_384,
        AuthMethod.ECDSA_521: HashAlgorithm.SHA2_512,
    }[AuthMethod(method)]


def sign(key: PrivateKey, octets: bytes, peer_hashes: tuple[int, ...], pss: bool = False) -> tuple[AuthMethod, bytes]:
    """Sign the AUTH octets: RFC 7427 when the peer announced hash algorithms, else the legacy method."""
    common = [h for h in SUPPORTED_HASHES if h in peer_hashes]
    if common:
        h = common[0]
        if isinstance(key, ec.EllipticCurvePrivateKey):
            # match the hash to the curve, as strongSwan prefers
            preferred = {256: HashAlgorithm.SHA2_256, 384: HashAlgorithm.SHA2_384, 521: HashAlgorithm.SHA2_512}
            if preferred[key.curve.key_size] in common:
                h = preferred[key.curve.key_size]
        algid = algorithm_identifier(key, h, pss)
        return AuthMethod.DIGITAL_SIGNATURE, bytes((len(algid),)) + algid + _raw_sign(key, octets, h, pss)
    method = legacy_method(key)
    if method == AuthMethod.RSA_SIG:
        assert isinstance(key, rsa.RSAPrivateKey)
        return method, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 - RFC 7296 §3.8
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.sign(octets, ec.ECDSA(_HASHES[_legacy_ecdsa_hash(method)]()))
    r, s = decode_dss_signature(der)
    n = (key.curve.key_size + 7) // 8
    return method, r.to_bytes(n, "big") + s.to_bytes(n, "big")


def _raw_sign(key: PrivateKey, octets: bytes, h: HashAlgorithm, pss: bool) -> bytes:
    alg = _HASHES[h]()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(octets, ec.ECDSA(alg))
    if pss:
        return key.sign(octets, padding.PSS(padding.MGF1(alg), alg.digest_size), alg)
    return key.sign(octets, padding.PKCS1v15(), alg)


def verify(pub: object, method: int, auth_data: bytes, octets: bytes) -> None:
    """Raise SignatureError unless `auth_data` is a valid signature of `octets` by `pub`."""
    try:
        if method == AuthMethod.DIGITAL_SIGNATURE:
            if not auth_data:
                raise SignatureError("empty AUTH data")
            n = auth_data[0]
            scheme = parse_algorithm_identifier(auth_data[1 : 1 + n])
            sig = auth_data[1 + n :]
            alg = _HASHES[scheme.hash]()
            if scheme.kind == "ecdsa":
                if not isinstance(pub, ec.EllipticCurvePublicKey):
                    raise SignatureError("ECDSA signature but the certificate key is not ECDSA")
                pub.verify(sig, octets, ec.ECDSA(alg))
            elif isinstance(pub, rsa.RSAPublicKey):
                if scheme.kind == "pss":
                    pub.verify(sig, octets, padding.PSS(padding.MGF1(alg), scheme.salt_length), alg)
                else:
                    pub.verify(sig, octets, padding.PKCS1v15(), alg)
            else:
                raise SignatureError("RSA signature but the certificate key is not RSA")
        elif method == AuthMethod.RSA_SIG:
            if not isinstance(pub, rsa.RSAPublicKey):
                raise SignatureError("RSA AUTH method but the certificate key is not RSA")
            pub.verify(auth_data, octets, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303
        elif method in (AuthMethod.ECDSA_256, AuthMethod.ECDSA_384, AuthMethod.ECDSA_521):
            if not isinstance(pub, ec.EllipticCurvePublicKey):
                raise SignatureError("ECDSA AUTH method but the certificate key is not ECDSA")
            size = {AuthMethod.ECDSA_256: 256, AuthMethod.ECDSA_384: 384, AuthMethod.ECDSA_521: 521}[AuthMethod(method)]
            if pub.curve.key_size != size:
                raise SignatureError("ECDSA AUTH method does not match the key's curve")
            n = (size + 7) // 8
            if len(auth_data) != 2 * n:
                raise SignatureError("ECDSA signature of the wrong length")
            der = encode_dss_signature(int.from_bytes(auth_data[:n], "big"), int.from_bytes(auth_data[n:], "big"))
            pub.verify(der, octets, ec.ECDSA(_HASHES[_legacy_ecdsa_hash(method)]()))
        else:
            raise SignatureError(f"unsupported AUTH method {method}")
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"malformed signature: {type(exc).__name__}") from None


__all__ = ["PrivateKey", "PublicKey", "SignatureError", "sign", "verify"]
