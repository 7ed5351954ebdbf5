"""The evaluator on hand-written cases: protocols, ICMP, conditions, reasons, precedence."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from zoneinfo import ZoneInfo

from esplanade.policy.compiler import Evaluator
from esplanade.policy.evaluator import Action, CheckContext, Decision, FiveTuple
from esplanade.policy.model import (
    Conditions,
    Destination,
    Group,
    IcmpMatch,
    Identity,
    Model,
    PortRange,
    Protocol,
    Resource,
    Rule,
    Site,
    TimeWindow,
)

BERLIN = ZoneInfo("Europe/Berlin")


def at(*args: int) -> float:
    return datetime(*args, tzinfo=BERLIN).timestamp()  # type: ignore[misc]


def dest(text: str) -> Destination:
    return Destination(network=ipaddress.ip_network(text))


MODEL = Model.of(
    [
        Site("s"),
        Group("eng"),
        Group("ops"),
        Identity("alice", groups=("eng",)),
        Identity("bob", groups=("ops",)),
        Identity("carol", groups=("eng", "ops")),
        Resource("web", dest("10.0.0.0/24"), "s", Protocol.TCP, (PortRange(80, 80), PortRange(443, 443))),
        Resource("dns", dest("10.0.1.53/32"), "s", Protocol.UDP, (PortRange(53, 53),)),
        Resource("ping", dest("10.0.0.0/16"), "s", Protocol.ICMP, (), (IcmpMatch(8), IcmpMatch(3, 4))),
        Resource("ping6", dest("fd00::/64"), "s", Protocol.ICMP),
        Resource("lab", dest("10.0.9.0/24"), "s", Protocol.ANY),
        Rule("a-web", ("eng",), ("web", "dns")),
        Rule("b-ping", ("eng", "ops"), ("ping", "ping6")),
        Rule(
            "c-lab-office",
            ("ops",),
            ("lab", "web"),
            Conditions(
                TimeWindow((0, 1, 2, 3, 4), 8 * 60, 18 * 60, "Europe/Berlin"),
                (ipaddress.ip_network("198.51.100.0/24"),),
                ("managed",),
            ),
        ),
        Rule("d-never-matches", ("nobody",), ("lab",)),
    ]
)
EVALUATOR = Evaluator(MODEL)
MONDAY_NOON = at(2024, 6, 10, 12, 0)
OFFICE = CheckContext(MONDAY_NOON, ipaddress.ip_address("198.51.100.7"), frozenset({"managed", "patched"}))


def check(identity: str, flow: FiveTuple, context: CheckContext = OFFICE) -> Decision:
    return EVALUATOR.check(identity, flow, context)


def tcp(dst: str, port: int) -> FiveTuple:
    return FiveTuple.parse("100.64.0.2", dst, 6, 40000, port)


def test_allow_names_rule_and_resource() -> None:
    assert check("alice", tcp("10.0.0.5", 443)) == Decision(
        Action.ALLOW, "a-web", "rule 'a-web' grants resource 'web'", "web"
    )
    assert check("alice", FiveTuple.parse("100.64.0.2", "10.0.1.53", 17, 5000, 53)).resource == "dns"


def test_default_deny() -> None:
    assert check("alice", tcp("10.0.0.5", 22)) == Decision(Action.DENY, "default-deny", "no rule grants this flow")
    assert not check("alice", FiveTuple.parse("100.64.0.2", "10.0.1.53", 6, 5000, 53)).allowed  # tcp, not udp
    assert check("mallory", tcp("10.0.0.5", 443)).reason == "unknown identity 'mallory'"


def test_icmp_types_and_codes() -> None:
    src, dst = ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("10.0.3.3")
    assert check("bob", FiveTuple.icmp(src, dst, 8, 0)).rule == "b-ping"
    assert check("bob", FiveTuple.icmp(src, dst, 3, 4)).allowed
    assert not check("bob", FiveTuple.icmp(src, dst, 3, 3)).allowed
    assert not check("bob", FiveTuple.icmp(src, dst, 0, 0)).allowed
    # an empty type list on an IPv6 destination allows every ICMPv6 message, and only ICMPv6
    src6, dst6 = ipaddress.ip_address("fd99::2"), ipaddress.ip_address("fd00::9")
    assert check("bob", FiveTuple.icmp(src6, dst6, 128, 0)).resource == "ping6"
    assert FiveTuple.icmp(src6, dst6, 128).protocol == 58
    assert not check("bob", FiveTuple(src6, dst6, 1, 0, 8 << 8)).allowed


def test_conditions_all_hold() -> None:
    assert check("bob", FiveTuple.parse("100.64.0.2", "10.0.9.9", 47)).rule == "c-lab-office"


def test_each_failing_condition_is_named() -> None:
    lab = FiveTuple.parse("100.64.0.2", "10.0.9.9", 6, 1, 3389)
    prefix = "rule 'c-lab-office' grants resource 'lab' but "
    saturday = CheckContext(at(2024, 6, 15, 12, 0), OFFICE.source, OFFICE.posture)
    assert check("bob", lab, saturday).reason == prefix + "outside its time window"
    evening = CheckContext(at(2024, 6, 10, 18, 0), OFFICE.source, OFFICE.posture)
    assert check("bob", lab, evening).reason == prefix + "outside its time window"
    home = CheckContext(MONDAY_NOON, ipaddress.ip_address("203.0.113.5"), OFFICE.posture)
    assert check("bob", lab, home).reason == prefix + "source address 203.0.113.5 is outside its source networks"
    unknown = CheckContext(MONDAY_NOON, None, OFFICE.posture)
    assert check("bob", lab, unknown).reason == prefix + "the client's source address is unknown"
    unmanaged = CheckContext(MONDAY_NOON, OFFICE.source, frozenset({"patched"}))
    assert check("bob", lab, unmanaged).reason == prefix + "posture tag 'managed' is missing"
    assert check("bob", lab, unmanaged).rule == "default-deny"


def test_time_window_edges_follow_local_time() -> None:
    lab = FiveTuple.parse("100.64.0.2", "10.0.9.9", 6, 1, 22)

    def ok(when: float) -> bool:
        return check("bob", lab, CheckContext(when, OFFICE.source, OFFICE.posture)).allowed

    assert not ok(at(2024, 6, 10, 7, 59) + 59.999)
    assert ok(at(2024, 6, 10, 8, 0))
    assert ok(at(2024, 6, 10, 17, 59) + 59.999)
    assert not ok(at(2024, 6, 10, 18, 0))
    # local 08:00 in winter (CET) is 07:00 UTC, in summer (CEST) 06:00 UTC
    assert ok(datetime(2024, 1, 8, 7, 0, tzinfo=ZoneInfo("UTC")).timestamp())
    assert not ok(datetime(2024, 1, 8, 6, 30, tzinfo=ZoneInfo("UTC")).timestamp())


def test_overnight_window() -> None:
    window = TimeWindow((4,), 22 * 60, 6 * 60, "Europe/Berlin")  # Friday 22:00 to Saturday 06:00
    assert window.contains(at(2024, 6, 14, 23, 0))
    assert window.contains(at(2024, 6, 15, 5, 59))
    assert not window.contains(at(2024, 6, 15, 6, 0))
    assert not window.contains(at(2024, 6, 14, 5, 0))  # Friday early morning belongs to Thursday's night
    assert not window.contains(at(2024, 6, 15, 23, 0))


def test_smallest_rule_id_wins_and_conditional_rules_do_not_shadow() -> None:
    # carol is in both groups: a-web (unconditional) and c-lab-office both grant web
    assert check("carol", tcp("10.0.0.1", 80)).rule == "a-web"
    home = CheckContext(MONDAY_NOON, ipaddress.ip_address("203.0.113.5"))
    assert check("carol", tcp("10.0.0.1", 80), home).rule == "a-web"
    assert check("bob", tcp("10.0.0.1", 80), home).reason.startswith("rule 'c-lab-office' grants resource 'web'")


def test_five_tuple_text() -> None:
    assert str(tcp("10.0.0.1", 80)) == "tcp 100.64.0.2:40000 -> 10.0.0.1:80"
    icmp = FiveTuple.icmp(ipaddress.ip_address("10.8.0.2"), ipaddress.ip_address("10.0.0.1"), 3, 4)
    assert str(icmp) == "icmp 10.8.0.2 -> 10.0.0.1 type 3 code 4"
    assert str(FiveTuple.parse("10.8.0.2", "10.0.0.1", 47)) == "47 10.8.0.2 -> 10.0.0.1"


def test_an_ipv4_client_seen_through_a_dual_stack_socket_is_judged_by_its_ipv4_address() -> None:
    """A keyexchange socket bound to "::" reports IPv4 peers as ::ffff:a.b.c.d: the source
    network condition is about the client's IPv4 address, in IKE's grant and in checks alike."""
    lab = FiveTuple.parse("100.64.0.2", "10.0.9.9", 6, 1, 3389)
    mapped = ipaddress.ip_address("::ffff:198.51.100.7")
    assert check("bob", lab, CheckContext(MONDAY_NOON, mapped, OFFICE.posture)).rule == "c-lab-office"
    outside = CheckContext(MONDAY_NOON, ipaddress.ip_address("::ffff:203.0.113.5"), OFFICE.posture)
    assert check("bob", lab, outside).reason.endswith("source address 203.0.113.5 is outside its source networks")
    compiled = EVALUATOR.compiler.compiled("bob")
    assert compiled is not None
    facts = CheckContext(MONDAY_NOON, mapped, OFFICE.posture).facts
    assert [p.rules for p in compiled.connect_parts(facts)] == [("b-ping",), ("c-lab-office",)]
