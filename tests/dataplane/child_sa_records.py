"""Child SA records and SPD policies for tests and benchmarks that need them but no real keys
or peers: 192.0.2.1 <-> 192.0.2.2, 10.1.0.0/16 === 10.2.0.0/16, AES-GCM-128, inbound SPI
`spi` and outbound SPI `spi + 1`; `put_record` writes one to the store as keyexchange does."""

from __future__ import annotations

from esplanade.ipsec.sa import ChildSaRecord, Lifetime, SecurityAssociation, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import ENCR_AES_GCM_16_128, Direction, Mode
from esplanade.store import schema
from esplanade.store.base import Store
from esplanade.store.sealing import Sealer, encode_document


def record(
    child_id: str, spi: int, *, mode: Mode = Mode.TUNNEL, lifetime: Lifetime = Lifetime(), encap: bool = True
) -> ChildSaRecord:
    def sa(direction: Direction, spi: int) -> SecurityAssociation:
        return SecurityAssociation(
            spi=spi,
            direction=direction,
            src="192.0.2.1",
            dst="192.0.2.2",
            mode=mode,
            encr=ENCR_AES_GCM_16_128,
            encr_key=bytes(range(20)),
            encap=UdpEncap() if encap else None,
            lifetime=lifetime,
            local_ts=(TrafficSelector.from_network("10.1.0.0/16"),),
            remote_ts=(TrafficSelector.from_network("10.2.0.0/16"),),
        )

    return ChildSaRecord(child_id, "conn", "net", "ike", "peer", sa(Direction.IN, spi), sa(Direction.OUT, spi + 1), 1.0)


def policy(policy_id: str) -> SpdPolicy:
    return SpdPolicy(
        policy_id,
        PolicyDirection.OUT,
        TrafficSelector.from_network("10.1.0.0/16"),
        TrafficSelector.from_network("10.2.0.0/16"),
    )


async def put_record(store: Store, sealer: Sealer, rec: ChildSaRecord) -> int:
    key = schema.child_sa(rec.id)
    return await store.put(key, encode_document(rec.to_document(sealer.bind(key).seal)))
