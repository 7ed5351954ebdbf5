"""The dataplane's span for installing a Child SA handed over through the store.

keyexchange writes the W3C trace context of the negotiation into the Child SA record
(`ChildSaRecord.trace_context`). The install span continues that trace (so one trace id runs
from the REST call through keyexchange to here) and also carries a span link to the
producer, the OpenTelemetry convention for a hand-off through a queue or store.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.telemetry.tracing import extract_context, link_from

_tracer = trace.get_tracer("esplanade.dataplane")


def install_span(record: ChildSaRecord, node: str) -> AbstractContextManager[Span]:
    carrier = record.trace_context
    return _tracer.start_as_current_span(
        "dataplane.install_child_sa",
        context=extract_context(carrier) if carrier else None,
        links=link_from(carrier) if carrier else None,
        kind=SpanKind.CONSUMER,
        attributes={"ike.connection": record.connection, "ipsec.child": record.child, "dataplane.node": node},
    )
