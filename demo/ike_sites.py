"""IKEv2 between Esplanade sites, and with a strongSwan peer, through the keyexchange service.

    python -m demo.ike_sites          # builds it, negotiates, pings, prints SAs and counters

Three namespaces on one WAN segment (a bridge in kxd-wan, 198.18.20.0/24):

    kxd-1  Esplanade site 1   (keyexchange + dataplane processes, embedded store)  10.98.1.0/24
    kxd-2  Esplanade site 2   (the same)                                            10.98.2.0/24
    kxd-ss strongSwan 5.9.8   (charon + kernel-libipsec)                            10.98.3.0/24

Site 1 negotiates with site 2 (ECDSA certificates) and with strongSwan (PSK), each over IKEv2
through the service's gRPC API (LoadConnection, Initiate); the demo then shows `ListSas`
(states, SPIs, proposals, selectors), a ping across each tunnel and the per-Child-SA
counters the dataplane reports. `run_scenario()` is the reusable part: `make demo` calls it.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import wait_until
from tests.keyexchange import interop as ix
from tests.keyexchange import pki
from tests.keyexchange.service.sites import Site, nsx, sh

WAN = "kxd-wan"
SS_NS = "kxd-ss"
SS_WAN, SS_INNER, SS_NET = "198.18.20.3", "10.98.3.1", "10.98.3.0/24"
PSK = "demo-strongswan-psk-0123456789abcdef"

Say = Callable[[str], None]


def _wan_port(ns: str, ip: str, index: int) -> None:
    outside, inside = f"kxdw{index}", f"wan{index}"
    sh("ip", "link", "add", outside, "netns", WAN, "type", "veth", "peer", "name", inside, "netns", ns)
    nsx(WAN, "ip", "link", "set", outside, "master", "br0")
    nsx(WAN, "ip", "link", "set", outside, "up")
    nsx(ns, "ip", "addr", "add", f"{ip}/24", "dev", inside)
    nsx(ns, "ip", "link", "set", inside, "up")


@contextlib.contextmanager
def topology(base: Path) -> Iterator[tuple[Site, Site, ix.Charon]]:
    s1 = Site("kxd-1", 21, "198.18.20.1", "10.98.1.1", base / "site1")
    s2 = Site("kxd-2", 22, "198.18.20.2", "10.98.2.1", base / "site2")
    charon = ix.Charon(base / "strongswan", ns=SS_NS)
    for ns in (WAN, SS_NS):
        sh("ip", "netns", "del", ns, check=False)
    try:
        sh("ip", "netns", "add", WAN)
        nsx(WAN, "ip", "link", "add", "br0", "type", "bridge")
        nsx(WAN, "ip", "link", "set", "br0", "up")
        for s in (s1, s2):
            s.create_netns()
        sh("ip", "netns", "add", SS_NS)
        nsx(SS_NS, "ip", "link", "set", "lo", "up")
        nsx(SS_NS, "ip", "addr", "add", f"{SS_INNER}/32", "dev", "lo")
        _wan_port(s1.ns, s1.wan_ip, 1)
        _wan_port(s2.ns, s2.wan_ip, 2)
        _wan_port(SS_NS, SS_WAN, 3)
        for s in (s1, s2):
            s.start_dataplane()
            s.start_keyexchange()
        nsx(s1.ns, "ip", "route", "add", "10.98.2.0/24", "dev", "esp0", "src", s1.inner_ip)
        nsx(s1.ns, "ip", "route", "add", SS_NET, "dev", "esp0", "src", s1.inner_ip)
        nsx(s2.ns, "ip", "route", "add", "10.98.1.0/24", "dev", "esp0", "src", s2.inner_ip)
        charon.start(log_level=1)
        yield s1, s2, charon
    finally:
        charon.stop()
        for s in (s1, s2):
            s.stop()
            s.delete_netns()
        for ns in (WAN, SS_NS):
            sh("ip", "netns", "del", ns, check=False)


def _show_sas(say: Say, site: Site) -> None:
    for sa in site.sas():
        role = "initiator" if sa.initiator else "responder"
        say(
            f"  {site.ns} {sa.connection}: IKE {sa.state} {role} {sa.local_addr}[{sa.local_id}]..."
            f"{sa.remote_addr}[{sa.remote_id}] SPIs {sa.spi_i}_i {sa.spi_r}_r {sa.encr}/{sa.prf}/{sa.ke}"
            + (" NAT-T" if sa.nat_local or sa.nat_remote else "")
        )
        for c in sa.children:
            say(
                f"    child {c.name}: {c.state} {c.mode} SPIs {c.spi_in:08x}_i {c.spi_out:08x}_o {c.encr}"
                f" {','.join(c.local_ts)} === {','.join(c.remote_ts)}"
                f"  in {c.bytes_in} B/{c.packets_in} pkts, out {c.bytes_out} B/{c.packets_out} pkts"
            )


def run_scenario(say: Say = print) -> bool:
    """Bring it all up, show it, tear it down. True if every tunnel carried a ping."""
    ok = True
    with tempfile.TemporaryDirectory(prefix="kxd-") as tmp, topology(Path(tmp)) as (s1, s2, charon):
        say("== two Esplanade sites, ECDSA certificates")
        ca = pki.make_ca("ecdsa")
        certs = {s.ns: pki.issue(ca, f"{s.ns}.demo.test") for s in (s1, s2)}
        for me, peer, ln, rn in ((s1, s2, "10.98.1.0/24", "10.98.2.0/24"), (s2, s1, "10.98.2.0/24", "10.98.1.0/24")):
            mine = certs[me.ns]
            me.load(
                "sites",
                {
                    "local_addrs": [me.wan_ip],
                    "remote_addrs": [peer.wan_ip],
                    "local": {
                        "auth": "pubkey",
                        "id": f"{me.ns}.demo.test",
                        "certs": [mine.cert_pem().decode()],
                        "private_key": mine.key_pem().decode(),
                    },
                    "remote": {"auth": "pubkey", "id": f"{peer.ns}.demo.test"},
                    "cacerts": [ca.cert_pem().decode()],
                    "encap": True,
                    "children": {"lan": {"local_ts": ln, "remote_ts": rn}},
                },
            )
        s1.kx_stub().Initiate(kx.InitiateRequest(connection="sites"))
        wait_until(lambda: s1.established("sites") and s2.established("sites"), timeout=20, what="site-to-site SAs")
        ok &= s1.ping(s2.inner_ip, count=3) and s2.ping(s1.inner_ip, count=3)
        say(f"  ping site1 <-> site2: {'ok' if ok else 'FAILED'}")

        say("== Esplanade site 1 and strongSwan 5.9.8, PSK")
        charon.load(
            ix.ss_conn(
                local_id="ss.demo.test",
                remote_id="kxd-1.demo.test",
                local_ip=SS_WAN,
                remote_ip=s1.wan_ip,
                local_ts=SS_NET,
                remote_ts="10.98.1.0/24",
            ),
            f'ike-demo {{\n id-a = ss.demo.test\n id-b = kxd-1.demo.test\n secret = "{PSK}"\n}}',
        )
        s1.load(
            "strongswan",
            {
                "local_addrs": [s1.wan_ip],
                "remote_addrs": [SS_WAN],
                "local": {"auth": "psk", "id": "kxd-1.demo.test"},
                "remote": {"auth": "psk", "id": "ss.demo.test"},
                "psk": PSK,
                "children": {"lan": {"local_ts": "10.98.1.0/24", "remote_ts": SS_NET}},
            },
        )
        s1.kx_stub().Initiate(kx.InitiateRequest(connection="strongswan"))
        wait_until(lambda: s1.established("strongswan"), timeout=20, what="SA with strongSwan")
        pinged = (
            s1.ping(SS_INNER, count=3)
            and nsx(SS_NS, "ping", "-c", "3", "-i", "0.2", "-I", SS_INNER, s1.inner_ip, check=False).returncode == 0
        )
        ok &= pinged
        say(f"  ping site1 <-> strongSwan: {'ok' if pinged else 'FAILED'}")

        say("== ListSas (keyexchange gRPC), counters from the dataplane")
        wait_until(lambda: all(c.packets_in for sa in s1.sas() for c in sa.children), timeout=5, what="counters")
        for s in (s1, s2):
            _show_sas(say, s)
        say("== strongSwan's view (swanctl --list-sas)")
        for line in charon.swanctl("--list-sas").splitlines():
            say(f"  {line}")
    return ok


def main() -> int:
    return 0 if run_scenario() else 1


if __name__ == "__main__":
    sys.exit(main())
