"""The IKE relay follows `keyexchange/owners/`: datagrams of an owned IKE SA go to its owner
instance; without a record (the owner died) they go to the rendezvous winner, the instance
that takes the IKE SA over."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from esplanade.cluster.rendezvous import choose
from esplanade.dataplane.ike_owner_routes import IkeOwnerRoutes
from esplanade.dataplane.ike_relay import IkeRelay
from esplanade.store import schema
from esplanade.store.embedded import EmbeddedStore
from tests.conditions import async_wait_until


async def _true(value: bool) -> bool:
    return value


async def test_owned_ike_sas_reach_their_owner_and_orphans_the_rendezvous_winner(tmp_path: Path) -> None:
    async with EmbeddedStore(tmp_path / "state.db") as store:
        relay = IkeRelay()
        streams = {name: relay.attach(name) for name in ("kxa", "kxb", "kxc")}
        spi = bytes.fromhex("0102030405060708")
        winner = choose(spi.hex(), list(streams))
        owner = next(name for name in streams if name != winner)
        routes = IkeOwnerRoutes(store, relay)
        task = asyncio.create_task(routes.run())
        try:
            assert relay.choose(spi) is streams[str(winner)]
            document = {"instance": owner, "spi_i": spi.hex()}
            await store.put(schema.ike_sa_owner("ike-1"), json.dumps(document).encode())
            await async_wait_until(lambda: _true(relay.owners.get(spi) == owner), timeout=5, what="route learned")
            assert relay.choose(spi) is streams[owner]
            relay.detach(streams[owner])  # its stream is gone: the rendezvous winner meanwhile
            others = [name for name in streams if name != owner]
            assert relay.choose(spi) is streams[str(choose(spi.hex(), others))]
            await store.delete(schema.ike_sa_owner("ike-1"))
            await async_wait_until(lambda: _true(spi not in relay.owners), timeout=5, what="route forgotten")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
