"""A TCP stream whose every line carries its send time, to prove when a flow was cut.

python -m tests.zerotrust.stamped_stream serve ADDR PORT OUT
    accept one connection; append "<receive time> <line>" to OUT for every line received
python -m tests.zerotrust.stamped_stream send SRC ADDR PORT SECONDS INTERVAL OUT
    every INTERVAL seconds write "<seq> <send time>\\n" (wall clock) for SECONDS; log each write
    to OUT. A write that blocks (the path is cut, the window full) just waits: what the
    application wrote, when, is what counts.
"""

from __future__ import annotations

import socket
import sys
import time


def serve(addr: str, port: int, out: str) -> None:
    with socket.create_server((addr, port)) as srv, open(out, "a", buffering=1) as log:
        srv.settimeout(60)
        print("listening", flush=True)
        conn, _ = srv.accept()
        conn.settimeout(60)
        buffered = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                buffered += data
                *lines, buffered = buffered.split(b"\n")
                now = time.time()
                for line in lines:
                    log.write(f"{now:.6f} {line.decode()}\n")


def send(src: str, addr: str, port: int, seconds: float, interval: float, out: str) -> None:
    with (
        socket.create_connection((addr, port), timeout=10, source_address=(src, 0)) as s,
        open(out, "a", buffering=1) as log,
    ):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(0.2)
        end = time.time() + seconds
        seq = 0
        pending = b""
        while time.time() < end:
            if not pending:  # a new line only once the last one is in the socket
                seq += 1
                sent_at = time.time()
                pending = f"{seq} {sent_at:.6f}\n".encode()
                log.write(f"{seq} {sent_at:.6f}\n")
            try:
                pending = pending[s.send(pending) :]
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                break
            time.sleep(interval)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        send(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
