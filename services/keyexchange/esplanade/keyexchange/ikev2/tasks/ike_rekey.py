"""IKE SA rekeying (RFC 7296 §1.3.2, §2.18) and simultaneous IKE rekey (§2.8.2).

SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the old SA's PRF (as strongSwan and
the RFC errata do); the new IKE SA's initiator is whoever started the rekey, its message
IDs start at zero and it inherits all Child SAs.
"""

from __future__ import annotations

import os

from esplanade.ipsec.transforms import KeId, ProtocolId
from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.crypto.keyexchange import KeyExchange, new_key_exchange
from esplanade.keyexchange.ikev2.crypto.keymat import derive_ike_keys, skeyseed_rekey
from esplanade.keyexchange.ikev2.crypto.prf import PRFS
from esplanade.keyexchange.ikev2.errors import CryptoError
from esplanade.keyexchange.ikev2.events import IkeSaRekeyed, NegotiationFailed
from esplanade.keyexchange.ikev2.ike_sa import IKE_REKEY_DELETE_TIMEOUT, IkeSa, IkeState, notify_name
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import (
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    notify_of,
)
from esplanade.keyexchange.ikev2.proposals import ProposalSpec, Suite, ke_retry_method, select, verify_chosen
from esplanade.keyexchange.ikev2.tasks.base import Task
from esplanade.keyexchange.ikev2.tasks.ike_delete import IkeDelete
from esplanade.keyexchange.ikev2.tasks.ike_followup_ke import new_link, queue_followups

NONCE_LEN = 32


def _specs(ike: IkeSa) -> list[ProposalSpec]:
    """The configured proposals; ones with additional key exchanges run IKE_FOLLOWUP_KE (RFC 9370)."""
    return list(ike.config.proposals)


def _child_exchange_in_flight(ike: IkeSa) -> bool:
    """Our request creating, rekeying or deleting a Child SA awaits its response (or its
    IKE_FOLLOWUP_KE exchanges run). §2.25.1: a request to rekey the IKE SA then gets
    TEMPORARY_FAILURE; answered, the Child SAs would move to the new IKE SA while our exchange
    finishes on the old one (a new Child SA lost, a deleted one kept)."""
    from esplanade.keyexchange.ikev2.tasks.child_create import ChildCreate
    from esplanade.keyexchange.ikev2.tasks.child_delete import ChildDelete
    from esplanade.keyexchange.ikev2.tasks.ike_followup_ke import FollowupKe

    task = ike.outstanding.task if ike.outstanding is not None else None
    if isinstance(task, FollowupKe):
        return isinstance(task.owner, ChildCreate)
    return isinstance(task, ChildCreate | ChildDelete)


def _new_sa(
    old: IkeSa,
    initiator: bool,
    spi_i: bytes,
    spi_r: bytes,
    suite: Suite,
    ni: bytes,
    nr: bytes,
    shared: list[bytes],
    now: float,
) -> IkeSa:
    new = IkeSa(old.hooks.new_ike_id(), old.config, initiator, old.local, old.remote, now, old.hooks, spi_i=spi_i)
    new.spi_r = spi_r
    new.suite = suite
    assert suite.prf is not None and old.keys is not None
    new.prf = PRFS[suite.prf]
    new.ni, new.nr = ni, nr
    skeyseed = skeyseed_rekey(old.prf, old.keys.sk_d, shared, ni, nr)
    new.shared_secrets = list(shared)
    new.skeyseed = skeyseed
    new.install_keys(derive_ike_keys(new.prf, suite.cipher, suite.integ, skeyseed, ni, nr, spi_i, spi_r))
    new.rekey_of = old.id
    new.candidate_configs = old.candidate_configs
    new.state = IkeState.ESTABLISHED
    new.mark_established_timers(now)
    return new


