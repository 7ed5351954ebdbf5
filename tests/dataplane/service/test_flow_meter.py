"""The flow meter and flow log: SA counters become flow records (across rekeys and counter
restarts), flows end when idle, floods fold into bounded aggregates, records are queryable
and exported as JSON lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

from esplanade.dataplane.backend import SaCounters
from esplanade.dataplane.flow_meter import AGGREGATE, FlowMeter, FlowSample
from esplanade.journal.flow_log import FlowLog
from tests.dataplane.child_sa_records import record


def counters(spi: int, out_bytes: int, out_packets: int, in_bytes: int, in_packets: int) -> list[SaCounters]:
    # record(child, spi): inbound SPI spi, outbound spi + 1
    return [SaCounters(spi, "in", in_packets, in_bytes), SaCounters(spi + 1, "out", out_packets, out_bytes)]


def test_sa_counters_become_flows_that_survive_a_rekey(tmp_path: Path) -> None:
    export = io.StringIO()
    log = FlowLog(tmp_path / "flows.db", export=export)
    meter = FlowMeter(log, "node-a", idle_timeout=10, active_timeout=1000)
    old = record("c1", 0x100)
    meter.observe_counters([old], counters(0x100, 1000, 10, 800, 8), now=100.0)
    meter.observe_counters([old], counters(0x100, 1500, 15, 1200, 12), now=105.0)
    new = record("c2", 0x200)  # the rekeyed SA: same traffic, counters from zero
    meter.observe_counters([new], counters(0x200, 500, 5, 300, 3), now=108.0)
    assert meter.totals[("conn", "out")] == [2000, 20] and meter.totals[("conn", "in")] == [1500, 15]
    assert meter.expire(now=110.0) == []  # still active
    done = meter.expire(now=200.0)
    by_direction = {r.direction: r for r in done}
    out = by_direction["out"]
    assert (out.bytes, out.packets, out.start, out.end) == (2000, 20, 100.0, 108.0)
    assert (out.src, out.dst, out.identity, out.decision) == ("10.1.0.0/16", "10.2.0.0/16", "peer", "allow")
    assert (by_direction["in"].src, by_direction["in"].dst) == ("10.2.0.0/16", "10.1.0.0/16")
    page = log.query(equals={"identity": "peer"})
    assert sorted(r["bytes"] for r in page.records) == [1500, 2000]
    assert log.query(equals={"decision": "deny"}).records == []
    assert log.query(since=108.0).records and not log.query(until=108.0).records
    lines = [json.loads(line) for line in export.getvalue().splitlines()]
    assert sorted(line["bytes"] for line in lines) == [1500, 2000]
    log.close()


def test_counter_restart_is_not_negative(tmp_path: Path) -> None:
    meter = FlowMeter(None, "n")
    child = record("c1", 0x100)
    meter.observe_counters([child], counters(0x100, 1000, 10, 0, 0), now=1.0)
    meter.observe_counters([child], counters(0x100, 100, 1, 0, 0), now=2.0)  # backend restarted
    assert meter.totals[("conn", "out")] == [1100, 11]


def test_a_flood_of_flows_folds_into_aggregates(tmp_path: Path) -> None:
    log = FlowLog(tmp_path / "flows.db")
    meter = FlowMeter(log, "n", idle_timeout=5, max_flows=16)
    for port in range(5000):
        sample = FlowSample("mallory", "web", "gw", "10.0.0.9", "10.1.0.1", 6, port, 80, "in", 60, 1, "deny", "no rule")
        meter.observe(sample, now=1.0)
    assert len(meter.active) <= 17
    done = meter.expire(now=100.0)
    assert sum(r.packets for r in done) == 5000 and sum(r.flows for r in done) == 5000
    (aggregate,) = [r for r in done if r.src == AGGREGATE]
    assert aggregate.flows == 5000 - 16 and aggregate.decision == "deny" and aggregate.identity == "mallory"
    assert log.journal.count() == len(done) <= 17
    log.close()


def test_retention_bounds_the_log(tmp_path: Path) -> None:
    log = FlowLog.for_size(tmp_path / "flows.db", max_mb=1, max_age_seconds=3600)
    assert 1000 <= log.journal.max_rows <= 4096
    log.close()


def test_flow_records_go_out_as_otlp_log_records(tmp_path: Path) -> None:
    import logging

    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    from esplanade.telemetry.logs import OtlpLogHandler, configure_otlp_logs

    exporter = InMemoryLogRecordExporter()
    configure_otlp_logs("test", None, processor=SimpleLogRecordProcessor(exporter))
    try:
        log = FlowLog(tmp_path / "flows.db")
        meter = FlowMeter(log, "n", idle_timeout=1)
        meter.observe(FlowSample("alice", "wiki", "gw", "10.0.0.2", "10.1.0.5", 6, 40000, 443, "out", 500, 5), now=1.0)
        meter.expire(now=10.0)
        logging.getLogger("esplanade.test").warning("a service line", extra={"connection": "gw"})
        (line,) = [r for r in exporter.get_finished_logs() if r.log_record.body == "a service line"]
        assert line.log_record.severity_text == "WARNING" and line.log_record.attributes["connection"] == "gw"  # type: ignore[index]
        flows = [r for r in exporter.get_finished_logs() if r.log_record.event_name == "esplanade.flow"]
        (flow,) = flows
        assert flow.log_record.attributes == {
            "identity": "alice",
            "resource": "wiki",
            "decision": "allow",
            "connection": "gw",
        }
        body = flow.log_record.body
        assert isinstance(body, dict) and body["bytes"] == 500 and body["dst_port"] == 443
        log.close()
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, OtlpLogHandler)]:
            root.removeHandler(handler)


def test_counters_of_several_workers_add_up() -> None:
    meter = FlowMeter(None, "n")
    child = record("c1", 0x100)
    per_worker = [SaCounters(0x101, "out", 3, 300), SaCounters(0x101, "out", 4, 400)]
    meter.observe_counters([child], per_worker, now=1.0)
    meter.observe_counters([child], [SaCounters(0x101, "out", 5, 500), SaCounters(0x101, "out", 4, 400)], now=2.0)
    assert meter.totals[("conn", "out")] == [900, 9]


def test_identity_filter_drops_become_denied_flows(tmp_path: Path) -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from esplanade.dataplane.flow_telemetry import FlowTelemetry
    from esplanade.policy.decision_events import DecisionEvents
    from esplanade.policy.decision_log import DecisionEvent, DecisionKind
    from esplanade.policy.evaluator import Action, FiveTuple

    log = FlowLog(tmp_path / "flows.db")
    meter = FlowMeter(log, "n", idle_timeout=1)
    reconciler = SimpleNamespace(installed={"c1": record("c1", 0x100)})
    relay = SimpleNamespace(counters={})
    telemetry = FlowTelemetry(cast(Any, None), cast(Any, reconciler), cast(Any, relay), meter, 1.0)
    now = [0.0]
    events = DecisionEvents("dataplane/n", clock=lambda: now[0])
    events.subscribe(telemetry.on_decision)
    flow = FiveTuple.parse("10.2.0.7", "10.1.0.9", 6, 40000, 5432)
    for _ in range(3):
        events.record(DecisionEvent(DecisionKind.DROP, Action.DENY, "peer", flow, "", "no rule grants it", "c1"))
    now[0] = 3600.0  # the aggregation interval is over: the rest of the count comes out
    events.flush()
    meter.expire(everything=True)
    (denied,) = log.query(equals={"decision": "deny"}).records
    assert (denied["identity"], denied["connection"], denied["dst"], denied["dst_port"]) == (
        "peer",
        "conn",
        "10.1.0.9",
        5432,
    )
    assert denied["packets"] == 3 and denied["reason"] == "no rule grants it"
    log.close()
