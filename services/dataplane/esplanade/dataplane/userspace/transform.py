"""The door between the I/O rooms (TUN, UDP, raw ESP) and the crypto room.

A worker process owns one `PacketTransform`. The loop hands it whole batches, never single
packets, so a compiled batch loop can later replace it behind the same door:

* `outbound_batch(packets, now)`: inner IP packets read from the TUN (plain, checksummed,
  at most the inner MTU) -> ESP packets and the outer endpoint each goes to. SPD lookup,
  SA selection, sequence numbers, padding, encryption and ICV all happen behind the door.
  Packets without a PROTECT policy/SA, or DISCARDed, are dropped and counted inside.
* `inbound_batch(datagrams, now)`: ESP packets from the outer socket, with the sender's
  endpoint -> inner IP packets for the TUN. SA lookup by SPI, ICV check, replay window,
  decryption, and the inbound policy check (RFC 4301 §5.2) happen behind the door; failures
  are counted drops, never exceptions.
* `get_timer()` / `handle_timer(now)`: aioquic-style timers (lifetimes, TFC dummy packets);
  `handle_timer` may return ESP packets to send.
* `drain_events()`: lifetime expiry, sequence exhaustion, ACQUIRE (`DataplaneEvent`).
* `esp_overhead()`: the largest number of bytes ESP adds to an inner packet (header, IV,
  padding, trailer, ICV) over this worker's SAs; the TUN MTU and DF handling derive from it.

No method may raise on bad packets. The endpoint is (address, port); the port is ignored
by the raw ESP room. ESP packets start with the SPI; for ESP-in-UDP the UDP room adds the
UDP header, for plain ESP the kernel adds the IP header.

Each worker holds only the SAs it owns (see `worker.SpiOwnership`); a transform never shares
a sequence-number space or a replay window with another process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from esplanade.dataplane.backend import DataplaneEvent
from esplanade.dataplane.userspace.outer_transport import Datagram


class PacketTransform(Protocol):
    def outbound_batch(self, packets: Sequence[bytes], now: float) -> list[Datagram]: ...

    def inbound_batch(self, datagrams: Sequence[Datagram], now: float) -> list[bytes]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> list[Datagram]: ...

    def drain_events(self) -> list[DataplaneEvent]: ...

    def esp_overhead(self) -> int: ...

    def status(self) -> dict[str, object]: ...


class SaSteering(Protocol):
    """Which worker owns the SA a packet belongs to (only consulted when there are several workers).

    Return -1 when unknown: the local transform then decides (and normally counts a drop).
    """

    def outbound_worker(self, packet: bytes) -> int: ...

    def inbound_worker(self, spi: int) -> int: ...


@runtime_checkable
class ControlledTransform(Protocol):
    """A transform whose state the parent changes at run time over the worker's control channel.

    `handle_control(op, message, now)` applies one request (install an SA, a policy, grant
    sequence numbers, ...) and answers {"ok": True, ...} or {"ok": False, "error": text};
    it never raises on a bad request. `drain_messages()` returns what the transform wants
    to tell the parent unasked (JSON-ready dicts with an "op"), e.g. sequence reservations.
    """

    def handle_control(self, op: str, message: dict[str, Any], now: float) -> dict[str, object]: ...

    def drain_messages(self) -> list[dict[str, object]]: ...


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What a transform factory learns about the worker it is built for."""

    index: int
    count: int
