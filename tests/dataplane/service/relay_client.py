"""A small RelayIke (or RelayIkeBatch) client: what keyexchange does with the dataplane's IKE relay, for tests.

async with RelayClient(target, instance="kx-1") as client:
    datagram = await client.receive(timeout=5)          # an IKE message from UDP 500/4500
    await client.send(local_addr, 500, remote, port, payload)   # leaves from UDP 500
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import grpc

from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc


class RelayClient:
    def __init__(self, target: str, instance: str = "", *, batched: bool = False) -> None:
        self.target = target
        self.instance = instance
        self.batched = batched
        self.messages = 0  # stream messages received
        self._outgoing: asyncio.Queue[dataplane_pb2.IkeDatagram | None] = asyncio.Queue()
        self._incoming: asyncio.Queue[dataplane_pb2.IkeDatagram] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._reader: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def __aenter__(self) -> RelayClient:
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = dataplane_pb2_grpc.DataplaneStub(self._channel)
        metadata = (("esplanade-instance", self.instance),) if self.instance else ()
        if self.batched:
            batches = stub.RelayIkeBatch(self._batches(), metadata=metadata)
            self._reader = asyncio.create_task(self._read_batches(batches))
        else:
            call = stub.RelayIke(self._requests(), metadata=metadata)
            self._reader = asyncio.create_task(self._read(call))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._outgoing.put(None)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    async def _requests(self):  # type: ignore[no-untyped-def]
        self.connected.set()
        while True:
            item = await self._outgoing.get()
            if item is None:
                return
            yield item

    async def _batches(self):  # type: ignore[no-untyped-def]
        async for item in self._requests():
            batch = [item]
            while not self._outgoing.empty():
                more = self._outgoing.get_nowait()
                if more is None:
                    yield dataplane_pb2.IkeDatagramBatch(datagrams=batch)
                    return
                batch.append(more)
            yield dataplane_pb2.IkeDatagramBatch(datagrams=batch)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        async for datagram in call:
            self.messages += 1
            await self._incoming.put(datagram)

    async def _read_batches(self, call: grpc.aio.StreamStreamCall) -> None:
        async for batch in call:
            self.messages += 1
            for datagram in batch.datagrams:
                await self._incoming.put(datagram)

    async def send(self, local_addr: str, local_port: int, remote_addr: str, remote_port: int, payload: bytes) -> None:
        self.send_nowait(local_addr, local_port, remote_addr, remote_port, payload)

    def send_nowait(self, local_addr: str, local_port: int, remote_addr: str, remote_port: int, payload: bytes) -> None:
        self._outgoing.put_nowait(
            dataplane_pb2.IkeDatagram(
                local_addr=local_addr,
                local_port=local_port,
                remote_addr=remote_addr,
                remote_port=remote_port,
                payload=payload,
            )
        )

    async def receive(self, timeout: float = 5.0) -> dataplane_pb2.IkeDatagram:
        return await asyncio.wait_for(self._incoming.get(), timeout)

    def pending(self) -> int:
        return self._incoming.qsize()
