"""The ESP batch room: one call per batch of packets, compiled or pure Python, same results.

`EspBatchCore` is the door the userspace datapath's crypto room calls:

* `install_outbound(sa, association) -> index` / `remove_outbound(spi)`: outbound SAs; packets
  pick theirs by index (`which`, one u16 per packet, or all index 0). Indices move when an SA
  is removed (the last one takes its place); `generation` counts such changes.
* `install_inbound(sa, association, identity)` / `remove_inbound(spi)`: the SPI table; the
  identity's `IdentityFilter` (or None) is applied to every packet the SA decapsulates.
* `encrypt(packets, now, which)`: inner packets -> ESP payloads (SPI .. ICV), tags = index.
* `decrypt(payloads, now, wall_now, non_esp)`: ESP payloads of any installed SA -> inner
  packets that passed the engine and the identity filter, tags = SPI; `wall_now` (POSIX time)
  drives timed filter parts; with a `non_esp` list, NAT keepalives and non-ESP-marker (IKE)
  datagrams are not drops: their input indices are appended to it (RFC 3948), so a GRO read
  can go in whole.
* `drain_flows()`: flow records since the last drain.

Python keeps the control: the `OutboundSa`/`InboundSa` objects stay the state (sequence
numbers, replay window, counters, lifetimes, events); both cores leave them exactly as the
pure-Python engine does, including every drop reason. The compiled core handles tunnel-mode
AES-GCM-16 and ChaCha20-Poly1305 SAs in C; any other SA (AES-CBC, NULL, transport mode, NAT-OA
fix-ups) is installed too and the C loop hands its packets to the pure-Python engine, in order.
`association` must be the `SecurityAssociation` the SA state was built from: the compiled core
keys its own cipher contexts from it.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol, TypeAlias

from esplanade.dataplane.esp.counters import DropReason, TrafficCounters
from esplanade.dataplane.esp.esp_codec import decrypt_esp, encrypt_esp
from esplanade.dataplane.esp.natt import NAT_KEEPALIVE, NON_ESP_MARKER
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa
from esplanade.dataplane.fastpath.filter_tables import FilterCounts, IdentityFilter
from esplanade.dataplane.fastpath.flow_accounting import (
    DEFAULT_FLOW_CAPACITY,
    INBOUND,
    OUTBOUND,
    FlowRecord,
    FlowTable,
    PythonFlowTable,
    records,
)
from esplanade.dataplane.fastpath.packet_batch import PacketBatch, PacketsIn
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.transforms import Direction, EncrId, IpProto
from esplanade.policy.filters import PacketFilter, parse_inner_packet

KIND_PYTHON = 0
KIND_AES_GCM = 1
KIND_CHACHA20_POLY1305 = 2
_AEAD_KINDS = {EncrId.AES_GCM_16: KIND_AES_GCM, EncrId.CHACHA20_POLY1305: KIND_CHACHA20_POLY1305}
_MAX_IP = 0xFFFF
Which: TypeAlias = "array[int] | bytearray"  # u16 per packet: the outbound slot index, or SKIP
_UDP_HEADER = 8


class EspBatchCore(Protocol):
    hot_path: str
    table_counters: TrafficCounters
    generation: int

    def install_outbound(self, sa: OutboundSa, association: SecurityAssociation) -> int: ...

    def remove_outbound(self, spi: int) -> OutboundSa | None: ...

    def outbound_index(self, spi: int) -> int: ...

    def install_inbound(
        self, sa: InboundSa, association: SecurityAssociation, identity: IdentityFilter | None = None
    ) -> None: ...

    def remove_inbound(self, spi: int) -> InboundSa | None: ...

    def identity_filter(self, packet_filter: PacketFilter) -> IdentityFilter: ...

    def set_identity(self, spi: int, identity: IdentityFilter | None) -> None: ...

    def encrypt(self, packets: PacketsIn, now: float, which: Which | None = None) -> PacketBatch: ...

    def decrypt(
        self, payloads: PacketsIn, now: float, wall_now: float | None = None, non_esp: list[int] | None = None
    ) -> PacketBatch: ...

    def drain_flows(self) -> list[FlowRecord]: ...

    def compiled_spis(self) -> set[int]: ...

    def outbound_sas(self) -> list[OutboundSa]: ...


def slot_kind(sa: OutboundSa | InboundSa, association: SecurityAssociation) -> int:
    """Which loop handles an SA: an AEAD kind for tunnel-mode AES-GCM-16/ChaCha20-Poly1305, else Python."""
    if association.spi != sa.spi or association.direction != sa.direction:
        raise ValueError(f"SA {sa.spi:#x}: the association is not the one the state was built from")
    if sa.protocol != IpProto.ESP:
        raise TypeError(f"SA {sa.spi:#x} is AH: the batch room carries ESP payloads only")
    encr = association.encr
    if encr is None or not sa.tunnel or encr.encr_id not in _AEAD_KINDS:
        return KIND_PYTHON
    if isinstance(sa, InboundSa) and sa.nat_original is not None:
        return KIND_PYTHON
    return _AEAD_KINDS[encr.encr_id]


def max_esp_bytes(sa: OutboundSa) -> int:
    """esp_codec._max_esp_bytes for tunnel mode: what fits the outer IPv4 total / IPv6 payload length."""
    fixed = sa.outer_header_bytes if len(sa.src) == 4 else 0
    return _MAX_IP - fixed - (_UDP_HEADER if sa.encap is not None else 0)


class _CoreBase:
    """SA and identity bookkeeping shared by both cores."""

    hot_path = "python"

    def __init__(self) -> None:
        self.table_counters = TrafficCounters()
        self.generation = 0
        self._outbound: list[OutboundSa] = []
        self._out_index: dict[int, int] = {}
        self._inbound: dict[int, InboundSa] = {}
        self._identity_of: dict[int, IdentityFilter | None] = {}
        self._timed: dict[int, IdentityFilter] = {}
        self._next_refresh = math.inf

    def outbound_index(self, spi: int) -> int:
        return self._out_index[spi]

    def outbound_sas(self) -> list[OutboundSa]:
        """The outbound SAs by slot index (what `which` selects)."""
        return list(self._outbound)

    def _add_outbound(self, sa: OutboundSa) -> int:
        if sa.spi in self._out_index:
            raise ValueError(f"outbound SPI {sa.spi:#x} is already installed")
        self._out_index[sa.spi] = len(self._outbound)
        self._outbound.append(sa)
        return len(self._outbound) - 1

    def _drop_outbound(self, spi: int) -> int | None:
        """Remove; the last SA moves into the hole. Returns the freed index."""
        index = self._out_index.pop(spi, None)
        if index is None:
            return None
        last = self._outbound.pop()
        if index < len(self._outbound):
            self._outbound[index] = last
            self._out_index[last.spi] = index
        self.generation += 1
        return index

    def _track_identity(self, spi: int, identity: IdentityFilter | None) -> None:
        self._identity_of[spi] = identity
        if identity is not None and identity.packet_filter.get_timer() is not None:
            self._timed[id(identity)] = identity
            self._next_refresh = -math.inf

    def _refresh_filters(self, wall_now: float | None) -> None:
        if wall_now is None or wall_now < self._next_refresh:
            return
        live = {id(i) for i in self._identity_of.values() if i is not None}
        for key in [k for k in self._timed if k not in live]:
            del self._timed[key]
        for identity in self._timed.values():
            identity.refresh(wall_now)
        self._next_refresh = min((i.next_refresh() for i in self._timed.values()), default=math.inf)


class CompiledEspBatch(_CoreBase):
    """The batch loops in C (`_espfast`)."""

    hot_path = "compiled"

    def __init__(self, module: ModuleType, flow_capacity: int = DEFAULT_FLOW_CAPACITY) -> None:
        super().__init__()
        self._m = module
        self._table: Any = module.InboundTable(self.table_counters)
        self._slots: list[Any] = []
        self._slot_tuple: tuple[Any, ...] = ()
        self.flows: FlowTable = module.FlowTable(flow_capacity)

    def _slot(self, sa: OutboundSa | InboundSa, association: SecurityAssociation, **kw: Any) -> Any:
        kind = slot_kind(sa, association)
        key = salt = b""
        if kind != KIND_PYTHON:
            assert association.encr is not None
            split = association.encr.key_bytes
            key, salt = association.encr_key[:split], association.encr_key[split:]
        outbound = sa.direction == Direction.OUT
        return self._m.Slot(sa, outbound, kind, key, salt, sa.spi, sa.esn, **kw)

    def install_outbound(self, sa: OutboundSa, association: SecurityAssociation) -> int:
        slot = self._slot(sa, association, pad_to=sa.tfc_pad_to, max_esp=max_esp_bytes(sa))
        index = self._add_outbound(sa)
        self._slots.append(slot)
        self._slot_tuple = tuple(self._slots)
        return index

    def remove_outbound(self, spi: int) -> OutboundSa | None:
        index = self._out_index.get(spi)
        if index is None:
            return None
        sa = self._outbound[index]
        self._drop_outbound(spi)
        last = self._slots.pop()
        if index < len(self._slots):
            self._slots[index] = last
        self._slot_tuple = tuple(self._slots)
        return sa

    def install_inbound(
        self, sa: InboundSa, association: SecurityAssociation, identity: IdentityFilter | None = None
    ) -> None:
        selectors = sa.selectors
        local = None if selectors.match_all else selectors.local
        remote = None if selectors.match_all else selectors.remote
        slot = self._slot(sa, association, local=local, remote=remote, filter=self._counts(identity))
        self._table.add(slot)
        self._inbound[sa.spi] = sa
        self._track_identity(sa.spi, identity)

    def remove_inbound(self, spi: int) -> InboundSa | None:
        self._table.remove(spi)
        self._identity_of.pop(spi, None)
        return self._inbound.pop(spi, None)

    def identity_filter(self, packet_filter: PacketFilter) -> IdentityFilter:
        return IdentityFilter(packet_filter, self._m.Filter())

    def _counts(self, identity: IdentityFilter | None) -> Any:
        if identity is None:
            return None
        if not isinstance(identity.counts, self._m.Filter):
            raise TypeError("the identity filter was made by another core")
        return identity.counts

    def set_identity(self, spi: int, identity: IdentityFilter | None) -> None:
        slot = self._table.get(spi)
        if slot is None:
            raise KeyError(spi)
        slot.filter = self._counts(identity)
        self._track_identity(spi, identity)

    @property
    def module(self) -> Any:
        """The `_espfast` module (its pumps take the parts below)."""
        return self._m

    @property
    def slot_tuple(self) -> tuple[Any, ...]:
        """The outbound Slots in slot order (encrypt_batch's `slots`)."""
        return self._slot_tuple

    @property
    def inbound_table(self) -> Any:
        """The InboundTable (decrypt_batch's `table`)."""
        return self._table

    def encrypt(self, packets: PacketsIn, now: float, which: Which | None = None) -> PacketBatch:
        data, spans = bytearray(), bytearray()
        if isinstance(packets, PacketBatch):
            n = self._m.encrypt_batch(
                self._slot_tuple, which, packets.data, packets.spans, packets.count, now, data, spans, self.flows
            )
        else:
            n = self._m.encrypt_batch(self._slot_tuple, which, packets, None, -1, now, data, spans, self.flows)
        return PacketBatch(data, spans, n)

    def decrypt(
        self, payloads: PacketsIn, now: float, wall_now: float | None = None, non_esp: list[int] | None = None
    ) -> PacketBatch:
        self._refresh_filters(wall_now)
        data, spans = bytearray(), bytearray()
        if isinstance(payloads, PacketBatch):
            n = self._m.decrypt_batch(
                self._table, payloads.data, payloads.spans, payloads.count, now, data, spans, self.flows, non_esp
            )
        else:
            n = self._m.decrypt_batch(self._table, payloads, None, -1, now, data, spans, self.flows, non_esp)
        return PacketBatch(data, spans, n)

    def drain_flows(self) -> list[FlowRecord]:
        return records(self.flows.drain())

    def compiled_spis(self) -> set[int]:
        out = {s.spi for s in self._slots if s.kind != KIND_PYTHON}
        out.update(spi for spi in self._inbound if self._table.get(spi).kind != KIND_PYTHON)
        return out


class PythonEspBatch(_CoreBase):
    """The reference: the pure-Python engine, packet by packet, with the same filter and accounting."""

    def __init__(self, flow_capacity: int = DEFAULT_FLOW_CAPACITY) -> None:
        super().__init__()
        self.flows = PythonFlowTable(flow_capacity)

    def install_outbound(self, sa: OutboundSa, association: SecurityAssociation) -> int:
        slot_kind(sa, association)
        return self._add_outbound(sa)

    def remove_outbound(self, spi: int) -> OutboundSa | None:
        index = self._out_index.get(spi)
        if index is None:
            return None
        sa = self._outbound[index]
        self._drop_outbound(spi)
        return sa

    def install_inbound(
        self, sa: InboundSa, association: SecurityAssociation, identity: IdentityFilter | None = None
    ) -> None:
        slot_kind(sa, association)
        if sa.spi in self._inbound:
            raise ValueError(f"inbound SPI {sa.spi:#x} is already installed")
        if identity is not None and not isinstance(identity.counts, FilterCounts):
            raise TypeError("the identity filter was made by another core")
        self._inbound[sa.spi] = sa
        self._track_identity(sa.spi, identity)

    def remove_inbound(self, spi: int) -> InboundSa | None:
        self._identity_of.pop(spi, None)
        return self._inbound.pop(spi, None)

    def identity_filter(self, packet_filter: PacketFilter) -> IdentityFilter:
        return IdentityFilter(packet_filter, FilterCounts())

    def set_identity(self, spi: int, identity: IdentityFilter | None) -> None:
        if spi not in self._inbound:
            raise KeyError(spi)
        self._track_identity(spi, identity)

    def encrypt(self, packets: PacketsIn, now: float, which: Which | None = None) -> PacketBatch:
        outbound = self._outbound
        flows = self.flows
        out: list[bytes] = []
        tags: list[int] = []
        selection = memoryview(which).cast("B").cast("H") if which is not None else None
        for i, packet in enumerate(packets):
            index = selection[i] if selection is not None else 0
            if index == SKIP:
                continue
            sa = outbound[index]
            data = bytes(packet)
            esp = encrypt_esp(sa, data, now)
            if esp is None:
                continue
            out.append(esp)
            tags.append(index)
            flows.add_packet(sa.spi, OUTBOUND, data)
        return PacketBatch.from_packets(out, tags)

    def decrypt(
        self, payloads: PacketsIn, now: float, wall_now: float | None = None, non_esp: list[int] | None = None
    ) -> PacketBatch:
        self._refresh_filters(wall_now)
        inbound, identities, flows = self._inbound, self._identity_of, self.flows
        out: list[bytes] = []
        tags: list[int] = []
        for index, payload in enumerate(payloads):
            esp = bytes(payload)
            if non_esp is not None and (esp == NAT_KEEPALIVE or esp[:4] == NON_ESP_MARKER):
                non_esp.append(index)
                continue
            if len(esp) < 8:
                self.table_counters.drop(DropReason.MALFORMED)
                continue
            spi = int.from_bytes(esp[0:4], "big")
            sa = inbound.get(spi)
            if sa is None:
                self.table_counters.drop(DropReason.UNKNOWN_SPI)
                continue
            inner = decrypt_esp(sa, esp, now)
            if inner is None:
                continue
            header = parse_inner_packet(inner)
            identity = identities.get(spi)
            if identity is not None:
                counts = identity.counts
                if header is None or not identity.table.allows(
                    header.version, header.dst, header.proto, header.dst_port
                ):
                    counts.denied += 1
                    counts.last_denied = bytes(inner[:64])
                    continue
                counts.allowed += 1
            flows.add(spi, INBOUND, header, len(inner))
            out.append(inner)
            tags.append(spi)
        return PacketBatch.from_packets(out, tags)

    def drain_flows(self) -> list[FlowRecord]:
        return records(self.flows.drain())

    def compiled_spis(self) -> set[int]:
        return set()


SKIP = 0xFFFF  # a `which` entry that leaves its packet out (the caller dropped or handed it off)


def select_by_tag(packets: PacketBatch, per_tag: array[int]) -> array[int] | bytearray:
    """`which` for `encrypt` when the decision was taken per tag (per TUN frame a batch was split
    from): packet i gets per_tag[tag of i]; SKIP leaves it out."""
    from esplanade.dataplane.fastpath.hot_path import load_compiled

    module = load_compiled()[0]
    if module is not None:
        selected: bytearray = module.select_by_tag(packets.spans, packets.count, per_tag)
        return selected
    return array("H", [per_tag[tag] for tag in packets.tags()])


def outbound_selection(indices: Sequence[int]) -> array[int]:
    """The `which` argument of `encrypt`: one u16 SA index per packet."""
    return array("H", indices)
