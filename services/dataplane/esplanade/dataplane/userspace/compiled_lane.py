"""The compiled fast lane of the crypto room: the worker's SAs mirrored into an `EspBatchCore`.

`EspTransform` keeps every decision (SPD, flow cache, ownership, ACQUIRE) and every piece of
state (the `OutboundSa`/`InboundSa` objects: sequence numbers, replay windows, counters,
lifetimes, events). With `dataplane.hot_path` compiled it also installs each owned Child SA
into a `CompiledEspBatch` (`esplanade.dataplane.fastpath`), and the per-packet work (padding,
AEAD seal/open, replay check and update, selectors, identity filter, flow accounting) runs
in one C call per batch. The C loop reads the SA objects at the start of a batch, writes
them back at its end, and calls the same Python methods the engine calls whenever a packet
reaches a mark (`take_sequence` for a sequence reservation, `on_replay_top` for a replay
floor, `on_volume`/`on_time` for lifetimes), so reservations, replay floors and lifetime
events work exactly as on the pure-Python lanes (`aead_lane.py`), which stay the fallback.

Slots: the core numbers outbound SAs 0..n-1 (`which` selects one per packet); a removal moves
the last SA into the hole, so `slot_of` is rebuilt on every change (the transform clears its
flow cache on every change too). An outbound SA the core refuses (the same outbound SPI
toward two peers) stays on the Python engine: `slot_of` answers -1 for it.

Flows: the core accounts packets and bytes per (SPI, direction, 5-tuple) in a fixed table;
`drain_flows` folds them into per-SA totals (`flow_totals`) and counts distinct flows, called
by the transform every FLOW_DRAIN_BATCHES batches and on status/counters requests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa
from esplanade.dataplane.fastpath import CompiledEspBatch, EspBatchCore, HotPathStatus, IdentityFilter
from esplanade.dataplane.userspace.outer_transport import Endpoint
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.policy.filters import PacketFilter

FLOW_DRAIN_BATCHES = 1024


@dataclass(slots=True)
class FlowSummary:
    """What the drained flow records add up to (per worker)."""

    drains: int = 0
    records: int = 0
    overflow_packets: int = 0
    packets: Counter[str] = field(default_factory=Counter)  # "in"/"out" -> packets
    bytes: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "drains": self.drains,
            "records": self.records,
            "overflow_packets": self.overflow_packets,
            "packets": dict(self.packets),
            "bytes": dict(self.bytes),
        }


class CompiledLane:
    def __init__(self, core: EspBatchCore, status: HotPathStatus) -> None:
        self.core = core
        self.hot_path = status
        self.slot_of: dict[int, int] = {}  # id(OutboundSa) -> slot index in the core
        self.slot_sas: list[OutboundSa] = []
        self.slot_endpoints: list[Endpoint] = []
        self.in_core: set[int] = set()  # id(OutboundSa) installed in the core
        self.udp_spis: set[int] = set()  # inbound SPIs of SAs with UDP encapsulation
        self.plain_spis: set[int] = set()  # inbound SPIs of plain-ESP SAs
        self.refused: Counter[str] = Counter()
        self.flows = FlowSummary()
        self.batches = 0
        self._endpoint_of: dict[int, Endpoint] = {}
        self.filters: dict[int, IdentityFilter] = {}  # inbound SPI -> its identity filter tables
        self.removed_denied = 0  # packets denied by filters since replaced or removed
        # flow key of a TUN frame -> slot, for `_espfast.pump_out`: taught by the transform's SPD
        # lookup (`learn`), emptied with the transform's flow cache and on every slot change
        self.flow_slots: Any = core.module.SlotCache() if isinstance(core, CompiledEspBatch) else None

    def learn(self, data: bytearray | bytes, offset: int, length: int, slot: int) -> None:
        if self.flow_slots is not None:
            self.flow_slots.learn(data, offset, length, slot)

    def forget_flows(self) -> None:
        if self.flow_slots is not None:
            self.flow_slots.clear()

    # -- SAs ----------------------------------------------------------------------------
    def install(
        self,
        in_sa: InboundSa,
        in_association: SecurityAssociation,
        out_sa: OutboundSa,
        out_association: SecurityAssociation,
        endpoint: Endpoint,
    ) -> None:
        """Mirror a Child SA into the core (the inbound SPI is unique on this node: it always goes in)."""
        self.core.install_inbound(in_sa, in_association, None)
        (self.udp_spis if in_sa.encap is not None else self.plain_spis).add(in_sa.spi)
        try:
            self.core.install_outbound(out_sa, out_association)
        except ValueError:  # the same outbound SPI toward another peer: that SA stays on the engine
            self.refused["outbound_spi_shared"] += 1
        else:
            self.in_core.add(id(out_sa))
            self._endpoint_of[id(out_sa)] = endpoint
        self._reindex()

    def remove(self, in_sa: InboundSa, out_sa: OutboundSa) -> None:
        old = self.filters.pop(in_sa.spi, None)
        if old is not None:
            self.removed_denied += old.denied
        if self.core.remove_inbound(in_sa.spi) is not None:
            self.udp_spis.discard(in_sa.spi)
            self.plain_spis.discard(in_sa.spi)
        if id(out_sa) in self.in_core:
            self.in_core.discard(id(out_sa))
            self._endpoint_of.pop(id(out_sa), None)
            self.core.remove_outbound(out_sa.spi)
        self._reindex()

    def set_filter(self, in_sa: InboundSa, packet_filter: PacketFilter | None) -> None:
        """Compile the filter into tables the C decrypt applies to every packet of the SA."""
        identity: IdentityFilter | None = None
        if packet_filter is not None:
            identity = self.core.identity_filter(packet_filter)
        self.core.set_identity(in_sa.spi, identity)
        old = self.filters.pop(in_sa.spi, None)
        if old is not None:
            self.removed_denied += old.denied
        if identity is not None:
            self.filters[in_sa.spi] = identity

    def filter_denied(self) -> int:
        return self.removed_denied + sum(f.denied for f in self.filters.values())

    def _reindex(self) -> None:
        self.forget_flows()
        self.slot_sas = self.core.outbound_sas()
        self.slot_of = {id(sa): index for index, sa in enumerate(self.slot_sas)}
        self.slot_endpoints = [self._endpoint_of[id(sa)] for sa in self.slot_sas]

    # -- flows --------------------------------------------------------------------------
    def count_batch(self) -> None:
        self.batches += 1
        if self.batches % FLOW_DRAIN_BATCHES == 0:
            self.drain_flows()

    def drain_flows(self) -> None:
        records = self.core.drain_flows()
        summary = self.flows
        summary.drains += 1
        summary.records += len(records)
        summary.overflow_packets = int(getattr(getattr(self.core, "flows", None), "overflow_packets", 0))
        for record in records:
            direction = "in" if record.direction == 0 else "out"
            summary.packets[direction] += record.packets
            summary.bytes[direction] += record.bytes

    def status(self) -> dict[str, object]:
        self.drain_flows()
        return {
            **self.status_of_path(),
            "sas_compiled": len(self.core.compiled_spis()),
            "outbound_slots": len(self.slot_sas),
            "refused": dict(self.refused),
            "filters": len(self.filters),
            "pump_flow_slots": self._flow_slot_counts(),
            "flows": self.flows.as_dict(),
        }

    def _flow_slot_counts(self) -> dict[str, int] | None:
        cache = self.flow_slots
        if cache is None:
            return None
        return {"flows": len(cache), "frames_hit": cache.hits, "wakeups_missed": cache.misses}

    def status_of_path(self) -> dict[str, object]:
        return {"hot_path": self.hot_path.active, "hot_path_reason": self.hot_path.reason}
