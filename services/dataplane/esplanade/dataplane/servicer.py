"""The gRPC Dataplane API. Writes go through the store, which stays the single source of truth.

InstallChildSa / UpdateChildSa / DeleteChildSa / InstallPolicy / DeletePolicy check the
request first (INVALID_ARGUMENT: malformed fields, unknown transforms, bad key lengths;
ALREADY_EXISTS: an id, an inbound SPI or an outbound SPI toward the same peer already in
use, or selectors that overlap a policy of the same direction and priority; NOT_FOUND;
FAILED_PRECONDITION: the backend cannot carry it), then write the record (sealed keys) to
the store with compare-and-swap and wait until this node's reconciler has installed it (and,
for Child SAs, written the install ack). If the backend refuses after all, the record is
deleted again: nothing stays half-installed, neither in the store nor in the backend.
Mutations are serialized, so the checks see every earlier change.

Reads: ListPolicies (installed policies), GetCounters (packets/bytes per SA and drops by
reason; never keys), GetStatus (backend, why it was chosen, details), WatchEvents (soft/hard
expire, sequence exhausted, acquire, installed, deleted). RelayIke: see `ike_relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from esplanade.dataplane.backend import (
    AlreadyExists,
    DataplaneBackend,
    DataplaneError,
    DataplaneEvent,
    InvalidArgument,
    NotFound,
)
from esplanade.dataplane.ike_relay import IkeRelay, RelayStream
from esplanade.dataplane.proto_mapping import (
    check_id,
    child_sa_from_proto,
    counters_to_proto,
    event_to_proto,
    policy_from_proto,
    policy_to_proto,
)
from esplanade.dataplane.reconciler import Reconciler
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy
from esplanade.store import schema
from esplanade.store.base import CasConflict, Compare, Delete, Store, StoreError
from esplanade.store.sealing import Sealer, encode_document
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc, ipsec_pb2

log = logging.getLogger(__name__)

APPLY_TIMEOUT = 15.0
SUBSCRIBER_QUEUE = 1024
SERVICE_NAME = "esplanade.v1.Dataplane"


class EventHub:
    """Fan-out of dataplane events to every WatchEvents call (a slow watcher loses its oldest).

    A subscriber may name the kinds it wants (keyexchange wants expiries and acquires, not the
    installed/deleted of every Child SA): an event nobody wants is not even converted."""

    def __init__(self) -> None:
        # queue -> the kinds it wants (None: every kind)
        self._subscribers: dict[asyncio.Queue[dataplane_pb2.DataplaneEvent], frozenset[str] | None] = {}
        self.published = 0

    def wants(self, kind: str) -> bool:
        return any(kinds is None or kind in kinds for kinds in self._subscribers.values())

    def publish(self, event: dataplane_pb2.DataplaneEvent) -> None:
        self.published += 1
        for queue, kinds in self._subscribers.items():
            if kinds is not None and event.kind not in kinds:
                continue
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def subscribe(self, kinds: frozenset[str] | None = None) -> asyncio.Queue[dataplane_pb2.DataplaneEvent]:
        queue: asyncio.Queue[dataplane_pb2.DataplaneEvent] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers[queue] = kinds or None
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dataplane_pb2.DataplaneEvent]) -> None:
        self._subscribers.pop(queue, None)


@dataclass
class ServicerParts:
    node: str
    store: Store
    sealer: Sealer
    backend: DataplaneBackend
    reconciler: Reconciler
    relay: IkeRelay
    events: EventHub
    backend_reason: str
    details: Callable[[], dict[str, str]] = field(default_factory=lambda: dict)


def policies_overlap(a: SpdPolicy, b: SpdPolicy) -> bool:
    """Same direction and priority, and both selectors intersect: which one decides is ambiguous."""
    return (
        a.direction == b.direction
        and a.priority == b.priority
        and a.local_ts.intersect(b.local_ts) is not None
        and a.remote_ts.intersect(b.remote_ts) is not None
    )


async def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def _code_of(error: DataplaneError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


class DataplaneServicer(dataplane_pb2_grpc.DataplaneServicer):
    def __init__(self, parts: ServicerParts) -> None:
        self.parts = parts
        self._mutations = asyncio.Lock()

    # -- helpers ------------------------------------------------------------------------
    async def _guard(self, context: Any) -> None:
        if not self.parts.reconciler.ready.is_set():
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the dataplane is still reading the store")

    async def _fail(self, context: Any, error: Exception) -> NoReturn:
        if isinstance(error, DataplaneError):
            await _abort(context, _code_of(error), str(error))
        if isinstance(error, StoreError):
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"store: {error}")
        raise error

    async def _apply(self, key: str, revision: int) -> DataplaneError | None:
        try:
            return await asyncio.wait_for(self.parts.reconciler.wait_applied(key, revision), APPLY_TIMEOUT)
        except TimeoutError:
            return DataplaneError(f"{key} was not applied within {APPLY_TIMEOUT:.0f}s")

    async def _undo_put(self, key: str, revision: int, before: bytes | None, before_revision: int) -> None:
        """Put back what `key` held before our write at `revision` (unless someone wrote since)."""
        try:
            if before is None:
                await self.parts.store.delete(key, expect_mod_revision=revision)
            else:
                await self.parts.store.put(key, before, expect_mod_revision=revision)
        except CasConflict:
            log.warning("%s changed again before its failed write could be undone", key)
        except StoreError as exc:
            log.error("%s: failed write not undone: %s", key, exc)

    async def _delete(self, key: str, what: str) -> int:
        """Delete `key`; the revision of the delete (what the reconciler will report applied)."""
        current = await self.parts.store.get(key)
        if current is None:
            raise NotFound(f"{what} does not exist")
        result = await self.parts.store.commit([Compare(key, current.mod_revision)], [Delete(key)])
        if not result.succeeded:
            raise AlreadyExists(f"{what} changed concurrently; retry")
        return result.revision

    def _check_child_conflicts(self, record: ChildSaRecord) -> None:
        for other in self.parts.reconciler.records.values():
            if other.id == record.id:
                continue
            if other.inbound.spi == record.inbound.spi:
                raise AlreadyExists(f"inbound SPI {record.inbound.spi:#010x} is used by Child SA {other.id!r}")
            if (other.outbound.spi, other.outbound.dst) == (record.outbound.spi, record.outbound.dst):
                raise AlreadyExists(
                    f"outbound SPI {record.outbound.spi:#010x} toward {record.outbound.dst}"
                    f" is used by Child SA {other.id!r}"
                )
        check = getattr(self.parts.backend, "check_child_sa", None)
        if check is not None:
            check(record)

    async def _write_child(self, record: ChildSaRecord, *, create: bool, context: Any) -> None:
        store = self.parts.store
        key = schema.child_sa(record.id)
        async with self._mutations:
            try:
                current = await store.get(key)
                if create and current is not None:
                    raise AlreadyExists(f"Child SA {record.id!r} already exists")
                if not create and current is None:
                    raise NotFound(f"Child SA {record.id!r} does not exist")
                if not create:
                    existing = self.parts.reconciler.records.get(record.id)
                    if existing is not None and (existing.inbound.spi, existing.outbound.spi) != (
                        record.inbound.spi,
                        record.outbound.spi,
                    ):
                        raise InvalidArgument("an update keeps both SPIs; install a new Child SA to rekey")
                self._check_child_conflicts(record)
                document = record.to_document(self.parts.sealer.bind(key).seal)
                expected = current.mod_revision if current is not None else 0
                try:
                    revision = await store.put(key, encode_document(document), expect_mod_revision=expected)
                except CasConflict:
                    raise AlreadyExists(f"Child SA {record.id!r} changed concurrently; retry") from None
                error = await self._apply(key, revision)
                if error is not None:
                    await self._undo_put(key, revision, current.value if current else None, expected)
                    raise error
            except (DataplaneError, StoreError) as exc:
                await self._fail(context, exc)

    # -- Child SAs ----------------------------------------------------------------------
    async def InstallChildSa(
        self, request: dataplane_pb2.InstallChildSaRequest, context: Any
    ) -> dataplane_pb2.InstallChildSaResponse:
        await self._guard(context)
        try:
            record = child_sa_from_proto(request.child_sa)
        except DataplaneError as exc:
            await self._fail(context, exc)
        await self._write_child(record, create=True, context=context)
        return dataplane_pb2.InstallChildSaResponse()

    async def UpdateChildSa(
        self, request: dataplane_pb2.InstallChildSaRequest, context: Any
    ) -> dataplane_pb2.InstallChildSaResponse:
        await self._guard(context)
        try:
            record = child_sa_from_proto(request.child_sa)
        except DataplaneError as exc:
            await self._fail(context, exc)
        await self._write_child(record, create=False, context=context)
        return dataplane_pb2.InstallChildSaResponse()

    async def DeleteChildSa(
        self, request: dataplane_pb2.DeleteChildSaRequest, context: Any
    ) -> dataplane_pb2.DeleteChildSaResponse:
        await self._guard(context)
        async with self._mutations:
            try:
                key = schema.child_sa(check_id("Child SA", request.id))
                revision = await self._delete(key, f"Child SA {request.id!r}")
                error = await self._apply(key, revision)
                if error is not None:
                    raise error
            except (DataplaneError, StoreError) as exc:
                await self._fail(context, exc)
        return dataplane_pb2.DeleteChildSaResponse()

    # -- policies -----------------------------------------------------------------------
    async def InstallPolicy(
        self, request: dataplane_pb2.InstallPolicyRequest, context: Any
    ) -> dataplane_pb2.InstallPolicyResponse:
        await self._guard(context)
        store = self.parts.store
        async with self._mutations:
            try:
                policy = policy_from_proto(request.policy)
                for other in self.parts.reconciler.policies.values():
                    if other.id != policy.id and policies_overlap(policy, other):
                        raise AlreadyExists(
                            f"policy {policy.id!r} overlaps policy {other.id!r} (same direction and priority"
                            f" {policy.priority}, intersecting selectors); give one of them another priority"
                        )
                check = getattr(self.parts.backend, "check_policy", None)
                if check is not None:
                    check(policy)
                key = schema.spd_policy(policy.id)
                current = await store.get(key)
                expected = current.mod_revision if current is not None else 0
                try:
                    revision = await store.put(key, encode_document(policy.to_document()), expect_mod_revision=expected)
                except CasConflict:
                    raise AlreadyExists(f"policy {policy.id!r} changed concurrently; retry") from None
                error = await self._apply(key, revision)
                if error is not None:
                    await self._undo_put(key, revision, current.value if current else None, expected)
                    raise error
            except (DataplaneError, StoreError) as exc:
                await self._fail(context, exc)
        return dataplane_pb2.InstallPolicyResponse()

    async def DeletePolicy(
        self, request: dataplane_pb2.DeletePolicyRequest, context: Any
    ) -> dataplane_pb2.DeletePolicyResponse:
        await self._guard(context)
        async with self._mutations:
            try:
                key = schema.spd_policy(check_id("policy", request.id))
                revision = await self._delete(key, f"policy {request.id!r}")
                error = await self._apply(key, revision)
                if error is not None:
                    raise error
            except (DataplaneError, StoreError) as exc:
                await self._fail(context, exc)
        return dataplane_pb2.DeletePolicyResponse()

    async def ListPolicies(
        self, request: dataplane_pb2.ListPoliciesRequest, context: Any
    ) -> dataplane_pb2.ListPoliciesResponse:
        installed = sorted(self.parts.reconciler.installed_policies.values(), key=lambda p: (p.priority, p.id))
        return dataplane_pb2.ListPoliciesResponse(policies=[policy_to_proto(p) for p in installed])

    # -- counters, status, events -------------------------------------------------------
    async def GetCounters(
        self, request: dataplane_pb2.GetCountersRequest, context: Any
    ) -> dataplane_pb2.GetCountersResponse:
        backend = self.parts.backend
        refresh = getattr(backend, "refresh_counters", None)
        if refresh is not None:
            await refresh()
        children = list(self.parts.reconciler.installed.values())
        by_spi = {("in", c.inbound.spi): c.id for c in children} | {("out", c.outbound.spi): c.id for c in children}
        sas: list[ipsec_pb2.SaCounters] = []
        for counters in backend.counters():
            child = by_spi.get((counters.direction, counters.spi), "")
            if request.child_sa and child != request.child_sa:
                continue
            sas.append(counters_to_proto(counters, child, self.parts.node))
        drops_of = getattr(backend, "drop_counters", None)
        drops: dict[str, int] = drops_of() if drops_of is not None else {}
        for name, count in self.parts.relay.counters.items():
            if name.startswith("dropped_") and count:
                drops[f"ike_{name.removeprefix('dropped_')}"] = count
        return dataplane_pb2.GetCountersResponse(
            sas=sas,
            drops=[ipsec_pb2.DropCounter(reason=r, packets=n) for r, n in sorted(drops.items())],
            node=self.parts.node,
        )

    async def GetStatus(self, request: dataplane_pb2.GetStatusRequest, context: Any) -> dataplane_pb2.GetStatusResponse:
        status = self.parts.backend.status()
        details = {**status.details, **self.parts.relay.status(), **self.parts.details()}
        worker_status = getattr(self.parts.backend, "worker_status", None)
        if worker_status is not None:
            workers = [worker_summary(w) for w in await worker_status()]
            details["worker_status"] = json.dumps(workers, separators=(",", ":"))[:8000]
        not_installed = self.parts.reconciler.errors
        if not_installed:
            details["not_installed"] = "; ".join(f"{k}: {v}" for k, v in sorted(not_installed.items()))[:2000]
        return dataplane_pb2.GetStatusResponse(
            node=self.parts.node,
            backend=status.name,
            backend_reason=self.parts.backend_reason or status.reason,
            capabilities=list(status.capabilities),
            details=details,
            child_sas=len(self.parts.reconciler.installed),
            policies=len(self.parts.reconciler.installed_policies),
        )

    async def WatchEvents(
        self, request: dataplane_pb2.WatchDataplaneEventsRequest, context: Any
    ) -> AsyncIterator[dataplane_pb2.DataplaneEvent]:
        queue = self.parts.events.subscribe(frozenset(request.kinds))
        # the client may await the initial metadata to know it misses nothing from here on
        await context.send_initial_metadata(())
        try:
            while True:
                yield await queue.get()
        finally:
            self.parts.events.unsubscribe(queue)

    # -- IKE relay ----------------------------------------------------------------------
    async def RelayIke(self, request_iterator: Any, context: Any) -> AsyncIterator[dataplane_pb2.IkeDatagram]:
        stream = self._attach(context)

        async def outgoing() -> None:
            async for datagram in request_iterator:
                await self.parts.relay.send(datagram)

        sender = self._sending(stream, outgoing())
        try:
            while True:
                datagram = await stream.queue.get()
                if datagram is None:
                    return  # the client closed its side
                yield datagram
        finally:
            await self._detach(stream, sender)

    async def RelayIkeBatch(self, request_iterator: Any, context: Any) -> AsyncIterator[dataplane_pb2.IkeDatagramBatch]:
        stream = self._attach(context)

        async def outgoing() -> None:
            async for batch in request_iterator:
                self.parts.relay.counters["batches_from_clients"] += 1
                for datagram in batch.datagrams:
                    await self.parts.relay.send(datagram)

        sender = self._sending(stream, outgoing())
        try:
            while True:
                datagrams = await stream.next_batch()
                if datagrams is None:
                    return
                self.parts.relay.counters["batches_to_clients"] += 1
                yield dataplane_pb2.IkeDatagramBatch(datagrams=datagrams)
        finally:
            await self._detach(stream, sender)

    def _attach(self, context: Any) -> RelayStream:
        metadata = dict(context.invocation_metadata() or ())
        stream = self.parts.relay.attach(str(metadata.get("esplanade-instance", "")))
        log.info("IKE relay client connected (%s); %d connected", stream.key, self.parts.relay.connected)
        return stream

    @staticmethod
    def _sending(stream: RelayStream, outgoing: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run the client's side of the stream; when it ends, so does ours."""
        sender = asyncio.create_task(outgoing)
        sender.add_done_callback(lambda _: stream.close())
        return sender

    async def _detach(self, stream: RelayStream, sender: asyncio.Task[None]) -> None:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        self.parts.relay.detach(stream)
        log.info("IKE relay client %s disconnected", stream.key)


def publish_event(hub: EventHub, event: DataplaneEvent, node: str) -> None:
    if hub.wants(event.kind.value):
        hub.publish(event_to_proto(event, node, time.time()))


def worker_summary(status: dict[str, Any]) -> dict[str, object]:
    """What GetStatus shows of one userspace worker: its hot path and why, loop and room counters."""
    transform = status.get("transform") or {}
    outer = status.get("outer") or {}
    hot = transform.get("hot_path") or {}
    compiled = transform.get("compiled") or {}
    return {
        "worker": status.get("worker"),
        "hot_path": hot.get("active"),
        "hot_path_reason": hot.get("reason"),
        "batch_rooms": status.get("batch_rooms"),
        "loop": status.get("loop"),
        "tun_drops": (status.get("tun") or {}).get("drops"),
        "outer": {"counters": outer.get("counters"), "drops": outer.get("drops")},
        "transform_drops": transform.get("drops"),
        "flows": compiled.get("flows"),
        "error": status.get("error"),
    }
