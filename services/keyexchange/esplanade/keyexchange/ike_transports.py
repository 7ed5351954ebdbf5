"""How IKE datagrams reach the engine and leave it.

- `DataplaneRelay` (transport `relay`, the default): the dataplane owns UDP 500 and 4500 and
  relays IKE over the `Dataplane.RelayIkeBatch` bidi stream (each message carries every
  datagram queued at that moment; `RelayIke`, one per message, with a dataplane that answers
  UNIMPLEMENTED); payloads travel WITHOUT the non-ESP marker (the dataplane strips and adds
  it on 4500). One stream per dataplane node, reconnected with exponential backoff; a reply
  leaves through the node the peer last spoke through (else the first connected one).
  Over the dataplane's local relay socket, the dataplane also says which inbound SAs it has
  just installed (`on_installed`, before its store ack; `esplanade.rpc.local_relay`).
- `IkeSockets` (transport `socket`): keyexchange binds UDP 500 and 4500 itself; ESP arriving
  on its 4500 socket is counted and dropped (no dataplane behind it).

Both hand received datagrams to `deliver(data, local, remote)` in the engine's wire form:
on port 4500 with the marker, as a socket would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable

import grpc

from esplanade.config.settings import GrpcSettings
from esplanade.keyexchange.ikev2.constants import NATT_PORT
from esplanade.keyexchange.ikev2.events import Address, Datagram
from esplanade.rpc.local_relay import INSTANCE_MAX, RECORD_MAX, SOCKET_BUFFER, decode_record, encode_records
from esplanade.rpc.server import channel_credentials
from esplanade.store.backoff import Backoff
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc

log = logging.getLogger(__name__)

Deliver = Callable[[bytes, Address, Address], None]
NON_ESP_MARKER = b"\x00\x00\x00\x00"
RELAY_QUEUE = 8192  # datagrams waiting for a stream; beyond that they are dropped (IKE retransmits)
BATCH_MAX = 64  # datagrams per RelayIkeBatch message
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # a restarted dataplane must get its relay and event streams back within seconds; gRPC's
    # default reconnect backoff grows to 120 s, during which every call fails at once
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def stream_channel(target: str, settings: GrpcSettings) -> grpc.aio.Channel:
    """A channel for long-lived streams: `open_channel`'s credentials and keepalives, without its
    per-call interceptors (a deadline means nothing to a stream that lives as long as the
    process, and the interceptor wrapper costs on every message of the IKE relay)."""
    if settings.tls.enabled:
        return grpc.aio.secure_channel(target, channel_credentials(settings.tls), CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)


LOCAL_PROBE_TIMEOUT = 2.0  # GetStatus, connect and hello of the local relay socket


class _LocalEnded(Exception):
    """The local relay socket closed: reconnect (and probe again) like a lost stream."""


class _RelayStream:
    """One dataplane node's relay stream (RelayIkeBatch, or RelayIke with an older dataplane)."""

    def __init__(self, target: str, relay: DataplaneRelay) -> None:
        self.target = target
        self.relay = relay
        self.queue: asyncio.Queue[dataplane_pb2.IkeDatagram | None] = asyncio.Queue(RELAY_QUEUE)
        self.connected = False
        self.batched = True  # until the dataplane says it has no RelayIkeBatch

    @staticmethod
    async def _outgoing(
        queue: asyncio.Queue[dataplane_pb2.IkeDatagram | None],
    ) -> AsyncIterator[dataplane_pb2.IkeDatagram]:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    @staticmethod
    async def _outgoing_batches(
        queue: asyncio.Queue[dataplane_pb2.IkeDatagram | None],
    ) -> AsyncIterator[dataplane_pb2.IkeDatagramBatch]:
        while True:
            item = await queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < BATCH_MAX and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    yield dataplane_pb2.IkeDatagramBatch(datagrams=batch)
                    return
                batch.append(item)
            yield dataplane_pb2.IkeDatagramBatch(datagrams=batch)

    async def run(self) -> None:
        backoff = Backoff(base=0.05, cap=self.relay.backoff_max)
        carried: list[dataplane_pb2.IkeDatagram] = []  # queued when the dataplane said UNIMPLEMENTED
        while True:
            channel = stream_channel(self.target, self.relay.grpc)
            # Each attempt gets its own queue: the request iterator of a failed call may still be
            # waiting on its queue, and a shared one would let it swallow the next call's datagrams.
            queue: asyncio.Queue[dataplane_pb2.IkeDatagram | None] = asyncio.Queue(RELAY_QUEUE)
            for dg in carried:
                queue.put_nowait(dg)
            carried = []
            self.queue = queue
            retry_now = False
            try:
                stub = dataplane_pb2_grpc.DataplaneStub(channel)
                local = await self._connect_local(stub)
                if local is not None:
                    await self._run_local(local, queue, backoff)
                    raise _LocalEnded
                # a stable stream key across reconnects: the dataplane routes IKE SAs by it
                metadata = (("esplanade-instance", self.relay.instance),)
                self.connected = True
                first = True
                if self.batched:
                    batches = stub.RelayIkeBatch(self._outgoing_batches(queue), metadata=metadata)
                    async for batch in batches:
                        if first:
                            log.info("IKE relay to dataplane %s connected", self.target)
                            backoff.reset()
                            first = False
                        for dg in batch.datagrams:
                            self.relay.received(self, dg)
                        if batch.installed_child_sas:
                            self.relay.installed(batch.installed_child_sas)
                else:
                    call = stub.RelayIke(self._outgoing(queue), metadata=metadata)
                    async for dg in call:
                        if first:
                            log.info("IKE relay to dataplane %s connected (one datagram per message)", self.target)
                            backoff.reset()
                            first = False
                        self.relay.received(self, dg)
            except _LocalEnded:
                if self.connected:
                    log.warning("IKE relay to dataplane %s lost (local socket)", self.target)
            except grpc.aio.AioRpcError as exc:
                if self.batched and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self.batched, retry_now = False, True
                elif self.connected:
                    log.warning("IKE relay to dataplane %s lost: %s", self.target, exc.code().name)
            finally:
                self.connected = False
                # datagrams queued for a dead stream are stale by the time it is back: IKE retransmits;
                # the None ends that call's request iterator. Falling back to RelayIke at once,
                # they go with the next call.
                while not queue.empty():
                    item = queue.get_nowait()
                    if retry_now and item is not None:
                        carried.append(item)
                queue.put_nowait(None)
                with contextlib.suppress(Exception):
                    await channel.close()
            if retry_now:
                continue
            self.relay._count("reconnects")
            await asyncio.sleep(backoff.next_delay())

    async def _connect_local(self, stub: dataplane_pb2_grpc.DataplaneStub) -> socket.socket | None:
        """The dataplane's local relay socket (`esplanade.rpc.local_relay`), connected and
        checked against the token GetStatus names; None: use the gRPC stream."""
        if not self.relay.local_socket:
            return None
        try:
            status = await stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=LOCAL_PROBE_TIMEOUT)
        except grpc.aio.AioRpcError:
            return None
        path, token = status.details.get("ike_relay_socket", ""), status.details.get("ike_relay_token", "")
        if not path or not token:
            return None
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            await asyncio.wait_for(loop.sock_connect(sock, path), LOCAL_PROBE_TIMEOUT)
            await loop.sock_sendall(sock, self.relay.instance.encode()[:INSTANCE_MAX])
            answer = await asyncio.wait_for(loop.sock_recv(sock, 256), LOCAL_PROBE_TIMEOUT)
        except (OSError, TimeoutError):
            sock.close()
            return None
        if answer != token.encode():
            sock.close()  # another dataplane's socket (or a stale file): stay on gRPC
            self.relay._count("local_token_mismatch")
            return None
        return sock

    async def _run_local(
        self, sock: socket.socket, queue: asyncio.Queue[dataplane_pb2.IkeDatagram | None], backoff: Backoff
    ) -> None:
        """Relay over the local socket until either side ends it."""
        loop = asyncio.get_running_loop()
        self.connected = True
        backoff.reset()
        log.info("IKE relay to dataplane %s connected (local socket)", self.target)

        async def incoming() -> None:
            while True:
                record = await loop.sock_recv(sock, RECORD_MAX)
                if not record:
                    return
                batch = decode_record(record)
                if batch is None:
                    self.relay._count("local_bad_record")
                    continue
                for dg in batch.datagrams:
                    self.relay.received(self, dg)
                if batch.installed_child_sas:
                    self.relay.installed(batch.installed_child_sas)

        async def outgoing() -> None:
            async for batch in self._outgoing_batches(queue):
                for record in encode_records(batch.datagrams):
                    await loop.sock_sendall(sock, record)

        tasks = [asyncio.create_task(incoming()), asyncio.create_task(outgoing())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
            sock.close()

    def send(self, dg: dataplane_pb2.IkeDatagram) -> bool:
        try:
            self.queue.put_nowait(dg)
        except asyncio.QueueFull:
            return False
        return True


class DataplaneRelay:
    def __init__(
        self,
        targets: list[str],
        grpc_settings: GrpcSettings,
        deliver: Deliver,
        backoff_max: float = 5.0,
        instance: str = "keyexchange",
        local_socket: bool = True,
    ) -> None:
        self.grpc = grpc_settings
        self.instance = instance
        self.local_socket = local_socket  # use a dataplane's local relay socket when it has one
        self.deliver = deliver
        self.backoff_max = backoff_max
        self.streams = [_RelayStream(t, self) for t in targets]
        self._route: dict[str, _RelayStream] = {}  # peer address -> the stream it came through
        self._tasks: list[asyncio.Task[None]] = []
        self.counters: dict[str, int] = {}
        # install notices of the dataplane (child id): the in-band form of its store ack
        self.on_installed: Callable[[str], None] = lambda child_id: None

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(s.run(), name=f"ike-relay:{s.target}") for s in self.streams]

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    @property
    def connected(self) -> bool:
        return any(s.connected for s in self.streams)

    def received(self, stream: _RelayStream, dg: dataplane_pb2.IkeDatagram) -> None:
        self._count("received")
        local = (dg.local_addr, dg.local_port)
        remote = (dg.remote_addr, dg.remote_port)
        self._route[dg.remote_addr] = stream
        data = NON_ESP_MARKER + dg.payload if dg.local_port == NATT_PORT else dg.payload
        self.deliver(data, local, remote)

    def installed(self, child_ids: Iterable[str]) -> None:
        for child_id in child_ids:
            self._count("installed_notices")
            self.on_installed(child_id)

    def send(self, d: Datagram) -> None:
        stream = self._route.get(d.remote[0])
        if stream is None or not stream.connected:
            stream = next((s for s in self.streams if s.connected), None)
        if stream is None:
            self._count("unsendable")
            return
        dg = dataplane_pb2.IkeDatagram(
            local_addr=d.local[0],
            local_port=d.local[1],
            remote_addr=d.remote[0],
            remote_port=d.remote[1],
            payload=d.data,
        )
        if not stream.send(dg):
            self._count("queue_full")
            return
        self._count("sent")


