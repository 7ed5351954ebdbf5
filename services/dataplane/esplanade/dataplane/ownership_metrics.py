"""OpenTelemetry instruments of scale-out ownership (labels: node, kind, reason; never SA ids).

    esplanade.dataplane.sas_owned          gauge    SAs this node carries         {node}
    esplanade.dataplane.ownership_moves    counter  SAs claimed or released        {node, kind, reason}
    esplanade.dataplane.failovers          counter  SAs taken over from a dead node {node}

`kind` claimed (reason `claim`) or released (reason rebalance: a member joined or left;
partition: our own lease stopped being provable; leave: graceful stop). A claim counts as a
failover too once the previous owner turns out to have vanished with its lease.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Observation

from esplanade.telemetry.metrics import meter

if TYPE_CHECKING:
    from esplanade.dataplane.ownership_sync import OwnershipSync


class OwnershipMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        m = meter("dataplane")
        self._moves = m.create_counter(
            "esplanade.dataplane.ownership_moves", unit="{sa}", description="SAs claimed or released by this node"
        )
        self._failovers = m.create_counter(
            "esplanade.dataplane.failovers", unit="{sa}", description="SAs taken over from a node whose lease expired"
        )
        self._sync: OwnershipSync | None = None
        m.create_observable_gauge(
            "esplanade.dataplane.sas_owned", callbacks=[self._owned], unit="{sa}", description="Child SAs carried"
        )

    def observe(self, sync: OwnershipSync) -> None:
        self._sync = sync

    def _owned(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._sync is not None:
            yield Observation(self._sync.owned_count(), {"node": self.node})

    def moved(self, kind: str, reason: str, count: int) -> None:
        self._moves.add(count, {"node": self.node, "kind": kind, "reason": reason})

    def failed_over(self, count: int) -> None:
        self._failovers.add(count, {"node": self.node})
