"""Decision events and a pure aggregator + rate limiter that keeps their output bounded.

Events: an allow or deny when a connection is set up (`CONNECT`), and packets the
dataplane filter dropped (`DROP`). A flood (spoofed packets, a port scan, a looping client)
must not become a flood of log lines, so `DecisionLog`:

- aggregates by flow: identity, verdict, protocol, source and destination address and
  destination port (the source port is left out: it is random per connection and spoofed
  floods vary it);
- reports the first event of a flow at once while a token bucket (`rate` per second, `burst`)
  allows, and counts the rest;
- at the end of each `interval` reports every flow that was counted as one record ("N drops
  of flow X in the last 10s"), the busiest `max_summaries` of them by name and the rest in
  one "other flows" record;
- tracks at most `max_flows` flows per interval; events of further flows only add to the
  "other flows" count.

So one interval yields at most burst + rate x interval + max_summaries + 1 records, and
memory stays at max_flows entries, whatever arrives. Pure and sans-IO: the caller passes
`now` (any clock, seconds), drains `records(now)` and arms a timer at `get_timer()`. Where
the records go is the sink's business; they never go to etcd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from esplanade.policy.evaluator import Action, Decision, FiveTuple


class DecisionKind(Enum):
    CONNECT = "connect"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    kind: DecisionKind
    action: Action
    identity: str
    flow: FiveTuple | None  # None: a drop counted where the packet was not sampled (compiled lane)
    rule: str
    reason: str
    child_sa: str = ""  # the Child SA the packet came through (drops), or that was set up

    @classmethod
    def from_decision(cls, kind: DecisionKind, identity: str, flow: FiveTuple, decision: Decision) -> DecisionEvent:
        return cls(kind, decision.action, identity, flow, decision.rule, decision.reason)


FlowKey = tuple[DecisionKind, Action, str, int, str, str, int]


def flow_key(event: DecisionEvent) -> FlowKey:
    f = event.flow
    if f is None:  # unsampled: one flow per SA and reason
        return (event.kind, event.action, event.identity, -1, event.child_sa, event.reason, 0)
    return (event.kind, event.action, event.identity, f.protocol, str(f.src), str(f.dst), f.dst_port)


_PLURAL = {
    (DecisionKind.CONNECT, Action.ALLOW): "allowed connections",
    (DecisionKind.CONNECT, Action.DENY): "denied connections",
    (DecisionKind.DROP, Action.DENY): "drops",
    (DecisionKind.DROP, Action.ALLOW): "passes",
}


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One line for the sink: a single event, or a count of events over an interval."""

    at: float
    count: int
    event: DecisionEvent | None  # None: the "other flows" record
    first_seen: float
    last_seen: float
    aggregated: bool

    @property
    def message(self) -> str:
        if self.event is None:
            return f"{self.count} events of other flows in the last {self.at - self.first_seen:g}s"
        e = self.event
        if e.flow is not None:
            flow = str(e.flow) + (f" via {e.child_sa}" if e.child_sa else "")
        elif e.kind == DecisionKind.DROP:
            flow = f"via {e.child_sa} (flow not sampled)"
        else:
            flow = f"via {e.child_sa}"
        if not self.aggregated:
            return f"{e.kind.value} {e.action.value} {e.identity} {flow} rule={e.rule}: {e.reason}"
        span = self.at - self.first_seen
        return f"{self.count} {_PLURAL[(e.kind, e.action)]} of flow {e.identity} {flow} in the last {span:g}s"

    def to_document(self) -> dict[str, object]:
        """The record as plain data (what a JSON log line or the flow log carries)."""
        doc: dict[str, object] = {
            "count": self.count,
            "aggregated": self.aggregated,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }
        e = self.event
        if e is None:
            doc["kind"] = "other"
            return doc
        doc.update(kind=e.kind.value, action=e.action.value, identity=e.identity, rule=e.rule, reason=e.reason)
        if e.child_sa:
            doc["child_sa"] = e.child_sa
        if e.flow is not None:
            f = e.flow
            doc.update(protocol=f.protocol, src=str(f.src), dst=str(f.dst), src_port=f.src_port, dst_port=f.dst_port)
        return doc


@dataclass(slots=True)
class _Flow:
    event: DecisionEvent
    first_seen: float
    last_seen: float
    unreported: int = 0


@dataclass(slots=True)
class DecisionLog:
    interval: float = 10.0
    rate: float = 5.0
    burst: int = 20
    max_flows: int = 4096
    max_summaries: int = 100
    _flows: dict[FlowKey, _Flow] = field(default_factory=dict)
    _out: list[LogRecord] = field(default_factory=list)
    _tokens: float = -1.0
    _refilled_at: float = 0.0
    _interval_start: float = math.nan
    _other_events: int = 0
    max_pending: int = 10_000  # records kept for a caller that does not drain them
    records_dropped: int = 0  # records lost because `max_pending` was reached

    def record(self, event: DecisionEvent, now: float, count: int = 1) -> None:
        """`count` events of the same flow at once (a counter's growth); < 1 records nothing."""
        if count < 1:
            return
        self._roll(now)
        key = flow_key(event)
        flow = self._flows.get(key)
        if flow is None:
            if len(self._flows) >= self.max_flows:
                self._other_events += count
                return
            flow = self._flows[key] = _Flow(event, now, now)
            if self._take_token(now):
                self._emit(LogRecord(now, 1, event, now, now, aggregated=False))
                count -= 1
                if not count:
                    return
        flow.last_seen = now
        flow.unreported += count

    def records(self, now: float) -> list[LogRecord]:
        """Every record due by `now` (closing the interval if it has ended)."""
        self._roll(now)
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """When the current interval ends (records are due then), or None if idle."""
        if math.isnan(self._interval_start) or (not self._flows and not self._other_events):
            return None
        return self._interval_start + self.interval

    # -- internals ----------------------------------------------------------------------------
    def _take_token(self, now: float) -> bool:
        if self._tokens < 0:
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _emit(self, record: LogRecord) -> None:
        if len(self._out) >= self.max_pending:
            self.records_dropped += 1
        else:
            self._out.append(record)

    def _roll(self, now: float) -> None:
        if math.isnan(self._interval_start):
            self._interval_start = now
            return
        if now < self._interval_start + self.interval:
            return
        end = self._interval_start + self.interval
        pending = sorted(
            (f for f in self._flows.values() if f.unreported),
            key=lambda f: (-f.unreported, f.first_seen),
        )
        for flow in pending[: self.max_summaries]:
            self._emit(LogRecord(end, flow.unreported, flow.event, self._interval_start, flow.last_seen, True))
        other_events = self._other_events + sum(f.unreported for f in pending[self.max_summaries :])
        if other_events:
            self._emit(LogRecord(end, other_events, None, self._interval_start, end, True))
        self._flows.clear()
        self._other_events = 0
        # Intervals are aligned to the first one; an idle gap starts a fresh interval at `now`.
        skipped = math.floor((now - self._interval_start) / self.interval)
        self._interval_start = self._interval_start + skipped * self.interval
