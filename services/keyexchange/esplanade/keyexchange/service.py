"""The keyexchange service process: the IKEv2 engine wired to the store, the dataplane and gRPC.

    esplanade serve keyexchange

Start-up: register the instance (`keyexchange/instances/<instance>` under a lease), reserve
inbound SPIs, load every connection and pool from the store (then follow them with a
watch), connect the IKE transport (the dataplane relay, or own sockets), initiate the
`start_action=start` connections, and serve `esplanade.v1.KeyExchange`.

A restart (even kill -9) loses the IKE SAs of the old process: the IKE core keeps them in
memory only (moving them between instances is the scale-out work). Their Child SAs stay in
the store and keep forwarding in the dataplane; the peers notice the dead IKE SA at their
next DPD/rekey, and a new negotiation for the same traffic takes the SPD entries over (same
policy ids). Records left behind by a previous boot (`orphans`) are deleted once no SPD
entry points at them any more or their hard lifetime has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time

from esplanade.cluster.lease_clock import LeaseClock
from esplanade.config.settings import Settings
from esplanade.keyexchange.child_sa_handoff import ChildSaHandoff
from esplanade.keyexchange.connection_catalog import ConnectionCatalog
from esplanade.keyexchange.dataplane_follower import DataplaneFollower
from esplanade.keyexchange.engine_driver import IkeEngine
from esplanade.keyexchange.ike_event_feed import EventFeed
from esplanade.keyexchange.ike_metrics import IkeMetrics
from esplanade.keyexchange.ike_sa_sharing import IkeSaSharing
from esplanade.keyexchange.ike_spans import NegotiationSpans
from esplanade.keyexchange.ike_transports import DataplaneRelay, IkeSockets
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.keyexchange_servicer import KeyExchangeServicer
from esplanade.keyexchange.remote_access_policy import RemoteAccessPolicy
from esplanade.keyexchange.spi_reservations import SpiReservations
from esplanade.keyexchange.tunnel_status import TunnelStatus
from esplanade.keyexchange.virtual_ip_routes import VirtualIpRoutes
from esplanade.policy.access_view import AccessView
from esplanade.policy.decision_events import DecisionEvents
from esplanade.runtime.service_host import ServiceContext, run_service
from esplanade.store import schema
from esplanade.store.base import Delete, LeaseNotFound, Store, StoreError
from esplanade.store.factory import open_sealer, open_store
from esplanade.store.sealing import Sealer, decode_document, encode_document
from esplanade.v1 import keyexchange_pb2, keyexchange_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = keyexchange_pb2.DESCRIPTOR.services_by_name["KeyExchange"].full_name
SWEEP_INTERVAL = 30.0


def instance_name(settings: Settings) -> str:
    name = settings.keyexchange.instance or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:48] or "keyexchange"


class KeyExchangeNode:
    """Everything one keyexchange instance runs, composed."""

    def __init__(self, settings: Settings, store: Store, sealer: Sealer) -> None:
        self.settings = settings
        self.store = store
        self.sealer = sealer
        kx = settings.keyexchange
        self.instance = instance_name(settings)
        self.boot = os.urandom(3).hex()
        self.id_prefix = f"{self.instance}-{self.boot}."
        self.lease_id = 0
        self.lease_clock = LeaseClock(margin=min(0.5, kx.lease_seconds / 4))
        self._access_task: asyncio.Task[None] | None = None
        self.spis = SpiReservations(store, self.instance, size=kx.spi_pool, lease=lambda: self.lease_id)
        self.access = AccessView(store)
        self.decisions = DecisionEvents(f"keyexchange/{self.instance}")  # the flow log subscribes here
        self.access_policy = RemoteAccessPolicy(self.access, self.decisions)
        dispatcher = IkeDispatcher(
            [],
            cookie_threshold=kx.cookie_threshold,
            cookie_threshold_ip=kx.cookie_threshold_ip,
            block_threshold=kx.block_threshold,
            install_timeout=kx.install_timeout_seconds,
            ack_initiator_installs=True,
            id_prefix=self.id_prefix,
            allocate_spi=self.spis.take,
            now=time.monotonic(),
            new_ike_spi=lambda: self.sharing.choose_spi() if self.sharing is not None else os.urandom(8),
            access_for=self.access_policy.grant_for,
            responder=settings.site.inbound != "dial-out-only",  # a connector only dials out
        )
        self.engine = IkeEngine(dispatcher)
        self.handoff = ChildSaHandoff(store, sealer, self.spis, self.engine.inbound_sa_installed)
        self.sharing: IkeSaSharing | None = None
        if kx.share_ike_sas:
            self.sharing = IkeSaSharing(store, sealer, self.engine, self.handoff, self.instance, lambda: self.lease_id)
        self.handoff.on_write_failed = self._write_failed
        self.catalog = ConnectionCatalog(store, sealer, self.engine)
        self.feed = EventFeed(lambda ike: self.engine.connection_of.get(ike, ""))
        self.tunnels = TunnelStatus(dispatcher, self.engine.connection_of)
        self.metrics = IkeMetrics(dispatcher, self.engine.connection_of, tunnels=self.tunnels)
        self.spans = NegotiationSpans(dispatcher, self.engine.connection_of)
        self.handoff.trace_carrier = self.spans.carrier
        # spans first: the handoff writes the trace context of the negotiation into the records
        self.engine.listeners += [
            self.spans.observe,
            self.tunnels.observe,
            self.handoff.handle,
            self.feed.publish,
            self.metrics.observe,
        ]
        self.virtual_ips = VirtualIpRoutes(settings.dataplane.tun_name)
        self.engine.listeners.append(self.virtual_ips.handle)
        self.engine.listeners.append(self.access_policy.handle)
        targets = [settings.endpoints.dataplane]
        self.follower = DataplaneFollower(
            targets,
            settings.grpc,
            self.engine,
            self.catalog.trap_connection.get,
            interval=kx.counters_interval_seconds,
        )
        self.transport: DataplaneRelay | IkeSockets
        if kx.transport == "relay":
            self.transport = DataplaneRelay(
                targets,
                settings.grpc,
                self.engine.feed,
                backoff_max=kx.relay_backoff_max_seconds,
                instance=self.instance,
            )
            self.transport.on_installed = self.handoff.installed_in_band
        else:
            self.transport = IkeSockets([str(a) for a in kx.listen_addresses], self.engine.feed, ike_port=kx.ike_port)

    def _write_failed(self, ike: str, child: str, reason: str) -> None:
        sa = self.engine.dispatcher.sas.get(ike)
        if sa is not None and child in sa.children and sa.held is None:
            with contextlib.suppress(KeyError):
                self.engine.call(self.engine.dispatcher.delete_child, ike, child)

    # -- membership --------------------------------------------------------------------------
    async def register(self) -> None:
        sent_at = time.monotonic()
        lease = await self.store.grant_lease(self.settings.keyexchange.lease_seconds)
        self.lease_id = lease.id
        self.lease_clock.granted(lease.id, lease.ttl, sent_at)
        doc = {"boot": self.boot, "id_prefix": self.id_prefix, "started_at": time.time()}
        await self.store.put(schema.keyexchange_instance(self.instance), encode_document(doc), lease=lease.id)

    async def keep_registered(self) -> None:
        ttl = self.settings.keyexchange.lease_seconds
        interval = max(0.1, ttl / 4)
        while True:
            await asyncio.sleep(interval)
            if self.sharing is not None and not self.lease_clock.valid(time.monotonic()):
                self.sharing.suspend()  # a survivor may take our IKE SAs over: stop speaking for them
            try:
                sent_at = time.monotonic()
                answer = await asyncio.wait_for(self.store.keepalive(self.lease_id), timeout=interval)
                self.lease_clock.renewed(self.lease_id, answer, sent_at)
                if self.sharing is not None:
                    self.sharing.resume()
            except TimeoutError:
                log.warning("lease keepalive unanswered")
            except LeaseNotFound:
                log.warning("keyexchange lease lost: registering again, reserving SPIs anew")
                with contextlib.suppress(StoreError):
                    await self.register()
                    self.spis.forget_reserved()
                    await self.spis.fill()
                    if self.sharing is not None:
                        self.sharing.lease_renewed()
            except StoreError as exc:
                log.warning("lease keepalive failed: %s", exc)

    # -- start-up ------------------------------------------------------------------------------
    async def start(self, ctx: ServiceContext | None = None) -> None:
        await self.register()
        await self.spis.fill()
        self.handoff.adopt_orphans(await self.find_orphans())
        revision = await self.catalog.load_all()
        access_task = asyncio.get_running_loop().create_task(self.access.run(), name="kx-policy-access")
        self._access_task = access_task
        # No remote user is admitted before the policy is known.
        ready = asyncio.get_running_loop().create_task(self.access.ready.wait())
        await asyncio.wait([ready, access_task], return_when=asyncio.FIRST_COMPLETED)
        if not self.access.ready.is_set():
            ready.cancel()
            access_task.result()  # raises what stopped the policy view
            raise RuntimeError("the policy view stopped before it was ready")
        await self.transport.start()
        self.engine.start(self.transport)
        tasks = [
            (self.keep_registered(), "kx-lease"),
            (self.catalog.follow(revision), "kx-connections"),
            (self.handoff.follow_acks(), "kx-acks"),
            (self.follower.poll_counters(), "kx-counters"),
            (self.sweep(), "kx-sweep"),
            *(((self.sharing.run(), "kx-ike-sharing"),) if self.sharing is not None else ()),
            (self.decisions.run(), "kx-decision-events"),
            *((self.follower.follow_events(t), f"kx-dp-events:{t}") for t in self.follower.targets),
        ]
        for coro, name in tasks:
            if ctx is not None:
                ctx.spawn(coro, name)
            else:
                asyncio.get_running_loop().create_task(coro, name=name)
        started = self.catalog.start_configured()
        if started:
            log.info("initiated %d connection(s) with start_action=start", len(started))

    async def stop(self) -> None:
        if self._access_task is not None:
            self._access_task.cancel()
        self.transport.close()
        self.engine.close()
        await self.handoff.drain()
        await self.follower.close()
        self.virtual_ips.close()

    @property
    def ready(self) -> bool:
        return self.transport.connected

    # -- housekeeping -----------------------------------------------------------------------
    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.spis.sweep(self.handoff.child_of_spi)
                await self.sweep_orphans()
            except StoreError as exc:
                log.warning("sweep failed: %s", exc)

    async def _shared_ike_prefixes(self) -> set[str]:
        """`<ike id>.` of every IKE SA whose state is in the store, and the ids of its Child SAs
        (which keep their first IKE SA's name across IKE rekeys): another instance carries or
        may take over them, so they are no orphans."""
        states, _ = await self.store.range(schema.prefix("sas", "ike"))
        live: set[str] = set()
        for kv in states:
            live.add(kv.key[len(schema.prefix("sas", "ike")) :] + ".")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                live.update(str(child["id"]) for child in json.loads(kv.value).get("children", []))
        return live

    async def find_orphans(self) -> dict[str, tuple[int, set[str]]]:
        """Child SA records of keyexchange boots that are not running any more."""
        live = {self.id_prefix} | await self._shared_ike_prefixes()
        instances, _ = await self.store.range(schema.prefix("keyexchange", "instances"))
        for kv in instances:
            with contextlib.suppress(Exception):
                live.add(str(decode_document(kv.key, kv.value).get("id_prefix", "")))
        records, _ = await self.store.range(schema.prefix("sas", "child"))
        policies, _ = await self.store.range(schema.prefix("spd"))
        orphans: dict[str, tuple[int, set[str]]] = {}
        for kv in records:
            child_id = kv.key[len(schema.prefix("sas", "child")) :]
            if any(child_id.startswith(p) for p in live if p):
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                orphans[child_id] = (int(json.loads(kv.value)["inbound"]["spi"]), set())
        for kv in policies:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                owner = json.loads(kv.value).get("child_sa", "")
                if owner in orphans:
                    orphans[owner][1].add(kv.key[len(schema.prefix("spd")) :])
        return orphans

    async def sweep_orphans(self) -> int:
        """Delete Child SA records of previous boots that nothing carries traffic on any more."""
        live_prefixes = {self.id_prefix} | await self._shared_ike_prefixes()
        instances, _ = await self.store.range(schema.prefix("keyexchange", "instances"))
        for kv in instances:
            with contextlib.suppress(Exception):
                live_prefixes.add(str(decode_document(kv.key, kv.value).get("id_prefix", "")))
        records, _ = await self.store.range(schema.prefix("sas", "child"))
        policies, _ = await self.store.range(schema.prefix("spd"))
        carried = set()
        for kv in policies:
            with contextlib.suppress(Exception):
                carried.add(json.loads(kv.value).get("child_sa", ""))
        now = time.time()
        removed = 0
        for kv in records:
            child_id = kv.key[len(schema.prefix("sas", "child")) :]
            if any(child_id.startswith(p) for p in live_prefixes if p):
                continue
            try:
                doc = json.loads(kv.value)
                hard = int(doc["inbound"]["lifetime"].get("hard_seconds", 0))
                expired = bool(hard) and now > float(doc["created_at"]) + hard
                spi = int(doc["inbound"]["spi"])
            except (ValueError, KeyError, TypeError):
                continue
            if child_id in carried and not expired:
                continue
            await self.store.commit([], [Delete(kv.key), Delete(schema.spi_allocation(spi))])
            removed += 1
        if removed:
            log.info("deleted %d Child SA record(s) left by a previous keyexchange", removed)
        return removed


async def _setup(ctx: ServiceContext) -> None:
    node = KeyExchangeNode(ctx.settings, ctx.store, open_sealer(ctx.settings.kek))
    keyexchange_pb2_grpc.add_KeyExchangeServicer_to_server(KeyExchangeServicer(node), ctx.server.server)
    await node.start(ctx)
    ctx.readiness.append(lambda: node.ready)
    ctx.on_stop.append(node.stop)


async def serve(settings: Settings) -> None:
    store = open_store(settings.store)
    await run_service("keyexchange", settings.endpoints.keyexchange, settings, store, _setup, [SERVICE_NAME])
