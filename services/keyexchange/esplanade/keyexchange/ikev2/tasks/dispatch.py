"""Which task answers a peer's request (responder side), by exchange type and content."""

from __future__ import annotations

from typing import TYPE_CHECKING

from esplanade.ipsec.transforms import ProtocolId
from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import DeletePayload, NotifyPayload, Payload, SaPayload, notify_of
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


class Refuse(Task):
    """Answer a request with one error notify (e.g. TEMPORARY_FAILURE while rekeying, §2.25)."""

    name = "refuse"

    def __init__(self, notify: NotifyType) -> None:
        super().__init__()
        self.notify = notify

    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        ike.count(f"refused_{self.notify.name.lower()}")
        return [NotifyPayload(self.notify)]


def responder_task(ike: IkeSa, msg: Message) -> Task:
    from esplanade.keyexchange.ikev2.ike_sa import IkeState
    from esplanade.keyexchange.ikev2.tasks import (
        child_create,
        child_delete,
        child_rekey,
        ike_auth,
        ike_delete,
        ike_dpd,
        ike_init,
        ike_intermediate,
        ike_rekey,
    )

    ex = msg.exchange
    if ex == ExchangeType.IKE_SA_INIT:
        return ike_init.IkeInit()
    if ex == ExchangeType.IKE_INTERMEDIATE:
        return ike_intermediate.IkeIntermediate()
    if ex == ExchangeType.IKE_AUTH:
        return ike_auth.IkeAuth()
    if ex == ExchangeType.IKE_FOLLOWUP_KE:
        from esplanade.keyexchange.ikev2.tasks.ike_followup_ke import FollowupKe

        return FollowupKe()
    if ex == ExchangeType.CREATE_CHILD_SA:
        if ike.state in (IkeState.REKEYED, IkeState.DELETING):
            return Refuse(NotifyType.TEMPORARY_FAILURE)
        if notify_of(msg.payloads, NotifyType.REKEY_SA) is not None:
            if ike.state == IkeState.REKEYING and ike.ike_rekey_task is not None:
                return Refuse(NotifyType.TEMPORARY_FAILURE)
            return child_rekey.ChildRekey("")
        sa = next((p for p in msg.payloads if isinstance(p, SaPayload)), None)
        if sa is not None and any(p.protocol == ProtocolId.IKE for p in sa.proposals):
            return ike_rekey.IkeRekey()
        if ike.state == IkeState.REKEYING:
            return Refuse(NotifyType.TEMPORARY_FAILURE)
        return child_create.ChildCreate("")
    deletes = [p for p in msg.payloads if isinstance(p, DeletePayload)]
    if any(d.protocol == ProtocolId.IKE for d in deletes):
        return ike_delete.IkeDelete("deleted by peer")
    if deletes:
        return child_delete.ChildDelete([])
    return ike_dpd.IkeDpd()
