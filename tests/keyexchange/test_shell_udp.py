"""The asyncio UDP shell with real sockets (inside a private netns): own 4500 socket, and a
dataplane that owns 4500 and relays IKE to the shell."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import ChildSaEstablished, Event, InstallInboundSa
from esplanade.keyexchange.shell.udp import IkeUdpShell
from tests.conditions import wait_until
from tests.keyexchange import interop as ix
from tests.keyexchange.peers import conn
from tests.loop_thread import finish_loop_thread

pytestmark = pytest.mark.netns
NS = "ikec-shell"
A, B = "127.0.0.1", "127.0.0.2"


class DataplaneNatt(asyncio.DatagramProtocol):
    """Stands in for the dataplane: owns UDP 4500, hands IKE (non-ESP marker) to the shell."""

    def __init__(self) -> None:
        self.shell: IkeUdpShell | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.esp: list[bytes] = []
        self.relayed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if data[:4] == b"\0\0\0\0":
            assert self.shell is not None
            self.relayed += 1
            self.shell.feed_natt(data, (B, 4500), (addr[0], addr[1]))
        else:
            self.esp.append(data)

    def send(self, data: bytes, local: tuple[str, int], remote: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, remote)


@pytest.fixture
def netns_loop() -> Iterator[asyncio.AbstractEventLoop]:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        ix.setns(NS)
        asyncio.set_event_loop(loop)
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(5)
    try:
        yield loop
    finally:
        finish_loop_thread(loop, t, timeout=5)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)


def _cfg(side: str) -> ConnectionConfig:
    d = conn(side, encap=True)
    d["local_addrs"] = [A if side == "a" else B]
    d["remote_addrs"] = [B if side == "a" else A]
    return ConnectionConfig.from_dict("ab", d)


def test_shell_with_dataplane_owned_natt(netns_loop: asyncio.AbstractEventLoop) -> None:
    events: dict[str, list[Event]] = {"a": [], "b": []}
    shells: dict[str, IkeUdpShell] = {}
    relay = DataplaneNatt()

    def on_event(side: str) -> Any:
        def handle(ev: Event) -> None:
            events[side].append(ev)
            if isinstance(ev, InstallInboundSa):
                sh = shells[side]
                netns_loop.call_soon(lambda: sh.call(sh.engine.inbound_sa_installed, ev.ike_sa, ev.child_id))

        return handle

    async def setup() -> None:
        ea = IkeDispatcher([_cfg("a")], now=time.monotonic())
        eb = IkeDispatcher([_cfg("b")], now=time.monotonic())
        shells["a"] = IkeUdpShell(ea, A, on_event=on_event("a"))
        shells["b"] = IkeUdpShell(eb, B, relay=relay, on_event=on_event("b"))
        relay.shell = shells["b"]
        await netns_loop.create_datagram_endpoint(lambda: relay, local_addr=(B, 4500))
        await shells["a"].start()
        await shells["b"].start()
        shells["a"].call(ea.initiate, "ab")

    asyncio.run_coroutine_threadsafe(setup(), netns_loop).result(5)
    wait_until(lambda: events["a"] and any(isinstance(e, ChildSaEstablished) for e in events["a"]), timeout=10)
    assert relay.relayed >= 1  # IKE_AUTH reached B through the dataplane's 4500 socket
    rec = next(e for e in events["a"] if isinstance(e, ChildSaEstablished)).record
    assert rec.outbound.encap is not None and rec.outbound.encap.dst_port == 4500

    # ESP from A's own 4500 socket lands in the dataplane's ESP path, not in IKE
    def send_esp() -> None:
        shells["a"].send_esp(rec.outbound.spi.to_bytes(4, "big") + b"\0\0\0\1" + b"x" * 40, (A, 4500), (B, 4500))

    netns_loop.call_soon_threadsafe(send_esp)
    wait_until(lambda: relay.esp, timeout=5)
    assert relay.esp[0][:4] == rec.outbound.spi.to_bytes(4, "big")
    # garbage on the IKE ports never escapes the shell
    for payload in (b"", b"\0\0\0\0", b"\0\0\0\0" + b"\x01" * 40, b"\xff"):
        netns_loop.call_soon_threadsafe(shells["b"].feed_natt, payload, (B, 4500), (A, 4500))
        netns_loop.call_soon_threadsafe(shells["b"].feed, payload, (B, 500), (A, 500))

    async def barrier() -> None:  # runs after the callbacks queued above (FIFO)
        return None

    asyncio.run_coroutine_threadsafe(barrier(), netns_loop).result(5)
    assert shells["b"].counters.get("engine_errors", 0) == 0
    assert shells["b"].engine.counters.get("dropped_internal_errors", 0) == 0

    def close() -> None:
        for s in shells.values():
            s.close()

    netns_loop.call_soon_threadsafe(close)
