"""The octets an AUTH payload covers (RFC 7296 §2.15, RFC 9242 §3.3.2) and the PSK MAC."""

from __future__ import annotations

import hmac

from esplanade.keyexchange.ikev2.crypto.prf import Prf

KEY_PAD = b"Key Pad for IKEv2"


def signed_octets(
    prf: Prf, real_message: bytes, peer_nonce: bytes, sk_p: bytes, id_body: bytes, int_auth: bytes = b""
) -> bytes:
    """RealMessage | NonceData | prf(SK_p, RestOfIDPayload) [| IntAuth]."""
    return real_message + peer_nonce + prf(sk_p, id_body) + int_auth


def psk_auth(prf: Prf, psk: bytes, octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf(psk, KEY_PAD), octets)


def psk_verify(prf: Prf, psk: bytes, octets: bytes, received: bytes) -> bool:
    return hmac.compare_digest(psk_auth(prf, psk, octets), received)
