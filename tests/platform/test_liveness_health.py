"""The gRPC health name Kubernetes liveness probes ask for stays SERVING while readiness follows the store."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esplanade.config.settings import GrpcSettings
from esplanade.rpc.server import LIVENESS_SERVICE, SERVING, ServiceServer


async def test_liveness_is_serving_while_readiness_is_not() -> None:
    server = ServiceServer(["esplanade.v1.Policy"], GrpcSettings())
    port = server.listen("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            live = await stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5)
            ready = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert live.status == SERVING
            assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await server.set_serving(True)
            ready = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert ready.status == SERVING
    finally:
        await server.stop(grace=0)
