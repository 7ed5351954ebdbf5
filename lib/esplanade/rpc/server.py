"""A grpc.aio server with what every Esplanade service needs: health checking, reflection,
tracing, optional mTLS; and channels to the other services with deadlines and tracing."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esplanade.config.settings import GrpcSettings, TlsSettings
from esplanade.rpc.interceptors import ServerTracing, client_interceptors

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The health name a liveness probe asks for: SERVING while the server runs, whatever the store
# does. "" and the service names follow the store (readiness), so an etcd outage makes pods
# unready but never restarts them.
LIVENESS_SERVICE = "liveness"


def _read(path: Path | None) -> bytes:
    assert path is not None  # TlsSettings validates completeness
    return path.read_bytes()


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=_read(tls.ca_file),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


class ServiceServer:
    """One service's gRPC server. `health` answers for "" and for every registered service."""

    def __init__(self, service_names: Iterable[str], settings: GrpcSettings) -> None:
        self.settings = settings
        self.server = grpc.aio.server(interceptors=[ServerTracing()])
        self.service_names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(self.service_names, self.server)
        self.port = 0

    def listen(self, address: str) -> int:
        if self.settings.tls.enabled:
            self.port = self.server.add_secure_port(address, server_credentials(self.settings.tls))
        else:
            self.port = self.server.add_insecure_port(address)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.service_names[:-2]):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.health.set(LIVENESS_SERVICE, SERVING)
        await self.server.start()

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def open_channel(target: str, settings: GrpcSettings) -> grpc.aio.Channel:
    """A channel whose every call carries a deadline and the caller's trace context."""
    interceptors = client_interceptors(settings.deadline_seconds)
    options = [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        # reach a restarted service within seconds (gRPC's default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if settings.tls.enabled:
        return grpc.aio.secure_channel(target, channel_credentials(settings.tls), options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options, interceptors=interceptors)
