"""What IKE_AUTH, CREATE_CHILD_SA and rekeys share for a Child SA: SA/TS payloads, selection,
narrowing (§2.9), KEYMAT (§2.17)."""

from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING

from esplanade.ipsec.selectors import TrafficSelector, narrow
from esplanade.ipsec.transforms import Mode, ProtocolId
from esplanade.keyexchange.config import ChildConfig
from esplanade.keyexchange.ikev2.access import AccessDecided, AccessGrant
from esplanade.keyexchange.ikev2.child_sa import ChildSa
from esplanade.keyexchange.ikev2.constants import NotifyType, known_notify
from esplanade.keyexchange.ikev2.crypto.keymat import child_keymat
from esplanade.keyexchange.ikev2.errors import NegotiationError
from esplanade.keyexchange.ikev2.message import Message
from esplanade.keyexchange.ikev2.payloads import (
    KePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    TsiPayload,
    TsrPayload,
    notify_of,
)
from esplanade.keyexchange.ikev2.proposals import Suite, select, verify_chosen

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


def spi_bytes(spi: int) -> bytes:
    return struct.pack("!I", spi)


def offered_proposals(cfg: ChildConfig, spi_in: int, with_ke: bool, first_ke: int = 0) -> list[Proposal]:
    specs = cfg.proposals if with_ke else tuple(p.without_ke() for p in cfg.proposals)
    if with_ke and first_ke:
        from esplanade.ipsec.transforms import KeId

        specs = tuple(p.with_ke_first(KeId(first_ke)) for p in specs)
    out: list[Proposal] = []
    for s in specs:
        p = s.to_proposal(len(out) + 1, spi_bytes(spi_in))
        if p not in out:
            out.append(p)
    return out


def initiator_ts(ike: IkeSa, cfg: ChildConfig) -> tuple[tuple[TrafficSelector, ...], tuple[TrafficSelector, ...]]:
    tsi = cfg.local_ts
    if ike.virtual_ips:
        tsi = tuple(TrafficSelector.from_network(f"{ip}/{32 if ':' not in ip else 128}") for ip in ike.virtual_ips)
    elif ike.config.vips:
        tsi = tuple(TrafficSelector.any(6 if ":" in v else 4) for v in ike.config.vips)
    return tsi, cfg.remote_ts


def child_request_payloads(
    ike: IkeSa, cfg: ChildConfig, proposals: list[Proposal]
) -> tuple[list[Payload], tuple[TrafficSelector, ...], tuple[TrafficSelector, ...]]:
    tsi, tsr = initiator_ts(ike, cfg)
    payloads: list[Payload] = []
    if cfg.mode == Mode.TRANSPORT:
        payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    payloads += [SaPayload(tuple(proposals)), TsiPayload(tsi), TsrPayload(tsr)]
    return payloads, tsi, tsr


def _get(msg: Message, cls: type[Payload]) -> Payload | None:
    for p in msg.payloads:
        if isinstance(p, cls):
            return p
    return None


def current_access(ike: IkeSa) -> AccessGrant | None:
    """The access policy's grant to an authenticated initiator, as of now (None: not governed).

    An IKE SA governed at IKE_AUTH stays governed: if its peer's identity no longer binds (the
    policy identity deleted, its IKE id removed), later Child SAs and rekeys are granted nothing,
    not the connection's selectors."""
    if ike.initiator or ike.peer_id is None or ike.hooks.access_for is None:
        return None
    grant = ike.hooks.access_for(ike)
    if grant is None and ike.access is not None:
        return AccessGrant(ike.access.identity, (), (), ())
    return grant


