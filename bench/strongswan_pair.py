"""strongSwan 5.9.8 (charon + kernel-libipsec) on two test-bed nodes, keyed by itself, as the peer to beat.

Follows /work/shared/reference/strongswan-pair/run-pair.sh: explicit plugin list (kdf is
required), a private /run per charon (it hardcodes /run/charon.pid), VICI socket in the work
directory, PSK auth, strict proposals. kernel-libipsec does ESP in userspace through its TUN
`ipsec0` and always encapsulates in UDP/4500.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conditions import wait_until
from tests.netns_topology import Node

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = (
    "random nonce drbg openssl aes sha1 sha2 hmac kdf gcm chapoly curve25519 pem pkcs1 pkcs8 x509 revocation "
    "constraints pubkey kernel-libipsec kernel-netlink socket-default vici updown"
)
SWANCTL_PLUGINS = "random nonce openssl pem pkcs1 pkcs8 x509 pubkey revocation constraints"
PSK = "bench-psk-0123456789abcdef-not-a-secret"


class StrongSwanPair:
    def __init__(self, a: Node, b: Node, workdir: Path, esp_proposal: str) -> None:
        self.nodes = (a, b)
        self.workdir = workdir
        self.esp_proposal = esp_proposal
        self.charon_pids: dict[str, int] = {}

    def _dir(self, node: Node) -> Path:
        return self.workdir / f"ss-{node.name}"

    def _write(self, node: Node, peer: Node) -> None:
        base = self._dir(node)
        (base / "run").mkdir(parents=True, exist_ok=True)
        for sub in ("x509", "x509ca", "private"):
            (base / sub).mkdir(exist_ok=True)
        (base / "strongswan.conf").write_text(
            f"""charon {{
    load_modular = no
    load = {PLUGINS}
    port = 500
    port_nat_t = 4500
    install_routes = yes
    plugins {{
        vici {{
            socket = unix://{base}/charon.vici
        }}
    }}
    filelog {{
        main {{
            path = {base}/charon.log
            default = 1
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
    socket = unix://{base}/charon.vici
}}
"""
        )
        (base / "swanctl.conf").write_text(
            f"""connections {{
    bench {{
        version = 2
        local_addrs = {node.underlay_addr}
        remote_addrs = {peer.underlay_addr}
        encap = yes
        proposals = aes256gcm16-prfsha256-ecp256
        local {{
            auth = psk
            id = {node.name}
        }}
        remote {{
            auth = psk
            id = {peer.name}
        }}
        children {{
            net {{
                local_ts = {node.site_net}
                remote_ts = {peer.site_net}
                esp_proposals = {self.esp_proposal}
                mode = tunnel
                start_action = none
            }}
        }}
    }}
}}
secrets {{
    ike-bench {{
        id-a = {node.name}
        id-b = {peer.name}
        secret = "{PSK}"
    }}
}}
"""
        )

    def _swanctl(self, node: Node, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        base = self._dir(node)
        env = {**os.environ, "STRONGSWAN_CONF": str(base / "strongswan.conf")}
        return subprocess.run(
            ["swanctl", command, "--uri", f"unix://{base}/charon.vici", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    def start(self) -> None:
        a, b = self.nodes
        for node, peer in ((a, b), (b, a)):
            self._write(node, peer)
            base = self._dir(node)
            proc = node.popen(
                [
                    "sh",
                    "-c",
                    f"mount --bind '{base}/run' /run && exec env STRONGSWAN_CONF='{base}/strongswan.conf' {CHARON}",
                ],
                stdout=(base / "charon.stdout").open("w"),
                stderr=subprocess.STDOUT,
            )
            self.charon_pids[node.name] = proc.pid
            vici = base / "charon.vici"
            wait_until(vici.exists, timeout=15, what=f"charon in {node.name}")
            loaded = self._swanctl(node, "--load-all", "--file", str(base / "swanctl.conf"))
            if loaded.returncode != 0:
                raise RuntimeError(f"swanctl --load-all failed: {loaded.stdout} {loaded.stderr}")
        up = self._swanctl(a, "--initiate", "--ike", "bench", "--child", "net", "--timeout", "15")
        if up.returncode != 0:
            raise RuntimeError(f"strongSwan did not establish: {up.stdout[-2000:]} {up.stderr[-2000:]}")
        wait_until(
            lambda: a.run(["ping", "-c1", "-W1", "-I", a.site_addr, b.site_addr]).returncode == 0,
            timeout=15,
            what="ping through strongSwan",
        )

    def counters(self, node: Node) -> str:
        return self._swanctl(node, "--list-sas", "--raw").stdout
