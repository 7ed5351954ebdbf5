"""Decision events: aggregated by flow, rate-limited, bounded whatever the flood."""

from __future__ import annotations

import ipaddress

from esplanade.policy.decision_log import DecisionEvent, DecisionKind, DecisionLog
from esplanade.policy.evaluator import NO_RULE, Action, Decision, FiveTuple


def drop(dst_port: int = 53, src_port: int = 40000, dst: str = "10.1.0.9", identity: str = "alice") -> DecisionEvent:
    flow = FiveTuple.parse("10.8.0.2", dst, 17, src_port, dst_port)
    return DecisionEvent.from_decision(DecisionKind.DROP, identity, flow, NO_RULE)


def test_first_event_is_reported_at_once_and_repeats_are_summed() -> None:
    log = DecisionLog(interval=10.0)
    log.record(drop(), 100.0)
    first = log.records(100.0)
    assert [r.message for r in first] == [
        "drop deny alice udp 10.8.0.2:40000 -> 10.1.0.9:53 rule=default-deny: no rule grants this flow"
    ]
    for i in range(5000):
        log.record(drop(src_port=1024 + i % 60000), 100.0 + i / 1000)  # spoofed source ports
    assert log.records(104.0) == []
    assert log.get_timer() == 110.0
    summary = log.records(110.0)
    assert [(r.count, r.aggregated, r.message) for r in summary] == [
        (5000, True, "5000 drops of flow alice udp 10.8.0.2:40000 -> 10.1.0.9:53 in the last 10s")
    ]
    assert log.records(111.0) == [] and log.get_timer() is None


def test_rate_limit_then_summaries() -> None:
    log = DecisionLog(interval=10.0, rate=1.0, burst=3)
    for port in range(10):
        log.record(drop(dst_port=port), 0.0)
    immediate = log.records(0.0)
    assert [r.event.flow.dst_port for r in immediate if r.event] == [0, 1, 2]
    summaries = log.records(10.0)
    assert sorted(r.event.flow.dst_port for r in summaries if r.event) == [3, 4, 5, 6, 7, 8, 9]
    assert all(r.count == 1 and r.aggregated for r in summaries)


def test_output_and_memory_are_bounded_under_a_flood() -> None:
    log = DecisionLog(interval=10.0, rate=5.0, burst=20, max_flows=100, max_summaries=10)
    total = 0
    for i in range(50_000):
        log.record(drop(dst=str(ipaddress.IPv4Address(0x0A000000 + i)), dst_port=i % 65536), i / 5_000)
        total += 1
    records = log.records(10.0)
    assert len(records) <= 20 + 5 * 10 + 10 + 1
    assert len(log._flows) == 0
    # every event is accounted for: reported singly or counted in a summary
    assert sum(r.count for r in records) == total
    other = [r for r in records if r.event is None]
    assert len(other) == 1 and other[0].message == f"{other[0].count} events of other flows in the last 10s"


def test_connect_decisions_and_idle_gaps() -> None:
    log = DecisionLog(interval=10.0)
    allowed = Decision(Action.ALLOW, "eng-git", "rule 'eng-git' grants resource 'git'", "git")
    flow = FiveTuple.parse("10.8.0.2", "10.1.2.3", 6, 40000, 443)
    log.record(DecisionEvent.from_decision(DecisionKind.CONNECT, "alice", flow, allowed), 5.0)
    log.record(DecisionEvent.from_decision(DecisionKind.CONNECT, "alice", flow, allowed), 6.0)
    assert [r.message for r in log.records(6.0)] == [
        "connect allow alice tcp 10.8.0.2:40000 -> 10.1.2.3:443 rule=eng-git: rule 'eng-git' grants resource 'git'"
    ]
    # an hour later: the pending summary comes out, stamped at the end of its own interval
    log.record(drop(), 3605.0)
    out = log.records(3605.0)
    assert [(r.at, r.message) for r in out] == [
        (15.0, "1 allowed connections of flow alice tcp 10.8.0.2:40000 -> 10.1.2.3:443 in the last 10s"),
        (3605.0, "drop deny alice udp 10.8.0.2:40000 -> 10.1.0.9:53 rule=default-deny: no rule grants this flow"),
    ]


def test_undrained_records_are_capped() -> None:
    log = DecisionLog(interval=1.0, rate=1000.0, burst=1000, max_pending=50)
    for i in range(200):
        log.record(drop(dst_port=i), 0.0)
    assert len(log.records(0.0)) == 50 and log.records_dropped == 150
