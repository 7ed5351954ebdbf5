"""Deleting Child SAs (RFC 7296 §1.4.1): INFORMATIONAL with Delete payloads."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from esplanade.ipsec.transforms import ProtocolId
from esplanade.keyexchange.ikev2.child_sa import ChildSa, ChildState
from esplanade.keyexchange.ikev2.constants import ExchangeType
from esplanade.keyexchange.ikev2.events import ChildSaEstablished
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import DeletePayload, Payload
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


class ChildDelete(Task):
    name = "child_delete"
    exchange = ExchangeType.INFORMATIONAL

    def __init__(
        self, spis_in: list[int], quiet: bool = False, reason: str = "deleted", protocol: ProtocolId = ProtocolId.ESP
    ) -> None:
        super().__init__()
        self.spis_in = spis_in
        self.quiet = quiet  # the SA is already gone locally (expired, or never taken: see ChildCreate)
        self.reason = reason
        self.protocol = protocol  # of a quiet SPI without a local Child SA

    def can_start(self, ike: IkeSa) -> bool:
        return ike.established or ike.state.value == "rekeyed"

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        spis: dict[ProtocolId, list[bytes]] = {}  # one Delete payload per protocol (§3.11)
        for spi in self.spis_in:
            c = ike.find_child_by_spi(spi, inbound=True)
            if c is not None:
                if c.state == ChildState.DELETED:
                    continue
                c.state = ChildState.DELETING
            elif not self.quiet:
                continue
            spis.setdefault(c.protocol if c is not None else self.protocol, []).append(struct.pack("!I", spi))
        if not spis:
            return None
        return [DeletePayload(protocol, tuple(values)) for protocol, values in spis.items()]

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        for spi in self.spis_in:
            c = ike.find_child_by_spi(spi, inbound=True)
            if c is not None:
                reason = "rekeyed" if c.state == ChildState.DELETING and self._was_rekeyed(ike, c.id) else self.reason
                ike.remove_child(c, reason)
        return False

    def _was_rekeyed(self, ike: IkeSa, cid: str) -> bool:
        return any(c.rekey_of == cid for c in ike.children.values())

    def on_timeout(self, ike: IkeSa) -> None:
        pass

    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        reply: dict[ProtocolId, list[bytes]] = {}
        for d in msg.payloads:
            if not isinstance(d, DeletePayload) or d.protocol not in (ProtocolId.ESP, ProtocolId.AH):
                continue
            for raw in d.spis:
                spi = struct.unpack("!I", raw)[0]
                c = ike.find_child_by_spi(spi, inbound=False)
                if c is None or c.protocol != d.protocol:
                    continue
                if c.state != ChildState.DELETING:
                    # §1.4.1: answer with our inbound SPI unless we are deleting it ourselves
                    reply.setdefault(c.protocol, []).append(struct.pack("!I", c.spi_in))
                rekeyed = any(o.rekey_of == c.id for o in ike.children.values())
                ike.remove_child(c, "rekeyed" if rekeyed else "deleted by peer")
                self._back_in_service(ike, ike.children.get(c.rekey_of) if c.rekey_of else None, now)
        return [DeletePayload(protocol, tuple(spis)) for protocol, spis in reply.items()]

    @staticmethod
    def _back_in_service(ike: IkeSa, replaced: ChildSa | None, now: float) -> None:
        """The replacement of a Child SA went before the SA it replaced (the initiator rejected
        our answer to its rekey and deleted what we created): with no other replacement, the
        old SA stays in service, announced again for the dataplane, and is rekeyed later."""
        if replaced is None or replaced.state != ChildState.REKEYED:
            return
        if any(o.rekey_of == replaced.id for o in ike.children.values()):
            return  # replaced by another SA too (a rekey collision we won): that one stays
        replaced.state = ChildState.INSTALLED
        replaced.rekey_at = now + ike.hooks.rng.uniform(30.0, 60.0)  # the initiator retries first
        ike.emit(ChildSaEstablished(ike.id, replaced.id, ike.child_record(replaced)))
