"""/readyz's checks: the store, and the keyexchange, dataplane and policy services' gRPC health."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esplanade.config.settings import Settings
from esplanade.rpc.server import open_channel
from esplanade.store.base import Store, StoreError

DEPENDENCIES = ("keyexchange", "dataplane", "policy")


class Readiness:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.channels = {name: open_channel(getattr(settings.endpoints, name), settings.grpc) for name in DEPENDENCIES}

    async def _service(self, name: str) -> str:
        stub = health_pb2_grpc.HealthStub(self.channels[name])
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            return f"unreachable: {exc.code().name}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def _store(self) -> str:
        try:
            await asyncio.wait_for(self.store.ping(), timeout=self.settings.store.timeout_seconds)
        except (StoreError, TimeoutError) as exc:
            return f"unreachable: {exc or type(exc).__name__}"
        return "SERVING"

    async def check(self) -> dict[str, str]:
        names = ["store", *DEPENDENCIES]
        results = await asyncio.gather(self._store(), *(self._service(n) for n in DEPENDENCIES))
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
