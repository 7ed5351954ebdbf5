"""Security Association records: what keyexchange negotiates and the dataplane installs.

An SA is one direction of a Child SA. `ChildSaRecord` is the inbound/outbound pair that the
store holds (key schema: `esplanade.store.schema`), with the keys sealed by
`esplanade.store.sealing` before they are written. The engines (userspace ESP, kernel
XFRM) take `SecurityAssociation` objects; they never see the store's JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import (
    ENCR_ALGORITHMS,
    INTEG_ALGORITHMS,
    Direction,
    EncrAlgorithm,
    IntegAlgorithm,
    IpProto,
    Mode,
)

# A function that seals (or opens) one secret field; the field name is bound into the AEAD.
SealField = Callable[[str, bytes], str]
OpenField = Callable[[str, str], bytes]

MIN_REPLAY_WINDOW = 32
MAX_REPLAY_WINDOW = 1 << 16


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Soft and hard limits; 0 means "no limit". Soft must come before hard."""

    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0
    soft_seconds: int = 0
    hard_seconds: int = 0

    def validate(self) -> None:
        for kind in ("bytes", "packets", "seconds"):
            soft, hard = getattr(self, f"soft_{kind}"), getattr(self, f"hard_{kind}")
            if soft < 0 or hard < 0:
                raise ValueError(f"negative {kind} lifetime")
            if soft and hard and soft >= hard:
                raise ValueError(f"soft {kind} lifetime {soft} is not below hard {hard}")


@dataclass(frozen=True, slots=True)
class UdpEncap:
    """ESP-in-UDP (RFC 3948) ports of the outer UDP header, as sent by this side."""

    src_port: int = 4500
    dst_port: int = 4500


@dataclass(frozen=True, slots=True)
class TfcPolicy:
    """Traffic-flow confidentiality (RFC 4303 §2.4, §2.7)."""

    pad_to: int = 0  # pad each inner packet up to this many bytes (0: no TFC padding)
    dummy_interval_ms: int = 0  # send a dummy packet (next header 59) this often (0: never)


