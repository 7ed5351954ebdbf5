"""Scale-out ownership on the store: claim and release `dataplane/owners/<child_sa_id>`.

Every node runs one `OwnershipSync`. It follows `dataplane/nodes/` (the members and their
capacity; only members that say `accepting` count) and `dataplane/owners/`, and after any change
(records, members, owners, its own lease) converges, one pass at a time:

1. **Lease not provable** (no successful keepalive sent within TTL - margin: partition, store
   down): remove every installed SA from the backend (no store call: it would not answer) and
   give up the tunnel addresses. The owner records stay under the lease; if the lease comes
   back in time they are ours again and the SAs are reinstalled (fresh sequence blocks above
   everything reserved, replay floors from the store). If it expired, etcd deleted them and
   survivors took over.
2. **Release** every SA whose record names us but whose rendezvous winner is now another
   member (a join), or whose Child SA is gone: mark it releasing (`owns` turns false), remove it
   from the backend (its sender stops; every number it used lies inside a block already in
   `dataplane/seq/`), drop its tunnel addresses, *then* delete the owner record (CAS on its
   revision). The new owner can only claim after that delete.
3. **Claim** every SA without owner record whose winner is us: create the record under our
   lease (CAS "must not exist"), then install it (the backend reserves a block above every
   block ever reserved and reads the replay floor), then take its tunnel addresses and
   announce them (gratuitous ARP / unsolicited NA).
4. Reconcile the backend with `owns()` for anything else that changed.

Death of a node: etcd expires its lease, deleting its member key and all its owner records in
one revision; the survivors see the deletes and step 3 runs on each winner. The failover time
is the lease TTL plus one watch round trip plus the install.

A graceful stop (`leave`) removes everything from the backend first and then revokes the
lease, so survivors claim at once instead of waiting for the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from esplanade.dataplane.node_membership import NodeMembership
from esplanade.dataplane.ownership import OwnerRecord, SaOwnership, desired_owner
from esplanade.dataplane.reconciler import Reconciler
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.store import schema
from esplanade.store.base import Compare, Delete, KeyValue, Put, Resync, Store, StoreError, WatchBatch
from esplanade.store.sealing import encode_document

log = logging.getLogger(__name__)

NODES_PREFIX = schema.prefix("dataplane", "nodes")
OWNERS_PREFIX = schema.prefix("dataplane", "owners")
CLAIMS_IN_FLIGHT = 64


class AddressSteering(Protocol):
    def apply(self, owned: list[ChildSaRecord]) -> None: ...


@dataclass
class Member:
    node: str
    weight: float
    accepting: bool
    document: dict[str, Any] = field(default_factory=dict)


@dataclass
class OwnershipCounters:
    claims: int = 0
    releases: int = 0
    failovers: int = 0  # claims of SAs whose owner vanished with its lease
    suspensions: int = 0  # times the lease was no longer provable while SAs were installed
    claim_conflicts: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def moved(self, reason: str, count: int = 1) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + count


def _decode(kv: KeyValue) -> dict[str, Any]:
    try:
        document = json.loads(kv.value)
    except (UnicodeDecodeError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def member_from(kv: KeyValue) -> Member:
    document = _decode(kv)
    node = kv.key[len(NODES_PREFIX) :]
    capacity = document.get("capacity")
    weight = 1.0
    if isinstance(capacity, dict):
        workers = capacity.get("workers")
        if isinstance(workers, int | float) and workers > 0:
            weight = float(workers)
    return Member(node, weight, bool(document.get("accepting", False)), document)


class OwnershipSync:
    def __init__(
        self,
        store: Store,
        ownership: SaOwnership,
        membership: NodeMembership,
        reconciler: Reconciler,
        *,
        steering: AddressSteering | None = None,
        on_moved: Callable[[str, str, int], None] | None = None,
        on_failover: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.ownership = ownership
        self.membership = membership
        self.reconciler = reconciler
        self.steering = steering
        self.node = ownership.node
        self.members: dict[str, Member] = {}
        self.counters = OwnershipCounters()
        self.on_moved = on_moved  # (kind, reason, count) for metrics
        self.on_failover = on_failover  # SAs taken over from a node that died or was cut off
        self.ready = asyncio.Event()
        self.leaving = False
        self._dirty = asyncio.Event()
        self._revisions: dict[str, int] = {}  # owner key -> newest revision applied (deletes too)
        self._previous_owner: dict[str, str] = {}  # child id -> the other node whose record was deleted
        # claimed from a node still listed as member: a failover if that member vanishes soon after
        # (its member key and owner records go in one revision, but two watches report them)
        self._claimed_from: dict[str, tuple[str, float]] = {}
        self._deadline: asyncio.TimerHandle | None = None
        self._suspended = False
        self.passes = 0
        reconciler.on_records_changed.append(self.poke)
        membership.on_lease_change.append(self._lease_changed)

    def poke(self) -> None:
        self._dirty.set()

    def accepting_members(self) -> dict[str, float]:
        return {
            m.node: m.weight
            for m in self.members.values()
            if m.accepting and not (self.leaving and m.node == self.node)
        }

    def owned_count(self) -> int:
        return len(self.reconciler.installed)

    # -- lease ----------------------------------------------------------------------------
    def _lease_changed(self) -> None:
        self.poke()
        loop = asyncio.get_running_loop()
        if self._deadline is not None:
            self._deadline.cancel()
        remaining = self.membership.clock.remaining(self.membership.monotonic())
        if remaining > 0:
            # wake exactly when the lease stops being provable, whatever else happens
            self._deadline = loop.call_later(remaining + 0.001, self.poke)

    # -- running --------------------------------------------------------------------------
    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                nodes, nodes_revision = await self.store.range(NODES_PREFIX)
                owners, owners_revision = await self.store.range(OWNERS_PREFIX)
                break
            except StoreError as exc:
                log.warning("ownership: store not readable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        for kv in nodes:
            self._put_member(kv)
        for kv in owners:
            self._put_owner(kv, kv.mod_revision)
        self.ready.set()
        self.poke()
        await asyncio.gather(
            self._follow(NODES_PREFIX, nodes_revision + 1, self._member_event, self._member_resync),
            self._follow(OWNERS_PREFIX, owners_revision + 1, self._owner_event, self._owner_resync),
            self._converge_forever(),
        )

    async def _follow(
        self,
        prefix: str,
        start: int,
        apply: Callable[[KeyValue, bool], None],
        resync: Callable[[Resync], None],
    ) -> None:
        async for item in self.store.watch(prefix, start):
            if isinstance(item, Resync):
                resync(item)
            elif isinstance(item, WatchBatch):
                for event in item.events:
                    apply(event.kv, event.type.value == "put")
                self._forget_tombstones(item.revision)
            self.poke()

    def _forget_tombstones(self, revision: int) -> None:
        if len(self._revisions) > 2 * len(self.ownership.owners) + 1024:
            for key, seen in list(self._revisions.items()):
                child = key[len(OWNERS_PREFIX) :]
                if child not in self.ownership.owners and seen <= revision:
                    del self._revisions[key]

    # -- members --------------------------------------------------------------------------
    def _put_member(self, kv: KeyValue) -> None:
        member = member_from(kv)
        self.members[member.node] = member

    def _member_event(self, kv: KeyValue, put: bool) -> None:
        if put:
            self._put_member(kv)
            return
        gone = self.members.pop(kv.key[len(NODES_PREFIX) :], None)
        if gone is None or gone.document.get("leaving"):
            return
        now = time.monotonic()
        failed_over = [c for c, (node, at) in self._claimed_from.items() if node == gone.node and now - at < 10]
        for child in failed_over:
            del self._claimed_from[child]
        self._count_failovers(len(failed_over))

    def _count_failovers(self, count: int) -> None:
        if not count:
            return
        self.counters.failovers += count
        self.counters.moved("failover", count)
        if self.on_failover is not None:
            self.on_failover(count)

    def _member_resync(self, item: Resync) -> None:
        self.members.clear()
        for kv in item.kvs:
            self._put_member(kv)

    # -- owner records --------------------------------------------------------------------
    def _put_owner(self, kv: KeyValue, revision: int) -> None:
        if self._revisions.get(kv.key, 0) >= revision:
            return  # older than what we know (our own write was applied first)
        self._revisions[kv.key] = revision
        document = _decode(kv)
        child = kv.key[len(OWNERS_PREFIX) :]
        self.ownership.owners[child] = OwnerRecord(str(document.get("node", "")), kv.lease, kv.mod_revision)

    def _delete_owner(self, key: str, revision: int) -> None:
        if self._revisions.get(key, 0) >= revision:
            return
        self._revisions[key] = revision
        child = key[len(OWNERS_PREFIX) :]
        previous = self.ownership.owners.pop(child, None)
        if previous is not None and previous.node != self.node:
            self._previous_owner[child] = previous.node

    def _owner_event(self, kv: KeyValue, put: bool) -> None:
        if put:
            self._put_owner(kv, kv.mod_revision)
        else:
            self._delete_owner(kv.key, kv.mod_revision)

    def _owner_resync(self, item: Resync) -> None:
        present = {kv.key for kv in item.kvs}
        for child in list(self.ownership.owners):
            key = schema.sa_owner(child)
            if key not in present:
                self._delete_owner(key, item.revision)
        for kv in item.kvs:
            self._put_owner(kv, kv.mod_revision)

    # -- converging -----------------------------------------------------------------------
    async def _converge_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.converge()
            except StoreError as exc:
                log.warning("ownership: %s; trying again", exc)
                await asyncio.sleep(0.1)
                self.poke()

    def _steer(self) -> None:
        if self.steering is None:
            return
        try:
            self.steering.apply(list(self.reconciler.installed.values()))
        except Exception as exc:  # a netlink failure must not stop ownership from converging
            log.error("tunnel address steering failed: %s", exc)

    async def converge(self) -> None:
        self.passes += 1
        if not self.membership.lease_valid():
            await self._suspend()
            return
        if self._suspended:
            log.warning("lease provable again: carrying the SAs still recorded under it")
            self._suspended = False
        if not self.ready.is_set() or not self.reconciler.ready.is_set():
            return
        members = self.accepting_members()
        records = self.reconciler.records
        await self._release(members, records)
        await self._claim(members, records)
        await self._settle(records)

    async def _suspend(self) -> None:
        installed = list(self.reconciler.installed)
        if installed and not self._suspended:
            self.counters.suspensions += 1
            self.counters.moved("partition", len(installed))
            if self.on_moved is not None:
                self.on_moved("released", "partition", len(installed))
            log.error("dataplane node %s: lease no longer provable; stopped carrying %d SAs", self.node, len(installed))
        self._suspended = True
        if installed:
            await self.reconciler.reevaluate(installed, offline=True)
        if self.steering is not None:
            self._steer()

    async def _release(self, members: dict[str, float], records: dict[str, ChildSaRecord]) -> None:
        releases: list[tuple[str, str]] = []
        for child in list(self.ownership.owners):
            if not self.ownership.holds_record(child):
                continue
            record = records.get(child)
            if record is None:
                releases.append((child, "deleted"))
                continue
            winner = desired_owner(record, members)
            if winner is not None and winner != self.node:
                releases.append((child, "leave" if self.leaving else "rebalance"))
        if not releases:
            return
        ids = [child for child, _ in releases]
        self.ownership.releasing.update(ids)
        try:
            records_before = {child: self.reconciler.installed.get(child) for child in ids}
            await self.reconciler.reevaluate(ids)  # the senders stop here
            self._steer()  # and the addresses go before anyone else may claim them
            await self._hand_over_floors(records_before)
            for start in range(0, len(releases), CLAIMS_IN_FLIGHT):
                chunk = releases[start : start + CLAIMS_IN_FLIGHT]
                await asyncio.gather(*(self._delete_record(child, reason) for child, reason in chunk))
        finally:
            self.ownership.releasing.difference_update(ids)

    async def _hand_over_floors(self, removed: dict[str, ChildSaRecord | None]) -> None:
        """The inbound SAs just removed accept nothing more: give the next owner their exact
        replay top instead of the block-ahead floor, so the peer's traffic is not dropped
        (up to a block of it) after a graceful hand-over."""
        tops: dict[str, int] = getattr(self.reconciler.backend, "final_replay_tops", {})
        hand_over = getattr(self.reconciler.persistence, "hand_over_replay_floor", None)
        if hand_over is None:
            return
        jobs = []
        for child, record in removed.items():
            top = tops.pop(child, None)
            if record is not None and top is not None and child in self.reconciler.records:
                jobs.append(hand_over(child, record.inbound.spi, top))
        for start in range(0, len(jobs), CLAIMS_IN_FLIGHT):
            results = await asyncio.gather(*jobs[start : start + CLAIMS_IN_FLIGHT], return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):  # the block-ahead floor stays: safe, only higher
                    log.warning("replay floor not handed over: %s", result)

    async def _delete_record(self, child: str, reason: str) -> None:
        owner = self.ownership.owners.get(child)
        if owner is None:
            return
        key = schema.sa_owner(child)
        result = await self.store.commit([Compare(key, owner.revision)], [Delete(key)])
        if not result.succeeded:
            return  # already gone or rewritten: the watch tells
        self._delete_owner(key, result.revision)
        self.counters.releases += 1
        if reason != "deleted":
            self.counters.moved(reason)
            if self.on_moved is not None:
                self.on_moved("released", reason, 1)

    async def _claim(self, members: dict[str, float], records: dict[str, ChildSaRecord]) -> None:
        lease = self.membership.lease_id
        if not lease or self.node not in members:
            return
        claims = [
            child
            for child, record in records.items()
            if child not in self.ownership.owners and desired_owner(record, members) == self.node
        ]
        if not claims:
            return
        claimed: list[str] = []
        for start in range(0, len(claims), CLAIMS_IN_FLIGHT):
            chunk = claims[start : start + CLAIMS_IN_FLIGHT]
            results = await asyncio.gather(*(self._create_record(child, lease) for child in chunk))
            claimed.extend(child for child, won in zip(chunk, results, strict=True) if won)
        if not claimed:
            return
        await self.reconciler.reevaluate(claimed)
        self._steer()
        now = time.monotonic()
        failovers = 0
        for child in claimed:
            previous = self._previous_owner.pop(child, None)
            if previous is None:
                continue
            if previous not in self.members:
                failovers += 1
            else:
                self._claimed_from[child] = (previous, now)
        for child in [c for c, (_, at) in self._claimed_from.items() if now - at > 10]:
            del self._claimed_from[child]
        self.counters.claims += len(claimed)
        self._count_failovers(failovers)
        if self.on_moved is not None:
            self.on_moved("claimed", "claim", len(claimed))
        log.info("dataplane node %s claimed %d SAs", self.node, len(claimed))

    async def _create_record(self, child: str, lease: int) -> bool:
        key = schema.sa_owner(child)
        document = encode_document({"node": self.node, "claimed_at": time.time()})
        result = await self.store.commit([Compare(key, 0)], [Put(key, document, lease=lease)])
        if not result.succeeded:
            self.counters.claim_conflicts += 1
            return False
        self._put_owner(KeyValue(key, document, result.revision, result.revision, 1, lease), result.revision)
        return True

    async def _settle(self, records: dict[str, ChildSaRecord]) -> None:
        installed = self.reconciler.installed
        wrong = [child for child in installed if child not in records or not self.ownership.owns(records[child])]
        missing = [child for child, record in records.items() if child not in installed and self.ownership.owns(record)]
        if wrong or missing:
            await self.reconciler.reevaluate(wrong + missing)
        self._steer()

    # -- stopping -------------------------------------------------------------------------
    async def leave(self, revoke: Callable[[], Awaitable[None]]) -> None:
        """Graceful stop: stop carrying everything, then give the lease up (survivors claim at once)."""
        self.leaving = True
        installed = list(self.reconciler.installed)
        records_before = {child: self.reconciler.installed.get(child) for child in installed}
        self.ownership.releasing.update(installed)
        with contextlib.suppress(Exception):
            await self.reconciler.reevaluate(installed, offline=True)
        if self.steering is not None:
            with contextlib.suppress(Exception):
                self.steering.apply([])
        if self.membership.lease_valid():  # the owner records are still ours: hand the floors over
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(self._hand_over_floors(records_before), timeout=1.0)
        if installed:
            self.counters.moved("leave", len(installed))
        self.membership.document.update(accepting=False, leaving=True)
        with contextlib.suppress(StoreError, TimeoutError):
            await asyncio.wait_for(self.membership.update(), timeout=1.0)
        await revoke()
