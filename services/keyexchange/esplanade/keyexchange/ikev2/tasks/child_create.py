"""CREATE_CHILD_SA for a new Child SA (RFC 7296 §1.3.1), with or without PFS."""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

from esplanade.ipsec.transforms import Mode
from esplanade.keyexchange.ikev2.child_sa import ChildSa, ChildState
from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType, known_notify
from esplanade.keyexchange.ikev2.crypto.keyexchange import KeyExchange, new_key_exchange
from esplanade.keyexchange.ikev2.errors import CryptoError, NegotiationError
from esplanade.keyexchange.ikev2.events import NegotiationFailed
from esplanade.keyexchange.ikev2.ike_sa import IkeState
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import (
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    TsiPayload,
    TsrPayload,
    notify_of,
)
from esplanade.keyexchange.ikev2.proposals import ke_retry_method
from esplanade.keyexchange.ikev2.tasks import child_negotiation as cn
from esplanade.keyexchange.ikev2.tasks.base import Task
from esplanade.keyexchange.ikev2.tasks.ike_followup_ke import new_link, queue_followups

if TYPE_CHECKING:
    from esplanade.ipsec.selectors import TrafficSelector
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa

NONCE_LEN = 32


class ChildCreate(Task):
    name = "child_create"
    exchange = ExchangeType.CREATE_CHILD_SA

    def __init__(self, child: str, rekey_of: ChildSa | None = None) -> None:
        super().__init__()
        self.child = child
        self.rekey_of = rekey_of
        self.nonce = os.urandom(NONCE_LEN)
        self.ke: KeyExchange | None = None
        self.ke_method = 0
        self.spi_in = 0
        self.offered: list[Proposal] = []
        self.tsi: tuple[TrafficSelector, ...] = ()
        self.tsr: tuple[TrafficSelector, ...] = ()
        self.retries = 0
        self.result: ChildSa | None = None
        self.peer_nonce = b""
        # negotiated state kept until the last IKE_FOLLOWUP_KE (RFC 9370)
        self.negotiated: tuple[Any, int, tuple[Any, ...], tuple[Any, ...], Mode] | None = None
        self.responder_state: tuple[str, Any, int, int, tuple[Any, ...], tuple[Any, ...], Mode] | None = None
        self.shared: list[bytes] = []
        self.link = b""
        self.remaining: list[int] = []

    def can_start(self, ike: IkeSa) -> bool:
        return ike.state == IkeState.ESTABLISHED

    def extra_payloads(self, ike: IkeSa) -> list[Payload]:
        return []

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        ccfg = ike.config.child(self.child)
        if self.spi_in == 0:
            self.spi_in = ike.hooks.allocate_spi()
        if not self.ke_method:
            self.ke_method = ccfg.pfs_group
        payloads: list[Payload] = self.extra_payloads(ike)
        self.offered = cn.offered_proposals(ccfg, self.spi_in, with_ke=True, first_ke=self.ke_method)
        child_payloads, self.tsi, self.tsr = cn.child_request_payloads(ike, ccfg, self.offered)
        payloads += [p for p in child_payloads if not isinstance(p, SaPayload | TsiPayload | TsrPayload)]
        payloads.append(next(p for p in child_payloads if isinstance(p, SaPayload)))
        payloads.append(NoncePayload(self.nonce))
        if self.ke_method:
            self.ke = new_key_exchange(self.ke_method, initiator=True)
            payloads.append(KePayload(self.ke_method, self.ke.public_value()))
        payloads += [p for p in child_payloads if isinstance(p, TsiPayload | TsrPayload)]
        return payloads

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        bad_ke = next(
            (p for p in msg.payloads if isinstance(p, NotifyPayload) and p.type == NotifyType.INVALID_KE_PAYLOAD), None
        )
        if bad_ke is not None and self.retries < 2:  # a group we did not offer fails the exchange below
            try:
                offered = ike.config.child(self.child).proposals
            except KeyError:  # the child config went away meanwhile
                offered = ()
            wanted = ke_retry_method(bad_ke.data, offered, self.ke_method)
            if wanted:
                self.retries += 1
                self.ke_method = wanted
                return True
        temp = next(
            (p for p in msg.payloads if isinstance(p, NotifyPayload) and p.type == NotifyType.TEMPORARY_FAILURE), None
        )
        if temp is not None:
            self.on_temporary_failure(ike, now)
            return False
        try:
            suite, spi_out, tsi, tsr, mode = cn.initiator_verify(msg, self.offered, self.tsi, self.tsr, ignore_ke=False)
            nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
            if nonce is None:
                raise NegotiationError(NotifyType.INVALID_SYNTAX, "CREATE_CHILD_SA response without nonce")
            shared = None
            if suite.ke:
                ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
                if ke is None or self.ke is None or ke.group != suite.ke or suite.ke != self.ke_method:
                    raise NegotiationError(NotifyType.INVALID_SYNTAX, "PFS key exchange missing in response")
                try:
                    self.ke.process_peer(ke.data)
                except CryptoError as exc:
                    raise NegotiationError(NotifyType.INVALID_SYNTAX, str(exc)) from None
                shared = [self.ke.shared_secret]
            link = notify_of(msg.payloads, NotifyType.ADDITIONAL_KEY_EXCHANGE)
            if suite.additional_ke and (link is None or not shared):
                raise NegotiationError(NotifyType.INVALID_SYNTAX, "additional key exchanges without KE or link")
        except NegotiationError as exc:
            cn.delete_refused_child(ike, msg, self.spi_in, self.offered)
            self.on_failure(ike, exc, now)
            return False
        self.peer_nonce = nonce.data
        self.negotiated = (suite, spi_out, tsi, tsr, mode)
        self.shared = shared or []
        if suite.additional_ke and link is not None:
            self.link = link.data
            self.remaining = [int(m) for _, m in suite.additional_ke]
            queue_followups(ike, self)
            return False
        self._finish_initiator(ike, now)
        return False

    def _finish_initiator(self, ike: IkeSa, now: float) -> None:
        assert self.negotiated is not None
        suite, spi_out, tsi, tsr, mode = self.negotiated
        child = cn.make_child(
            ike,
            self.child,
            suite,
            self.spi_in,
            spi_out,
            True,
            tsi,
            tsr,
            mode,
            self.nonce,
            self.peer_nonce,
            now,
            self.shared or None,
        )
        child.rekey_of = self.rekey_of.id if self.rekey_of else ""
        ike.children[child.id] = child
        self.result = child
        self.on_success(ike, child, now)

    # -- RFC 9370 IKE_FOLLOWUP_KE -----------------------------------------------------------------
    def followup_done(self, ike: IkeSa, now: float, task: Task) -> None:
        if self.responder_state is None:
            self._finish_initiator(ike, now)
        else:
            self._finish_responder(ike, now, task)

    def followup_failed(self, ike: IkeSa, notify: int, reason: str, now: float) -> None:
        if self.result is None and notify:
            self.on_failure(ike, NegotiationError(known_notify(notify), reason), now)

    def on_success(self, ike: IkeSa, child: ChildSa, now: float) -> None:
        ike.announce_child(child, now)

    def on_failure(self, ike: IkeSa, exc: NegotiationError, now: float) -> None:
        ike.emit(NegotiationFailed(ike.id, exc.notify, exc.reason, self.name, self.child))

    def on_temporary_failure(self, ike: IkeSa, now: float) -> None:
        # §2.25: retry later, after a short random delay (as a Child SA rekey does)
        retry = type(self)(self.child) if self.rekey_of is None else self
        ike.defer_task(retry, now + ike.hooks.rng.uniform(1.0, 5.0))

    # -- responder ----------------------------------------------------------------------------
    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        if ike.state != IkeState.ESTABLISHED and self.rekey_of is None:
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
        if nonce is None:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        try:
            ccfg, suite, tsi, tsr, mode = cn.responder_select(
                ike,
                msg,
                ignore_ke=False,
                assigned_ips=ike.assigned_ips or None,
                access=cn.current_access(ike),
                rekeying=self.rekey_of.name if self.rekey_of is not None else None,
            )
        except NegotiationError as exc:
            ike.emit(NegotiationFailed(ike.id, exc.notify, exc.reason, self.name))
            return [NotifyPayload(exc.notify)]
        shared = None
        out_ke: list[Payload] = []
        if suite.ke:
            ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
            if ke is None or ke.group != suite.ke:
                return [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", suite.ke))]
            kex = new_key_exchange(suite.ke, initiator=False)
            try:
                kex.process_peer(ke.data)
            except CryptoError:
                return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
            shared = [kex.shared_secret]
            out_ke = [KePayload(suite.ke, kex.public_value())]
        spi_in = ike.hooks.allocate_spi()
        spi_out = struct.unpack("!I", suite.spi)[0]
        self.peer_nonce = nonce.data
        self.shared = shared or []
        self.responder_state = (ccfg.name, suite, spi_in, spi_out, tsr, tsi, mode)
        sa_tsi_tsr = cn.responder_payloads(suite, spi_in, tsi, tsr, mode)
        out: list[Payload] = [*self.extra_payloads(ike)]
        out += [p for p in sa_tsi_tsr if isinstance(p, NotifyPayload)]
        out += [p for p in sa_tsi_tsr if isinstance(p, SaPayload)]
        out.append(NoncePayload(self.nonce))
        out += out_ke
        out += [p for p in sa_tsi_tsr if isinstance(p, TsiPayload | TsrPayload)]
        if suite.additional_ke:
            if not shared:
                return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
            self.remaining = [int(m) for _, m in suite.additional_ke]
            out.append(NotifyPayload(NotifyType.ADDITIONAL_KEY_EXCHANGE, new_link(ike, self)))
            return out
        self._finish_responder(ike, now, self)
        return out

    def _finish_responder(self, ike: IkeSa, now: float, task: Task) -> None:
        assert self.responder_state is not None
        name, suite, spi_in, spi_out, local_ts, remote_ts, mode = self.responder_state
        child = cn.make_child(
            ike,
            name,
            suite,
            spi_in,
            spi_out,
            False,
            local_ts,
            remote_ts,
            mode,
            self.peer_nonce,
            self.nonce,
            now,
            self.shared or None,
        )
        child.rekey_of = self.rekey_of.id if self.rekey_of else ""
        ike.children[child.id] = child
        self.result = child
        ike.request_install(child)
        task.awaiting_install.append(child.id)

        def announce(t: float) -> None:
            child.state = ChildState.INSTALLED
            self.responder_done(ike, child, t)

        task.after_send.append(announce)

    def responder_done(self, ike: IkeSa, child: ChildSa, now: float) -> None:
        ike.announce_child(child, now)
