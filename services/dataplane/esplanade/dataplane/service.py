"""The dataplane service process: `esplanade serve dataplane`.

    serve(settings)
      0. with `site.inbound: dial-out-only` (a connector), install the inbound firewall
         (`dial_out_firewall`; removed again on a clean stop).
      1. choose the backend (`choose_backend(settings.dataplane.backend)`; the reason shows in
         GetStatus) and start it. The userspace backend forks its workers here, before gRPC
         and the store client start any thread.
      2. `run_service`: store connection (health follows it), gRPC server, /metrics.
      3. register the node under a lease (`dataplane/nodes/<node>`), start the reconciler
         (store -> backend; acks), the IKE relay sockets (UDP 500 here; 4500 in the workers,
         or here with UDP_ENCAP_ESPINUDP for the kernel backend), and the event pump.

If the userspace datapath dies (a worker exited), the service stops with status 1: it holds
nothing that is not in the store, so a restart (systemd, Kubernetes) reinstalls everything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from esplanade.config.settings import Settings
from esplanade.dataplane.backend import DataplaneBackend, DataplaneError
from esplanade.dataplane.backend_selection import BackendChoice, choose_backend
from esplanade.dataplane.dial_out_firewall import DialOutFirewall, FirewallError
from esplanade.dataplane.flow_meter import FlowMeter
from esplanade.dataplane.flow_telemetry import FlowTelemetry
from esplanade.dataplane.ike_owner_routes import IkeOwnerRoutes
from esplanade.dataplane.ike_relay import IkeRelay
from esplanade.dataplane.ike_relay_local import socket_path, start_local_relay
from esplanade.dataplane.ike_sockets import IkeSocket
from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.state_journal import KernelStateJournal
from esplanade.dataplane.node_membership import NodeMembership
from esplanade.dataplane.ownership import SaOwnership
from esplanade.dataplane.ownership_metrics import OwnershipMetrics
from esplanade.dataplane.ownership_sync import OwnershipSync
from esplanade.dataplane.policy_enforcement import PolicyEnforcer
from esplanade.dataplane.reconciler import Reconciler
from esplanade.dataplane.sequence_ledger import StoreSaPersistence
from esplanade.dataplane.servicer import SERVICE_NAME, DataplaneServicer, EventHub, ServicerParts, publish_event
from esplanade.dataplane.tunnel_steering import SteeringSettings, TunnelSteering
from esplanade.journal.flow_log import FlowLog
from esplanade.policy.access_view import AccessView
from esplanade.policy.decision_events import DecisionEvents
from esplanade.runtime.service_host import ServiceContext, run_service
from esplanade.store.base import Store
from esplanade.store.factory import open_sealer, open_store
from esplanade.v1 import dataplane_pb2_grpc

if TYPE_CHECKING:  # imported when chosen: the kernel backend never loads the userspace datapath
    from esplanade.dataplane.userspace.backend import UserspaceBackend
    from esplanade.dataplane.userspace.netconfig import LinkConfigurator

log = logging.getLogger(__name__)

STOP_GRACE = 1.0  # seconds a worker loss waits for the stop request that may explain it


@dataclass
class DataplaneNode:
    """What one dataplane process runs; built before `run_service`, completed in `setup`."""

    settings: Settings
    node: str
    choice: BackendChoice
    store: Store
    backend: DataplaneBackend
    persistence: StoreSaPersistence
    relay: IkeRelay = field(default_factory=IkeRelay)
    events: EventHub = field(default_factory=EventHub)
    sockets: list[IkeSocket] = field(default_factory=list)
    failure: str = ""
    decisions: DecisionEvents | None = None  # drop events of the identity filters (the flow log subscribes)
    enforcer: PolicyEnforcer | None = None
    firewall: DialOutFirewall | None = None  # site.inbound: dial-out-only


def default_workers(configured: int) -> int:
    return configured or max(1, len(os.sched_getaffinity(0)))


def userspace_backend(runtime: DataplaneNode) -> UserspaceBackend | None:
    return cast("UserspaceBackend", runtime.backend) if runtime.choice.name == "userspace" else None


def node_name(settings: Settings) -> str:
    return settings.dataplane.node or socket.gethostname()


def bind_address(settings: Settings) -> str:
    listen = settings.dataplane.listen_addresses
    return listen[0] if listen else "0.0.0.0"


def kernel_state_file(settings: Settings) -> Path:
    dp = settings.dataplane
    return dp.kernel_state_file or Path(f"/run/esplanade/dataplane-kernel-{node_name(settings)}.json")


def build_backend(settings: Settings, choice: BackendChoice, persistence: StoreSaPersistence) -> DataplaneBackend:
    dp = settings.dataplane
    if choice.name == "kernel":
        return KernelXfrmBackend(
            reason=choice.reason,
            capabilities=choice.capabilities,
            keep_on_stop=dp.kernel_keep_on_stop,
            persistence=persistence,
            sequence_block=dp.sequence_block,
            replay_block=dp.replay_block,
            journal=KernelStateJournal(kernel_state_file(settings)),
        )
    from esplanade.dataplane.userspace.backend import UserspaceBackend, UserspaceBackendSettings
    from esplanade.dataplane.userspace.datapath import DatapathSettings

    datapath = DatapathSettings(
        tun_name=dp.tun_name,
        workers=default_workers(dp.workers),
        bind_address=bind_address(settings),
        port=dp.udp_port,
        path_mtu=dp.path_mtu,
        plain_esp=dp.plain_esp and ipaddress.ip_address(bind_address(settings)).version == 4,
        realtime_priority=dp.realtime_priority,
    )
    return UserspaceBackend(
        UserspaceBackendSettings(
            datapath, sequence_block=dp.sequence_block, replay_block=dp.replay_block, hot_path=dp.hot_path
        ),
        persistence,
        reason=choice.reason,
    )


async def serve(settings: Settings) -> None:
    node = node_name(settings)
    choice = choose_backend(settings.dataplane.backend)
    store = open_store(settings.store)
    persistence = StoreSaPersistence(store, node)
    backend = build_backend(settings, choice, persistence)
    firewall = start_dial_out_firewall(settings)
    try:
        await backend.start()  # forks the userspace workers: no threads may exist yet
    except DataplaneError as exc:
        log.error("dataplane backend %s did not start: %s", choice.name, exc)
        if firewall is not None:
            firewall.stop()
        raise SystemExit(1) from None
    runtime = DataplaneNode(settings, node, choice, store, backend, persistence, firewall=firewall)
    stop = asyncio.Event()
    userspace = userspace_backend(runtime)
    if userspace is not None:

        def on_failure(reason: str) -> None:
            # A stop of the whole process group (systemd, `kill -TERM -pgid`) ends the workers
            # as it ends us; only a loss that no stop request explains within a grace period
            # is a failure.
            def confirm() -> None:
                if not stop.is_set():
                    runtime.failure = reason
                    stop.set()

            asyncio.get_running_loop().call_later(STOP_GRACE, confirm)

        userspace.on_failure = on_failure
    try:
        await run_service(
            "dataplane",
            settings.endpoints.dataplane,
            settings,
            store,
            lambda ctx: setup(ctx, runtime),
            [SERVICE_NAME],
            stop_event=stop,
        )
    finally:
        for sock in runtime.sockets:
            sock.close()
        await backend.stop()
        if firewall is not None:
            firewall.stop()
    if runtime.failure:
        log.error("dataplane stopped: %s", runtime.failure)
        sys.exit(1)


def start_dial_out_firewall(settings: Settings) -> DialOutFirewall | None:
    """`site.inbound: dial-out-only` (a connector): the nftables table, before the datapath starts."""
    if settings.site.inbound != "dial-out-only":
        return None
    firewall = DialOutFirewall(settings.site.management_interfaces)
    try:
        firewall.start()
    except FirewallError as exc:
        log.error("dataplane not started: %s", exc)
        raise SystemExit(1) from None
    return firewall


def open_flow_telemetry(
    settings: Settings, node: str, backend: DataplaneBackend, reconciler: Reconciler, relay: IkeRelay
) -> FlowTelemetry:
    dp = settings.dataplane
    flow_log = FlowLog.for_size(
        dp.flow_log_path, dp.flow_log_retention_mb, dp.flow_log_retention_days * 86400, dp.flow_log_export
    )
    flow_meter = FlowMeter(
        flow_log,
        node,
        idle_timeout=dp.flow_log_idle_timeout_seconds,
        active_timeout=dp.flow_log_active_timeout_seconds,
        max_flows=dp.flow_log_max_flows,
    )
    return FlowTelemetry(backend, reconciler, relay, flow_meter, dp.flow_log_interval_seconds)


async def setup(ctx: ServiceContext, runtime: DataplaneNode) -> None:
    settings, backend, relay = runtime.settings, runtime.backend, runtime.relay
    dp = settings.dataplane
    sealer = open_sealer(settings.kek)
    membership = NodeMembership(
        runtime.store,
        runtime.node,
        dp.lease_seconds,
        {
            "grpc": settings.endpoints.dataplane,
            "backend": runtime.choice.name,
            "capacity": {"workers": default_workers(dp.workers) if runtime.choice.name == "userspace" else 0},
            "pid": os.getpid(),
            "ownership": dp.ownership,
            # a rendezvous member takes SAs only once its reconciler has read the store
            "accepting": dp.ownership == "single",
        },
        margin=dp.lease_margin_seconds,
    )
    ownership = SaOwnership(
        runtime.node, mode=dp.ownership, lease_id=lambda: membership.lease_id, lease_valid=membership.lease_valid
    )
    reconciler = Reconciler(
        runtime.store,
        sealer,
        backend,
        runtime.node,
        ownership=ownership,
        persistence=runtime.persistence,
        lease=lambda: membership.lease_id,
    )
    membership.on_new_lease.append(reconciler.rewrite_acks)
    steering: TunnelSteering | None = None
    sync: OwnershipSync | None = None
    if dp.ownership == "rendezvous":
        if dp.steering_interface:
            from esplanade.dataplane.userspace.netconfig import LinkConfigurator  # pyroute2: only when steering

            links = LinkConfigurator()
            ctx.on_stop.append(_closer(links))
            steering = TunnelSteering(SteeringSettings(dp.steering_interface, dict(dp.steering_inner)), links._ipr)
            steering.sweep()
        metrics = OwnershipMetrics(runtime.node)
        sync = OwnershipSync(
            runtime.store,
            ownership,
            membership,
            reconciler,
            steering=steering,
            on_moved=metrics.moved,
            on_failover=metrics.failed_over,
        )
        metrics.observe(sync)
    access = AccessView(runtime.store)
    decisions = DecisionEvents(f"dataplane/{runtime.node}")
    enforcer = PolicyEnforcer(backend, access, decisions)
    runtime.decisions, runtime.enforcer = decisions, enforcer
    reconciler.on_installed.append(enforcer.on_installed)
    reconciler.on_removed.append(enforcer.on_removed)
    relay.ike_port, relay.natt_port = dp.ike_port, dp.udp_port

    address = bind_address(settings)
    port500 = IkeSocket(address, dp.ike_port, relay.deliver)
    runtime.sockets.append(port500)
    relay.set_sender(dp.ike_port, port500.send)
    userspace = userspace_backend(runtime)
    if userspace is not None:
        userspace.set_ike_handler(relay.deliver)
        relay.set_sender(dp.udp_port, userspace.send_ike)
    else:  # the kernel decapsulates ESP-in-UDP on this socket and hands IKE up
        port4500 = IkeSocket(address, dp.udp_port, relay.deliver, esp_in_udp=True)
        runtime.sockets.append(port4500)
        relay.set_sender(dp.udp_port, port4500.send)

    local_relay = await start_local_relay(
        relay,
        socket_path(dp.ike_relay_socket, settings.store.backend, settings.store.path, runtime.node),
    )
    if local_relay is not None:
        ctx.on_stop.append(local_relay.close)
        reconciler.on_acknowledged.append(local_relay.announce_installed)

    def details() -> dict[str, str]:
        out = {
            "lease_renewals": str(membership.renewals),
            "ledger_writes": str(runtime.persistence.writes),
            "incarnation": runtime.persistence.incarnation,
            "policy_filters": str(len(enforcer.applied)),
            "policy_filter_updates": str(enforcer.filter_updates),
            "policy_revision": str(access.table.revision),
        }
        if local_relay is not None:
            out.update(local_relay.status())
        for sock in runtime.sockets:
            for name, count in sock.counters.items():
                out[f"udp{sock.port}_{name}"] = str(count)
        if sync is not None:
            counters = sync.counters
            out.update(
                ownership=dp.ownership,
                lease_valid=str(membership.lease_valid()).lower(),
                owned_sas=str(sync.owned_count()),
                members=",".join(sorted(sync.accepting_members())),
                ownership_claims=str(counters.claims),
                ownership_releases=str(counters.releases),
                ownership_failovers=str(counters.failovers),
                ownership_suspensions=str(counters.suspensions),
                ownership_claim_conflicts=str(counters.claim_conflicts),
            )
        if steering is not None:
            out.update(steering.status())
        if runtime.firewall is not None:
            out["dial_out_table_reinstalls"] = str(runtime.firewall.reinstalls)
        return out

    flows = open_flow_telemetry(settings, runtime.node, backend, reconciler, relay)
    decisions.subscribe(flows.on_decision)  # the identity filters' drops go into the flow log
    servicer = DataplaneServicer(
        ServicerParts(
            node=runtime.node,
            store=runtime.store,
            sealer=sealer,
            backend=backend,
            reconciler=reconciler,
            relay=relay,
            events=runtime.events,
            backend_reason=runtime.choice.reason,
            details=details,
            flows=flows,
        )
    )
    dataplane_pb2_grpc.add_DataplaneServicer_to_server(servicer, ctx.server.server)

    async def pump_events() -> None:
        async for event in backend.events():
            publish_event(runtime.events, event, runtime.node)

    async def membership_then_reconcile() -> None:
        registered = asyncio.create_task(membership.run())
        await membership.registered.wait()
        # The policy view first: an SA installed from the store gets its filter before its ack.
        await access.ready.wait()
        tasks = [asyncio.create_task(reconciler.run())]
        try:
            if sync is not None:
                tasks.append(asyncio.create_task(sync.run()))
                await reconciler.ready.wait()
                await sync.ready.wait()
                membership.document["accepting"] = True
                await membership.update()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            registered.cancel()

    async def leave() -> None:
        if sync is not None:
            await sync.leave(membership.leave)
        else:
            await membership.leave()

    ctx.readiness.append(reconciler.ready.is_set)
    ctx.readiness.append(lambda: not getattr(backend, "failed", ""))
    ctx.spawn(pump_events(), "dataplane-events")
    ctx.spawn(flows.run(), "dataplane-flows")
    ctx.on_stop.append(flows.close)
    ctx.spawn(access.run(), "policy-access-view")
    ctx.spawn(enforcer.run(), "policy-enforcer")
    ctx.spawn(decisions.run(), "decision-events")
    ctx.spawn(membership_then_reconcile(), "dataplane-reconciler")
    ctx.spawn(IkeOwnerRoutes(runtime.store, relay).run(), "dataplane-ike-owner-routes")
    if runtime.firewall is not None:
        ctx.spawn(runtime.firewall.keep(), "dial-out-firewall")
    ctx.on_stop.append(leave)


def _closer(links: LinkConfigurator) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        links.close()

    return close
