"""Two `EspTransform`s keyed as the two ends of one Child SA, driven through their control ops."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from esplanade.dataplane.esp.sa_state import ReplayPersistence, SequenceReservation
from esplanade.dataplane.fastpath.hot_path import HotPathSetting
from esplanade.dataplane.userspace.esp_transform import EspTransform
from esplanade.dataplane.userspace.sa_messages import association_document, policy_document
from esplanade.dataplane.userspace.transform import WorkerContext
from esplanade.ipsec.sa import Lifetime, SecurityAssociation, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import ENCR_AES_GCM_16_128, Direction, EncrAlgorithm, IntegAlgorithm

A_NET, B_NET = "10.1.0.0/16", "10.2.0.0/16"
A_ADDR, B_ADDR = "192.0.2.1", "192.0.2.2"
SPI_AB, SPI_BA = 0x1001, 0x2002


@dataclass
class Keys:
    encr: EncrAlgorithm = ENCR_AES_GCM_16_128
    integ: IntegAlgorithm | None = None
    key_ab: bytes = field(default_factory=lambda: os.urandom(20))
    key_ba: bytes = field(default_factory=lambda: os.urandom(20))
    integ_ab: bytes = b""
    integ_ba: bytes = b""
    udp: bool = True
    lifetime: Lifetime = field(default_factory=Lifetime)
    replay_window: int = 64


def association(
    keys: Keys,
    *,
    spi: int,
    direction: Direction,
    src: str,
    dst: str,
    key: bytes,
    integ_key: bytes,
    local: str,
    remote: str,
) -> SecurityAssociation:
    return SecurityAssociation(
        spi=spi,
        direction=direction,
        src=src,
        dst=dst,
        encr=keys.encr,
        encr_key=key,
        integ=keys.integ,
        integ_key=integ_key,
        encap=UdpEncap() if keys.udp else None,
        replay_window=keys.replay_window,
        lifetime=keys.lifetime,
        local_ts=(TrafficSelector.from_network(local),),
        remote_ts=(TrafficSelector.from_network(remote),),
    )


def install_message(
    keys: Keys,
    side: str,
    *,
    child: str = "c1",
    owner: int = 0,
    next_seq: int = 1,
    reserved: int = 1 << 30,
    floor: int = 0,
    created_at: float = 0.0,
) -> dict[str, Any]:
    if side == "a":
        inbound = association(
            keys,
            spi=SPI_BA,
            direction=Direction.IN,
            src=B_ADDR,
            dst=A_ADDR,
            key=keys.key_ba,
            integ_key=keys.integ_ba,
            local=A_NET,
            remote=B_NET,
        )
        outbound = association(
            keys,
            spi=SPI_AB,
            direction=Direction.OUT,
            src=A_ADDR,
            dst=B_ADDR,
            key=keys.key_ab,
            integ_key=keys.integ_ab,
            local=A_NET,
            remote=B_NET,
        )
    else:
        inbound = association(
            keys,
            spi=SPI_AB,
            direction=Direction.IN,
            src=A_ADDR,
            dst=B_ADDR,
            key=keys.key_ab,
            integ_key=keys.integ_ab,
            local=B_NET,
            remote=A_NET,
        )
        outbound = association(
            keys,
            spi=SPI_BA,
            direction=Direction.OUT,
            src=B_ADDR,
            dst=A_ADDR,
            key=keys.key_ba,
            integ_key=keys.integ_ba,
            local=B_NET,
            remote=A_NET,
        )
    return {
        "child_sa": child,
        "owner": owner,
        "inbound": association_document(inbound, "inbound"),
        "outbound": association_document(outbound, "outbound"),
        "next_seq": next_seq,
        "reserved_upto": reserved,
        "replay_floor": floor,
        "created_at": created_at,
    }


def policies(
    side: str, *, child: str = "c1", action: PolicyAction = PolicyAction.PROTECT, trap: bool = False
) -> list[SpdPolicy]:
    local, remote = (A_NET, B_NET) if side == "a" else (B_NET, A_NET)
    return [
        SpdPolicy(
            id=f"{child}-{d.name.lower()}",
            direction=d,
            local_ts=TrafficSelector.from_network(local),
            remote_ts=TrafficSelector.from_network(remote),
            action=action,
            child_sa=child,
            trap=trap,
        )
        for d in (PolicyDirection.OUT, PolicyDirection.IN)
    ]


# The hot path `make_transform` and `keyed_pair` build when not told (test modules parametrize it).
DEFAULT_HOT_PATH: list[HotPathSetting] = ["python"]


def make_transform(
    fast_lane: bool = True,
    *,
    block: int = 1 << 20,
    replay_block: int = 1 << 16,
    hot_path: HotPathSetting | None = None,
    context: WorkerContext | None = None,
) -> EspTransform:
    hot_path = hot_path or DEFAULT_HOT_PATH[0]
    return EspTransform(
        context or WorkerContext(0, 1),
        reservation=SequenceReservation(block=block, low_water=block // 4),
        replay_persistence=ReplayPersistence(block=replay_block),
        fast_lane=fast_lane,
        hot_path=hot_path,
    )


def control(transform: EspTransform, op: str, now: float = 0.0, **message: Any) -> dict[str, object]:
    reply = transform.handle_control(op, {"op": op, **message}, now)
    assert reply.get("ok"), reply
    return reply


def keyed_pair(
    keys: Keys,
    *,
    fast_lane: bool = True,
    now: float = 0.0,
    block: int = 1 << 20,
    replay_block: int = 1 << 16,
    hot_path: HotPathSetting | None = None,
    hot_path_b: HotPathSetting | None = None,
    **install: Any,
) -> tuple[EspTransform, EspTransform]:
    a = make_transform(fast_lane, block=block, replay_block=replay_block, hot_path=hot_path)
    b = make_transform(fast_lane, block=block, replay_block=replay_block, hot_path=hot_path_b or hot_path)
    for transform, side in ((a, "a"), (b, "b")):
        control(transform, "install_sa", now, **install_message(keys, side, **install))
        for policy in policies(side):
            control(transform, "install_policy", now, policy=policy_document(policy))
    return a, b