class IkeRekey(Task):
    name = "ike_rekey"
    exchange = ExchangeType.CREATE_CHILD_SA

    def __init__(self) -> None:
        super().__init__()
        self.nonce = os.urandom(NONCE_LEN)
        self.spi = os.urandom(8)
        self.spi_chosen = False  # as initiator, the engine picks the SPI (its relay routes by it)
        self.ke: KeyExchange | None = None
        self.ke_method = 0
        self.offered: list[Proposal] = []
        self.peer_nonce = b""
        self.result: IkeSa | None = None
        self.retries = 0
        # RFC 9370 additional key exchanges (IKE_FOLLOWUP_KE)
        self.suite: Suite | None = None
        self.shared: list[bytes] = []
        self.link = b""
        self.remaining: list[int] = []
        self.initiated = False

    def can_start(self, ike: IkeSa) -> bool:
        if self.initiated and ike.ike_rekey_task is self and ike.state == IkeState.REKEYING:
            return True  # our own retry after INVALID_KE_PAYLOAD: the rekey is still in progress
        # a Child SA rekey is over once the old SA is deleted, which may wait for an install ack;
        # a response we hold for an install ack belongs to this IKE SA's window (and its peer's
        # retransmissions to this IKE SA): both finish before the IKE SA is replaced
        if (
            ike.state != IkeState.ESTABLISHED
            or ike.rekeying_children
            or ike.deletes_after_install
            or ike.held is not None
        ):
            if ike.state == IkeState.ESTABLISHED:
                ike.queue_task(IkeRekey())  # try again after the child exchange
            return False
        ike.set_state(IkeState.REKEYING)
        ike.ike_rekey_task = self
        self.initiated = True
        return True

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        assert ike.suite is not None
        if not self.spi_chosen:
            self.spi, self.spi_chosen = ike.hooks.new_ike_spi(), True
        if not self.ke_method:
            self.ke_method = int(ike.suite.ke)
        self.ke = new_key_exchange(self.ke_method, initiator=True)
        self.offered = []
        for s in _specs(ike):
            p = s.with_ke_first(KeId(self.ke_method)).to_proposal(len(self.offered) + 1, self.spi)
            if p not in self.offered:
                self.offered.append(p)
        return [
            SaPayload(tuple(self.offered)),
            NoncePayload(self.nonce),
            KePayload(self.ke_method, self.ke.public_value()),
        ]

    def _abort(self, ike: IkeSa) -> None:
        ike.ike_rekey_task = None
        if ike.state == IkeState.REKEYING:
            ike.set_state(IkeState.ESTABLISHED)

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        err = ike.notify_error_in(msg)
        if err is not None:
            wanted = (
                ke_retry_method(err.data, _specs(ike), self.ke_method)
                if err.type == NotifyType.INVALID_KE_PAYLOAD and self.retries < 2
                else 0
            )
            if wanted:
                self.retries += 1
                self.ke_method = wanted
                return True
            self._abort(ike)
            if err.type == NotifyType.TEMPORARY_FAILURE:
                ike.rekey_at = now + ike.hooks.rng.uniform(1.0, 5.0)
                return False
            ike.emit(NegotiationFailed(ike.id, err.type, f"IKE rekey refused: {notify_name(err.type)}", self.name))
            ike.rekey_at = now + 60.0
            return False
        sa = next((p for p in msg.payloads if isinstance(p, SaPayload)), None)
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
        suite = verify_chosen(sa.proposals[0], self.offered) if sa is not None and len(sa.proposals) == 1 else None
        if (
            suite is None
            or ke is None
            or nonce is None
            or ke.group != suite.ke
            or self.ke is None
            or len(suite.spi) != 8
        ):
            self._abort(ike)
            ike.emit(NegotiationFailed(ike.id, NotifyType.NO_PROPOSAL_CHOSEN, "bad IKE rekey response", self.name))
            return False
        try:
            self.ke.process_peer(ke.data)
        except CryptoError as exc:
            self._abort(ike)
            ike.emit(NegotiationFailed(ike.id, NotifyType.INVALID_SYNTAX, str(exc), self.name))
            return False
        self.peer_nonce = nonce.data
        self.suite = suite
        self.shared = [self.ke.shared_secret]
        if suite.additional_ke:
            link = notify_of(msg.payloads, NotifyType.ADDITIONAL_KEY_EXCHANGE)
            if link is None:
                self._abort(ike)
                ike.emit(NegotiationFailed(ike.id, NotifyType.INVALID_SYNTAX, "ADDKE chosen but no link", self.name))
                return False
            self.link = link.data
            self.remaining = [int(m) for _, m in suite.additional_ke]
            queue_followups(ike, self)
            return False
        self._complete(ike, now)
        return False

    def followup_failed(self, ike: IkeSa, notify: int, reason: str, now: float) -> None:
        if self.result is not None:
            return
        if self.initiated:
            self._abort(ike)
            ike.rekey_at = now + 60.0
        if notify:
            ike.emit(NegotiationFailed(ike.id, notify, f"IKE rekey: {reason}", self.name))

    def followup_done(self, ike: IkeSa, now: float, task: Task) -> None:
        if self.initiated:
            self._complete(ike, now)
        else:
            self._responder_complete(ike, now)

    def _complete(self, ike: IkeSa, now: float) -> None:
        suite = self.suite
        assert suite is not None
        new = _new_sa(ike, True, self.spi, suite.spi, suite, self.nonce, self.peer_nonce, self.shared, now)
        self.result = new
        ike.ike_rekey_task = None
        ike.spawned.append(new)
        peer = ike.ike_rekey_collision
        if peer is not None and peer.result is not None:
            ike.ike_rekey_collision = None
            if min(self.nonce, self.peer_nonce) < min(peer.peer_nonce, peer.nonce):
                # ours is redundant: delete it over itself; the peer deletes the old SA
                ike.count("ike_rekey_collisions_lost")
                new.queue_task(IkeDelete("redundant after simultaneous rekey"))
                peer.result.adopt_children(ike)
                ike.set_state(IkeState.REKEYED)
                ike.delete_deadline = now + IKE_REKEY_DELETE_TIMEOUT
                ike.emit(IkeSaRekeyed(ike.id, peer.result.id))
                return
            ike.count("ike_rekey_collisions_won")
            new.adopt_children(peer.result)
        new.adopt_children(ike)
        if ike.state != IkeState.REKEYED:
            ike.set_state(IkeState.REKEYED)
        ike.emit(IkeSaRekeyed(ike.id, new.id))
        ike.queue.appendleft(IkeDelete("rekeyed"))

    def on_timeout(self, ike: IkeSa) -> None:
        ike.ike_rekey_task = None

    # -- responder ----------------------------------------------------------------------------
    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        if (
            ike.rekeying_children
            or ike.deletes_after_install  # our Child SA rekey still has its old SA to delete
            or _child_exchange_in_flight(ike)
            or ike.state not in (IkeState.ESTABLISHED, IkeState.REKEYING)
        ):
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        sa = next((p for p in msg.payloads if isinstance(p, SaPayload)), None)
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
        if sa is None or ke is None or nonce is None:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        suite = select(
            [p for p in sa.proposals if p.protocol == ProtocolId.IKE and len(p.spi) == 8],
            _specs(ike),
            prefer_ke=ke.group,
        )
        if suite is None:
            ike.emit(
                NegotiationFailed(
                    ike.id, NotifyType.NO_PROPOSAL_CHOSEN, "no acceptable proposal for IKE rekey", self.name
                )
            )
            return [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)]
        if ke.group != suite.ke:
            return [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, int(suite.ke).to_bytes(2, "big"))]
        kex = new_key_exchange(suite.ke, initiator=False)
        try:
            kex.process_peer(ke.data)
        except CryptoError:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        self.peer_nonce = nonce.data
        self.suite = suite
        self.shared = [kex.shared_secret]
        chosen = Suite(
            suite.protocol,
            suite.encr,
            suite.integ,
            suite.prf,
            suite.ke,
            suite.additional_ke,
            suite.esn,
            suite.number,
            self.spi,
        )
        out: list[Payload] = [
            SaPayload((chosen.to_proposal(),)),
            NoncePayload(self.nonce),
            KePayload(suite.ke, kex.public_value()),
        ]
        if suite.additional_ke:
            self.remaining = [int(m) for _, m in suite.additional_ke]
            out.append(NotifyPayload(NotifyType.ADDITIONAL_KEY_EXCHANGE, new_link(ike, self)))
            return out
        self._responder_complete(ike, now)
        return out

    def _responder_complete(self, ike: IkeSa, now: float) -> None:
        suite = self.suite
        assert suite is not None
        new = _new_sa(ike, False, suite.spi, self.spi, suite, self.peer_nonce, self.nonce, self.shared, now)
        self.result = new
        ike.spawned.append(new)
        if ike.ike_rekey_task is not None:
            ike.ike_rekey_collision = self  # §2.8.2: resolved when our own rekey completes
        else:
            new.adopt_children(ike)
            ike.set_state(IkeState.REKEYED)
            ike.delete_deadline = now + IKE_REKEY_DELETE_TIMEOUT
            ike.emit(IkeSaRekeyed(ike.id, new.id))
