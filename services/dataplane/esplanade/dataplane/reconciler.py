"""The store is the single source of truth: watch `sas/child/` and `spd/`, install into the backend.

At start the reconciler reads both prefixes and installs everything this node carries
(`ownership`), so a restarted dataplane forwards again with no call from anyone; then it
follows the watch. A put installs (or updates, or replaces) a record, a delete removes it, a
`Resync` (the watch fell behind a compaction) is compared with what is installed and the
difference applied. Once a Child SA's inbound SA is installed, `dataplane/acks/<id>/<node>`
says so (keyexchange waits for it before it answers the peer); it lives under the node's
lease and goes when the Child SA goes. Just before that write, `on_acknowledged` hands the ids
to the local IKE relay, which tells a keyexchange on this host in-band (it answers on the first
of the two).

Writers that need to know the outcome of their write (the gRPC servicer) wait with
`wait_applied(key, revision)`: it resolves with None once a revision at or after theirs was
applied, or with the DataplaneError the backend raised.

Work comes in watch batches, and a batch is applied as one: only the newest event of each key
counts (a policy re-pointed three times in one batch is installed once), Child SAs leave
before new ones come (an SPI may pass from one to the next), and the new ones are installed
together (`install_child_sas`: one ledger transaction, their worker messages at once) with
their acks in one store transaction; the acks and ledger entries of the Child SAs that go
are deleted in one transaction too.

Scale-out: when ownership moves (`ownership_sync`), `reevaluate` installs what this node now
carries among the Child SAs it names and removes what it no longer carries, through the same
batches; offline (the lease no longer provable) it touches the backend only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from esplanade.dataplane.backend import DataplaneBackend, DataplaneError, InvalidArgument
from esplanade.dataplane.install_tracing import record_install
from esplanade.dataplane.ownership import SaOwnership
from esplanade.dataplane.sa_persistence import SaPersistence
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy
from esplanade.store import schema
from esplanade.store.base import MAX_TXN_OPS, Compare, Delete, KeyValue, Put, Resync, Store, StoreError, WatchBatch
from esplanade.store.sealing import Sealer, SealingError, decode_document, encode_document

log = logging.getLogger(__name__)

CHILD_PREFIX = schema.prefix("sas", "child")
ACK_PREFIX = schema.prefix("dataplane", "acks")
SPD_PREFIX = schema.prefix("spd")
APPLIED_MEMORY = 4096
# A policy that names a Child SA the watch has not shown yet waits this long for it: the two
# prefixes are watched separately, so a policy can arrive just before the record written in
# the same transaction (a rekey re-pointing its policies). Then it is applied regardless.
CHILD_WAIT_SECONDS = 2.0


BATCH_MAX = 64  # Child SAs per install batch (two store ops each stay within MAX_TXN_OPS)
# Child SAs per batch when ownership moves (a take-over of thousands): their worker installs are
# in flight together and stay well inside the worker request timeout (5 s) even at ~100 ms an
# install on a starved machine (256 did not).
REEVALUATE_BATCH = 32


class UpdatableBackend(Protocol):
    async def update_child_sa(self, record: ChildSaRecord) -> None: ...


class BatchBackend(Protocol):
    async def install_child_sas(self, records: list[ChildSaRecord]) -> list[DataplaneError | None]: ...


Event = tuple[str, KeyValue | None, int]  # (key, kv or None for a delete, revision)


def newest_per_key(events: Iterable[Event]) -> dict[str, tuple[KeyValue | None, int]]:
    """The newest event of each key, in the order of those newest events."""
    latest: dict[str, tuple[KeyValue | None, int]] = {}
    for key, kv, revision in events:
        latest.pop(key, None)
        latest[key] = (kv, revision)
    return latest


def child_id_of(key: str) -> str:
    return key[len(CHILD_PREFIX) :]


def policy_id_of(key: str) -> str:
    return key[len(SPD_PREFIX) :]


class Reconciler:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        backend: DataplaneBackend,
        node: str,
        *,
        ownership: SaOwnership,
        persistence: SaPersistence,
        lease: Callable[[], int] = lambda: 0,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.backend = backend
        self.node = node
        self.ownership = ownership
        self.persistence = persistence
        self.lease = lease
        self.records: dict[str, ChildSaRecord] = {}  # every Child SA in the store (readable ones)
        self.policies: dict[str, SpdPolicy] = {}  # every policy in the store
        self.installed: dict[str, ChildSaRecord] = {}
        self.installed_policies: dict[str, SpdPolicy] = {}
        self.errors: dict[str, str] = {}  # store key -> why it is not installed
        self.ready = asyncio.Event()
        self._applied: OrderedDict[str, tuple[int, DataplaneError | None]] = OrderedDict()
        self._waiters: dict[str, list[tuple[int, asyncio.Future[DataplaneError | None]]]] = {}
        self._lock = asyncio.Lock()
        # child id -> policy key -> (kv, revision): policies waiting for the Child SA they name
        self._awaiting_child: dict[str, dict[str, tuple[KeyValue, int]]] = {}
        # Called with each Child SA installed or updated here (before its ack is written) and
        # with the id of each one removed: the policy enforcer puts the identity filter on it.
        self.on_installed: list[Callable[[ChildSaRecord], Awaitable[None]]] = []
        self.on_removed: list[Callable[[str], Awaitable[None]]] = []
        # Child SAs whose inbound SA was just installed, before their store ack is written:
        # the local IKE relay tells keyexchange in-band (esplanade.rpc.local_relay)
        self.on_acknowledged: list[Callable[[list[str]], None]] = []
        # called after Child SA records appeared, changed or went (scale-out ownership follows)
        self.on_records_changed: list[Callable[[], None]] = []

    # -- waiting for writes -------------------------------------------------------------
    async def wait_applied(self, key: str, revision: int) -> DataplaneError | None:
        done = self._applied.get(key)
        if done is not None and done[0] >= revision:
            return done[1]
        future: asyncio.Future[DataplaneError | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append((revision, future))
        try:
            return await future
        finally:
            waiters = self._waiters.get(key, [])
            if (revision, future) in waiters:
                waiters.remove((revision, future))
            if not waiters:
                self._waiters.pop(key, None)

    def _done(self, key: str, revision: int, error: DataplaneError | None) -> None:
        self._applied[key] = (revision, error)
        self._applied.move_to_end(key)
        while len(self._applied) > APPLIED_MEMORY:
            self._applied.popitem(last=False)
        if error is None:
            self.errors.pop(key, None)
        else:
            self.errors[key] = str(error)
        for wanted, future in list(self._waiters.get(key, [])):
            if wanted <= revision and not future.done():
                future.set_result(error)

    # -- running ------------------------------------------------------------------------
    async def run(self) -> None:
        revision = await self._initial_sync()
        finish = getattr(self.backend, "finish_initial_sync", None)
        if finish is not None:  # the kernel backend removes what a predecessor left and nobody wants
            async with self._lock:
                await finish()
        self.ready.set()
        await asyncio.gather(
            self._follow(CHILD_PREFIX, revision + 1, self._apply_children, self._resync_children),
            self._follow(SPD_PREFIX, revision + 1, self._apply_policies, self._resync_policies),
        )

    async def _initial_sync(self) -> int:
        delay = 0.1
        while True:
            try:
                policies, revision = await self.store.range(SPD_PREFIX)
                children, children_revision = await self.store.range(CHILD_PREFIX)
                break
            except StoreError as exc:
                log.warning("store not readable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        # The two reads are not one snapshot; watching both from the older revision replays
        # what changed in between, and applying a record twice is a no-op.
        revision = min(revision, children_revision)
        await self._apply_policies([(kv.key, kv, kv.mod_revision) for kv in policies])
        await self._apply_children([(kv.key, kv, kv.mod_revision) for kv in children])
        log.info(
            "reconciled from the store: %d Child SAs, %d policies installed",
            len(self.installed),
            len(self.installed_policies),
        )
        return revision

    async def _follow(
        self,
        prefix: str,
        start: int,
        apply: Callable[[list[Event]], Awaitable[None]],
        resync: Callable[[Resync], Awaitable[None]],
    ) -> None:
        async for item in self.store.watch(prefix, start):
            if isinstance(item, Resync):
                await resync(item)
            elif isinstance(item, WatchBatch):
                await apply(
                    [
                        (event.kv.key, event.kv if event.type.value == "put" else None, event.kv.mod_revision)
                        for event in item.events
                    ]
                )

    # -- Child SAs ----------------------------------------------------------------------
    def _decode_child(self, kv: KeyValue) -> ChildSaRecord:
        document = decode_document(kv.key, kv.value)
        record = ChildSaRecord.from_document(document, self.sealer.bind(kv.key).open)
        if record.id != child_id_of(kv.key):
            raise ValueError(f"{kv.key} holds Child SA {record.id!r}")
        return record

    async def _apply_child(self, key: str, kv: KeyValue | None, revision: int) -> None:
        await self._apply_children([(key, kv, revision)])

    async def _apply_children(self, events: list[Event]) -> None:
        latest = list(newest_per_key(events).items())
        for at in range(0, len(latest), BATCH_MAX):
            chunk = latest[at : at + BATCH_MAX]
            async with self._lock:
                errors = await self._apply_chunk(chunk)
                for key, (_, revision) in chunk:
                    error = errors.get(key)
                    if error is not None:
                        log.error("Child SA %s: %s", child_id_of(key), error)
                    self._done(key, revision, error)
            for callback in self.on_records_changed:
                callback()
            for key, _ in chunk:
                if child_id_of(key) in self._awaiting_child:
                    await self._release_waiting(child_id_of(key))

    async def reevaluate(self, child_ids: list[str], *, offline: bool = False) -> dict[str, str]:
        """Ownership changed: install what this node now carries among `child_ids`, remove what
        it no longer carries. `offline`: the store is out of reach (lease no longer provable),
        touch only the backend. Removals go first (they free SPIs), then the installs in
        batches (`install_child_sas`, acks in one transaction each). Returns the errors by
        Child SA id."""
        errors: dict[str, DataplaneError] = {}
        leaving = [c for c in child_ids if not self._carried(c)]
        for at in range(0, len(leaving), REEVALUATE_BATCH):
            async with self._lock:
                keys = [schema.child_sa(c) for c in leaving[at : at + REEVALUATE_BATCH] if not self._carried(c)]
                errors.update(await self._uninstall_children(keys, offline=offline))
        staying = [c for c in child_ids if self._carried(c)]
        for at in range(0, len(staying), REEVALUATE_BATCH):
            async with self._lock:  # ownership may have moved while the lock was free: ask again
                wanted = [
                    (schema.child_sa(c), self.records[c])
                    for c in staying[at : at + REEVALUATE_BATCH]
                    if self._carried(c)
                ]
                errors.update(await self._install_children(wanted))
        for key, error in errors.items():
            self.errors[key] = str(error)
            log.error("Child SA %s: %s", child_id_of(key), error)
        return {child_id_of(key): str(error) for key, error in errors.items()}

    def _carried(self, child_id: str) -> bool:
        record = self.records.get(child_id)
        return record is not None and self.ownership.owns(record)

    async def _apply_chunk(self, chunk: list[tuple[str, tuple[KeyValue | None, int]]]) -> dict[str, DataplaneError]:
        """Removals first, then the installs together; each key's error (absent: applied)."""
        errors: dict[str, DataplaneError] = {}
        leaving: list[str] = []
        wanted: list[tuple[str, ChildSaRecord]] = []
        for key, (kv, _) in chunk:
            child_id = child_id_of(key)
            if kv is None:
                self.records.pop(child_id, None)
                leaving.append(key)
                continue
            try:
                record = self._decode_child(kv)
            except (SealingError, KeyError, TypeError, ValueError) as exc:
                errors[key] = InvalidArgument(f"{key} is not a readable Child SA: {type(exc).__name__}: {exc}")
                continue
            self.records[child_id] = record
            if self.ownership.owns(record):
                wanted.append((key, record))
            else:
                leaving.append(key)
        errors.update(await self._uninstall_children(leaving))
        errors.update(await self._install_children(wanted))
        return errors

    async def _install_children(self, wanted: list[tuple[str, ChildSaRecord]]) -> dict[str, DataplaneError]:
        started_ns = time.time_ns()
        unchanged = {key for key, record in wanted if self.installed.get(record.id) == record}
        errors = await self._install_children_untraced(wanted)
        for key, record in wanted:  # one span per record installed (or refused) now
            if key not in unchanged and (key in errors or self.installed.get(record.id) == record):
                error = errors.get(key)
                record_install(record, self.node, started_ns, str(error) if error is not None else "")
        return errors

    async def _install_children_untraced(self, wanted: list[tuple[str, ChildSaRecord]]) -> dict[str, DataplaneError]:
        errors: dict[str, DataplaneError] = {}
        acked: list[ChildSaRecord] = []
        fresh: list[tuple[str, ChildSaRecord]] = []
        for key, record in wanted:
            installed = self.installed.get(record.id)
            if installed == record:
                continue
            try:
                if installed is not None:
                    same_spis = (installed.inbound.spi, installed.outbound.spi) == (
                        record.inbound.spi,
                        record.outbound.spi,
                    )
                    update = getattr(self.backend, "update_child_sa", None)
                    if same_spis and update is not None:
                        await update(record)
                        self.installed[record.id] = record
                        await self._installed(record)
                        acked.append(record)
                        continue
                    errors.update(await self._uninstall_children([key]))
                    if key in errors:
                        continue
                fresh.append((key, record))
            except DataplaneError as exc:
                errors[key] = exc
        install_many = getattr(self.backend, "install_child_sas", None)
        if install_many is not None and fresh:
            outcomes: list[DataplaneError | None] = await install_many([record for _, record in fresh])
        else:
            outcomes = []
            for _, record in fresh:
                try:
                    await self.backend.install_child_sa(record)
                    outcomes.append(None)
                except DataplaneError as exc:
                    outcomes.append(exc)
        for (key, record), outcome in zip(fresh, outcomes, strict=True):
            if outcome is not None:
                errors[key] = outcome
                continue
            self.installed[record.id] = record
            try:
                await self._installed(record)  # before the ack: keyexchange answers the peer on it
            except DataplaneError as exc:
                errors[key] = exc
                continue
            acked.append(record)
        if acked:
            for announce in self.on_acknowledged:
                announce([record.id for record in acked])
            try:
                await self._write_acks(acked)
            except StoreError as exc:
                for record in acked:
                    errors[schema.child_sa(record.id)] = DataplaneError(f"store: {exc}")
        return errors

    async def _installed(self, record: ChildSaRecord) -> None:
        for hook in self.on_installed:
            await hook(record)

    async def _uninstall_child(self, child_id: str) -> None:
        error = (await self._uninstall_children([schema.child_sa(child_id)])).get(schema.child_sa(child_id))
        if error is not None:
            raise error

    async def _uninstall_children(self, keys: list[str], *, offline: bool = False) -> dict[str, DataplaneError]:
        """Take the Child SAs out of the backend; delete their acks, and the ledger entries of
        those gone from the store, in one transaction (`offline`: the backend only; the acks
        go with the lease, the ledger keys stay for the next owner)."""
        errors: dict[str, DataplaneError] = {}
        gone: list[ChildSaRecord] = []
        for key in keys:
            child_id = child_id_of(key)
            record = self.installed.get(child_id)
            if record is None:
                continue
            try:
                await self.backend.delete_child_sa(child_id)
            except DataplaneError as exc:
                errors[key] = exc
                continue
            del self.installed[child_id]
            gone.append(record)
            try:
                for hook in self.on_removed:
                    await hook(child_id)
            except DataplaneError as exc:  # it is out of the backend all the same: its ack goes
                errors[key] = exc
        if not gone or offline:
            return errors
        conditions: list[Compare] = []
        ops: list[Put | Delete] = [Delete(schema.install_ack(r.id, self.node)) for r in gone]
        unplanned: list[ChildSaRecord] = []
        for record in gone:
            if record.id in self.records:
                continue  # moved to another node, not gone: its ledger entries stay
            plan = self.persistence.forget_ops(record.id, record.inbound.spi, record.outbound.spi)
            if plan is None or len(conditions) + len(plan[0]) > MAX_TXN_OPS or len(ops) + len(plan[1]) > MAX_TXN_OPS:
                unplanned.append(record)
                continue
            conditions += plan[0]
            ops += plan[1]
        try:
            committed = (await self.store.commit(conditions, ops)).succeeded
        except (StoreError, ValueError):
            committed = False
        if not committed:  # someone else's write in between: each by itself, reading first
            with contextlib.suppress(StoreError, ValueError):
                await self.store.commit([], [op for op in ops if op.key.startswith(ACK_PREFIX)])
            unplanned = [r for r in gone if r.id not in self.records]
        for record in unplanned:
            with contextlib.suppress(Exception):
                await self.persistence.forget(record.id, record.inbound.spi, record.outbound.spi)
        return errors

    async def _write_acks(self, records: list[ChildSaRecord]) -> None:
        now = time.time()
        ops: list[Put | Delete] = [
            Put(
                schema.install_ack(record.id, self.node),
                encode_document(
                    {
                        "node": self.node,
                        "inbound_spi": record.inbound.spi,
                        "outbound_spi": record.outbound.spi,
                        "installed_at": now,
                    }
                ),
                lease=self.lease(),
            )
            for record in records
        ]
        for at in range(0, len(ops), MAX_TXN_OPS):
            await self.store.commit([], ops[at : at + MAX_TXN_OPS])

    async def _write_ack(self, record: ChildSaRecord) -> None:
        await self._write_acks([record])

    async def rewrite_acks(self, lease: int) -> None:
        """The node's lease changed: the acks went with the old one; write them again."""
        await self._write_acks(list(self.installed.values()))

    async def _resync_children(self, item: Resync) -> None:
        present = {kv.key: kv for kv in item.kvs}
        events: list[Event] = []
        for child_id in list(self.records.keys() | self.installed.keys()):
            key = schema.child_sa(child_id)
            if key not in present:
                events.append((key, None, item.revision))
        events += [(kv.key, kv, item.revision) for kv in item.kvs]
        await self._apply_children(events)

    # -- policies -----------------------------------------------------------------------
    @staticmethod
    def _decode_policy(kv: KeyValue) -> SpdPolicy:
        document: dict[str, Any] = decode_document(kv.key, kv.value)
        policy = SpdPolicy.from_document(document)
        if policy.id != policy_id_of(kv.key):
            raise ValueError(f"{kv.key} holds policy {policy.id!r}")
        return policy

    async def _apply_policies(self, events: list[Event]) -> None:
        await self._apply_policy_batch(newest_per_key(events), wait_for_child=True)

    async def _apply_policy_batch(
        self, latest: Mapping[str, tuple[KeyValue | None, int]], *, wait_for_child: bool
    ) -> None:
        install_many = getattr(self.backend, "install_policies", None)
        if install_many is None:
            for key, (kv, revision) in latest.items():
                await self._apply_policy(key, kv, revision, wait_for_child=wait_for_child)
            return
        # A watch batch as one: removals and no-ops as they come, the installs together.
        async with self._lock:
            wanted: list[tuple[str, SpdPolicy, int]] = []
            for key, (kv, revision) in latest.items():
                policy = await self._policy_event(key, kv, revision, wait_for_child=wait_for_child)
                if policy is not None:
                    wanted.append((key, policy, revision))
            if not wanted:
                return
            outcomes: list[DataplaneError | None] = await install_many([policy for _, policy, _ in wanted])
            for (key, policy, revision), error in zip(wanted, outcomes, strict=True):
                self._installed_policy(key, policy, revision, error)

    async def _apply_policy(self, key: str, kv: KeyValue | None, revision: int, *, wait_for_child: bool = True) -> None:
        async with self._lock:
            policy = await self._policy_event(key, kv, revision, wait_for_child=wait_for_child)
            if policy is None:
                return
            error: DataplaneError | None = None
            try:
                await self.backend.install_policy(policy)
            except DataplaneError as exc:
                error = exc
            self._installed_policy(key, policy, revision, error)

    async def _policy_event(
        self, key: str, kv: KeyValue | None, revision: int, *, wait_for_child: bool
    ) -> SpdPolicy | None:
        """Apply one policy event (under `self._lock`) up to the backend install: the policy to
        install, for the caller to hand to the backend and then `_installed_policy`; None when
        the event is done with (removed, unchanged, waiting for its Child SA, or an error)."""
        error: DataplaneError | None = None
        policy_id = policy_id_of(key)
        for waiting in self._awaiting_child.values():
            waiting.pop(key, None)  # a newer event for this policy supersedes a waiting one
        try:
            if kv is None:
                self.policies.pop(policy_id, None)
                if policy_id in self.installed_policies:
                    await self.backend.delete_policy(policy_id)
                    del self.installed_policies[policy_id]
            else:
                try:
                    policy = self._decode_policy(kv)
                except (SealingError, KeyError, TypeError, ValueError) as exc:
                    raise InvalidArgument(f"{key} is not a readable policy: {type(exc).__name__}: {exc}") from None
                if wait_for_child and self.ready.is_set() and policy.child_sa and policy.child_sa not in self.records:
                    self._await_child(policy.child_sa, key, kv, revision)
                    return None
                self.policies[policy_id] = policy
                if self.ownership.carries_policy(policy) and self.installed_policies.get(policy_id) != policy:
                    return policy
        except DataplaneError as exc:
            error = exc
            log.error("policy %s: %s", policy_id, exc)
        self._done(key, revision, error)
        return None

    def _installed_policy(self, key: str, policy: SpdPolicy, revision: int, error: DataplaneError | None) -> None:
        if error is None:
            self.installed_policies[policy.id] = policy
        else:
            log.error("policy %s: %s", policy.id, error)
        self._done(key, revision, error)

    def _await_child(self, child_id: str, key: str, kv: KeyValue, revision: int) -> None:
        self._awaiting_child.setdefault(child_id, {})[key] = (kv, revision)
        loop = asyncio.get_running_loop()
        loop.call_later(CHILD_WAIT_SECONDS, lambda: loop.create_task(self._release_waiting(child_id)))

    async def _release_waiting(self, child_id: str) -> None:
        """The Child SA arrived (or the wait ran out): apply the policies that named it, together."""
        waiting = self._awaiting_child.pop(child_id, {})
        if waiting:
            await self._apply_policy_batch(waiting, wait_for_child=False)

    async def _resync_policies(self, item: Resync) -> None:
        present = {kv.key for kv in item.kvs}
        events: list[Event] = []
        for policy_id in list(self.policies.keys() | self.installed_policies.keys()):
            key = schema.spd_policy(policy_id)
            if key not in present:
                events.append((key, None, item.revision))
        events += [(kv.key, kv, item.revision) for kv in item.kvs]
        await self._apply_policies(events)
