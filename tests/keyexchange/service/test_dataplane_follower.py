"""Dataplane events and counters reaching the IKE core (in memory; no dataplane needed)."""

from __future__ import annotations

from esplanade.config.settings import GrpcSettings
from esplanade.keyexchange.dataplane_follower import ChildCounters, DataplaneFollower
from esplanade.keyexchange.engine_driver import IkeEngine
from esplanade.keyexchange.ike_metrics import IkeMetrics
from esplanade.keyexchange.ikev2.child_sa import ChildState
from esplanade.keyexchange.ikev2.events import ChildSaEstablished, Datagram, Event
from esplanade.v1 import dataplane_pb2
from tests.keyexchange.peers import pair


class Collect:
    def __init__(self) -> None:
        self.sent: list[Datagram] = []

    def send(self, d: Datagram) -> None:
        self.sent.append(d)


async def _setup(trap: tuple[str, str] | None = None):  # type: ignore[no-untyped-def]
    net, a, _b = pair()
    ike = a.engine.initiate("ab", net.now)
    net.run()
    child = a.of(ChildSaEstablished)[0].child_id
    engine = IkeEngine(a.engine, clock=lambda: net.now)
    transport = Collect()
    engine.transport = transport
    events: list[Event] = []
    engine.listeners.append(events.append)
    follower = DataplaneFollower(["127.0.0.1:1"], GrpcSettings(), engine, lambda policy: trap)
    return net, a, ike, child, engine, transport, events, follower


async def test_soft_expire_rekeys_and_hard_expire_deletes() -> None:
    _net, a, ike, child, _engine, transport, _events, follower = await _setup()
    follower.on_event(dataplane_pb2.DataplaneEvent(kind="soft_expire", child_sa=child))
    assert a.engine.sas[ike].children[child].state == ChildState.REKEYING
    assert transport.sent  # the CREATE_CHILD_SA request left
    follower.on_event(dataplane_pb2.DataplaneEvent(kind="soft_expire", child_sa="nosuch"))
    assert follower.stats["event_soft_expire"] == 2
    await follower.close()
    _net, _a, _ike, child, _engine, transport, _events, follower = await _setup()
    transport.sent.clear()
    follower.on_event(dataplane_pb2.DataplaneEvent(kind="hard_expire", child_sa=child))
    assert transport.sent  # the DELETE for the expired Child SA left
    await follower.close()


async def test_acquire_initiates_the_trap_connection() -> None:
    _net, a, _ike, _child, engine, transport, _events, follower = await _setup(trap=("ab", "net"))
    for sa in list(a.engine.sas):
        engine.call(a.engine.delete_ike, sa)
    a.engine.sas.clear()
    transport.sent.clear()
    follower.on_event(dataplane_pb2.DataplaneEvent(kind="acquire", policy="ab.net.trap0.out"))
    assert len(a.engine.sas) == 1 and transport.sent
    follower.on_event(dataplane_pb2.DataplaneEvent(kind="acquire", policy="ab.net.trap0.out"))
    assert len(a.engine.sas) == 1  # one negotiation per trap at a time
    await follower.close()


async def test_traffic_counters_defer_dpd() -> None:
    net, a, ike, child, _engine, _t, _e, follower = await _setup()
    sa = a.engine.sas[ike]
    before = sa.last_inbound
    net.now += 30
    follower.note_counters({child: ChildCounters(packets_in=5, bytes_in=500)})
    assert sa.last_inbound == net.now > before
    net.now += 30
    follower.note_counters({child: ChildCounters(packets_in=5, bytes_in=500)})  # idle: no news
    assert sa.last_inbound == net.now - 30
    await follower.close()


