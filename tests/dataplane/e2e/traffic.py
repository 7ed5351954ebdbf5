"""A steady UDP stream between two test-bed nodes, from threads of the test process.

The sockets are made inside the nodes' namespaces (`inside_netns`) and keep living there;
send errors (no route while a dataplane restarts) are counted, not raised. Each datagram
carries its number, so the receiver knows what arrived.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType

from tests.netns_topology import Node, inside_netns

_NUMBER = struct.Struct("!Q")


class UdpStream:
    def __init__(self, sender: Node, receiver: Node, *, rate: int = 4000, size: int = 200, port: int = 9000) -> None:
        self.rate = rate
        self.size = size
        with inside_netns(sender.name):
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with inside_netns(receiver.name):
            self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx.bind((sender.site_addr, 0))
        self.rx.bind((receiver.site_addr, port))
        self.rx.settimeout(0.1)
        self.target = (receiver.site_addr, port)
        self.sent = 0
        self.send_errors = 0
        self.received = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]

    def __enter__(self) -> UdpStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.tx.close()
        self.rx.close()

    def _send(self) -> None:
        padding = bytes(self.size - _NUMBER.size)
        per_tick = max(1, self.rate // 1000)
        number = 0
        next_tick = time.monotonic()
        while not self._stop.is_set():
            for _ in range(per_tick):
                number += 1
                try:
                    self.tx.sendto(_NUMBER.pack(number) + padding, self.target)
                    self.sent += 1
                except OSError:
                    self.send_errors += 1
            next_tick += 0.001
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing of the load generator, not a wait for a condition
            else:
                next_tick = time.monotonic()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.rx.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
