"""One worker's epoll drain loop: TUN -> transform -> outer socket, and back.

The loop is level-triggered epoll over a handful of descriptors (TUN queue, outer socket,
hand-off mailbox, control channel). A ready descriptor is drained in batches of `batch`;
when a batch comes back full the next epoll_wait does not sleep, so the loop keeps draining
until every queue is empty while both directions take turns. Measured on this kind of
machine, this plain loop is as fast as asyncio, uvloop or a thread per direction.

Outbound pipeline, per batch::

    TUN frames -> strip virtio_net_hdr (split super-packets only when TUN offloads are on)
    -> MtuGuard (only when the TUN MTU exceeds the inner MTU; ICMP errors go out)
    -> MssClamp -> steering (several workers: packets of SAs owned elsewhere are handed off)
    -> transform.outbound_batch -> outer.send_batch (UDP GSO groups)

Inbound pipeline::

    outer.recv_batch (UDP GRO split) -> steering by SPI -> transform.inbound_batch
    -> MssClamp -> coalesce_for_tun (merged GSO frames) -> TUN writes

No exception escapes a batch: the rooms count their own drops; an exception out of the
transform (a bug there) loses that batch, is counted under `transform_errors`, and the loop
goes on.

Control channel (SOCK_SEQPACKET to the parent, JSON): {"op": "status"} is answered with the
worker's counters, {"op": "stop"} ends the loop, {"op": "send_ike", ...} sends an IKE message
from the UDP/4500 socket (non-ESP marker added; answered only when it carries an "id", else a
failure is counted under `ike_send_failed`). Any other op goes to the transform when it
implements `ControlledTransform` (SAs, policies, sequence grants); its answer comes back as
{"op": "reply", "id": <the request's id>, "ok": ...}. Replies echo the request's "id".
Pushed unasked: transform events as {"op": "events", ...}, the transform's own upward
messages (`drain_messages`: sequence reservations, replay floors) and IKE datagrams that
arrived on 4500 as {"op": "ike", ...}.

With `raw_outer` the worker carries plain ESP (IP protocol 50) next to ESP-in-UDP: datagrams
whose endpoint port is 0 leave through the raw socket, the others through `outer`.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from esplanade.dataplane.fastpath.hot_path import load_compiled
from esplanade.dataplane.fastpath.tun_frames import split_frames
from esplanade.dataplane.userspace.batch_rooms import BatchRooms
from esplanade.dataplane.userspace.handoff import Mailbox
from esplanade.dataplane.userspace.mtu import IcmpErrorSender, MssClamp, MtuGuard
from esplanade.dataplane.userspace.offloads import DatapathFeatures
from esplanade.dataplane.userspace.outer_transport import Datagram, IkeArrival, OuterTransport
from esplanade.dataplane.userspace.segmentation import SegmentationError, coalesce_for_tun, split_super_packet
from esplanade.dataplane.userspace.transform import ControlledTransform, PacketTransform, SaSteering
from esplanade.dataplane.userspace.tun import TunQueue
from esplanade.dataplane.userspace.udp_socket import EspUdpSocket
from esplanade.dataplane.userspace.vnet_header import VNET_HDR_LEN, VnetHeader, VnetHeaderError

log = logging.getLogger(__name__)

_BROKEN = select.EPOLLERR | select.EPOLLHUP


class DatapathBroken(RuntimeError):
    """A room's descriptor failed for good (e.g. the TUN device was deleted under us)."""


DEFAULT_BATCH = 64
IDLE_WAKEUP = 1.0  # longest epoll sleep; timers are honoured sooner
CONTROL_MESSAGE_MAX = 1 << 20  # replies (status) can be large; the parent reads with this size
CONTROL_REQUEST_MAX = 1 << 16  # requests are small: no 1 MiB allocation on every status poll
CONTROL_BACKLOG = 100_000  # messages to the parent kept while its socket buffer is full


@dataclass(slots=True)
class LoopParts:
    """Everything one worker's loop drives."""

    index: int
    count: int
    tun: TunQueue
    outer: OuterTransport
    transform: PacketTransform
    features: DatapathFeatures
    steering: SaSteering | None = None
    mailbox: Mailbox | None = None
    control: socket.socket | None = None
    mtu_guard: MtuGuard | None = None
    mss_clamp: MssClamp | None = None
    icmp: IcmpErrorSender | None = None
    ike_sink: Callable[[list[IkeArrival]], None] | None = None
    raw_outer: OuterTransport | None = None  # plain ESP next to `outer` (UDP); endpoints with port 0
    forward_ike: bool = False  # IKE from 4500 goes to the parent over the control channel
    batch: int = DEFAULT_BATCH
    clock: Callable[[], float] = time.monotonic


