"""This node's membership record `dataplane/nodes/<node>`, kept alive under a store lease.

The record says where the node's gRPC endpoint is, which backend carries its SAs and how much
it can carry. It disappears when the node stops renewing (crash, partition) after
`lease_seconds`; scale-out uses that to move SAs. Install acknowledgements
(`dataplane/acks/<child_sa>/<node>`) live under the same lease, so an ack never outlives the
node that installed the SA; when the lease is lost and a new one granted, the callbacks in
`on_new_lease` rewrite them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from esplanade.store import schema
from esplanade.store.base import LeaseNotFound, Store, StoreError
from esplanade.store.sealing import encode_document

log = logging.getLogger(__name__)


class NodeMembership:
    def __init__(self, store: Store, node: str, ttl: int, document: dict[str, Any]) -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self.document = document
        self.lease_id = 0
        self.registered = asyncio.Event()
        self.on_new_lease: list[Callable[[int], Awaitable[None]]] = []
        self.renewals = 0

    async def _register(self) -> None:
        lease = await self.store.grant_lease(self.ttl)
        self.ttl = lease.ttl
        document = {**self.document, "node": self.node, "registered_at": time.time()}
        await self.store.put(schema.dataplane_node(self.node), encode_document(document), lease=lease.id)
        self.lease_id = lease.id
        self.registered.set()
        log.info("dataplane node %s registered (lease ttl %ds)", self.node, self.ttl)
        for callback in self.on_new_lease:
            try:
                await callback(lease.id)
            except StoreError as exc:
                log.warning("rewriting records under the new lease failed: %s", exc)

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                if not self.lease_id:
                    await self._register()
                    delay = 0.1
                await asyncio.sleep(max(0.2, self.ttl / 3))
                await self.store.keepalive(self.lease_id)
                self.renewals += 1
            except LeaseNotFound:
                log.warning("dataplane node %s lost its lease; registering again", self.node)
                self.lease_id = 0
                self.registered.clear()
            except StoreError as exc:
                log.warning("membership of %s not renewed: %s", self.node, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def leave(self) -> None:
        if self.lease_id:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(self.lease_id)
            self.lease_id = 0
