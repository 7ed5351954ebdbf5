"""Child SA state inside an IKE SA, and how its keys become `SecurityAssociation` records."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from esplanade.ipsec.sa import ChildSaRecord, Lifetime, SecurityAssociation, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import Direction, EsnId, IpProto, Mode, ProtocolId
from esplanade.keyexchange.ikev2.crypto.keymat import ChildKeys
from esplanade.keyexchange.ikev2.proposals import Suite


class ChildState(enum.Enum):
    INSTALLING = "installing"  # responder: inbound SA handed to the dataplane, response held
    INSTALLED = "installed"
    REKEYING = "rekeying"
    REKEYED = "rekeyed"  # replaced, waiting for the delete
    DELETING = "deleting"
    DELETED = "deleted"


@dataclass(slots=True)
class ChildSa:
    id: str
    name: str  # child config name
    spi_in: int
    spi_out: int
    suite: Suite
    keys: ChildKeys = field(repr=False)
    initiator: bool  # we initiated the exchange that created it
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    mode: Mode
    created_at: float
    rekey_at: float | None = None
    expire_at: float | None = None
    state: ChildState = ChildState.INSTALLED
    nonces: tuple[bytes, bytes] = field(default=(b"", b""), repr=False)
    rekey_of: str = ""

    @property
    def protocol(self) -> ProtocolId:
        """ESP or AH: what the SA payload negotiated (and what DELETE and REKEY_SA name)."""
        return self.suite.protocol

    def sas(
        self,
        local: tuple[str, int],
        remote: tuple[str, int],
        encap: bool,
        replay_window: int,
        lifetime: Lifetime = Lifetime(),
        if_ids: tuple[int, int] = (0, 0),
    ) -> tuple[SecurityAssociation, SecurityAssociation]:
        """(inbound, outbound); `if_ids` = (in, out) XFRM interface ids (route-based VPN)."""
        k = self.keys
        # §2.17: initiator->responder keys first
        encr_in, integ_in, encr_out, integ_out = (
            (k.encr_r, k.integ_r, k.encr_i, k.integ_i) if self.initiator else (k.encr_i, k.integ_i, k.encr_r, k.integ_r)
        )
        esn = self.suite.esn == EsnId.ESN
        protocol = IpProto.AH if self.suite.protocol == ProtocolId.AH else IpProto.ESP
        inbound = SecurityAssociation(
            spi=self.spi_in,
            direction=Direction.IN,
            src=remote[0],
            dst=local[0],
            protocol=protocol,
            mode=self.mode,
            encr=self.suite.encr,
            encr_key=encr_in,
            integ=self.suite.integ,
            integ_key=integ_in,
            esn=esn,
            replay_window=replay_window,
            encap=UdpEncap(remote[1], local[1]) if encap else None,
            lifetime=lifetime,
            local_ts=self.local_ts,
            remote_ts=self.remote_ts,
            if_id=if_ids[0],
        )
        outbound = SecurityAssociation(
            spi=self.spi_out,
            direction=Direction.OUT,
            src=local[0],
            dst=remote[0],
            protocol=protocol,
            mode=self.mode,
            encr=self.suite.encr,
            encr_key=encr_out,
            integ=self.suite.integ,
            integ_key=integ_out,
            esn=esn,
            replay_window=0,
            encap=UdpEncap(local[1], remote[1]) if encap else None,
            lifetime=lifetime,
            local_ts=self.local_ts,
            remote_ts=self.remote_ts,
            if_id=if_ids[1],
        )
        return inbound, outbound

    def record(
        self,
        connection: str,
        ike_sa: str,
        identity: str,
        local: tuple[str, int],
        remote: tuple[str, int],
        encap: bool,
        wall_time: float,
        replay_window: int = 32,
        lifetime: Lifetime = Lifetime(),
        if_ids: tuple[int, int] = (0, 0),
        governed_by: str = "",
    ) -> ChildSaRecord:
        inbound, outbound = self.sas(local, remote, encap, replay_window, lifetime, if_ids)
        return ChildSaRecord(
            id=self.id,
            connection=connection,
            child=self.name,
            ike_sa=ike_sa,
            identity=identity,
            inbound=inbound,
            outbound=outbound,
            created_at=wall_time,
            rekey_of=self.rekey_of,
            governed_by=governed_by,
        )
