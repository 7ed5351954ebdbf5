"""Helpers shared by the host netns tests and the VM tests of the kernel backend."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

from pyroute2.netns import create_socket

from esplanade.dataplane.backend import DataplaneEvent, DataplaneEventKind
from esplanade.dataplane.kernel.backend import KernelXfrmBackend


@contextlib.asynccontextmanager
async def started_backend(netns: str, **options: object) -> AsyncIterator[KernelXfrmBackend]:
    backend = KernelXfrmBackend(netns=netns, **options)  # type: ignore[arg-type]
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


class EventWatcher:
    """Collects a backend's events in the background; `wait_for` returns the first match."""

    def __init__(self, backend: KernelXfrmBackend) -> None:
        self.seen: list[DataplaneEvent] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._collect(backend))

    async def _collect(self, backend: KernelXfrmBackend) -> None:
        async for event in backend.events():
            self.seen.append(event)
            self._changed.set()

    async def wait_for(self, kind: DataplaneEventKind, timeout: float = 20.0, **fields: object) -> DataplaneEvent:
        async def match() -> DataplaneEvent:
            while True:
                for event in self.seen:
                    if event.kind == kind and all(getattr(event, k) == v for k, v in fields.items()):
                        return event
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(match(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {kind.value} event {fields} within {timeout}s; saw {self.seen}") from None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.contextmanager
def udp_socket_in(netns: str, address: str, port: int) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock: socket.socket = create_socket(netns=netns, family=family, socket_type=socket.SOCK_DGRAM, flags=0)
    try:
        sock.bind((address, port))
        yield sock
    finally:
        sock.close()
