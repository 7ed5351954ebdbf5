"""strongSwan 5.9.8 (charon + kernel-libipsec) in netns ikec-a, Esplanade in netns ikec-b.

Modelled on /work/shared/reference/strongswan-pair/run-pair.sh: explicit plugin list with
`kdf`, /run bind-mounted per charon (hardcoded pid file), NAT-T forced by libipsec.
The Esplanade side runs in this process: an asyncio loop in a thread that setns()'d into
ikec-b, with the UDP shell, a TUN device and the test ESP tunnel.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    Event,
    InstallInboundSa,
)
from esplanade.keyexchange.shell.udp import IkeUdpShell
from tests.conditions import wait_until
from tests.keyexchange.esp_tunnel import EspTunnel, open_tun
from tests.loop_thread import finish_loop_thread

NS_SS, NS_ES = "ikec-a", "ikec-b"
SS_IP, ES_IP = "198.18.0.1", "198.18.0.2"
SS_INNER, ES_INNER = "10.91.1.1", "10.91.2.1"
SS_NET, ES_NET = "10.91.1.0/24", "10.91.2.0/24"
SS_ID, ES_ID = "a.ipsec.test", "b.ipsec.test"
PSK = "interop-test-psk-0123456789abcdef"
CHARON = "/usr/lib/ipsec/charon"
PLUGINS = (
    "random nonce drbg openssl aes sha1 sha2 hmac kdf gcm chapoly curve25519 pem pkcs1 pkcs8 x509 revocation "
    "constraints pubkey kernel-libipsec kernel-netlink socket-default vici updown"
)
# charon on the kernel's XFRM (a kernel with ESP, e.g. in the VM): no kernel-libipsec, so no
# forced NAT-T, and ESN, transport mode, plain ESP and AH all work
KERNEL_PLUGINS = PLUGINS.replace("kernel-libipsec ", "")
SWANCTL_PLUGINS = "random nonce openssl pem pkcs1 pkcs8 x509 pubkey revocation constraints"
CLONE_NEWNET = 0x40000000


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def nsx(ns: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)


def setns(name: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
    finally:
        os.close(fd)


def make_netns() -> None:
    teardown_netns()
    sh("ip", "netns", "add", NS_SS)
    sh("ip", "netns", "add", NS_ES)
    sh("ip", "link", "add", "ikeca0", "netns", NS_SS, "type", "veth", "peer", "name", "ikecb0", "netns", NS_ES)
    sh("ip", "-n", NS_SS, "addr", "add", f"{SS_IP}/24", "dev", "ikeca0")
    sh("ip", "-n", NS_ES, "addr", "add", f"{ES_IP}/24", "dev", "ikecb0")
    sh("ip", "-n", NS_SS, "addr", "add", f"{SS_INNER}/32", "dev", "lo")
    sh("ip", "-n", NS_ES, "addr", "add", f"{ES_INNER}/32", "dev", "lo")
    for ns, dev in ((NS_SS, "ikeca0"), (NS_ES, "ikecb0")):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", dev, "up")


def teardown_netns() -> None:
    for ns in (NS_SS, NS_ES):
        sh("ip", "netns", "del", ns, check=False)


class Charon:
    """One charon in NS_SS, configured through files + swanctl."""

    def __init__(self, base: Path, ns: str = NS_SS, plugins: str = PLUGINS) -> None:
        self.base = base
        self.ns = ns
        self.plugins = plugins
        self.proc: subprocess.Popen[bytes] | None = None
        for d in ("run", "x509", "x509ca", "x509crl", "private", "pubkey", "rsa", "ecdsa", "pkcs8"):
            (base / d).mkdir(parents=True, exist_ok=True)
        self.vici = base / "charon.vici"
        self.log = base / "charon.log"
        self.conf = base / "strongswan.conf"
        self.swanctl_conf = base / "swanctl.conf"

    def write_strongswan_conf(self, extra: str = "", log_level: int = 4) -> None:
        self.conf.write_text(f"""