class _SocketEndpoint(asyncio.DatagramProtocol):
    def __init__(self, sockets: IkeSockets, local: Address) -> None:
        self.sockets = sockets
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        remote = (str(addr[0]), int(addr[1]))
        if self.local[1] == NATT_PORT and len(data) > 1 and data[:4] != NON_ESP_MARKER:
            self.sockets.counters["esp_dropped"] = self.sockets.counters.get("esp_dropped", 0) + 1
            return
        self.sockets.deliver(data, self.local, remote)

    def error_received(self, exc: Exception) -> None:
        self.sockets.counters["socket_errors"] = self.sockets.counters.get("socket_errors", 0) + 1


class IkeSockets:
    def __init__(self, addresses: list[str], deliver: Deliver, ike_port: int = 500, natt_port: int = NATT_PORT) -> None:
        self.addresses = addresses or ["0.0.0.0"]
        self.deliver = deliver
        self.ports = (ike_port, natt_port)
        self.counters: dict[str, int] = {}
        self._endpoints: dict[Address, _SocketEndpoint] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for address in self.addresses:
            for port in self.ports:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                sock.setblocking(False)
                endpoint = _SocketEndpoint(self, (address, port))
                await loop.create_datagram_endpoint(lambda ep=endpoint: ep, sock=sock)  # type: ignore[misc]
                self._endpoints[(address, port)] = endpoint

    @property
    def connected(self) -> bool:
        return bool(self._endpoints)

    def close(self) -> None:
        for ep in self._endpoints.values():
            if ep.transport is not None:
                ep.transport.close()
        self._endpoints.clear()

    def send(self, d: Datagram) -> None:
        ep = self._endpoints.get(d.local) or self._endpoints.get(("0.0.0.0", d.local[1]))
        if ep is None or ep.transport is None:
            self.counters["unsendable"] = self.counters.get("unsendable", 0) + 1
            return
        ep.transport.sendto(d.wire_bytes(), d.remote)
