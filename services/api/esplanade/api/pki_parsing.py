"""Certificates, private keys and CRLs from PEM: what the API shows of them, and checks."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from esplanade.api.problems import ProblemError


def load_certificate(pem: str, field: str = "pem") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise ProblemError(422, "not a PEM certificate", [(field, "not a PEM-encoded X.509 certificate")]) from None


def certificate_facts(cert: x509.Certificate) -> dict[str, Any]:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(n.value) for n in names]
    except (x509.ExtensionNotFound, ValueError):
        sans = []
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        key_type = f"RSA-{public.key_size}"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        key_type = f"ECDSA-{public.curve.name}"
    elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key_type = type(public).__name__.removesuffix("PublicKey")
    else:
        key_type = type(public).__name__
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.astimezone(UTC).isoformat(),
        "not_after": cert.not_valid_after_utc.astimezone(UTC).isoformat(),
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
        "key_type": key_type,
        "is_ca": is_ca,
        "subject_alt_names": sans,
    }


def check_private_key(pem: str, cert: x509.Certificate, field: str = "private_key") -> bytes:
    """The key as PKCS#8 PEM bytes, if it is an unencrypted key matching the certificate."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ProblemError(
            422, "not an unencrypted PEM private key", [(field, "not an unencrypted PEM private key")]
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != cert.public_key().public_bytes(encoding, public):
        raise ProblemError(422, "the private key does not belong to the certificate", [(field, "does not match")])
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_crl(text: str, field: str = "crl") -> tuple[x509.CertificateRevocationList, str]:
    """A CRL from PEM or base64 DER; (crl, PEM text)."""
    data = text.strip().encode()
    try:
        if data.startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(base64.b64decode(data, validate=True))
    except (ValueError, binascii.Error):
        raise ProblemError(422, "not a CRL", [(field, "not a PEM or base64 DER X.509 CRL")]) from None
    return crl, crl.public_bytes(serialization.Encoding.PEM).decode()


def crl_facts(crl: x509.CertificateRevocationList) -> dict[str, Any]:
    next_update = crl.next_update_utc
    return {
        "issuer": crl.issuer.rfc4514_string(),
        "last_update": crl.last_update_utc.astimezone(UTC).isoformat(),
        "next_update": next_update.astimezone(UTC).isoformat() if next_update else None,
        "revoked": len(crl),
    }
