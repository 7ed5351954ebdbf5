"""Certificate trust: chain validation to configured CAs, CRL revocation, CERTREQ hashes.

Chains are built and checked by `cryptography.x509.verification` (signatures, validity,
CA constraints, path length); the end-entity extension policy is relaxed (IKE peers need
no TLS EKU). Revocation uses CRLs handed in as data: every CRL must be signed by the
issuer of the certificate it speaks about.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification


class TrustError(Exception):
    pass


def spki_sha1(cert: x509.Certificate) -> bytes:
    """SHA-1 of the DER SubjectPublicKeyInfo: a CERTREQ authority entry (RFC 7296 §3.7)."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(der, usedforsecurity=False).digest()


@dataclass(slots=True)
class TrustStore:
    cas: list[x509.Certificate] = field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)

    def certreq_data(self) -> bytes:
        return b"".join(spki_sha1(c) for c in self.cas)

    def verify_chain(
        self, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], now: datetime.datetime | None = None
    ) -> list[x509.Certificate]:
        """Validate `leaf` up to a configured CA; return the chain (leaf first) or raise TrustError."""
        if not self.cas:
            raise TrustError("no CA certificates configured")
        when = now or datetime.datetime.now(datetime.UTC)
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(self.cas))
            .time(when)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=verification.ExtensionPolicy.permit_all(),
            )
        )
        try:
            verified = builder.build_client_verifier().verify(leaf, list(intermediates))
        except verification.VerificationError as exc:
            raise TrustError(f"certificate chain does not validate: {exc}") from None
        chain = list(verified.chain)
        self._check_revocation(chain, when)
        return chain

    def _check_revocation(self, chain: list[x509.Certificate], when: datetime.datetime) -> None:
        for cert, issuer in itertools.pairwise(chain):
            for crl in self.crls:
                if crl.issuer != issuer.subject:
                    continue
                if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                    raise TrustError(f"CRL of {issuer.subject.rfc4514_string()} has a bad signature")
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    raise TrustError(f"certificate {cert.subject.rfc4514_string()} is revoked")
