"""The task contract: an initiator builds a request and processes the response; a responder
processes a request and returns its response payloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from esplanade.keyexchange.ikev2.constants import ExchangeType
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import Payload

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


class Task:
    name: ClassVar[str] = "task"
    exchange: ClassVar[ExchangeType]

    def __init__(self) -> None:
        self.fixed_message_id: int | None = None
        self.awaiting_install: list[str] = []
        self.after_send: list[Callable[[float], None]] = []

    def can_start(self, ike: IkeSa) -> bool:
        return True

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        raise NotImplementedError

    def on_encoded(self, ike: IkeSa, msg: Message, data: bytes) -> None:
        """Called with the encoded message (IKE_SA_INIT) or the inner plaintext (SK messages)."""

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        """Handle the response; True asks to be sent again (COOKIE, INVALID_KE_PAYLOAD)."""
        raise NotImplementedError

    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        raise NotImplementedError

    def on_timeout(self, ike: IkeSa) -> None:
        """The request was retransmitted to the limit without an answer."""
