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

Acks: one watch on `dataplane/acks/`, plus the dataplane's in-band install notices when
keyexchange relays IKE over its local socket (`installed_in_band`, sent just before the store
ack); the first word of an install for a Child SA (any node) releases it:
`on_ack(ike_sa, child_id)`, which the engine turns into `inbound_sa_installed`.

Store work is pipelined: each event is planned at once, in event order (its ops computed and
the in-memory view of what the store holds updated), and its transaction joins the chain of
its traffic (the SPD entries a Child SA carries). A chain commits in order, and what queued up
behind a commit in flight goes in the next one together (the newest op of each key; the
conditions of all): duplicates and rekeys of one traffic share transactions under load, and
chains of different traffic run concurrently. Should a merged transaction fail, its steps are
committed one by one, so a lost SPI reservation fails only its own Child SA: that one's SPD
entries then go back to whoever else carries them (its record never reached the store).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import IpProto, Mode
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    Event,
    InstallInboundSa,
)
from esplanade.keyexchange.spi_reservations import SpiReservations
from esplanade.store import schema
from esplanade.store.base import (
    MAX_REQUEST_BYTES,
    MAX_TXN_OPS,
    Compare,
    Delete,
    Put,
    Resync,
    Store,
    StoreError,
    WatchBatch,
)
from esplanade.store.sealing import Sealer, encode_document

log = logging.getLogger(__name__)

AckCallback = Callable[[str, str], None]
TRAP_PRIORITY_OFFSET = 500  # trap entries lose to installed ones on the same traffic
REKEYED_INBOUND_GRACE = 1.0  # seconds a replaced Child SA's inbound SA outlives its DELETE
MERGE_MAX = 16  # steps of one chain merged into one transaction (limits permitting)


@dataclass
class StoreStep:
    """One event's store transaction, planned; `committed(revision)` or `failed(reason)` follows."""

    conditions: list[Compare]
    ops: list[Put | Delete]
    committed: Callable[[int], None] = lambda revision: None
    failed: Callable[[str], None] = lambda reason: None
    # (child id, SPI key) a delete step releases: left alone should that child's install fail
    releases: tuple[str, str] = ("", "")


def merge_steps(steps: list[StoreStep]) -> tuple[list[Compare], list[Put | Delete]] | None:
    """One transaction doing what `steps` do in order: their conditions, and the last op of
    each key (Put and Delete are unconditional, so that is the state the sequence leaves).
    None when they cannot be one (a key compared at two revisions, or a store limit)."""
    compared: dict[str, int] = {}
    for step in steps:
        for cond in step.conditions:
            if compared.setdefault(cond.key, cond.mod_revision) != cond.mod_revision:
                return None
    last: dict[str, Put | Delete] = {}
    for step in steps:
        for op in step.ops:
            last.pop(op.key, None)
            last[op.key] = op
    conditions = [Compare(key, revision) for key, revision in compared.items()]
    ops = list(last.values())
    size = sum(len(c.key) for c in conditions) + sum(len(o.key) + len(getattr(o, "value", b"")) for o in ops)
    if len(conditions) > MAX_TXN_OPS or len(ops) > MAX_TXN_OPS or size > MAX_REQUEST_BYTES // 2:
        return None
    return conditions, ops


@functools.lru_cache(maxsize=1024)
def selector_priority(local: TrafficSelector, remote: TrafficSelector) -> int:
    """Lower wins (XFRM): more specific selectors first."""
    span = sum(n.prefixlen for n in local.networks()[:1]) + sum(n.prefixlen for n in remote.networks()[:1])
    return 2000 - span


def reqid_of(connection: str, child: str) -> int:
    return (zlib.crc32(f"{connection}/{child}".encode()) & 0x3FFFFFFF) or 1


@functools.lru_cache(maxsize=1024)
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
                    if_id=out.if_id if outward else record.inbound.if_id,
                )
            )
    return policies


