"""Esplanade sites as real processes in network namespaces, for the service tests.

A site is a netns with a WAN address (on a veth to its peer), inner addresses on lo, a TUN
`esp0`, its own embedded store file, a dataplane process and a keyexchange process. The
services listen on 0.0.0.0 inside the netns; the test reaches their gRPC through a
management veth from the root namespace (10.203.<n>.1 <-> 10.203.<n>.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, SealedDocuments, Sealer
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc, keyexchange_pb2, keyexchange_pb2_grpc
from tests.conditions import wait_until

KX_PORT, DP_PORT = 50061, 50062
# which dataplane the sites run: the dataplane service ("real") or the contract stand-in
DATAPLANE = os.environ.get("KXS_DATAPLANE", "real")
REPO = Path(__file__).resolve().parents[3]
# Python in the kernel VM (tests/vm) runs 13-30x slower: a service needs far longer to start there
IN_VM = os.environ.get("ESPLANADE_IN_VM") == "1"
START_TIMEOUT = 150.0 if IN_VM else 30.0
POLL_INTERVAL = 0.3 if IN_VM else 0.02  # one vCPU there: polling must not starve the services
# a restarted service is reached within 2 s (gRPC's default reconnect backoff grows to 120 s)
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2_000)]


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def nsx(ns: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


class Site:
    def __init__(self, ns: str, index: int, wan_ip: str, inner_ip: str, base: Path, backend: str = "userspace") -> None:
        self.ns = ns
        self.backend = backend  # of the dataplane service: "userspace" (TUN esp0) or "kernel" (XFRM)
        self.index = index
        self.wan_ip = wan_ip
        self.inner_ip = inner_ip
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.store_path = base / "store.db"
        self.kek = Keyring.generate().to_text()
        self.mgmt_host, self.mgmt_ip = f"10.203.{index}.1", f"10.203.{index}.2"
        self.kx: subprocess.Popen[bytes] | None = None
        self.dp: subprocess.Popen[bytes] | None = None
        self.kx_log = base / "keyexchange.log"
        self.dp_log = base / "dataplane.log"
        self._kx_channel: grpc.Channel | None = None
        self._dp_channel: grpc.Channel | None = None

    # -- network -------------------------------------------------------------------------------
    def create_netns(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", f"kxsm{self.index}", check=False)
        sh("ip", "netns", "add", self.ns)
        nsx(self.ns, "ip", "link", "set", "lo", "up")
        nsx(self.ns, "ip", "addr", "add", f"{self.inner_ip}/32", "dev", "lo")
        m = f"kxsm{self.index}"
        sh("ip", "link", "add", m, "type", "veth", "peer", "name", "mgmt0", "netns", self.ns)
        sh("ip", "addr", "add", f"{self.mgmt_host}/30", "dev", m)
        sh("ip", "link", "set", m, "up")
        nsx(self.ns, "ip", "addr", "add", f"{self.mgmt_ip}/30", "dev", "mgmt0")
        nsx(self.ns, "ip", "link", "set", "mgmt0", "up")

    def delete_netns(self) -> None:
        sh("ip", "link", "del", f"kxsm{self.index}", check=False)
        sh("ip", "netns", "del", self.ns, check=False)

    # -- processes -----------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESPLANADE_")}
        env.update(
            ESPLANADE_STORE__PATH=str(self.store_path),
            ESPLANADE_KEK__VALUE=self.kek,
            ESPLANADE_ENDPOINTS__KEYEXCHANGE=f"0.0.0.0:{KX_PORT}",
            ESPLANADE_ENDPOINTS__DATAPLANE=f"127.0.0.1:{DP_PORT}",
            ESPLANADE_ENDPOINTS__METRICS_PORT_OFFSET="0",
            ESPLANADE_TELEMETRY__LOG_FORMAT="text",
            ESPLANADE_TELEMETRY__LOG_LEVEL="info",
            ESPLANADE_KEYEXCHANGE__INSTANCE=f"kx{self.index}",
            ESPLANADE_KEYEXCHANGE__COUNTERS_INTERVAL_SECONDS="1",
            PYTHONPATH=str(REPO),
            PYTHONUNBUFFERED="1",  # the log files show everything up to a kill -9
        )
        env.update(extra)
        return env

    def start_dataplane(self, *extra: str, wait: bool = True) -> None:
        """Start the dataplane; `wait=False` returns at once (then `wait_dataplane()`)."""
        if DATAPLANE == "real" and not extra:
            self._start_real_dataplane(wait=wait)
            return
        cmd = [
            sys.executable,
            "-m",
            "tests.keyexchange.service.contract_dataplane",
            "--store",
            str(self.store_path),
            "--kek",
            self.kek,
            "--ip",
            self.wan_ip,
            "--listen",
            f"0.0.0.0:{DP_PORT}",
            "--node",
            f"dp{self.index}",
            *extra,
        ]
        with open(self.dp_log, "ab") as log:
            self.dp = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *cmd], stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO
            )
        wait_until(lambda: self._has_tun(), timeout=15, what=f"{self.ns} dataplane TUN")
        nsx(self.ns, "ip", "link", "set", "esp0", "up")
        nsx(self.ns, "ip", "link", "set", "esp0", "mtu", "1400")

    def _start_real_dataplane(self, *, wait: bool = True, **extra: str) -> None:
        """The dataplane service (`esplanade serve dataplane`, `self.backend`) on this site's store."""
        env = self.env(
            ESPLANADE_ENDPOINTS__DATAPLANE=f"0.0.0.0:{DP_PORT}",
            ESPLANADE_DATAPLANE__NODE=f"dp{self.index}",
            ESPLANADE_DATAPLANE__BACKEND=self.backend,
            ESPLANADE_DATAPLANE__WORKERS="1",
            ESPLANADE_DATAPLANE__LISTEN_ADDRESSES=f'["{self.wan_ip}"]',
            ESPLANADE_DATAPLANE__FLOW_LOG_PATH=str(self.base / "flows.jsonl"),
            ESPLANADE_DATAPLANE__KERNEL_STATE_FILE=str(self.base / "dataplane-kernel.json"),
            **extra,
        )
        cmd = [sys.executable, "-m", "esplanade.cli.main", "serve", "dataplane"]
        with open(self.dp_log, "ab") as log:
            self.dp = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
        if wait:
            self.wait_dataplane()

    def wait_dataplane(self) -> None:
        wait_until(self._dp_serving, timeout=START_TIMEOUT, interval=POLL_INTERVAL, what=f"{self.ns} dataplane serving")

    def _dp_serving(self) -> bool:
        if self.dp is not None and self.dp.poll() is not None:
            raise AssertionError(f"dataplane died: {self.dp_log.read_text(errors='replace')[-3000:]}")
        try:
            self.dp_stub().GetStatus(dataplane_pb2.GetStatusRequest(), timeout=2)
        except grpc.RpcError:
            return False
        if self.backend == "kernel":
            return True
        return nsx(self.ns, "ip", "link", "show", "esp0", check=False).returncode == 0

    def _has_tun(self) -> bool:
        if self.dp is not None and self.dp.poll() is not None:
            raise AssertionError(f"dataplane died: {self.dp_log.read_text(errors='replace')[-2000:]}")
        return nsx(self.ns, "ip", "link", "show", "esp0", check=False).returncode == 0

    def start_keyexchange(self, *, wait: bool = True, **extra: str) -> None:
        """Start keyexchange; `wait=False` returns at once (then `wait_keyexchange()`)."""
        profile = os.environ.get("KXS_PROFILE_KEYEXCHANGE")  # bench: cProfile output path
        prefix = ["-m", "cProfile", "-o", profile] if profile else []
        cmd = [sys.executable, *prefix, "-m", "esplanade.cli.main", "serve", "keyexchange"]
        with open(self.kx_log, "ab") as log:
            self.kx = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(**extra),
                cwd=REPO,
            )
        if wait:
            self.wait_keyexchange()

    def wait_keyexchange(self) -> None:
        wait_until(
            self._kx_serving, timeout=START_TIMEOUT, interval=POLL_INTERVAL, what=f"{self.ns} keyexchange serving"
        )

    def _kx_serving(self) -> bool:
        if self.kx is not None and self.kx.poll() is not None:
            raise AssertionError(f"keyexchange died: {self.kx_log.read_text(errors='replace')[-3000:]}")
        try:
            self.kx_stub().ListSas(keyexchange_pb2.ListSasRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return True

    def kill_keyexchange(self) -> None:
        if self.kx is not None:
            # `ip netns exec` execs: the Popen pid is the service itself
            os.kill(self.kx.pid, signal.SIGKILL)
            self.kx.wait(10)
            self.kx = None

    def stop_dataplane(self) -> None:
        """SIGTERM to the dataplane process alone (a graceful stop) and wait for it."""
        if self.dp is not None and self.dp.poll() is None:
            self.dp.send_signal(signal.SIGTERM)
            self.dp.wait(60)
        self.dp = None

    def stop(self) -> None:
        for proc in (self.kx, self.dp):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.kx = self.dp = None
        for channel in (self._kx_channel, self._dp_channel):
            if channel is not None:
                channel.close()
        self._kx_channel = self._dp_channel = None

    # -- gRPC --------------------------------------------------------------------------------------
    def kx_stub(self) -> keyexchange_pb2_grpc.KeyExchangeStub:
        if self._kx_channel is None:
            self._kx_channel = grpc.insecure_channel(f"{self.mgmt_ip}:{KX_PORT}", CHANNEL_OPTIONS)
        return keyexchange_pb2_grpc.KeyExchangeStub(self._kx_channel)

    def dp_stub(self) -> dataplane_pb2_grpc.DataplaneStub:
        if self._dp_channel is None:
            self._dp_channel = grpc.insecure_channel(f"{self.mgmt_ip}:{DP_PORT}", CHANNEL_OPTIONS)
        return dataplane_pb2_grpc.DataplaneStub(self._dp_channel)

    def drops(self) -> dict[str, int]:
        reply = self.dp_stub().GetCounters(dataplane_pb2.GetCountersRequest(), timeout=5)
        return {d.reason: d.packets for d in reply.drops}

    def load(self, name: str, config: dict[str, Any]) -> int:
        return int(
            self.kx_stub()
            .LoadConnection(keyexchange_pb2.LoadConnectionRequest(name=name, config=struct(config)))
            .revision
        )

    def load_pool(self, name: str, config: dict[str, Any]) -> None:
        self.kx_stub().LoadPool(keyexchange_pb2.LoadPoolRequest(name=name, config=struct(config)))

    def sas(self, connection: str = "") -> list[keyexchange_pb2.IkeSaInfo]:
        return list(self.kx_stub().ListSas(keyexchange_pb2.ListSasRequest(connection=connection), timeout=5).ike_sas)

    def established(self, connection: str = "") -> list[keyexchange_pb2.IkeSaInfo]:
        """IKE SAs up whose Child SAs are all installed, in keyexchange AND in the dataplane."""
        sas = [
            sa
            for sa in self.sas(connection)
            if sa.state == "ESTABLISHED" and any(c.state == "INSTALLED" for c in sa.children)
        ]
        if not sas:
            return []
        in_dataplane = self.dataplane_children()
        return [sa for sa in sas if all(c.id in in_dataplane for c in sa.children if c.state == "INSTALLED")]

    def dataplane_children(self) -> set[str]:
        """Child SAs the dataplane has installed (it reports counters for them)."""
        reply = self.dp_stub().GetCounters(dataplane_pb2.GetCountersRequest(), timeout=5)
        return {c.child_sa for c in reply.sas}

    def ping(self, dst: str, count: int = 3, interval: float = 0.2, src: str = "") -> bool:
        r = nsx(
            self.ns,
            "ping",
            "-c",
            str(count),
            "-i",
            str(interval),
            "-W",
            "2",
            "-I",
            src or self.inner_ip,
            dst,
            check=False,
            timeout=30 + count * interval,
        )
        return r.returncode == 0

    def tcp_to(self, other: Site, nbytes: int = 200_000, port: int = 7777) -> bool:
        """Echo `nbytes` over TCP from this site's inner address to `other`'s, through the tunnel."""
        return tcp_echo(self.ns, self.inner_ip, other.ns, other.inner_ip, nbytes, port)

    def store_range(self, prefix: str) -> dict[str, bytes]:
        """Keys under `prefix` in this site's store, read by the test process itself."""

        async def read() -> dict[str, bytes]:
            store = EmbeddedStore(self.store_path)
            await store.connect()
            try:
                kvs, _ = await store.range(prefix)
                return {kv.key[len(prefix) :]: kv.value for kv in kvs}
            finally:
                await store.close()

        return asyncio.run(read())

    def store_put_document(self, key: str, document: dict[str, Any]) -> None:
        """Write a document as the REST API does: `bytes` values sealed under this site's KEK."""

        async def write() -> None:
            store = EmbeddedStore(self.store_path)
            await store.connect()
            try:
                await SealedDocuments(store, Sealer(Keyring.parse(self.kek, "site kek"))).put(key, document)
            finally:
                await store.close()

        asyncio.run(write())

    def logs(self) -> str:
        out = []
        for p in (self.kx_log, self.dp_log):
            with contextlib.suppress(FileNotFoundError):
                out.append(p.read_text(errors="replace"))
        return "\n".join(out)


def link_sites(a: Site, b: Site, dev_a: str = "kxsw0", dev_b: str = "kxsw1") -> None:
    """A veth between two site namespaces carrying their WAN addresses (/24)."""
    sh("ip", "link", "add", dev_a, "netns", a.ns, "type", "veth", "peer", "name", dev_b, "netns", b.ns)
    for site, dev in ((a, dev_a), (b, dev_b)):
        nsx(site.ns, "ip", "addr", "add", f"{site.wan_ip}/24", "dev", dev)
        nsx(site.ns, "ip", "link", "set", dev, "up")


def tcp_echo(client_ns: str, client_ip: str, server_ns: str, server_ip: str, nbytes: int, port: int = 7777) -> bool:
    mod = "tests.keyexchange.service.tcp_echo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-m", mod, "serve", server_ip, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "listening"
        r = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                client_ns,
                sys.executable,
                "-m",
                mod,
                "send",
                server_ip,
                str(port),
                str(nbytes),
                client_ip,
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=False,
        )
        return r.returncode == 0
    finally:
        server.kill()
        server.wait(5)


class EventLog:
    """`KeyExchange.WatchEvents` of a site, collected on a thread."""

    def __init__(self, site: Site) -> None:
        self.events: list[keyexchange_pb2.KeyExchangeEvent] = []
        self._call = site.kx_stub().WatchEvents(keyexchange_pb2.WatchEventsRequest())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for ev in self._call:
                self.events.append(ev)

    def of(self, kind: str) -> list[keyexchange_pb2.KeyExchangeEvent]:
        return [e for e in list(self.events) if e.kind == kind]

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)
