"""The userspace dataplane backend: the ESP engine in worker processes behind a TUN and UDP/ESP sockets.

`UserspaceBackend` implements `esplanade.dataplane.backend.DataplaneBackend`, as strongSwan's
kernel-libipsec does for charon, on `UserspaceDatapath` (the I/O rooms) with
`esp_transform.EspTransform` as the crypto room in every worker.

Who holds what:
- every worker holds the whole SPD (steering needs it) and the SAs of the Child SAs it owns:
  ``owner = inbound SPI mod workers`` (`owner_of`), the same rule the kernel applies when it
  steers ESP to a worker's socket (CBPF), so no SA state is ever shared between processes;
- the parent (this object, in the dataplane service's event loop) holds the records, the
  routes into the TUN (`tunnel_routes`) and the link to the store (`SaPersistence`).

Sequence numbers (no nonce reuse, even across a crash): before a Child SA is installed the
parent makes one block of outbound sequence numbers durable (`start_outbound`) and the worker
starts right after everything ever reserved. When fewer than a quarter block remain the
engine asks for the next block (`ReserveSequence`); the parent persists it and answers
`grant_sequence`. The store round trip overlaps three quarters of a block of traffic, so it
never stalls a flow (see `docs/dataplane-service.md` for the sizing). Replay floors go up
the same way (`PersistReplayFloor`).

Every change is all or nothing: a worker that refuses, or a route netlink refuses, rolls the
change back on every worker before the `DataplaneError` is raised. A worker that dies takes
the datapath down (fail closed) and the backend reports it (`failed`); the service then exits
and, restarted, reinstalls everything from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from esplanade.dataplane.backend import (
    AlreadyExists,
    BackendStatus,
    DataplaneBackend,
    DataplaneError,
    DataplaneEvent,
    DataplaneEventKind,
    FilterDrops,
    InvalidArgument,
    NotFound,
    SaCounters,
    Unsupported,
)
from esplanade.dataplane.esp.sa_state import check_association
from esplanade.dataplane.fastpath.hot_path import HotPathSetting, HotPathStatus, hot_path_status
from esplanade.dataplane.sa_persistence import ChildClaim, SaPersistence
from esplanade.dataplane.userspace.cleartext_guard import CleartextGuard
from esplanade.dataplane.userspace.datapath import DatapathSettings, DatapathStartError, UserspaceDatapath
from esplanade.dataplane.userspace.esp_transform import make_esp_transform
from esplanade.dataplane.userspace.netconfig import NetConfigError
from esplanade.dataplane.userspace.offloads import TunOffloadMode
from esplanade.dataplane.userspace.sa_messages import association_document, policy_document
from esplanade.dataplane.userspace.transform import PacketTransform, WorkerContext
from esplanade.dataplane.userspace.tunnel_routes import TunnelRoutes
from esplanade.dataplane.userspace.worker_channel import WorkerChannel, WorkerGone
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import SpdPolicy
from esplanade.ipsec.transforms import Direction, IpProto, Mode

log = logging.getLogger(__name__)

EVENT_QUEUE_SIZE = 4096
PERSIST_RETRY_MAX = 2.0
WORKER_WATCH_INTERVAL = 0.5
FINAL_REPLAY_TOPS_KEPT = 4096  # replay tops of removed Child SAs, kept for a graceful hand-over

IkeHandler = Callable[[str, int, str, int, bytes], None]  # local addr, local port, remote addr, port, message


@dataclass(frozen=True, slots=True)
class UserspaceBackendSettings:
    datapath: DatapathSettings
    sequence_block: int = 1 << 20
    replay_block: int = 1 << 16
    hot_path: HotPathSetting = "auto"  # dataplane.hot_path


def build_transform(
    context: WorkerContext, sequence_block: int, replay_block: int, hot_path: HotPathSetting = "python"
) -> PacketTransform:
    return make_esp_transform(context, sequence_block=sequence_block, replay_block=replay_block, hot_path=hot_path)


def owner_of(record: ChildSaRecord, workers: int) -> int:
    """The worker that owns a Child SA: inbound SPI mod workers (what the kernel steers by)."""
    return record.inbound.spi % workers


class UserspaceBackend:
    """DataplaneBackend on the userspace datapath (see the module docstring)."""

    name = "userspace"

    def __init__(
        self,
        settings: UserspaceBackendSettings,
        persistence: SaPersistence,
        *,
        reason: str = "userspace backend selected by configuration",
        capabilities: tuple[str, ...] = ("esp", "esp-in-udp", "aes-gcm", "chacha20-poly1305", "aes-cbc-hmac"),
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.persistence = persistence
        self._reason = reason
        self._capabilities = capabilities
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self.datapath: UserspaceDatapath | None = None
        self.routes: TunnelRoutes | None = None
        self.guard = CleartextGuard(settings.datapath.tun_name)
        self._channels: list[WorkerChannel] = []
        self._children: dict[str, ChildSaRecord] = {}
        self._policies: dict[str, SpdPolicy] = {}
        # indexes, so that a change costs the same with ten SAs installed as with ten thousand
        self._inbound_spis: dict[int, str] = {}  # inbound SPI -> Child SA
        self._outbound_spis: dict[tuple[int, str], str] = {}  # (outbound SPI, peer) -> Child SA
        self._endpoint_count: Counter[str] = Counter()  # peers (outbound destinations) of the Child SAs
        self._policies_of: dict[str, set[str]] = {}  # Child SA -> ids of the policies that name it
        self._lock = asyncio.Lock()
        self._queue: asyncio.Queue[DataplaneEvent | None] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._replay_pending: dict[int, int] = {}
        self._ike_handler: IkeHandler | None = None
        self._counters: list[SaCounters] = []
        self._drops: dict[str, int] = {}
        self.events_dropped = 0
        self.failed: str = ""  # why the datapath stopped working ("" while it runs)
        self.on_failure: Callable[[str], None] | None = None
        # The identity filter a Child SA carries from its first packet (the policy enforcer's
        # `initial_filter`): installed in the same worker message as the SA, so a live SA reinstalled
        # after a restart or a takeover never passes a packet unfiltered. None: no filter at install.
        self.initial_filter: Callable[[ChildSaRecord], list[TrafficSelector] | None] | None = None
        self.persist_failures = 0
        self.final_replay_tops: dict[str, int] = {}  # Child SA id -> last accepted number, once removed
        self.hot_path: HotPathStatus | None = None

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return self.settings.datapath.workers

    async def start(self) -> None:
        """Fork the workers and open the rooms. Call before any thread exists in this process
        (before gRPC and the store client start): workers are forked from it."""
        if self.datapath is not None:
            return
        s = self.settings
        hot = hot_path_status(s.hot_path)
        if s.hot_path == "compiled" and hot.active != "compiled":
            raise DataplaneError(f"dataplane.hot_path is compiled, but {hot.reason}")
        self.hot_path = hot
        # The workers resolve the same choice (hot.active), so the TUN hands super-packets
        # (TSO/USO) only to workers that split them in C; the Python lanes read plain packets.
        tun_mode = TunOffloadMode.TSO if hot.active == "compiled" else s.datapath.tun_offload_mode
        factory = partial(
            build_transform, sequence_block=s.sequence_block, replay_block=s.replay_block, hot_path=hot.active
        )
        datapath = UserspaceDatapath(
            replace(s.datapath, forward_ike=True, ipsec_bypass=True, tun_offload_mode=tun_mode), factory
        )
        try:
            datapath.start()
        except DatapathStartError as exc:
            raise DataplaneError(str(exc)) from None
        self.datapath = datapath
        assert datapath.sizes is not None
        self.routes = TunnelRoutes(s.datapath.tun_name, datapath.sizes.tun_mtu, s.datapath.path_mtu)
        await self.guard.start()
        self._channels = [
            WorkerChannel(handle.index, handle.control, self._on_worker_message, self._on_worker_closed)
            for handle in datapath.pool.workers
        ]
        self._spawn(self._watch_workers())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            channel.detach()
        self._channels = []
        await self.guard.stop()
        if self.routes is not None:
            self.routes.close()
        if self.datapath is not None:
            datapath, self.datapath = self.datapath, None
            for handle in datapath.pool.workers:
                with contextlib.suppress(OSError):
                    handle.control.setblocking(True)
            await asyncio.to_thread(datapath.stop)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("userspace backend task failed")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_workers(self) -> None:
        while self.datapath is not None and not self.failed:
            failed = self.datapath.failed_workers()
            if failed:
                self._fail(f"workers {failed} exited; the datapath stopped (fail closed)")
                return
            await asyncio.sleep(WORKER_WATCH_INTERVAL)

    def _fail(self, reason: str) -> None:
        if self.failed:
            return
        self.failed = reason
        log.error("%s", reason)
        if self.on_failure is not None:
            self.on_failure(reason)

    def _on_worker_closed(self, index: int) -> None:
        if self.datapath is not None:
            self._fail(f"worker {index} closed its control channel")

    def _channel(self, index: int) -> WorkerChannel:
        if self.failed:
            raise DataplaneError(f"userspace datapath is down: {self.failed}")
        if not self._channels:
            raise DataplaneError("userspace backend is not started")
        return self._channels[index]

    # -- status ---------------------------------------------------------------------------
    def status(self) -> BackendStatus:
        datapath = self.datapath
        details = {
            "workers": str(self.workers),
            "tun": self.settings.datapath.tun_name,
            "child_sas": str(len(self._children)),
            "policies": str(len(self._policies)),
            "events_dropped": str(self.events_dropped),
            "failed": self.failed,
            "cleartext_guard": self.guard.status(),
        }
        if self.hot_path is not None:
            details["hot_path"] = self.hot_path.active
            details["hot_path_reason"] = self.hot_path.reason
            if "aes_gcm" in self.hot_path.build:  # the compiled loop: its own AES-GCM or OpenSSL's
                details["aes_gcm"] = str(self.hot_path.build["aes_gcm"])
        if datapath is not None:
            details["outer"] = datapath.settings.outer.value + ("+raw" if datapath.settings.plain_esp else "")
            if datapath.sizes is not None:
                details.update({k: str(v) for k, v in datapath.sizes.as_dict().items()})
            if datapath.features is not None:
                used = datapath.features.as_dict()
                details["offloads"] = ",".join(k for k, v in used.items() if v is True)
        return BackendStatus(name=self.name, reason=self._reason, capabilities=self._capabilities, details=details)

    async def worker_status(self) -> list[dict[str, Any]]:
        """Each worker's own status (loop, rooms, transform counters)."""
        out = []
        for channel in self._channels:
            try:
                reply = await channel.request({"op": "status"})
                out.append(dict(reply.get("status") or {}))
            except WorkerGone as exc:
                out.append({"worker": channel.index, "error": str(exc)})
        return out

    def installed_child_sas(self) -> list[ChildSaRecord]:
        return list(self._children.values())

    def installed_policies(self) -> list[SpdPolicy]:
        return list(self._policies.values())

    # -- Child SAs ----------------------------------------------------------------------
    def _check(self, record: ChildSaRecord) -> None:
        """Refuse what no worker could install, before anything changes anywhere."""
        try:
            record.validate()
        except ValueError as exc:
            raise InvalidArgument(f"Child SA {record.id!r}: {exc}") from None
        for sa in (record.inbound, record.outbound):
            if sa.protocol != IpProto.ESP:
                raise Unsupported(f"Child SA {record.id!r}: the userspace backend carries ESP, not AH")
            if sa.mode != Mode.TUNNEL:
                raise Unsupported(f"Child SA {record.id!r}: the userspace backend carries tunnel mode only")
        try:  # what building the owner's SAs would refuse: ciphers, addresses, selectors
            check_association(record.inbound, Direction.IN)
            check_association(record.outbound, Direction.OUT)
        except ValueError as exc:
            raise InvalidArgument(f"Child SA {record.id!r}: {exc}") from None
        self._check_spis(record, self._inbound_spis, self._outbound_spis)

    @staticmethod
    def _check_spis(record: ChildSaRecord, inbound: dict[int, str], outbound: dict[tuple[int, str], str]) -> None:
        other = inbound.get(record.inbound.spi, record.id)
        if other != record.id:
            raise AlreadyExists(f"inbound SPI {record.inbound.spi:#010x} already belongs to Child SA {other!r}")
        other = outbound.get((record.outbound.spi, record.outbound.dst), record.id)
        if other != record.id:
            raise AlreadyExists(
                f"outbound SPI {record.outbound.spi:#010x} to {record.outbound.dst} already belongs"
                f" to Child SA {other!r}"
            )

    def _adopt(self, record: ChildSaRecord) -> None:
        self._children[record.id] = record
        self._inbound_spis[record.inbound.spi] = record.id
        self._outbound_spis[(record.outbound.spi, record.outbound.dst)] = record.id
        self._endpoint_count[record.outbound.dst] += 1

    def _drop(self, child_sa_id: str) -> ChildSaRecord | None:
        record = self._children.pop(child_sa_id, None)
        if record is None:
            return None
        if self._inbound_spis.get(record.inbound.spi) == child_sa_id:
            del self._inbound_spis[record.inbound.spi]
        if self._outbound_spis.get((record.outbound.spi, record.outbound.dst)) == child_sa_id:
            del self._outbound_spis[(record.outbound.spi, record.outbound.dst)]
        self._endpoint_count[record.outbound.dst] -= 1
        if self._endpoint_count[record.outbound.dst] <= 0:
            del self._endpoint_count[record.outbound.dst]
        return record

    def check_child_sa(self, record: ChildSaRecord) -> None:
        """Raise the DataplaneError `install_child_sa` would raise for this record, changing nothing."""
        existing = self._children.get(record.id)
        if existing is not None and existing != record:
            raise AlreadyExists(f"Child SA {record.id!r} is already installed with other content")
        self._check(record)

    def _created_monotonic(self, record: ChildSaRecord) -> float:
        """Lifetimes count from `created_at` (wall clock, survives restarts) on the monotonic clock."""
        elapsed = max(0.0, self._wall_clock() - record.created_at) if record.created_at > 0 else 0.0
        return self._monotonic() - elapsed

    def _sa_document(self, op: str, record: ChildSaRecord, owner: int) -> dict[str, Any]:
        return {
            "op": op,
            "child_sa": record.id,
            "owner": owner,
            "inbound": association_document(record.inbound, "inbound"),
            "outbound": association_document(record.outbound, "outbound"),
            "created_at": self._created_monotonic(record),
        }

    async def _broadcast(self, messages: list[tuple[int, dict[str, Any]]]) -> list[str]:
        """Send each (worker, message); return the errors (empty: every worker applied its message)."""
        return (await self._broadcast_groups([messages]))[0]

    async def _broadcast_groups(self, groups: list[list[tuple[int, dict[str, Any]]]]) -> list[list[str]]:
        """Send every group's (worker, message) pairs at once; return each group's errors."""
        flat = [pair for group in groups for pair in group]
        results = await asyncio.gather(
            *(self._channel(index).request(message) for index, message in flat), return_exceptions=True
        )
        out: list[list[str]] = []
        at = 0
        for group in groups:
            errors = []
            for (index, _), result in zip(group, results[at : at + len(group)], strict=True):
                if isinstance(result, BaseException):
                    errors.append(f"worker {index}: {result}")
                elif not result.get("ok"):
                    errors.append(f"worker {index}: {result.get('error', 'refused')}")
            at += len(group)
            out.append(errors)
        return out

    async def install_child_sa(self, record: ChildSaRecord) -> None:
        error = (await self.install_child_sas([record]))[0]
        if error is not None:
            raise error

    async def install_child_sas(self, records: list[ChildSaRecord]) -> list[DataplaneError | None]:
        """Install several Child SAs, each all or nothing on its own: one ledger transaction for
        their sequence blocks, their worker messages sent together. Returns each one's error."""
        results: list[DataplaneError | None] = [None] * len(records)
        events: list[DataplaneEvent] = []
        async with self._lock:
            fresh: list[int] = []
            inbound, outbound = dict(self._inbound_spis), dict(self._outbound_spis)  # with this batch's
            for i, record in enumerate(records):
                existing = self._children.get(record.id)
                if existing is not None:
                    if existing != record:
                        results[i] = AlreadyExists(f"Child SA {record.id!r} is already installed with other content")
                    continue
                try:
                    self._check(record)
                    self._check_spis(record, inbound, outbound)
                except DataplaneError as exc:
                    results[i] = exc
                    continue
                inbound[record.inbound.spi] = record.id
                outbound[(record.outbound.spi, record.outbound.dst)] = record.id
                fresh.append(i)
            if not fresh:
                return results
            try:
                claims = await self.persistence.start_children(
                    [
                        ChildClaim(
                            records[i].id,
                            records[i].outbound.spi,
                            records[i].inbound.spi,
                            # the floor the worker's inbound SA asks for as it starts: durable with the claim
                            self.settings.replay_block if records[i].inbound.replay_window else 0,
                        )
                        for i in fresh
                    ],
                    self.settings.sequence_block,
                )
            except Exception as exc:
                for i in fresh:
                    results[i] = DataplaneError(
                        f"Child SA {records[i].id!r}: cannot reserve sequence numbers: {type(exc).__name__}: {exc}"
                    )
                return results
            groups: list[list[tuple[int, dict[str, Any]]]] = []
            floors: list[int] = []
            for i, (next_seq, reserved, floor) in zip(fresh, claims, strict=True):
                record = records[i]
                owner = owner_of(record, self.workers)
                install = self._sa_document("install_sa", record, owner)
                install.update(next_seq=next_seq, reserved_upto=reserved, replay_floor=floor)
                wanted = self.initial_filter(record) if self.initial_filter is not None else None
                if wanted is not None:
                    install["filter"] = [str(s) for s in wanted]
                groups.append(
                    [(owner, install)]
                    + [
                        (index, {"op": "sa_owner", "child_sa": record.id, "owner": owner})
                        for index in range(self.workers)
                        if index != owner
                    ]
                )
                floors.append(floor)
            outcomes = await self._broadcast_groups(groups)
            undo: list[tuple[int, dict[str, Any]]] = []
            for i, errors, floor in zip(fresh, outcomes, floors, strict=True):
                record = records[i]
                if errors:
                    undo += [(w, {"op": "remove_sa", "child_sa": record.id}) for w in range(self.workers)]
                    results[i] = DataplaneError(f"Child SA {record.id!r} not installed: {'; '.join(errors)}")
                    continue
                self._adopt(record)
                self._refresh_routes(record)
                events.append(DataplaneEvent(DataplaneEventKind.INSTALLED, child_sa=record.id, spi=record.inbound.spi))
                if floor > 0:
                    # Our inbound window starts above anything we may have accepted before the crash;
                    # a peer sending slowly may stay below it for a while. A rekey resets both ends.
                    events.append(
                        DataplaneEvent(
                            DataplaneEventKind.SOFT_EXPIRE,
                            child_sa=record.id,
                            spi=record.inbound.spi,
                            reason="reinstalled after a restart with a raised replay floor: rekey recommended",
                        )
                    )
            if undo:
                await self._broadcast(undo)
        for event in events:
            self._emit(event)
        return results

    async def update_child_sa(self, record: ChildSaRecord) -> None:
        """Replace the parameters of an installed Child SA with the same SPIs (lifetimes, NAT
        ports, selectors); counters, sequence numbers and the replay window carry over."""
        async with self._lock:
            existing = self._children.get(record.id)
            if existing is None:
                raise NotFound(f"Child SA {record.id!r} is not installed")
            if existing == record:
                return
            if (existing.inbound.spi, existing.outbound.spi) != (record.inbound.spi, record.outbound.spi):
                raise InvalidArgument(f"Child SA {record.id!r}: an update keeps both SPIs")
            self._check(record)
            owner = owner_of(record, self.workers)
            errors = await self._broadcast([(owner, self._sa_document("update_sa", record, owner))])
            if errors:
                await self._broadcast([(owner, self._sa_document("update_sa", existing, owner))])
                raise DataplaneError(f"Child SA {record.id!r} not updated: {'; '.join(errors)}")
            self._drop(record.id)
            self._adopt(record)
            self._refresh_routes(record)

    async def delete_child_sa(self, child_sa_id: str) -> None:
        async with self._lock:
            record = self._children.get(child_sa_id)
            if record is None:
                raise NotFound(f"Child SA {child_sa_id!r} is not installed")
            messages = [(i, {"op": "remove_sa", "child_sa": child_sa_id}) for i in range(self.workers)]
            results = await asyncio.gather(
                *(self._channel(index).request(message) for index, message in messages), return_exceptions=True
            )
            errors = [
                f"worker {index}: {result if isinstance(result, BaseException) else result.get('error', 'refused')}"
                for (index, _), result in zip(messages, results, strict=True)
                if isinstance(result, BaseException) or not result.get("ok")
            ]
            tops = [
                int(result["replay_top"])
                for result in results
                if isinstance(result, dict) and isinstance(result.get("replay_top"), int)
            ]
            if tops and not errors:
                # every worker stopped: nothing above this was ever accepted (graceful hand-over floor)
                self.final_replay_tops[child_sa_id] = max(tops)
                while len(self.final_replay_tops) > FINAL_REPLAY_TOPS_KEPT:  # unclaimed (deletes, partitions)
                    del self.final_replay_tops[next(iter(self.final_replay_tops))]
            if errors:  # a worker that cannot remove an SA is broken: fail closed
                self._fail(f"Child SA {child_sa_id!r} could not be removed: {'; '.join(errors)}")
                raise DataplaneError(f"Child SA {child_sa_id!r} not removed: {'; '.join(errors)}")
            self._drop(child_sa_id)
            self._refresh_routes(None, child_sa_id)
        self._emit(DataplaneEvent(DataplaneEventKind.DELETED, child_sa=child_sa_id, spi=record.inbound.spi))

    async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
        """What may leave the Child SA's inbound packets after decapsulation (the identity's packet
        filter, on top of the SA's selectors); None lifts it. Applied by the owning worker: in C on
        the compiled lane, by the engine's general path on the Python lanes; denials are the
        `identity_filter` drop reason. The filter stays across updates of the SA."""
        async with self._lock:
            record = self._children.get(child_sa_id)
            if record is None:
                raise NotFound(f"Child SA {child_sa_id!r} is not installed")
            texts = None if selectors is None else [str(s) for s in selectors]
            reply = await self._channel(owner_of(record, self.workers)).request(
                {"op": "set_filter", "child_sa": child_sa_id, "selectors": texts}
            )
            if not reply.get("ok"):
                raise InvalidArgument(f"filter of Child SA {child_sa_id!r} refused: {reply.get('error')}")

    async def set_identity_filters(self, filters: dict[str, list[TrafficSelector] | None]) -> dict[str, str]:
        """`set_identity_filter` for many Child SAs at once (one message per worker, each distinct
        filter built once); returns the Child SAs whose filter was not applied, with why."""
        errors: dict[str, str] = {}
        per_worker: dict[int, list[dict[str, object]]] = {}
        async with self._lock:
            for child_sa_id, selectors in filters.items():
                record = self._children.get(child_sa_id)
                if record is None:
                    errors[child_sa_id] = "not installed"
                    continue
                texts = None if selectors is None else [str(s) for s in selectors]
                per_worker.setdefault(owner_of(record, self.workers), []).append(
                    {"child_sa": child_sa_id, "selectors": texts}
                )
            workers = list(per_worker)
            replies = await asyncio.gather(
                *(self._channel(w).request({"op": "set_filters", "filters": per_worker[w]}) for w in workers),
                return_exceptions=True,
            )
        for worker, reply in zip(workers, replies, strict=True):
            if isinstance(reply, BaseException):
                errors.update({str(f["child_sa"]): f"worker {worker}: {reply}" for f in per_worker[worker]})
            elif not reply.get("ok"):
                errors.update({str(f["child_sa"]): str(reply.get("error")) for f in per_worker[worker]})
            else:
                errors.update({str(k): str(v) for k, v in dict(reply.get("errors", {})).items()})
        return errors

    async def identity_filter_drops(self) -> FilterDrops:
        """Packets the identity filters denied and packets outside an SA's selectors, per Child SA
        (cumulative while it is installed), and (Child SA, packet header) samples of denied packets
        and of packets dropped outside the SA's selectors since the last call."""
        drops = FilterDrops()
        for channel in self._channels:
            try:
                reply = await channel.request({"op": "filter_drops"})
            except WorkerGone:
                continue
            for field_name, into in (("denied", drops.denied), ("outside_selectors", drops.outside_selectors)):
                for child_sa, count in dict(reply.get(field_name, {})).items():
                    into[str(child_sa)] = into.get(str(child_sa), 0) + int(count)
            for child_sa, header in reply.get("samples", []):
                drops.samples.append((str(child_sa), bytes.fromhex(str(header))))
            for child_sa, header in reply.get("outside_samples", []):
                drops.outside_samples.append((str(child_sa), bytes.fromhex(str(header))))
        return drops

    def _refresh_routes(self, record: ChildSaRecord | None, child_sa_id: str = "") -> None:
        if self.routes is None:
            return
        child_id = record.id if record is not None else child_sa_id
        policies = [self._policies[pid] for pid in self._policies_of.get(child_id, ())]
        if policies:
            self.routes.update_child(policies, record)

    # -- policies -----------------------------------------------------------------------
    def check_policy(self, policy: SpdPolicy) -> None:
        if policy.local_ts.version != policy.remote_ts.version:
            raise InvalidArgument(f"policy {policy.id!r} mixes IPv4 and IPv6 selectors")
        if policy.mode != Mode.TUNNEL or policy.protocol != IpProto.ESP:
            raise Unsupported(f"policy {policy.id!r}: the userspace backend carries ESP tunnel mode only")

    def _endpoints(self) -> set[str]:
        return set(self._endpoint_count)

    def _set_policy(self, policy: SpdPolicy) -> None:
        self._unset_policy(policy.id)
        self._policies[policy.id] = policy
        if policy.child_sa:
            self._policies_of.setdefault(policy.child_sa, set()).add(policy.id)

    def _unset_policy(self, policy_id: str) -> None:
        previous = self._policies.pop(policy_id, None)
        if previous is not None and previous.child_sa:
            named = self._policies_of.get(previous.child_sa)
            if named is not None:
                named.discard(policy_id)
                if not named:
                    del self._policies_of[previous.child_sa]

    async def install_policy(self, policy: SpdPolicy) -> None:
        error = (await self.install_policies([policy]))[0]
        if error is not None:
            raise error

    async def install_policies(self, policies: list[SpdPolicy]) -> list[DataplaneError | None]:
        """Install or replace several policies (distinct ids), each all or nothing on its own:
        their worker messages go out together, one round of replies for all. Returns each
        one's error (None: installed, or already installed as it is)."""
        results: list[DataplaneError | None] = [None] * len(policies)
        async with self._lock:
            todo: list[int] = []
            for i, policy in enumerate(policies):
                if self._policies.get(policy.id) == policy:
                    continue
                try:
                    self.check_policy(policy)
                except DataplaneError as exc:
                    results[i] = exc
                    continue
                todo.append(i)
            if not todo:
                return results
            groups = [
                [(w, {"op": "install_policy", "policy": policy_document(policies[i])}) for w in range(self.workers)]
                for i in todo
            ]
            sent = await self._broadcast_groups(groups)
            for i, errors in zip(todo, sent, strict=True):
                try:
                    await self._settle_policy(policies[i], errors)
                except DataplaneError as exc:
                    results[i] = exc
        return results

    async def _settle_policy(self, policy: SpdPolicy, errors: list[str]) -> None:
        """The workers took `policy` (or reported `errors`): routes and cleartext guard follow,
        or everything goes back to the previous version (DataplaneError)."""
        previous = self._policies.get(policy.id)
        if not errors and self.routes is not None:
            try:
                if previous is not None:
                    self.routes.replace_policy(previous, policy, self._children.get(policy.child_sa), self._endpoints())
                else:
                    self.routes.add_policy(policy, self._children.get(policy.child_sa), self._endpoints())
            except (NetConfigError, ValueError) as exc:
                errors.append(f"routes: {exc}")
                if previous is not None:
                    with contextlib.suppress(NetConfigError, ValueError):
                        self.routes.add_policy(previous, self._children.get(previous.child_sa), self._endpoints())
        if not errors:
            try:
                await self.guard.add(policy)
            except DataplaneError as exc:
                errors.append(f"cleartext guard: {exc}")
                if self.routes is not None:
                    with contextlib.suppress(NetConfigError, ValueError):
                        self.routes.remove_policy(policy)
                        if previous is not None:
                            self.routes.add_policy(previous, self._children.get(previous.child_sa), self._endpoints())
        if errors:
            undo: dict[str, Any] = (
                {"op": "install_policy", "policy": policy_document(previous)}
                if previous is not None
                else {"op": "remove_policy", "policy_id": policy.id}
            )
            await self._broadcast([(i, undo) for i in range(self.workers)])
            raise DataplaneError(f"policy {policy.id!r} not installed: {'; '.join(errors)}")
        self._set_policy(policy)

    async def delete_policy(self, policy_id: str) -> None:
        async with self._lock:
            policy = self._policies.get(policy_id)
            if policy is None:
                raise NotFound(f"policy {policy_id!r} is not installed")
            errors = await self._broadcast(
                [(i, {"op": "remove_policy", "policy_id": policy_id}) for i in range(self.workers)]
            )
            if errors:
                self._fail(f"policy {policy_id!r} could not be removed: {'; '.join(errors)}")
                raise DataplaneError(f"policy {policy_id!r} not removed: {'; '.join(errors)}")
            self._unset_policy(policy_id)
            await self.guard.remove(policy_id)
            if self.routes is not None:
                try:
                    self.routes.remove_policy(policy)
                except NetConfigError as exc:
                    log.warning("routes of policy %s not removed: %s", policy_id, exc)

    # -- counters -----------------------------------------------------------------------
    def counters(self) -> list[SaCounters]:
        """Per-SA counters as of the last `refresh_counters()`."""
        return list(self._counters)

    def drop_counters(self) -> dict[str, int]:
        """Drops by reason (engine, SPD, sockets, TUN) as of the last `refresh_counters()`."""
        return dict(self._drops)

    async def refresh_counters(self) -> None:
        counters: list[SaCounters] = []
        drops: dict[str, int] = {}

        def add(reason: str, count: int) -> None:
            if count:
                drops[reason] = drops.get(reason, 0) + count

        for channel in self._channels:
            try:
                reply = await channel.request({"op": "counters"})
                status = await channel.request({"op": "status"})
            except WorkerGone:
                continue
            for sa in reply.get("sas", []):
                counters.append(
                    SaCounters(
                        int(sa["spi"]), str(sa["direction"]), int(sa["packets"]), int(sa["bytes"]), int(sa["top"])
                    )
                )
            for reason, count in dict(reply.get("drops", {})).items():
                add(str(reason), int(count))
            worker = status.get("status") or {}
            for room in ("outer", "raw_outer"):
                for reason, count in dict((worker.get(room) or {}).get("drops", {})).items():
                    add(f"{room}_{reason}".replace("outer_runt", "runt"), int(count))
            for reason, count in dict((worker.get("tun") or {}).get("drops", {})).items():
                add(f"tun_{reason}", int(count))
            for reason, count in dict((worker.get("loop") or {}).get("errors", {})).items():
                add(f"loop_{reason}", int(count))
        self._counters = counters
        self._drops = drops

    # -- worker messages: sequence blocks, replay floors, events, IKE ---------------------
    def _on_worker_message(self, index: int, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "reserve_sequence":
            self._spawn(
                self._reserve(index, str(message.get("child_sa", "")), int(message["spi"]), int(message["upto"]))
            )
        elif op == "persist_replay":
            self._queue_replay(str(message.get("child_sa", "")), int(message["spi"]), int(message["upto"]))
        elif op == "events":
            for event in message.get("events", []):
                try:
                    kind = DataplaneEventKind(event["kind"])
                except (KeyError, ValueError):
                    continue
                self._emit(
                    DataplaneEvent(
                        kind,
                        child_sa=str(event.get("child_sa", "")),
                        spi=int(event.get("spi", 0)),
                        policy=str(event.get("policy", "")),
                        reason=str(event.get("reason", "")),
                    )
                )
        elif op == "ike":
            handler = self._ike_handler
            if handler is None:
                return
            try:
                payload = bytes.fromhex(str(message["payload"]))
                handler(
                    str(message.get("local_addr", "")),
                    int(message.get("local_port", 0)),
                    str(message["remote_addr"]),
                    int(message["remote_port"]),
                    payload,
                )
            except (KeyError, TypeError, ValueError):
                log.warning("worker %d sent a malformed IKE message", index)

    async def _reserve(self, index: int, child_sa: str, spi: int, upto: int) -> None:
        """Persist the block, then grant it. Retries while the store is down: the sender keeps
        going on what is left of its block and stops (counted) if that runs out first."""
        delay = 0.05
        while True:
            try:
                granted = await self.persistence.reserve(child_sa, spi, upto)
                break
            except Exception as exc:
                self.persist_failures += 1
                log.warning("sequence block for SPI %#010x not persisted yet: %s", spi, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PERSIST_RETRY_MAX)
                if child_sa and child_sa not in self._children:
                    return
        if granted is None:
            log.error("SPI %#010x: sequence numbers are reserved by another instance; not sending", spi)
            self._emit(
                DataplaneEvent(
                    DataplaneEventKind.SEQUENCE_EXHAUSTED,
                    child_sa=child_sa,
                    spi=spi,
                    reason="sequence numbers reserved by another dataplane instance: this one stops sending",
                )
            )
            return
        with contextlib.suppress(WorkerGone, DataplaneError):
            await self._channel(index).request({"op": "grant_sequence", "spi": spi, "upto": granted})

    def _queue_replay(self, child_sa: str, spi: int, upto: int) -> None:
        pending = self._replay_pending.get(spi)
        self._replay_pending[spi] = max(upto, pending or 0)
        if pending is None:
            self._spawn(self._persist_replay(child_sa, spi))

    async def _persist_replay(self, child_sa: str, spi: int) -> None:
        delay = 0.05
        while spi in self._replay_pending:
            upto = self._replay_pending[spi]
            try:
                await self.persistence.persist_replay_floor(child_sa, spi, upto)
            except Exception as exc:
                self.persist_failures += 1
                log.warning("replay floor of SPI %#010x not persisted yet: %s", spi, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PERSIST_RETRY_MAX)
                continue
            if self._replay_pending.get(spi) == upto:
                del self._replay_pending[spi]

    # -- IKE on 4500 --------------------------------------------------------------------
    def set_ike_handler(self, handler: IkeHandler | None) -> None:
        """IKE messages that arrive on UDP 4500 (non-ESP marker removed) go to `handler`."""
        self._ike_handler = handler

    async def send_ike(self, local_addr: str, remote_addr: str, remote_port: int, payload: bytes) -> bool:
        """Send an IKE message from UDP 4500 (the workers' socket), non-ESP marker added.

        Posted, not requested: the relay sends a stream message's datagrams one after the other,
        and a round trip to the worker for each would hold the next ones back. True once the
        worker has it; a send the worker then fails is counted there (`ike_send_failed`), and
        IKE retransmits."""
        try:
            await self._channel(0).post(
                {
                    "op": "send_ike",
                    "local_addr": local_addr,
                    "remote_addr": remote_addr,
                    "remote_port": remote_port,
                    "payload": payload.hex(),
                }
            )
        except (WorkerGone, DataplaneError):
            return False
        return True

    # -- events -------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[DataplaneEvent]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def _emit(self, event: DataplaneEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.events_dropped += 1


def default_workers(configured: int) -> int:
    return configured or max(1, len(os.sched_getaffinity(0)))


def _conforms_to_the_protocol(backend: UserspaceBackend) -> DataplaneBackend:
    return backend  # mypy checks that UserspaceBackend implements DataplaneBackend
