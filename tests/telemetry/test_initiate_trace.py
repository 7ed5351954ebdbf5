"""One trace id from the REST call through keyexchange to the dataplane, for "initiate".

In one process, with in-memory span export: the real FastAPI app (driven over ASGI), a real
gRPC keyexchange server (`KeyExchangeServicer` over a `KeyExchangeNode` on an embedded store:
trace context crosses in gRPC metadata), an IKE peer wired to it in memory, and the real
dataplane `Reconciler` on the same store (trace context crosses in the Child SA record).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from esplanade.api.app import create_app
from esplanade.api.auth import Scope, new_token, token_document
from esplanade.config.settings import Settings
from esplanade.dataplane.ownership import SaOwnership
from esplanade.dataplane.reconciler import Reconciler
from esplanade.dataplane.sa_persistence import MemorySaPersistence
from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.engine_driver import IkeEngine
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import Datagram, Event, InstallInboundSa
from esplanade.keyexchange.keyexchange_servicer import KeyExchangeServicer
from esplanade.keyexchange.service import KeyExchangeNode
from esplanade.rpc.server import ServiceServer
from esplanade.store import schema
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer
from esplanade.v1 import keyexchange_pb2_grpc
from tests.conditions import async_wait_until
from tests.dataplane.backend_doubles import FakeBackend
from tests.keyexchange.peers import A_IP, B_IP, PSK, conn


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Export into memory from the process-wide provider (set once per process by OpenTelemetry)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Wire:
    """IKE datagrams between two engines, in memory."""

    def __init__(self) -> None:
        self.peer: IkeEngine | None = None

    def send(self, d: Datagram) -> None:
        peer = self.peer
        assert peer is not None
        asyncio.get_running_loop().call_soon(peer.feed, d.wire_bytes(), d.remote, d.local)


def connection_body() -> dict[str, object]:
    a = conn("a")
    return {
        "name": "ab",
        "local_addrs": a["local_addrs"],
        "remote_addrs": a["remote_addrs"],
        "local": a["local"],
        "remote": a["remote"],
        "psk": PSK,
        "proposals": a["proposals"],
        "children": {
            "net": {"local_ts": ["10.1.0.0/16"], "remote_ts": ["10.2.0.0/16"], "esp_proposals": ["aes256gcm16"]}
        },
    }


async def test_initiate_is_one_trace_from_api_to_dataplane(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    settings = Settings(
        store={"backend": "embedded", "path": str(tmp_path / "store.db")},
        endpoints={
            "keyexchange": f"127.0.0.1:{free_port()}",
            "dataplane": f"127.0.0.1:{free_port()}",
            "policy": f"127.0.0.1:{free_port()}",
            "metrics_port_offset": 0,
        },
        api={"audit_log_path": str(tmp_path / "audit.db")},
        keyexchange={"instance": "kx-trace"},
    )
    store = EmbeddedStore(tmp_path / "store.db")
    await store.connect()
    sealer = Sealer(Keyring.generate())
    token_id, token = new_token()
    await store.put(schema.api_token(token_id), json.dumps(token_document("t", Scope.ADMIN, token)).encode())

    # keyexchange: the node on the store, its gRPC service, its IKE datagrams on a wire to the peer
    node = KeyExchangeNode(settings, store, sealer)
    server = ServiceServer(["esplanade.v1.KeyExchange"], settings.grpc)
    server.listen(settings.endpoints.keyexchange)
    keyexchange_pb2_grpc.add_KeyExchangeServicer_to_server(KeyExchangeServicer(node), server.server)
    await server.start()
    await node.register()
    await node.spis.fill()
    to_peer, to_us = Wire(), Wire()
    node.engine.start(to_peer)
    acks = asyncio.create_task(node.handoff.follow_acks())

    # the peer: an IKE engine whose (pretend) dataplane acknowledges every inbound SA at once
    peer = IkeEngine(IkeDispatcher([ConnectionConfig.from_dict("ab", conn("b"))], rng=random.Random(2), now=0.0))

    def ack(ev: Event) -> None:
        if isinstance(ev, InstallInboundSa):
            asyncio.get_running_loop().call_soon(peer.inbound_sa_installed, ev.ike_sa, ev.child_id)

    peer.listeners.append(ack)
    peer.start(to_us)
    to_peer.peer, to_us.peer = peer, node.engine

    # the dataplane's reconciler on the same store
    backend = FakeBackend()
    reconciler = Reconciler(
        store, sealer, backend, "dp1", ownership=SaOwnership("dp1"), persistence=MemorySaPersistence()
    )
    reconciling = asyncio.create_task(reconciler.run())

    app = create_app(settings, store, sealer)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=headers) as api,
        ):
            created = await api.post("/api/v1/connections", json=connection_body())
            assert created.status_code == 201, created.text
            await node.catalog.load_all()
            spans.clear()
            initiated = await api.post("/api/v1/connections/ab/initiate", json={})
            assert initiated.status_code == 202, initiated.text

            async def installed() -> bool:
                return any(s.name == "dataplane.install_child_sa" for s in spans.get_finished_spans())

            await async_wait_until(installed, timeout=20, what="the dataplane installed the Child SA")
    finally:
        reconciling.cancel()
        acks.cancel()
        node.engine.close()
        peer.close()
        await server.stop(0)
        await store.close()

    finished = spans.get_finished_spans()
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)
    (rest,) = by_name["POST /api/v1/connections/ab/initiate"]
    assert rest.context is not None
    trace_id = rest.context.trace_id
    grpc_server = [s for s in finished if s.name == "/esplanade.v1.KeyExchange/Initiate" and s.kind.name == "SERVER"]
    (negotiation,) = by_name["ike.negotiation"]
    exchanges = [s for s in finished if s.name.startswith("ike.exchange")]
    (install,) = by_name["dataplane.install_child_sa"]
    chain = [rest, *grpc_server, negotiation, *exchanges, install]
    assert grpc_server and len(exchanges) >= 2
    assert {s.context.trace_id for s in chain if s.context is not None} == {trace_id}, [s.name for s in chain]
    # the store hand-off is also a span link to the producer (the negotiation)
    assert negotiation.context is not None
    assert [link.context.span_id for link in install.links] == [negotiation.context.span_id]
    assert negotiation.attributes is not None and negotiation.attributes["ike.outcome"] == "established"
    assert {str(s.attributes["ike.exchange"]) for s in exchanges if s.attributes} >= {"IKE_SA_INIT", "IKE_AUTH"}
    assert backend.children, "the fake backend holds the installed Child SA"
    assert B_IP and A_IP
