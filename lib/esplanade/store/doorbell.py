"""Cross-process wake-ups for the embedded store: a writer rings every other process that has
the file open, so their watches read a new revision at once instead of at their next poll.

Each open store binds a Unix datagram socket in `<store>.bell/` (a path, not the abstract
namespace: the services may sit in different network namespaces). After a commit that made
revisions, the writer sends the store revision it committed (8 bytes, big-endian) to every
other socket there, without blocking: a full receive queue means that process has a wake-up
pending already. The receiver's watches then read up to that revision without first asking
the database for it (the socket files are the store owner's, like the database file). A socket nobody is bound to
any more (its process died) refuses the byte and is removed. The ring is only a hint: polling
stays, so a lost or late ring costs latency, never an event.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
from pathlib import Path

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, NUL included
_REVISION = struct.Struct("!Q")
_names = itertools.count()


class Doorbell:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"{os.getpid()}.{next(_names)}"
        self.path = directory / self.name
        self._receiver: socket.socket | None = None
        self._sender: socket.socket | None = None
        self.rings_sent = 0

    def open(self) -> bool:
        """Bind this process's socket; False (polling only) when the path cannot be one."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            return False
        try:
            self.directory.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                receiver.setblocking(False)
                receiver.bind(str(self.path))
            except OSError:
                receiver.close()
                raise
        except OSError:
            return False
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        self._receiver, self._sender = receiver, sender
        return True

    def fileno(self) -> int:
        return self._receiver.fileno() if self._receiver is not None else -1

    def drain(self) -> int:
        """Take every pending ring: the highest revision they name (0: none did)."""
        receiver = self._receiver
        highest = 0
        while receiver is not None:
            try:
                data = receiver.recv(64)
            except OSError:  # BlockingIOError: none left
                break
            if len(data) == _REVISION.size:
                highest = max(highest, _REVISION.unpack(data)[0])
        return highest

    def ring_others(self, revision: int) -> None:
        """Tell every other process's store that `revision` is committed (called from the
        writer thread after the commit)."""
        sender = self._sender
        if sender is None:
            return
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        ring = _REVISION.pack(revision)
        for name in names:
            if name == self.name:
                continue
            path = os.path.join(self.directory, name)
            try:
                sender.sendto(ring, path)
                self.rings_sent += 1
            except BlockingIOError:
                pass  # its queue is full: it has rings to read already
            except ConnectionRefusedError:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # nobody is bound to it: a process that died
            except OSError:
                pass

    def close(self) -> None:
        receiver, self._receiver = self._receiver, None
        sender, self._sender = self._sender, None
        if receiver is not None:
            receiver.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
        if sender is not None:
            sender.close()
