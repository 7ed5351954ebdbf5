"""A 1 kHz UDP echo probe through every tunnel: the gap measure of failover tests.

Each tick (1 ms) the peer side sends one numbered datagram per tunnel from the tunnel's
protected address 10.70.<t>.1 to the LAN host; the LAN host echoes it back. A datagram only
returns if both directions of the tunnel work, through whichever node owns it. The arrival
times of the echoes (monotonic, in the test process) give the gaps.

Three threads (sender, echo, receiver) with sockets made inside the namespaces.
"""

from __future__ import annotations

import bisect
import itertools
import selectors
import socket
import struct
import threading
import time
from types import TracebackType

from tests.netns_topology import inside_netns
from tests.scaleout.cluster import LAN_HOST, peer_host

PORT = 9100
_HEADER = struct.Struct("!IQ")  # tunnel, number


class EchoProbe:
    def __init__(self, peer_ns: str, lan_ns: str, tunnels: int, *, rate: int = 1000, size: int = 64) -> None:
        self.tunnels = tunnels
        self.interval = 1.0 / rate
        self.size = size
        self.senders: list[socket.socket] = []
        with inside_netns(peer_ns):
            for t in range(tunnels):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((peer_host(t), 0))
                sock.setblocking(False)
                self.senders.append(sock)
        with inside_netns(lan_ns):
            self.echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.echo.bind((LAN_HOST, PORT))
            self.echo.settimeout(0.1)
        self.arrivals: list[list[float]] = [[] for _ in range(tunnels)]
        self.sent = [0] * tunnels
        self.send_errors = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._echo, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]

    def __enter__(self) -> EchoProbe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        for sock in [*self.senders, self.echo]:
            sock.close()

    def _send(self) -> None:
        padding = bytes(self.size - _HEADER.size)
        number = 0
        next_tick = time.monotonic()
        while not self._stop.is_set():
            number += 1
            for t, sock in enumerate(self.senders):
                try:
                    sock.sendto(_HEADER.pack(t, number) + padding, (LAN_HOST, PORT))
                    self.sent[t] += 1
                except OSError:
                    self.send_errors += 1
            next_tick += self.interval
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing of the load generator, not a wait for a condition
            else:
                next_tick = time.monotonic()

    def _echo(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.echo.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self.echo.sendto(data, source)
            except OSError:
                continue

    def _receive(self) -> None:
        selector = selectors.DefaultSelector()
        for t, sock in enumerate(self.senders):
            selector.register(sock, selectors.EVENT_READ, t)
        while not self._stop.is_set():
            for key, _ in selector.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                while True:
                    try:
                        data = sock.recv(2048)
                    except (BlockingIOError, OSError):
                        break
                    if len(data) >= _HEADER.size:
                        self.arrivals[key.data].append(time.monotonic())

    # -- reading --------------------------------------------------------------------------
    def received(self, t: int) -> int:
        return len(self.arrivals[t])

    def all_flowing(self, since: float) -> bool:
        """Every tunnel echoed something after `since`."""
        return all(a and a[-1] > since for a in self.arrivals)

    def max_gap(self, t: int, start: float, end: float) -> float:
        """The longest time without an echo on tunnel t within [start, end]."""
        arrivals = self.arrivals[t]
        lo = bisect.bisect_left(arrivals, start)
        hi = bisect.bisect_right(arrivals, end)
        points = [start, *arrivals[lo:hi], end]
        return max(b - a for a, b in itertools.pairwise(points))