@dataclass(frozen=True, slots=True)
class SecurityAssociation:
    """One direction of an ESP or AH SA, keyed.

    `src`/`dst` are the outer addresses as they appear on the wire in this SA's direction.
    `encr_key` is KEYMAT for the encryption transform (cipher key followed by the salt for
    AEAD transforms). For AH, `encr` is None.
    """

    spi: int
    direction: Direction
    src: str
    dst: str
    protocol: IpProto = IpProto.ESP
    mode: Mode = Mode.TUNNEL
    encr: EncrAlgorithm | None = None
    encr_key: bytes = field(default=b"", repr=False)
    integ: IntegAlgorithm | None = None
    integ_key: bytes = field(default=b"", repr=False)
    esn: bool = False
    replay_window: int = 64
    encap: UdpEncap | None = None
    lifetime: Lifetime = Lifetime()
    tfc: TfcPolicy = TfcPolicy()
    local_ts: tuple[TrafficSelector, ...] = ()
    remote_ts: tuple[TrafficSelector, ...] = ()
    reqid: int = 0
    if_id: int = 0
    mark: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first thing wrong with this SA."""
        if not 256 <= self.spi <= 0xFFFFFFFF:
            raise ValueError(f"SPI {self.spi:#x} is reserved or out of range (RFC 4303 §2.1)")
        if self.protocol == IpProto.ESP:
            if self.encr is None:
                raise ValueError("ESP SA without an encryption transform")
            if len(self.encr_key) != self.encr.keymat_bytes:
                raise ValueError(
                    f"{self.encr.name} needs {self.encr.keymat_bytes} bytes of key material, got {len(self.encr_key)}"
                )
            if self.encr.aead and self.integ is not None:
                raise ValueError(f"{self.encr.name} is AEAD and takes no integrity transform")
            if not self.encr.aead and self.integ is None:
                raise ValueError(f"{self.encr.name} needs an integrity transform")
        elif self.protocol == IpProto.AH:
            if self.encr is not None:
                raise ValueError("AH SA with an encryption transform")
            if self.integ is None:
                raise ValueError("AH SA without an integrity transform")
            if self.encap is not None:
                raise ValueError("AH cannot be UDP-encapsulated: it cannot cross NAT (RFC 3948)")
        else:
            raise ValueError(f"IPsec protocol {self.protocol} is neither ESP nor AH")
        if self.integ is not None and len(self.integ_key) != self.integ.key_bytes:
            raise ValueError(f"{self.integ.name} needs a {self.integ.key_bytes}-byte key, got {len(self.integ_key)}")
        if self.direction == Direction.IN and not (
            MIN_REPLAY_WINDOW <= self.replay_window <= MAX_REPLAY_WINDOW or self.replay_window == 0
        ):
            raise ValueError(
                f"replay window {self.replay_window} outside {MIN_REPLAY_WINDOW}..{MAX_REPLAY_WINDOW}"
                " (0 disables anti-replay)"
            )
        self.lifetime.validate()

    def with_keys_removed(self) -> SecurityAssociation:
        return replace(self, encr_key=b"", integ_key=b"")

    # -- documents (store JSON) ---------------------------------------------------------
    def to_document(self, seal: SealField, prefix: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "spi": self.spi,
            "direction": self.direction.name.lower(),
            "src": self.src,
            "dst": self.dst,
            "protocol": self.protocol.name.lower(),
            "mode": self.mode.name.lower(),
            "encr": self.encr.name if self.encr else None,
            "integ": self.integ.name if self.integ else None,
            "esn": self.esn,
            "replay_window": self.replay_window,
            "encap": [self.encap.src_port, self.encap.dst_port] if self.encap else None,
            "lifetime": _lifetime_doc(self.lifetime),
            "tfc": {"pad_to": self.tfc.pad_to, "dummy_interval_ms": self.tfc.dummy_interval_ms},
            "local_ts": [str(t) for t in self.local_ts],
            "remote_ts": [str(t) for t in self.remote_ts],
            "reqid": self.reqid,
            "if_id": self.if_id,
            "mark": self.mark,
        }
        if self.encr_key:
            doc["encr_key"] = seal(f"{prefix}.encr_key", self.encr_key)
        if self.integ_key:
            doc["integ_key"] = seal(f"{prefix}.integ_key", self.integ_key)
        return doc

    @classmethod
    def from_document(cls, doc: dict[str, Any], open_: OpenField, prefix: str) -> SecurityAssociation:
        encap = doc.get("encap")
        return cls(
            spi=int(doc["spi"]),
            direction=Direction[doc["direction"].upper()],
            src=doc["src"],
            dst=doc["dst"],
            protocol=IpProto[doc["protocol"].upper()],
            mode=Mode[doc["mode"].upper()],
            encr=ENCR_ALGORITHMS[doc["encr"]] if doc.get("encr") else None,
            encr_key=open_(f"{prefix}.encr_key", doc["encr_key"]) if doc.get("encr_key") else b"",
            integ=INTEG_ALGORITHMS[doc["integ"]] if doc.get("integ") else None,
            integ_key=open_(f"{prefix}.integ_key", doc["integ_key"]) if doc.get("integ_key") else b"",
            esn=bool(doc.get("esn", False)),
            replay_window=int(doc.get("replay_window", 64)),
            encap=UdpEncap(int(encap[0]), int(encap[1])) if encap else None,
            lifetime=Lifetime(**doc.get("lifetime", {})),
            tfc=TfcPolicy(**doc.get("tfc", {})),
            local_ts=tuple(TrafficSelector.parse(t) for t in doc.get("local_ts", [])),
            remote_ts=tuple(TrafficSelector.parse(t) for t in doc.get("remote_ts", [])),
            reqid=int(doc.get("reqid", 0)),
            if_id=int(doc.get("if_id", 0)),
            mark=int(doc.get("mark", 0)),
        )


def _lifetime_doc(lt: Lifetime) -> dict[str, int]:
    return {k: getattr(lt, k) for k in Lifetime.__slots__}


@dataclass(frozen=True, slots=True)
class ChildSaRecord:
    """A negotiated Child SA: the inbound and outbound SA, and who they belong to.

    `created_at` is wall-clock seconds (it must survive restarts and failover: seconds
    lifetimes count from it). `identity` is the authenticated peer identity that the
    policy filters of the dataplane apply to. `governed_by` is the policy identity that governed
    the peer when the IKE SA was authenticated ("": not governed): a dataplane that finds the
    identity no longer binding (even one that never saw the SA governed, after a restart) gives
    the SA the empty filter instead of none.
    """

    id: str
    connection: str
    child: str
    ike_sa: str
    identity: str
    inbound: SecurityAssociation
    outbound: SecurityAssociation
    created_at: float
    rekey_of: str = ""
    trace_context: dict[str, str] = field(default_factory=dict)
    governed_by: str = ""

    def validate(self) -> None:
        if self.inbound.direction != Direction.IN or self.outbound.direction != Direction.OUT:
            raise ValueError("a Child SA needs one inbound and one outbound SA")
        self.inbound.validate()
        self.outbound.validate()

    def to_document(self, seal: SealField) -> dict[str, Any]:
        return {
            "id": self.id,
            "connection": self.connection,
            "child": self.child,
            "ike_sa": self.ike_sa,
            "identity": self.identity,
            "inbound": self.inbound.to_document(seal, "inbound"),
            "outbound": self.outbound.to_document(seal, "outbound"),
            "created_at": self.created_at,
            "rekey_of": self.rekey_of,
            "trace_context": self.trace_context,
            "governed_by": self.governed_by,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any], open_: OpenField) -> ChildSaRecord:
        return cls(
            id=doc["id"],
            connection=doc["connection"],
            child=doc["child"],
            ike_sa=doc["ike_sa"],
            identity=doc.get("identity", ""),
            inbound=SecurityAssociation.from_document(doc["inbound"], open_, "inbound"),
            outbound=SecurityAssociation.from_document(doc["outbound"], open_, "outbound"),
            created_at=float(doc["created_at"]),
            rekey_of=doc.get("rekey_of", ""),
            trace_context=dict(doc.get("trace_context", {})),
            governed_by=str(doc.get("governed_by", "")),
        )
