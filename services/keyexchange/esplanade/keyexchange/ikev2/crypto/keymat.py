"""IKE SA and Child SA key derivation (RFC 7296 §2.14, §2.17, §2.18; RFC 9370 §2.2.2-§2.2.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from esplanade.ipsec.transforms import EncrAlgorithm, IntegAlgorithm
from esplanade.keyexchange.ikev2.crypto.prf import Prf
from esplanade.keyexchange.ikev2.crypto.sk import SkCipher


@dataclass(frozen=True, slots=True)
class IkeKeys:
    """The seven IKE SA secrets; never printed."""

    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def skeyseed_initial(prf: Prf, ni: bytes, nr: bytes, shared: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (§2.14)."""
    return prf(ni + nr, shared)


def skeyseed_additional(prf: Prf, sk_d_prev: bytes, shared: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr) after each IKE_INTERMEDIATE key exchange (RFC 9370 §2.2.2)."""
    return prf(sk_d_prev, shared + ni + nr)


def skeyseed_rekey(prf: Prf, old_sk_d: bytes, shared: list[bytes], ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), SK(0) | Ni | Nr | SK(1) | ... | SK(n)) (§2.18, RFC 9370 §2.2.4)."""
    return prf(old_sk_d, shared[0] + ni + nr + b"".join(shared[1:]))


def derive_ike_keys(
    prf: Prf,
    encr: EncrAlgorithm,
    integ: IntegAlgorithm | None,
    skeyseed: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)."""
    a = integ.key_bytes if integ is not None else 0
    e = encr.keymat_bytes
    p = prf.output_bytes
    km = prf.plus(skeyseed, ni + nr + spi_i + spi_r, 3 * p + 2 * a + 2 * e)
    o = 0
    parts = []
    for n in (p, a, a, e, e, p, p):
        parts.append(km[o : o + n])
        o += n
    return IkeKeys(*parts)


def sk_ciphers(
    keys: IkeKeys, encr: EncrAlgorithm, integ: IntegAlgorithm | None, initiator: bool
) -> tuple[SkCipher, SkCipher]:
    """(outbound, inbound) SK payload protection for one side of an IKE SA."""
    i2r = SkCipher(encr, keys.sk_ei, integ, keys.sk_ai)
    r2i = SkCipher(encr, keys.sk_er, integ, keys.sk_ar)
    return (i2r, r2i) if initiator else (r2i, i2r)


@dataclass(frozen=True, slots=True)
class ChildKeys:
    """KEYMAT split per §2.17: initiator->responder first, each as encryption key (+salt) then integrity key."""

    encr_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def child_keymat(
    prf: Prf,
    sk_d: bytes,
    ni: bytes,
    nr: bytes,
    encr: EncrAlgorithm | None,
    integ: IntegAlgorithm | None,
    shared: list[bytes] | None = None,
) -> ChildKeys:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr [| SK(1) ...]) (§2.17, RFC 9370 §2.2.3).
    AH (`encr` None) takes only integrity keys, as ESP without encryption would."""
    seed = (shared[0] + ni + nr + b"".join(shared[1:])) if shared else ni + nr
    e = encr.keymat_bytes if encr is not None else 0
    a = integ.key_bytes if integ is not None else 0
    km = prf.plus(sk_d, seed, 2 * (e + a))
    return ChildKeys(km[:e], km[e : e + a], km[e + a : 2 * e + a], km[2 * e + a :])
