"""The store is the single source of truth: watch `sas/child/` and `spd/`, install into the backend.

At start the reconciler reads both prefixes and installs everything this node carries
(`ownership`), so a restarted dataplane forwards again with no call from anyone; then it
follows the watch. A put installs (or updates, or replaces) a record, a delete removes it, a
`Resync` (the watch fell behind a compaction) is compared with what is installed and the
difference applied. Once a Child SA's inbound SA is installed, `dataplane/acks/<id>/<node>`
says so (keyexchange waits for it before it answers the peer); it lives under the node's
lease and goes when the Child SA goes.

Writers that need to know the outcome of their write (the gRPC servicer) wait with
`wait_applied(key, revision)`: it resolves with None once a revision at or after theirs was
applied, or with the DataplaneError the backend raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from esplanade.dataplane.backend import DataplaneBackend, DataplaneError, InvalidArgument
from esplanade.dataplane.ownership import SaOwnership
from esplanade.dataplane.sa_persistence import SaPersistence
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy
from esplanade.store import schema
from esplanade.store.base import KeyValue, Resync, Store, StoreError, WatchBatch
from esplanade.store.sealing import Sealer, SealingError, decode_document, encode_document

log = logging.getLogger(__name__)

CHILD_PREFIX = schema.prefix("sas", "child")
SPD_PREFIX = schema.prefix("spd")
APPLIED_MEMORY = 4096
# A policy that names a Child SA the watch has not shown yet waits this long for it: the two
# prefixes are watched separately, so a policy can arrive just before the record written in
# the same transaction (a rekey re-pointing its policies). Then it is applied regardless.
CHILD_WAIT_SECONDS = 2.0
PREPARE_IN_FLIGHT = 64  # store round trips in flight when many SAs are installed at once
INSTALLS_IN_FLIGHT = 32  # worker installs in flight together (`install_child_sas`): well inside the
# worker request timeout (5 s) even at ~100 ms an install on a starved machine


class UpdatableBackend(Protocol):
    async def update_child_sa(self, record: ChildSaRecord) -> None: ...


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
        # called after a Child SA record appeared, changed or went (scale-out ownership follows)
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
        self.ready.set()
        await asyncio.gather(
            self._follow(CHILD_PREFIX, revision + 1, self._apply_child, self._resync_children),
            self._follow(SPD_PREFIX, revision + 1, self._apply_policy, self._resync_policies),
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
        for kv in policies:
            await self._apply_policy(kv.key, kv, kv.mod_revision)
        for kv in children:
            await self._apply_child(kv.key, kv, kv.mod_revision)
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
        apply: Callable[[str, KeyValue | None, int], Awaitable[None]],
        resync: Callable[[Resync], Awaitable[None]],
    ) -> None:
        async for item in self.store.watch(prefix, start):
            if isinstance(item, Resync):
                await resync(item)
            elif isinstance(item, WatchBatch):
                for event in item.events:
                    kv = event.kv if event.type.value == "put" else None
                    await apply(event.kv.key, kv, event.kv.mod_revision)

    # -- Child SAs ----------------------------------------------------------------------
    def _decode_child(self, kv: KeyValue) -> ChildSaRecord:
        document = decode_document(kv.key, kv.value)
        record = ChildSaRecord.from_document(document, self.sealer.bind(kv.key).open)
        if record.id != child_id_of(kv.key):
            raise ValueError(f"{kv.key} holds Child SA {record.id!r}")
        return record

    async def _apply_child(self, key: str, kv: KeyValue | None, revision: int) -> None:
        async with self._lock:
            error: DataplaneError | None = None
            child_id = child_id_of(key)
            try:
                if kv is None:
                    self.records.pop(child_id, None)
                    await self._uninstall_child(child_id)
                else:
                    try:
                        record = self._decode_child(kv)
                    except (SealingError, KeyError, TypeError, ValueError) as exc:
                        raise InvalidArgument(
                            f"{key} is not a readable Child SA: {type(exc).__name__}: {exc}"
                        ) from None
                    self.records[child_id] = record
                    if self.ownership.owns(record):
                        await self._install_child(record)
                    else:
                        await self._uninstall_child(child_id)
            except DataplaneError as exc:
                error = exc
                log.error("Child SA %s: %s", child_id, exc)
            except StoreError as exc:
                error = DataplaneError(f"store: {exc}")
                log.error("Child SA %s: %s", child_id, exc)
            self._done(key, revision, error)
        for callback in self.on_records_changed:
            callback()
        if child_id in self._awaiting_child:
            await self._release_waiting(child_id)

    async def reevaluate(self, child_ids: list[str], *, offline: bool = False) -> dict[str, str]:
        """Ownership changed: install what this node now carries among `child_ids`, remove what
        it no longer carries. `offline`: the store is out of reach (lease no longer provable),
        touch only the backend. Installs reserve their sequence blocks and write their acks
        concurrently (`prepare` below). Removals and updates go first, one by one; then the
        fresh installs, together where the backend can (`install_child_sas`). Returns the
        errors by Child SA id."""
        errors: dict[str, str] = {}
        async with self._lock:
            installs = [
                r
                for r in (self.records.get(c) for c in child_ids)
                if r is not None and self.ownership.owns(r) and r.id not in self.installed
            ]
            await self._prepare(installs)
            acks: list[ChildSaRecord] = []
            fresh = {r.id for r in installs}
            for child_id in [c for c in child_ids if c not in fresh]:  # removals and updates free SPIs first
                await self._apply(child_id, acks, errors, offline=offline)
            batched = await self._install_batch(installs, acks, errors)
            for child_id in [c for c in child_ids if c in fresh and c not in batched]:
                await self._apply(child_id, acks, errors, offline=offline)
            for start in range(0, len(acks), PREPARE_IN_FLIGHT):
                results = await asyncio.gather(
                    *(self._write_ack(r) for r in acks[start : start + PREPARE_IN_FLIGHT]), return_exceptions=True
                )
                for record, result in zip(acks[start : start + PREPARE_IN_FLIGHT], results, strict=True):
                    if isinstance(result, StoreError):
                        errors[record.id] = f"ack not written: {result}"
        return errors

    async def _apply(self, child_id: str, acks: list[ChildSaRecord], errors: dict[str, str], *, offline: bool) -> None:
        record = self.records.get(child_id)
        try:
            if record is not None and self.ownership.owns(record):
                await self._install_child(record, ack=False)
                acks.append(record)
            else:
                await self._uninstall_child(child_id, offline=offline)
        except (DataplaneError, StoreError) as exc:
            errors[child_id] = str(exc)
            self.errors[schema.child_sa(child_id)] = str(exc)
            log.error("Child SA %s: %s", child_id, exc)

    async def _install_batch(
        self, installs: list[ChildSaRecord], acks: list[ChildSaRecord], errors: dict[str, str]
    ) -> set[str]:
        """Fresh installs through the backend's `install_child_sas`, if it has one, so their
        worker round trips overlap; returns the ids it handled (the rest go one by one)."""
        install_many = getattr(self.backend, "install_child_sas", None)
        if install_many is None or len(installs) < 2:
            return set()
        handled: set[str] = set()
        for start in range(0, len(installs), INSTALLS_IN_FLIGHT):
            chunk = [  # ownership may have moved during the store round trips
                r
                for r in installs[start : start + INSTALLS_IN_FLIGHT]
                if self.records.get(r.id) is r and self.ownership.owns(r) and r.id not in self.installed
            ]
            failures: dict[str, DataplaneError] = await install_many(chunk)
            for record in chunk:
                handled.add(record.id)
                failure = failures.get(record.id)
                if failure is None:
                    self.installed[record.id] = record
                    acks.append(record)
                    continue
                errors[record.id] = str(failure)
                self.errors[schema.child_sa(record.id)] = str(failure)
                log.error("Child SA %s: %s", record.id, failure)
        return handled

    async def _prepare(self, records: list[ChildSaRecord]) -> None:
        prepare = getattr(self.persistence, "prepare", None)
        block = getattr(getattr(self.backend, "settings", None), "sequence_block", 0)
        if prepare is None or not block or len(records) < 2:
            return
        for start in range(0, len(records), PREPARE_IN_FLIGHT):
            chunk = records[start : start + PREPARE_IN_FLIGHT]
            await asyncio.gather(
                *(prepare(r.id, r.outbound.spi, r.inbound.spi, block) for r in chunk), return_exceptions=True
            )

    async def _install_child(self, record: ChildSaRecord, *, ack: bool = True) -> None:
        installed = self.installed.get(record.id)
        if installed == record:
            return
        if installed is not None:
            same_spis = (installed.inbound.spi, installed.outbound.spi) == (record.inbound.spi, record.outbound.spi)
            update = getattr(self.backend, "update_child_sa", None)
            if same_spis and update is not None:
                await update(record)
                self.installed[record.id] = record
                if ack:
                    await self._write_ack(record)
                return
            await self._uninstall_child(record.id)
        await self.backend.install_child_sa(record)
        self.installed[record.id] = record
        if ack:
            await self._write_ack(record)

    async def _uninstall_child(self, child_id: str, *, offline: bool = False) -> None:
        record = self.installed.get(child_id)
        if record is None:
            return
        await self.backend.delete_child_sa(child_id)
        del self.installed[child_id]
        if offline:
            return  # the ack goes with the lease; the ledger keys stay for the next owner
        with contextlib.suppress(StoreError):
            await self.store.delete(schema.install_ack(child_id, self.node))
        if child_id not in self.records:  # gone from the store, not merely moved
            with contextlib.suppress(Exception):
                await self.persistence.forget(child_id, record.inbound.spi, record.outbound.spi)

    async def _write_ack(self, record: ChildSaRecord) -> None:
        document = {
            "node": self.node,
            "inbound_spi": record.inbound.spi,
            "outbound_spi": record.outbound.spi,
            "installed_at": time.time(),
        }
        await self.store.put(schema.install_ack(record.id, self.node), encode_document(document), lease=self.lease())

    async def rewrite_acks(self, lease: int) -> None:
        """The node's lease changed: the acks went with the old one; write them again."""
        for record in list(self.installed.values()):
            await self._write_ack(record)

    async def _resync_children(self, item: Resync) -> None:
        present = {kv.key: kv for kv in item.kvs}
        for child_id in list(self.records.keys() | self.installed.keys()):
            key = schema.child_sa(child_id)
            if key not in present:
                await self._apply_child(key, None, item.revision)
        for kv in item.kvs:
            await self._apply_child(kv.key, kv, item.revision)

    # -- policies -----------------------------------------------------------------------
    @staticmethod
    def _decode_policy(kv: KeyValue) -> SpdPolicy:
        document: dict[str, Any] = decode_document(kv.key, kv.value)
        policy = SpdPolicy.from_document(document)
        if policy.id != policy_id_of(kv.key):
            raise ValueError(f"{kv.key} holds policy {policy.id!r}")
        return policy

    async def _apply_policy(self, key: str, kv: KeyValue | None, revision: int, *, wait_for_child: bool = True) -> None:
        async with self._lock:
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
                    if (
                        wait_for_child
                        and self.ready.is_set()
                        and policy.child_sa
                        and policy.child_sa not in self.records
                    ):
                        self._await_child(policy.child_sa, key, kv, revision)
                        return
                    self.policies[policy_id] = policy
                    if self.ownership.carries_policy(policy) and self.installed_policies.get(policy_id) != policy:
                        await self.backend.install_policy(policy)
                        self.installed_policies[policy_id] = policy
            except DataplaneError as exc:
                error = exc
                log.error("policy %s: %s", policy_id, exc)
            self._done(key, revision, error)

    def _await_child(self, child_id: str, key: str, kv: KeyValue, revision: int) -> None:
        self._awaiting_child.setdefault(child_id, {})[key] = (kv, revision)
        loop = asyncio.get_running_loop()
        loop.call_later(CHILD_WAIT_SECONDS, lambda: loop.create_task(self._release_waiting(child_id)))

    async def _release_waiting(self, child_id: str) -> None:
        """The Child SA arrived (or the wait ran out): apply the policies that named it."""
        for key, (kv, revision) in self._awaiting_child.pop(child_id, {}).items():
            await self._apply_policy(key, kv, revision, wait_for_child=False)

    async def _resync_policies(self, item: Resync) -> None:
        present = {kv.key for kv in item.kvs}
        for policy_id in list(self.policies.keys() | self.installed_policies.keys()):
            key = schema.spd_policy(policy_id)
            if key not in present:
                await self._apply_policy(key, None, item.revision)
        for kv in item.kvs:
            await self._apply_policy(kv.key, kv, item.revision)
