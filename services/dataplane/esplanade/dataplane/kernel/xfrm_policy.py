"""Kernel policies: `SpdPolicy` -> one or more `XfrmPolicy` -> `xfrm_userpolicy_info`.

One SPD entry becomes as many kernel policies as its traffic selectors need (see
`xfrm_selector.kernel_selectors`); all of them share direction, action, priority,
template, mark and if_id. The kernel identifies a policy by (direction, selector, mark,
if_id): `XfrmPolicy.key` is that identity, used to delete, replace and to recognise the
policy named in an ACQUIRE.

Selector orientation follows XFRM: an OUT policy matches local -> remote packets, IN and
FWD policies match remote -> local ones. `tunnel_src`/`tunnel_dst` of the SpdPolicy are
the template's outer addresses as the kernel wants them for that direction (for IN/FWD:
src is the peer, dst is this gateway). PROTECT makes an ALLOW policy with one template
(`reqid` links it to the SAs), BYPASS an ALLOW policy without template, DISCARD a BLOCK.
A trap policy (`trap=True`) is a PROTECT policy installed before any SA exists: the kernel
answers matching traffic with XFRM_MSG_ACQUIRE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from esplanade.dataplane.backend import InvalidArgument
from esplanade.dataplane.kernel.xfrm_messages import (
    ALL_ALGORITHMS,
    XfrmMode,
    XfrmPolicyAction,
    XfrmPolicyDir,
    xfrm_userpolicy_id,
    xfrm_userpolicy_info,
)
from esplanade.dataplane.kernel.xfrm_selector import (
    AF_INET,
    SelectorError,
    XfrmSelector,
    family_of,
    kernel_selectors,
    pack_address,
    unpack_address,
)
from esplanade.ipsec.selectors import ANY_PROTOCOL, TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import Mode

MAX_PRIORITY = 0xFFFFFFFF
SOCKET_POLICY_DIR_BASE = 3  # XFRM_POLICY_MAX


@dataclass(frozen=True, slots=True)
class XfrmTemplate:
    """struct xfrm_user_tmpl: which SA (protocol, mode, outer addresses, reqid) a policy needs."""

    family: int
    src: str
    dst: str
    proto: int
    mode: int
    reqid: int
    spi: int = 0
    share: int = 0
    optional: bool = False
    aalgos: int = ALL_ALGORITHMS
    ealgos: int = ALL_ALGORITHMS
    calgos: int = ALL_ALGORITHMS

    def to_value(self) -> dict[str, Any]:
        return {
            "id_daddr": pack_address(self.dst),
            "id_spi": self.spi,
            "id_proto": self.proto,
            "family": self.family,
            "saddr": pack_address(self.src),
            "reqid": self.reqid,
            "mode": self.mode,
            "share": self.share,
            "optional": int(self.optional),
            "aalgos": self.aalgos,
            "ealgos": self.ealgos,
            "calgos": self.calgos,
        }

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> XfrmTemplate:
        family = int(value["family"])
        return cls(
            family=family,
            src=unpack_address(value["saddr"], family),
            dst=unpack_address(value["id_daddr"], family),
            proto=int(value["id_proto"]),
            mode=int(value["mode"]),
            reqid=int(value["reqid"]),
            spi=int(value["id_spi"]),
            share=int(value["share"]),
            optional=bool(value["optional"]),
            aalgos=int(value["aalgos"]),
            ealgos=int(value["ealgos"]),
            calgos=int(value["calgos"]),
        )


@dataclass(frozen=True, slots=True, order=True)
class XfrmPolicyKey:
    """How the kernel tells policies apart (besides the policy type and security context)."""

    direction: int
    selector: XfrmSelector
    mark: tuple[int, int] | None
    if_id: int

    def __str__(self) -> str:
        extra = f" mark {self.mark[0]:#x}/{self.mark[1]:#x}" if self.mark else ""
        extra += f" if_id {self.if_id}" if self.if_id else ""
        direction = XfrmPolicyDir(self.direction).name.lower() if self.direction < SOCKET_POLICY_DIR_BASE else "socket"
        return f"policy {direction} {self.selector}{extra}"

    def to_message(self) -> xfrm_userpolicy_id:
        msg = xfrm_userpolicy_id()
        msg.update(self.selector.to_fields("sel_"))
        msg.update(dir=self.direction, index=0)
        msg["attrs"] = _mark_if_id_attrs(self.mark, self.if_id)
        return msg


@dataclass(frozen=True, slots=True)
class XfrmPolicy:
    selector: XfrmSelector
    direction: int
    action: int
    priority: int
    templates: tuple[XfrmTemplate, ...] = ()
    mark: tuple[int, int] | None = None
    if_id: int = 0
    flags: int = 0

    @property
    def key(self) -> XfrmPolicyKey:
        return XfrmPolicyKey(self.direction, self.selector, self.mark, self.if_id)

    @property
    def is_socket_policy(self) -> bool:
        """A per-socket policy: dumps list them with direction XFRM_POLICY_MAX + in/out."""
        return self.direction >= SOCKET_POLICY_DIR_BASE

    def __str__(self) -> str:
        return str(self.key)

    def to_message(self) -> xfrm_userpolicy_info:
        msg = xfrm_userpolicy_info()
        msg.update(self.selector.to_fields("sel_"))
        msg.update(
            priority=self.priority,
            index=0,
            dir=self.direction,
            action=self.action,
            flags=self.flags,
            share=0,
        )
        attrs: list[tuple[str, Any]] = []
        if self.templates:
            attrs.append(("XFRMA_TMPL", [t.to_value() for t in self.templates]))
        attrs += _mark_if_id_attrs(self.mark, self.if_id)
        msg["attrs"] = attrs
        return msg

    @classmethod
    def from_message(cls, msg: Any, prefix: str = "") -> XfrmPolicy:
        mark = msg.get_attr("XFRMA_MARK")
        return cls(
            selector=XfrmSelector.from_fields(msg, f"{prefix}sel_"),
            direction=int(msg[f"{prefix}dir"]),
            action=int(msg[f"{prefix}action"]),
            priority=int(msg[f"{prefix}priority"]),
            templates=tuple(XfrmTemplate.from_value(v) for v in (msg.get_attr("XFRMA_TMPL") or [])),
            mark=(int(mark["v"]), int(mark["m"])) if mark else None,
            if_id=int(msg.get_attr("XFRMA_IF_ID") or 0),
            flags=int(msg[f"{prefix}flags"]),
        )


def _mark_if_id_attrs(mark: tuple[int, int] | None, if_id: int) -> list[tuple[str, Any]]:
    attrs: list[tuple[str, Any]] = []
    if mark is not None:
        attrs.append(("XFRMA_MARK", {"v": mark[0], "m": mark[1]}))
    if if_id:
        attrs.append(("XFRMA_IF_ID", if_id))
    return attrs


_DIRECTIONS = {
    PolicyDirection.IN: XfrmPolicyDir.IN,
    PolicyDirection.OUT: XfrmPolicyDir.OUT,
    PolicyDirection.FWD: XfrmPolicyDir.FWD,
}


def xfrm_policies_from_spd(policy: SpdPolicy, *, reqid: int) -> list[XfrmPolicy]:
    """The kernel policies for one SPD entry; raises InvalidArgument when it cannot be expressed."""
    if not 0 <= policy.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"policy {policy.id!r}: priority {policy.priority} outside 0..{MAX_PRIORITY}")
    if policy.direction == PolicyDirection.OUT:
        src_ts, dst_ts = policy.local_ts, policy.remote_ts
    else:
        src_ts, dst_ts = policy.remote_ts, policy.local_ts
    try:
        selectors = kernel_selectors(src_ts, dst_ts)
    except SelectorError as exc:
        raise InvalidArgument(f"policy {policy.id!r}: {exc}") from None
    templates: tuple[XfrmTemplate, ...] = ()
    if policy.action == PolicyAction.PROTECT:
        templates = (_template(policy, reqid, selectors[0].family),)
    action = XfrmPolicyAction.BLOCK if policy.action == PolicyAction.DISCARD else XfrmPolicyAction.ALLOW
    return [
        XfrmPolicy(
            selector=sel,
            direction=_DIRECTIONS[policy.direction],
            action=action,
            priority=policy.priority,
            templates=templates,
            mark=(policy.mark, 0xFFFFFFFF) if policy.mark else None,
            if_id=policy.if_id,
        )
        for sel in selectors
    ]


def _template(policy: SpdPolicy, reqid: int, inner_family: int) -> XfrmTemplate:
    if policy.mode == Mode.TUNNEL:
        if not policy.tunnel_src or not policy.tunnel_dst:
            raise InvalidArgument(f"policy {policy.id!r}: a tunnel-mode PROTECT policy needs tunnel_src and tunnel_dst")
        try:
            family = family_of(policy.tunnel_dst)
            if family_of(policy.tunnel_src) != family:
                raise InvalidArgument(
                    f"policy {policy.id!r}: tunnel addresses {policy.tunnel_src} and {policy.tunnel_dst}"
                    " differ in family"
                )
        except ValueError as exc:
            raise InvalidArgument(f"policy {policy.id!r}: {exc}") from None
        mode = XfrmMode.TUNNEL
    else:
        family = inner_family
        mode = XfrmMode.TRANSPORT
        for addr in (policy.tunnel_src, policy.tunnel_dst):
            try:
                if addr and family_of(addr) != family:
                    version = 4 if family == AF_INET else 6
                    raise InvalidArgument(f"policy {policy.id!r}: transport address {addr} is not IPv{version}")
            except ValueError as exc:
                raise InvalidArgument(f"policy {policy.id!r}: {exc}") from None
    return XfrmTemplate(
        family=family,
        src=policy.tunnel_src,
        dst=policy.tunnel_dst,
        proto=int(policy.protocol),
        mode=mode,
        reqid=reqid,
    )


MAX_FILTER_ENTRIES = 4096  # narrowed kernel entries per SPD entry; a bigger filter is refused


def narrowed_policies(policy: SpdPolicy, *, reqid: int, granted: tuple[TrafficSelector, ...]) -> list[XfrmPolicy]:
    """The kernel policies of an inbound (IN or FWD) PROTECT entry whose Child SA carries an
    identity filter: what decapsulated packets may match once the filter is applied.

    - one ALLOW entry with the entry's template per kernel selector of
      (remote_ts -> local_ts ∩ granted selector), one priority better than the entry's
      (`priority - 1`), so that it wins over the BLOCK below;
    - one BLOCK entry per kernel selector of the whole negotiated pair, at the entry's own
      priority and key, where the PROTECT entry was: a decapsulated packet the filter does not
      grant matches it and is dropped (counted as XfrmInPolBlock), in tunnel mode and in
      transport mode alike (a transport-mode packet that matched no policy would pass).

    A granted selector covers the destination (the resource) of the packets *from* the peer:
    address, protocol and port; the peer's side stays the negotiated remote_ts. An allow that
    coincides with a negotiated selector takes its place at the original priority. ALLOW
    entries come first, so that applying the list in order never drops a granted flow.
    Raises InvalidArgument when the filter cannot be expressed (OPAQUE ports, a selector
    needing more than MAX_KERNEL_SELECTORS, more than MAX_FILTER_ENTRIES in all)."""
    if policy.action != PolicyAction.PROTECT or policy.direction == PolicyDirection.OUT:
        raise InvalidArgument(f"policy {policy.id!r}: only inbound PROTECT entries carry an identity filter")
    full = xfrm_policies_from_spd(policy, reqid=reqid)
    full_keys = {kp.key: kp for kp in full}
    allow_priority = max(policy.priority - 1, 0)
    block_priority = policy.priority if policy.priority > allow_priority else policy.priority + 1
    allows: dict[XfrmPolicyKey, XfrmPolicy] = {}
    for selector in granted:
        local = policy.local_ts.intersect(selector)
        if local is None:
            continue
        if (
            policy.remote_ts.protocol != ANY_PROTOCOL
            and local.protocol != ANY_PROTOCOL
            and policy.remote_ts.protocol != local.protocol
        ):
            continue  # the peer's side allows one protocol, the grant another: no packet matches both
        try:
            selectors = kernel_selectors(policy.remote_ts, local)
        except SelectorError as exc:
            raise InvalidArgument(f"policy {policy.id!r}: identity filter selector {selector}: {exc}") from None
        for sel in selectors:
            entry = replace(full[0], selector=sel, priority=allow_priority)
            if entry.key in full_keys:
                entry = full_keys[entry.key]  # the negotiated entry itself: it covers its whole selector
            allows.setdefault(entry.key, entry)
        if len(allows) > MAX_FILTER_ENTRIES:
            raise InvalidArgument(
                f"policy {policy.id!r}: the identity filter needs more than {MAX_FILTER_ENTRIES} kernel policies"
            )
    blocks = [
        XfrmPolicy(
            selector=kp.selector,
            direction=kp.direction,
            action=XfrmPolicyAction.BLOCK,
            priority=block_priority,
            mark=kp.mark,
            if_id=kp.if_id,
        )
        for kp in full
        if kp.key not in allows
    ]
    return list(allows.values()) + blocks
