"""OpenTelemetry instruments of keyexchange. Labels are low-cardinality: connection, state,
outcome, reason (a notify name, or TIMEOUT), kind; never SPIs, addresses or identities."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import (
    ChildSaRekeyed,
    Event,
    IkeSaEstablished,
    IkeSaRekeyed,
    NegotiationFailed,
)
from esplanade.keyexchange.tunnel_status import TunnelStatus, failure_reason
from esplanade.telemetry.metrics import meter


class IkeMetrics:
    def __init__(
        self,
        dispatcher: IkeDispatcher,
        connection_of: dict[str, str],
        meter_provider: MeterProvider | None = None,
        tunnels: TunnelStatus | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.connection_of = connection_of
        self.tunnels = tunnels or TunnelStatus(dispatcher, connection_of)
        m = meter_provider.get_meter("esplanade.keyexchange") if meter_provider is not None else meter("keyexchange")
        self.negotiations = m.create_counter(
            "esplanade.ike.negotiations", description="IKE negotiations by outcome and reason (notify)"
        )
        self.rekeys = m.create_counter("esplanade.ike.rekeys", description="Completed rekeys (kind: ike, child)")
        self._rekeys_started: set[str] = set()  # connections whose rekey series exist (at 0 or more)
        m.create_observable_gauge(
            "esplanade.ike.sas", callbacks=[self._ike_sas], description="IKE SAs by connection and state"
        )
        m.create_observable_gauge(
            "esplanade.ike.child_sas", callbacks=[self._child_sas], description="Child SAs by connection and state"
        )
        m.create_observable_gauge(
            "esplanade.tunnel.up",
            callbacks=[self._tunnel_up],
            description="1 when a configured connection has an established IKE SA with an installed Child SA",
        )

    def _tunnel_up(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(int(t.up), {"connection": t.connection}) for t in self.tunnels.states()]

    def _ike_sas(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = Counter((sa.config.name, sa.state.value) for sa in list(self.dispatcher.sas.values()))
        return [Observation(n, {"connection": c, "state": s}) for (c, s), n in counts.items()]

    def _child_sas(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = Counter(
            (sa.config.name, c.state.value) for sa in list(self.dispatcher.sas.values()) for c in sa.children.values()
        )
        return [Observation(n, {"connection": c, "state": s}) for (c, s), n in counts.items()]

    def observe(self, ev: Event) -> None:
        connection = self.connection_of.get(ev.ike_sa, "")
        if isinstance(ev, IkeSaEstablished):
            if not ev.rekey_of:
                self.negotiations.add(1, {"connection": connection, "outcome": "established", "reason": ""})
                if connection not in self._rekeys_started:  # known labels start at 0 (Prometheus practice)
                    self._rekeys_started.add(connection)  # once: the series stay (cumulative)
                    for kind in ("ike", "child"):
                        self.rekeys.add(0, {"connection": connection, "kind": kind})
        elif isinstance(ev, NegotiationFailed):
            self.negotiations.add(1, {"connection": connection, "outcome": "failed", "reason": failure_reason(ev)})
        elif isinstance(ev, IkeSaRekeyed):
            self.rekeys.add(1, {"connection": connection, "kind": "ike"})
        elif isinstance(ev, ChildSaRekeyed):
            self.rekeys.add(1, {"connection": connection, "kind": "child"})
