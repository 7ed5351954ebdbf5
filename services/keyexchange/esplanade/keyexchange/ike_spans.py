"""OpenTelemetry spans for IKE negotiations and rekeys, built from the core's events after the
fact (the sans-IO core knows nothing of tracing): one span per IKE SA set-up, from the first
datagram to established or failed, and one per completed rekey. Attributes are the metrics'
low-cardinality labels; never keys, SPIs or addresses."""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import (
    ChildSaRekeyed,
    Event,
    IkeSaEstablished,
    IkeSaRekeyed,
    NegotiationFailed,
)


class NegotiationSpans:
    def __init__(
        self, dispatcher: IkeDispatcher, connection_of: dict[str, str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.dispatcher = dispatcher
        self.connection_of = connection_of
        self.clock = clock
        self.tracer = trace.get_tracer("esplanade.keyexchange")

    def _started_ns(self, ike_sa: str) -> int:
        sa = self.dispatcher.sas.get(ike_sa)
        age = max(0.0, self.clock() - sa.created_at) if sa is not None else 0.0
        return time.time_ns() - int(age * 1e9)

    def observe(self, ev: Event) -> None:
        connection = self.connection_of.get(ev.ike_sa, "")
        if isinstance(ev, IkeSaEstablished) and not ev.rekey_of:
            attrs: dict[str, AttributeValue] = {
                "ike.connection": connection,
                "ike.initiator": ev.initiator,
                "ike.outcome": "established",
            }
            span = self.tracer.start_span("ike.negotiation", start_time=self._started_ns(ev.ike_sa), attributes=attrs)
            span.end()
        elif isinstance(ev, NegotiationFailed):
            failed: dict[str, AttributeValue] = {
                "ike.connection": connection,
                "ike.outcome": "failed",
                "ike.notify": ev.notify_name,
                "ike.exchange": ev.exchange,
            }
            span = self.tracer.start_span("ike.negotiation", start_time=self._started_ns(ev.ike_sa), attributes=failed)
            span.set_status(Status(StatusCode.ERROR, ev.reason))
            span.end()
        elif isinstance(ev, IkeSaRekeyed | ChildSaRekeyed):
            kind = "ike" if isinstance(ev, IkeSaRekeyed) else "child"
            self.tracer.start_span("ike.rekey", attributes={"ike.connection": connection, "ike.kind": kind}).end()
