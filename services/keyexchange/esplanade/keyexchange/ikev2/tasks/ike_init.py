"""IKE_SA_INIT (RFC 7296 §1.2): proposals, KE, nonces, NAT-D (§2.23), COOKIE (§2.6),
INVALID_KE_PAYLOAD retry (§1.2), fragmentation and signature-hash announcements."""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from esplanade.ipsec.transforms import KeId
from esplanade.keyexchange.ikev2.constants import ExchangeType, HashAlgorithm, NotifyType
from esplanade.keyexchange.ikev2.crypto.keyexchange import KeyExchange, new_key_exchange
from esplanade.keyexchange.ikev2.crypto.keymat import skeyseed_initial
from esplanade.keyexchange.ikev2.crypto.prf import PRFS
from esplanade.keyexchange.ikev2.errors import CryptoError
from esplanade.keyexchange.ikev2.ike_sa import IkeState, notify_name
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import (
    CertreqPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    notify_of,
)
from esplanade.keyexchange.ikev2.proposals import ke_retry_method, select, verify_chosen
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa

NONCE_LEN = 32
MAX_COOKIE_RETRIES = 3
MAX_KE_RETRIES = 3
SIG_HASHES = struct.pack("!HHH", HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512)


def nat_payloads(ike: IkeSa, spi_r: bytes, src: tuple[str, int], dst: tuple[str, int]) -> list[Payload]:
    src_hash = ike.nat_hash(spi_r, src)
    if ike.config.encap:
        src_hash = os.urandom(20)  # force UDP encapsulation: pretend we are behind NAT (as strongSwan)
    return [
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, src_hash),
        NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP, ike.nat_hash(spi_r, dst)),
    ]


def check_nat(ike: IkeSa, msg: Message, spi_r: bytes, local: tuple[str, int], remote: tuple[str, int]) -> None:
    srcs = [
        p.data for p in msg.payloads if isinstance(p, NotifyPayload) and p.type == NotifyType.NAT_DETECTION_SOURCE_IP
    ]
    dst = notify_of(msg.payloads, NotifyType.NAT_DETECTION_DESTINATION_IP)
    if srcs:
        ike.nat_remote = ike.nat_hash(spi_r, remote) not in srcs
    if dst is not None:
        ike.nat_local = dst.data != ike.nat_hash(spi_r, local)


