"""The crypto room of the userspace datapath: the ESP engine behind the `PacketTransform` door.

One `EspTransform` lives in each worker process. It holds the whole SPD (every worker must
know where a packet belongs, for steering) and the SAs of the Child SAs this worker owns
(``owner = inbound SPI mod workers``); the parent changes both through the control channel
(`sa_messages`). Its job per batch:

Outbound (inner packets from the TUN):
    SPD lookup (RFC 4301 §5.1) -> PROTECT: the Child SA's OutboundSa seals the packet
    (`esp_codec.encrypt_esp`) and the datagram goes to the SA's outer endpoint (UDP 4500 or
    port 0 = plain ESP); DISCARD and unmatched: counted drop; BYPASS: counted drop too,
    since a packet the host routed into the tunnel cannot leave in clear from here; PROTECT
    without an SA: counted drop, and an ACQUIRE event when the policy is a trap.
    Lookups of TCP and UDP packets (not fragments, no IPv4 options, no IPv6 extension
    headers) are cached by their address/port bytes; any SPD or SA change clears the cache.
Inbound (ESP from the outer sockets):
    SPI -> InboundSa; ESP-in-UDP must arrive for an SA with UDP encapsulation and plain ESP
    for one without (as Linux checks the encap type); `esp_codec.decrypt_esp` checks length,
    replay window, ICV, padding, next header and the SA's selectors on the decapsulated
    packet (RFC 4301 §5.2: policy_mismatch). Every refusal is a counted drop.

Sequence numbers never leave the worker; the engine asks for durable blocks
(`ReserveSequence`) and the parent answers with `grant_sequence` once the store holds them.
Replay floors (`PersistReplayFloor`) go up the same way. Lifetimes run on the loop's timer.

Not carried here (the backend refuses them): AH and transport mode, which need whole-packet
raw sockets rather than the TUN + UDP/ESP rooms.
"""

from __future__ import annotations

import ipaddress
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag

from esplanade.dataplane.backend import DataplaneEvent, DataplaneEventKind
from esplanade.dataplane.esp.counters import DropReason, TrafficCounters
from esplanade.dataplane.esp.esp_codec import PADDING, decrypt_esp, encrypt_esp
from esplanade.dataplane.esp.events import (
    EspEvent,
    HardExpire,
    PersistReplayFloor,
    ReserveSequence,
    SequenceExhausted,
    SoftExpire,
)
from esplanade.dataplane.esp.packet import parse_flow
from esplanade.dataplane.esp.replay import ReplayWindow
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa, ReplayPersistence, SequenceReservation
from esplanade.dataplane.esp.spd import InboundSaTable, Spd
from esplanade.dataplane.fastpath import PacketBatch, make_esp_batch_core
from esplanade.dataplane.fastpath.esp_batch import SKIP, select_by_tag
from esplanade.dataplane.fastpath.hot_path import HotPathSetting
from esplanade.dataplane.userspace.aead_lane import TRAILERS, OpenLane, SealLane, open_lane_for, seal_lane_for
from esplanade.dataplane.userspace.compiled_lane import CompiledLane
from esplanade.dataplane.userspace.mtu import esp_overhead, inner_mtu
from esplanade.dataplane.userspace.outer_transport import Datagram, Endpoint
from esplanade.dataplane.userspace.sa_messages import association_from_document, policy_from_document
from esplanade.dataplane.userspace.transform import WorkerContext
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction
from esplanade.ipsec.transforms import ENCR_AES_GCM_16_128, Direction, IpProto, Mode
from esplanade.policy.filters import PacketFilter

# The most ESP adds to an inner packet with AES-GCM / ChaCha20-Poly1305: SPI+seq 8, IV 8,
# ICV 16, pad length + next header 2, padding up to 3. (`inner_mtu` is exact; this is the
# one-number worst case of the `PacketTransform` door.)
AEAD_OVERHEAD = 37
FLOW_CACHE_LIMIT = 1 << 16
ACQUIRE_INTERVAL = 1.0  # at most one ACQUIRE per trap policy per second
MAX_DENIED_SAMPLES = 64  # headers of filter-denied packets kept between two `filter_drops`
DENIED_SAMPLE_BYTES = 64  # enough for the IPv4/IPv6 header and the ports

_PROTECT = 0
_BYPASS = 1
_DISCARD = 2
_NO_SA = 3
_NOT_OWNER = 4
_MALFORMED = 5
_NO_POLICY = 6
_REFUSAL_NAMES = {
    _NO_POLICY: "no_policy",
    _BYPASS: "bypass_routed_into_tunnel",
    _DISCARD: "policy_discard",
    _NO_SA: "no_sa",
    _NOT_OWNER: "not_owner",
    _MALFORMED: "malformed_inner",
}
_NOWHERE: Endpoint = ("", 0)
VNET_HDR_LEN = 10  # the virtio_net_hdr in front of every TUN frame (vnet_header.VNET_HDR_LEN)

# (code, SA to seal with, outer endpoint, owner worker or -1, policy id, fast lane of the SA)
Decision = tuple[int, OutboundSa | None, Endpoint, int, str, SealLane | None]


def endpoint_of(association: SecurityAssociation) -> Endpoint:
    """Where the SA's packets go: (peer address, UDP port), port 0 for plain ESP."""
    return (association.dst, association.encap.dst_port if association.encap is not None else 0)


class SealedFrames(NamedTuple):
    """What `seal_frames` made of one TUN read."""

    esp: PacketBatch  # ESP payloads, tags = slot index
    endpoints: list[Endpoint]  # by slot index
    datagrams: list[Datagram]  # ESP packets of SAs the compiled core does not hold (engine path)
    handoffs: list[tuple[int, bytes]]  # (owner worker, inner packet) for SAs owned elsewhere


class _OwnedChild:
    __slots__ = ("id", "inbound", "outbound")

    def __init__(self, child_sa: str, inbound: InboundSa, outbound: OutboundSa) -> None:
        self.id = child_sa
        self.inbound = inbound
        self.outbound = outbound


