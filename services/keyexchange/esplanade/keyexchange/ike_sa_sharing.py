"""Several keyexchange instances share IKE SAs through the store, as strongSwan's HA plugin
syncs IKE state between cluster nodes.

    sas/ike/<ike_sa_id>            the IKE SA as `IkeSa.to_state` captured it (SK_* and Child
                                   SA keys sealed under the KEK), no lease: it outlives its owner
    keyexchange/owners/<ike_sa_id> {"instance", "spi_i"} under the owner instance's lease

Persisting: after every engine step, each ESTABLISHED IKE SA that is quiescent (no exchange of
ours in flight, nothing queued or held) and changed since its last write (message IDs, state,
Child SAs, timers) is written again: so the store holds the state after every completed
exchange, with the message IDs to continue from. The owner record is created with the
first write. A deleted IKE SA's state and owner record go.

Routing: the dataplane relay sends each datagram to the instance named by the owner record
of its initiator SPI, and otherwise to the rendezvous winner over the connected instances
(`esplanade.cluster.rendezvous.choose(spi_i.hex(), instances)`). IKE SAs we initiate get an
SPIi whose rendezvous winner over the live instances is this instance (`choose_spi`), so
their responses reach us before any owner record exists.

Takeover: when an instance dies its lease expires and its owner records go. Every instance
then looks for IKE SA states without an owner; the rendezvous winner of each (over the live
instances, the same choice the relay makes) claims it (CAS "must not exist", under its
lease), restores it with `IkeSa.from_state` into its dispatcher and adopts its Child SA
records: rekeys, DPD and deletes go on from the persisted message IDs. IKE SAs do not move
when an instance joins (their owner records keep routing them); new IKE SAs spread over
all instances.

Known window: an exchange that completed at the dying owner but whose state was not yet
written (a few milliseconds) leaves the successor one message ID behind; the peer then
retransmits and finally re-establishes, as after any IKE SA loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from esplanade.cluster.rendezvous import choose
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy
from esplanade.keyexchange.child_sa_handoff import ChildSaHandoff
from esplanade.keyexchange.engine_driver import IkeEngine
from esplanade.keyexchange.ikev2.events import Event, IkeSaDeleted
from esplanade.keyexchange.ikev2.ike_sa import IkeSa, IkeState
from esplanade.keyexchange.ikev2.ike_sa_state import StateError
from esplanade.store import schema
from esplanade.store.base import Compare, Delete, KeyValue, Put, Resync, Store, StoreError, WatchBatch
from esplanade.store.sealing import Sealer, SealingError, decode_document, encode_document

log = logging.getLogger(__name__)

INSTANCES_PREFIX = schema.prefix("keyexchange", "instances")
OWNERS_PREFIX = schema.prefix("keyexchange", "owners")
IKE_PREFIX = schema.prefix("sas", "ike")
SPI_DRAWS = 256


def fingerprint(sa: IkeSa) -> tuple[Any, ...]:
    return (
        sa.state.value,
        sa.next_request_id,
        sa.next_peer_id,
        tuple(sorted((c.id, c.state.value, c.spi_in, c.spi_out, c.rekey_at) for c in sa.children.values())),
        sa.rekey_at,
        sa.reauth_at,
        sa.expire_at,
        tuple(sa.virtual_ips),
        sa.nat_local,
        sa.nat_remote,
        sa.remote,
    )


class IkeSaSharing:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        engine: IkeEngine,
        handoff: ChildSaHandoff,
        instance: str,
        lease: Callable[[], int],
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.engine = engine
        self.handoff = handoff
        self.instance = instance
        self.lease = lease
        self.wall = wall
        self.members: set[str] = {instance}
        self.owners: dict[str, str] = {}  # IKE SA id -> owner instance
        self._written: dict[str, tuple[Any, ...]] = {}
        self._pending: dict[str, dict[str, Any] | None] = {}  # IKE SA id -> state to write (None: delete)
        self._owned: set[str] = set()  # owner records we created under the current lease
        self._wake = asyncio.Event()
        self._takeover = asyncio.Event()
        self.counters: dict[str, int] = {"writes": 0, "takeovers": 0, "takeover_failures": 0, "deletes": 0}
        self.counters["suspensions"] = 0
        self.suspended = False
        self._released: set[str] = set()  # ours, forgotten here while the lease was not provable
        engine.after_flush.append(self.after_flush)
        engine.listeners.append(self.on_event)

    # -- routing ----------------------------------------------------------------------------
    def choose_spi(self) -> bytes:
        """An IKE SPI the relay routes to this instance (rendezvous over the live instances)."""
        members = self.members | {self.instance}
        for _ in range(SPI_DRAWS):
            spi = os.urandom(8)
            if choose(spi.hex(), members) == self.instance:
                return spi
        return os.urandom(8)

    # -- persisting -------------------------------------------------------------------------
    def after_flush(self) -> None:
        now, wall = self.engine.now, self.wall()
        changed = False
        for sa in self.engine.dispatcher.sas.values():
            if sa.state != IkeState.ESTABLISHED or not sa.quiescent():
                continue
            mark = fingerprint(sa)
            if self._written.get(sa.id) == mark:
                continue
            key = schema.ike_sa(sa.id)
            try:
                self._pending[sa.id] = sa.to_state(now, wall, self.sealer.bind(key).seal)
            except (StateError, SealingError) as exc:
                log.error("IKE SA %s not persisted: %s", sa.id, exc)
                continue
            self._written[sa.id] = mark
            changed = True
        if changed:
            self._wake.set()

    def on_event(self, event: Event) -> None:
        if isinstance(event, IkeSaDeleted):
            self._written.pop(event.ike_sa, None)
            self._pending[event.ike_sa] = None
            self._wake.set()

    async def write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            for ike_id, document in pending.items():
                try:
                    if document is None:
                        await self._delete(ike_id)
                    else:
                        await self._write(ike_id, document)
                except StoreError as exc:
                    log.warning("IKE SA %s state not written: %s; retrying", ike_id, exc)
                    self._pending.setdefault(ike_id, document)
                    self._written.pop(ike_id, None)
            if self._pending:
                await asyncio.sleep(0.2)
                self._wake.set()

    async def _write(self, ike_id: str, document: dict[str, Any]) -> None:
        ops: list[Put | Delete] = [Put(schema.ike_sa(ike_id), encode_document(document))]
        conditions: list[Compare] = []
        owner_key = schema.ike_sa_owner(ike_id)
        if ike_id not in self._owned:
            conditions.append(Compare(owner_key, 0))
            owner = {"instance": self.instance, "spi_i": document["spi_i"]}
            ops.append(Put(owner_key, encode_document(owner), lease=self.lease()))
        result = await self.store.commit(conditions, ops)
        if not result.succeeded:
            current = await self.store.get(owner_key)
            if current is not None and json.loads(current.value).get("instance") == self.instance:
                self._owned.add(ike_id)  # ours already (a write whose answer was lost)
                await self.store.put(schema.ike_sa(ike_id), encode_document(document))
            else:
                log.error("IKE SA %s is owned by another instance; not persisting it", ike_id)
                return
        self._owned.add(ike_id)
        self.owners[ike_id] = self.instance
        self.counters["writes"] += 1

    async def _delete(self, ike_id: str) -> None:
        ops: list[Put | Delete] = [Delete(schema.ike_sa(ike_id))]
        if ike_id in self._owned:
            ops.append(Delete(schema.ike_sa_owner(ike_id)))
        await self.store.commit([], ops)
        self._owned.discard(ike_id)
        self.counters["deletes"] += 1

    def suspend(self) -> None:
        """Our lease is no longer provable: forget our IKE SAs here (their state stays in the
        store) so that we never speak for an IKE SA a survivor may already carry."""
        if self.suspended:
            return
        self.suspended = True
        released = [ike_id for ike_id in list(self.engine.dispatcher.sas) if ike_id in self._owned]
        self._released.update(released)
        for ike_id in released:
            self.engine.dispatcher.release(ike_id)
            self._written.pop(ike_id, None)
        self.counters["suspensions"] += 1
        log.error("keyexchange lease not provable: stopped carrying %d IKE SAs", len(released))

    def resume(self) -> None:
        """The lease is provable again: owner records still ours are restored from the store."""
        if self.suspended:
            self.suspended = False
            self._takeover.set()

    def lease_renewed(self) -> None:
        """A new lease: our owner records went with the old one; write them again."""
        self._owned.clear()
        self._written.clear()
        self.after_flush()

    # -- following the others ---------------------------------------------------------------
    async def run(self) -> None:
        instances, revision = await self.store.range(INSTANCES_PREFIX)
        owners, owners_revision = await self.store.range(OWNERS_PREFIX)
        self.members = {kv.key[len(INSTANCES_PREFIX) :] for kv in instances} | {self.instance}
        for kv in owners:
            self._owner_put(kv)
        self._takeover.set()
        await asyncio.gather(
            self._follow(INSTANCES_PREFIX, revision + 1, self._instance_event),
            self._follow(OWNERS_PREFIX, owners_revision + 1, self._owner_event),
            self.write_forever(),
            self._takeover_forever(),
        )

    async def _follow(self, prefix: str, start: int, apply: Callable[[KeyValue, bool], None]) -> None:
        async for item in self.store.watch(prefix, start):
            if isinstance(item, Resync):
                if prefix == INSTANCES_PREFIX:
                    self.members = {kv.key[len(prefix) :] for kv in item.kvs} | {self.instance}
                else:
                    self.owners.clear()
                    for kv in item.kvs:
                        self._owner_put(kv)
            elif isinstance(item, WatchBatch):
                for event in item.events:
                    apply(event.kv, event.type.value == "put")
            self._takeover.set()

    def _instance_event(self, kv: KeyValue, put: bool) -> None:
        name = kv.key[len(INSTANCES_PREFIX) :]
        if put:
            self.members.add(name)
        elif name != self.instance:
            self.members.discard(name)

    def _owner_put(self, kv: KeyValue) -> None:
        with contextlib.suppress(ValueError, TypeError):
            self.owners[kv.key[len(OWNERS_PREFIX) :]] = str(json.loads(kv.value).get("instance", ""))

    def _owner_event(self, kv: KeyValue, put: bool) -> None:
        if put:
            self._owner_put(kv)
        else:
            self.owners.pop(kv.key[len(OWNERS_PREFIX) :], None)

    # -- taking over ------------------------------------------------------------------------
    async def _takeover_forever(self) -> None:
        while True:
            await self._takeover.wait()
            self._takeover.clear()
            try:
                await self.take_over_orphaned()
            except StoreError as exc:
                log.warning("IKE SA takeover pass failed: %s", exc)
                await asyncio.sleep(0.5)
                self._takeover.set()

    async def take_over_orphaned(self) -> int:
        states, _ = await self.store.range(IKE_PREFIX)
        taken = 0
        if self.suspended:
            return 0
        for kv in states:
            ike_id = kv.key[len(IKE_PREFIX) :]
            if ike_id in self.engine.dispatcher.sas:
                continue
            owner = self.owners.get(ike_id)
            if owner == self.instance:
                # ours: restore it only if a suspension released it (never one we deleted or
                # replaced by a rekey, whose state is about to go)
                if ike_id in self._released and ike_id in self._owned and await self._restore(ike_id, kv):
                    taken += 1
                self._released.discard(ike_id)
                continue
            if owner is not None or self._pending.get(ike_id, {}) is None:
                continue
            try:
                document = decode_document(kv.key, kv.value)
                spi_i = str(document["spi_i"])
            except (KeyError, TypeError, ValueError):
                continue
            if choose(spi_i, self.members) != self.instance:
                continue
            if await self._take_over(ike_id, kv, document):
                taken += 1
        return taken

    async def _restore(self, ike_id: str, kv: KeyValue) -> bool:
        try:
            document = decode_document(kv.key, kv.value)
        except (TypeError, ValueError):
            return False
        return await self._adopt(ike_id, kv, document)

    async def _take_over(self, ike_id: str, kv: KeyValue, document: dict[str, Any]) -> bool:
        owner_key = schema.ike_sa_owner(ike_id)
        owner = {"instance": self.instance, "spi_i": document["spi_i"], "taken_over": True}
        result = await self.store.commit(
            [Compare(owner_key, 0), Compare(kv.key, kv.mod_revision)],
            [Put(owner_key, encode_document(owner), lease=self.lease())],
        )
        if not result.succeeded:
            return False
        self._owned.add(ike_id)
        self.owners[ike_id] = self.instance
        return await self._adopt(ike_id, kv, document)

    async def _adopt(self, ike_id: str, kv: KeyValue, document: dict[str, Any]) -> bool:
        owner_key = schema.ike_sa_owner(ike_id)
        config = self.engine.dispatcher.configs.get(str(document.get("connection", "")))
        try:
            if config is None:
                raise StateError(f"connection {document.get('connection')!r} is not loaded")
            sa = IkeSa.from_state(
                document,
                config,
                self.engine.dispatcher.hooks,
                self.engine.now,
                self.wall(),
                self.sealer.bind(kv.key).open,
            )
        except (StateError, SealingError) as exc:
            self.counters["takeover_failures"] += 1
            log.error("IKE SA %s cannot be taken over: %s", ike_id, exc)
            await self.store.commit([], [Delete(owner_key)])
            self._owned.discard(ike_id)
            return False
        records, policies = await self._children_of(sa)
        self.handoff.adopt_written(records, policies)
        self.engine.call(self.engine.dispatcher.adopt, sa)
        self._written[ike_id] = fingerprint(sa)
        self.counters["takeovers"] += 1
        log.info(
            "took over IKE SA %s (%d Child SAs) at message IDs %d/%d",
            ike_id,
            len(sa.children),
            sa.next_request_id,
            sa.next_peer_id,
        )
        return True

    async def _children_of(self, sa: IkeSa) -> tuple[list[tuple[ChildSaRecord, int]], list[SpdPolicy]]:
        records: list[tuple[ChildSaRecord, int]] = []
        for child_id in sa.children:
            key = schema.child_sa(child_id)
            kv = await self.store.get(key)
            if kv is None:
                continue
            with contextlib.suppress(SealingError, KeyError, TypeError, ValueError):
                document = decode_document(kv.key, kv.value)
                records.append((ChildSaRecord.from_document(document, self.sealer.bind(key).open), kv.mod_revision))
        policies: list[SpdPolicy] = []
        entries, _ = await self.store.range(schema.prefix("spd"))
        for kv in entries:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                policy = SpdPolicy.from_document(decode_document(kv.key, kv.value))
                if policy.child_sa in sa.children:
                    policies.append(policy)
        return records, policies
