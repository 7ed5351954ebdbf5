"""Child SA rekeying (RFC 7296 §1.3.3, §2.8) with simultaneous-rekey resolution (§2.8.1).

Make-before-break: the new SA is installed (and announced) first, then the old one is
deleted with an INFORMATIONAL exchange by the side that started the rekey.
When both sides rekeyed the same Child SA at once, the SA created with the lowest of the
four nonces is redundant and its creator deletes it; the winner deletes the old SA.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from esplanade.ipsec.transforms import ProtocolId
from esplanade.keyexchange.ikev2.child_sa import ChildSa, ChildState
from esplanade.keyexchange.ikev2.constants import NotifyType
from esplanade.keyexchange.ikev2.errors import NegotiationError
from esplanade.keyexchange.ikev2.events import ChildSaRekeyed, NegotiationFailed
from esplanade.keyexchange.ikev2.ike_sa import IkeState
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import NotifyPayload, Payload
from esplanade.keyexchange.ikev2.tasks.child_create import ChildCreate
from esplanade.keyexchange.ikev2.tasks.child_delete import ChildDelete

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


def _lowest(a: tuple[bytes, bytes], b: tuple[bytes, bytes]) -> bool:
    """True if exchange `a` holds the lowest of the four nonces."""
    return min(a) < min(b)


class ChildRekey(ChildCreate):
    name = "child_rekey"

    def __init__(self, old_child_id: str) -> None:
        super().__init__(child="", rekey_of=None)
        self.old_child_id = old_child_id

    def can_start(self, ike: IkeSa) -> bool:
        old = ike.children.get(self.old_child_id)
        if ike.state != IkeState.ESTABLISHED or old is None:
            return False
        if old.state == ChildState.REKEYING and ike.rekeying_children.get(old.id) is self:
            return True  # our own retry after INVALID_KE_PAYLOAD: the Child SA is still ours to rekey
        if old.state != ChildState.INSTALLED:
            return False
        if not any(c.name == old.name for c in ike.config.children):
            # its child config is gone (state restored under a newer connection config): nothing to
            # build the request from; the Child SA runs to its hard lifetime instead
            ike.count("rekeys_without_child_config")
            return False
        self.rekey_of = old
        self.child = old.name
        old.state = ChildState.REKEYING
        ike.rekeying_children[old.id] = self
        return True

    def extra_payloads(self, ike: IkeSa) -> list[Payload]:
        assert self.rekey_of is not None
        return [
            NotifyPayload(
                NotifyType.REKEY_SA, protocol=self.rekey_of.protocol, spi=struct.pack("!I", self.rekey_of.spi_in)
            )
        ]

    def _done(self, ike: IkeSa) -> None:
        ike.rekeying_children.pop(self.old_child_id, None)

    def on_success(self, ike: IkeSa, child: ChildSa, now: float) -> None:
        self._done(ike)
        old = self.rekey_of
        assert old is not None
        ike.child_schedule(child, now)
        ike.emit(ChildSaRekeyed(ike.id, old.id, child.id, ike.child_record(child)))
        peer = ike.rekey_collisions.pop(old.id, None)
        if peer is not None and peer.result is not None:
            mine = (self.nonce, self.peer_nonce)
            theirs = (peer.peer_nonce, peer.nonce)
            if _lowest(mine, theirs):
                # our new SA is the redundant one: delete it, the peer deletes the old one
                ike.count("child_rekey_collisions_lost")
                child.state = ChildState.DELETING
                ike.queue.appendleft(ChildDelete([child.spi_in]))
                return
            ike.count("child_rekey_collisions_won")
        if old.id in ike.children:
            old.state = ChildState.REKEYED
            if ike.hooks.ack_initiator_installs and ike.hooks.require_install_ack:
                ike.deletes_after_install[child.id] = (old.spi_in, now + ike.hooks.install_timeout)
            else:
                ike.queue.appendleft(ChildDelete([old.spi_in]))

    def on_failure(self, ike: IkeSa, exc: NegotiationError, now: float) -> None:
        self._done(ike)
        old = self.rekey_of
        if old is not None and old.id in ike.children and old.state == ChildState.REKEYING:
            old.state = ChildState.INSTALLED
            old.rekey_at = now + 30.0
        if exc.notify == NotifyType.CHILD_SA_NOT_FOUND and old is not None:
            ike.remove_child(old, "peer does not know the Child SA")
            return
        ike.emit(NegotiationFailed(ike.id, exc.notify, exc.reason, self.name, self.child))

    def on_temporary_failure(self, ike: IkeSa, now: float) -> None:
        self._done(ike)
        old = self.rekey_of
        if old is not None and old.id in ike.children:
            old.state = ChildState.INSTALLED
            old.rekey_at = now + ike.hooks.rng.uniform(1.0, 5.0)  # §2.25: retry after a short random delay

    def on_timeout(self, ike: IkeSa) -> None:
        self._done(ike)

    # -- responder ----------------------------------------------------------------------------
    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        n = next((p for p in msg.payloads if isinstance(p, NotifyPayload) and p.type == NotifyType.REKEY_SA), None)
        assert n is not None
        if len(n.spi) != 4:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        spi = struct.unpack("!I", n.spi)[0]
        old = ike.find_child_by_spi(spi, inbound=False)
        if old is None or old.state in (ChildState.DELETED,):
            protocol = ProtocolId(n.protocol) if n.protocol in (ProtocolId.ESP, ProtocolId.AH) else ProtocolId.ESP
            return [NotifyPayload(NotifyType.CHILD_SA_NOT_FOUND, protocol=protocol, spi=n.spi)]
        if old.state in (ChildState.DELETING, ChildState.REKEYED) or ike.state == IkeState.REKEYING:
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        self.rekey_of = old
        self.child = old.name
        mine = ike.rekeying_children.get(old.id)
        if mine is not None:
            ike.rekey_collisions[old.id] = self
        return super().process_request(ike, msg, now)

    def responder_done(self, ike: IkeSa, child: ChildSa, now: float) -> None:
        old = self.rekey_of
        assert old is not None
        ike.child_schedule(child, now)
        ike.emit(ChildSaRekeyed(ike.id, old.id, child.id, ike.child_record(child)))
        if old.state == ChildState.INSTALLED:
            old.state = ChildState.REKEYED  # the initiator deletes it
            old.rekey_at = None
