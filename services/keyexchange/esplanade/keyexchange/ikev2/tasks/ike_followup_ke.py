"""IKE_FOLLOWUP_KE (RFC 9370 §2.2.4): the additional key exchanges of a CREATE_CHILD_SA.

When a CREATE_CHILD_SA (IKE rekey, new or rekeyed Child SA) negotiates ADDKE transforms,
the responder answers with N(ADDITIONAL_KEY_EXCHANGE, link) and the initiator runs one
IKE_FOLLOWUP_KE exchange per additional key exchange, echoing the link. Only after the last
one are the new keys computed: SKEYSEED or KEYMAT over SK(0) | Ni | Nr | SK(1) | ... | SK(n).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.crypto.keyexchange import KeyExchange, new_key_exchange
from esplanade.keyexchange.ikev2.errors import CryptoError
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import KePayload, NotifyPayload, Payload, notify_of
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa

LINK_LEN = 8


class FollowupOwner(Protocol):
    """The CREATE_CHILD_SA task whose additional key exchanges run in IKE_FOLLOWUP_KE."""

    shared: list[bytes]
    link: bytes
    remaining: list[int]

    def followup_done(self, ike: IkeSa, now: float, task: Task) -> None: ...

    def followup_failed(self, ike: IkeSa, notify: int, reason: str, now: float) -> None: ...


def new_link(ike: IkeSa, owner: FollowupOwner) -> bytes:
    link = os.urandom(LINK_LEN)
    ike.pending_followups[link] = owner
    return link


def queue_followups(ike: IkeSa, owner: FollowupOwner) -> None:
    """Initiator: run the owner's remaining key exchanges next, before any other exchange."""
    tasks = [FollowupKe(owner, m, i == len(owner.remaining) - 1) for i, m in enumerate(owner.remaining)]
    for t in reversed(tasks):
        ike.queue.appendleft(t)


class FollowupKe(Task):
    name = "ike_followup_ke"
    exchange = ExchangeType.IKE_FOLLOWUP_KE

    def __init__(self, owner: FollowupOwner | None = None, method: int = 0, last: bool = True) -> None:
        super().__init__()
        self.owner = owner
        self.method = method
        self.last = last
        self.ke: KeyExchange | None = None

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        assert self.owner is not None
        self.ke = new_key_exchange(self.method, initiator=True)
        return [
            NotifyPayload(NotifyType.ADDITIONAL_KEY_EXCHANGE, self.owner.link),
            KePayload(self.method, self.ke.public_value()),
        ]

    def _fail(self, ike: IkeSa, notify: int, reason: str, now: float) -> None:
        assert self.owner is not None
        ike.queue = type(ike.queue)(t for t in ike.queue if not (isinstance(t, FollowupKe) and t.owner is self.owner))
        self.owner.followup_failed(ike, notify, reason, now)

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        assert self.owner is not None
        err = ike.notify_error_in(msg)
        if err is not None:
            self._fail(ike, err.type, f"IKE_FOLLOWUP_KE refused ({err.type})", now)
            return False
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        if ke is None or ke.group != self.method or self.ke is None:
            self._fail(ike, NotifyType.INVALID_SYNTAX, "IKE_FOLLOWUP_KE response without the KE", now)
            return False
        try:
            self.ke.process_peer(ke.data)
        except CryptoError as exc:
            self._fail(ike, NotifyType.INVALID_SYNTAX, str(exc), now)
            return False
        self.owner.shared.append(self.ke.shared_secret)
        link = notify_of(msg.payloads, NotifyType.ADDITIONAL_KEY_EXCHANGE)
        if link is not None:
            self.owner.link = link.data
        if self.last:
            self.owner.followup_done(ike, now, self)
        return False

    def on_timeout(self, ike: IkeSa) -> None:
        if self.owner is not None:
            self.owner.followup_failed(ike, 0, "IKE_FOLLOWUP_KE timed out", 0.0)

    # -- responder ----------------------------------------------------------------------------
    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        n = notify_of(msg.payloads, NotifyType.ADDITIONAL_KEY_EXCHANGE)
        owner = ike.pending_followups.pop(n.data, None) if n is not None else None
        if owner is None:
            return [NotifyPayload(NotifyType.STATE_NOT_FOUND)]
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        if ke is None or not owner.remaining or ke.group != owner.remaining[0]:
            owner.followup_failed(ike, NotifyType.INVALID_SYNTAX, "IKE_FOLLOWUP_KE with the wrong KE", now)
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        kex = new_key_exchange(ke.group, initiator=False)
        try:
            kex.process_peer(ke.data)
        except CryptoError as exc:
            owner.followup_failed(ike, NotifyType.INVALID_SYNTAX, str(exc), now)
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        owner.remaining.pop(0)
        owner.shared.append(kex.shared_secret)
        out: list[Payload] = []
        if owner.remaining:
            out.append(NotifyPayload(NotifyType.ADDITIONAL_KEY_EXCHANGE, new_link(ike, owner)))
        out.append(KePayload(ke.group, kex.public_value()))
        if not owner.remaining:
            owner.followup_done(ike, now, self)
        return out
