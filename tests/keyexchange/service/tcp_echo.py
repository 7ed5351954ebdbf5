"""TCP through the tunnel, as two commands run inside namespaces:

python -m tests.keyexchange.service.tcp_echo serve ADDR PORT      # echo one connection
python -m tests.keyexchange.service.tcp_echo send ADDR PORT NBYTES SRC  # exits 0 if echoed intact
"""

from __future__ import annotations

import os
import socket
import sys


def serve(addr: str, port: int) -> None:
    with socket.create_server((addr, port)) as srv:
        srv.settimeout(30)
        print("listening", flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(30)
            while data := conn.recv(65536):
                conn.sendall(data)


def send(addr: str, port: int, n: int, src: str) -> int:
    payload = os.urandom(n)
    with socket.create_connection((addr, port), timeout=20, source_address=(src, 0)) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
    return 0 if bytes(got) == payload else 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