def test_metrics_observe_low_cardinality_labels() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from esplanade.keyexchange.ikev2.events import NegotiationFailed

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    net, a, _b = pair()
    a.engine.initiate("ab", net.now)
    net.run()
    metrics = IkeMetrics(a.engine, {sa: "ab" for sa in a.engine.sas}, meter_provider=provider)
    for ev in a.events:
        metrics.observe(ev)
    metrics.observe(NegotiationFailed(next(iter(a.engine.sas)), 14, "no proposal"))
    data = reader.get_metrics_data()
    points = {
        m.name: [(dict(p.attributes or {}), p.value) for p in m.data.data_points]  # type: ignore[attr-defined]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert ({"connection": "ab", "state": "established"}, 1) in points["esplanade.ike.sas"]
    assert ({"connection": "ab", "outcome": "failed", "reason": "NO_PROPOSAL_CHOSEN"}, 1) in points[
        "esplanade.ike.negotiations"
    ]
    assert all("spi" not in str(attrs).lower() for series in points.values() for attrs, _ in series)
    # the rekey series of a connection exist, at 0, from its first established IKE SA on
    assert sorted((attrs["kind"], value) for attrs, value in points["esplanade.ike.rekeys"]) == [
        ("child", 0),
        ("ike", 0),
    ]


def test_negotiation_spans() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from esplanade.keyexchange.ike_spans import NegotiationSpans
    from esplanade.keyexchange.ikev2.events import NegotiationFailed

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    net, a, _b = pair()
    a.engine.initiate("ab", net.now)
    net.run()
    spans = NegotiationSpans(a.engine, {sa: "ab" for sa in a.engine.sas}, clock=lambda: net.now)
    spans.tracer = provider.get_tracer("test")
    for ev in a.events:
        spans.observe(ev)
    spans.observe(NegotiationFailed("ike-9", 24, "AUTH payload does not verify", "ike_auth"))
    finished = exporter.get_finished_spans()
    done = [s for s in finished if s.name == "ike.negotiation"]
    assert [s.attributes["ike.outcome"] for s in done] == ["established", "failed"]  # type: ignore[index]
    assert done[1].attributes["ike.notify"] == "AUTHENTICATION_FAILED"  # type: ignore[index]
    assert done[1].status.description == "AUTH payload does not verify"
    # each exchange of the set-up is a span with its outcome, inside the negotiation's trace
    exchanges = [s for s in finished if s.name.startswith("ike.exchange")]
    assert [s.attributes["ike.exchange"] for s in exchanges] == ["IKE_SA_INIT", "IKE_AUTH"]  # type: ignore[index]
    assert all(s.attributes["ike.outcome"] == "ok" for s in exchanges)  # type: ignore[index]
    negotiation = done[0].context
    assert negotiation is not None
    for s in exchanges:
        assert s.parent is not None and s.parent.span_id == negotiation.span_id
        assert s.context is not None and s.context.trace_id == negotiation.trace_id


def test_exchange_timeout_is_a_failed_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from esplanade.keyexchange.ike_spans import NegotiationSpans
    from esplanade.keyexchange.tunnel_status import TunnelStatus

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    net, a, _b = pair()
    net.drop = lambda d: True  # a dead peer: nothing arrives
    ike = a.engine.initiate("ab", net.now)
    connection_of = {ike: "ab"}
    tunnels = TunnelStatus(a.engine, connection_of)
    spans = NegotiationSpans(a.engine, connection_of, clock=lambda: net.now)
    spans.tracer = provider.get_tracer("test")
    net.advance(600.0)
    for ev in a.events:
        spans.observe(ev)
        tunnels.observe(ev)
    finished = exporter.get_finished_spans()
    (exchange,) = [s for s in finished if s.name.startswith("ike.exchange")]
    assert exchange.attributes["ike.outcome"] == "timeout"  # type: ignore[index]
    (negotiation,) = [s for s in finished if s.name == "ike.negotiation"]
    assert negotiation.attributes["ike.notify"] == "TIMEOUT"  # type: ignore[index]
    (state,) = tunnels.states()
    assert not state.up and "TIMEOUT" in state.reason and "ike_init" in state.reason


def test_exchange_spans_are_skipped_only_while_no_processor_listens() -> None:
    """Without a span processor the exchange spans (leaves) are not built; the negotiation
    span still is, and its context still goes into the records (`carrier`). A processor added
    later gets them again."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from esplanade.keyexchange.ike_spans import NegotiationSpans
    from esplanade.keyexchange.ikev2.events import ExchangeCompleted
    from esplanade.telemetry.tracing import spans_recorded

    provider = TracerProvider()
    net, a, _b = pair()
    ike = a.engine.initiate("ab", net.now)
    net.run()
    spans = NegotiationSpans(a.engine, {sa: "ab" for sa in a.engine.sas}, clock=lambda: net.now)
    spans.tracer = provider.get_tracer("test")
    assert not spans_recorded(spans.tracer)
    exchanges = [ev for ev in a.events if isinstance(ev, ExchangeCompleted)]
    assert exchanges
    spans.observe(exchanges[0])
    carried = spans.carrier(ike)
    assert carried.get("traceparent", "").startswith("00-")  # the negotiation is there, carried
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert spans_recorded(spans.tracer)
    for ev in exchanges[1:]:
        spans.observe(ev)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names and all(name.startswith("ike.exchange") for name in names)
    assert spans.carrier(ike) == carried  # the same negotiation throughout