class EspTransform:
    """Implements `PacketTransform`, `SaSteering` and `ControlledTransform` on the ESP engine."""

    def __init__(
        self,
        context: WorkerContext,
        *,
        reservation: SequenceReservation | None = None,
        replay_persistence: ReplayPersistence | None = None,
        fast_lane: bool = True,
        hot_path: HotPathSetting = "python",
    ) -> None:
        """`fast_lane=False` sends every packet through the engine's general path (tests compare both).
        `hot_path` (`dataplane.hot_path`): "compiled" runs the batches in the compiled loop
        (`compiled_lane`; HotPathUnavailable without it), "auto" when it imports, "python" never."""
        self.context = context
        core, hot_status = make_esp_batch_core(hot_path)
        self.hot_path_status = hot_status
        self.compiled: CompiledLane | None = CompiledLane(core, hot_status) if hot_status.active == "compiled" else None
        self.fast_lane = fast_lane
        self._seal_lanes: dict[int, SealLane] = {}  # id(OutboundSa) -> its fast lane
        self._open_lanes: dict[int, OpenLane] = {}  # inbound SPI -> the fast lane of its SA
        self.reservation = reservation or SequenceReservation()
        self.replay_persistence = replay_persistence or ReplayPersistence()
        self.spd = Spd()
        self.table = InboundSaTable()
        self.children: dict[str, _OwnedChild] = {}
        self.owners: dict[str, int] = {}  # every Child SA the parent told us about -> its worker
        self.endpoints: dict[int, Endpoint] = {}  # id(OutboundSa) -> outer endpoint
        self.child_of: dict[int, str] = {}  # id(SA) -> Child SA id
        self.drops: Counter[str] = Counter()
        self.removed_drops: Counter[str] = Counter()  # drops of SAs since removed (kept for totals)
        self._tcp_cache: dict[bytes, Decision] = {}
        self._udp_cache: dict[bytes, Decision] = {}
        self._messages: list[dict[str, object]] = []
        self._events: list[DataplaneEvent] = []
        self._timer: float | None = None
        self._acquired: dict[str, float] = {}
        # Identity filters (`set_filter`) by inbound SPI. On the Python lanes a filtered SA takes
        # the engine's general path and each decapsulated packet is checked here; the compiled
        # lane applies the same filter in C (`compiled_lane.CompiledLane.set_filter`).
        self._filters: dict[int, PacketFilter] = {}
        self.filter_denied = 0  # Python lanes; the compiled lane counts in its filter tables
        self._denied_by_spi: Counter[int] = Counter()  # Python lanes, per inbound SPI
        # Headers of packets the Python lanes' filters denied, for the decision log (bounded:
        # a flood adds counts, not memory); drained by the `filter_drops` op.
        self._denied_samples: list[tuple[int, bytes]] = []
        self.wall_clock = time.time  # timed filter parts follow the wall clock

    # -- PacketTransform: outbound ------------------------------------------------------
    def outbound_batch(self, packets: Sequence[bytes], now: float) -> list[Datagram]:
        if self.compiled is not None:
            return self._outbound_compiled(packets, now)
        out: list[Datagram] = []
        append = out.append
        tcp_cache, udp_cache = self._tcp_cache, self._udp_cache
        touched: list[OutboundSa] = []
        last: OutboundSa | None = None
        trailers = TRAILERS
        for packet in packets:
            decision = None
            cache = None
            key = b""
            n = len(packet)
            b0 = packet[0] if n >= 40 else 0  # shorter ones take the general path below
            if b0 == 0x45:
                if not packet[6] & 0x3F and not packet[7]:  # not a fragment
                    proto = packet[9]
                    if proto == 6:
                        cache = tcp_cache
                    elif proto == 17:
                        cache = udp_cache
                    if cache is not None:
                        key = packet[12:24]
                        decision = cache.get(key)
            elif b0 >> 4 == 6:
                proto = packet[6] if n >= 44 else 0
                if proto == 6:
                    cache = tcp_cache
                elif proto == 17:
                    cache = udp_cache
                if cache is not None:
                    key = packet[8:44]
                    decision = cache.get(key)
            if decision is None:
                decision = self._decide(packet, now)
                if cache is not None and decision[0] != _NO_SA:  # no SA yet: look again (ACQUIRE)
                    if len(cache) >= FLOW_CACHE_LIMIT:
                        cache.clear()
                    cache[key] = decision
            sa = decision[1]
            if sa is None:
                self.drops[_REFUSAL_NAMES[decision[0]]] += 1
                continue
            if sa is not last:
                touched.append(sa)
                last = sa
            lane = decision[5]
            if lane is not None and now < sa.time_mark and sa.hard_expired is None and n <= lane.limit:
                # the fast lane: esp_codec.encrypt_esp / seal_esp inlined for AEAD tunnel mode
                if b0 >> 4 == 4:
                    ihl = b0 & 0x0F
                    nh = 4
                    well_formed = ihl >= 5 and ihl * 4 <= (packet[2] << 8 | packet[3]) == n
                else:
                    nh = 41
                    well_formed = b0 >> 4 == 6 and 40 + (packet[4] << 8 | packet[5]) == n
                if well_formed:
                    seq = sa.next_seq
                    if seq < sa.seq_mark:
                        sa.next_seq = seq + 1
                    else:
                        seq = sa.take_sequence()
                        if seq < 0:
                            continue  # counted by the SA (sequence unreserved or exhausted)
                    iv = seq.to_bytes(8, "big")
                    header = lane.spi + seq.to_bytes(4, "big")
                    sealed = lane.encrypt(lane.salt + iv, packet + trailers[(-(n + 2) & 3, nh)], header)
                    append((decision[2], header + iv + sealed))
                    c = sa.counters
                    c.packets += 1
                    c.bytes += n
                    if c.packets >= sa.packet_mark or c.bytes >= sa.byte_mark:
                        sa.on_volume()
                    continue
            esp = encrypt_esp(sa, packet, now)
            if esp is not None:
                append((decision[2], esp))
        for sa in touched:
            self._collect(sa)
        return out

    def _decide(self, packet: bytes, now: float, acquire: bool = True) -> Decision:
        flow = parse_flow(packet)
        if flow is None:
            return (_MALFORMED, None, _NOWHERE, -1, "", None)
        policy = self.spd.match_outbound(flow)
        if policy is None:  # RFC 4301 §5.1: what no entry matches is discarded
            return (_NO_POLICY, None, _NOWHERE, -1, "", None)
        if policy.action == PolicyAction.BYPASS:
            return (_BYPASS, None, _NOWHERE, -1, policy.id, None)
        if policy.action == PolicyAction.DISCARD:
            return (_DISCARD, None, _NOWHERE, -1, policy.id, None)
        owner = self.owners.get(policy.child_sa, -1)
        child = self.children.get(policy.child_sa)
        if child is not None:
            sa = child.outbound
            return (_PROTECT, sa, self.endpoints[id(sa)], owner, policy.id, self._seal_lanes.get(id(sa)))
        if owner >= 0:
            return (_NOT_OWNER, None, _NOWHERE, owner, policy.id, None)
        if acquire and policy.trap:
            last = self._acquired.get(policy.id)
            if last is None or now - last >= ACQUIRE_INTERVAL:
                self._acquired[policy.id] = now
                make = ipaddress.IPv4Address if flow.version == 4 else ipaddress.IPv6Address
                self._events.append(
                    DataplaneEvent(
                        DataplaneEventKind.ACQUIRE,
                        policy=policy.id,
                        reason=f"acquire for {make(flow.src)} -> {make(flow.dst)} proto {flow.protocol}",
                    )
                )
        return (_NO_SA, None, _NOWHERE, -1, policy.id, None)

    # -- PacketTransform: inbound -------------------------------------------------------
    def inbound_batch(self, datagrams: Sequence[Datagram], now: float) -> list[bytes]:
        if self.compiled is not None:
            return self._inbound_compiled(datagrams, now)
        out: list[bytes] = []
        append = out.append
        by_spi = self.table.by_spi
        lanes = self._open_lanes
        table_counters = self.table.counters
        touched: list[InboundSa] = []
        last: InboundSa | None = None
        for endpoint, esp in datagrams:
            n = len(esp)
            if n < 8:
                table_counters.drop(DropReason.MALFORMED)
                continue
            spi = int.from_bytes(esp[0:4], "big")
            sa = by_spi.get(spi)
            if sa is None:
                table_counters.drop(DropReason.UNKNOWN_SPI)
                continue
            if (sa.encap is None) != (endpoint[1] == 0):
                self.drops["encapsulation_mismatch"] += 1
                continue
            if sa is not last:
                touched.append(sa)
                last = sa
            lane = lanes.get(spi)
            if lane is not None and now < sa.time_mark and sa.hard_expired is None and n >= 36 and not n & 3:
                window = sa.replay
                seq = int.from_bytes(esp[4:8], "big")
                if seq > window.top:
                    # the fast lane: esp_codec.decrypt_esp inlined for in-order AEAD tunnel packets
                    c = sa.counters
                    try:
                        plaintext = lane.decrypt(lane.salt + esp[8:16], esp[16:], esp[:8])
                    except InvalidTag:
                        c.drop(DropReason.ICV_FAILURE)
                        continue
                    # ReplayWindow.accept for seq > top, inlined (RFC 6479 ring of 64-bit blocks)
                    if window.size:
                        blocks = window.blocks
                        nblocks = len(blocks)
                        index, top_index = seq >> 6, window.top >> 6
                        if index != top_index:
                            if index - top_index >= nblocks:
                                for i in range(nblocks):
                                    blocks[i] = 0
                            else:
                                for i in range(top_index + 1, index + 1):
                                    blocks[i % nblocks] = 0
                        blocks[index % nblocks] |= 1 << (seq & 63)
                    window.top = seq
                    if seq >= sa.persist_mark:
                        sa.on_replay_top()
                    m = len(plaintext)
                    padlen = plaintext[m - 2]
                    nh = plaintext[m - 1]
                    data_len = m - 2 - padlen
                    if data_len < 0 or (padlen and plaintext[data_len : m - 2] != PADDING[:padlen]):
                        c.drop(DropReason.MALFORMED)
                        continue
                    if nh == 59:
                        c.drop(DropReason.DUMMY)
                        continue
                    version = plaintext[0] >> 4 if data_len else 0
                    if nh == 4 and version == 4 and data_len >= 20:
                        ihl = plaintext[0] & 0x0F
                        length = plaintext[2] << 8 | plaintext[3]
                        if ihl < 5 or not ihl * 4 <= length <= data_len:
                            c.drop(DropReason.MALFORMED)
                            continue
                        if lane.check:
                            src = int.from_bytes(plaintext[12:16], "big")
                            dst = int.from_bytes(plaintext[16:20], "big")
                            remote, local = lane.remote4, lane.local4
                    elif nh == 41 and version == 6 and data_len >= 40:
                        length = 40 + (plaintext[4] << 8 | plaintext[5])
                        if length > data_len:
                            c.drop(DropReason.MALFORMED)
                            continue
                        if lane.check:
                            src = int.from_bytes(plaintext[8:24], "big")
                            dst = int.from_bytes(plaintext[24:40], "big")
                            remote, local = lane.remote6, lane.local6
                    else:
                        c.drop(DropReason.MALFORMED)
                        continue
                    if lane.check:
                        allowed = False
                        for lo, hi in remote:
                            if lo <= src <= hi:
                                for lo2, hi2 in local:
                                    if lo2 <= dst <= hi2:
                                        allowed = True
                                        break
                                break
                        if not allowed:
                            sa.drop_outside_selectors(memoryview(plaintext)[:length])
                            continue
                    c.packets += 1
                    c.bytes += length
                    if c.packets >= sa.packet_mark or c.bytes >= sa.byte_mark:
                        sa.on_volume()
                    append(plaintext[:length])
                    continue
            inner = decrypt_esp(sa, esp, now)
            if inner is not None:
                packet_filter = self._filters.get(spi) if self._filters else None
                if packet_filter is not None and not packet_filter.allows_packet(inner, self.wall_clock()):
                    self.filter_denied += 1
                    self._denied_by_spi[spi] += 1
                    if len(self._denied_samples) < MAX_DENIED_SAMPLES:
                        self._denied_samples.append((spi, bytes(inner[:DENIED_SAMPLE_BYTES])))
                    continue
                append(inner)
        for sa in touched:
            self._collect(sa)
        return out

    # -- the compiled lane: list door, TUN frames, GRO segments --------------------------
    @property
    def batch_native(self) -> bool:
        """True when `seal_frames` / `open_segments` run (the compiled loop is active)."""
        return self.compiled is not None

    def _decision_at(self, buf: bytes | bytearray, base: int, end: int, now: float) -> Decision:
        """The SPD decision for the IP packet at `buf[base:end]`, through the flow cache."""
        n = end - base
        b0 = buf[base] if n >= 40 else 0
        cache: dict[bytes, Decision] | None = None
        key = b""
        if b0 == 0x45:
            if not buf[base + 6] & 0x3F and not buf[base + 7]:  # not a fragment
                proto = buf[base + 9]
                cache = self._tcp_cache if proto == 6 else self._udp_cache if proto == 17 else None
                key = bytes(buf[base + 12 : base + 24])
        elif b0 >> 4 == 6 and n >= 44:
            proto = buf[base + 6]
            cache = self._tcp_cache if proto == 6 else self._udp_cache if proto == 17 else None
            key = bytes(buf[base + 8 : base + 44])
        if cache is not None:
            decision = cache.get(key)
            if decision is not None:
                return decision
        packet = buf if base == 0 and end == len(buf) and isinstance(buf, bytes) else bytes(buf[base:end])
        decision = self._decide(packet, now)
        if cache is not None and decision[0] != _NO_SA:  # no SA yet: look again (ACQUIRE)
            if len(cache) >= FLOW_CACHE_LIMIT:
                cache.clear()
            cache[key] = decision
        return decision

    def _outbound_compiled(self, packets: Sequence[bytes], now: float) -> list[Datagram]:
        lane = self.compiled
        assert lane is not None
        slot_of = lane.slot_of
        which = array("H")
        kept: list[bytes] = []
        engine: list[Datagram] = []
        touched: dict[int, OutboundSa] = {}
        for packet in packets:
            decision = self._decision_at(packet, 0, len(packet), now)
            sa = decision[1]
            if sa is None:
                self.drops[_REFUSAL_NAMES[decision[0]]] += 1
                continue
            touched[id(sa)] = sa
            slot = slot_of.get(id(sa), -1)
            if slot < 0:  # an SA the core does not hold: the engine seals it
                esp = encrypt_esp(sa, bytes(packet), now)
                if esp is not None:
                    engine.append((decision[2], esp))
                continue
            kept.append(packet)
            which.append(slot)
        out: list[Datagram] = []
        if kept:
            sealed = lane.core.encrypt(kept, now, which)
            endpoints = lane.slot_endpoints
            out = [(endpoints[tag], esp) for esp, tag in zip(sealed.to_list(), sealed.tags(), strict=True)]
            lane.count_batch()
        for sa in touched.values():
            self._collect(sa)
        return out + engine if engine else out

    def seal_frames(self, frames: PacketBatch | Sequence[bytes], packets: PacketBatch, now: float) -> SealedFrames:
        """TUN frames (virtio_net_hdr + packet) already split into `packets` (tags: frame index)
        -> ESP payloads. The SPD decides once per frame (every segment of a TSO frame has the
        frame's addresses and ports); the compiled core seals every packet in one call."""
        lane = self.compiled
        assert lane is not None
        slot_of = lane.slot_of
        me = self.context.index
        if not isinstance(frames, PacketBatch):
            frames = PacketBatch.from_packets(frames)
        data = frames.data
        per_frame = array("H", bytes(2 * frames.count))
        uniform = -1  # the one slot every frame uses, -2 when they differ
        aside: dict[int, tuple[int, Decision]] = {}  # frame -> (code, decision): dropped, handed off, engine
        touched: dict[int, OutboundSa] = {}
        for i, (offset, length, _) in enumerate(frames.spans_list()):
            decision = self._decision_at(data, offset + VNET_HDR_LEN, offset + length, now)
            sa = decision[1]
            slot = slot_of.get(id(sa), -1) if sa is not None else -1
            if slot < 0:
                per_frame[i] = SKIP
                aside[i] = (decision[0] if sa is None else _PROTECT, decision)
                uniform = -2
                continue
            assert sa is not None
            touched[id(sa)] = sa
            per_frame[i] = slot
            lane.learn(data, offset, length, slot)  # the pump seals this flow's next frames itself
            if uniform == -1:
                uniform = slot
            elif uniform != slot:
                uniform = -2
        which: array[int] | bytearray | None
        if uniform == 0:
            which = None
        elif uniform > 0:
            which = array("H", (uniform,)) * packets.count
        else:
            which = select_by_tag(packets, per_frame)
        datagrams: list[Datagram] = []
        handoffs: list[tuple[int, bytes]] = []
        if aside:
            for packet, tag in zip(packets, packets.tags(), strict=True):
                entry = aside.get(tag)
                if entry is None:
                    continue
                code, decision = entry
                sa = decision[1]
                if code == _PROTECT and sa is not None:  # an SA the core does not hold
                    touched[id(sa)] = sa
                    sealed_one = encrypt_esp(sa, bytes(packet), now)
                    if sealed_one is not None:
                        datagrams.append((decision[2], sealed_one))
                elif code == _NOT_OWNER and 0 <= decision[3] != me:
                    handoffs.append((decision[3], bytes(packet)))
                else:
                    self.drops[_REFUSAL_NAMES[code]] += 1
        esp = lane.core.encrypt(packets, now, which)
        lane.count_batch()
        for sa in touched.values():
            self._collect(sa)
        return SealedFrames(esp, lane.slot_endpoints, datagrams, handoffs)

    def _inbound_compiled(self, datagrams: Sequence[Datagram], now: float) -> list[bytes]:
        lane = self.compiled
        assert lane is not None
        by_spi = self.table.by_spi
        table_counters = self.table.counters
        kept: list[bytes] = []
        touched: dict[int, InboundSa] = {}
        for endpoint, esp in datagrams:
            if len(esp) < 8:
                table_counters.drop(DropReason.MALFORMED)
                continue
            spi = int.from_bytes(esp[0:4], "big")
            sa = by_spi.get(spi)
            if sa is None:
                table_counters.drop(DropReason.UNKNOWN_SPI)
                continue
            if (sa.encap is None) != (endpoint[1] == 0):
                self.drops["encapsulation_mismatch"] += 1
                continue
            kept.append(esp)
            touched[spi] = sa
        if not kept:
            return []
        inner = lane.core.decrypt(kept, now)
        lane.count_batch()
        for sa in touched.values():
            self._collect(sa)
        return inner.to_list()

    def open_segments(self, batch: PacketBatch, segment: int, nbytes: int, now: float) -> PacketBatch | None:
        """A UDP GRO read (datagrams of `segment` bytes in `batch.data[:nbytes]`) -> inner packets,
        in one call, when `whole_read` takes it; None when not."""
        spi = self.whole_read(batch.data, 0, nbytes, segment)
        if spi < 0:
            return None
        return self.open_reads(batch, (spi,), now)

    def whole_read(self, data: bytearray, at: int, nbytes: int, segment: int) -> int:
        """The SPI of a UDP GRO read at `data[at : at + nbytes]` (datagrams of `segment` bytes) when
        the compiled door can take it whole: every datagram carries the SPI of one UDP-encapsulated
        SA this worker owns. -1 when not (mixed SPIs, IKE or keep-alives, runts, another owner,
        plain-ESP SAs): the caller then takes the datagram-by-datagram door, which decides each
        datagram exactly."""
        lane = self.compiled
        if lane is None or nbytes < 8 or segment < 8:
            return -1
        spi = int.from_bytes(data[at : at + 4], "big")
        if spi not in lane.udp_spis:
            return -1
        context = self.context
        if context.count > 1 and spi % context.count != context.index:
            return -1
        count = -(-nbytes // segment)
        if count > 1:
            end = at + nbytes
            for j in range(at, at + 4):  # every datagram starts with the same SPI (C speed: strided slices)
                if data[j:end:segment] != data[j : j + 1] * count:
                    return -1
        return spi

    def gro_accept(self) -> set[int]:
        """The SPIs whose GRO reads the compiled door takes whole: this worker's UDP-encapsulated
        SAs (`whole_read`'s rule, applied by the compiled receive loop)."""
        return self.compiled.udp_spis if self.compiled is not None else set()

    def pumped_seal(self, slots: Sequence[int]) -> None:
        """After `_espfast.pump_out` sealed a wake-up's packets with these slots: what `seal_frames`
        does after its encrypt call (flow drains, the SAs' events)."""
        lane = self.compiled
        assert lane is not None
        lane.count_batch()
        sas = lane.slot_sas
        for slot in slots:
            self._collect(sas[slot])

    def pumped_open(self, spis: Iterable[int]) -> None:
        """After `_espfast.pump_in` opened whole reads of these SPIs: what `open_reads` does after
        its decrypt call."""
        lane = self.compiled
        assert lane is not None
        lane.count_batch()
        by_spi = self.table.by_spi
        for spi in spis:
            sa = by_spi.get(spi)
            if sa is not None:
                self._collect(sa)

    def open_reads(self, batch: PacketBatch, spis: Sequence[int] | set[int], now: float) -> PacketBatch:
        """Decrypt a batch of whole reads (`whole_read` said yes to each; `spis`: their SPIs) in one call."""
        lane = self.compiled
        assert lane is not None
        inner = lane.core.decrypt(batch, now)
        self.pumped_open(spis)  # the same bookkeeping as after a pump's open
        return inner

    # -- timers, events -----------------------------------------------------------------
    def get_timer(self) -> float | None:
        return self._timer

    def handle_timer(self, now: float) -> list[Datagram]:
        for child in self.children.values():
            for sa in (child.outbound, child.inbound):
                if now >= sa.time_mark:
                    sa.handle_timer(now)
                    self._collect(sa)
        self._recompute_timer()
        return []

    def _recompute_timer(self) -> None:
        marks = [
            m for c in self.children.values() for sa in (c.outbound, c.inbound) if (m := sa.get_timer()) is not None
        ]
        self._timer = min(marks) if marks else None

    def drain_events(self) -> list[DataplaneEvent]:
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def drain_messages(self) -> list[dict[str, object]]:
        if not self._messages:
            return []
        messages, self._messages = self._messages, []
        return messages

    def _collect(self, sa: OutboundSa | InboundSa) -> None:
        event = sa.next_event()
        while event is not None:
            self._translate(sa, event)
            event = sa.next_event()

    def _translate(self, sa: OutboundSa | InboundSa, event: EspEvent) -> None:
        child = self.child_of.get(id(sa), "")
        if isinstance(event, ReserveSequence):
            self._messages.append({"op": "reserve_sequence", "child_sa": child, "spi": event.spi, "upto": event.upto})
        elif isinstance(event, PersistReplayFloor):
            self._messages.append({"op": "persist_replay", "child_sa": child, "spi": event.spi, "upto": event.upto})
        elif isinstance(event, SoftExpire | HardExpire):
            kind = DataplaneEventKind.SOFT_EXPIRE if isinstance(event, SoftExpire) else DataplaneEventKind.HARD_EXPIRE
            direction = "inbound" if event.direction == Direction.IN else "outbound"
            reason = f"{direction} SA {event.spi:#010x}: {event.reason.value} lifetime"
            self._events.append(DataplaneEvent(kind, child_sa=child, spi=event.spi, reason=reason))
        elif isinstance(event, SequenceExhausted):
            self._events.append(
                DataplaneEvent(
                    DataplaneEventKind.SEQUENCE_EXHAUSTED,
                    child_sa=child,
                    spi=event.spi,
                    reason="the outbound SA used its last sequence number",
                )
            )

    def lanes_in_use(self) -> dict[str, int]:
        """How many SAs run on the fast lane (outbound, inbound)."""
        return {k: v for k, v in (("seal", len(self._seal_lanes)), ("open", len(self._open_lanes))) if v}

    # -- sizes and status ---------------------------------------------------------------
    def esp_overhead(self) -> int:
        return AEAD_OVERHEAD

    def inner_mtu(self, path_mtu: int, udp_encap: bool, outer_ipv6: bool) -> int:
        """The TUN's MTU: the largest inner packet an AEAD SA (AES-GCM, ChaCha20-Poly1305: IV 8,
        ICV 16, padding to 4) fits into `path_mtu`; routes of SAs with bigger transforms get less."""
        return inner_mtu(path_mtu, esp_overhead(ENCR_AES_GCM_16_128, None, udp_encap, outer_ipv6))

    def status(self) -> dict[str, object]:
        return {
            "transform": "esp",
            "child_sas_owned": len(self.children),
            "child_sas_known": len(self.owners),
            "policies": len(self.spd.policies()),
            "drops": dict(self.drops),
            "flow_cache": len(self._tcp_cache) + len(self._udp_cache),
            "fast_lane": self.lanes_in_use(),
            "hot_path": self.hot_path_status.as_dict(),
            "compiled": self.compiled.status() if self.compiled is not None else None,
        }

    # -- SaSteering ---------------------------------------------------------------------
    def outbound_worker(self, packet: bytes) -> int:
        """The owner of the SA the SPD picks (-1: unknown, keep it here). Runs before the
        batch reaches `outbound_batch`, so it looks up without raising ACQUIRE."""
        return self._decide(packet, 0.0, acquire=False)[3]

    def inbound_worker(self, spi: int) -> int:
        return spi % self.context.count

    # -- ControlledTransform ------------------------------------------------------------
    def handle_control(self, op: str, message: dict[str, Any], now: float) -> dict[str, object]:
        handler = self._handlers.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        try:
            return handler(self, message, now)
        except (KeyError, TypeError, ValueError) as exc:
            # messages of the engine's ValueErrors name sizes and algorithms, never key bytes
            return {"ok": False, "error": str(exc) if isinstance(exc, ValueError) else f"malformed {op}"}

    def _invalidate(self) -> None:
        self._tcp_cache.clear()
        self._udp_cache.clear()
        if self.compiled is not None:
            self.compiled.forget_flows()

    def _build(
        self, message: dict[str, Any], now: float
    ) -> tuple[InboundSa, OutboundSa, SecurityAssociation, SecurityAssociation]:
        inbound = association_from_document(message["inbound"], "inbound")
        outbound = association_from_document(message["outbound"], "outbound")
        for association in (inbound, outbound):
            if association.protocol != IpProto.ESP or association.mode != Mode.TUNNEL:
                raise ValueError("the userspace datapath carries ESP tunnel mode only")
        created = float(message["created_at"])
        in_sa = InboundSa(
            inbound,
            now,
            created_at=created,
            replay_floor=int(message.get("replay_floor", 0)),
            replay_persistence=self.replay_persistence,
        )
        out_sa = OutboundSa(
            outbound,
            now,
            created_at=created,
            next_seq=int(message.get("next_seq", 1)),
            reserved_upto=int(message.get("reserved_upto", 0)),
            reservation=self.reservation,
        )
        return in_sa, out_sa, inbound, outbound

    def _adopt(
        self,
        child_sa: str,
        in_sa: InboundSa,
        out_sa: OutboundSa,
        in_association: SecurityAssociation,
        out_association: SecurityAssociation,
    ) -> None:
        self.children[child_sa] = _OwnedChild(child_sa, in_sa, out_sa)
        self.owners[child_sa] = self.context.index
        self.table.by_spi[in_sa.spi] = in_sa
        self.spd.bind_outbound(child_sa, out_sa)
        self.child_of[id(in_sa)] = child_sa
        self.child_of[id(out_sa)] = child_sa
        association_dst = str(ipaddress.ip_address(out_sa.dst))
        port = out_sa.encap.dst_port if out_sa.encap is not None else 0
        self.endpoints[id(out_sa)] = (association_dst, port)
        if self.fast_lane:
            seal_lane = seal_lane_for(out_sa)
            if seal_lane is not None:
                self._seal_lanes[id(out_sa)] = seal_lane
            open_lane = open_lane_for(in_sa)
            if open_lane is not None:
                self._open_lanes[in_sa.spi] = open_lane
        if self.compiled is not None:
            self.compiled.install(in_sa, in_association, out_sa, out_association, (association_dst, port))
        if in_sa.spi in self._filters:  # an update keeps the identity's filter
            self._apply_filter(in_sa, self._filters[in_sa.spi])
        self._invalidate()
        # the earliest deadline can only move earlier with a new SA: no scan of every SA per install
        # (an update's replaced SAs may leave it too early, which costs one spurious wake-up)
        marks = [m for sa in (out_sa, in_sa) if (m := sa.get_timer()) is not None]
        if self._timer is not None:
            marks.append(self._timer)
        self._timer = min(marks) if marks else None
        self._collect(out_sa)
        self._collect(in_sa)

    def _forget(self, child: _OwnedChild, keep_totals: bool = True) -> None:
        for sa in (child.inbound, child.outbound):
            self.child_of.pop(id(sa), None)
            if keep_totals:
                for reason, count in sa.counters.drops.items():
                    if count:
                        self.removed_drops[str(reason)] += count
        self.endpoints.pop(id(child.outbound), None)
        self._seal_lanes.pop(id(child.outbound), None)
        if self.compiled is not None:
            self.compiled.remove(child.inbound, child.outbound)
        if self.table.by_spi.get(child.inbound.spi) is child.inbound:
            del self.table.by_spi[child.inbound.spi]
            self._open_lanes.pop(child.inbound.spi, None)

    def _op_install_sa(self, message: dict[str, Any], now: float) -> dict[str, object]:
        child_sa = str(message["child_sa"])
        if int(message["owner"]) != self.context.index:
            return {"ok": False, "error": f"worker {self.context.index} does not own Child SA {child_sa!r}"}
        if child_sa in self.children:
            return {"ok": False, "error": f"Child SA {child_sa!r} is already installed"}
        # The identity's filter, if the SA carries one from its first packet (a reinstall of a live
        # SA after a restart or a takeover: the peer is already sending). Parsed before anything changes.
        texts = message.get("filter")
        packet_filter: PacketFilter | None = None
        if texts is not None:
            if not _selector_texts(texts):
                return {"ok": False, "error": "filter: a list of traffic selector texts, or null"}
            packet_filter = PacketFilter([TrafficSelector.parse(t) for t in texts])
        in_sa, out_sa, in_association, out_association = self._build(message, now)
        if in_sa.spi in self.table.by_spi:
            return {"ok": False, "error": f"inbound SPI {in_sa.spi:#010x} is already installed"}
        self._adopt(child_sa, in_sa, out_sa, in_association, out_association)
        if packet_filter is not None:
            self._apply_filter(in_sa, packet_filter)
        return {"ok": True}

    def _op_update_sa(self, message: dict[str, Any], now: float) -> dict[str, object]:
        child_sa = str(message["child_sa"])
        old = self.children.get(child_sa)
        if old is None:
            return {"ok": False, "error": f"Child SA {child_sa!r} is not installed here"}
        in_sa, out_sa, in_association, out_association = self._build(message, now)
        if in_sa.spi != old.inbound.spi or out_sa.spi != old.outbound.spi:
            return {"ok": False, "error": "an update keeps both SPIs (a new SPI is a new Child SA)"}
        # The same SA with new parameters: it keeps its counters, sequence numbers and window.
        out_sa.next_seq = old.outbound.next_seq
        out_sa.reserved_upto = max(out_sa.reserved_upto, old.outbound.reserved_upto)
        out_sa.requested_upto = max(out_sa.requested_upto, old.outbound.requested_upto)
        out_sa.counters = old.outbound.counters
        out_sa.events()  # its constructor's requests are about the fresh state we just replaced
        out_sa.grant_sequence(out_sa.reserved_upto)  # re-derive the marks from the adopted state
        old_window = old.inbound.replay
        if in_sa.replay.size == old_window.size and in_sa.esn == old_window.esn:
            in_sa.replay = old_window
        else:
            in_sa.replay = ReplayWindow(in_sa.replay.size, in_sa.esn, old_window.top)
        in_sa.counters = old.inbound.counters
        in_sa.events()
        in_sa.persist_mark = old.inbound.persist_mark
        self._forget(old, keep_totals=False)  # the counters live on in the new SAs
        del self.children[child_sa]
        self._adopt(child_sa, in_sa, out_sa, in_association, out_association)
        return {"ok": True}

    def _op_sa_owner(self, message: dict[str, Any], now: float) -> dict[str, object]:
        child_sa = str(message["child_sa"])
        owner = int(message["owner"])
        if not 0 <= owner < self.context.count:
            return {"ok": False, "error": f"no worker {owner}"}
        if child_sa in self.children and owner != self.context.index:
            return {"ok": False, "error": f"Child SA {child_sa!r} is installed here"}
        self.owners[child_sa] = owner
        self._invalidate()
        return {"ok": True}

    def _apply_filter(self, in_sa: InboundSa, packet_filter: PacketFilter | None) -> None:
        """The SA's identity filter (None: none): kept by its SPI, so that an update keeps it,
        and handed to the lane that opens the SA's packets."""
        if packet_filter is None:
            self._filters.pop(in_sa.spi, None)
        else:
            self._filters[in_sa.spi] = packet_filter
        if self.compiled is not None:
            self.compiled.set_filter(in_sa, packet_filter)
        elif packet_filter is not None:
            self._open_lanes.pop(in_sa.spi, None)  # the general path checks the filter
        elif self.fast_lane:
            open_lane = open_lane_for(in_sa)
            if open_lane is not None:
                self._open_lanes[in_sa.spi] = open_lane

    def _op_set_filter(self, message: dict[str, Any], now: float) -> dict[str, object]:
        """The identity's packet filter for a Child SA's inbound packets: {"child_sa", "selectors":
        [traffic selector text, ...] (what may pass after decapsulation) or null (no filter)}."""
        child_sa = str(message["child_sa"])
        child = self.children.get(child_sa)
        if child is None:
            return {"ok": False, "error": f"Child SA {child_sa!r} is not installed here"}
        texts = message.get("selectors")
        packet_filter: PacketFilter | None = None
        if texts is not None:
            if not _selector_texts(texts):
                return {"ok": False, "error": "selectors: a list of traffic selector texts, or null"}
            packet_filter = PacketFilter([TrafficSelector.parse(t) for t in texts])
        self._apply_filter(child.inbound, packet_filter)
        return {"ok": True}

    def _op_set_filters(self, message: dict[str, Any], now: float) -> dict[str, object]:
        """`set_filter` for many Child SAs: {"filters": [{"child_sa", "selectors"}, ...]}; SAs that
        share a selector list share one parsed filter. Replies the per-SA errors (others applied)."""
        filters = message.get("filters")
        if not isinstance(filters, list):
            return {"ok": False, "error": "filters: a list of {child_sa, selectors}"}
        built: dict[tuple[str, ...], PacketFilter] = {}
        errors: dict[str, str] = {}
        for item in filters:
            child_sa = str(item.get("child_sa", "")) if isinstance(item, dict) else ""
            child = self.children.get(child_sa)
            if child is None:
                errors[child_sa] = f"Child SA {child_sa!r} is not installed here"
                continue
            texts = item.get("selectors")
            packet_filter: PacketFilter | None = None
            if texts is not None:
                if not _selector_texts(texts):
                    errors[child_sa] = "selectors: a list of traffic selector texts, or null"
                    continue
                key = tuple(texts)
                if key not in built:
                    try:
                        built[key] = PacketFilter([TrafficSelector.parse(t) for t in texts])
                    except ValueError as exc:
                        errors[child_sa] = f"selectors: {exc}"
                        continue
                packet_filter = built[key]
            self._apply_filter(child.inbound, packet_filter)
        return {"ok": True, "errors": errors}

    def _op_filter_drops(self, message: dict[str, Any], now: float) -> dict[str, object]:
        """Packets the identity filters denied and packets outside the SA's selectors: per Child SA
        (cumulative, SAs installed here), the headers of up to `MAX_DENIED_SAMPLES` packets
        denied since the last call (Python lanes; the compiled lane keeps the last one per SA),
        and of the last packet per SA dropped outside its selectors since the last call
        (`outside_samples`; the Python engine keeps it on the SA, the compiled loop on the
        identity filter of an SA that has one)."""
        denied: dict[str, int] = {}
        outside: dict[str, int] = {}
        outside_samples: list[list[str]] = []
        compiled_filters = self.compiled.filters if self.compiled is not None else {}
        by_spi: dict[int, str] = {}
        for child in self.children.values():
            inbound = child.inbound
            spi = inbound.spi
            by_spi[spi] = child.id
            mismatch = inbound.counters.drops.get(DropReason.POLICY_MISMATCH, 0)
            if mismatch:
                outside[child.id] = mismatch
            count = self._denied_by_spi.get(spi, 0)
            outside_head, inbound.last_outside = inbound.last_outside, None
            identity = compiled_filters.get(spi)
            if identity is not None:
                count += identity.denied
                head = identity.counts.take_denied()
                if head is not None:  # the compiled lane keeps the last denied packet per SA
                    self._denied_samples.append((spi, bytes(head)))
                compiled_head = identity.counts.take_outside()
                if compiled_head is not None:
                    outside_head = compiled_head
            if count:
                denied[child.id] = count
            if outside_head is not None and mismatch:
                outside_samples.append([child.id, bytes(outside_head).hex()])
        samples = [[by_spi[spi], header.hex()] for spi, header in self._denied_samples if spi in by_spi]
        self._denied_samples = []
        return {
            "ok": True,
            "denied": denied,
            "outside_selectors": outside,
            "samples": samples,
            "outside_samples": outside_samples,
        }

    def _op_remove_sa(self, message: dict[str, Any], now: float) -> dict[str, object]:
        child_sa = str(message["child_sa"])
        child = self.children.pop(child_sa, None)
        if child is not None:
            self._filters.pop(child.inbound.spi, None)
            self._denied_by_spi.pop(child.inbound.spi, None)
            self._forget(child)
            self.spd.unbind_outbound(child_sa)
            self._recompute_timer()
        known = self.owners.pop(child_sa, None) is not None
        self._invalidate()
        # the last number the inbound SA accepted: a graceful hand-over gives it to the next owner
        top = child.inbound.replay.top if child is not None else None
        return {"ok": True, "removed": child is not None or known, "replay_top": top}

    def _op_install_policy(self, message: dict[str, Any], now: float) -> dict[str, object]:
        policy = policy_from_document(message["policy"])
        self.spd.add_policy(policy)
        self._acquired.pop(policy.id, None)
        self._invalidate()
        return {"ok": True}

    def _op_remove_policy(self, message: dict[str, Any], now: float) -> dict[str, object]:
        removed = self.spd.remove_policy(str(message["policy_id"]))
        self._invalidate()
        return {"ok": True, "removed": removed is not None}

    def _op_grant_sequence(self, message: dict[str, Any], now: float) -> dict[str, object]:
        spi, upto = int(message["spi"]), int(message["upto"])
        granted = False
        for child in self.children.values():
            sa = child.outbound
            if sa.spi == spi:
                sa.grant_sequence(upto)
                self._collect(sa)
                granted = True
        return {"ok": True, "granted": granted}

    def _op_counters(self, message: dict[str, Any], now: float) -> dict[str, object]:
        sas: list[dict[str, object]] = []
        drops: Counter[str] = Counter(self.drops)
        drops.update(self.removed_drops)
        denied = self.filter_denied + (self.compiled.filter_denied() if self.compiled is not None else 0)
        if denied:
            drops["identity_filter"] += denied
        table_drops: list[TrafficCounters] = [self.table.counters]
        if self.compiled is not None:
            table_drops.append(self.compiled.core.table_counters)
        for table_counters in table_drops:
            for reason, count in table_counters.drops.items():
                if count:
                    drops[str(reason)] += count
        for child in self.children.values():
            for direction, sa in (("in", child.inbound), ("out", child.outbound)):
                c = sa.counters
                top = sa.replay.top if isinstance(sa, InboundSa) else sa.next_seq - 1
                sas.append(
                    {
                        "child_sa": child.id,
                        "spi": sa.spi,
                        "direction": direction,
                        "packets": c.packets,
                        "bytes": c.bytes,
                        "top": top,
                        "drops": c.nonzero_drops(),
                    }
                )
                for reason, count in c.drops.items():
                    if count:
                        drops[str(reason)] += count
        return {"ok": True, "sas": sas, "drops": dict(drops)}

    _handlers: dict[str, Callable[[EspTransform, dict[str, Any], float], dict[str, object]]] = {
        "install_sa": _op_install_sa,
        "update_sa": _op_update_sa,
        "sa_owner": _op_sa_owner,
        "remove_sa": _op_remove_sa,
        "install_policy": _op_install_policy,
        "remove_policy": _op_remove_policy,
        "grant_sequence": _op_grant_sequence,
        "counters": _op_counters,
        "set_filter": _op_set_filter,
        "filter_drops": _op_filter_drops,
        "set_filters": _op_set_filters,
    }


def make_esp_transform(
    context: WorkerContext,
    *,
    sequence_block: int = 1 << 20,
    replay_block: int = 1 << 16,
    hot_path: HotPathSetting = "python",
) -> EspTransform:
    """The factory the datapath calls in every worker."""
    return EspTransform(
        context,
        reservation=SequenceReservation(block=sequence_block, low_water=max(1, sequence_block // 4)),
        replay_persistence=ReplayPersistence(block=replay_block),
        hot_path=hot_path,
    )


def _selector_texts(value: object) -> bool:
    """Is `value` a list of traffic selector texts (what a filter message carries)?"""
    return isinstance(value, list) and all(isinstance(t, str) for t in value)
