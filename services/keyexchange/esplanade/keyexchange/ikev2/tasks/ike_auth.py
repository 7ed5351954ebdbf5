"""IKE_AUTH (RFC 7296 §1.2, §2.15): identities, AUTH (PSK or signatures), CERT/CERTREQ,
INITIAL_CONTACT, the configuration payload (§3.15) and the first Child SA."""

from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from esplanade.keyexchange.ikev2.auth.identity import Identity
from esplanade.keyexchange.ikev2.auth.octets import psk_auth, psk_verify, signed_octets
from esplanade.keyexchange.ikev2.auth.signature import SignatureError, sign, verify
from esplanade.keyexchange.ikev2.auth.trust import TrustError, TrustStore, spki_sha1
from esplanade.keyexchange.ikev2.child_sa import ChildState
from esplanade.keyexchange.ikev2.constants import (
    AuthMethod,
    CertEncoding,
    CfgAttr,
    CfgType,
    ExchangeType,
    NotifyType,
)
from esplanade.keyexchange.ikev2.errors import NegotiationError
from esplanade.keyexchange.ikev2.events import IkeSaEstablished, NegotiationFailed
from esplanade.keyexchange.ikev2.ike_sa import IkeState, notify_name
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import (
    AuthPayload,
    CertPayload,
    CertreqPayload,
    CpAttribute,
    CpPayload,
    IdiPayload,
    IdPayload,
    IdrPayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    notify_of,
)
from esplanade.keyexchange.ikev2.tasks import child_negotiation as cn
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.ipsec.selectors import TrafficSelector
    from esplanade.keyexchange.config import ConnectionConfig
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


def int_auth(ike: IkeSa) -> bytes:
    """IntAuth = IntAuth_iN | IntAuth_rN | IKE_AUTH_MID, when IKE_INTERMEDIATE was used (RFC 9242 §3.3.2)."""
    if not ike.int_auth_i:
        return b""
    return ike.int_auth_i + ike.int_auth_r + struct.pack("!I", ike.auth_message_id)


def _id_body(p: IdPayload) -> bytes:
    return p.encode_body()


def local_auth_payloads(ike: IkeSa, id_payload: IdPayload, initiator: bool, certreq: bool) -> list[Payload]:
    """CERT(s) and AUTH for our side."""
    assert ike.keys is not None
    cfg = ike.config
    real = ike.init_request if initiator else ike.init_response
    peer_nonce = ike.nr if initiator else ike.ni
    sk_p = ike.keys.sk_pi if initiator else ike.keys.sk_pr
    octets = signed_octets(ike.prf, real, peer_nonce, sk_p, _id_body(id_payload), int_auth(ike))
    out: list[Payload] = []
    if cfg.local.auth == "psk":
        out.append(AuthPayload(AuthMethod.PSK, psk_auth(ike.prf, cfg.psk, octets)))
        return out
    assert cfg.local.private_key is not None
    if cfg.send_cert == "always" or (cfg.send_cert == "ifasked" and certreq):
        for c in cfg.local.certs:
            out.append(CertPayload(CertEncoding.X509_SIGNATURE, c.public_bytes(serialization.Encoding.DER)))
    method, data = sign(cfg.local.private_key, octets, ike.peer_sig_hashes, cfg.local.rsa_pss)
    out.append(AuthPayload(method, data))
    return out


