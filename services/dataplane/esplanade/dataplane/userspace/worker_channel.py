"""The parent's end of one worker's control channel, for asyncio.

Requests carry an "id" and the worker echoes it in its answer, so many may be in flight;
whatever the worker pushes unasked (sequence reservations, replay floors, events, IKE) goes
to `on_message`. When the worker goes away every pending request fails with
`WorkerGone` and `on_closed` runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from esplanade.dataplane.userspace.loop import CONTROL_MESSAGE_MAX

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
_ANSWERS = frozenset({"reply", "status", "stopped"})


class WorkerGone(ConnectionError):
    """The worker's control channel closed (the worker exited) or it did not answer in time."""


class WorkerChannel:
    def __init__(
        self,
        index: int,
        sock: socket.socket,
        on_message: Callable[[int, dict[str, Any]], None],
        on_closed: Callable[[int], None],
    ) -> None:
        self.index = index
        self.sock = sock
        self.on_message = on_message
        self.on_closed = on_closed
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loop = asyncio.get_running_loop()
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    async def request(self, message: dict[str, Any], deadline: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Send `message` and wait for the worker's answer to it."""
        if self.closed:
            raise WorkerGone(f"worker {self.index} is gone")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            await self._send({**message, "id": request_id}, deadline)
            return await asyncio.wait_for(future, deadline)
        except TimeoutError:
            raise WorkerGone(f"worker {self.index} did not answer {message.get('op')!r} in {deadline}s") from None
        finally:
            self._pending.pop(request_id, None)

    async def post(self, message: dict[str, Any], deadline: float = REQUEST_TIMEOUT) -> None:
        """Send `message` without an id: the worker acts on it and answers nothing (what it
        cannot do it counts). Returns once the message is in the channel."""
        if self.closed:
            raise WorkerGone(f"worker {self.index} is gone")
        try:
            await self._send(message, deadline)
        except TimeoutError:
            raise WorkerGone(f"worker {self.index} did not take {message.get('op')!r} in {deadline}s") from None

    async def _send(self, message: dict[str, Any], seconds: float) -> None:
        data = json.dumps(message).encode()
        until = self._loop.time() + seconds
        while True:
            try:
                self.sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                if self._loop.time() >= until:
                    raise TimeoutError from None
                await asyncio.sleep(0.001)
            except OSError as exc:
                self._close()
                raise WorkerGone(f"worker {self.index}: {exc.strerror}") from None

    def _readable(self) -> None:
        while not self.closed:
            try:
                raw = self.sock.recv(CONTROL_MESSAGE_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close()
                return
            if not raw:
                self._close()
                return
            try:
                message = json.loads(raw)
            except ValueError:
                log.error("worker %d sent an undecodable control message", self.index)
                continue
            if not isinstance(message, dict):
                continue
            request_id = message.get("id")
            if message.get("op") in _ANSWERS and isinstance(request_id, int):
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            try:
                self.on_message(self.index, message)
            except Exception:
                log.exception("handling a message of worker %d failed", self.index)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerGone(f"worker {self.index} is gone"))
        self.on_closed(self.index)

    def detach(self) -> None:
        """Stop reading (the socket itself belongs to the worker pool, which closes it)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.sock.fileno())
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(WorkerGone(f"worker {self.index} is detached"))
