"""Which keyexchange instance holds each IKE SA: `keyexchange/owners/` for the IKE relay.

Each owner record (`{"instance", "spi_i"}`, under the instance's lease) maps the IKE SA's
initiator SPI to its instance; the relay sends that SPI's datagrams there
(`IkeRelay.owners`). A record that goes (the instance died, the IKE SA was deleted) removes
the route; the relay then falls back to rendezvous hashing, which picks the instance that
takes the IKE SA over.
"""

from __future__ import annotations

import asyncio
import json
import logging

from esplanade.dataplane.ike_relay import IkeRelay
from esplanade.store import schema
from esplanade.store.base import KeyValue, Resync, Store, StoreError, WatchBatch

log = logging.getLogger(__name__)

PREFIX = schema.prefix("keyexchange", "owners")


class IkeOwnerRoutes:
    def __init__(self, store: Store, relay: IkeRelay) -> None:
        self.store = store
        self.relay = relay
        self._spi_of: dict[str, bytes] = {}  # IKE SA id -> its initiator SPI

    def _put(self, kv: KeyValue) -> None:
        try:
            document = json.loads(kv.value)
            spi = bytes.fromhex(str(document["spi_i"]))
            instance = str(document["instance"])
        except (KeyError, TypeError, ValueError):
            return
        ike_id = kv.key[len(PREFIX) :]
        self._spi_of[ike_id] = spi
        self.relay.owners[spi] = instance

    def _delete(self, key: str) -> None:
        spi = self._spi_of.pop(key[len(PREFIX) :], None)
        if spi is not None:
            self.relay.owners.pop(spi, None)

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                records, revision = await self.store.range(PREFIX)
                break
            except StoreError as exc:
                log.warning("IKE owner routes: store not readable yet (%s)", exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
        for kv in records:
            self._put(kv)
        async for item in self.store.watch(PREFIX, revision + 1):
            if isinstance(item, Resync):
                self._spi_of.clear()
                self.relay.owners.clear()
                for kv in item.kvs:
                    self._put(kv)
            elif isinstance(item, WatchBatch):
                for event in item.events:
                    if event.type.value == "put":
                        self._put(event.kv)
                    else:
                        self._delete(event.kv.key)
