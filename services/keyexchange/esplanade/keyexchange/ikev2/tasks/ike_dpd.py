"""Liveness checks (RFC 7296 §2.4): an empty INFORMATIONAL request, answered empty.

A peer that does not answer within the retransmission schedule is declared dead and the
IKE SA with its Child SAs is deleted locally (IkeSaDeleted with the reason).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import NotifyPayload, Payload
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


class IkeDpd(Task):
    name = "ike_dpd"
    exchange = ExchangeType.INFORMATIONAL

    def can_start(self, ike: IkeSa) -> bool:
        return ike.established

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        ike.count("dpd_sent")
        return []

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        return False

    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        # an INFORMATIONAL with only notifies (or nothing): acknowledge; errors are recorded
        for p in msg.payloads:
            if isinstance(p, NotifyPayload) and p.type < 16384:
                ike.count("informational_errors")
                if p.type == NotifyType.AUTHENTICATION_FAILED:
                    # §2.21.2: the initiator rejected our IKE_AUTH response; the SA is void
                    self.after_send.append(
                        lambda _now: ike.fail(
                            NotifyType.AUTHENTICATION_FAILED, "the initiator rejected our authentication", "ike_auth"
                        )
                    )
        return []
