"""`esplanade health`: ask every service's gRPC health endpoint, and the API's /readyz."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from esplanade.config.settings import Settings
from esplanade.rpc.server import open_channel

GRPC_SERVICES = ("keyexchange", "dataplane", "policy")


async def grpc_status(target: str, settings: Settings) -> str:
    async with open_channel(target, settings.grpc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            return f"UNREACHABLE ({exc.code().name})"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def api_status(address: str) -> str:
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            reply = await client.get(f"http://{address}/readyz")
    except httpx.HTTPError as exc:
        return f"UNREACHABLE ({type(exc).__name__})"
    return "SERVING" if reply.status_code == 200 else f"NOT_SERVING (/readyz {reply.status_code})"


async def collect(settings: Settings) -> dict[str, str]:
    endpoints = settings.endpoints
    names = [*GRPC_SERVICES, "api"]
    results = await asyncio.gather(
        *(grpc_status(getattr(endpoints, name), settings) for name in GRPC_SERVICES), api_status(endpoints.api)
    )
    return dict(zip(names, results, strict=True))


async def health_report(settings: Settings, wait: float = 0.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        status = await collect(settings)
        ok = all(s == "SERVING" for s in status.values())
        if ok or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.25)
    table = Table(title="Esplanade services")
    table.add_column("service")
    table.add_column("address")
    table.add_column("status")
    for name, state in status.items():
        colour = "green" if state == "SERVING" else "red"
        table.add_row(name, getattr(settings.endpoints, name), f"[{colour}]{state}[/{colour}]")
    Console().print(table)
    return ok