def read_peer_features(ike: IkeSa, msg: Message) -> None:
    ike.peer_fragmentation = ike.config.fragmentation and (
        notify_of(msg.payloads, NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    )
    sig = notify_of(msg.payloads, NotifyType.SIGNATURE_HASH_ALGORITHMS)
    if sig is not None:
        data = sig.data[: len(sig.data) & ~1]
        ike.peer_sig_hashes = tuple(struct.unpack(f"!{len(data) // 2}H", data))
    ike.peer_intermediate = notify_of(msg.payloads, NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED) is not None
    ike.peer_certreq = any(isinstance(p, CertreqPayload) for p in msg.payloads)


def feature_payloads(ike: IkeSa) -> list[Payload]:
    out: list[Payload] = []
    if ike.config.fragmentation:
        out.append(NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
    out.append(NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS, SIG_HASHES))
    if ike.config.uses_additional_ke:
        out.append(NotifyPayload(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED))
    return out


class IkeInit(Task):
    name = "ike_init"
    exchange = ExchangeType.IKE_SA_INIT

    def __init__(self, child: str | None = None) -> None:
        super().__init__()
        self.fixed_message_id = 0
        self.child = child
        self.cookie = b""
        self.ke: KeyExchange | None = None
        self.ke_method = 0
        self.nonce = os.urandom(NONCE_LEN)
        self.offered: list[Proposal] = []
        self.cookie_retries = 0
        self.ke_retries = 0

    # -- initiator ---------------------------------------------------------------------------
    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        cfg = ike.config
        if self.ke is None:
            method = self.ke_method or int(cfg.proposals[0].ke[0])
            self.ke_method = method
            self.ke = new_key_exchange(method, initiator=True)
        specs = [p.with_ke_first(KeId(self.ke_method)) for p in cfg.proposals]
        self.offered = []
        for s in specs:
            prop = s.to_proposal(len(self.offered) + 1, b"")
            if prop not in self.offered:
                self.offered.append(prop)
        payloads: list[Payload] = []
        if self.cookie:
            payloads.append(NotifyPayload(NotifyType.COOKIE, self.cookie))
        payloads += [
            SaPayload(tuple(self.offered)),
            KePayload(self.ke_method, self.ke.public_value()),
            NoncePayload(self.nonce),
            *nat_payloads(ike, bytes(8), ike.local, ike.remote),
            *feature_payloads(ike),
        ]
        ike.ni = self.nonce
        if ike.state == IkeState.CREATED:
            ike.set_state(IkeState.INIT_SENT)
        return payloads

    def on_encoded(self, ike: IkeSa, msg: Message, data: bytes) -> None:
        if not msg.response:
            ike.init_request = data
        else:
            ike.init_response = data

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        cookie = notify_of(msg.payloads, NotifyType.COOKIE)
        if cookie is not None:
            if self.cookie_retries >= MAX_COOKIE_RETRIES:
                ike.fail(NotifyType.COOKIE, "responder keeps demanding COOKIEs", self.name)
                return False
            self.cookie_retries += 1
            self.cookie = cookie.data
            ike.count("cookie_retries")
            return True
        bad_ke = notify_of(msg.payloads, NotifyType.INVALID_KE_PAYLOAD)
        if bad_ke is not None:
            wanted = ke_retry_method(bad_ke.data, ike.config.proposals, self.ke_method)
            if not wanted or self.ke_retries >= MAX_KE_RETRIES:
                asked = int.from_bytes(bad_ke.data[:2], "big") if len(bad_ke.data) >= 2 else 0
                ike.fail(
                    NotifyType.INVALID_KE_PAYLOAD,
                    f"responder wants key exchange method {asked}, not offered",
                    self.name,
                )
                return False
            self.ke_retries += 1
            self.ke_method = wanted
            self.ke = None
            ike.count("invalid_ke_retries")
            return True
        err = ike.notify_error_in(msg)
        if err is not None:
            ike.fail(err.type, f"IKE_SA_INIT refused by the peer: {notify_name(err.type)}", self.name)
            return False
        sa = next((p for p in msg.payloads if isinstance(p, SaPayload)), None)
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
        if sa is None or ke is None or nonce is None or len(sa.proposals) != 1:
            ike.fail(NotifyType.INVALID_SYNTAX, "IKE_SA_INIT response lacks SA, KE or Nonce", self.name)
            return False
        suite = verify_chosen(sa.proposals[0], self.offered)
        if suite is None or suite.ke != self.ke_method or ke.group != self.ke_method:
            ike.fail(NotifyType.NO_PROPOSAL_CHOSEN, "responder chose a proposal we did not offer", self.name)
            return False
        if msg.spi_r == bytes(8):
            ike.fail(NotifyType.INVALID_SYNTAX, "responder SPI is zero", self.name)
            return False
        assert self.ke is not None
        try:
            self.ke.process_peer(ke.data)
        except CryptoError as exc:
            ike.fail(NotifyType.INVALID_SYNTAX, str(exc), self.name)
            return False
        ike.spi_r = msg.spi_r
        ike.suite = suite
        assert suite.prf is not None
        ike.prf = PRFS[suite.prf]
        ike.nr = nonce.data
        ike.init_response = msg.raw
        check_nat(ike, msg, ike.spi_r, ike.local, ike.remote)
        read_peer_features(ike, msg)
        ike.derive_keys(skeyseed_initial(ike.prf, ike.ni, ike.nr, self.ke.shared_secret))
        ike.shared_secrets = [self.ke.shared_secret]
        if ike.encap:
            ike.float_to_natt()
        from esplanade.keyexchange.ikev2.tasks.ike_auth import IkeAuth
        from esplanade.keyexchange.ikev2.tasks.ike_intermediate import IkeIntermediate

        followups: list[Task] = [IkeIntermediate(t, m) for t, m in suite.additional_ke]
        followups.append(IkeAuth(self.child, reauth_of=ike.reauth_of))
        for t in reversed(followups):
            ike.queue.appendleft(t)
        ike.set_state(IkeState.INTERMEDIATE_SENT if suite.additional_ke else IkeState.AUTH_SENT)
        return False

    def on_timeout(self, ike: IkeSa) -> None:
        pass

    # -- responder ---------------------------------------------------------------------------
    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        sa = next((p for p in msg.payloads if isinstance(p, SaPayload)), None)
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
        ike.init_request = msg.raw
        if sa is None or ke is None or nonce is None:
            return self._refuse(ike, NotifyType.INVALID_SYNTAX, "IKE_SA_INIT request lacks SA, KE or Nonce")
        ike_props = [p for p in sa.proposals if len(p.spi) == 0]
        suite = select(ike_props, ike.config.proposals, prefer_ke=ke.group)
        if suite is None:
            return self._refuse(
                ike,
                NotifyType.NO_PROPOSAL_CHOSEN,
                f"no acceptable IKE proposal (configured: {', '.join(map(str, ike.config.proposals))})",
            )
        if ke.group != suite.ke:
            ike.count("invalid_ke_sent")
            self.after_send.append(lambda _now: ike.destroy("INVALID_KE_PAYLOAD sent"))
            return [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", suite.ke))]
        self.ke = new_key_exchange(suite.ke, initiator=False)
        try:
            self.ke.process_peer(ke.data)
        except CryptoError as exc:
            return self._refuse(ike, NotifyType.INVALID_SYNTAX, str(exc))
        ike.suite = suite
        assert suite.prf is not None
        ike.prf = PRFS[suite.prf]
        ike.ni = nonce.data
        ike.nr = self.nonce
        check_nat(ike, msg, bytes(8), ike.local, ike.remote)
        read_peer_features(ike, msg)
        ike.derive_keys(skeyseed_initial(ike.prf, ike.ni, ike.nr, self.ke.shared_secret))
        ike.shared_secrets = [self.ke.shared_secret]
        ike.pending_additional_ke = [int(m) for _, m in suite.additional_ke]
        ike.set_state(IkeState.INIT_DONE)
        payloads: list[Payload] = [
            SaPayload((suite.to_proposal(),)),
            KePayload(suite.ke, self.ke.public_value()),
            NoncePayload(self.nonce),
            *nat_payloads(ike, ike.spi_r, ike.local, ike.remote),
            *feature_payloads(ike),
        ]
        if ike.config.remote.auth == "pubkey" and ike.config.cacerts and ike.config.send_certreq:
            from esplanade.keyexchange.ikev2.auth.trust import spki_sha1

            payloads.append(CertreqPayload(data=b"".join(spki_sha1(c) for c in ike.config.cacerts)))
        return payloads

    def _refuse(self, ike: IkeSa, notify: NotifyType, reason: str) -> list[Payload]:
        self.after_send.append(lambda _now: ike.fail(notify, reason, self.name))
        return [NotifyPayload(notify)]
