"""The decision-event interface the flow log consumes: aggregation of counted drops, the
structured record, subscribers, and the timer that closes intervals."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import pytest

from esplanade.policy.decision_events import DecisionEvents
from esplanade.policy.decision_log import DecisionEvent, DecisionKind, DecisionLog, LogRecord
from esplanade.policy.evaluator import Action, FiveTuple
from tests.conditions import async_wait_until

FLOW = FiveTuple(ipaddress.ip_address("10.61.0.1"), ipaddress.ip_address("10.60.1.11"), 6, 40000, 8443)


def drop(flow: FiveTuple | None = FLOW, child: str = "c1") -> DecisionEvent:
    return DecisionEvent(DecisionKind.DROP, Action.DENY, "alice", flow, "default-deny", "no rule", child)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_million_counted_drops_are_two_records(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    events = DecisionEvents("dataplane/test", DecisionLog(interval=10.0), clock)
    seen: list[LogRecord] = []
    unsubscribe = events.subscribe(seen.append)
    with caplog.at_level(logging.INFO, logger="esplanade.decisions"):
        events.record(drop(None), 1_000_000)
        clock.now += 10.0
        events.flush()
    assert [r.count for r in seen] == [1, 999_999]
    assert not seen[0].aggregated and seen[1].aggregated
    doc = seen[0].to_document()
    assert doc["kind"] == "drop" and doc["identity"] == "alice" and doc["child_sa"] == "c1" and "dst" not in doc
    structured = [getattr(r, "decision", None) for r in caplog.records]
    assert structured[0] == {"source": "dataplane/test", **doc}
    unsubscribe()
    events.record(drop())
    assert len(seen) == 2 and len(events.recent) == 3


def test_a_sampled_drop_names_its_flow() -> None:
    events = DecisionEvents("dataplane/test", clock=Clock())
    events.record(drop())
    record = events.recent[0]
    assert "tcp 10.61.0.1:40000 -> 10.60.1.11:8443 via c1" in record.message
    doc = record.to_document()
    assert (doc["src"], doc["dst"], doc["protocol"], doc["dst_port"]) == ("10.61.0.1", "10.60.1.11", 6, 8443)


async def test_run_closes_intervals_without_new_events() -> None:
    events = DecisionEvents("dataplane/test", DecisionLog(interval=0.05))
    task = asyncio.create_task(events.run())
    try:
        events.record(drop())
        events.record(drop(), 4)

        async def interval_closed() -> bool:
            return any(r.aggregated for r in events.recent)

        await async_wait_until(interval_closed, timeout=5, what="the aggregated record")
        assert [r.count for r in events.recent] == [1, 4]
    finally:
        task.cancel()
