"""What every gRPC service process does around its servicers.

It opens the store, serves gRPC (with health and reflection) and Prometheus /metrics, keeps
the health status in step with the store (NOT_SERVING while the store is unreachable,
SERVING again when it answers, without a restart), and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server

from esplanade.config.settings import Settings
from esplanade.rpc.server import ServiceServer
from esplanade.runtime import garbage_collection
from esplanade.store.base import Store, StoreError
from esplanade.telemetry.logs import configure_logging, configure_otlp_logs
from esplanade.telemetry.metrics import configure_metrics
from esplanade.telemetry.tracing import configure_tracing

log = logging.getLogger(__name__)

STORE_PROBE_INTERVAL = 1.0


@dataclass
class ServiceContext:
    """Handed to a service's set-up function: what it may use and register."""

    name: str
    settings: Settings
    store: Store
    server: ServiceServer
    registry: CollectorRegistry
    # Extra readiness conditions of the service (e.g. "the UDP socket is bound").
    readiness: list[Callable[[], bool]] = field(default_factory=list)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s failed", name)

        self.background.append(asyncio.create_task(guarded(), name=name))


SetupFunction = Callable[[ServiceContext], Awaitable[None]]


def setup_telemetry(name: str, settings: Settings) -> CollectorRegistry:
    configure_logging(name, settings.telemetry.log_format, settings.telemetry.log_level)
    configure_otlp_logs(name, settings.telemetry.otlp_endpoint, settings.telemetry.otlp_insecure)
    configure_tracing(name, settings.telemetry.otlp_endpoint, settings.telemetry.otlp_insecure)
    _, registry = configure_metrics(name, settings.telemetry.otlp_endpoint, settings.telemetry.otlp_insecure)
    return registry


async def run_service(
    name: str,
    address: str,
    settings: Settings,
    store: Store,
    setup: SetupFunction,
    service_names: list[str],
    stop_event: asyncio.Event | None = None,
) -> None:
    registry = setup_telemetry(name, settings)
    server = ServiceServer(service_names, settings.grpc)
    port = server.listen(address)
    ctx = ServiceContext(name=name, settings=settings, store=store, server=server, registry=registry)
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    offset = settings.endpoints.metrics_port_offset
    metrics_port = port + offset if offset and not address.startswith("unix:") else 0
    metrics_server = None
    if metrics_port:
        host = address.rpartition(":")[0].strip("[]") or "0.0.0.0"
        metrics_server, _ = start_http_server(metrics_port, addr=host, registry=registry)
    await _connect_with_retry(store, stop)
    await setup(ctx)
    await server.start()
    if garbage_collection.tuned():  # a service process: what the set-up built lives as long as it
        garbage_collection.freeze()
    ctx.spawn(_follow_store_health(ctx, stop), "store-health")
    log.info("%s serving gRPC on port %d", name, port, extra={"grpc_port": port, "metrics_port": metrics_port})
    await stop.wait()
    log.info("%s stopping", name)
    for task in ctx.background:
        task.cancel()
    await asyncio.gather(*ctx.background, return_exceptions=True)
    for callback in reversed(ctx.on_stop):
        with contextlib.suppress(Exception):
            await callback()
    await server.stop()
    await store.close()
    if metrics_server is not None:
        metrics_server.shutdown()


async def _connect_with_retry(store: Store, stop: asyncio.Event) -> None:
    """A service starts even if the store is down; it serves NOT_SERVING until it is up."""
    delay = 0.1
    while not stop.is_set():
        try:
            await store.connect()
            return
        except StoreError as exc:
            log.warning("store not reachable yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _follow_store_health(ctx: ServiceContext, stop: asyncio.Event) -> None:
    serving: bool | None = None
    while not stop.is_set():
        try:  # the store measures its own latency (esplanade.store.MeasuredStore)
            await asyncio.wait_for(ctx.store.ping(), timeout=ctx.settings.store.timeout_seconds)
            healthy = all(check() for check in ctx.readiness)
        except (StoreError, TimeoutError) as exc:
            healthy = False
            if serving is not False:
                log.warning("store unreachable: %s", exc or type(exc).__name__)
        if healthy != serving:
            await ctx.server.set_serving(healthy)
            log.info("%s is %s", ctx.name, "SERVING" if healthy else "NOT_SERVING")
            serving = healthy
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=STORE_PROBE_INTERVAL)
