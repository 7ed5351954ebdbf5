"""A real etcd for tests: free loopback ports, a temp data dir, SIGKILL and restart.

    server = EtcdServer(tmp_path / "etcd")
    server.start()            # ready (serving /health) when it returns, ~0.2 s here
    server.endpoint           # "127.0.0.1:PORT" for EtcdStore
    server.kill()             # SIGKILL, like a crashed node: no clean shutdown
    server.start()            # same ports, same data dir: every committed write is back
    server.stop()             # SIGKILL and reap; idempotent

`EtcdServer(..., tls=True)` serves client traffic over TLS and demands client certificates
(`--client-cert-auth`); `server.client_tls` holds the CA, cert and key a client needs.

The raft timers are shortened (heartbeat 25 ms, election 250 ms) so a restart elects itself
quickly and the minimum lease TTL etcd enforces is 1 s instead of 2 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.pki import TlsFiles, make_pki

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL_BINARY = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdNotReady(RuntimeError):
    pass


class EtcdServer:
    def __init__(
        self, directory: Path, *, tls: bool = False, name: str = "esplanade-test", netns: str | None = None
    ) -> None:
        self.directory = directory
        self.netns = netns  # run inside this network namespace (its own loopback)
        self.data_dir = directory / "data"
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.server_tls: TlsFiles | None = None
        self.client_tls: TlsFiles | None = None
        if tls:
            pki = make_pki(directory / "pki")
            self.server_tls, self.client_tls = pki.server, pki.client
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = directory / "etcd.log"

    # -- addresses ----------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """host:port, the form EtcdStore takes."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    # -- life cycle ---------------------------------------------------------------------
    def command(self) -> list[str]:
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            ETCD_BINARY,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"{self.name}={peer_url}",
            "--heartbeat-interval",
            "25",
            "--election-timeout",
            "250",
            "--logger",
            "zap",
            "--log-level",
            "error",
        ]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        if self.server_tls is not None:
            cmd += [
                "--cert-file",
                str(self.server_tls.cert),
                "--key-file",
                str(self.server_tls.key),
                "--trusted-ca-file",
                str(self.server_tls.ca),
                "--client-cert-auth",
            ]
        return cmd

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise EtcdNotReady(f"etcd exited with {self._process.returncode}: {self.log_tail()}")
            try:
                if self.healthy():
                    return
            except OSError as exc:
                last_error = exc
            time.sleep(0.01)
        raise EtcdNotReady(f"etcd not healthy after {timeout}s ({last_error!r}): {self.log_tail()}")

    def healthy(self) -> bool:
        context = None
        if self.client_tls is not None:
            context = ssl.create_default_context(cafile=str(self.client_tls.ca))
            context.load_cert_chain(str(self.client_tls.cert), str(self.client_tls.key))
        url = f"{self.client_url}/health"  # http(s) on loopback, built here
        with contextlib.ExitStack() as stack:
            if self.netns is not None:
                from tests.netns_topology import inside_netns

                stack.enter_context(inside_netns(self.netns))
            with urllib.request.urlopen(url, timeout=0.5, context=context) as reply:  # noqa: S310
                return b'"true"' in reply.read()

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would; the data dir keeps whatever etcd had committed."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        self._process = None

    stop = kill

    def restart(self, timeout: float = 15.0) -> None:
        self.kill()
        self.start(timeout)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- inspection ---------------------------------------------------------------------
    def etcdctl(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[bytes]:
        """Run etcdctl (API v3) against this server; raise on failure."""
        cmd = [ETCDCTL_BINARY, f"--endpoints={self.client_url}"]
        if self.client_tls is not None:
            cmd += [
                f"--cacert={self.client_tls.ca}",
                f"--cert={self.client_tls.cert}",
                f"--key={self.client_tls.key}",
            ]
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run([*cmd, *args], env=env, capture_output=True, timeout=timeout, check=True)

    def dump(self) -> bytes:
        """Every key and value, as `etcdctl get --prefix ""` prints them."""
        return self.etcdctl("get", "--prefix", "").stdout

    def wipe(self) -> None:
        """Delete every key and revoke every lease (revisions keep counting up)."""
        self.etcdctl("del", "--prefix", "")
        leases = self.etcdctl("lease", "list").stdout.decode().split()
        for token in leases:
            if all(c in "0123456789abcdef" for c in token) and len(token) >= 8:
                with contextlib.suppress(subprocess.CalledProcessError):
                    self.etcdctl("lease", "revoke", token)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