def verify_peer(ike: IkeSa, msg: Message, cfg: ConnectionConfig, initiator_is_peer: bool, now_wall: float) -> str:
    """Check the peer's ID and AUTH; return '' on success or the failure reason."""
    assert ike.keys is not None
    id_cls = IdiPayload if initiator_is_peer else IdrPayload
    idp = next((p for p in msg.payloads if isinstance(p, id_cls)), None)
    auth = next((p for p in msg.payloads if isinstance(p, AuthPayload)), None)
    if idp is None or auth is None:
        return "ID or AUTH payload missing"
    peer_id = Identity(idp.id_type, idp.data)
    if not cfg.remote.id.matches(peer_id):
        return f"peer identity {peer_id} does not match {cfg.remote.id}"
    real = ike.init_request if initiator_is_peer else ike.init_response
    my_nonce = ike.nr if initiator_is_peer else ike.ni
    sk_p = ike.keys.sk_pi if initiator_is_peer else ike.keys.sk_pr
    octets = signed_octets(ike.prf, real, my_nonce, sk_p, _id_body(idp), int_auth(ike))
    if cfg.remote.auth == "psk":
        if auth.method != AuthMethod.PSK:
            return f"peer used AUTH method {auth.method}, expected PSK"
        if not psk_verify(ike.prf, cfg.psk, octets, auth.data):
            return "PSK AUTH does not verify"
    else:
        if auth.method == AuthMethod.PSK:
            return "peer used PSK, expected a signature"
        certs: list[x509.Certificate] = []
        for p in msg.payloads:
            if isinstance(p, CertPayload) and p.encoding == CertEncoding.X509_SIGNATURE:
                try:
                    certs.append(x509.load_der_x509_certificate(p.data))
                except ValueError:
                    return "undecodable certificate"
        if not certs:
            return "no certificate from the peer"
        import datetime

        store = TrustStore(list(cfg.cacerts), list(cfg.crls))
        try:
            store.verify_chain(certs[0], certs[1:], datetime.datetime.fromtimestamp(now_wall, datetime.UTC))
        except TrustError as exc:
            return str(exc)
        if not peer_id.matches_certificate(certs[0]):
            return f"identity {peer_id} is not confirmed by the certificate"
        try:
            verify(certs[0].public_key(), auth.method, auth.data, octets)
        except SignatureError as exc:
            return f"signature AUTH does not verify: {exc}"
        ike.peer_certs = certs
    ike.peer_id = peer_id
    return ""


