"""`ListSas`: what `swanctl --list-sas` shows, from the engine's state and the dataplane's
counters. Engine times are monotonic; the API shows wall-clock seconds."""

from __future__ import annotations

import time
from collections.abc import Mapping

from esplanade.ipsec.transforms import KeId
from esplanade.keyexchange.dataplane_follower import ChildCounters
from esplanade.keyexchange.ikev2.child_sa import ChildSa
from esplanade.keyexchange.ikev2.ike_sa import IkeSa
from esplanade.keyexchange.ikev2.proposals import Suite
from esplanade.v1 import keyexchange_pb2


def _ke_name(ke: int) -> str:
    if not ke:
        return ""
    try:
        return KeId(ke).name.lower()
    except ValueError:
        return str(ke)


def _suite_names(suite: Suite | None) -> tuple[str, str, str, str, list[str]]:
    if suite is None:
        return "", "", "", "", []
    encr = suite.encr.name if suite.encr is not None else ""
    integ = suite.integ.name if suite.integ else ""
    prf = "" if suite.prf is None else suite.prf.name.lower()
    return encr, integ, prf, _ke_name(suite.ke), [_ke_name(k) for _, k in suite.additional_ke]


class Clock:
    """Monotonic engine times to wall-clock seconds."""

    def __init__(self, mono_now: float, wall_now: float | None = None) -> None:
        self.offset = (time.time() if wall_now is None else wall_now) - mono_now

    def wall(self, t: float | None) -> float:
        return t + self.offset if t else 0.0


def child_info(c: ChildSa, counters: ChildCounters | None, clock: Clock, reqid: int) -> keyexchange_pb2.ChildSaInfo:
    encr, integ, _, ke, _ = _suite_names(c.suite)
    n = counters or ChildCounters()
    return keyexchange_pb2.ChildSaInfo(
        id=c.id,
        name=c.name,
        state=c.state.value.upper(),
        spi_in=c.spi_in,
        spi_out=c.spi_out,
        mode=c.mode.name.lower(),
        protocol="esp",
        encr=encr,
        integ=integ,
        ke=ke,
        local_ts=[str(t) for t in c.local_ts],
        remote_ts=[str(t) for t in c.remote_ts],
        bytes_in=n.bytes_in,
        bytes_out=n.bytes_out,
        packets_in=n.packets_in,
        packets_out=n.packets_out,
        established_at=clock.wall(c.created_at),
        rekey_at=clock.wall(c.rekey_at),
        expire_at=clock.wall(c.expire_at),
        rekey_of=c.rekey_of,
        reqid=reqid,
    )


def ike_info(
    sa: IkeSa,
    counters: Mapping[str, ChildCounters],
    clock: Clock,
    owner: str,
    reqids: Mapping[str, int],
) -> keyexchange_pb2.IkeSaInfo:
    encr, integ, prf, ke, additional = _suite_names(sa.suite)
    info = keyexchange_pb2.IkeSaInfo(
        id=sa.id,
        connection=sa.config.name,
        state=sa.state.value.upper(),
        initiator=sa.initiator,
        local_addr=sa.local[0],
        local_port=sa.local[1],
        remote_addr=sa.remote[0],
        remote_port=sa.remote[1],
        local_id=str(sa.config.local.id),
        remote_id=sa.remote_identity_text(),
        spi_i=sa.spi_i.hex(),
        spi_r=sa.spi_r.hex(),
        encr=encr,
        integ=integ,
        prf=prf,
        ke=ke,
        additional_ke=additional,
        nat_local=sa.nat_local,
        nat_remote=sa.nat_remote,
        established_at=clock.wall(sa.established_at),
        rekey_at=clock.wall(sa.rekey_at),
        reauth_at=clock.wall(sa.reauth_at),
        virtual_ips=list(sa.virtual_ips or sa.assigned_ips),
        owner=owner,
    )
    for c in sa.children.values():
        info.children.append(child_info(c, counters.get(c.id), clock, reqids.get(c.id, 0)))
    return info
