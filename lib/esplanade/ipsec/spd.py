"""Security Policy Database entries (RFC 4301 §4.4.1): what traffic is protected, bypassed or dropped.

keyexchange writes these next to the Child SAs it negotiates; the dataplane backends (userspace
SPD, kernel XFRM policies) install them. Lookup code lives with each backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import IpProto, Mode


class PolicyAction(IntEnum):
    PROTECT = 0
    BYPASS = 1
    DISCARD = 2


class PolicyDirection(IntEnum):
    """XFRM's three policy directions; `FWD` is traffic routed through this gateway."""

    IN = 0
    OUT = 1
    FWD = 2


@dataclass(frozen=True, slots=True)
class SpdPolicy:
    """One SPD entry.

    Lower `priority` values win, as in XFRM. For PROTECT, `child_sa` names the Child SA pair
    whose SAs carry the traffic and `tunnel_src`/`tunnel_dst` are the outer addresses of the
    template (empty in transport mode). `start_action_trap` marks an SPD entry without SAs
    that should trigger an on-demand negotiation (XFRM ACQUIRE, strongSwan's start_action=trap).
    """

    id: str
    direction: PolicyDirection
    local_ts: TrafficSelector
    remote_ts: TrafficSelector
    action: PolicyAction = PolicyAction.PROTECT
    priority: int = 1000
    child_sa: str = ""
    connection: str = ""
    protocol: IpProto = IpProto.ESP
    mode: Mode = Mode.TUNNEL
    tunnel_src: str = ""
    tunnel_dst: str = ""
    reqid: int = 0
    trap: bool = False
    if_id: int = 0
    mark: int = 0

    def to_document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "direction": self.direction.name.lower(),
            "local_ts": str(self.local_ts),
            "remote_ts": str(self.remote_ts),
            "action": self.action.name.lower(),
            "priority": self.priority,
            "child_sa": self.child_sa,
            "connection": self.connection,
            "protocol": self.protocol.name.lower(),
            "mode": self.mode.name.lower(),
            "tunnel_src": self.tunnel_src,
            "tunnel_dst": self.tunnel_dst,
            "reqid": self.reqid,
            "trap": self.trap,
            "if_id": self.if_id,
            "mark": self.mark,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> SpdPolicy:
        return cls(
            id=doc["id"],
            direction=PolicyDirection[doc["direction"].upper()],
            local_ts=TrafficSelector.parse(doc["local_ts"]),
            remote_ts=TrafficSelector.parse(doc["remote_ts"]),
            action=PolicyAction[doc.get("action", "protect").upper()],
            priority=int(doc.get("priority", 1000)),
            child_sa=doc.get("child_sa", ""),
            connection=doc.get("connection", ""),
            protocol=IpProto[doc.get("protocol", "esp").upper()],
            mode=Mode[doc.get("mode", "tunnel").upper()],
            tunnel_src=doc.get("tunnel_src", ""),
            tunnel_dst=doc.get("tunnel_dst", ""),
            reqid=int(doc.get("reqid", 0)),
            trap=bool(doc.get("trap", False)),
            if_id=int(doc.get("if_id", 0)),
            mark=int(doc.get("mark", 0)),
        )
