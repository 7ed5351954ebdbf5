"""What the dataplane tells the IKE core: lifetime events and traffic.

- `Dataplane.WatchEvents`: soft_expire and sequence_exhausted -> rekey the Child SA;
  hard_expire -> `child_expired(hard=True)`; acquire on a trap entry -> initiate its connection.
- `Dataplane.GetCounters`, every `counters_interval_seconds`: a Child SA whose inbound
  packets grew -> `child_traffic_seen` (DPD only runs for idle SAs); the last counters are
  what `ListSas` shows when the dataplane cannot be asked right then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from esplanade.config.settings import GrpcSettings
from esplanade.keyexchange.engine_driver import IkeEngine
from esplanade.keyexchange.ike_transports import stream_channel
from esplanade.rpc.server import open_channel
from esplanade.store.backoff import Backoff
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc, ipsec_pb2

log = logging.getLogger(__name__)

COUNTERS_DEADLINE = 2.0
# the event kinds the IKE core acts on (installed/deleted of every Child SA are not asked for)
FOLLOWED_KINDS = ("soft_expire", "hard_expire", "sequence_exhausted", "acquire")


@dataclass(frozen=True, slots=True)
class ChildCounters:
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0


class DataplaneFollower:
    def __init__(
        self,
        targets: list[str],
        grpc_settings: GrpcSettings,
        engine: IkeEngine,
        trap_connection: Callable[[str], tuple[str, str] | None],
        interval: float = 5.0,
    ) -> None:
        self.targets = targets
        self.grpc = grpc_settings
        self.engine = engine
        self.trap_connection = trap_connection
        self.interval = interval
        self.channels = {t: open_channel(t, grpc_settings) for t in targets}
        self.stream_channels = {t: stream_channel(t, grpc_settings) for t in targets}
        self.counters: dict[str, ChildCounters] = {}
        self.stats: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    async def close(self) -> None:
        for channel in (*self.channels.values(), *self.stream_channels.values()):
            await channel.close()

    # -- counters ------------------------------------------------------------------------------
    async def read_counters(self, child_sa: str = "") -> dict[str, ChildCounters]:
        """Per Child SA counters summed over the dataplane nodes that answer."""
        totals: dict[str, ChildCounters] = {}
        for target, channel in self.channels.items():
            stub = dataplane_pb2_grpc.DataplaneStub(channel)
            try:
                reply = await stub.GetCounters(
                    dataplane_pb2.GetCountersRequest(child_sa=child_sa), timeout=COUNTERS_DEADLINE
                )
            except grpc.aio.AioRpcError as exc:
                self._count("counter_errors")
                log.debug("GetCounters from %s failed: %s", target, exc.code().name)
                continue
            for sa in reply.sas:
                cid = sa.child_sa
                if not cid:
                    continue
                c = totals.get(cid, ChildCounters())
                if sa.direction == ipsec_pb2.DIRECTION_OUT:
                    c = ChildCounters(c.bytes_in, c.bytes_out + sa.bytes, c.packets_in, c.packets_out + sa.packets)
                else:
                    c = ChildCounters(c.bytes_in + sa.bytes, c.bytes_out, c.packets_in + sa.packets, c.packets_out)
                totals[cid] = c
        return totals

    async def poll_counters(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            fresh = await self.read_counters()
            self.note_counters(fresh)

    def note_counters(self, fresh: dict[str, ChildCounters]) -> None:
        for cid, c in fresh.items():
            before = self.counters.get(cid)
            if (before is None or c.packets_in > before.packets_in) and c.packets_in:
                self.engine.call(self.engine.dispatcher.child_traffic_seen, cid)
        self.counters.update(fresh)
        live = {cid for sa in self.engine.dispatcher.sas.values() for cid in sa.children}
        for cid in [c for c in self.counters if c not in live]:
            del self.counters[cid]

    # -- events --------------------------------------------------------------------------------
    async def follow_events(self, target: str) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        while True:
            stub = dataplane_pb2_grpc.DataplaneStub(self.stream_channels[target])
            try:
                async for ev in stub.WatchEvents(dataplane_pb2.WatchDataplaneEventsRequest(kinds=FOLLOWED_KINDS)):
                    backoff.reset()
                    self.on_event(ev)
            except grpc.aio.AioRpcError as exc:
                self._count("event_stream_errors")
                log.debug("dataplane %s event stream: %s", target, exc.code().name)
            await asyncio.sleep(backoff.next_delay())

    def on_event(self, ev: dataplane_pb2.DataplaneEvent) -> None:
        d = self.engine.dispatcher
        self._count(f"event_{ev.kind}")
        try:
            if ev.kind in ("soft_expire", "sequence_exhausted") and ev.child_sa:
                self.engine.call(d.child_expired, ev.child_sa, False)
            elif ev.kind == "hard_expire" and ev.child_sa:
                self.engine.call(d.child_expired, ev.child_sa, True)
            elif ev.kind == "acquire":
                self._acquire(ev.policy)
        except KeyError:
            self._count("events_for_unknown_sas")

    def _acquire(self, policy: str) -> None:
        found = self.trap_connection(policy)
        if found is None:
            self._count("acquires_without_trap")
            return
        connection, child = found
        d = self.engine.dispatcher
        for sa in d.sas.values():  # one negotiation per trap at a time
            if sa.config.name == connection and sa.state.value not in ("deleted", "deleting"):
                if not any(c.name == child for c in sa.children.values()) and sa.established:
                    self.engine.call(d.create_child, sa.id, child)
                return
        log.info("acquire on %s: initiating %s/%s", policy, connection, child)
        self.engine.initiate(connection, child)