class IkeAuth(Task):
    name = "ike_auth"
    exchange = ExchangeType.IKE_AUTH

    def __init__(self, child: str | None = None, reauth_of: str = "") -> None:
        super().__init__()
        self.child = child
        self.reauth_of = reauth_of
        self.spi_in = 0
        self.offered: list[Proposal] = []
        self.tsi: tuple[TrafficSelector, ...] = ()
        self.tsr: tuple[TrafficSelector, ...] = ()

    # -- initiator ----------------------------------------------------------------------------
    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        cfg = ike.config
        ike.auth_message_id = ike.next_request_id
        idi = IdiPayload(cfg.local.id.id_type, cfg.local.id.data)
        payloads: list[Payload] = [idi]
        auth_payloads = local_auth_payloads(ike, idi, True, ike.peer_certreq)
        payloads += [p for p in auth_payloads if isinstance(p, CertPayload)]
        if not self.reauth_of and cfg.unique != "never":
            payloads.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
        if cfg.remote.auth == "pubkey" and cfg.cacerts and cfg.send_certreq:
            payloads.append(CertreqPayload(data=b"".join(spki_sha1(c) for c in cfg.cacerts)))
        if not cfg.remote.id.is_any:
            payloads.append(IdrPayload(cfg.remote.id.id_type, cfg.remote.id.data))
        payloads += [p for p in auth_payloads if isinstance(p, AuthPayload)]
        if cfg.vips:
            attrs = []
            for v in cfg.vips:
                if ":" in v:
                    attrs += [CpAttribute(CfgAttr.INTERNAL_IP6_ADDRESS), CpAttribute(CfgAttr.INTERNAL_IP6_DNS)]
                else:
                    attrs += [CpAttribute(CfgAttr.INTERNAL_IP4_ADDRESS), CpAttribute(CfgAttr.INTERNAL_IP4_DNS)]
            payloads.append(CpPayload(CfgType.REQUEST, tuple(attrs)))
        if self.child is not None:
            ccfg = cfg.child(self.child)
            self.spi_in = ike.hooks.allocate_spi()
            self.offered = cn.offered_proposals(ccfg, self.spi_in, with_ke=False)
            child_payloads, self.tsi, self.tsr = cn.child_request_payloads(ike, ccfg, self.offered)
            payloads += child_payloads
        return payloads

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        has_auth = any(isinstance(p, AuthPayload) for p in msg.payloads)
        if not has_auth:
            err = ike.notify_error_in(msg)
            ntype = err.type if err is not None else NotifyType.AUTHENTICATION_FAILED
            ike.fail(ntype, f"IKE_AUTH refused by the peer: {notify_name(ntype)}", self.name)
            return False
        reason = verify_peer(ike, msg, ike.config, initiator_is_peer=False, now_wall=ike.hooks.wall_time())
        if reason:
            # §2.21.2: an initiator tells the responder in a separate INFORMATIONAL exchange
            ike.send_oneshot([NotifyPayload(NotifyType.AUTHENTICATION_FAILED)], now)
            ike.fail(NotifyType.AUTHENTICATION_FAILED, f"responder authentication failed: {reason}", self.name)
            return False
        cp = next((p for p in msg.payloads if isinstance(p, CpPayload) and p.cfg_type == CfgType.REPLY), None)
        if cp is not None:
            read_cp_reply(ike, cp)
        ike.mark_established(now)
        ike.emit(self._established_event(ike, initiator=True))
        if self.child is not None:
            self._finish_child(ike, msg, now)
        return False

    def _finish_child(self, ike: IkeSa, msg: Message, now: float) -> None:
        assert self.child is not None
        try:
            tsi, tsr = self.tsi, self.tsr
            if ike.virtual_ips:
                tsi = cn.initiator_ts(ike, ike.config.child(self.child))[0] + tsi
            suite, spi_out, got_tsi, got_tsr, mode = cn.initiator_verify(msg, self.offered, tsi, tsr, ignore_ke=True)
        except NegotiationError as exc:
            cn.delete_refused_child(ike, msg, self.spi_in, self.offered)
            ike.emit(NegotiationFailed(ike.id, exc.notify, exc.reason, self.name, self.child))
            return
        child = cn.make_child(
            ike, self.child, suite, self.spi_in, spi_out, True, got_tsi, got_tsr, mode, ike.ni, ike.nr, now
        )
        ike.children[child.id] = child
        ike.announce_child(child, now)

    def _established_event(self, ike: IkeSa, initiator: bool) -> IkeSaEstablished:
        assert ike.suite is not None
        return IkeSaEstablished(
            ike.id,
            ike.config.name,
            initiator,
            str(ike.config.local.id),
            ike.remote_identity_text(),
            ike.local,
            ike.remote,
            ike.suite.describe(),
            ike.nat_local,
            ike.nat_remote,
            tuple(ike.virtual_ips if initiator else ike.assigned_ips),
            tuple(ike.dns),
            tuple(ike.split_subnets),
            ike.rekey_of,
            ike.reauth_of,
        )

    # -- responder ----------------------------------------------------------------------------
    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        ike.auth_message_id = msg.message_id
        idi = next((p for p in msg.payloads if isinstance(p, IdiPayload)), None)
        if idi is not None:
            ike.select_config_for(Identity(idi.id_type, idi.data))
        cfg = ike.config
        reason = verify_peer(ike, msg, cfg, initiator_is_peer=True, now_wall=ike.hooks.wall_time())
        if reason:
            ike.count("auth_failures")
            self.after_send.append(
                lambda _now: ike.fail(
                    NotifyType.AUTHENTICATION_FAILED, f"initiator authentication failed: {reason}", self.name
                )
            )
            return [NotifyPayload(NotifyType.AUTHENTICATION_FAILED)]
        ike.initial_contact = notify_of(msg.payloads, NotifyType.INITIAL_CONTACT) is not None
        ike.access = cn.current_access(ike)
        idr = IdrPayload(cfg.local.id.id_type, cfg.local.id.data)
        certreq = any(isinstance(p, CertreqPayload) for p in msg.payloads)
        out: list[Payload] = [idr, *local_auth_payloads(ike, idr, False, certreq)]
        cp_req = next((p for p in msg.payloads if isinstance(p, CpPayload) and p.cfg_type == CfgType.REQUEST), None)
        cp_failed = False
        if cp_req is not None and cfg.pools:
            reply = build_cp_reply(ike, cp_req)
            if reply is None:
                cp_failed = True
            else:
                out.append(reply)
        ike.mark_established(now)
        ike.emit(self._established_event(ike, initiator=False))
        if not any(isinstance(p, SaPayload) for p in msg.payloads):
            return out  # childless (RFC 6023)
        if cp_failed:
            out.append(NotifyPayload(NotifyType.INTERNAL_ADDRESS_FAILURE))
            ike.emit(
                NegotiationFailed(ike.id, NotifyType.INTERNAL_ADDRESS_FAILURE, "address pool exhausted", self.name)
            )
            return out
        try:
            ccfg, suite, tsi, tsr, mode = cn.responder_select(
                ike, msg, ignore_ke=True, assigned_ips=ike.assigned_ips or None, access=ike.access
            )
        except NegotiationError as exc:
            out.append(NotifyPayload(exc.notify))
            ike.emit(NegotiationFailed(ike.id, exc.notify, exc.reason, self.name))
            return out
        spi_in = ike.hooks.allocate_spi()
        spi_out = struct.unpack("!I", suite.spi)[0]
        child = cn.make_child(ike, ccfg.name, suite, spi_in, spi_out, False, tsr, tsi, mode, ike.ni, ike.nr, now)
        ike.children[child.id] = child
        out += cn.responder_payloads(suite, spi_in, tsi, tsr, mode)
        ike.request_install(child)
        self.awaiting_install.append(child.id)

        def announce(t: float) -> None:
            child.state = ChildState.INSTALLED
            ike.announce_child(child, t)

        self.after_send.append(announce)
        return out


