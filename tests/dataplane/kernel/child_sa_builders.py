"""Static-key Child SAs and their policies for two peers, as keyexchange would hand them over.

`child_sa_pair()` returns the record for side A and the mirrored record for side B: A's
outbound SA is B's inbound SA (same SPI, same keys), and the other way round. Keys are
derived from the SPI so that both sides agree without talking.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from esplanade.ipsec.sa import ChildSaRecord, Lifetime, SecurityAssociation, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_AES_CBC_256,
    ENCR_AES_GCM_16_128,
    ENCR_AES_GCM_16_256,
    ENCR_CHACHA20_POLY1305,
    ENCR_NULL,
    INTEG_HMAC_SHA2_256_128,
    INTEG_HMAC_SHA2_384_192,
    INTEG_HMAC_SHA2_512_256,
    Direction,
    EncrAlgorithm,
    IntegAlgorithm,
    IpProto,
    Mode,
)


@dataclass(frozen=True)
class TransformCase:
    label: str
    protocol: IpProto
    encr: EncrAlgorithm | None = None
    integ: IntegAlgorithm | None = None


TRANSFORMS: tuple[TransformCase, ...] = (
    TransformCase("aes128gcm16", IpProto.ESP, ENCR_AES_GCM_16_128),
    TransformCase("aes256gcm16", IpProto.ESP, ENCR_AES_GCM_16_256),
    TransformCase("chacha20poly1305", IpProto.ESP, ENCR_CHACHA20_POLY1305),
    TransformCase("aes128-sha256", IpProto.ESP, ENCR_AES_CBC_128, INTEG_HMAC_SHA2_256_128),
    TransformCase("aes256-sha384", IpProto.ESP, ENCR_AES_CBC_256, INTEG_HMAC_SHA2_384_192),
    TransformCase("aes256-sha512", IpProto.ESP, ENCR_AES_CBC_256, INTEG_HMAC_SHA2_512_256),
    TransformCase("null-sha256", IpProto.ESP, ENCR_NULL, INTEG_HMAC_SHA2_256_128),
    TransformCase("ah-sha256", IpProto.AH, None, INTEG_HMAC_SHA2_256_128),
    TransformCase("ah-sha384", IpProto.AH, None, INTEG_HMAC_SHA2_384_192),
    TransformCase("ah-sha512", IpProto.AH, None, INTEG_HMAC_SHA2_512_256),
)
TRANSFORMS_BY_LABEL = {t.label: t for t in TRANSFORMS}


def key_material(spi: int, label: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{label}:{spi}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


@dataclass(frozen=True)
class Peer:
    outer: str  # the gateway address (outer IP header)
    inner: str  # the protected address (tunnel mode inner IP header)


def security_association(
    spi: int,
    direction: Direction,
    src: Peer,
    dst: Peer,
    transform: TransformCase,
    *,
    mode: Mode = Mode.TUNNEL,
    esn: bool = True,
    replay_window: int = 64,
    encap: bool = False,
    lifetime: Lifetime = Lifetime(),
    if_id: int = 0,
    mark: int = 0,
) -> SecurityAssociation:
    local, remote = (dst, src) if direction == Direction.IN else (src, dst)
    ts_of = (lambda p: p.inner) if mode == Mode.TUNNEL else (lambda p: p.outer)
    return SecurityAssociation(
        spi=spi,
        direction=direction,
        src=src.outer,
        dst=dst.outer,
        protocol=transform.protocol,
        mode=mode,
        encr=transform.encr,
        encr_key=key_material(spi, "encr", transform.encr.keymat_bytes) if transform.encr else b"",
        integ=transform.integ,
        integ_key=key_material(spi, "integ", transform.integ.key_bytes) if transform.integ else b"",
        esn=esn,
        replay_window=replay_window,
        encap=UdpEncap(4500, 4500) if encap else None,
        lifetime=lifetime,
        local_ts=(TrafficSelector.from_network(ts_of(local)),),
        remote_ts=(TrafficSelector.from_network(ts_of(remote)),),
        if_id=if_id,
        mark=mark,
    )


def child_sa_pair(
    name: str,
    a: Peer,
    b: Peer,
    transform: TransformCase,
    *,
    spi_ab: int = 0xA0000001,
    spi_ba: int = 0xB0000001,
    created_at: float = 0.0,
    **options: Any,
) -> tuple[ChildSaRecord, ChildSaRecord]:
    """(record for A, record for B) of one Child SA between A and B."""
    ab_out = security_association(spi_ab, Direction.OUT, a, b, transform, **options)
    ba_out = security_association(spi_ba, Direction.OUT, b, a, transform, **options)
    ab_in = replace(ab_out, direction=Direction.IN, local_ts=ab_out.remote_ts, remote_ts=ab_out.local_ts)
    ba_in = replace(ba_out, direction=Direction.IN, local_ts=ba_out.remote_ts, remote_ts=ba_out.local_ts)
    common: dict[str, Any] = {
        "connection": "test",
        "child": name,
        "ike_sa": "ike-" + name,
        "identity": "peer",
        "created_at": created_at,
    }
    record_a = ChildSaRecord(id=f"{name}-a", inbound=ba_in, outbound=ab_out, **common)
    record_b = ChildSaRecord(id=f"{name}-b", inbound=ab_in, outbound=ba_out, **common)
    return record_a, record_b


def protect_policies(
    record: ChildSaRecord,
    *,
    priority: int = 1000,
    if_id: int = 0,
    local_ts: TrafficSelector | None = None,
    remote_ts: TrafficSelector | None = None,
) -> list[SpdPolicy]:
    """OUT and IN PROTECT policies for a record, from its SAs' selectors and addresses."""
    out_sa, in_sa = record.outbound, record.inbound
    local = local_ts or out_sa.local_ts[0]
    remote = remote_ts or out_sa.remote_ts[0]
    base = SpdPolicy(
        id="",
        direction=PolicyDirection.OUT,
        local_ts=local,
        remote_ts=remote,
        action=PolicyAction.PROTECT,
        priority=priority,
        child_sa=record.id,
        protocol=out_sa.protocol,
        mode=out_sa.mode,
        if_id=if_id,
    )
    tunnel = out_sa.mode == Mode.TUNNEL
    return [
        replace(
            base,
            id=f"{record.id}-out",
            tunnel_src=out_sa.src if tunnel else "",
            tunnel_dst=out_sa.dst if tunnel else "",
        ),
        replace(
            base,
            id=f"{record.id}-in",
            direction=PolicyDirection.IN,
            tunnel_src=in_sa.src if tunnel else "",
            tunnel_dst=in_sa.dst if tunnel else "",
        ),
    ]
