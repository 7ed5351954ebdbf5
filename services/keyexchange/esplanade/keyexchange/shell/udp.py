"""The thin asyncio shell around `IkeDispatcher`: UDP 500 and 4500, one timer, event fan-out.

Port 4500 carries IKE (behind the 4-byte non-ESP marker) and ESP-in-UDP (RFC 3948). The
shell owns that socket itself (`own_natt=True`) or a dataplane owns it and relays IKE in
with `feed_natt()` while the shell sends through `NattRelay.send()`. ESP arriving on a
4500 socket the shell owns goes to `on_esp`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from esplanade.keyexchange.ikev2.constants import IKE_PORT, NATT_PORT
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import Address, Datagram, Event

log = logging.getLogger(__name__)

EspHandler = Callable[[bytes, Address, Address], None]
EventHandler = Callable[[Event], None]


class NattRelay(Protocol):
    """A UDP 4500 transport owned elsewhere (the dataplane). `send` takes a full UDP payload."""

    def send(self, data: bytes, local: Address, remote: Address) -> None: ...


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, shell: IkeUdpShell, local: Address) -> None:
        self.shell = shell
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        remote = (str(addr[0]), int(addr[1]))
        if self.local[1] == NATT_PORT and data[:4] != b"\x00\x00\x00\x00" and len(data) > 1:
            self.shell.esp_received(data, self.local, remote)
            return
        self.shell.feed(data, self.local, remote)

    def error_received(self, exc: Exception) -> None:
        self.shell.counters["socket_errors"] = self.shell.counters.get("socket_errors", 0) + 1


class IkeUdpShell:
    def __init__(
        self,
        engine: IkeDispatcher,
        local_ip: str,
        *,
        ike_port: int = IKE_PORT,
        natt_port: int = NATT_PORT,
        relay: NattRelay | None = None,
        on_esp: EspHandler | None = None,
        on_event: EventHandler | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.local_ip = local_ip
        self.ike_port = ike_port
        self.natt_port = natt_port
        self.relay = relay
        self.on_esp = on_esp
        self.on_event = on_event
        self.clock = clock
        self.counters: dict[str, int] = {}
        self._endpoints: dict[int, _Endpoint] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ports = [self.ike_port] + ([] if self.relay is not None else [self.natt_port])
        for port in ports:
            family = socket.AF_INET6 if ":" in self.local_ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.local_ip, port))
            sock.setblocking(False)
            endpoint = _Endpoint(self, (self.local_ip, port))
            await self._loop.create_datagram_endpoint(lambda ep=endpoint: ep, sock=sock)  # type: ignore[misc]
            self._endpoints[port] = endpoint
        self.transmit()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for ep in self._endpoints.values():
            if ep.transport is not None:
                ep.transport.close()
        self._endpoints.clear()

    # -- input ----------------------------------------------------------------------------------
    def feed(self, data: bytes, local: Address, remote: Address) -> None:
        """One UDP payload for IKE (on 4500 still with its non-ESP marker)."""
        try:
            self.engine.receive_datagram(data, local, remote, self.clock())
        except Exception:  # the engine never raises by contract; keep the shell alive regardless
            self.counters["engine_errors"] = self.counters.get("engine_errors", 0) + 1
            log.exception("IKE engine raised on a datagram")
        self.transmit()

    feed_natt = feed

    def esp_received(self, data: bytes, local: Address, remote: Address) -> None:
        if self.on_esp is not None:
            self.on_esp(data, local, remote)
        else:
            self.counters["esp_dropped"] = self.counters.get("esp_dropped", 0) + 1

    def send_esp(self, data: bytes, local: Address, remote: Address) -> None:
        """ESP-in-UDP out of the 4500 socket (test dataplanes use this)."""
        self._send_raw(data, local, remote)

    # -- output ---------------------------------------------------------------------------------
    def _send_raw(self, data: bytes, local: Address, remote: Address) -> None:
        if local[1] == self.natt_port and self.relay is not None:
            self.relay.send(data, local, remote)
            return
        ep = self._endpoints.get(local[1]) or self._endpoints.get(self.ike_port)
        if ep is None or ep.transport is None:
            self.counters["unsendable"] = self.counters.get("unsendable", 0) + 1
            return
        ep.transport.sendto(data, remote)

    def send_datagram(self, d: Datagram) -> None:
        self._send_raw(d.wire_bytes(), d.local, d.remote)

    def transmit(self) -> None:
        for d in self.engine.datagrams_to_send():
            self.send_datagram(d)
        while (ev := self.engine.next_event()) is not None:
            if self.on_event is not None:
                try:
                    self.on_event(ev)
                except Exception:
                    log.exception("event handler failed")
        # an event handler may have called back into the engine
        for d in self.engine.datagrams_to_send():
            self.send_datagram(d)
        self._arm()

    def _arm(self) -> None:
        if self._loop is None:
            return
        at = self.engine.get_timer()
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            delay = max(0.0, at - self.clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.engine.handle_timer(self.clock())
        self.transmit()

    # -- commands (thread-safe wrappers are the caller's business) --------------------------------
    def call(self, fn: Callable[..., object], *args: object) -> object:
        """Run an engine command with the current time appended, then transmit."""
        result = fn(*args, self.clock())
        self.transmit()
        return result
