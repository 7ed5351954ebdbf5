"""Deleting the IKE SA (RFC 7296 §1.4.1): INFORMATIONAL with Delete(IKE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from esplanade.ipsec.transforms import ProtocolId
from esplanade.keyexchange.ikev2.constants import ExchangeType
from esplanade.keyexchange.ikev2.ike_sa import IkeState
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import DeletePayload, Payload
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


class IkeDelete(Task):
    name = "ike_delete"
    exchange = ExchangeType.INFORMATIONAL

    def __init__(self, reason: str = "deleted") -> None:
        super().__init__()
        self.reason = reason

    def can_start(self, ike: IkeSa) -> bool:
        return ike.state not in (IkeState.DELETED, IkeState.CREATED)

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        if ike.state != IkeState.DELETING:
            ike.set_state(IkeState.DELETING)
        return [DeletePayload(ProtocolId.IKE)]

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        ike.destroy(self.reason)
        return False

    def on_timeout(self, ike: IkeSa) -> None:
        ike.destroy(self.reason)

    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        reason = "rekeyed" if ike.state == IkeState.REKEYED else "deleted by peer"
        self.after_send.append(lambda _now: ike.destroy(reason))
        return []
