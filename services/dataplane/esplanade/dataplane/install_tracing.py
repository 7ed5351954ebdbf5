"""The dataplane's span for installing a Child SA handed over through the store.

keyexchange writes the W3C trace context of the negotiation into the Child SA record
(`ChildSaRecord.trace_context`). The install span continues that trace (so one trace id runs
from the REST call through keyexchange to here) and also carries a span link to the
producer, the OpenTelemetry convention for a hand-off through a queue or store. Installs are
batched, so the span is recorded when the outcome of its record is known.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.telemetry.tracing import extract_context, link_in, spans_recorded

_tracer = trace.get_tracer("esplanade.dataplane")


def record_install(record: ChildSaRecord, node: str, started_ns: int, error: str = "") -> None:
    if not spans_recorded(_tracer):
        return  # a leaf span (its context goes nowhere) that nothing would receive
    carrier = record.trace_context
    context = extract_context(carrier) if carrier else None  # parsed once: the parent and the link
    span = _tracer.start_span(
        "dataplane.install_child_sa",
        context=context,
        links=link_in(context) if context is not None else None,
        kind=SpanKind.CONSUMER,
        start_time=started_ns,
        attributes={"ike.connection": record.connection, "ipsec.child": record.child, "dataplane.node": node},
    )
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=max(started_ns, time.time_ns()))
