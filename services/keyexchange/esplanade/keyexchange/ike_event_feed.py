"""What `KeyExchange.WatchEvents` streams: the core's events as API events, fanned out to
every watcher through a bounded queue each (a slow watcher loses its oldest events, counted,
and never slows the engine)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from esplanade.keyexchange.ikev2.constants import NotifyType
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
    NegotiationFailed,
)
from esplanade.v1 import keyexchange_pb2

QUEUE_SIZE = 4096


def api_event(ev: Event, connection: str, wall: float) -> keyexchange_pb2.KeyExchangeEvent | None:
    e = keyexchange_pb2.KeyExchangeEvent(time=wall, connection=connection, ike_sa=ev.ike_sa)
    if isinstance(ev, IkeSaEstablished):
        e.kind, e.remote_id = "ike_up", ev.remote_id
    elif isinstance(ev, IkeSaDeleted):
        e.kind, e.reason = "ike_down", ev.reason
    elif isinstance(ev, IkeSaRekeyed):
        e.kind, e.new_ike_sa = "ike_rekeyed", ev.new_ike_sa
    elif isinstance(ev, ChildSaEstablished):
        e.kind, e.child_sa = "child_up", ev.child_id
    elif isinstance(ev, ChildSaRekeyed):
        e.kind, e.child_sa, e.new_child_sa = "child_rekeyed", ev.old_child_id, ev.new_child_id
    elif isinstance(ev, ChildSaDeleted):
        e.kind, e.child_sa, e.reason = "child_down", ev.child_id, ev.reason
    elif isinstance(ev, NegotiationFailed):
        e.kind = "auth_failed" if ev.notify == NotifyType.AUTHENTICATION_FAILED else "negotiation_failed"
        e.notify, e.reason, e.exchange = ev.notify_name, ev.reason, ev.exchange
    else:
        return None
    return e


class EventFeed:
    def __init__(self, connection_of: Callable[[str], str], wall: Callable[[], float] = time.time) -> None:
        self.connection_of = connection_of
        self.wall = wall
        self._watchers: set[asyncio.Queue[keyexchange_pb2.KeyExchangeEvent]] = set()
        self.dropped = 0

    def publish(self, ev: Event) -> None:
        if not self._watchers:
            return
        api = api_event(ev, self.connection_of(ev.ike_sa), self.wall())
        if api is None:
            return
        for q in self._watchers:
            if q.full():
                q.get_nowait()
                self.dropped += 1
            q.put_nowait(api)

    async def watch(self) -> AsyncIterator[keyexchange_pb2.KeyExchangeEvent]:
        q: asyncio.Queue[keyexchange_pb2.KeyExchangeEvent] = asyncio.Queue(QUEUE_SIZE)
        self._watchers.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._watchers.discard(q)