def responder_select(
    ike: IkeSa,
    msg: Message,
    *,
    ignore_ke: bool,
    assigned_ips: list[str] | None = None,
    access: AccessGrant | None = None,
    rekeying: str | None = None,
) -> tuple[ChildConfig, Suite, tuple[TrafficSelector, ...], tuple[TrafficSelector, ...], Mode]:
    """Pick child config, ESP proposal and narrowed selectors for a request; NegotiationError if none.

    With an `access` grant the responder's selectors are narrowed to it too (`ikev2.access`); the
    decision is reported as `AccessDecided`, a refusal is TS_UNACCEPTABLE. `rekeying`: the name
    of the child config of the Child SA being rekeyed, the only one the request is checked
    against while it exists (a rekey keeps its SA's proposals, selectors and mode: another child
    whose selectors happen to cover the request must not lend it different ones)."""
    sa = _get(msg, SaPayload)
    tsi_p = _get(msg, TsiPayload)
    tsr_p = _get(msg, TsrPayload)
    if not isinstance(sa, SaPayload) or not isinstance(tsi_p, TsiPayload) or not isinstance(tsr_p, TsrPayload):
        raise NegotiationError(NotifyType.INVALID_SYNTAX, "Child SA request without SA, TSi and TSr")
    esp = [p for p in sa.proposals if p.protocol in (ProtocolId.ESP, ProtocolId.AH) and len(p.spi) == 4]
    if not esp:
        raise NegotiationError(NotifyType.NO_PROPOSAL_CHOSEN, "no ESP or AH proposal with a 4-byte SPI")
    ts_failure = ""
    proposal_failure = ""
    policy_failure = ""
    candidates = [c for c in ike.config.children if c.name == rekeying] or list(ike.config.children)
    for cfg in candidates:
        remote_allowed = list(cfg.remote_ts)
        if assigned_ips:
            remote_allowed = [
                TrafficSelector.from_network(f"{ip}/{32 if ':' not in ip else 128}") for ip in assigned_ips
            ]
        tsi = narrow(list(tsi_p.selectors), remote_allowed)
        tsr = narrow(list(tsr_p.selectors), list(cfg.local_ts))
        if not tsi or not tsr:
            ts_failure = (
                f"traffic selectors {', '.join(map(str, tsi_p.selectors))} === {', '.join(map(str, tsr_p.selectors))}"
                f" do not fit child {cfg.name}"
            )
            continue
        if access is not None:
            tsr = narrow(tsr, list(access.selectors))
            if not tsr:
                who = f"identity '{access.identity}'" if access.identity else "a peer bound to no identity"
                policy_failure = (
                    f"policy grants {who} nothing within {', '.join(map(str, tsr_p.selectors))} (child {cfg.name})"
                )
                continue
        ke = _get(msg, KePayload)
        prefer = ke.group if isinstance(ke, KePayload) else 0
        suite = select(esp, cfg.proposals, ignore_ke=ignore_ke, prefer_ke=prefer)
        if suite is None:
            protocol = "AH" if cfg.ah_proposals else "ESP"
            proposal_failure = f"no acceptable {protocol} proposal for child {cfg.name}"
            continue
        transport = notify_of(msg.payloads, NotifyType.USE_TRANSPORT_MODE) is not None
        mode = Mode.TRANSPORT if transport and cfg.mode == Mode.TRANSPORT else Mode.TUNNEL
        if access is not None:
            _decided(ike, access, True, cfg.name, tsr, "granted by policy")
        return cfg, suite, tuple(tsi), tuple(tsr), mode
    if proposal_failure:
        raise NegotiationError(NotifyType.NO_PROPOSAL_CHOSEN, proposal_failure)
    if policy_failure and access is not None:
        _decided(ike, access, False, "", list(tsr_p.selectors), policy_failure)
        raise NegotiationError(NotifyType.TS_UNACCEPTABLE, policy_failure)
    raise NegotiationError(NotifyType.TS_UNACCEPTABLE, ts_failure or "no child configuration")


def _decided(
    ike: IkeSa, access: AccessGrant, allowed: bool, child: str, selectors: list[TrafficSelector], reason: str
) -> None:
    ike.emit(
        AccessDecided(
            ike.id,
            access.identity,
            ike.remote_identity_text(),
            (ike.remote[0], ike.remote[1]),
            allowed,
            child,
            tuple(str(ts) for ts in selectors),
            access.rules,
            reason,
        )
    )


def responder_payloads(
    suite: Suite, spi_in: int, tsi: tuple[TrafficSelector, ...], tsr: tuple[TrafficSelector, ...], mode: Mode
) -> list[Payload]:
    chosen = Suite(
        suite.protocol,
        suite.encr,
        suite.integ,
        suite.prf,
        suite.ke,
        suite.additional_ke,
        suite.esn,
        suite.number,
        spi_bytes(spi_in),
    )
    out: list[Payload] = []
    if mode == Mode.TRANSPORT:
        out.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    out += [SaPayload((chosen.to_proposal(),)), TsiPayload(tsi), TsrPayload(tsr)]
    return out


