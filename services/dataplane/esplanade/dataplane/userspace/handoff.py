"""Hand-off between worker processes: a packet that reached the wrong worker goes to its SA's owner.

Steering gets almost every packet to the right worker first time (see `worker`), but not
all: the first packets of a flow before the TUN learned its queue, and UDP GRO batches that
mix SPIs. Those go through the owner's mailbox, an AF_UNIX datagram socket (one message per
packet, atomic, never interleaved). Messages::

    b"O" + inner packet                                   outbound, to be encrypted by the owner
    b"I" + len(host) (1 byte) + host + port (2 bytes) + ESP packet     inbound, to be decrypted

A full mailbox is a counted drop, never a wait.
"""

from __future__ import annotations

import errno
import socket
from collections import Counter

from esplanade.dataplane.userspace.outer_transport import Datagram

OUTBOUND = 0x4F  # "O"
INBOUND = 0x49  # "I"
MAILBOX_BUFFER = 4 << 20
MAX_MESSAGE = 65535 + 64


def mailbox_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """One (inbox, outbox) socket pair per worker; the outbox end is shared by the other workers."""
    pairs = []
    for _ in range(count):
        inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for sock in (inbox, outbox):
            for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, MAILBOX_BUFFER)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, MAILBOX_BUFFER)
        inbox.setblocking(False)
        outbox.setblocking(False)
        pairs.append((inbox, outbox))
    return pairs


class Mailbox:
    def __init__(self, index: int, inbox: socket.socket, outboxes: list[socket.socket | None]) -> None:
        self.index = index
        self.inbox = inbox
        self.outboxes = outboxes
        self.drops: Counter[str] = Counter()
        self.sent: Counter[int] = Counter()
        self.received = 0

    def fileno(self) -> int:
        return self.inbox.fileno()

    def _send(self, worker: int, message: bytes) -> None:
        outbox = self.outboxes[worker] if 0 <= worker < len(self.outboxes) else None
        if outbox is None:
            self.drops["no_such_worker"] += 1
            return
        try:
            outbox.send(message)
            self.sent[worker] += 1
        except OSError as exc:  # EAGAIN: the owner is behind; ENOBUFS; EMSGSIZE
            self.drops[f"send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1

    def send_outbound(self, worker: int, packet: bytes) -> None:
        self._send(worker, b"O" + packet)

    def send_inbound(self, worker: int, datagram: Datagram) -> None:
        (host, port), payload = datagram
        raw_host = host.encode()
        self._send(worker, b"I" + bytes((len(raw_host),)) + raw_host + port.to_bytes(2, "big") + payload)

    def drain(self, limit: int) -> tuple[list[bytes], list[Datagram]]:
        outbound: list[bytes] = []
        inbound: list[Datagram] = []
        recv = self.inbox.recv
        for _ in range(limit):
            try:
                message = recv(MAX_MESSAGE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                self.drops[f"recv_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
                break
            if not message:
                continue
            kind = message[0]
            if kind == OUTBOUND:
                outbound.append(message[1:])
            elif kind == INBOUND and len(message) >= 4:
                host_len = message[1]
                host_end = 2 + host_len
                if len(message) < host_end + 2:
                    self.drops["malformed"] += 1
                    continue
                host = message[2:host_end].decode(errors="replace")
                port = int.from_bytes(message[host_end : host_end + 2], "big")
                inbound.append(((host, port), message[host_end + 2 :]))
            else:
                self.drops["malformed"] += 1
        self.received += len(outbound) + len(inbound)
        return outbound, inbound

    def close(self) -> None:
        self.inbox.close()
        for outbox in self.outboxes:
            if outbox is not None:
                outbox.close()
