"""Worker processes: one per core, each with its own TUN queue, outer socket and SAs.

Ownership
---------
A Child SA (its inbound and its outbound SA) belongs to exactly one worker:
``owner = inbound SPI mod number of workers`` (`SpiOwnership`). Only the owner holds the
SA's keys, its outbound sequence counter and its inbound replay window, so no sequence-number
space or replay window is ever shared between processes and nothing needs a lock. Our
inbound SPIs are random (chosen by our IKE), so SAs spread evenly without coordination.

How packets reach the owner
---------------------------
Inbound (ESP from the network). The n UDP/4500 sockets form one SO_REUSEPORT group, bound
in worker order, so socket k is index k of the group. A classic BPF program attached with
SO_ATTACH_REUSEPORT_CBPF returns ``SPI mod n`` for each datagram, i.e. the owner's socket:
the kernel does the steering, before any copy to userspace. We chose SPI steering over
the default 4-tuple hash because all SAs between two gateways share one 4-tuple (both ends
on 4500), so a hash would put every SA on one worker, and over eBPF because a three-
instruction CBPF program needs no bpf(2) loader, no maps and no privileges beyond the
socket. (IKE, SPI field 0, lands on worker 0.) Plain ESP uses one raw socket per worker,
each with a CBPF socket filter keeping ``SPI mod n == k`` (raw sockets all get a copy).
One case escapes the kernel steering: UDP GRO may glue datagrams of several SPIs of one
4-tuple into one batch, which the program sees by its first SPI. Each worker therefore
checks the SPI of every datagram and hands foreign ones to their owner's mailbox
(`handoff.Mailbox`); the owner's replay window stays private.

Outbound (inner packets from the TUN). The kernel picks the TUN queue per flow: the
symmetric flow hash is looked up in the TUN's flow table, which remembers the queue on
which *we last wrote* a packet of that flow (tun_flow_update), else hashes. Since the owner
of a Child SA writes that SA's decrypted packets, replies of a flow return to the queue of
the worker owning its SA once the first inbound packet was written. First packets of a
flow and one-way flows may still arrive at another worker; `SaSteering.outbound_worker`
(the SPD lookup of the crypto room) names the owner and the packet is handed off. A
TUNSETSTEERINGEBPF program that looked the SA up itself would remove that last hop; it
needs an eBPF loader and an SPD mirror in a BPF map, so it is left for the compiled datapath.

Processes
---------
The parent creates the TUN queues and the sockets in worker order, then forks. Each child
keeps its own queue, socket, mailbox and control channel, builds its own transform (its SA
state: sequence counters, replay windows, cipher contexts), optionally pins itself to a CPU,
and runs `loop.DatapathLoop`. The parent keeps
the TUN device alive, answers status by asking every worker, and stops them all when one
dies (fail closed: a dead owner would black-hole its SAs).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from esplanade.dataplane.userspace.handoff import Mailbox
from esplanade.dataplane.userspace.heap_settings import keep_batch_buffers_mapped
from esplanade.dataplane.userspace.loop import CONTROL_MESSAGE_MAX, DatapathLoop, LoopParts
from esplanade.dataplane.userspace.transform import PacketTransform, SaSteering, WorkerContext

log = logging.getLogger(__name__)

STOP_GRACE = 3.0


class SpiOwnership:
    """The default `SaSteering` for inbound: the owner of an SPI is SPI mod n.

    It knows nothing about the SPD, so `outbound_worker` answers -1 ("unknown, keep it
    here"); a crypto room that runs with several workers must provide `outbound_worker`.
    """

    def __init__(self, count: int) -> None:
        self.count = count

    def outbound_worker(self, packet: bytes) -> int:
        return -1

    def inbound_worker(self, spi: int) -> int:
        return spi % self.count


def steering_of(transform: PacketTransform, count: int) -> SaSteering:
    """The transform itself when it can steer (it knows its SPD), else `SpiOwnership`."""
    if callable(getattr(transform, "outbound_worker", None)) and callable(getattr(transform, "inbound_worker", None)):
        return transform  # type: ignore[return-value]
    return SpiOwnership(count)


@dataclass(slots=True)
class WorkerHandle:
    index: int
    pid: int
    control: socket.socket
    exit_status: int | None = None
    events: list[dict[str, object]] = field(default_factory=list)


# A function run in the child after fork that builds the loop's parts; the transform is built there.
PartsBuilder = Callable[[WorkerContext, socket.socket, Mailbox | None], LoopParts]


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGKILL this worker if its parent dies (kill -9 included), so no worker outlives the
    process that grants its sequence numbers and would hold the TUN and sockets of a successor."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the control channel's EOF still stops the loop
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class WorkerStopped(Exception):
    """SIGTERM reached a worker (its process group or cgroup is being stopped): leave the loop cleanly."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise WorkerStopped


def _child_main(build: PartsBuilder, context: WorkerContext, control: socket.socket, mailbox: Mailbox | None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us in order
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    keep_batch_buffers_mapped()
    try:
        parts = build(context, control, mailbox)
        DatapathLoop(parts).run()
        return 0
    except WorkerStopped:
        return 0
    except Exception:
        log.exception("worker %d failed", context.index)
        return 1


class WorkerPool:
    """Forked workers and their control channels."""

    def __init__(self) -> None:
        self.workers: list[WorkerHandle] = []

    def spawn(
        self,
        count: int,
        build: PartsBuilder,
        mailboxes: list[Mailbox] | None,
        close_in_parent: Callable[[int], None],
        pin_cpus: bool = False,
        realtime_priority: int = 0,
    ) -> None:
        """Fork `count` workers. `close_in_parent(k)` releases the parent's copies of worker k's fds."""
        cpus = sorted(os.sched_getaffinity(0))
        parent = os.getpid()
        for index in range(count):
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:  # child
                _die_with_parent(parent)
                parent_end.close()
                for handle in self.workers:
                    handle.control.close()
                if pin_cpus and cpus:
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(0, {cpus[index % len(cpus)]})
                if realtime_priority:
                    try:
                        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime_priority))
                    except OSError as exc:  # EPERM without CAP_SYS_NICE: run with normal scheduling
                        log.warning("worker %d stays SCHED_OTHER: %s", index, exc.strerror)
                mailbox = mailboxes[index] if mailboxes else None
                if mailboxes:
                    for other in mailboxes:
                        if other is not mailbox:
                            other.inbox.close()
                code = _child_main(build, WorkerContext(index, count), child_end, mailbox)
                os._exit(code)
            child_end.close()
            self.workers.append(WorkerHandle(index=index, pid=pid, control=parent_end))
            close_in_parent(index)

    def reap(self) -> list[WorkerHandle]:
        """Collect workers that exited; return the ones that just did."""
        gone = []
        for handle in self.workers:
            if handle.exit_status is not None:
                continue
            try:
                pid, status = os.waitpid(handle.pid, os.WNOHANG)
            except ChildProcessError:
                handle.exit_status = -1
                gone.append(handle)
                continue
            if pid:
                handle.exit_status = os.waitstatus_to_exitcode(status)
                gone.append(handle)
        return gone

    def alive(self) -> list[WorkerHandle]:
        self.reap()
        return [h for h in self.workers if h.exit_status is None]

    def request(
        self, handle: WorkerHandle, message: dict[str, object], reply_op: str, timeout: float
    ) -> dict[str, object] | None:
        """Send a control message and wait for the reply with op `reply_op` (events are kept aside)."""
        try:
            handle.control.send(json.dumps(message).encode())
        except OSError:
            return None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            handle.control.settimeout(remaining)
            try:
                raw = handle.control.recv(CONTROL_MESSAGE_MAX)
            except (TimeoutError, OSError):
                return None
            if not raw:
                return None
            try:
                reply = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(reply, dict):
                continue
            if reply.get("op") == "events":
                handle.events.append(reply)
            elif reply.get("op") == reply_op:
                return reply

    def status(self, timeout: float = 2.0) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for handle in self.alive():
            reply = self.request(handle, {"op": "status"}, "status", timeout)
            status = reply.get("status") if reply else None
            out.append(status if isinstance(status, dict) else {"worker": handle.index, "error": "no reply"})
        return out

    def stop(self, grace: float = STOP_GRACE) -> None:
        for handle in self.alive():
            with contextlib.suppress(OSError):
                handle.control.send(json.dumps({"op": "stop"}).encode())
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        for handle in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        for handle in self.workers:
            handle.control.close()
