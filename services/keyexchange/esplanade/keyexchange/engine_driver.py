"""The asyncio driver of the sans-IO `IkeDispatcher`: feeds it datagrams, runs its one timer,
sends what it produces through the IKE transport and fans its events out to listeners
(the store handoff, the event feed, metrics). Every call into the engine happens on the
event loop thread, followed by `flush()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import (
    Address,
    Datagram,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    NegotiationFailed,
)
from esplanade.keyexchange.ikev2.ike_sa import IkeSa

log = logging.getLogger(__name__)

EventListener = Callable[[Event], None]


class IkeTransport(Protocol):
    def send(self, d: Datagram) -> None: ...


class IkeEngine:
    def __init__(self, dispatcher: IkeDispatcher, clock: Callable[[], float] = time.monotonic) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.transport: IkeTransport | None = None
        self.listeners: list[EventListener] = []
        self.after_flush: list[Callable[[], None]] = []  # after each step (IKE SA state persistence)
        self.connection_of: dict[str, str] = {}  # IKE SA id -> connection (kept after it is gone, briefly)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counters: dict[str, int] = {}
        dispatcher.on_register = self._registered

    def _registered(self, sa: IkeSa) -> None:
        self.connection_of[sa.id] = sa.config.name

    def start(self, transport: IkeTransport) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport = transport
        self.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def now(self) -> float:
        return self.clock()

    # -- input -------------------------------------------------------------------------------
    def feed(self, data: bytes, local: Address, remote: Address) -> None:
        self.dispatcher.receive_datagram(data, local, remote, self.clock())
        self.flush()

    def call(self, fn: Callable[..., object], *args: object) -> object:
        """Run an engine command with `now` appended, then flush."""
        try:
            return fn(*args, self.clock())
        finally:
            self.flush()

    # -- output ------------------------------------------------------------------------------
    def flush(self) -> None:
        for _ in range(8):  # a listener may call back into the engine; bounded
            datagrams = self.dispatcher.datagrams_to_send()
            events = []
            while (ev := self.dispatcher.next_event()) is not None:
                events.append(ev)
            if not datagrams and not events:
                break
            if self.transport is not None:
                for d in datagrams:
                    self.transport.send(d)
            for ev in events:
                self._note(ev)
                for listener in self.listeners:
                    try:
                        listener(ev)
                    except Exception:
                        log.exception("IKE event listener failed on %s", type(ev).__name__)
        for callback in self.after_flush:
            try:
                callback()
            except Exception:
                log.exception("after-flush callback failed")
        self._arm()

    def _note(self, ev: Event) -> None:
        sa = self.dispatcher.sas.get(ev.ike_sa)
        if sa is not None:
            self.connection_of[ev.ike_sa] = sa.config.name
        if isinstance(ev, IkeSaEstablished):
            self.connection_of[ev.ike_sa] = ev.connection
            log.info(
                "IKE SA %s of %s established with %s (%s)",
                ev.ike_sa,
                ev.connection,
                ev.remote_id,
                ev.suite,
                extra={"ike_sa": ev.ike_sa, "connection": ev.connection},
            )
        elif isinstance(ev, NegotiationFailed):
            log.warning(
                "IKE negotiation of %s failed in %s: %s (%s)",
                self.connection_of.get(ev.ike_sa, "?"),
                ev.exchange or "?",
                ev.notify_name,
                ev.reason,
                extra={"ike_sa": ev.ike_sa, "notify": ev.notify_name, "reason": ev.reason},
            )
        elif isinstance(ev, IkeSaDeleted):
            log.info("IKE SA %s deleted: %s", ev.ike_sa, ev.reason, extra={"ike_sa": ev.ike_sa})
            if self._loop is not None:  # listeners still name the connection of this event
                self._loop.call_later(60.0, self.connection_of.pop, ev.ike_sa, None)

    def _arm(self) -> None:
        if self._loop is None:
            return
        at = self.dispatcher.get_timer()
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_later(max(0.0, at - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.dispatcher.handle_timer(self.clock())
        self.flush()

    # -- configuration and commands (all raise KeyError/ValueError on bad arguments) ------------
    def set_config(self, config: ConnectionConfig) -> None:
        self.dispatcher.set_config(config)

    def remove_config(self, name: str) -> list[str]:
        result = self.call(self.dispatcher.remove_config, name)
        return result if isinstance(result, list) else []

    def initiate(self, connection: str, child: str = "") -> str:
        cfg = self.dispatcher.configs.get(connection)
        if cfg is None:
            raise KeyError(f"no connection {connection!r}")
        if child:
            cfg.child(child)
            names = [child]
        else:
            names = [c.name for c in cfg.children]
        return str(self.call(self.dispatcher.initiate_children, connection, names))

    def ike_sa(self, ike_id: str) -> IkeSa:
        sa = self.dispatcher.sas.get(ike_id)
        if sa is None:
            raise KeyError(f"no IKE SA {ike_id!r}")
        return sa

    def ike_of_child(self, child_id: str) -> IkeSa:
        for sa in self.dispatcher.sas.values():
            if child_id in sa.children:
                return sa
        raise KeyError(f"no Child SA {child_id!r}")

    def inbound_sa_installed(self, ike_id: str, child_id: str) -> None:
        self.call(self.dispatcher.inbound_sa_installed, ike_id, child_id)