@dataclass(slots=True)
class LoopCounters:
    wakeups: int = 0
    tun_batches: int = 0
    outer_batches: int = 0
    packets_out: int = 0  # inner packets handed to the transform
    datagrams_out: int = 0  # ESP packets handed to the outer socket
    datagrams_in: int = 0  # ESP packets handed to the transform
    packets_in: int = 0  # inner packets written toward the TUN
    tun_frames_written: int = 0
    handed_off_out: int = 0
    handed_off_in: int = 0
    super_frames_split: int = 0  # TUN offloads on: super-packets or partial checksums finished here
    ike_forwarded: int = 0  # IKE messages from 4500 handed to the parent
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "wakeups": self.wakeups,
            "tun_batches": self.tun_batches,
            "outer_batches": self.outer_batches,
            "packets_out": self.packets_out,
            "datagrams_out": self.datagrams_out,
            "datagrams_in": self.datagrams_in,
            "packets_in": self.packets_in,
            "tun_frames_written": self.tun_frames_written,
            "handed_off_out": self.handed_off_out,
            "handed_off_in": self.handed_off_in,
            "super_frames_split": self.super_frames_split,
            "ike_forwarded": self.ike_forwarded,
            "errors": dict(self.errors),
        }


class DatapathLoop:
    def __init__(self, parts: LoopParts) -> None:
        self.parts = parts
        self.counters = LoopCounters()
        self.running = False
        f = parts.features
        self._vnet = f.vnet_hdr
        self._plain_reads = f.vnet_hdr and not int(f.tun_offload)
        self._merge = f.vnet_hdr and f.merge_tcp
        self._merge_udp = f.vnet_hdr and f.merge_udp
        self._steer = parts.count > 1 and parts.mailbox is not None
        self._steering = parts.steering
        self._error_streak: dict[int, int] = {}
        self._controlled = parts.transform if isinstance(parts.transform, ControlledTransform) else None
        self._control_backlog: deque[bytes] = deque()
        self.merge_udp = self._merge_udp
        self.steer = self._steer
        # TSO/USO super-packets are split in C whenever the compiled module is there
        self._c_split = bool(int(f.tun_offload)) and load_compiled()[0] is not None
        self.rooms: BatchRooms | None = None
        if getattr(parts.transform, "batch_native", False) and f.vnet_hdr and parts.mtu_guard is None:
            udp = parts.outer if isinstance(parts.outer, EspUdpSocket) else None
            self.rooms = BatchRooms(self, parts.transform, udp)  # type: ignore[arg-type]

    def log_exception(self, message: str, *args: object) -> None:
        log.exception(message, *args)

    # -- outbound -------------------------------------------------------------------------
    def _inner_packets(self, frames: list[bytes]) -> list[bytes]:
        if not self._vnet:
            return frames
        if self._c_split:
            batch, dropped = split_frames(frames)
            if dropped:
                self.counters.errors["tun_frame_malformed"] += dropped
            self.counters.super_frames_split += sum(1 for f in frames if f[0] or f[1])
            return batch.to_list()
        packets: list[bytes] = []
        for frame in frames:
            if self._plain_reads and not frame[0] and not frame[1]:
                packets.append(frame[VNET_HDR_LEN:])
                continue
            try:
                header = VnetHeader.unpack(frame)
                if not header.is_gso and not header.needs_csum:
                    packets.append(frame[VNET_HDR_LEN:])
                else:
                    packets.extend(split_super_packet(header, frame[VNET_HDR_LEN:]))
                    self.counters.super_frames_split += 1
            except (VnetHeaderError, SegmentationError):
                self.counters.errors["tun_frame_malformed"] += 1
        return packets

    def tun_to_outer(self) -> bool:
        """Drain one batch from the TUN; True when the batch was full (more may be waiting)."""
        p = self.parts
        frames = p.tun.read_batch(p.batch)
        if not frames:
            return False
        self.counters.tun_batches += 1
        now = p.clock()
        packets = self._inner_packets(frames)
        if p.mtu_guard is not None:
            packets, errors = p.mtu_guard.enforce(packets, now)
            if errors and p.icmp is not None:
                for error in errors:
                    p.icmp.send(error.v6, error.destination, error.message)
        if p.mss_clamp is not None:
            packets = p.mss_clamp.apply(packets)
        if self._steer:
            packets = self._steer_outbound(packets)
        self._encrypt_and_send(packets, now)
        return len(frames) >= p.batch

    def _steer_outbound(self, packets: list[bytes]) -> list[bytes]:
        steering, mailbox = self._steering, self.parts.mailbox
        if steering is None or mailbox is None:
            return packets
        me = self.parts.index
        local: list[bytes] = []
        for packet in packets:
            owner = steering.outbound_worker(packet)
            if owner < 0 or owner == me:
                local.append(packet)
            else:
                mailbox.send_outbound(owner, packet)
                self.counters.handed_off_out += 1
        return local

    def _encrypt_and_send(self, packets: list[bytes], now: float) -> None:
        if not packets:
            return
        p = self.parts
        try:
            datagrams = p.transform.outbound_batch(packets, now)
        except Exception:  # a transform bug must not take the worker down
            self.counters.errors["transform_errors"] += 1
            log.exception("outbound_batch failed; %d packets lost", len(packets))
            return
        self.counters.packets_out += len(packets)
        if datagrams:
            self._send(datagrams)

    def send(self, datagrams: list[Datagram]) -> None:
        self._send(datagrams)

    def _send(self, datagrams: list[Datagram]) -> None:
        p = self.parts
        raw = p.raw_outer
        if raw is None:
            self.counters.datagrams_out += p.outer.send_batch(datagrams)
            return
        udp = [d for d in datagrams if d[0][1]]
        if len(udp) != len(datagrams):
            self.counters.datagrams_out += raw.send_batch([d for d in datagrams if not d[0][1]])
        if udp:
            self.counters.datagrams_out += p.outer.send_batch(udp)

    # -- inbound --------------------------------------------------------------------------
    def outer_to_tun(self) -> bool:
        return self._receive(self.parts.outer)

    def raw_to_tun(self) -> bool:
        raw = self.parts.raw_outer
        return raw is not None and self._receive(raw)

    def _receive(self, outer: OuterTransport) -> bool:
        p = self.parts
        datagrams = outer.recv_batch(p.batch)
        self.forward_ike(outer)
        if not datagrams:
            return False
        self.counters.outer_batches += 1
        if self._steer:
            datagrams = self._steer_inbound(datagrams)
        self._decrypt_and_write(datagrams, p.clock())
        return len(datagrams) >= p.batch

    def forward_ike(self, outer: OuterTransport) -> None:
        """IKE that arrived on `outer` goes to the sink or the parent."""
        p = self.parts
        take_arrivals = getattr(outer, "take_ike_arrivals", None)
        ike: list[IkeArrival] = (
            take_arrivals() if take_arrivals is not None else [IkeArrival(r, m, "", 0) for r, m in outer.take_ike()]
        )
        if ike:
            if p.ike_sink is not None:
                p.ike_sink(ike)
            elif p.forward_ike and p.control is not None:
                for arrival in ike:
                    self._control_send(
                        {
                            "op": "ike",
                            "remote_addr": arrival.remote[0],
                            "remote_port": arrival.remote[1],
                            "local_addr": arrival.local_addr,
                            "local_port": arrival.local_port,
                            "payload": arrival.payload.hex(),
                        }
                    )
                self.counters.ike_forwarded += len(ike)
            else:
                self.counters.errors["ike_without_sink"] += len(ike)

    def steer_inbound(self, datagrams: list[Datagram]) -> list[Datagram]:
        return self._steer_inbound(datagrams)

    def decrypt_and_write(self, datagrams: list[Datagram], now: float) -> None:
        self._decrypt_and_write(datagrams, now)

    def _steer_inbound(self, datagrams: list[Datagram]) -> list[Datagram]:
        mailbox = self.parts.mailbox
        if mailbox is None:
            return datagrams
        me, count = self.parts.index, self.parts.count
        steering = self._steering
        local: list[Datagram] = []
        for datagram in datagrams:
            spi = int.from_bytes(datagram[1][:4], "big")
            owner = steering.inbound_worker(spi) if steering is not None else spi % count
            if owner < 0 or owner == me:
                local.append(datagram)
            else:
                mailbox.send_inbound(owner, datagram)
                self.counters.handed_off_in += 1
        return local

    def _decrypt_and_write(self, datagrams: list[Datagram], now: float) -> None:
        if not datagrams:
            return
        p = self.parts
        try:
            packets = p.transform.inbound_batch(datagrams, now)
        except Exception:
            self.counters.errors["transform_errors"] += 1
            log.exception("inbound_batch failed; %d datagrams lost", len(datagrams))
            return
        self.counters.datagrams_in += len(datagrams)
        if not packets:
            return
        if p.mss_clamp is not None:
            packets = p.mss_clamp.apply(packets)
        self.counters.packets_in += len(packets)
        if self.rooms is not None:
            self.rooms.write_packets(packets)
        elif self._merge:
            frames = coalesce_for_tun(packets, self._merge_udp)
            self.counters.tun_frames_written += p.tun.write_batch(frames)
        else:
            self.counters.tun_frames_written += p.tun.write_packets(packets)

    # -- hand-offs, timers, control -------------------------------------------------------
    def mailbox_drain(self) -> bool:
        mailbox = self.parts.mailbox
        if mailbox is None:
            return False
        outbound, inbound = mailbox.drain(self.parts.batch)
        now = self.parts.clock()
        self._encrypt_and_send(outbound, now)
        self._decrypt_and_write(inbound, now)
        return len(outbound) + len(inbound) >= self.parts.batch

    def _timers(self) -> float:
        """Run due transform timers; return seconds until the next one (capped at IDLE_WAKEUP)."""
        p = self.parts
        deadline = p.transform.get_timer()
        if deadline is None:
            return IDLE_WAKEUP
        now = p.clock()
        if deadline <= now:
            try:
                datagrams = p.transform.handle_timer(now)
            except Exception:
                self.counters.errors["transform_errors"] += 1
                log.exception("handle_timer failed")
                datagrams = []
            if datagrams:
                self._send(datagrams)
            deadline = p.transform.get_timer()
            if deadline is None:
                return IDLE_WAKEUP
        return max(0.0, min(IDLE_WAKEUP, deadline - now))

    def _forward_events(self) -> None:
        control = self.parts.control
        if self._control_backlog:
            self._flush_control()
        if self._controlled is not None:
            for message in self._controlled.drain_messages():
                self._control_send(message)
        events = self.parts.transform.drain_events()
        if not events or control is None:
            return
        message = {
            "op": "events",
            "worker": self.parts.index,
            "events": [
                {"kind": e.kind.value, "child_sa": e.child_sa, "spi": e.spi, "policy": e.policy, "reason": e.reason}
                for e in events
            ],
        }
        self._control_send(message)

    def _control_send(self, message: dict[str, object]) -> None:
        """Send to the parent; when its socket buffer is full, keep the message for later.

        Sequence reservations travel this way: losing one would stall its SA for good, so
        nothing is dropped until the backlog holds CONTROL_BACKLOG messages.
        """
        control = self.parts.control
        if control is None:
            return
        data = json.dumps(message).encode()
        if self._control_backlog:
            self._flush_control()
        if not self._control_backlog:
            try:
                control.send(data)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.counters.errors["control_send"] += 1
                return
        if len(self._control_backlog) >= CONTROL_BACKLOG:
            self.counters.errors["control_backlog_full"] += 1
            return
        self._control_backlog.append(data)

    def _flush_control(self) -> None:
        control = self.parts.control
        backlog = self._control_backlog
        while backlog and control is not None:
            try:
                control.send(backlog[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters.errors["control_send"] += len(backlog)
                backlog.clear()
                return
            backlog.popleft()

    def status(self) -> dict[str, object]:
        p = self.parts
        try:
            transform_status = p.transform.status()
        except Exception:
            transform_status = {"error": "status() failed"}
        return {
            "worker": p.index,
            "batch_rooms": self.rooms.description() if self.rooms is not None else None,
            "loop": self.counters.as_dict(),
            "tun": {
                "frames_read": p.tun.frames_read,
                "frames_written": p.tun.frames_written,
                "drops": dict(p.tun.drops),
            },
            "outer": p.outer.status(),
            "raw_outer": p.raw_outer.status() if p.raw_outer is not None else None,
            "transform": transform_status,
            "mailbox": {
                "sent": {str(k): v for k, v in p.mailbox.sent.items()},
                "received": p.mailbox.received,
                "drops": dict(p.mailbox.drops),
            }
            if p.mailbox is not None
            else None,
            "mtu": dict(p.mtu_guard.counters) if p.mtu_guard is not None else None,
            "mss_clamped": p.mss_clamp.clamped if p.mss_clamp is not None else None,
            "icmp": {"sent": p.icmp.sent, "drops": dict(p.icmp.drops)} if p.icmp is not None else None,
        }

    def _control(self) -> None:
        control = self.parts.control
        if control is None:
            return
        try:
            raw = control.recv(CONTROL_REQUEST_MAX)
        except BlockingIOError:
            return
        except OSError:
            self.running = False
            return
        if not raw:  # the parent went away: stop, do not run unsupervised
            self.running = False
            return
        try:
            message = json.loads(raw)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.counters.errors["control_unknown"] += 1
            return
        op = message.get("op")
        request_id = message.get("id")
        if op == "stop":
            self.running = False
            self._control_send({"op": "stopped", "id": request_id, "worker": self.parts.index})
        elif op == "status":
            self._control_send({"op": "status", "id": request_id, "status": self.status()})
        elif op == "send_ike":
            sent = self._send_ike(message)
            if request_id is not None:
                self._control_send({"op": "reply", "id": request_id, **sent})
            elif not sent["ok"]:  # posted without an id: nobody waits for the answer, count it
                self.counters.errors["ike_send_failed"] += 1
        elif self._controlled is not None and isinstance(op, str):
            try:
                reply = self._controlled.handle_control(op, message, self.parts.clock())
            except Exception as exc:  # a transform bug answers an error; the loop lives on
                log.exception("control op %s failed", op)
                reply = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
            self._control_send({"op": "reply", "id": request_id, **reply})
            self._forward_events()
        else:
            self.counters.errors["control_unknown"] += 1

    def _send_ike(self, message: dict[str, Any]) -> dict[str, object]:
        send = getattr(self.parts.outer, "send_ike", None)
        try:
            remote = (str(message["remote_addr"]), int(message["remote_port"]))
            payload = bytes.fromhex(str(message["payload"]))
            local = str(message.get("local_addr") or "")
        except (KeyError, TypeError, ValueError):
            return {"ok": False, "error": "malformed send_ike"}
        if send is None:
            return {"ok": False, "error": "no UDP socket in this worker"}
        return {"ok": bool(send(remote, payload, local or None))}

    # -- the loop -------------------------------------------------------------------------
    def _broken(self, fd: int, events: int) -> None:
        """EPOLLERR/EPOLLHUP that reading cannot clear: the TUN device was deleted, a peer socket closed.

        Spinning on it would burn a core; carrying on without the TUN would black-hole traffic.
        The worker stops and the parent stops the datapath (fail closed).
        """
        self._error_streak[fd] = self._error_streak.get(fd, 0) + 1
        self.counters.errors["epoll_error_events"] += 1
        if fd == self.parts.tun.fileno() or self._error_streak[fd] > 1000:
            raise DatapathBroken(f"descriptor {fd} reports {'EPOLLHUP' if events & select.EPOLLHUP else 'EPOLLERR'}")

    def run(self) -> None:
        p = self.parts
        ep = select.epoll()
        rooms = self.rooms
        handlers: dict[int, Callable[[], bool]] = {
            p.tun.fileno(): rooms.tun_to_outer if rooms is not None else self.tun_to_outer,
            p.outer.fileno(): rooms.udp_to_tun if rooms is not None and rooms.udp is not None else self.outer_to_tun,
        }
        if p.raw_outer is not None:
            handlers[p.raw_outer.fileno()] = self.raw_to_tun
        if p.mailbox is not None:
            handlers[p.mailbox.fileno()] = self.mailbox_drain
        for fd in handlers:
            ep.register(fd, select.EPOLLIN)
        control_fd = -1
        if p.control is not None:
            p.control.setblocking(False)
            control_fd = p.control.fileno()
            ep.register(control_fd, select.EPOLLIN)
        pending: set[int] = set()
        self.running = True
        try:
            while self.running:
                timeout = 0.0 if pending else self._timers()
                try:
                    ready = ep.poll(timeout)
                except InterruptedError:
                    continue
                self.counters.wakeups += 1
                fds = pending
                for fd, events in ready:
                    if events & _BROKEN and fd != control_fd:
                        self._broken(fd, events)
                    elif self._error_streak:
                        self._error_streak.pop(fd, None)
                    fds.add(fd)
                pending = set()
                for fd in fds:
                    if fd == control_fd:
                        self._control()
                        continue
                    handler = handlers.get(fd)
                    if handler is not None and handler():
                        pending.add(fd)
                self._forward_events()
                if pending:
                    self._timers()
        finally:
            ep.close()
