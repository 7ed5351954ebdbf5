"""This node's membership record `dataplane/nodes/<node>`, kept alive under a store lease.

The record says where the node's gRPC endpoint is, which backend carries its SAs and how much
it can carry. It disappears when the node stops renewing (crash, partition) after
`lease_seconds`; scale-out uses that to move SAs. Install acknowledgements
(`dataplane/acks/<child_sa>/<node>`) live under the same lease, so an ack never outlives the
node that installed the SA; when the lease is lost and a new one granted, the callbacks in
`on_new_lease` rewrite them.

Time: the lease is provably ours only until `send time of the last successful keepalive + TTL
- margin` (`esplanade.cluster.lease_clock`); `lease_valid(now)` answers that, and scale-out
ownership stops carrying SAs when it turns false (a partition from the store), before etcd
can expire the lease and let a survivor take them over. Keepalives are sent every TTL/4 with
a deadline of TTL/4, so one lost answer leaves time for another try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from esplanade.cluster.lease_clock import LeaseClock
from esplanade.store import schema
from esplanade.store.base import LeaseNotFound, Store, StoreError
from esplanade.store.sealing import encode_document

log = logging.getLogger(__name__)


class NodeMembership:
    def __init__(
        self,
        store: Store,
        node: str,
        ttl: int,
        document: dict[str, Any],
        *,
        margin: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self.document = document
        self.lease_id = 0
        self.registered = asyncio.Event()
        self.on_new_lease: list[Callable[[int], Awaitable[None]]] = []
        self.on_lease_change: list[Callable[[], None]] = []  # validity extended, lost or new
        self.renewals = 0
        self.clock = LeaseClock(margin=min(margin, ttl / 4))
        self.monotonic = monotonic

    def lease_valid(self, now: float | None = None) -> bool:
        return self.clock.valid(self.monotonic() if now is None else now)

    def _changed(self) -> None:
        for callback in self.on_lease_change:
            callback()

    async def _register(self) -> None:
        sent_at = self.monotonic()
        lease = await self.store.grant_lease(self.ttl)
        self.ttl = lease.ttl
        document = {**self.document, "node": self.node, "registered_at": time.time()}
        await self.store.put(schema.dataplane_node(self.node), encode_document(document), lease=lease.id)
        self.lease_id = lease.id
        self.clock.granted(lease.id, lease.ttl, sent_at)
        self.registered.set()
        self._changed()
        log.info("dataplane node %s registered (lease ttl %ds)", self.node, self.ttl)
        for callback in self.on_new_lease:
            try:
                await callback(lease.id)
            except StoreError as exc:
                log.warning("rewriting records under the new lease failed: %s", exc)

    async def update(self) -> None:
        """Rewrite the record (after `document` changed) under the current lease."""
        if not self.lease_id:
            return  # the next registration writes the new document
        document = {**self.document, "node": self.node, "registered_at": time.time()}
        with contextlib.suppress(LeaseNotFound):
            await self.store.put(schema.dataplane_node(self.node), encode_document(document), lease=self.lease_id)

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                if not self.lease_id:
                    await self._register()
                    delay = 0.1
                await asyncio.sleep(max(0.1, self.ttl / 4))
                sent_at = self.monotonic()
                ttl = await asyncio.wait_for(self.store.keepalive(self.lease_id), timeout=max(0.2, self.ttl / 4))
                self.clock.renewed(self.lease_id, ttl, sent_at)
                self.renewals += 1
                self._changed()
            except LeaseNotFound:
                log.warning("dataplane node %s lost its lease; registering again", self.node)
                self.lease_id = 0
                self.clock.lost()
                self.registered.clear()
                self._changed()
            except TimeoutError:
                log.warning("membership of %s not renewed: keepalive unanswered", self.node)
            except StoreError as exc:
                log.warning("membership of %s not renewed: %s", self.node, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def leave(self) -> None:
        if self.lease_id:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(self.lease_id)
            self.lease_id = 0
            self.clock.lost()
            self._changed()
