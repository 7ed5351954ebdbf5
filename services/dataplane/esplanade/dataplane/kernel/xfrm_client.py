"""Typed XFRM operations over one `XfrmSocket`: SAs, policies, replay state.

Every failure is a `DataplaneError` subclass (see `xfrm_errors.translate`) naming the SA
or policy, never its keys.
"""

from __future__ import annotations

from pyroute2.netlink import NLM_F_REPLACE

from esplanade.dataplane.backend import DataplaneError
from esplanade.dataplane.kernel.xfrm_errors import translate
from esplanade.dataplane.kernel.xfrm_messages import (
    XfrmAeFlag,
    XfrmMsgType,
    xfrm_userpolicy_info,
    xfrm_usersa_flush,
    xfrm_usersa_info,
)
from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicy, XfrmPolicyKey
from esplanade.dataplane.kernel.xfrm_sa import XfrmReplayState, XfrmSa, XfrmSaId, XfrmSaState, aevent_id_message
from esplanade.dataplane.kernel.xfrm_socket import XfrmNetlinkError, XfrmSocket


class XfrmClient:
    def __init__(self, sock: XfrmSocket) -> None:
        self.sock = sock

    # -- SAs ----------------------------------------------------------------------------
    def add_sa(self, sa: XfrmSa) -> None:
        try:
            self.sock.request(sa.to_message(), XfrmMsgType.NEWSA, operation=f"add {sa.id}")
        except XfrmNetlinkError as exc:
            raise translate(exc, _describe_sa(sa), adding_sa=True) from exc

    def update_sa(self, sa: XfrmSa) -> None:
        """XFRM_MSG_UPDSA: the kernel replaces the SA's lifetimes, encap ports, mark... (not keys)."""
        try:
            self.sock.request(sa.to_message(), XfrmMsgType.UPDSA, operation=f"update {sa.id}")
        except XfrmNetlinkError as exc:
            raise translate(exc, _describe_sa(sa), adding_sa=True) from exc

    def delete_sa(self, sa_id: XfrmSaId, *, mark: tuple[int, int] | None = None) -> None:
        msg = sa_id.to_message()
        if mark is not None:
            msg["attrs"] = [("XFRMA_MARK", {"v": mark[0], "m": mark[1]})]
        try:
            self.sock.request(msg, XfrmMsgType.DELSA, operation=f"delete {sa_id}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(sa_id)) from exc

    def get_sa(self, sa_id: XfrmSaId, *, mark: tuple[int, int] | None = None) -> XfrmSaState:
        msg = sa_id.to_message()
        if mark is not None:
            msg["attrs"] = [("XFRMA_MARK", {"v": mark[0], "m": mark[1]})]
        try:
            replies = self.sock.request(msg, XfrmMsgType.GETSA, operation=f"get {sa_id}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(sa_id)) from exc
        for reply in replies:
            if isinstance(reply, xfrm_usersa_info):
                return XfrmSaState.from_message(reply)
        raise DataplaneError(f"kernel answered GETSA for {sa_id} without an SA")

    def dump_sas(self) -> list[XfrmSaState]:
        try:
            replies = self.sock.dump(xfrm_usersa_info(), XfrmMsgType.GETSA, operation="dump SAs")
        except XfrmNetlinkError as exc:
            raise translate(exc, "the SA database") from exc
        return [XfrmSaState.from_message(m) for m in replies if isinstance(m, xfrm_usersa_info)]

    def flush_sas(self, proto: int = 0) -> None:
        """Remove every SA of `proto` (0: all IPsec protocols) in this namespace."""
        msg = xfrm_usersa_flush()
        msg["proto"] = proto
        try:
            self.sock.request(msg, XfrmMsgType.FLUSHSA, operation="flush SAs")
        except XfrmNetlinkError as exc:
            raise translate(exc, "the SA database") from exc

    # -- replay state and sequence numbers (XFRM_MSG_GETAE / NEWAE) ----------------------
    def get_replay_state(self, sa_id: XfrmSaId, *, src: str = "", reqid: int = 0) -> XfrmReplayState:
        msg = aevent_id_message(sa_id, src, reqid, XfrmAeFlag.RVAL | XfrmAeFlag.LVAL)
        try:
            replies = self.sock.request(msg, XfrmMsgType.GETAE, operation=f"get replay state of {sa_id}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(sa_id)) from exc
        for reply in replies:
            return XfrmReplayState.from_attrs(reply)
        raise DataplaneError(f"kernel answered GETAE for {sa_id} without a replay state")

    def set_replay_state(
        self,
        sa_id: XfrmSaId,
        state: XfrmReplayState,
        *,
        src: str = "",
        reqid: int = 0,
        esn: bool = True,
    ) -> None:
        """Restore sequence numbers (e.g. after failover) with XFRM_MSG_NEWAE.

        `esn` says which attribute the SA was created with (XFRMA_REPLAY_ESN_VAL for ESN or
        windows above 32, else XFRMA_REPLAY_VAL); the kernel rejects the other one.
        """
        msg = aevent_id_message(sa_id, src, reqid, XfrmAeFlag.RVAL)
        if esn:
            words = max(1, len(state.bitmap), (state.replay_window + 31) // 32)
            bitmap = list(state.bitmap) + [0] * (words - len(state.bitmap))
            value = {
                "bmp_len": words,
                "oseq": state.oseq,
                "seq": state.seq,
                "oseq_hi": state.oseq_hi,
                "seq_hi": state.seq_hi,
                "replay_window": state.replay_window,
                "bmp": bitmap,
            }
            msg["attrs"] = [("XFRMA_REPLAY_ESN_VAL", value)]
        else:
            bitmap_word = state.bitmap[0] if state.bitmap else 0
            msg["attrs"] = [("XFRMA_REPLAY_VAL", {"oseq": state.oseq, "seq": state.seq, "bitmap": bitmap_word})]
        try:
            self.sock.request(msg, XfrmMsgType.NEWAE, flags=NLM_F_REPLACE, operation=f"set replay state of {sa_id}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(sa_id)) from exc

    def set_aevent_thresholds(
        self, sa_id: XfrmSaId, *, src: str = "", reqid: int = 0, replay_packets: int = 0, timer_tenths: int = 0
    ) -> None:
        """Ask for XFRM_MSG_NEWAE events (group AEVENTS) every `replay_packets` or timer period."""
        msg = aevent_id_message(sa_id, src, reqid, XfrmAeFlag.RTHR | XfrmAeFlag.ETHR)
        attrs: list[tuple[str, int]] = []
        if replay_packets:
            attrs.append(("XFRMA_REPLAY_THRESH", replay_packets))
        if timer_tenths:
            attrs.append(("XFRMA_ETIMER_THRESH", timer_tenths))
        msg["attrs"] = attrs
        try:
            self.sock.request(msg, XfrmMsgType.NEWAE, flags=NLM_F_REPLACE, operation=f"set event thresholds of {sa_id}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(sa_id)) from exc

    # -- policies -----------------------------------------------------------------------
    def add_policy(self, policy: XfrmPolicy) -> None:
        try:
            self.sock.request(policy.to_message(), XfrmMsgType.NEWPOLICY, operation=f"add {policy}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(policy)) from exc

    def update_policy(self, policy: XfrmPolicy) -> None:
        """XFRM_MSG_UPDPOLICY: create or replace the policy with the same key."""
        try:
            self.sock.request(policy.to_message(), XfrmMsgType.UPDPOLICY, operation=f"update {policy}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(policy)) from exc

    def delete_policy(self, key: XfrmPolicyKey) -> None:
        try:
            self.sock.request(key.to_message(), XfrmMsgType.DELPOLICY, operation=f"delete {key}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(key)) from exc

    def get_policy(self, key: XfrmPolicyKey) -> XfrmPolicy:
        try:
            replies = self.sock.request(key.to_message(), XfrmMsgType.GETPOLICY, operation=f"get {key}")
        except XfrmNetlinkError as exc:
            raise translate(exc, str(key)) from exc
        for reply in replies:
            if isinstance(reply, xfrm_userpolicy_info):
                return XfrmPolicy.from_message(reply)
        raise DataplaneError(f"kernel answered GETPOLICY for {key} without a policy")

    def dump_policies(self, *, include_socket_policies: bool = False) -> list[XfrmPolicy]:
        """The SPD; per-socket policies (IP_XFRM_POLICY, e.g. IKE bypass) only when asked for."""
        try:
            replies = self.sock.dump(xfrm_userpolicy_info(), XfrmMsgType.GETPOLICY, operation="dump policies")
        except XfrmNetlinkError as exc:
            raise translate(exc, "the policy database") from exc
        policies = [XfrmPolicy.from_message(m) for m in replies if isinstance(m, xfrm_userpolicy_info)]
        return [p for p in policies if include_socket_policies or not p.is_socket_policy]


def _describe_sa(sa: XfrmSa) -> str:
    algs = [a.name for a in (sa.aead, sa.crypt, sa.auth) if a is not None]
    return f"{sa} [{' + '.join(algs) or 'no algorithm'}]"
