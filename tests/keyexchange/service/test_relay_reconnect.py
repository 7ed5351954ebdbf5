"""The IKE relay client delivers every datagram after it had to retry its connection.

Regression: the request iterator of a failed RelayIke call kept waiting on a queue shared
with the next call and swallowed its datagrams, so an IKE_SA_INIT sent after a few failed
connection attempts never left the dataplane.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from esplanade.config.settings import GrpcSettings
from esplanade.keyexchange.ike_transports import DataplaneRelay
from esplanade.keyexchange.ikev2.events import Datagram
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RecordingDataplane(dataplane_pb2_grpc.DataplaneServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.attached = asyncio.Event()

    async def RelayIke(self, request_iterator: Any, context: Any) -> AsyncIterator[dataplane_pb2.IkeDatagram]:
        self.attached.set()
        async for datagram in request_iterator:
            self.received.append(bytes(datagram.payload))
        return
        yield  # an (empty) response stream


class RecordingBatchDataplane(RecordingDataplane):
    async def RelayIkeBatch(self, request_iterator: Any, context: Any) -> AsyncIterator[dataplane_pb2.IkeDatagramBatch]:
        self.attached.set()
        async for batch in request_iterator:
            self.received.extend(bytes(datagram.payload) for datagram in batch.datagrams)
        return
        yield  # an (empty) response stream


@pytest.mark.parametrize("servicer", [RecordingDataplane, RecordingBatchDataplane], ids=["RelayIke", "RelayIkeBatch"])
async def test_datagrams_sent_after_failed_attempts_all_arrive(servicer: type[RecordingDataplane]) -> None:
    port = free_port()
    relay = DataplaneRelay([f"127.0.0.1:{port}"], GrpcSettings(), deliver=lambda *_: None, backoff_max=0.05)
    await relay.start()
    try:
        await asyncio.sleep(0.5)  # no server yet: several attempts fail with UNAVAILABLE
        assert relay.counters.get("reconnects", 0) >= 2
        server = grpc.aio.server()
        dataplane = servicer()
        dataplane_pb2_grpc.add_DataplaneServicer_to_server(dataplane, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            await asyncio.wait_for(dataplane.attached.wait(), timeout=10)
            payloads = [bytes([i]) * 40 for i in range(20)]
            for payload in payloads:
                relay.send(Datagram(data=payload, local=("192.0.2.1", 500), remote=("192.0.2.2", 500)))
            async with asyncio.timeout(10):
                while len(dataplane.received) < len(payloads):
                    await asyncio.sleep(0.01)
            assert dataplane.received == payloads
        finally:
            await server.stop(0)
    finally:
        relay.close()
