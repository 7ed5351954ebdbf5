"""OpenTelemetry spans for IKE negotiations and their exchanges, built from the core's events
(the sans-IO core knows nothing of tracing).

- `ike.negotiation`: one per IKE SA set-up, from the first datagram (or the `Initiate` call)
  to established or failed. An `Initiate` call opens it inside the caller's trace (`begin`),
  so the REST call, the gRPC call and the negotiation share one trace id.
- `ike.exchange`: one per exchange we started (IKE_SA_INIT, IKE_AUTH, CREATE_CHILD_SA,
  INFORMATIONAL), with its outcome (ok, failed + notify, timeout). During the set-up they are
  children of the negotiation; later ones (rekeys, DPD) start their own trace, linked to it.
- `ike.rekey`: one per completed rekey.

`carrier(ike_sa)` is the W3C trace context of the negotiation, which the store handoff puts
into the Child SA record, so the dataplane's install span joins the trace.

Attributes are the metrics' low-cardinality labels; never keys, SPIs or addresses.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import (
    ChildSaRekeyed,
    Event,
    ExchangeCompleted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
    NegotiationFailed,
)
from esplanade.keyexchange.tunnel_status import failure_reason
from esplanade.telemetry.tracing import spans_recorded


class NegotiationSpans:
    def __init__(
        self, dispatcher: IkeDispatcher, connection_of: dict[str, str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.dispatcher = dispatcher
        self.connection_of = connection_of
        self.clock = clock
        self.tracer = trace.get_tracer("esplanade.keyexchange")
        self._open: dict[str, Span] = {}  # IKE SA id -> its negotiation span, until it ends
        self._context: dict[str, trace.SpanContext] = {}  # IKE SA id -> its negotiation's span context

    def _wall_ns(self, monotonic: float) -> int:
        return time.time_ns() - int(max(0.0, self.clock() - monotonic) * 1e9)

    def _started_ns(self, ike_sa: str) -> int:
        sa = self.dispatcher.sas.get(ike_sa)
        return self._wall_ns(sa.created_at) if sa is not None else time.time_ns()

    def begin(self, ike_sa: str) -> None:
        """Open the negotiation span of `ike_sa` in the current context (an `Initiate` call)."""
        if ike_sa in self._open:
            return
        span = self.tracer.start_span(
            "ike.negotiation", attributes={"ike.connection": self.connection_of.get(ike_sa, ""), "ike.initiator": True}
        )
        self._open[ike_sa] = span
        self._context[ike_sa] = span.get_span_context()

    def _negotiation(self, ike_sa: str) -> Span:
        span = self._open.get(ike_sa)
        if span is None:  # a negotiation nobody asked for through the API: a trace of its own
            span = self.tracer.start_span(
                "ike.negotiation",
                context=trace.set_span_in_context(trace.INVALID_SPAN),
                start_time=self._started_ns(ike_sa),
                attributes={"ike.connection": self.connection_of.get(ike_sa, "")},
            )
            self._open[ike_sa] = span
            self._context[ike_sa] = span.get_span_context()
        return span

    def carrier(self, ike_sa: str) -> dict[str, str]:
        """The negotiation's trace context (W3C headers) to store in a record; {} if none."""
        span_context = self._context.get(ike_sa)
        if span_context is None:
            span = self._open.get(ike_sa)
            if span is None:
                return {}
            span_context = span.get_span_context()
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(span_context)))
        return carrier

    def observe(self, ev: Event) -> None:
        connection = self.connection_of.get(ev.ike_sa, "")
        if isinstance(ev, ExchangeCompleted):
            self._exchange(ev, connection)
        elif isinstance(ev, IkeSaEstablished) and not ev.rekey_of:
            span = self._negotiation(ev.ike_sa)
            span.set_attribute("ike.connection", connection)
            span.set_attribute("ike.initiator", ev.initiator)
            span.set_attribute("ike.outcome", "established")
            span.end()
            del self._open[ev.ike_sa]
        elif isinstance(ev, NegotiationFailed):
            span = self._negotiation(ev.ike_sa)
            failed: dict[str, AttributeValue] = {
                "ike.connection": connection,
                "ike.outcome": "failed",
                "ike.notify": failure_reason(ev),
                "ike.exchange": ev.exchange,
            }
            span.set_attributes(failed)
            span.set_status(Status(StatusCode.ERROR, ev.reason))
            span.end()
            del self._open[ev.ike_sa]
        elif isinstance(ev, IkeSaRekeyed | ChildSaRekeyed):
            kind = "ike" if isinstance(ev, IkeSaRekeyed) else "child"
            self.tracer.start_span(
                "ike.rekey",
                context=trace.set_span_in_context(trace.INVALID_SPAN),
                links=self._links(ev.ike_sa),
                attributes={"ike.connection": connection, "ike.kind": kind},
            ).end()
        elif isinstance(ev, IkeSaDeleted):
            unfinished = self._open.pop(ev.ike_sa, None)
            if unfinished is not None:
                unfinished.set_attribute("ike.outcome", "deleted")
                unfinished.set_status(Status(StatusCode.ERROR, ev.reason))
                unfinished.end()
            self._context.pop(ev.ike_sa, None)

    def _links(self, ike_sa: str) -> list[Link]:
        span_context = self._context.get(ike_sa)
        return [Link(span_context)] if span_context is not None else []

    def _exchange(self, ev: ExchangeCompleted, connection: str) -> None:
        attrs: dict[str, AttributeValue] = {
            "ike.connection": connection,
            "ike.exchange": ev.exchange,
            "ike.outcome": ev.outcome,
        }
        if ev.notify:
            attrs["ike.notify"] = ev.notify
        if ev.ike_sa in self._open or ev.ike_sa not in self._context:
            parent = trace.set_span_in_context(self._negotiation(ev.ike_sa))
            links: list[Link] = []
        else:
            parent, links = trace.set_span_in_context(trace.INVALID_SPAN), self._links(ev.ike_sa)
        if not spans_recorded(self.tracer):
            return  # a leaf nobody would receive (the negotiation span above stays: it is carried)
        span = self.tracer.start_span(
            f"ike.exchange {ev.exchange}",
            context=parent,
            links=links,
            start_time=self._wall_ns(ev.started_at),
            attributes=attrs,
        )
        if ev.outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, ev.notify or ev.outcome))
        span.end(end_time=self._wall_ns(ev.finished_at))
