"""The SPD: ordered outbound lookup, inbound cleartext check, SPI table, and the index
against a brute-force reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from esplanade.dataplane.esp import OutboundSa, Spd, parse_flow
from esplanade.dataplane.esp.selector_match import compile_selector, selector_matches
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from tests.dataplane.esp.suites import SUITES, sa_pair

OUT, IN = PolicyDirection.OUT, PolicyDirection.IN


def pol(pid: str, local: str, remote: str, action: PolicyAction = PolicyAction.PROTECT, **kw: object) -> SpdPolicy:
    return SpdPolicy(
        id=pid,
        direction=kw.pop("direction", OUT),  # type: ignore[arg-type]
        local_ts=TrafficSelector.parse(local),
        remote_ts=TrafficSelector.parse(remote),
        action=action,
        child_sa=kw.pop("child_sa", pid),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def tcp(src: str, dst: str, dport: int = 80, sport: int = 40000) -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport))


def _sa() -> OutboundSa:
    s = SUITES["aes128gcm16"]
    out, _ = sa_pair(s, encr_key=bytes(20), integ_key=b"")
    return OutboundSa(out, 0.0)


def test_most_specific_first_then_priority() -> None:
    spd = Spd()
    spd.add_policy(pol("wide", "10.1.0.0/16", "10.2.0.0/16"))
    spd.add_policy(pol("narrow", "10.1.0.0/16", "10.2.3.0/24"))
    spd.add_policy(pol("https", "10.1.0.0/16", "10.2.3.0/24[tcp/443]", PolicyAction.BYPASS))
    spd.add_policy(pol("block", "10.1.0.0/16", "10.2.0.0/16[tcp/22]", PolicyAction.DISCARD, priority=10))
    sa = _sa()
    spd.bind_outbound("narrow", sa)
    d = spd.lookup_outbound(tcp("10.1.0.5", "10.2.3.4"))
    assert d.policy is not None and d.policy.id == "narrow" and d.sa is sa and d.action == PolicyAction.PROTECT
    assert spd.lookup_outbound(tcp("10.1.0.5", "10.2.3.4", 443)).action == PolicyAction.BYPASS
    assert spd.lookup_outbound(tcp("10.1.0.5", "10.2.3.4", 22)).policy.id == "block"  # type: ignore[union-attr]
    d = spd.lookup_outbound(tcp("10.1.0.5", "10.2.9.9"))
    assert d.policy.id == "wide" and d.sa is None  # type: ignore[union-attr]
    assert spd.counters.no_sa == 1
    nothing = spd.lookup_outbound(tcp("10.7.0.5", "10.2.3.4"))
    assert nothing.policy is None and nothing.action == PolicyAction.DISCARD  # RFC 4301 §5.1 default
    spd.remove_policy("narrow")
    assert spd.lookup_outbound(tcp("10.1.0.5", "10.2.3.4")).policy.id == "wide"  # type: ignore[union-attr]


def test_icmp_type_code_and_fragments() -> None:
    spd = Spd()
    spd.add_policy(pol("echo", "10.1.0.0/16", "10.2.0.0/16[icmp/2048]", PolicyAction.BYPASS))  # type 8 code 0
    spd.add_policy(pol("rest", "10.1.0.0/16", "10.2.0.0/16", PolicyAction.DISCARD))
    echo = bytes(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP(type=8, code=0))
    reply = bytes(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP(type=0, code=0))
    assert spd.lookup_outbound(echo).action == PolicyAction.BYPASS
    assert spd.lookup_outbound(reply).action == PolicyAction.DISCARD
    later_fragment = bytes(IP(src="10.1.0.1", dst="10.2.0.1", frag=10, proto=1) / (b"x" * 16))
    flow = parse_flow(later_fragment)
    assert flow is not None and flow.src_port == -1 and flow.fragment
    assert spd.lookup_outbound(later_fragment).policy.id == "rest"  # type: ignore[union-attr]


def test_ipv6_and_inbound_cleartext_from_protected_peer_is_discarded() -> None:
    spd = Spd()
    spd.add_policy(pol("in-v4", "10.1.0.0/16", "10.2.0.0/16", direction=IN))
    spd.add_policy(pol("in-v6", "fd00:1::/64", "fd00:2::/64", direction=IN))
    spd.add_policy(pol("in-dns", "10.1.0.0/16", "10.2.0.0/16[udp/53]", PolicyAction.BYPASS, direction=IN))
    assert not spd.accept_inbound_cleartext(tcp("10.2.0.9", "10.1.0.1"))  # from the protected subnet
    assert spd.accept_inbound_cleartext(bytes(IP(src="10.2.0.9", dst="10.1.0.1") / UDP(sport=53, dport=9999)))
    assert spd.accept_inbound_cleartext(tcp("192.0.2.1", "10.1.0.1"))  # nobody's: default bypass
    v6 = bytes(IPv6(src="fd00:2::5", dst="fd00:1::1") / TCP())
    assert not spd.accept_inbound_cleartext(v6)
    assert spd.counters.cleartext_from_protected == 2
    assert not spd.accept_inbound_cleartext(b"\x45\x00")
    assert spd.counters.malformed == 1


def test_inbound_sa_table_by_spi() -> None:
    from esplanade.dataplane.esp import InboundSa

    s = SUITES["aes128gcm16"]
    _, inb = sa_pair(s, encr_key=bytes(20), integ_key=b"", spi=0x4242)
    spd = Spd()
    sa = InboundSa(inb, 0.0)
    spd.inbound.add(sa)
    assert spd.inbound.lookup_esp((0x4242).to_bytes(4, "big") + bytes(40)) is sa
    assert spd.inbound.lookup_esp((0x4243).to_bytes(4, "big") + bytes(40)) is None
    assert spd.inbound.lookup_esp(b"\x00\x00") is None
    assert spd.inbound.counters.drops["unknown_spi"] == 1
    assert spd.inbound.counters.drops["malformed"] == 1


@st.composite
def policies(draw: st.DrawFn) -> list[SpdPolicy]:
    out = []
    for i in range(draw(st.integers(1, 60))):
        lp = draw(st.integers(8, 32))
        rp = draw(st.integers(8, 32))
        local = f"10.{draw(st.integers(0, 3))}.{draw(st.integers(0, 3))}.{draw(st.integers(0, 255))}/{lp}"
        remote = f"10.{draw(st.integers(0, 3))}.{draw(st.integers(0, 3))}.{draw(st.integers(0, 255))}/{rp}"
        proto = draw(st.sampled_from(["", "[tcp]", "[udp/53]", "[tcp/1000-2000]"]))
        out.append(
            pol(
                f"p{i}",
                local,
                remote + proto,
                draw(st.sampled_from(list(PolicyAction))),
                priority=draw(st.sampled_from([10, 1000])),
            )
        )
    return out


@settings(max_examples=30, deadline=None)
@given(
    ps=policies(),
    flows=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 255), st.integers(0, 3), st.integers(0, 2500)),
        min_size=1,
        max_size=30,
    ),
)
def test_index_agrees_with_a_linear_scan(ps: list[SpdPolicy], flows: list[tuple[int, int, int, int, int]]) -> None:
    spd = Spd()
    for p in ps:
        spd.add_policy(p)
    ordered = spd.policies()
    for a, b, c, d, port in flows:
        packet = tcp(f"10.{a}.{b}.{c}", f"10.{d}.{b}.{c}", dport=port)
        flow = parse_flow(packet)
        assert flow is not None
        expected = next(
            (
                p
                for p in ordered
                if selector_matches(compile_selector(p.local_ts), 4, flow.src, flow.protocol, flow.src_port)
                and selector_matches(compile_selector(p.remote_ts), 4, flow.dst, flow.protocol, flow.dst_port)
            ),
            None,
        )
        assert spd.match_outbound(flow) == expected