def read_cp_reply(ike: IkeSa, cp: CpPayload) -> None:
    for a in cp.attributes:
        try:
            if a.type == CfgAttr.INTERNAL_IP4_ADDRESS and len(a.value) == 4:
                ike.virtual_ips.append(str(ipaddress.IPv4Address(a.value)))
            elif a.type == CfgAttr.INTERNAL_IP6_ADDRESS and len(a.value) == 17:
                ike.virtual_ips.append(str(ipaddress.IPv6Address(a.value[:16])))
            elif a.type == CfgAttr.INTERNAL_IP4_DNS and len(a.value) == 4:
                ike.dns.append(str(ipaddress.IPv4Address(a.value)))
            elif a.type == CfgAttr.INTERNAL_IP6_DNS and len(a.value) == 16:
                ike.dns.append(str(ipaddress.IPv6Address(a.value)))
            elif a.type == CfgAttr.INTERNAL_IP4_SUBNET and len(a.value) == 8:
                net = ipaddress.IPv4Network((a.value[:4], str(ipaddress.IPv4Address(a.value[4:]))), strict=False)
                ike.split_subnets.append(str(net))
            elif a.type == CfgAttr.INTERNAL_IP6_SUBNET and len(a.value) == 17:
                ike.split_subnets.append(str(ipaddress.IPv6Network((a.value[:16], a.value[16]), strict=False)))
        except ValueError:
            ike.count("bad_cp_attributes")


def build_cp_reply(ike: IkeSa, req: CpPayload) -> CpPayload | None:
    """Assign addresses from the connection's pools; None if a requested family is exhausted."""
    attrs: list[CpAttribute] = []
    wanted = {a.type for a in req.attributes}
    for pool in ike.config.pools:
        v4 = pool.addrs.version == 4
        if (v4 and CfgAttr.INTERNAL_IP4_ADDRESS not in wanted) or (
            not v4 and CfgAttr.INTERNAL_IP6_ADDRESS not in wanted
        ):
            continue
        ip = ike.hooks.allocate_address(pool, ike)
        if ip is None:
            return None
        ike.assigned_ips.append(str(ip))
        if v4:
            attrs.append(CpAttribute(CfgAttr.INTERNAL_IP4_ADDRESS, ip.packed))
        else:
            attrs.append(CpAttribute(CfgAttr.INTERNAL_IP6_ADDRESS, ip.packed + bytes((128,))))
        for d in pool.dns:
            attrs.append(
                CpAttribute(CfgAttr.INTERNAL_IP4_DNS if d.version == 4 else CfgAttr.INTERNAL_IP6_DNS, d.packed)
            )
        # A governed peer learns the routes of what its policy grants, not the pool's subnets.
        subnets = (
            pool.subnets if ike.access is None else [r for r in ike.access.routes if r.version == pool.addrs.version]
        )
        for s in subnets:
            if s.version == 4:
                attrs.append(CpAttribute(CfgAttr.INTERNAL_IP4_SUBNET, s.network_address.packed + s.netmask.packed))
            else:
                attrs.append(CpAttribute(CfgAttr.INTERNAL_IP6_SUBNET, s.network_address.packed + bytes((s.prefixlen,))))
    if not any(a.type in (CfgAttr.INTERNAL_IP4_ADDRESS, CfgAttr.INTERNAL_IP6_ADDRESS) for a in attrs):
        return None
    return CpPayload(CfgType.REPLY, tuple(attrs))


__all__ = ["IkeAuth", "IkeState"]
