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
from esplanade.keyexchange.ikev2.payloads import KePayload, NoncePayload, NotifyPayload, Payload, Proposal, SaPayload
from esplanade.keyexchange.ikev2.proposals import ProposalSpec, Suite, select, verify_chosen
from esplanade.keyexchange.ikev2.tasks.base import Task
from esplanade.keyexchange.ikev2.tasks.ike_delete import IkeDelete

NONCE_LEN = 32


def _specs(ike: IkeSa) -> list[ProposalSpec]:
    # additional key exchanges on rekey need IKE_FOLLOWUP_KE (RFC 9370 §2.2.4): offer classic suites
    out = []
    for p in ike.config.proposals:
        s = ProposalSpec(p.protocol, p.encr, p.integ, p.prf, p.ke, (), p.esn)
        if s not in out:
            out.append(s)
    return out


def _new_sa(
    old: IkeSa,
    initiator: bool,
    spi_i: bytes,
    spi_r: bytes,
    suite: Suite,
    ni: bytes,
    nr: bytes,
    shared: bytes,
    now: float,
) -> IkeSa:
    new = IkeSa(old.hooks.new_ike_id(), old.config, initiator, old.local, old.remote, now, old.hooks, spi_i=spi_i)
    new.spi_r = spi_r
    new.suite = suite
    assert suite.prf is not None and old.keys is not None
    new.prf = PRFS[suite.prf]
    new.ni, new.nr = ni, nr
    skeyseed = skeyseed_rekey(old.prf, old.keys.sk_d, [shared], ni, nr)
    new.install_keys(derive_ike_keys(new.prf, suite.encr, suite.integ, skeyseed, ni, nr, spi_i, spi_r))
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
        self.ke: KeyExchange | None = None
        self.ke_method = 0
        self.offered: list[Proposal] = []
        self.peer_nonce = b""
        self.result: IkeSa | None = None
        self.retries = 0

    def can_start(self, ike: IkeSa) -> bool:
        if ike.state != IkeState.ESTABLISHED or ike.rekeying_children:
            if ike.state == IkeState.ESTABLISHED:
                ike.queue_task(IkeRekey())  # try again after the child exchange
            return False
        ike.set_state(IkeState.REKEYING)
        ike.ike_rekey_task = self
        return True

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        assert ike.suite is not None
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
            if err.type == NotifyType.INVALID_KE_PAYLOAD and len(err.data) >= 2 and self.retries < 2:
                self.retries += 1
                self.ke_method = int.from_bytes(err.data[:2], "big")
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
        new = _new_sa(ike, True, self.spi, suite.spi, suite, self.nonce, nonce.data, self.ke.shared_secret, now)
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
                return False
            ike.count("ike_rekey_collisions_won")
            new.adopt_children(peer.result)
        new.adopt_children(ike)
        if ike.state != IkeState.REKEYED:
            ike.set_state(IkeState.REKEYED)
        ike.emit(IkeSaRekeyed(ike.id, new.id))
        ike.queue.appendleft(IkeDelete("rekeyed"))
        return False

    def on_timeout(self, ike: IkeSa) -> None:
        ike.ike_rekey_task = None

    # -- responder ----------------------------------------------------------------------------
    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        if ike.rekeying_children or ike.state not in (IkeState.ESTABLISHED, IkeState.REKEYING):
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        sa = next((p for p in msg.payloads if isinstance(p, SaPayload)), None)
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
        if sa is None or ke is None or nonce is None:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        suite = select([p for p in sa.proposals if p.protocol == ProtocolId.IKE and len(p.spi) == 8], _specs(ike))
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
        new = _new_sa(ike, False, suite.spi, self.spi, suite, nonce.data, self.nonce, kex.shared_secret, now)
        self.result = new
        ike.spawned.append(new)
        chosen = Suite(
            suite.protocol, suite.encr, suite.integ, suite.prf, suite.ke, (), suite.esn, suite.number, self.spi
        )
        if ike.ike_rekey_task is not None:
            ike.ike_rekey_collision = self  # §2.8.2: resolved when our own rekey completes
        else:
            new.adopt_children(ike)
            ike.set_state(IkeState.REKEYED)
            ike.delete_deadline = now + IKE_REKEY_DELETE_TIMEOUT
            ike.emit(IkeSaRekeyed(ike.id, new.id))
        return [SaPayload((chosen.to_proposal(),)), NoncePayload(self.nonce), KePayload(suite.ke, kex.public_value())]
