"""Batch-native handlers between the rooms: `PacketBatch`es instead of a Python object per packet.

Used by `loop.DatapathLoop` when the crypto room runs the compiled loop (`dataplane.hot_path`
compiled or auto, see `compiled_lane`), the TUN has a vnet header and no `MtuGuard` is needed
(the TUN MTU is the inner MTU). Per wake-up, whatever the number of packets::

    outbound: read_frames (C: TUN reads of TSO/USO super-packets, partial checksums)
              -> split_frames (C: segments, IPv4 IDs, lengths, checksums)
              -> clamp_mss (C, in place) -> EspTransform.seal_frames: SPD once per frame
              (flow cache), steering, then one compiled encrypt call for every packet
              -> send_runs (C: one sendmsg(UDP_SEGMENT) per GSO run: contiguous,
              equal-sized payloads of one SA)
    inbound:  recv_gro (C: up to 8 UDP GRO reads into one buffer; reads of one owned SPI
              become spans) -> EspTransform.open_reads: one compiled decrypt call (replay,
              ICV, selectors, identity filter, flow accounting) -> clamp_mss (C)
              -> coalesce_frames (C: GRO-style TCP/UDP merge, vnet GSO headers)
              -> write_frames (C: one write per merged frame)

With UDP encapsulation each direction is one compiled call per wake-up (`_espfast.pump_out`,
`_espfast.pump_in`: the same chain of C steps run from C, no Python between them). The
outbound pump seals only when every frame's flow is in the lane's flow -> slot cache, which
the SPD lookup of `seal_frames` teaches; a wake-up with a frame it does not know continues
here after the clamp, on the path above.

What the compiled door cannot take whole (a GRO batch that mixes SPIs, carries IKE or
keep-alives or runts, belongs to another worker, or an SA without UDP encapsulation) takes
the datagram-by-datagram door of the same transform, which decides each packet exactly as
before: classification by the UDP room, hand-off by SPI, decryption (still compiled).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from esplanade.dataplane.fastpath import CompiledEspBatch, PacketBatch
from esplanade.dataplane.fastpath.tun_frames import clamp_mss, coalesce_frames, split_frames
from esplanade.dataplane.userspace.outer_transport import Datagram, Endpoint
from esplanade.dataplane.userspace.udp_socket import GRO_READ_MAX, EspUdpSocket, OddRead

if TYPE_CHECKING:
    from esplanade.dataplane.userspace.esp_transform import EspTransform
    from esplanade.dataplane.userspace.loop import DatapathLoop

log = logging.getLogger(__name__)

READS_PER_WAKEUP = 8  # GRO reads per handler call, decrypted together; then the other rooms get a turn


class BatchRooms:
    def __init__(self, loop: DatapathLoop, transform: EspTransform, udp: EspUdpSocket | None) -> None:
        self.loop = loop
        self.transform = transform
        self.udp = udp
        parts = loop.parts
        clamp = parts.mss_clamp
        self.mss = (clamp.mss_v4, clamp.mss_v6) if clamp is not None else None
        self.merge_udp = loop.merge_udp
        # GRO batches: a few reads of up to 64 KiB each; without GRO: many single datagrams
        self.max_reads = READS_PER_WAKEUP if udp is not None and udp.gro else parts.batch
        self.buf = bytearray()  # grown once by the compiled receive loop, then reused
        self.spans = bytearray()
        lane = transform.compiled
        core = lane.core if lane is not None else None
        # the pumps: UDP encapsulation, the compiled core and its flow -> slot cache
        self.pumped = (
            udp is not None
            and lane is not None
            and lane.flow_slots is not None
            and isinstance(core, CompiledEspBatch)
            and hasattr(core.module, "pump_out")
        )
        # the pumps' buffers, reused from wake-up to wake-up (valid until the next call)
        self.frames, self.frame_spans = bytearray(), bytearray()
        self.packets, self.packet_spans = bytearray(), bytearray()
        self.esp, self.esp_spans = bytearray(), bytearray()
        self.inner, self.inner_spans = bytearray(), bytearray()
        self.tun_frames, self.tun_spans = bytearray(), bytearray()

    def description(self) -> str:
        if self.pumped:
            return (
                "pump_out (TUN -> split -> seal -> GSO, one C call); pump_in (GRO -> open -> merge -> TUN, one C call)"
            )
        inbound = "GRO reads -> compiled decrypt -> C merge" if self.udp is not None else "datagram door"
        return f"TUN frames -> C split -> compiled encrypt -> GSO runs; {inbound}"

    def _mss_args(self) -> tuple[int, int]:
        mss = self.mss
        return mss if mss is not None and self.loop.parts.mss_clamp is not None else (-1, -1)

    # -- outbound -------------------------------------------------------------------------
    def tun_to_outer(self) -> bool:
        if self.pumped:
            return self._pump_out()
        loop = self.loop
        p, c = loop.parts, loop.counters
        frames = p.tun.read_frames(p.batch)
        if not frames.count:
            return False
        c.tun_batches += 1
        now = p.clock()
        packets, dropped = split_frames(frames)
        if dropped:
            c.errors["tun_frame_malformed"] += dropped
        data = frames.data  # frames with a GSO type or a partial checksum (vnet header flags)
        c.super_frames_split += sum(1 for at, n, _ in frames.spans_list() if n > 1 and (data[at] or data[at + 1]))
        if packets.count:
            self._clamp(packets)
            self._seal_and_send(frames, packets, now)
        return frames.count >= p.batch

    def _seal_and_send(self, frames: PacketBatch, packets: PacketBatch, now: float) -> None:
        loop = self.loop
        p, c = loop.parts, loop.counters
        try:
            sealed = self.transform.seal_frames(frames, packets, now)
        except Exception:  # a transform bug must not take the worker down
            c.errors["transform_errors"] += 1
            loop.log_exception("seal_frames failed; %d packets lost", packets.count)
            return
        c.packets_out += packets.count
        mailbox = p.mailbox
        for owner, packet in sealed.handoffs:
            if mailbox is not None:
                mailbox.send_outbound(owner, packet)
                c.handed_off_out += 1
        c.datagrams_out += self.send_esp(sealed.esp, sealed.endpoints)
        if sealed.datagrams:
            loop.send(sealed.datagrams)

    def _pump_out(self) -> bool:
        """tun_to_outer in one compiled call when every frame's flow is known."""
        loop = self.loop
        p, c = loop.parts, loop.counters
        udp, lane = self.udp, self.transform.compiled
        assert udp is not None and lane is not None
        core = lane.core
        assert isinstance(core, CompiledEspBatch)
        tun = p.tun
        now = p.clock()
        mss4, mss6 = self._mss_args()
        endpoints = lane.slot_endpoints
        try:
            nframes, read_err, npackets, dropped, super_frames, clamped, sealed, used, sent, sends, aside = (
                core.module.pump_out(
                    tun.fd, self.frames, self.frame_spans, p.batch, tun.read_size, lane.flow_slots,
                    self.packets, self.packet_spans, mss4, mss6, core.slot_tuple, now, core.flows,
                    self.esp, self.esp_spans, udp.fileno(), udp.destinations(endpoints), udp.gso,
                    udp.max_segments, udp.max_gso_bytes,
                )
            )  # fmt: skip
        except Exception:  # a transform bug must not take the worker down
            c.errors["transform_errors"] += 1
            loop.log_exception("pump_out failed; its frames are lost")
            return False
        tun.count_reads(nframes, read_err)
        more = int(nframes) >= p.batch
        if not nframes:
            return False
        c.tun_batches += 1
        if dropped:
            c.errors["tun_frame_malformed"] += dropped
        c.super_frames_split += super_frames
        if clamped and p.mss_clamp is not None:
            p.mss_clamp.clamped += clamped
        if sealed < 0:  # a flow the cache does not know: the SPD decides per frame (and teaches it)
            if npackets:
                frames = PacketBatch(self.frames, self.frame_spans, nframes)
                self._seal_and_send(frames, PacketBatch(self.packets, self.packet_spans, npackets), now)
            return more
        if npackets:
            c.packets_out += npackets
            self.transform.pumped_seal(used)
            delivered, plain = udp.settle_runs(self.esp, sent, sends, aside, endpoints)
            c.datagrams_out += delivered
            if plain:
                loop.send(plain)  # counted by the loop
        return more

    def _clamp(self, packets: PacketBatch) -> None:
        mss = self.mss
        clamp = self.loop.parts.mss_clamp
        if mss is not None and clamp is not None:
            clamp.clamped += clamp_mss(packets, mss[0], mss[1])

    def send_esp(self, esp: PacketBatch, endpoints: list[Endpoint]) -> int:
        """One send per GSO run (contiguous ESP payloads of one SA, equal-sized but a shorter last
        one), all in one compiled call; plain-ESP runs go to the raw room."""
        if not esp.count:
            return 0
        udp = self.udp
        if udp is None:
            plain = [(endpoints[tag], bytes(payload)) for payload, tag in zip(esp, esp.tags(), strict=True)]
            self.loop.send(plain)  # counted by the loop
            return 0
        sent, plain = udp.send_payloads(esp.data, esp.spans, esp.count, endpoints)
        if plain:
            self.loop.send(plain)  # counted by the loop
        return sent

    # -- inbound --------------------------------------------------------------------------
    def udp_to_tun(self) -> bool:
        """Up to READS_PER_WAKEUP UDP (GRO) reads in one compiled call, the ones the compiled door
        takes whole decrypted in one call, merged and written; the others datagram by datagram."""
        udp = self.udp
        assert udp is not None
        loop = self.loop
        p, c = loop.parts, loop.counters
        transform = self.transform
        buf = self.buf
        now = p.clock()
        if self.pumped:
            count, reads, spis, odd = self._pump_in(udp, now)
        else:
            count, reads, spis, odd = udp.recv_gro(buf, self.spans, self.max_reads, transform.gro_accept())
        c.outer_batches += reads
        if count and not self.pumped:
            batch = PacketBatch(buf, self.spans, count)
            try:
                inner = transform.open_reads(batch, spis, now)
            except Exception:
                c.errors["transform_errors"] += 1
                loop.log_exception("open_reads failed; %d datagrams lost", count)
            else:
                c.datagrams_in += count
                self.write_inner(inner)
        for at, nbytes, segment, endpoint, pktinfo in odd:  # the datagram-by-datagram door
            datagrams: list[Datagram] = []
            local_address = udp.local_address(pktinfo)
            for offset in range(at, at + nbytes, segment):
                payload = bytes(buf[offset : min(offset + segment, at + nbytes)])
                udp.classify(endpoint, payload, datagrams, local_address)
            if loop.steer:
                datagrams = loop.steer_inbound(datagrams)
            loop.decrypt_and_write(datagrams, now)
        if odd:
            loop.forward_ike(udp)
        return reads >= self.max_reads

    def _pump_in(self, udp: EspUdpSocket, now: float) -> tuple[int, int, list[int], list[OddRead]]:
        """recv_gro, then the whole reads opened, clamped, merged and written, in one compiled call."""
        loop = self.loop
        p, c = loop.parts, loop.counters
        lane = self.transform.compiled
        assert lane is not None
        core = lane.core
        assert isinstance(core, CompiledEspBatch)
        mss4, mss6 = self._mss_args()
        count, reads, spis, odd, errnos, failure, ninner, clamped, written, write_errnos = core.module.pump_in(
            udp.fileno(), self.buf, self.spans, self.max_reads, GRO_READ_MAX, self.transform.gro_accept(),
            core.inbound_table, now, core.flows, self.inner, self.inner_spans, mss4, mss6, self.merge_udp,
            self.tun_frames, self.tun_spans, p.tun.fd,
        )  # fmt: skip
        udp.count_reads(count, reads, errnos)
        if count:
            if failure is not None:
                c.errors["transform_errors"] += 1
                log.error("pump_in failed; %d datagrams lost", count, exc_info=failure)
            else:
                c.datagrams_in += count
                self.transform.pumped_open(spis)
                if ninner:
                    c.packets_in += ninner
                    if clamped and p.mss_clamp is not None:
                        p.mss_clamp.clamped += clamped
                    c.tun_frames_written += p.tun.count_writes(written, write_errnos)
        return count, reads, spis, odd

    def write_inner(self, inner: PacketBatch) -> None:
        if not inner.count:
            return
        loop = self.loop
        c = loop.counters
        c.packets_in += inner.count
        self._clamp(inner)
        frames = coalesce_frames(inner, self.merge_udp)
        c.tun_frames_written += loop.parts.tun.write_frames(frames)

    def write_packets(self, packets: list[bytes]) -> None:
        """Inner packets from the datagram-by-datagram door, merged in C."""
        if packets:
            frames = coalesce_frames(packets, self.merge_udp)
            self.loop.counters.tun_frames_written += self.loop.parts.tun.write_frames(frames)
