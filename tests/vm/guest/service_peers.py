"""Peers for the service tests in the VM: Esplanade sites on the kernel backend, strongSwan on
kernel-netlink, and traffic checks (ping, a TCP transfer, `ip xfrm state`).

The sites are `tests.keyexchange.service.sites.Site` (keyexchange + dataplane processes with
an embedded store each, in a network namespace, gRPC through a management veth) with
`backend="kernel"`. Namespaces carry the `kvm-` prefix.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

from esplanade.store import schema
from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import wait_until
from tests.keyexchange import interop as ix
from tests.keyexchange.service.sites import Site, nsx, sh, tcp_echo

TCP_BYTES = 1 << 18
UP_TIMEOUT = 90.0  # IKE in the VM's slow Python: seconds for an IKE SA plus its Child SA


def veth(ns_a: str, dev_a: str, ip_a: str, ns_b: str, dev_b: str, ip_b: str) -> None:
    sh("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
    for ns, dev, ip in ((ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b)):
        nsx(ns, "ip", "addr", "add", ip, "dev", dev)
        nsx(ns, "ip", "link", "set", dev, "up")


def plain_netns(ns: str, inner: str) -> None:
    sh("ip", "netns", "del", ns, check=False)
    sh("ip", "netns", "add", ns)
    nsx(ns, "ip", "link", "set", "lo", "up")
    nsx(ns, "ip", "addr", "add", f"{inner}/32", "dev", "lo")


def ping(ns: str, src: str, dst: str, count: int = 3, interval: float = 0.2) -> bool:
    r = nsx(ns, "ping", "-c", str(count), "-i", str(interval), "-W", "3", "-I", src, dst, check=False, timeout=60)
    return r.returncode == 0


def tcp_transfer(client_ns: str, src: str, server_ns: str, dst: str, nbytes: int = TCP_BYTES) -> int:
    """Echo `nbytes` over TCP from `src` to `dst` and back; fails unless every byte came back intact."""
    assert tcp_echo(client_ns, src, server_ns, dst, nbytes), f"TCP echo {src} -> {dst} failed"
    return nbytes


def xfrm_states(ns: str) -> list[str]:
    """`ip -s xfrm state` of a namespace, one block per SA (larval SPI-0 acquire states left out)."""
    text = nsx(ns, "ip", "-s", "xfrm", "state").stdout
    blocks = [b for b in re.split(r"\n(?=src )", text.strip()) if b.startswith("src ")]
    return [b for b in blocks if not re.search(r"spi 0x0+ ", b)]


def xfrm_spis(ns: str) -> set[int]:
    return {int(m, 16) for b in xfrm_states(ns) for m in re.findall(r"spi (0x[0-9a-f]+)", b)}


def oseq_of(ns: str, spi: int) -> int:
    """The last sequence number the kernel sent under `spi` (`ip -s xfrm state`: oseq)."""
    for block in xfrm_states(ns):
        if f"spi {spi:#010x}" in block:
            m = re.search(r"oseq (0x[0-9a-f]+)", block)
            hi = re.search(r"oseq_hi (0x[0-9a-f]+)|oseq-hi (0x[0-9a-f]+)", block)
            low = int(m.group(1), 16) if m else 0
            high = int(next(g for g in hi.groups() if g), 16) if hi else 0
            return high << 32 | low
    raise AssertionError(f"no SA with spi {spi:#010x} in {ns}")


class Pinger:
    """A background ping; `lost()` after it ends: (lost, sent)."""

    def __init__(self, ns: str, src: str, dst: str, count: int, interval: float = 0.1) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", str(interval), "-W", "2", "-I", src, dst],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def lost(self, timeout: float = 120) -> tuple[int, int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)) - int(m.group(2)), int(m.group(1)), out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


def kernel_site(ns: str, index: int, wan_ip: str, inner_ip: str, base: Path) -> Site:
    return Site(ns, index, wan_ip, inner_ip, base, backend="kernel")


def dataplane_extra_env(**values: str) -> dict[str, str]:
    return {f"ESPLANADE_DATAPLANE__{k.upper()}": v for k, v in values.items()}


def unload_all(site: Site) -> None:
    for c in site.kx_stub().ListConnections(kx.ListConnectionsRequest()).connections:
        site.kx_stub().UnloadConnection(kx.UnloadConnectionRequest(name=c.name))


def wait_clean(site: Site) -> None:
    wait_until(lambda: not site.sas(), timeout=30, what=f"no IKE SAs in {site.ns}")
    wait_until(
        lambda: not site.store_range(schema.prefix("sas", "child")), timeout=30, what=f"no Child SAs in {site.ns}"
    )
    wait_until(lambda: not xfrm_spis(site.ns), timeout=30, what=f"no kernel SAs in {site.ns}")


def charon(base: Path, ns: str) -> ix.Charon:
    return ix.Charon(base, ns=ns, plugins=ix.KERNEL_PLUGINS)


def strongswan_conn(
    *,
    local_ip: str,
    remote_ip: str,
    local_ts: str,
    remote_ts: str,
    local_id: str,
    remote_id: str,
    child: dict[str, Any],
) -> str:
    """One swanctl connection `pair` with child `net`; `child` adds/overrides child settings."""
    settings = {
        "local_ts": local_ts,
        "remote_ts": remote_ts,
        "esp_proposals": "aes256gcm16",
        "mode": "tunnel",
        "rekey_time": "1h",
        "start_action": "none",
        "close_action": "none",
        "dpd_action": "clear",
        **child,
    }
    child_text = "\n".join(f"                {k} = {v}" for k, v in settings.items() if v is not None)
    return f"""
    pair {{
        version = 2
        local_addrs = {local_ip}
        remote_addrs = {remote_ip}
        encap = no
        unique = never
        proposals = aes256gcm16-prfsha256-ecp256
        rekey_time = 4h
        local {{
            auth = psk
            id = {local_id}
        }}
        remote {{
            auth = psk
            id = {remote_id}
        }}
        children {{
            net {{
{child_text}
            }}
        }}
    }}"""


def diagnostics(*namespaces: str, logs: str = "", charon_log: str = "", swanctl: str = "") -> str:
    """What a failure message needs: the kernels' SAs and policies, charon's view, the logs' tails."""
    parts = []
    for ns in namespaces:
        parts.append(f"--- {ns}: ip -s xfrm state ---\n" + nsx(ns, "ip", "-s", "xfrm", "state", check=False).stdout)
        parts.append(f"--- {ns}: ip xfrm policy ---\n" + nsx(ns, "ip", "xfrm", "policy", check=False).stdout)
    if swanctl:
        parts.append("--- swanctl --list-sas ---\n" + swanctl)
    if charon_log:
        parts.append("--- charon log (tail) ---\n" + charon_log[-4000:])
    if logs:
        parts.append("--- Esplanade logs (tail) ---\n" + logs[-8000:])
    return "\n".join(parts)
