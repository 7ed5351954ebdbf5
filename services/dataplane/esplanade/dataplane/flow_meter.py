"""Flow accounting of one dataplane node: turns traffic into flow log records and metrics.

Two sources feed it:

- `observe_counters`: the per-SA packet and byte counters of the backend, polled. Each Child
  SA and direction is one flow, keyed by its identity and negotiated selectors (so a flow
  continues across rekeys): the 5-tuple is the selectors' addresses, protocol and first port.
- `observe`: one flow sample at a time, for the parts that see single flows and make
  decisions on them (per-identity filters: allow/deny with the resource they matched).

Flows end after `idle_timeout` without traffic, and long ones are cut every `active_timeout`
(the next record continues them). Under a flood of distinct flows the table stays bounded:
past `max_flows`, new flows fold into one aggregate record per identity, resource, direction
and decision (`flows` counts them), and records are written in one batch per poll.

It also keeps monotonic byte and packet totals per connection and direction for the
`esplanade.dataplane.bytes` / `.packets` metrics (the per-SA counters restart with every
rekey; these do not).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from esplanade.dataplane.backend import SaCounters
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.journal.flow_log import FlowLog, FlowRecord
from esplanade.telemetry.metrics import policy_decisions

FlowKey = tuple[str, str, str, str, str, int, int, int, str, str]
AGGREGATE = "*"


@dataclass(frozen=True, slots=True)
class FlowSample:
    identity: str
    resource: str
    connection: str
    src: str
    dst: str
    protocol: int
    src_port: int
    dst_port: int
    direction: str
    bytes: int
    packets: int = 1
    decision: str = "allow"
    reason: str = ""


@dataclass(slots=True)
class _Active:
    record: FlowRecord
    last: float  # last time the flow carried traffic


class FlowMeter:
    def __init__(
        self,
        log: FlowLog | None,
        node: str,
        idle_timeout: float = 15.0,
        active_timeout: float = 300.0,
        max_flows: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log = log
        self.node = node
        self.idle_timeout = idle_timeout
        self.active_timeout = active_timeout
        self.max_flows = max_flows
        self.clock = clock
        self.active: dict[FlowKey, _Active] = {}
        self._baseline: dict[tuple[int, str], tuple[int, int]] = {}  # (spi, direction) -> (bytes, packets)
        self.totals: dict[tuple[str, str], list[int]] = {}  # (connection, direction) -> [bytes, packets]
        self.aggregated = 0  # flows folded into aggregates (table full)
        self.decisions = policy_decisions()

    # -- sources ----------------------------------------------------------------------------
    def observe(self, sample: FlowSample, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.decisions.add(1, {"decision": sample.decision, "point": "dataplane"})
        key: FlowKey = (
            sample.identity,
            sample.resource,
            sample.connection,
            sample.src,
            sample.dst,
            sample.protocol,
            sample.src_port,
            sample.dst_port,
            sample.direction,
            sample.decision,
        )
        self._add(key, sample.bytes, sample.packets, sample.reason, now)

    def observe_counters(
        self, children: Iterable[ChildSaRecord], counters: Iterable[SaCounters], now: float | None = None
    ) -> None:
        now = self.clock() if now is None else now
        of_spi: dict[tuple[int, str], ChildSaRecord] = {}
        for record in children:
            of_spi[(record.inbound.spi, "in")] = record
            of_spi[(record.outbound.spi, "out")] = record
        # one SA may be counted by several workers: its counters are their sum
        summed: dict[tuple[int, str], list[int]] = {}
        for c in counters:
            entry = summed.setdefault((c.spi, c.direction), [0, 0])
            entry[0] += c.bytes
            entry[1] += c.packets
        seen: set[tuple[int, str]] = set()
        for spi_key, (nbytes, npackets) in summed.items():
            child = of_spi.get(spi_key)
            if child is None:
                continue
            direction = spi_key[1]
            seen.add(spi_key)
            old_bytes, old_packets = self._baseline.get(spi_key, (0, 0))
            if nbytes < old_bytes or npackets < old_packets:  # the counters restarted
                old_bytes, old_packets = 0, 0
            self._baseline[spi_key] = (nbytes, npackets)
            delta_bytes, delta_packets = nbytes - old_bytes, npackets - old_packets
            if not delta_packets and not delta_bytes:
                continue
            totals = self.totals.setdefault((child.connection, direction), [0, 0])
            totals[0] += delta_bytes
            totals[1] += delta_packets
            self._add(self._sa_key(child, direction), delta_bytes, delta_packets, "", now)
        for gone in set(self._baseline) - seen:
            del self._baseline[gone]

    @staticmethod
    def _sa_key(child: ChildSaRecord, direction: str) -> FlowKey:
        out = child.outbound
        local = out.local_ts[0] if out.local_ts else None
        remote = out.remote_ts[0] if out.remote_ts else None
        local_text = str(local.networks()[0]) if local is not None else ""
        remote_text = str(remote.networks()[0]) if remote is not None else ""
        protocol = local.protocol if local is not None else 0
        local_port = local.start_port if local is not None and not local.any_port else 0
        remote_port = remote.start_port if remote is not None and not remote.any_port else 0
        if direction == "out":
            src, dst, src_port, dst_port = local_text, remote_text, local_port, remote_port
        else:
            src, dst, src_port, dst_port = remote_text, local_text, remote_port, local_port
        return (child.identity, "", child.connection, src, dst, protocol, src_port, dst_port, direction, "allow")

    def _add(self, key: FlowKey, nbytes: int, packets: int, reason: str, now: float) -> None:
        flow = self.active.get(key)
        if flow is None and len(self.active) >= self.max_flows:
            self.aggregated += 1
            identity, resource, connection, *_, direction, decision = key
            key = (identity, resource, connection, AGGREGATE, AGGREGATE, 0, 0, 0, direction, decision)
            flow = self.active.get(key)
            if flow is not None:
                flow.record = replace(flow.record, flows=flow.record.flows + 1)
        if flow is None:
            identity, resource, connection, src, dst, protocol, src_port, dst_port, direction, decision = key
            record = FlowRecord(
                now, now, identity, resource, connection, src, dst, protocol, src_port, dst_port, direction,
                0, 0, decision, reason, self.node,
            )  # fmt: skip
            flow = self.active[key] = _Active(record, now)
        flow.record = replace(
            flow.record,
            end=now,
            bytes=flow.record.bytes + nbytes,
            packets=flow.record.packets + packets,
            reason=reason or flow.record.reason,
        )
        flow.last = now

    # -- output -----------------------------------------------------------------------------
    def expire(self, now: float | None = None, everything: bool = False) -> list[FlowRecord]:
        """Write (and forget) the flows that ended; cut the ones that ran past active_timeout."""
        now = self.clock() if now is None else now
        done: list[FlowRecord] = []
        for key, flow in list(self.active.items()):
            idle = now - flow.last >= self.idle_timeout
            if everything or idle or now - flow.record.start >= self.active_timeout:
                done.append(flow.record)
                del self.active[key]
        if done and self.log is not None:
            self.log.record(done)
        return done

    def active_records(self) -> list[FlowRecord]:
        return [flow.record for flow in self.active.values()]
