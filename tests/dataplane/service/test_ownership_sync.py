"""Scale-out ownership on one store shared by several in-process nodes (embedded store, fake backends).

Checks the protocol's order of steps: a releasing node stops carrying an SA *before* it
deletes the owner record; a node whose lease is no longer provable stops carrying everything
without a store call; a graceful leave hands everything over at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from esplanade.cluster.rendezvous import choose
from esplanade.dataplane.node_membership import NodeMembership
from esplanade.dataplane.ownership import SaOwnership
from esplanade.dataplane.ownership_sync import OwnershipSync
from esplanade.dataplane.reconciler import Reconciler
from esplanade.dataplane.sa_persistence import MemorySaPersistence
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.store.base import Compare, Delete, Put, Store, TxnResult
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer
from tests.conditions import async_wait_until
from tests.dataplane.backend_doubles import FakeBackend
from tests.dataplane.child_sa_records import put_record, record

TUNNELS = 12


def tunnel(i: int) -> ChildSaRecord:
    base = record(f"t{i}", 0x1000 + 16 * i)
    return dataclasses.replace(base, inbound=dataclasses.replace(base.inbound, dst=f"198.18.0.{101 + i}"))


class LoggingStore:
    """Delegates to a store; logs owner-record deletes into a shared list."""

    def __init__(self, store: Store, log: list[str]) -> None:
        self._store = store
        self._log = log

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        result = await self._store.commit(conditions, ops)
        for op in ops:
            if isinstance(op, Delete) and "/dataplane/owners/" in op.key and result.succeeded:
                self._log.append(f"record-deleted {op.key.rsplit('/', 1)[1]}")
        return result


class LoggingBackend(FakeBackend):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def delete_child_sa(self, child_sa_id: str) -> None:
        await super().delete_child_sa(child_sa_id)
        self.log.append(f"stopped {child_sa_id}")


@dataclasses.dataclass
class InProcessNode:
    name: str
    membership: NodeMembership
    sync: OwnershipSync
    backend: LoggingBackend
    reconciler: Reconciler
    tasks: list[asyncio.Task[None]]
    now: list[float]

    def carried(self) -> set[str]:
        return set(self.backend.children)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with EmbeddedStore(tmp_path / "state.db") as opened:
        yield opened


async def start_node(store: Store, sealer: Sealer, name: str, log: list[str]) -> InProcessNode:
    now = [1000.0]
    logged = LoggingStore(store, log)
    membership = NodeMembership(store, name, 5, {"capacity": {"workers": 1}}, monotonic=lambda: now[0])
    ownership = SaOwnership(
        name, mode="rendezvous", lease_id=lambda: membership.lease_id, lease_valid=membership.lease_valid
    )
    backend = LoggingBackend(log)
    reconciler = Reconciler(
        logged,  # type: ignore[arg-type]
        sealer,
        backend,
        name,
        ownership=ownership,
        persistence=MemorySaPersistence(),
        lease=lambda: membership.lease_id,
    )
    sync = OwnershipSync(logged, ownership, membership, reconciler)  # type: ignore[arg-type]
    await membership._register()
    tasks = [asyncio.create_task(reconciler.run()), asyncio.create_task(sync.run())]
    await asyncio.wait_for(reconciler.ready.wait(), 10)
    await asyncio.wait_for(sync.ready.wait(), 10)
    membership.document["accepting"] = True
    await membership.update()
    return InProcessNode(name, membership, sync, backend, reconciler, tasks, now)


def expected(members: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {m: set() for m in members}
    for i in range(TUNNELS):
        out[str(choose(f"198.18.0.{101 + i}", members))].add(f"t{i}")
    return out


async def settled(nodes: list[InProcessNode], want: dict[str, set[str]]) -> bool:
    return all(n.carried() == want.get(n.name, set()) for n in nodes)


async def stop(nodes: list[InProcessNode]) -> None:
    for node in nodes:
        for task in node.tasks:
            task.cancel()
        await asyncio.gather(*node.tasks, return_exceptions=True)


async def test_join_hands_over_in_order_and_a_lost_lease_stops_everything(store: Store) -> None:
    sealer = Sealer(Keyring.generate())
    log: list[str] = []
    for i in range(TUNNELS):
        await put_record(store, sealer, tunnel(i))
    nodes = [await start_node(store, sealer, f"dp{i}", log) for i in range(2)]
    try:
        want = expected(["dp0", "dp1"])
        await async_wait_until(lambda: settled(nodes, want), timeout=10, what="two nodes split the SAs")

        nodes.append(await start_node(store, sealer, "dp2", log))
        want = expected(["dp0", "dp1", "dp2"])
        await async_wait_until(lambda: settled(nodes, want), timeout=10, what="the new node takes its share")
        moved = want["dp2"]
        assert moved
        for child in moved:  # the old owner stopped before it let go of the record
            assert log.index(f"stopped {child}") < log.index(f"record-deleted {child}")
        owners = {c: o.node for c, o in nodes[0].sync.ownership.owners.items()}
        assert owners == {c: n for n, cs in want.items() for c in cs}

        # dp1 cannot prove its lease any more (no keepalive sent within TTL - margin)
        victim = nodes[1]
        before = set(victim.carried())
        assert before
        mark = len(log)
        victim.now[0] += 10
        victim.membership._changed()
        await async_wait_until(lambda: _value(not victim.carried()), timeout=10, what="the cut-off node stops")
        assert victim.sync.counters.suspensions == 1
        assert all(f"record-deleted {c}" not in log[mark:] for c in before)  # they wait for the lease to expire

        # a graceful leave: the survivors take over at once
        await victim.sync.leave(victim.membership.leave)
        want = expected(["dp0", "dp2"])
        await async_wait_until(lambda: settled([nodes[0], nodes[2]], want), timeout=10, what="survivors took over")
    finally:
        await stop(nodes)


async def _value(value: bool) -> bool:
    return value
