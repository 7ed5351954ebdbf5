"""The key handoff through the store: Child SA records, their SPD entries and SPIs, and the
dataplane's install acknowledgements.

Conventions (docs/keyexchange-service.md has the whole picture):

- `sas/child/<child id>`: the sealed `ChildSaRecord` (`to_document(bound.seal)`); reqid set.
- `spd/<policy id>`: `SpdPolicy` documents. For each negotiated selector pair `i` of a Child SA,
  ids are `<connection>.<child>.<i>-<h>.<out|in|fwd>`, `h` a short digest of the pair (so the
  Child SAs of many peers on one connection never share an entry, while the SAs that replace
  each other on the same traffic do). `fwd` only in tunnel mode. `child_sa` names the Child SA
  that carries the traffic.
- `spi/<spi hex>`: the inbound SPI, taken over from its reservation (`SpiReservations`).

One transaction per step, so the dataplane never sees half of one:

- responder, new Child SA (`InstallInboundSa`): record + SPI + its SPD entries;
- responder, rekey (`InstallInboundSa` with `rekey_of`): record + SPI only. The policies move
  to the new SA when the initiator deletes the old one (it has installed the new pair by then:
  make-before-break without a window where we send on an SA the peer cannot open yet);
- initiator (`ChildSaEstablished`/`ChildSaRekeyed`): record + SPI + SPD entries (re-pointed
  from the old Child SA in the same transaction);
- `ChildSaDeleted`: record and SPI deleted; SPD entries that still point at it move to its
  successor if it has one, else go.

Acks: one watch on `dataplane/acks/`; the first ack for a Child SA (any node) releases it:
`on_ack(ike_sa, child_id)`, which the engine turns into `inbound_sa_installed`.

Store work is pipelined: each traffic (the SPD entries a Child SA carries) has its own chain of
steps, in event order; chains of different traffic run concurrently, so many setups share the
store's group commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import Mode
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    Event,
    InstallInboundSa,
)
from esplanade.keyexchange.spi_reservations import SpiReservations
from esplanade.store import schema
from esplanade.store.base import Compare, Delete, Put, Resync, Store, StoreError, WatchBatch
from esplanade.store.sealing import Sealer, encode_document

log = logging.getLogger(__name__)

AckCallback = Callable[[str, str], None]
TRAP_PRIORITY_OFFSET = 500  # trap entries lose to installed ones on the same traffic
REKEYED_INBOUND_GRACE = 1.0  # seconds a replaced Child SA's inbound SA outlives its DELETE


def selector_priority(local: TrafficSelector, remote: TrafficSelector) -> int:
    """Lower wins (XFRM): more specific selectors first."""
    span = sum(n.prefixlen for n in local.networks()[:1]) + sum(n.prefixlen for n in remote.networks()[:1])
    return 2000 - span


def reqid_of(connection: str, child: str) -> int:
    return (zlib.crc32(f"{connection}/{child}".encode()) & 0x3FFFFFFF) or 1


def policy_base(connection: str, child: str, index: int, local: TrafficSelector, remote: TrafficSelector) -> str:
    digest = hashlib.sha256(f"{local}|{remote}".encode()).hexdigest()[:8]
    return f"{connection}.{child}.{index}-{digest}"


def policies_for(record: ChildSaRecord) -> list[SpdPolicy]:
    out = record.outbound
    directions = [PolicyDirection.OUT, PolicyDirection.IN]
    if out.mode == Mode.TUNNEL:
        directions.append(PolicyDirection.FWD)
    policies = []
    pairs = itertools.product(out.local_ts, out.remote_ts)
    for index, (local, remote) in enumerate(pairs):
        base = policy_base(record.connection, record.child, index, local, remote)
        for direction in directions:
            outward = direction == PolicyDirection.OUT
            policies.append(
                SpdPolicy(
                    id=f"{base}.{direction.name.lower()}",
                    direction=direction,
                    local_ts=local,
                    remote_ts=remote,
                    action=PolicyAction.PROTECT,
                    priority=selector_priority(local, remote),
                    child_sa=record.id,
                    connection=record.connection,
                    protocol=out.protocol,
                    mode=out.mode,
                    tunnel_src=(out.src if outward else out.dst) if out.mode == Mode.TUNNEL else "",
                    tunnel_dst=(out.dst if outward else out.src) if out.mode == Mode.TUNNEL else "",
                    reqid=out.reqid,
                )
            )
    return policies


def trap_policies(
    connection: str, child: str, local_ts: tuple[TrafficSelector, ...], remote_ts: tuple[TrafficSelector, ...]
) -> list[SpdPolicy]:
    """start_action=trap: an outbound entry without SAs whose traffic triggers an acquire."""
    return [
        SpdPolicy(
            id=f"{connection}.{child}.trap{index}.out",
            direction=PolicyDirection.OUT,
            local_ts=local,
            remote_ts=remote,
            action=PolicyAction.PROTECT,
            priority=selector_priority(local, remote) + TRAP_PRIORITY_OFFSET,
            connection=connection,
            reqid=reqid_of(connection, child),
            trap=True,
        )
        for index, (local, remote) in enumerate(itertools.product(local_ts, remote_ts))
    ]


@dataclass
class WrittenChild:
    record: ChildSaRecord
    revision: int
    policies: tuple[str, ...] = ()  # SPD ids this Child SA carries (or will, after its predecessor goes)


class ChildSaHandoff:
    def __init__(self, store: Store, sealer: Sealer, spis: SpiReservations, on_ack: AckCallback) -> None:
        self.store = store
        self.sealer = sealer
        self.spis = spis
        self.on_ack = on_ack
        self.written: dict[str, WrittenChild] = {}
        self.policies: dict[str, SpdPolicy] = {}  # SPD entries we wrote, as written
        self.successor: dict[str, str] = {}  # old child id -> the Child SA that replaces it
        # SPD id -> Child SAs (install order) negotiated for that traffic: duplicates and rekeys
        self.carriers: dict[str, list[str]] = {}
        self._awaiting_ack: dict[str, str] = {}  # child id -> IKE SA id
        self._acked: set[str] = set()
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._delayed: set[asyncio.Task[None]] = set()
        self._group_of: dict[str, str] = {}  # child id -> the chain its store steps run on
        self.counters: dict[str, int] = {}
        self.failures: list[tuple[str, str, str]] = []  # (ike, child, reason) of writes that failed
        self.on_write_failed: Callable[[str, str, str], None] = lambda ike, child, reason: None
        # Child SAs a previous keyexchange boot left in the store: child id -> (inbound SPI, SPD ids)
        self.orphans: dict[str, tuple[int, set[str]]] = {}
        self._orphan_of_policy: dict[str, str] = {}

    def adopt_orphans(self, orphans: dict[str, tuple[int, set[str]]]) -> None:
        """Records whose IKE SA died with a previous boot. The first Child SA that takes one
        of their SPD entries over deletes them (record, SPI, the rest of their entries) in its
        own transaction; `ChildSaHandoff` never touches them otherwise."""
        self.orphans = orphans
        self._orphan_of_policy = {pid: cid for cid, (_, pids) in orphans.items() for pid in pids}

    def adopt_written(self, records: list[tuple[ChildSaRecord, int]], policies: list[SpdPolicy]) -> None:
        """Child SAs of an IKE SA taken over from another instance: what that instance wrote
        (records at their revisions, the SPD entries pointing at them) becomes ours to rekey,
        re-point and delete, as if we had written it."""
        by_child: dict[str, list[SpdPolicy]] = {}
        for policy in policies:
            if policy.child_sa:
                by_child.setdefault(policy.child_sa, []).append(policy)
        for record, revision in records:
            carried = by_child.get(record.id, [])
            self.written[record.id] = WrittenChild(record, revision, tuple(p.id for p in carried))
            self._acked.add(record.id)
            self._carry(record.id, carried)
            self.policies.update((p.id, p) for p in carried)
            self.orphans.pop(record.id, None)
        self._orphan_of_policy = {pid: cid for cid, (_, pids) in self.orphans.items() for pid in pids}

    def _orphan_ops(self, policies: list[SpdPolicy]) -> list[Put | Delete]:
        ops: list[Put | Delete] = []
        ours = {p.id for p in policies}
        for pid in ours:
            orphan = self._orphan_of_policy.pop(pid, None)
            if orphan is None or orphan not in self.orphans:
                continue
            spi, pids = self.orphans.pop(orphan)
            ops += [Delete(schema.child_sa(orphan)), Delete(schema.spi_allocation(spi))]
            ops += [Delete(schema.spd_policy(other)) for other in pids - ours]
            for other in pids:
                self._orphan_of_policy.pop(other, None)
            self._count("orphans_replaced")
        return ops

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- events -> chained store steps ----------------------------------------------------
    def handle(self, event: Event) -> None:
        if isinstance(event, InstallInboundSa):
            if event.record is not None:
                group = self._group(event.record)
                self._chain(group, self._write_responder(event.ike_sa, event.record))
        elif isinstance(event, ChildSaEstablished):
            if event.child_id not in self._group_of:
                group = self._group(event.record)
                self._chain(group, self._write_initiator(event.ike_sa, event.record, ""))
        elif isinstance(event, ChildSaRekeyed):
            self.successor[event.old_child_id] = event.new_child_id
            if event.new_child_id not in self._group_of:
                group = self._group(event.record)
                self._chain(group, self._write_initiator(event.ike_sa, event.record, event.old_child_id))
        elif isinstance(event, ChildSaDeleted):
            group = self._group_of.pop(event.child_id, "")
            self._chain(group or event.ike_sa, self._delete(event.child_id))

    def _group(self, record: ChildSaRecord) -> str:
        """Steps are chained per traffic (the SPD entries a Child SA carries), not per IKE SA:
        the Child SAs that take entries over from each other (rekeys, reauthentication,
        duplicates, a restarted instance) then write in event order, while unrelated traffic
        (every remote-access client has its own) is written concurrently."""
        out = record.outbound
        group = "none"
        if out.local_ts and out.remote_ts:
            group = policy_base(record.connection, record.child, 0, out.local_ts[0], out.remote_ts[0])
        self._group_of[record.id] = group
        return group

    def _chain(self, key: str, step: Coroutine[Any, Any, None]) -> None:
        previous = self._chains.get(key)

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await previous
            try:
                await step
            except StoreError as exc:
                log.warning("store step failed: %s", exc)
            except Exception:
                log.exception("store step failed")
            finally:
                if self._chains.get(key) is task:
                    del self._chains[key]

        task = asyncio.get_running_loop().create_task(run(), name=f"handoff:{key}")
        self._chains[key] = task

    async def drain(self) -> None:
        """Wait until every queued store step has run (tests, shutdown)."""
        while self._chains or self._delayed:
            await asyncio.gather(*self._chains.values(), *self._delayed, return_exceptions=True)

    # -- writing ---------------------------------------------------------------------------
    def _with_reqid(self, record: ChildSaRecord) -> ChildSaRecord:
        reqid = reqid_of(record.connection, record.child)
        return replace(
            record, inbound=replace(record.inbound, reqid=reqid), outbound=replace(record.outbound, reqid=reqid)
        )

    def _record_ops(self, record: ChildSaRecord) -> tuple[list[Compare], list[Put | Delete]]:
        key = schema.child_sa(record.id)
        value = encode_document(record.to_document(self.sealer.bind(key).seal))
        conditions, spi_ops = self.spis.installed_ops(record.inbound.spi, record.id)
        return conditions, [Put(key, value), *spi_ops]

    def _policy_ops(self, policies: list[SpdPolicy]) -> list[Put | Delete]:
        return [Put(schema.spd_policy(p.id), encode_document(p.to_document())) for p in policies]

    async def _commit(
        self, ike: str, record: ChildSaRecord, conditions: list[Compare], ops: list[Put | Delete]
    ) -> int | None:
        self._awaiting_ack[record.id] = ike
        try:
            result = await self.store.commit(conditions, ops)
        except (StoreError, ValueError) as exc:
            self._write_failed(ike, record.id, f"store write failed: {exc}")
            return None
        if not result.succeeded:
            self._write_failed(ike, record.id, "inbound SPI reservation lost (spi/ key changed)")
            return None
        self.spis.installed(record.inbound.spi, result.revision)
        self._count("records_written")
        if record.id in self._acked:
            self._ack(record.id)
        return result.revision

    def _write_failed(self, ike: str, child: str, reason: str) -> None:
        self._awaiting_ack.pop(child, None)
        self._count("write_failures")
        self.failures.append((ike, child, reason))
        log.warning("Child SA %s not written: %s", child, reason)
        self.on_write_failed(ike, child, reason)

    async def _write_responder(self, ike: str, record: ChildSaRecord) -> None:
        record = self._with_reqid(record)
        conditions, ops = self._record_ops(record)
        policies = policies_for(record)
        if not record.rekey_of:
            ops += self._policy_ops(policies) + self._orphan_ops(policies)
        revision = await self._commit(ike, record, conditions, ops)
        if revision is None:
            return
        self.written[record.id] = WrittenChild(record, revision, tuple(p.id for p in policies))
        self._carry(record.id, policies)
        if record.rekey_of:
            self.successor[record.rekey_of] = record.id
        else:
            self.policies.update((p.id, p) for p in policies)

    async def _write_initiator(self, ike: str, record: ChildSaRecord, old: str) -> None:
        record = self._with_reqid(record)
        if old:
            record = replace(record, rekey_of=old)
        conditions, ops = self._record_ops(record)
        policies = policies_for(record)
        ops += self._policy_ops(policies) + self._orphan_ops(policies)
        revision = await self._commit(ike, record, conditions, ops)
        if revision is None:
            return
        self.written[record.id] = WrittenChild(record, revision, tuple(p.id for p in policies))
        self._carry(record.id, policies)
        self.policies.update((p.id, p) for p in policies)

    def _carry(self, child_id: str, policies: list[SpdPolicy]) -> None:
        for p in policies:
            self.carriers.setdefault(p.id, []).append(child_id)

    async def _delete(self, child_id: str) -> None:
        self._awaiting_ack.pop(child_id, None)
        self._acked.discard(child_id)
        written = self.written.pop(child_id, None)
        if written is None:
            return
        ops: list[Put | Delete] = [Delete(schema.child_sa(child_id)), self.spis.release_op(written.record.inbound.spi)]
        heir_id = self.successor.pop(child_id, None)
        moved: list[SpdPolicy] = []
        for pid in written.policies:
            carriers = self.carriers.get(pid, [])
            if child_id in carriers:
                carriers.remove(child_id)
            current = self.policies.get(pid)
            if current is None or current.child_sa != child_id:
                if not carriers:
                    self.carriers.pop(pid, None)
                continue  # carried by another Child SA already
            # its successor if it has one, else the newest other Child SA on the same traffic
            heir = heir_id if heir_id in carriers else (carriers[-1] if carriers else None)
            if heir is not None:
                moved.append(replace(current, child_sa=heir))
            else:
                ops.append(Delete(schema.spd_policy(pid)))
                del self.policies[pid]
                self.carriers.pop(pid, None)
        ops += self._policy_ops(moved)
        self.policies.update((p.id, p) for p in moved)
        if heir_id is not None and heir_id in self.written:
            # A rekeyed SA: its traffic moves now, but its inbound SA stays a moment longer, for
            # the packets the peer sent before its own dataplane switched (it learns of the
            # switch through its store, a few milliseconds later than the DELETE exchange).
            record_ops, ops = ops[:2], ops[2:]
            if ops and not await self._commit_quietly(child_id, ops):
                return

            async def later() -> None:
                await asyncio.sleep(REKEYED_INBOUND_GRACE)
                if await self._commit_quietly(child_id, record_ops):
                    self._count("records_deleted")

            task = asyncio.get_running_loop().create_task(later(), name=f"handoff-grace:{child_id}")
            self._delayed.add(task)
            task.add_done_callback(self._delayed.discard)
            return
        if await self._commit_quietly(child_id, ops):
            self._count("records_deleted")

    async def _commit_quietly(self, child_id: str, ops: list[Put | Delete]) -> bool:
        try:
            await self.store.commit([], ops)
        except (StoreError, ValueError) as exc:
            log.warning("cannot delete Child SA %s from the store: %s", child_id, exc)
            return False
        return True

    def child_of_spi(self, spi: int) -> bool:
        return any(w.record.inbound.spi == spi for w in self.written.values())

    # -- acks ------------------------------------------------------------------------------
    async def follow_acks(self) -> None:
        prefix = schema.prefix("dataplane", "acks")
        _, revision = await self.store.range(prefix, limit=1)
        async for item in self.store.watch(prefix, revision + 1):
            if isinstance(item, Resync):
                for kv in item.kvs:
                    self._seen_ack(kv.key)
            elif isinstance(item, WatchBatch):
                for ev in item.events:
                    if ev.type.value == "put":
                        self._seen_ack(ev.kv.key)

    def _seen_ack(self, key: str) -> None:
        rest = key[len(schema.prefix("dataplane", "acks")) :]
        child_id = rest.split("/", 1)[0]
        if child_id in self._awaiting_ack:
            self._ack(child_id)
        elif child_id not in self.written:
            # the ack may come before the commit returns to us; remember it briefly
            self._acked.add(child_id)
            if len(self._acked) > 4096:
                self._acked.clear()

    def _ack(self, child_id: str) -> None:
        self._acked.discard(child_id)
        ike = self._awaiting_ack.pop(child_id, None)
        if ike is not None:
            self._count("acks")
            self.on_ack(ike, child_id)
