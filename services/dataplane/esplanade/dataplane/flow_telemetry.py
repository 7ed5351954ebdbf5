"""The dataplane's traffic telemetry: the flow log poller, the traffic and drop metrics, and
the QueryFlows reply.

Metrics (OpenTelemetry names; Prometheus adds unit and `_total` suffixes):
`esplanade.dataplane.traffic` (By) and `esplanade.dataplane.packets` by connection and
direction, `esplanade.dataplane.drops` by reason. Labels are connection names, directions and
drop reasons: bounded, never SPIs or addresses (per-SA counters are in the API).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from esplanade.dataplane.backend import DataplaneBackend
from esplanade.dataplane.flow_meter import FlowMeter, FlowSample
from esplanade.dataplane.ike_relay import IkeRelay
from esplanade.dataplane.reconciler import Reconciler
from esplanade.journal.flow_log import FlowLog, FlowRecord
from esplanade.policy.decision_log import LogRecord
from esplanade.telemetry.metrics import meter
from esplanade.v1 import dataplane_pb2

log = logging.getLogger(__name__)

MAX_QUERY = 1000


def drop_counts(backend: DataplaneBackend, relay: IkeRelay) -> dict[str, int]:
    """Drops by reason: the backend's and the IKE relay's (what GetCounters reports)."""
    drops_of: Callable[[], dict[str, int]] | None = getattr(backend, "drop_counters", None)
    drops: dict[str, int] = drops_of() if drops_of is not None else {}
    for name, count in relay.counters.items():
        if name.startswith("dropped_") and count:
            drops[f"ike_{name.removeprefix('dropped_')}"] = count
    return drops


class FlowTelemetry:
    def __init__(
        self,
        backend: DataplaneBackend,
        reconciler: Reconciler,
        relay: IkeRelay,
        flow_meter: FlowMeter,
        interval: float,
    ) -> None:
        self.backend = backend
        self.reconciler = reconciler
        self.relay = relay
        self.meter = flow_meter
        self.interval = interval
        self.polls = 0
        m = meter("dataplane")
        m.create_observable_counter(
            "esplanade.dataplane.traffic",
            callbacks=[self._traffic],
            unit="By",
            description="ESP payload bytes by connection and direction (in: decrypted, out: encrypted)",
        )
        m.create_observable_counter(
            "esplanade.dataplane.packets",
            callbacks=[self._packets],
            description="Packets by connection and direction",
        )
        m.create_observable_counter(
            "esplanade.dataplane.drops", callbacks=[self._drops], description="Dropped packets by reason"
        )

    def _traffic(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(t[0], {"connection": c, "direction": d}) for (c, d), t in list(self.meter.totals.items())]

    def _packets(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(t[1], {"connection": c, "direction": d}) for (c, d), t in list(self.meter.totals.items())]

    def _drops(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"reason": r}) for r, n in sorted(drop_counts(self.backend, self.relay).items())]

    def on_decision(self, record: LogRecord) -> None:
        """A decision event of the identity filters (`DecisionEvents.subscribe`): its packets
        become a denied flow of that identity (bytes unknown: the filters count packets)."""
        event = record.event
        if event is None:  # "other flows" of a flood: counted, not attributable
            sample = FlowSample("", "", "", "*", "*", 0, 0, 0, "in", 0, record.count, "deny", "other flows")
            self.meter.observe(sample)
            return
        child = self.reconciler.installed.get(event.child_sa) if event.child_sa else None
        f = event.flow
        sample = FlowSample(
            identity=event.identity,
            resource="",
            connection=child.connection if child is not None else "",
            src=str(f.src) if f is not None else "*",
            dst=str(f.dst) if f is not None else "*",
            protocol=f.protocol if f is not None else 0,
            src_port=f.src_port if f is not None else 0,
            dst_port=f.dst_port if f is not None else 0,
            direction="in",
            bytes=0,
            packets=record.count,
            decision=event.action.value,
            reason=f"{event.rule}: {event.reason}" if event.rule else event.reason,
        )
        self.meter.observe(sample)

    async def poll_once(self) -> None:
        refresh = getattr(self.backend, "refresh_counters", None)
        if refresh is not None:
            await refresh()
        self.meter.observe_counters(list(self.reconciler.installed.values()), self.backend.counters())
        await asyncio.to_thread(self.meter.expire)
        self.polls += 1

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("flow accounting poll failed")
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """Write the flows still running (shutdown)."""
        await asyncio.to_thread(self.meter.expire, None, True)


def flow_to_proto(record: dict[str, Any] | FlowRecord, record_id: int = 0) -> dataplane_pb2.FlowRecord:
    doc = record.document() if isinstance(record, FlowRecord) else record
    return dataplane_pb2.FlowRecord(
        id=int(doc.get("id", record_id)),
        start=float(doc["start"]),
        end=float(doc["end"]),
        identity=str(doc["identity"]),
        resource=str(doc["resource"]),
        connection=str(doc["connection"]),
        src=str(doc["src"]),
        dst=str(doc["dst"]),
        protocol=int(doc["protocol"]),
        src_port=int(doc["src_port"]),
        dst_port=int(doc["dst_port"]),
        direction=str(doc["direction"]),
        bytes=int(doc["bytes"]),
        packets=int(doc["packets"]),
        decision=str(doc["decision"]),
        reason=str(doc.get("reason", "")),
        node=str(doc.get("node", "")),
        flows=int(doc.get("flows", 1)),
    )


def query_flows(
    flow_log: FlowLog, flow_meter: FlowMeter, node: str, request: dataplane_pb2.QueryFlowsRequest
) -> dataplane_pb2.QueryFlowsResponse:
    equals = {
        k: v
        for k, v in (
            ("identity", request.identity),
            ("resource", request.resource),
            ("decision", request.decision),
            ("connection", request.connection),
        )
        if v
    }
    since = request.since or None
    until = request.until or None
    limit = min(request.limit or 100, MAX_QUERY)
    page = flow_log.query(equals=equals, since=since, until=until, after_id=request.after_id, limit=limit)
    flows = [flow_to_proto(r) for r in page.records]
    if request.include_active and page.next_cursor is None:
        for record in flow_meter.active_records():
            doc = record.document()
            if any(str(doc[k]) != v for k, v in equals.items()):
                continue
            if (since is not None and record.end < since) or (until is not None and record.end >= until):
                continue
            flows.append(flow_to_proto(record))
    return dataplane_pb2.QueryFlowsResponse(flows=flows, next_cursor=page.next_cursor or 0, node=node)
