"""Reauthentication (RFC 7296 §2.8.3): make-before-break of a whole new IKE SA.

Not an exchange on this SA: it asks the dispatcher to negotiate a fresh IKE SA (new
IKE_SA_INIT + IKE_AUTH, new credentials check, its Child SAs recreated) and to delete this
one once the new one is up. Distinct from rekeying, which keeps the authentication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esplanade.keyexchange.ikev2.constants import ExchangeType
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import Payload
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


class IkeReauth(Task):
    name = "ike_reauth"
    exchange = ExchangeType.INFORMATIONAL

    def can_start(self, ike: IkeSa) -> bool:
        if ike.established and not ike.reauth_requested:
            ike.reauth_requested = True
        return False  # nothing to send on this SA

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        return None

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        return False
