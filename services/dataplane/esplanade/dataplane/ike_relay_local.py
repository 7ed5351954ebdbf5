"""The IKE relay on a Unix socket for a keyexchange on this host (`esplanade.rpc.local_relay`).

Each connection is one relay stream, attached to `IkeRelay` under the instance name its client
sends first, exactly like a RelayIkeBatch call: datagrams for the stream go out as records,
records from the client are sent like the stream's messages. `announce_installed` sends every
connected client an install notice (the reconciler calls it right after a worker install,
before the store ack): records of one connection are sent under its lock, one at a time. The socket file is created mode
0600 (the services run as one user); a connection that does not say hello within a second is
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from esplanade.dataplane.ike_relay import IkeRelay, RelayStream
from esplanade.rpc.local_relay import (
    INSTANCE_MAX,
    RECORD_MAX,
    SOCKET_BUFFER,
    decode_record,
    encode_installed,
    encode_records,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 1.0
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less its terminating NUL


def socket_path(setting: str, store_backend: str, store_path: Path, node: str) -> Path | None:
    """Where the local relay listens (`dataplane.ike_relay_socket`); None: nowhere."""
    if not setting:
        return None
    if setting != "auto":
        return Path(setting)
    if store_backend != "embedded":
        return None
    safe_node = re.sub(r"[^A-Za-z0-9._-]", "_", node)
    path = store_path.with_name(f"{store_path.name}.ike-{safe_node}.sock")
    return path if len(os.fsencode(str(path))) <= _SUN_PATH_MAX else None


async def start_local_relay(relay: IkeRelay, path: Path | None) -> LocalRelayListener | None:
    """The listener on `path`, started; None (the gRPC relay only) if there is none or it fails."""
    if path is None:
        return None
    listener = LocalRelayListener(relay, path)
    try:
        await listener.start()
    except OSError as exc:
        log.warning("IKE relay socket %s: %s; keyexchange reaches the relay over gRPC only", path, exc)
        return None
    return listener


class LocalRelayListener:
    def __init__(self, relay: IkeRelay, path: Path) -> None:
        self.relay = relay
        self.path = path
        self.token = secrets.token_hex(16)
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._clients: dict[socket.socket, asyncio.Lock] = {}  # said hello; lock: one record at a time
        self._notices: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a predecessor's: nobody listens on it any more
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # connecting needs write permission on the file: with any usual umask nobody else
            # has it between bind and chmod (the process umask is not ours to change: threads)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept(sock), name="ike-relay-local:accept")
        log.info("IKE relay also on %s for a keyexchange on this host", self.path)

    def status(self) -> dict[str, str]:
        if self._sock is None:
            return {}
        return {"ike_relay_socket": str(self.path), "ike_relay_token": self.token}

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._sessions, *self._notices) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                log.warning("IKE relay socket %s: accept failed: %s", self.path, exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._session(conn), name="ike-relay-local:session")
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def _session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        stream: RelayStream | None = None
        receiving: asyncio.Task[None] | None = None
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            hello = await asyncio.wait_for(loop.sock_recv(conn, INSTANCE_MAX + 1), HELLO_TIMEOUT)
            if not hello or len(hello) > INSTANCE_MAX:
                self.relay.counters["local_bad_hello"] += 1
                return
            await loop.sock_sendall(conn, self.token.encode())
            lock = asyncio.Lock()
            self._clients[conn] = lock
            stream = self.relay.attach(hello.decode("utf-8", "replace"))
            self.relay.counters["local_streams"] += 1
            log.info("IKE relay client connected on the local socket (%s)", stream.key)
            receiving = asyncio.create_task(self._receive(conn))
            receiving.add_done_callback(_closer(stream))
            while True:
                datagrams = await stream.next_batch()
                if datagrams is None:
                    return
                self.relay.counters["batches_to_clients"] += 1
                for record in encode_records(datagrams):
                    async with lock:
                        await loop.sock_sendall(conn, record)
        except (OSError, TimeoutError):
            return
        finally:
            self._clients.pop(conn, None)
            if receiving is not None:
                receiving.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiving
            if stream is not None:
                self.relay.detach(stream)
                log.info("IKE relay client %s disconnected from the local socket", stream.key)
            conn.close()

    def announce_installed(self, child_ids: list[str]) -> None:
        """Tell every connected keyexchange that these Child SAs' inbound SAs are installed.
        Sent at once when the connection is idle; else (a record of its own in progress, a
        full socket buffer) by a task that waits its turn."""
        if not self._clients or not child_ids:
            return
        record = encode_installed(child_ids)
        for conn, lock in list(self._clients.items()):
            if not lock.locked():
                try:
                    conn.send(record)
                except BlockingIOError:
                    pass
                except OSError:
                    continue  # the session ends on it by itself
                else:
                    self.relay.counters["installed_notices"] += 1
                    continue
            task = asyncio.create_task(self._send_later(conn, lock, record), name="ike-relay-local:notice")
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)

    async def _send_later(self, conn: socket.socket, lock: asyncio.Lock, record: bytes) -> None:
        async with lock:
            if conn not in self._clients:
                return
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(conn, record)
                self.relay.counters["installed_notices"] += 1

    async def _receive(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                record = await loop.sock_recv(conn, RECORD_MAX)
            except OSError:
                return
            if not record:
                return
            batch = decode_record(record)
            if batch is None:
                self.relay.counters["local_bad_record"] += 1
                continue
            self.relay.counters["batches_from_clients"] += 1
            for datagram in batch.datagrams:
                await self.relay.send(datagram)


def _closer(stream: RelayStream) -> Callable[[asyncio.Task[None]], None]:
    """The client's side ended: so does the stream (its sender loop sees None)."""

    def close(_: asyncio.Task[None]) -> None:
        stream.close()

    return close
