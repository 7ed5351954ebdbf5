"""Proposals: strongSwan proposal strings, SA payload proposals and their negotiation (RFC 7296 §2.7, §3.3).

A `ProposalSpec` is one configured proposal (every acceptable algorithm per transform
type); `Suite` is what negotiation picked (one algorithm per type).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_AES_CBC_256,
    ENCR_AES_GCM_16_128,
    ENCR_AES_GCM_16_256,
    ENCR_CHACHA20_POLY1305,
    INTEG_HMAC_SHA2_256_128,
    INTEG_HMAC_SHA2_384_192,
    INTEG_HMAC_SHA2_512_256,
    EncrAlgorithm,
    EncrId,
    EsnId,
    IntegAlgorithm,
    KeId,
    PrfId,
    ProtocolId,
    TransformType,
)
from esplanade.keyexchange.ikev2.crypto.keyexchange import SUPPORTED_METHODS
from esplanade.keyexchange.ikev2.payloads import Proposal, Transform

ENCR_KEYWORDS: dict[str, EncrAlgorithm] = {
    "aes128": ENCR_AES_CBC_128,
    "aes256": ENCR_AES_CBC_256,
    "aes128gcm16": ENCR_AES_GCM_16_128,
    "aes128gcm128": ENCR_AES_GCM_16_128,
    "aes256gcm16": ENCR_AES_GCM_16_256,
    "aes256gcm128": ENCR_AES_GCM_16_256,
    "chacha20poly1305": ENCR_CHACHA20_POLY1305,
}
INTEG_KEYWORDS: dict[str, IntegAlgorithm] = {
    "sha256": INTEG_HMAC_SHA2_256_128,
    "sha2_256": INTEG_HMAC_SHA2_256_128,
    "sha384": INTEG_HMAC_SHA2_384_192,
    "sha2_384": INTEG_HMAC_SHA2_384_192,
    "sha512": INTEG_HMAC_SHA2_512_256,
    "sha2_512": INTEG_HMAC_SHA2_512_256,
}
PRF_KEYWORDS: dict[str, PrfId] = {
    "prfsha1": PrfId.HMAC_SHA1,
    "prfsha256": PrfId.HMAC_SHA2_256,
    "prfsha384": PrfId.HMAC_SHA2_384,
    "prfsha512": PrfId.HMAC_SHA2_512,
}
KE_KEYWORDS: dict[str, KeId] = {
    "modp2048": KeId.MODP2048,
    "modp3072": KeId.MODP3072,
    "ecp256": KeId.ECP256,
    "ecp384": KeId.ECP384,
    "ecp521": KeId.ECP521,
    "curve25519": KeId.CURVE25519,
    "x25519": KeId.CURVE25519,
    "mlkem768": KeId.ML_KEM_768,
}
_INTEG_TO_PRF = {
    INTEG_HMAC_SHA2_256_128.integ_id: PrfId.HMAC_SHA2_256,
    INTEG_HMAC_SHA2_384_192.integ_id: PrfId.HMAC_SHA2_384,
    INTEG_HMAC_SHA2_512_256.integ_id: PrfId.HMAC_SHA2_512,
}
ADDKE_TYPES = tuple(TransformType(t) for t in range(TransformType.ADDKE1, TransformType.ADDKE7 + 1))


class ProposalSyntaxError(ValueError):
    pass


def _encr_transform(a: EncrAlgorithm) -> Transform:
    key_length = None if a.encr_id == EncrId.CHACHA20_POLY1305 else a.key_bits
    return Transform(TransformType.ENCR, a.encr_id, key_length)


@dataclass(frozen=True, slots=True)
class ProposalSpec:
    """One configured proposal: every acceptable algorithm of each transform type, in preference order."""

    protocol: ProtocolId
    encr: tuple[EncrAlgorithm, ...]
    integ: tuple[IntegAlgorithm, ...] = ()
    prf: tuple[PrfId, ...] = ()
    ke: tuple[KeId, ...] = ()
    additional_ke: tuple[tuple[TransformType, tuple[KeId, ...]], ...] = ()
    esn: tuple[EsnId, ...] = (EsnId.NO_ESN,)

    @classmethod
    def parse(cls, text: str, protocol: ProtocolId) -> ProposalSpec:
        """Parse one strongSwan proposal string, e.g. ``aes256gcm16-prfsha256-ecp256-ke1_mlkem768``."""
        encr: list[EncrAlgorithm] = []
        integ: list[IntegAlgorithm] = []
        prf: list[PrfId] = []
        ke: list[KeId] = []
        addke: dict[TransformType, list[KeId]] = {}
        esn: list[EsnId] = []
        for word in text.strip().lower().split("-"):
            if not word:
                raise ProposalSyntaxError(f"empty algorithm in {text!r}")
            if word in ENCR_KEYWORDS:
                encr.append(ENCR_KEYWORDS[word])
            elif word in INTEG_KEYWORDS:
                integ.append(INTEG_KEYWORDS[word])
            elif word in PRF_KEYWORDS:
                prf.append(PRF_KEYWORDS[word])
            elif word in KE_KEYWORDS:
                ke.append(KE_KEYWORDS[word])
            elif word[:2] == "ke" and word[2:3].isdigit() and word[3:4] == "_" and word[4:] in KE_KEYWORDS:
                n = int(word[2])
                if not 1 <= n <= 7:
                    raise ProposalSyntaxError(f"{word!r}: additional key exchanges are ke1..ke7")
                addke.setdefault(TransformType(TransformType.ADDKE1 + n - 1), []).append(KE_KEYWORDS[word[4:]])
            elif word in ("esn", "noesn"):
                esn.append(EsnId.ESN if word == "esn" else EsnId.NO_ESN)
            else:
                raise ProposalSyntaxError(f"unknown algorithm {word!r} in proposal {text!r}")
        if protocol == ProtocolId.AH:
            if encr:
                raise ProposalSyntaxError(f"AH proposal {text!r}: AH has no encryption algorithm")
            if not integ:
                raise ProposalSyntaxError(f"AH proposal {text!r} has no integrity algorithm")
            if prf:
                raise ProposalSyntaxError("a PRF is an IKE transform")
            return cls(protocol, (), tuple(integ), (), tuple(ke), (), tuple(esn) or (EsnId.NO_ESN,))
        if not encr:
            raise ProposalSyntaxError(f"proposal {text!r} has no encryption algorithm")
        aead = [a.aead for a in encr]
        if any(aead) and not all(aead):
            raise ProposalSyntaxError(f"proposal {text!r} mixes AEAD and non-AEAD encryption")
        if all(aead) and integ:
            raise ProposalSyntaxError(f"proposal {text!r}: AEAD encryption takes no integrity algorithm")
        if not all(aead) and not integ:
            raise ProposalSyntaxError(f"proposal {text!r}: {encr[0].name} needs an integrity algorithm")
        for method in [*ke, *(m for ms in addke.values() for m in ms)]:
            if method not in SUPPORTED_METHODS:
                raise ProposalSyntaxError(f"key exchange method {method.name} is not supported")
        if protocol == ProtocolId.IKE:
            if not ke:
                raise ProposalSyntaxError(f"IKE proposal {text!r} has no key exchange method")
            if not prf:
                if integ:
                    prf = [_INTEG_TO_PRF[i.integ_id] for i in integ]
                else:
                    raise ProposalSyntaxError(f"IKE proposal {text!r} with AEAD needs a PRF (e.g. prfsha256)")
            if esn:
                raise ProposalSyntaxError("ESN is an ESP/AH transform")
            esn_t: tuple[EsnId, ...] = ()
        else:
            if prf:
                raise ProposalSyntaxError("a PRF is an IKE transform")
            esn_t = tuple(esn) or (EsnId.NO_ESN,)
        return cls(
            protocol,
            tuple(encr),
            tuple(integ),
            tuple(prf),
            tuple(ke),
            tuple(sorted((t, tuple(v)) for t, v in addke.items())),
            esn_t,
        )

    @property
    def has_additional_ke(self) -> bool:
        return bool(self.additional_ke)

    def without_ke(self) -> ProposalSpec:
        """This proposal without key exchanges: what a Child SA in IKE_AUTH offers (§1.2)."""
        return ProposalSpec(self.protocol, self.encr, self.integ, self.prf, (), (), self.esn)

    def with_ke_first(self, method: KeId) -> ProposalSpec:
        ke = (method, *(m for m in self.ke if m != method)) if method in self.ke else self.ke
        return ProposalSpec(self.protocol, self.encr, self.integ, self.prf, ke, self.additional_ke, self.esn)

    def transforms(self) -> tuple[Transform, ...]:
        out = [_encr_transform(a) for a in self.encr]
        out += [Transform(TransformType.PRF, p) for p in self.prf]
        out += [Transform(TransformType.INTEG, i.integ_id) for i in self.integ]
        out += [Transform(TransformType.KE, k) for k in self.ke]
        for ttype, methods in self.additional_ke:
            out += [Transform(ttype, k) for k in methods]
        if self.protocol != ProtocolId.IKE:
            out += [Transform(TransformType.ESN, e) for e in self.esn]
        return tuple(out)

    def to_proposal(self, number: int, spi: bytes) -> Proposal:
        return Proposal(number, self.protocol, spi, self.transforms())

    def __str__(self) -> str:
        parts = [a.name for a in self.encr] + [f"prf{p.name}" for p in self.prf] + [i.name for i in self.integ]
        parts += [k.name.lower() for k in self.ke]
        parts += [f"ke{t - TransformType.ADDKE1 + 1}_{k.name.lower()}" for t, ks in self.additional_ke for k in ks]
        return "-".join(parts)


@dataclass(frozen=True, slots=True)
class Suite:
    """Negotiated transforms: exactly one per type present (`encr` None only for AH)."""

    protocol: ProtocolId
    encr: EncrAlgorithm | None
    integ: IntegAlgorithm | None = None
    prf: PrfId | None = None
    ke: KeId = KeId.NONE
    additional_ke: tuple[tuple[TransformType, KeId], ...] = ()
    esn: EsnId = EsnId.NO_ESN
    number: int = 1
    spi: bytes = field(default=b"")

    @property
    def cipher(self) -> EncrAlgorithm:
        """The encryption algorithm of an IKE or ESP suite (AH has none)."""
        if self.encr is None:
            raise ValueError(f"a {self.protocol.name} suite has no encryption algorithm")
        return self.encr

    def to_proposal(self) -> Proposal:
        t = [_encr_transform(self.encr)] if self.encr is not None else []
        if self.prf is not None:
            t.append(Transform(TransformType.PRF, self.prf))
        if self.integ is not None:
            t.append(Transform(TransformType.INTEG, self.integ.integ_id))
        if self.ke != KeId.NONE:
            t.append(Transform(TransformType.KE, self.ke))
        t += [Transform(tt, k) for tt, k in self.additional_ke]
        if self.protocol != ProtocolId.IKE:
            t.append(Transform(TransformType.ESN, self.esn))
        return Proposal(self.number, self.protocol, self.spi, tuple(t))

    def describe(self) -> str:
        parts = [self.encr.name] if self.encr is not None else []
        if self.integ:
            parts.append(self.integ.name)
        if self.prf is not None:
            parts.append(f"prf{self.prf.name}")
        if self.ke:
            parts.append(self.ke.name.lower())
        parts += [f"ke{t - TransformType.ADDKE1 + 1}_{k.name.lower()}" for t, k in self.additional_ke]
        return "-".join(parts)


def _received_encr(t: Transform) -> EncrAlgorithm | None:
    for a in ENCR_KEYWORDS.values():
        if a.encr_id == t.id and (a.encr_id == EncrId.CHACHA20_POLY1305 or a.key_bits == t.key_length):
            if a.encr_id == EncrId.CHACHA20_POLY1305 and t.key_length is not None:
                return None
            return a
    return None


_KNOWN_TYPES = {int(t) for t in TransformType}


@dataclass(frozen=True, slots=True)
class _SpecTable:
    """A ProposalSpec flattened to plain ints for fast matching (built once per spec)."""

    encr: tuple[tuple[tuple[int, int | None], EncrAlgorithm], ...]
    integ: tuple[tuple[int, IntegAlgorithm], ...]
    prf: tuple[int, ...]
    ke: tuple[int, ...]
    addke: dict[int, tuple[int, ...]]
    esn: tuple[int, ...]


@functools.lru_cache(maxsize=512)
def _table(spec: ProposalSpec) -> _SpecTable:
    encr = tuple(((t.id, t.key_length), a) for a in spec.encr for t in (_encr_transform(a),))
    return _SpecTable(
        encr,
        tuple((int(i.integ_id), i) for i in spec.integ),
        tuple(int(p) for p in spec.prf),
        tuple(int(k) for k in spec.ke),
        {int(t): tuple(int(k) for k in ks) for t, ks in spec.additional_ke},
        tuple(int(e) for e in spec.esn),
    )


RxTable = dict[int, set[tuple[int, int | None]]]
_T_ENCR, _T_PRF, _T_INTEG, _T_KE, _T_ESN = (int(t) for t in (TransformType.ENCR, TransformType.PRF,
                                              TransformType.INTEG, TransformType.KE, TransformType.ESN))  # fmt: skip
_ADDKE = tuple(int(t) for t in ADDKE_TYPES)
_NO_ESN = {(int(EsnId.NO_ESN), None)}


def _rx_table(received: Proposal) -> RxTable | None:
    """Received transforms by type as (id, key length); None if any is unknown (§3.3.6)."""
    rx: RxTable = {}
    for t in received.transforms:
        if t.type not in _KNOWN_TYPES or t.unknown_attrs:
            return None
        rx.setdefault(t.type, set()).add((t.id, t.key_length))
    return rx


def _ids(rx: RxTable, ttype: int) -> set[int]:
    return {i for i, _ in rx.get(ttype, ())}


def match_proposal(
    received: Proposal,
    spec: ProposalSpec,
    *,
    ignore_ke: bool = False,
    rx: RxTable | None = None,
    prefer_ke: int = 0,
) -> Suite | None:
    """The suite both `received` and `spec` allow, preferring `spec`'s order; None if none.

    `prefer_ke` is the method of the KE payload the initiator sent: when it is acceptable it
    wins over our order, so no INVALID_KE_PAYLOAD round trip is needed (§1.2).
    """
    if received.protocol != spec.protocol:
        return None
    if rx is None:
        rx = _rx_table(received)
        if rx is None:
            return None
    tab = _table(spec)
    rx_encr = rx.get(_T_ENCR, set())
    encr = next((a for key, a in tab.encr if key in rx_encr), None)
    if encr is None and (tab.encr or rx_encr):  # only AH (no encryption on either side) goes without
        return None
    rx_integ = _ids(rx, _T_INTEG) - {0}
    integ = None
    if tab.integ:
        integ = next((a for i, a in tab.integ if i in rx_integ), None)
        if integ is None:
            return None
    elif rx_integ:
        return None
    prf = None
    if spec.protocol == ProtocolId.IKE:
        rx_prf = _ids(rx, _T_PRF)
        found_prf = next((p for p in tab.prf if p in rx_prf), None)
        if found_prf is None:
            return None
        prf = PrfId(found_prf)
    ke = KeId.NONE
    additional: list[tuple[TransformType, KeId]] = []
    if not ignore_ke:
        rx_ke = _ids(rx, _T_KE)
        if tab.ke:
            if prefer_ke and prefer_ke in rx_ke and prefer_ke in tab.ke:
                found: int | None = prefer_ke
            else:
                found = next((k for k in tab.ke if k in rx_ke), None)
            if found is None:
                return None
            ke = KeId(found)
        elif rx_ke - {0} and 0 not in rx_ke:
            return None
        for ttype in _ADDKE:
            rx_add = _ids(rx, ttype)
            mine = tab.addke.get(ttype, ())
            if mine:
                found = next((k for k in mine if k in rx_add), None)
                if found is None:
                    return None
                additional.append((TransformType(ttype), KeId(found)))
            elif rx_add - {0} and 0 not in rx_add:
                return None
    esn = EsnId.NO_ESN
    if spec.protocol != ProtocolId.IKE:
        rx_esn = _ids(rx, _T_ESN) or {int(EsnId.NO_ESN)}
        found_esn = next((e for e in tab.esn if e in rx_esn), None)
        if found_esn is None:
            return None
        esn = EsnId(found_esn)
    return Suite(spec.protocol, encr, integ, prf, ke, tuple(additional), esn, received.number, received.spi)


def select(
    received: Sequence[Proposal], specs: Sequence[ProposalSpec], *, ignore_ke: bool = False, prefer_ke: int = 0
) -> Suite | None:
    """Responder selection: configured order first (strongSwan's prefer_configured_proposals)."""
    tables = [(prop, _rx_table(prop)) for prop in received]
    for spec in specs:
        for prop, rx in tables:
            if rx is None:
                continue
            suite = match_proposal(prop, spec, ignore_ke=ignore_ke, rx=rx, prefer_ke=prefer_ke)
            if suite is not None:
                return suite
    return None


def verify_chosen(chosen: Proposal, offered: Sequence[Proposal], *, ignore_ke: bool = False) -> Suite | None:
    """Initiator check of the responder's choice: one transform per type, all from one offered proposal."""
    types = [t.type for t in chosen.transforms]
    if len(types) != len(set(types)):
        return None
    for prop in offered:
        if prop.number != chosen.number or prop.protocol != chosen.protocol:
            continue
        if not all(t in prop.transforms for t in chosen.transforms):
            return None
        spec = spec_of_proposal(chosen)
        if spec is None:
            return None
        return match_proposal(chosen, spec, ignore_ke=ignore_ke)
    return None


def spec_of_proposal(p: Proposal) -> ProposalSpec | None:
    """A spec that accepts exactly the transforms of `p` (used to decode a choice)."""
    encr = tuple(a for a in (_received_encr(t) for t in p.transforms_of(TransformType.ENCR)) if a)
    if not encr and p.protocol != ProtocolId.AH:
        return None
    integ = []
    for t in p.transforms_of(TransformType.INTEG):
        if t.id == 0:
            continue
        match = next((i for i in INTEG_KEYWORDS.values() if i.integ_id == t.id), None)
        if match is None:
            return None
        integ.append(match)
    prf: list[PrfId] = []
    for t in p.transforms_of(TransformType.PRF):
        try:
            prf.append(PrfId(t.id))
        except ValueError:
            return None
    ke: list[KeId] = []
    for t in p.transforms_of(TransformType.KE):
        if t.id == 0:
            continue
        try:
            ke.append(KeId(t.id))
        except ValueError:
            return None
    add: list[tuple[TransformType, tuple[KeId, ...]]] = []
    for ttype in ADDKE_TYPES:
        ids = [t.id for t in p.transforms_of(ttype) if t.id != 0]
        if ids:
            try:
                add.append((ttype, tuple(KeId(i) for i in ids)))
            except ValueError:
                return None
    esn: tuple[EsnId, ...] = ()
    if p.protocol != ProtocolId.IKE:
        try:
            esn = tuple(EsnId(t.id) for t in p.transforms_of(TransformType.ESN)) or (EsnId.NO_ESN,)
        except ValueError:
            return None
    try:
        protocol = ProtocolId(p.protocol)
    except ValueError:
        return None
    return ProposalSpec(protocol, encr, tuple(dict.fromkeys(integ)), tuple(prf), tuple(ke), tuple(add), esn)


def ke_retry_method(notify_data: bytes, offered: Iterable[ProposalSpec], current: int) -> int:
    """The key exchange method an INVALID_KE_PAYLOAD asks for (its first two octets), if a retry
    may use it: one `offered` names, and not the one just refused (RFC 7296 §1.2, §1.3, §2.7;
    anything else is the peer's error). 0: no retry."""
    wanted = int.from_bytes(notify_data[:2], "big") if len(notify_data) >= 2 else 0
    if wanted == current or wanted not in {int(m) for spec in offered for m in spec.ke}:
        return 0
    return wanted