def initiator_verify(
    msg: Message,
    offered: list[Proposal],
    tsi_offered: tuple[TrafficSelector, ...],
    tsr_offered: tuple[TrafficSelector, ...],
    *,
    ignore_ke: bool,
) -> tuple[Suite, int, tuple[TrafficSelector, ...], tuple[TrafficSelector, ...], Mode]:
    for p in msg.payloads:
        if isinstance(p, NotifyPayload) and p.type < 16384:
            try:
                name = NotifyType(p.type).name
            except ValueError:
                name = str(p.type)
            raise NegotiationError(
                known_notify(p.type),
                f"peer refused the Child SA: {name}",
            )
    sa = _get(msg, SaPayload)
    tsi_p = _get(msg, TsiPayload)
    tsr_p = _get(msg, TsrPayload)
    if not isinstance(sa, SaPayload) or not isinstance(tsi_p, TsiPayload) or not isinstance(tsr_p, TsrPayload):
        raise NegotiationError(NotifyType.INVALID_SYNTAX, "Child SA response without SA, TSi and TSr")
    if len(sa.proposals) != 1 or len(sa.proposals[0].spi) != 4:
        raise NegotiationError(NotifyType.NO_PROPOSAL_CHOSEN, "response must choose exactly one proposal")
    suite = verify_chosen(sa.proposals[0], offered, ignore_ke=ignore_ke)
    if suite is None:
        raise NegotiationError(NotifyType.NO_PROPOSAL_CHOSEN, "responder chose a proposal we did not offer")
    for got, sent in ((tsi_p.selectors, tsi_offered), (tsr_p.selectors, tsr_offered)):
        if not all(any(s.contains(g) for s in sent) for g in got):
            raise NegotiationError(NotifyType.TS_UNACCEPTABLE, "responder widened the traffic selectors")
    spi_out = struct.unpack("!I", sa.proposals[0].spi)[0]
    mode = Mode.TRANSPORT if notify_of(msg.payloads, NotifyType.USE_TRANSPORT_MODE) else Mode.TUNNEL
    return suite, spi_out, tuple(tsi_p.selectors), tuple(tsr_p.selectors), mode


def responder_created_child(msg: Message) -> bool:
    """The response chose a Child SA (no error notify, one proposal with its SPI): the responder
    created and installed it, whether or not we accept its choice."""
    if any(isinstance(p, NotifyPayload) and p.type < 16384 for p in msg.payloads):
        return False
    sa = _get(msg, SaPayload)
    return isinstance(sa, SaPayload) and len(sa.proposals) == 1 and len(sa.proposals[0].spi) == 4


def delete_refused_child(ike: IkeSa, msg: Message, spi_in: int, offered: list[Proposal]) -> None:
    """Initiator: we refuse the Child SA the responder chose. If it created one, delete it next
    (as strongSwan's child_create does): otherwise it sends into an SA we do not have, and the
    Child SA it replaced, waiting for our DELETE, is never rekeyed again."""
    if not responder_created_child(msg) or not offered:
        return
    from esplanade.keyexchange.ikev2.tasks.child_delete import ChildDelete

    protocol = ProtocolId(offered[0].protocol)
    ike.queue.appendleft(ChildDelete([spi_in], quiet=True, reason="refused at creation", protocol=protocol))


def make_child(
    ike: IkeSa,
    cfg_name: str,
    suite: Suite,
    spi_in: int,
    spi_out: int,
    initiator: bool,
    local_ts: tuple[TrafficSelector, ...],
    remote_ts: tuple[TrafficSelector, ...],
    mode: Mode,
    ni: bytes,
    nr: bytes,
    now: float,
    shared: list[bytes] | None = None,
) -> ChildSa:
    assert ike.keys is not None
    keys = child_keymat(ike.prf, ike.keys.sk_d, ni, nr, suite.encr, suite.integ, shared)
    return ChildSa(
        id=ike.new_child_id(),
        name=cfg_name,
        spi_in=spi_in,
        spi_out=spi_out,
        suite=suite,
        keys=keys,
        initiator=initiator,
        local_ts=local_ts,
        remote_ts=remote_ts,
        mode=mode,
        created_at=now,
        nonces=(ni, nr),
    )


def host_prefix(ip: str) -> str:
    return f"{ip}/{ipaddress.ip_address(ip).max_prefixlen}"