charon {{
    load_modular = no
    load = {self.plugins}
    port = 500
    port_nat_t = 4500
    install_routes = yes
    reuse_ikesa = no
    {extra}
    plugins {{
        kernel-libipsec {{
            allow_peer_ts = no
        }}
        vici {{
            socket = unix://{self.vici}
        }}
    }}
    filelog {{
        main {{
            path = {self.log}
            append = yes
            flush_line = yes
            time_format = %H:%M:%S
            ike_name = yes
            default = 1
            ike = {log_level}
            chd = {log_level}
            cfg = {min(log_level, 2)}
            net = {min(log_level, 2)}
            enc = {min(log_level, 1)}
            knl = {min(log_level, 1)}
        }}
    }}
    syslog {{
        daemon {{
            default = -1
        }}
    }}
}}
swanctl {{
    load = {SWANCTL_PLUGINS}
    socket = unix://{self.vici}
}}
""")

    def start(self, extra: str = "", log_level: int = 4) -> None:
        self.write_strongswan_conf(extra, log_level)
        self.log.write_text("")
        cmd = f"mount --bind '{self.base}/run' /run && exec env STRONGSWAN_CONF='{self.conf}' {CHARON}"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "sh", "-c", cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.vici.exists, timeout=15, what="charon VICI socket")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.vici.exists():
            self.vici.unlink()

    def swanctl(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        env = {**os.environ, "STRONGSWAN_CONF": str(self.conf)}
        cmd = ["swanctl", args[0], "--uri", f"unix://{self.vici}", *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"swanctl {' '.join(args)} failed: {r.stdout}\n{r.stderr}")
        return r.stdout + r.stderr

    def load(self, conn: str, secrets: str = "") -> None:
        self.swanctl_conf.write_text(f"connections {{\n{conn}\n}}\nsecrets {{\n{secrets}\n}}\n")
        self.swanctl("--load-all", "--clear", "--file", str(self.swanctl_conf))

    def clear_sas(self) -> None:
        for _ in range(10):
            if "pair:" not in self.swanctl("--list-sas", check=False):
                return
            self.swanctl("--terminate", "--ike", "pair", "--force", "--timeout", "2", check=False)

    def sa_count(self) -> int:
        return self.swanctl("--list-sas", check=False).count("ESTABLISHED")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def ss_conn(
    proposals: str = "aes256gcm16-prfsha256-ecp256",
    esp: str = "aes256gcm16",
    auth: str = "psk",
    cert: str = "",
    extra_child: str = "",
    extra: str = "",
    remote_id: str = ES_ID,
    local_id: str = SS_ID,
    local_ip: str = SS_IP,
    remote_ip: str = ES_IP,
    local_ts: str = SS_NET,
    remote_ts: str = ES_NET,
) -> str:
    local_auth = f"auth = {auth}\n            id = {local_id}"
    if cert:
        local_auth += f"\n            certs = {cert}"
    return f"""
    pair {{
        version = 2
        local_addrs = {local_ip}
        remote_addrs = {remote_ip}
        encap = yes
        unique = never
        proposals = {proposals}
        rekey_time = 4h
        {extra}
        local {{
            {local_auth}
        }}
        remote {{
            auth = {auth}
            id = {remote_id}
        }}
        children {{
            net {{
                local_ts = {local_ts}
                remote_ts = {remote_ts}
                esp_proposals = {esp}
                mode = tunnel
                rekey_time = 1h
                start_action = none
                close_action = none
                dpd_action = clear
                {extra_child}
            }}
        }}
    }}"""


PSK_SECRETS = f"""
    ike-pair {{
        id-a = {SS_ID}
        id-b = {ES_ID}
        secret = "{PSK}"
    }}"""


def es_conn(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "local_addrs": [ES_IP],
        "remote_addrs": [SS_IP],
        "local": {"auth": "psk", "id": ES_ID},
        "remote": {"auth": "psk", "id": SS_ID},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": ES_NET, "remote_ts": SS_NET, "esp_proposals": ["aes256gcm16"]}},
    }
    for k, v in over.items():
        if k.startswith("child_"):
            d["children"]["net"][k[6:]] = v
        elif k in ("local", "remote"):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


class EsplanadePeer:
    """Esplanade in NS_ES: dispatcher + UDP shell + TUN + test ESP tunnel, on its own loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.events: list[Event] = []
        self.engine: IkeDispatcher | None = None
        self.shell: IkeUdpShell | None = None
        self.tunnel: EspTunnel | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._thread, daemon=True)
        self.thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error

    def _thread(self) -> None:
        try:
            setns(NS_ES)
            self.tun_fd = open_tun("esp0")
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        self.loop.run_forever()

    def run(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        async def wrap() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def configure(self, configs: list[ConnectionConfig], **kw: Any) -> None:
        """(Re)start the engine and shell with these connections."""

        async def go() -> None:
            if self.shell is not None:
                self.shell.close()
                self.loop.remove_reader(self.tun_fd)
            self.events.clear()
            self.engine = IkeDispatcher(configs, now=time.monotonic(), **kw)
            self.shell = IkeUdpShell(self.engine, ES_IP, on_event=self._on_event)
            self.tunnel = EspTunnel(self.tun_fd, self.shell.send_esp)
            self.shell.on_esp = self.tunnel.on_esp
            self.loop.add_reader(self.tun_fd, self.tunnel.on_tun_readable)
            await self.shell.start()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def _on_event(self, ev: Event) -> None:
        self.events.append(ev)
        assert self.tunnel is not None and self.shell is not None and self.engine is not None
        if isinstance(ev, InstallInboundSa):
            self.tunnel.install_inbound(ev.sa, ev.child_id)
            eng = self.engine
            self.loop.call_soon(lambda: self.shell.call(eng.inbound_sa_installed, ev.ike_sa, ev.child_id))  # type: ignore[union-attr]
        elif isinstance(ev, ChildSaEstablished | ChildSaRekeyed):
            cid = ev.child_id if isinstance(ev, ChildSaEstablished) else ev.new_child_id
            if ev.record.inbound.spi not in self.tunnel.inbound:
                self.tunnel.install_inbound(ev.record.inbound, cid)
            self.tunnel.install_outbound(ev.record.outbound, cid)
        elif isinstance(ev, ChildSaDeleted):
            self.tunnel.remove_child(ev.child_id)

    def call(self, name: str, *args: Any) -> Any:
        assert self.engine is not None and self.shell is not None
        fn = getattr(self.engine, name)
        return self.run(lambda: self.shell.call(fn, *args))  # type: ignore[union-attr]

    def of(self, cls: type) -> list[Any]:
        return [e for e in list(self.events) if isinstance(e, cls)]

    def close(self) -> None:
        def close_shell() -> None:
            if self.shell is not None:
                self.shell.close()

        finish_loop_thread(self.loop, self.thread, last=close_shell, timeout=5)
        os.close(self.tun_fd)


_DUMP_HEAD = re.compile(r"\] <[^>]*> (?P<label>[A-Za-z_ ]+?) (?:=> )?(?P<n>\d+) bytes @ 0x[0-9a-f]+")
_DUMP_HEAD2 = re.compile(r"\] (?:<[^>]*> )?(?P<label>[A-Za-z_ ]+?) => (?P<n>\d+) bytes @ 0x[0-9a-f]+")
_DUMP_LINE = re.compile(r"\] (?:<[^>]*> )?\s*\d+: ((?:[0-9A-F]{2} ){1,16})")


def parse_key_dumps(log: str) -> list[tuple[str, bytes]]:
    """Every `label => N bytes @ 0x..` chunk dump in a charon log, in order."""
    out: list[tuple[str, bytes]] = []
    lines = log.splitlines()
    i = 0
    while i < len(lines):
        m = _DUMP_HEAD2.search(lines[i])
        if not m:
            i += 1
            continue
        label, n = m.group("label").strip(), int(m.group("n"))
        data = bytearray()
        i += 1
        while i < len(lines) and len(data) < n:
            d = _DUMP_LINE.search(lines[i])
            if not d:
                break
            data += bytes.fromhex(d.group(1).replace(" ", ""))
            i += 1
        out.append((label, bytes(data[:n])))
    return out


def have_strongswan() -> bool:
    return os.path.exists(CHARON) and shutil.which("swanctl") is not None
