"""SpdPolicy -> kernel policies: orientation, actions, templates, expansion, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from esplanade.dataplane.backend import InvalidArgument
from esplanade.dataplane.kernel.xfrm_messages import XfrmMode, XfrmMsgType, XfrmPolicyAction, XfrmPolicyDir
from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicy, xfrm_policies_from_spd
from esplanade.dataplane.kernel.xfrm_socket import NetlinkHeader, decode_message
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import IpProto, Mode

OUT = SpdPolicy(
    id="p",
    direction=PolicyDirection.OUT,
    local_ts=TrafficSelector.parse("10.1.0.0/24"),
    remote_ts=TrafficSelector.parse("10.2.0.0/24[tcp/443]"),
    priority=100,
    tunnel_src="192.0.2.1",
    tunnel_dst="192.0.2.2",
)


def test_out_policy_matches_local_to_remote_with_a_tunnel_template() -> None:
    (policy,) = xfrm_policies_from_spd(OUT, reqid=4)
    sel = policy.selector
    assert (sel.saddr, sel.prefixlen_s, sel.daddr, sel.prefixlen_d) == ("10.1.0.0", 24, "10.2.0.0", 24)
    assert (sel.proto, sel.dport, sel.dport_mask, sel.sport_mask) == (6, 443, 0xFFFF, 0)
    assert (policy.direction, policy.action, policy.priority) == (XfrmPolicyDir.OUT, XfrmPolicyAction.ALLOW, 100)
    (tmpl,) = policy.templates
    assert (tmpl.src, tmpl.dst, tmpl.proto, tmpl.mode, tmpl.reqid) == ("192.0.2.1", "192.0.2.2", 50, XfrmMode.TUNNEL, 4)


@pytest.mark.parametrize("direction", [PolicyDirection.IN, PolicyDirection.FWD])
def test_in_and_fwd_policies_match_remote_to_local(direction: PolicyDirection) -> None:
    (policy,) = xfrm_policies_from_spd(dataclasses.replace(OUT, direction=direction), reqid=4)
    assert (policy.selector.saddr, policy.selector.daddr) == ("10.2.0.0", "10.1.0.0")
    assert (policy.selector.sport, policy.selector.dport_mask) == (443, 0)
    assert policy.direction == {PolicyDirection.IN: XfrmPolicyDir.IN, PolicyDirection.FWD: XfrmPolicyDir.FWD}[direction]


def test_bypass_and_discard_have_no_template() -> None:
    (bypass,) = xfrm_policies_from_spd(dataclasses.replace(OUT, action=PolicyAction.BYPASS), reqid=0)
    (discard,) = xfrm_policies_from_spd(dataclasses.replace(OUT, action=PolicyAction.DISCARD), reqid=0)
    assert (bypass.action, bypass.templates) == (XfrmPolicyAction.ALLOW, ())
    assert (discard.action, discard.templates) == (XfrmPolicyAction.BLOCK, ())


def test_transport_ah_template_and_mark_if_id() -> None:
    policy = dataclasses.replace(
        OUT, mode=Mode.TRANSPORT, protocol=IpProto.AH, tunnel_src="", tunnel_dst="", mark=5, if_id=6
    )
    (kernel,) = xfrm_policies_from_spd(policy, reqid=2)
    (tmpl,) = kernel.templates
    assert (tmpl.mode, tmpl.proto, tmpl.src, tmpl.dst, tmpl.family) == (XfrmMode.TRANSPORT, 51, "", "", 2)
    assert kernel.mark == (5, 0xFFFFFFFF) and kernel.if_id == 6


def test_ranges_expand_into_several_policies_with_one_template() -> None:
    policy = dataclasses.replace(OUT, remote_ts=TrafficSelector.parse("10.2.0.0-10.2.0.2[udp/1000-1003]"))
    kernel = xfrm_policies_from_spd(policy, reqid=1)
    assert len(kernel) == 2  # 10.2.0.0/31 + 10.2.0.2/32, ports 1000-1003 = one block
    assert len({p.key for p in kernel}) == 2 and len({p.templates for p in kernel}) == 1


def test_message_round_trip() -> None:
    (policy,) = xfrm_policies_from_spd(dataclasses.replace(OUT, mark=1, if_id=2), reqid=9)
    msg = policy.to_message()
    msg["header"] = {"type": XfrmMsgType.NEWPOLICY, "flags": 0, "sequence_number": 1, "pid": 0}
    msg.encode()
    data = bytes(msg.data)
    assert (
        XfrmPolicy.from_message(decode_message(NetlinkHeader(len(data), XfrmMsgType.NEWPOLICY, 0, 1, 0), data))
        == policy
    )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"tunnel_dst": ""}, "needs tunnel_src and tunnel_dst"),
        ({"tunnel_dst": "2001:db8::2"}, "differ in family"),
        ({"tunnel_dst": "nonsense"}, "does not appear to be an IPv4 or IPv6 address"),
        ({"priority": -1}, "priority"),
        ({"remote_ts": TrafficSelector.parse("::/0")}, "mixes IPv4 and IPv6"),
        ({"mode": Mode.TRANSPORT, "tunnel_dst": "2001:db8::2"}, "is not IPv4"),
    ],
)
def test_inexpressible_policies_are_refused(change: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        xfrm_policies_from_spd(dataclasses.replace(OUT, **change), reqid=1)  # type: ignore[arg-type]