def trap_policies(
    connection: str,
    child: str,
    local_ts: tuple[TrafficSelector, ...],
    remote_ts: tuple[TrafficSelector, ...],
    *,
    tunnel: tuple[str, str] = ("", ""),
    mode: Mode = Mode.TUNNEL,
    protocol: IpProto = IpProto.ESP,
    if_id: int = 0,
) -> list[SpdPolicy]:
    """start_action=trap: an outbound entry without SAs whose traffic triggers an acquire.

    `tunnel` = (local, remote) outer addresses when the connection names exactly one of each:
    a kernel template then describes the SA the acquire asks for, as strongSwan's does."""
    return [
        SpdPolicy(
            id=f"{connection}.{child}.trap{index}.out",
            direction=PolicyDirection.OUT,
            local_ts=local,
            remote_ts=remote,
            action=PolicyAction.PROTECT,
            priority=selector_priority(local, remote) + TRAP_PRIORITY_OFFSET,
            connection=connection,
            protocol=protocol,
            mode=mode,
            tunnel_src=tunnel[0] if mode == Mode.TUNNEL else "",
            tunnel_dst=tunnel[1] if mode == Mode.TUNNEL else "",
            reqid=reqid_of(connection, child),
            trap=True,
            if_id=if_id,
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
        self._queues: dict[str, list[StoreStep]] = {}  # chain -> steps waiting for its commit in flight
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._delayed: set[asyncio.Task[None]] = set()
        self._group_of: dict[str, str] = {}  # child id -> the chain its store steps run on
        self._lost_installs: set[str] = set()  # failed installs whose delete was planned already
        self.counters: dict[str, int] = {}
        self.failures: list[tuple[str, str, str]] = []  # (ike, child, reason) of writes that failed
        self.on_write_failed: Callable[[str, str, str], None] = lambda ike, child, reason: None
        # IKE SA id -> the W3C trace context of its negotiation, written into the record so
        # the dataplane's install joins the trace (docs: telemetry)
        self.trace_carrier: Callable[[str], dict[str, str]] = lambda ike: {}
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

    # -- events -> planned steps, committed per chain -------------------------------------
    def handle(self, event: Event) -> None:
        if isinstance(event, InstallInboundSa):
            if event.record is not None:
                group = self._group(event.record)
                self._enqueue(group, self._plan_responder(event.ike_sa, event.record))
        elif isinstance(event, ChildSaEstablished):
            if event.child_id not in self._group_of:
                group = self._group(event.record)
                self._enqueue(group, self._plan_initiator(event.ike_sa, event.record, ""))
        elif isinstance(event, ChildSaRekeyed):
            self.successor[event.old_child_id] = event.new_child_id
            if event.new_child_id not in self._group_of:
                group = self._group(event.record)
                self._enqueue(group, self._plan_initiator(event.ike_sa, event.record, event.old_child_id))
        elif isinstance(event, ChildSaDeleted):
            group = self._group_of.pop(event.child_id, "")
            self._enqueue(group or event.ike_sa, self._plan_delete(event.child_id))

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

    def _enqueue(self, key: str, step: StoreStep | None) -> None:
        if step is None:
            return
        self._queues.setdefault(key, []).append(step)
        if key not in self._runners:
            self._runners[key] = asyncio.get_running_loop().create_task(self._run_chain(key), name=f"handoff:{key}")

    async def _run_chain(self, key: str) -> None:
        try:
            while True:
                queue = self._queues.get(key)
                if not queue:
                    break
                batch = queue[:MERGE_MAX]
                del queue[: len(batch)]
                try:
                    await self._commit_steps(batch)
                except Exception:
                    log.exception("store step failed")
        finally:
            self._queues.pop(key, None)
            self._runners.pop(key, None)

    async def _commit_steps(self, steps: list[StoreStep]) -> None:
        merged = merge_steps(steps) if len(steps) > 1 else None
        if merged is not None:
            try:
                result = await self.store.commit(*merged)
            except (StoreError, ValueError):
                result = None
            if result is not None and result.succeeded:
                self._count("merged_commits")
                for step in steps:
                    step.committed(result.revision)
                return
        for step in steps:  # one by one: a failure is then that step's own
            ops = step.ops
            child, spi_key = step.releases
            if child in self._lost_installs:  # its install failed: the SPI key is not ours
                self._lost_installs.discard(child)
                ops = [op for op in ops if op.key != spi_key]
            try:
                result = await self.store.commit(step.conditions, ops)
            except (StoreError, ValueError) as exc:
                step.failed(f"store write failed: {exc}")
                continue
            if result.succeeded:
                step.committed(result.revision)
            else:
                step.failed("inbound SPI reservation lost (spi/ key changed)")

    async def drain(self) -> None:
        """Wait until every queued store step has run (tests, shutdown)."""
        while self._runners or self._delayed:
            await asyncio.gather(*self._runners.values(), *self._delayed, return_exceptions=True)

    # -- planning ----------------------------------------------------------------------------
    def _with_reqid(self, record: ChildSaRecord) -> ChildSaRecord:
        reqid = reqid_of(record.connection, record.child)
        return replace(
            record, inbound=replace(record.inbound, reqid=reqid), outbound=replace(record.outbound, reqid=reqid)
        )

    def _traced(self, ike: str, record: ChildSaRecord) -> ChildSaRecord:
        carrier = self.trace_carrier(ike)
        return replace(record, trace_context=carrier) if carrier else record

    def _record_ops(self, record: ChildSaRecord) -> tuple[list[Compare], list[Put | Delete]]:
        key = schema.child_sa(record.id)
        value = encode_document(record.to_document(self.sealer.bind(key).seal))
        conditions, spi_ops = self.spis.installed_ops(record.inbound.spi, record.id)
        return conditions, [Put(key, value), *spi_ops]

    def _policy_ops(self, policies: list[SpdPolicy]) -> list[Put | Delete]:
        return [Put(schema.spd_policy(p.id), encode_document(p.to_document())) for p in policies]

    def _install_step(
        self, ike: str, record: ChildSaRecord, conditions: list[Compare], ops: list[Put | Delete]
    ) -> StoreStep:
        self._awaiting_ack[record.id] = ike
        return StoreStep(
            conditions,
            ops,
            committed=lambda revision: self._record_committed(record, revision),
            failed=lambda reason: self._install_failed(ike, record.id, reason),
        )

    def _record_committed(self, record: ChildSaRecord, revision: int) -> None:
        self._count("records_written")
        written = self.written.get(record.id)
        if written is None:
            return  # deleted meanwhile: its delete (planned already) releases the SPI
        written.revision = revision
        self.spis.installed(record.inbound.spi, revision)
        if record.id in self._acked:
            self._ack(record.id)

    def _install_failed(self, ike: str, child_id: str, reason: str) -> None:
        """The record never reached the store: take back what its plan assumed, and hand its SPD
        entries to whoever else carries them (its SPI key is not ours: it is left alone)."""
        written = self.written.pop(child_id, None)
        if written is None:
            self._lost_installs.add(child_id)  # deleted meanwhile: its delete step must spare the SPI key
        else:
            for old, new in list(self.successor.items()):
                if new == child_id:
                    del self.successor[old]
            group = self._group_of.get(child_id, "")
            moved = self._release_policies(child_id, written, None)
            if moved:
                self._enqueue(group or ike, StoreStep([], moved, failed=lambda why: log.warning("%s", why)))
        self._write_failed(ike, child_id, reason)

    def _write_failed(self, ike: str, child: str, reason: str) -> None:
        self._awaiting_ack.pop(child, None)
        self._count("write_failures")
        self.failures.append((ike, child, reason))
        log.warning("Child SA %s not written: %s", child, reason)
        self.on_write_failed(ike, child, reason)

    def _plan_responder(self, ike: str, record: ChildSaRecord) -> StoreStep:
        record = self._traced(ike, self._with_reqid(record))
        conditions, ops = self._record_ops(record)
        policies = policies_for(record)
        if not record.rekey_of:
            ops += self._policy_ops(policies) + self._orphan_ops(policies)
        step = self._install_step(ike, record, conditions, ops)
        self.written[record.id] = WrittenChild(record, 0, tuple(p.id for p in policies))
        self._carry(record.id, policies)
        if record.rekey_of:
            self.successor[record.rekey_of] = record.id
        else:
            self.policies.update((p.id, p) for p in policies)
        return step

    def _plan_initiator(self, ike: str, record: ChildSaRecord, old: str) -> StoreStep:
        record = self._traced(ike, self._with_reqid(record))
        if old:
            record = replace(record, rekey_of=old)
        conditions, ops = self._record_ops(record)
        policies = policies_for(record)
        ops += self._policy_ops(policies) + self._orphan_ops(policies)
        step = self._install_step(ike, record, conditions, ops)
        self.written[record.id] = WrittenChild(record, 0, tuple(p.id for p in policies))
        self._carry(record.id, policies)
        self.policies.update((p.id, p) for p in policies)
        return step

    def _carry(self, child_id: str, policies: list[SpdPolicy]) -> None:
        for p in policies:
            self.carriers.setdefault(p.id, []).append(child_id)

    def _release_policies(self, child_id: str, written: WrittenChild, heir_id: str | None) -> list[Put | Delete]:
        """The SPD entries `child_id` carries go to its successor if it has one, else to the
        newest other Child SA on the same traffic, else away: the ops, and the view updated."""
        ops: list[Put | Delete] = []
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
            heir = heir_id if heir_id in carriers else (carriers[-1] if carriers else None)
            if heir is not None:
                moved.append(replace(current, child_sa=heir))
            else:
                ops.append(Delete(schema.spd_policy(pid)))
                del self.policies[pid]
                self.carriers.pop(pid, None)
        ops += self._policy_ops(moved)
        self.policies.update((p.id, p) for p in moved)
        return ops

    def _plan_delete(self, child_id: str) -> StoreStep | None:
        self._awaiting_ack.pop(child_id, None)
        self._acked.discard(child_id)
        written = self.written.pop(child_id, None)
        if written is None:
            return None
        spi_release = self.spis.release_op(written.record.inbound.spi)
        record_ops: list[Put | Delete] = [Delete(schema.child_sa(child_id)), spi_release]
        releases = (child_id, spi_release.key)
        heir_id = self.successor.pop(child_id, None)
        moved = self._release_policies(child_id, written, heir_id)
        if heir_id is not None and heir_id in self.written:
            # A rekeyed SA: its traffic moves now, but its inbound SA stays a moment longer, for
            # the packets the peer sent before its own dataplane switched (it learns of the
            # switch through its store, a few milliseconds later than the DELETE exchange).
            def later_delete(revision: int) -> None:
                async def later() -> None:
                    await asyncio.sleep(REKEYED_INBOUND_GRACE)
                    if await self._commit_quietly(child_id, record_ops):
                        self._count("records_deleted")

                task = asyncio.get_running_loop().create_task(later(), name=f"handoff-grace:{child_id}")
                self._delayed.add(task)
                task.add_done_callback(self._delayed.discard)

            if not moved:
                later_delete(0)
                return None
            return StoreStep([], moved, committed=later_delete, failed=lambda why: self._delete_failed(child_id, why))
        return StoreStep(
            [],
            record_ops + moved,
            committed=lambda revision: self._count("records_deleted"),
            failed=lambda why: self._delete_failed(child_id, why),
            releases=releases,
        )

    def _delete_failed(self, child_id: str, reason: str) -> None:
        log.warning("cannot delete Child SA %s from the store: %s", child_id, reason)

    async def _commit_quietly(self, child_id: str, ops: list[Put | Delete]) -> bool:
        try:
            await self.store.commit([], ops)
        except (StoreError, ValueError) as exc:
            self._delete_failed(child_id, str(exc))
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
        self.installed(rest.split("/", 1)[0])

    def installed_in_band(self, child_id: str) -> None:
        """The local dataplane said it installed this Child SA's inbound SA (its store ack follows)."""
        self._count("acks_in_band")
        self.installed(child_id)

    def installed(self, child_id: str) -> None:
        """A dataplane installed the Child SA's inbound SA: the first word of it (store ack or
        in-band notice, any node) releases what waits for it; the later ones change nothing."""
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
