"""The IKE relay on a Unix socket: keyexchange's DataplaneRelay <-> the dataplane's IkeRelay.

Real sockets (a Unix SEQPACKET socket, a gRPC server for GetStatus), no netns: the UDP side of
the relay is replaced by recording senders.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from esplanade.config.settings import GrpcSettings
from esplanade.dataplane.ike_relay import IkeRelay
from esplanade.dataplane.ike_relay_local import LocalRelayListener, socket_path
from esplanade.keyexchange.ike_transports import DataplaneRelay
from esplanade.keyexchange.ikev2.events import Datagram
from esplanade.rpc.local_relay import encode_records
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc
from tests.conditions import async_wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(predicate: Callable[[], object], timeout: float) -> None:
    async def check() -> object:
        return predicate()

    await async_wait_until(check, timeout=timeout)


def ike_message(spi: int, body: bytes = b"") -> bytes:
    return spi.to_bytes(8, "big") + bytes(8) + b"\x21\x20\x22\x08" + bytes(8) + body


class StatusOnly(dataplane_pb2_grpc.DataplaneServicer):  # type: ignore[misc]
    """GetStatus naming the local socket (or whatever `details` says), and a RelayIkeBatch
    that records whether keyexchange fell back to it."""

    def __init__(self, details: Callable[[], dict[str, str]]) -> None:
        self.details = details
        self.grpc_streams = 0

    async def GetStatus(self, request: Any, context: Any) -> dataplane_pb2.GetStatusResponse:
        return dataplane_pb2.GetStatusResponse(details=self.details())

    async def RelayIkeBatch(self, request_iterator: Any, context: Any) -> AsyncIterator[dataplane_pb2.IkeDatagramBatch]:
        self.grpc_streams += 1
        async for _ in request_iterator:
            pass
        return
        yield


async def serve_status(details: Callable[[], dict[str, str]]) -> tuple[grpc.aio.Server, StatusOnly, int]:
    port = free_port()
    server = grpc.aio.server()
    servicer = StatusOnly(details)
    dataplane_pb2_grpc.add_DataplaneServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, servicer, port


@pytest.fixture
def short_dir() -> AsyncIterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ikr-relay-") as d:  # sun_path is short
        yield Path(d)


async def test_datagrams_go_both_ways_over_the_local_socket(short_dir: Path) -> None:
    relay = IkeRelay()
    sent: list[tuple[int, str, str, int, bytes]] = []

    def sender_for(port: int) -> Any:
        async def send(local: str, remote: str, remote_port: int, payload: bytes) -> bool:
            sent.append((port, local, remote, remote_port, payload))
            return True

        return send

    relay.set_sender(500, sender_for(500))
    relay.set_sender(4500, sender_for(4500))
    listener = LocalRelayListener(relay, short_dir / "dp.ike.sock")
    await listener.start()
    server, servicer, port = await serve_status(lambda: listener.status())  # the current listener
    delivered: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []
    kx = DataplaneRelay([f"127.0.0.1:{port}"], GrpcSettings(), deliver=lambda *a: delivered.append(a), instance="kx-a")
    await kx.start()
    try:
        await eventually(lambda: kx.connected and relay.connected == 1, timeout=10)
        assert relay.counters["local_streams"] == 1 and servicer.grpc_streams == 0
        assert relay.choose(ike_message(1)[:8]) is not None and relay.choose(ike_message(1)[:8]).key == "kx-a"  # type: ignore[union-attr]
        # network -> keyexchange: 500 as it is, 4500 with the non-ESP marker back in front
        big = ike_message(7, b"x" * 60_000)  # more than one record's worth with the others
        relay.deliver("198.18.0.1", 500, "198.18.0.2", 500, ike_message(7, b"init"))
        relay.deliver("198.18.0.1", 4500, "198.18.0.2", 4501, ike_message(7, b"auth"))
        relay.deliver("198.18.0.1", 4500, "198.18.0.2", 4501, big)
        await eventually(lambda: len(delivered) == 3, timeout=10)
        assert delivered[0] == (ike_message(7, b"init"), ("198.18.0.1", 500), ("198.18.0.2", 500))
        marker = b"\x00\x00\x00\x00"
        assert delivered[1] == (marker + ike_message(7, b"auth"), ("198.18.0.1", 4500), ("198.18.0.2", 4501))
        assert delivered[2][0] == marker + big
        # keyexchange -> network, from the port it names
        for i in range(20):
            kx.send(Datagram(data=bytes([i]) * 30, local=("198.18.0.1", 500), remote=("198.18.0.2", 500)))
        kx.send(Datagram(data=b"r" * 40, local=("198.18.0.1", 4500), remote=("198.18.0.2", 4501)))
        await eventually(lambda: len(sent) == 21, timeout=10)
        assert [s[4] for s in sent[:20]] == [bytes([i]) * 30 for i in range(20)]
        assert sent[20] == (4500, "198.18.0.1", "198.18.0.2", 4501, b"r" * 40)
        # the dataplane restarts its listener: keyexchange comes back on the new socket
        await listener.close()
        await eventually(lambda: relay.connected == 0, timeout=10)
        listener = LocalRelayListener(relay, short_dir / "dp.ike.sock")
        await listener.start()
        await eventually(lambda: kx.connected and relay.connected == 1, timeout=10)
        assert relay.counters["local_streams"] == 2 and servicer.grpc_streams == 0
    finally:
        kx.close()
        await listener.close()
        await server.stop(0)


async def test_install_notices_reach_keyexchange_between_datagrams(short_dir: Path) -> None:
    relay = IkeRelay()
    listener = LocalRelayListener(relay, short_dir / "dp.ike.sock")
    listener.announce_installed(["before-any-client"])  # nobody to tell: nothing happens
    await listener.start()
    server, servicer, port = await serve_status(lambda: listener.status())
    delivered: list[bytes] = []
    installed: list[str] = []
    kx = DataplaneRelay(
        [f"127.0.0.1:{port}"], GrpcSettings(), deliver=lambda d, *_: delivered.append(d), instance="kx-n"
    )
    kx.on_installed = installed.append
    await kx.start()
    try:
        await eventually(lambda: kx.connected and relay.connected == 1, timeout=10)
        listener.announce_installed(["kx-n-1.ike-1.c1"])
        await eventually(lambda: installed == ["kx-n-1.ike-1.c1"], timeout=10)
        # notices while the stream is busy with datagrams (some wait for the connection's lock)
        expected = [f"kx-n-1.ike-{i}.c1" for i in range(2, 202)]
        for i, child in enumerate(expected):
            relay.deliver("198.18.0.1", 500, "198.18.0.2", 500, ike_message(i, b"y" * 3000))
            listener.announce_installed([child])
            if i % 50 == 0:
                await asyncio.sleep(0)
        await eventually(lambda: len(installed) == 201 and len(delivered) == 200, timeout=10)
        assert sorted(installed[1:]) == sorted(expected)
        assert relay.counters["installed_notices"] == 201 and kx.counters["installed_notices"] == 201
        assert servicer.grpc_streams == 0
    finally:
        kx.close()
        await listener.close()
        await server.stop(0)


async def test_a_socket_that_answers_another_token_is_not_used(short_dir: Path) -> None:
    relay = IkeRelay()
    listener = LocalRelayListener(relay, short_dir / "dp.ike.sock")
    await listener.start()
    # GetStatus of "our" dataplane names the path but another token: another dataplane's socket
    server, servicer, port = await serve_status(
        lambda: {"ike_relay_socket": str(listener.path), "ike_relay_token": "0" * 32}
    )
    kx = DataplaneRelay([f"127.0.0.1:{port}"], GrpcSettings(), deliver=lambda *a: None, instance="kx-b")
    await kx.start()
    try:
        await eventually(lambda: servicer.grpc_streams == 1, timeout=10)
        assert kx.counters.get("local_token_mismatch", 0) >= 1
        await eventually(lambda: relay.connected == 0, timeout=5)  # the probe's connection went
    finally:
        kx.close()
        await listener.close()
        await server.stop(0)


async def test_garbage_on_the_socket_is_counted_and_dropped(short_dir: Path) -> None:
    relay = IkeRelay()
    sent: list[bytes] = []

    async def send(local: str, remote: str, remote_port: int, payload: bytes) -> bool:
        sent.append(payload)
        return True

    relay.set_sender(500, send)
    listener = LocalRelayListener(relay, short_dir / "dp.ike.sock")
    await listener.start()
    assert listener.path.stat().st_mode & 0o777 == 0o600
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, str(listener.path))
        await loop.sock_sendall(client, b"raw-client")
        assert await asyncio.wait_for(loop.sock_recv(client, 256), 5) == listener.token.encode()
        await loop.sock_sendall(client, b"\xff\xff\xff not protobuf")
        datagram = dataplane_pb2.IkeDatagram(
            local_addr="198.18.0.1", local_port=500, remote_addr="198.18.0.2", remote_port=500, payload=b"ok"
        )
        for record in encode_records([datagram]):
            await loop.sock_sendall(client, record)
        await eventually(lambda: sent == [b"ok"], timeout=5)
        assert relay.counters["local_bad_record"] == 1
    finally:
        client.close()
        await listener.close()
    assert not listener.path.exists()


def test_socket_path_follows_the_setting() -> None:
    store = Path("/var/lib/esplanade/store.db")
    assert socket_path("auto", "embedded", store, "node/1") == Path("/var/lib/esplanade/store.db.ike-node_1.sock")
    assert socket_path("auto", "etcd", store, "n") is None
    assert socket_path("", "embedded", store, "n") is None
    assert socket_path("/run/x.sock", "etcd", store, "n") == Path("/run/x.sock")
    assert socket_path("auto", "embedded", Path("/" + "d" * 120) / "store.db", "n") is None  # sun_path too short
