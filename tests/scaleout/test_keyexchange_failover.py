"""Two keyexchange instances share IKE SAs through the store; one dies, the other carries on.

A site (netns `scl-kes`) runs the dataplane service and two keyexchange instances (`kxa`,
`kxb`, `keyexchange.share_ike_sas`) on one store; strongSwan 5.9.8 is the peer (`scl-kss`).
The instance that owns the IKE SA (`keyexchange/owners/<id>`) is killed with SIGKILL; once its
lease expires the other takes the IKE SA over from `sas/ike/<id>`, and then Child SA and IKE SA
rekeys started by either side still succeed with strongSwan, with traffic through the tunnel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from esplanade.store import schema
from esplanade.v1 import keyexchange_pb2 as kx
from esplanade.v1 import keyexchange_pb2_grpc
from tests.conditions import wait_until
from tests.keyexchange import interop as ix
from tests.keyexchange.service.sites import REPO, Site, nsx, sh, struct

pytestmark = [pytest.mark.netns, pytest.mark.strongswan]

NS_SS, NS_ES = "scl-kss", "scl-kes"
SITE_INDEX = 57  # management veth kxsm57, 10.203.57.0/30
SS_IP, ES_IP = "198.18.57.1", "198.18.57.2"
SS_INNER, ES_INNER = "10.95.1.1", "10.95.2.1"
SS_NET, ES_NET = "10.95.1.0/24", "10.95.2.0/24"
SS_ID, ES_ID = "ss.scl.test", "es.scl.test"
PSK = "scale-out-strongswan-psk-0123456789"
SECRETS = f"""
    ike-pair {{
        id-a = {SS_ID}
        id-b = {ES_ID}
        secret = "{PSK}"
    }}"""
PORTS = {"kxa": 50161, "kxb": 50162}
LEASE = 2


class SharedSite(Site):
    """A site whose keyexchange runs as two instances sharing IKE SAs."""

    def __init__(self, base: Path) -> None:
        super().__init__(NS_ES, SITE_INDEX, ES_IP, ES_INNER, base)
        self.instances: dict[str, subprocess.Popen[bytes]] = {}
        self.channels: dict[str, grpc.Channel] = {}

    def start_instance(self, name: str) -> None:
        env = self.env(
            ESPLANADE_KEYEXCHANGE__INSTANCE=name,
            ESPLANADE_ENDPOINTS__KEYEXCHANGE=f"0.0.0.0:{PORTS[name]}",
            ESPLANADE_KEYEXCHANGE__SHARE_IKE_SAS="true",
            ESPLANADE_KEYEXCHANGE__LEASE_SECONDS=str(LEASE),
        )
        with open(self.base / f"{name}.log", "ab") as log:
            self.instances[name] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "esplanade.cli.main", "serve", "keyexchange"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        wait_until(lambda: self.serving(name), timeout=30, what=f"keyexchange {name} serving")

    def serving(self, name: str) -> bool:
        proc = self.instances[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} died: {(self.base / f'{name}.log').read_text(errors='replace')[-3000:]}")
        try:
            self.stub(name).ListSas(kx.ListSasRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return True

    def stub(self, name: str) -> keyexchange_pb2_grpc.KeyExchangeStub:
        if name not in self.channels:
            self.channels[name] = grpc.insecure_channel(f"{self.mgmt_ip}:{PORTS[name]}")
        return keyexchange_pb2_grpc.KeyExchangeStub(self.channels[name])

    def kill(self, name: str) -> None:
        proc = self.instances.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def owners(self) -> dict[str, str]:
        records = self.store_range(schema.prefix("keyexchange", "owners"))
        return {ike: json.loads(value)["instance"] for ike, value in records.items()}

    def established_on(self, name: str) -> list[kx.IkeSaInfo]:
        sas = self.stub(name).ListSas(kx.ListSasRequest(connection="pair"), timeout=5).ike_sas
        up = [sa for sa in sas if sa.state == "ESTABLISHED" and any(c.state == "INSTALLED" for c in sa.children)]
        in_dataplane = self.dataplane_children()
        return [sa for sa in up if all(c.id in in_dataplane for c in sa.children if c.state == "INSTALLED")]

    def stop(self) -> None:
        for proc in self.instances.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.instances.clear()
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        super().stop()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[ix.Charon, SharedSite]]:
    es = SharedSite(tmp_path / "es")
    sh("ip", "netns", "del", NS_SS, check=False)
    es.create_netns()
    sh("ip", "netns", "add", NS_SS)
    nsx(NS_SS, "ip", "link", "set", "lo", "up")
    nsx(NS_SS, "ip", "addr", "add", f"{SS_INNER}/32", "dev", "lo")
    sh("ip", "link", "add", "sclss0", "netns", NS_SS, "type", "veth", "peer", "name", "scles0", "netns", es.ns)
    nsx(NS_SS, "ip", "addr", "add", f"{SS_IP}/24", "dev", "sclss0")
    nsx(es.ns, "ip", "addr", "add", f"{ES_IP}/24", "dev", "scles0")
    nsx(NS_SS, "ip", "link", "set", "sclss0", "up")
    nsx(es.ns, "ip", "link", "set", "scles0", "up")
    charon = ix.Charon(tmp_path / "charon", ns=NS_SS)
    try:
        charon.start(log_level=1)
        es.start_dataplane()
        nsx(es.ns, "ip", "route", "add", SS_NET, "dev", "esp0", "src", ES_INNER)
        es.start_instance("kxa")
        es.start_instance("kxb")
        yield charon, es
    finally:
        es.stop()
        charon.stop()
        sh("ip", "netns", "del", NS_SS, check=False)
        es.delete_netns()


def ping(count: int = 3) -> bool:
    r = nsx(NS_ES, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-I", ES_INNER, SS_INNER, check=False, timeout=30)
    return r.returncode == 0


@pytest.mark.parametrize("initiator", ["strongswan", "esplanade"])
def test_ike_sas_survive_the_death_of_their_keyexchange_instance(
    sites: tuple[ix.Charon, SharedSite], initiator: str
) -> None:
    charon, es = sites
    ss = ix.ss_conn(
        remote_id=ES_ID,
        local_id=SS_ID,
        local_ip=SS_IP,
        remote_ip=ES_IP,
        local_ts=SS_NET,
        remote_ts=ES_NET,
        extra="dpd_delay = 2s",
    )
    charon.load(ss, SECRETS)
    conn = {
        "local_addrs": [ES_IP],
        "remote_addrs": [SS_IP],
        "local": {"auth": "psk", "id": ES_ID},
        "remote": {"auth": "psk", "id": SS_ID},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "dpd_delay": 2,
        "children": {"net": {"local_ts": ES_NET, "remote_ts": SS_NET, "esp_proposals": ["aes256gcm16"]}},
    }
    es.stub("kxa").LoadConnection(kx.LoadConnectionRequest(name="pair", config=struct(conn)))
    wait_until(
        lambda: all(
            any(c.name == "pair" for c in es.stub(n).ListConnections(kx.ListConnectionsRequest()).connections)
            for n in PORTS
        ),
        timeout=10,
        what="both instances loaded the connection",
    )
    if initiator == "strongswan":
        charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "15")
    else:

        def initiated() -> bool:  # kxb applies the connection from its store watch
            try:
                es.stub("kxb").Initiate(kx.InitiateRequest(connection="pair"), timeout=5)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            return True

        wait_until(initiated, timeout=10, what="kxb initiates")
    owners = wait_until(lambda: es.owners() or None, timeout=20, what="an owner record")
    ((ike_id, owner),) = owners.items()
    survivor = next(n for n in PORTS if n != owner)
    wait_until(lambda: es.established_on(owner), timeout=20, what="IKE SA up at its owner")
    assert ping()
    persisted = es.store_range(schema.prefix("sas", "ike"))
    assert ike_id in persisted and b"sk_ei" in persisted[ike_id]
    assert all(len(v) > 0 for v in persisted.values())

    es.kill(owner)
    wait_until(lambda: es.owners().get(ike_id) == survivor, timeout=LEASE + 10, what="the survivor took over")
    sa = wait_until(lambda: es.established_on(survivor), timeout=10, what="IKE SA listed by the survivor")[0]
    assert sa.id == ike_id
    assert ping()

    for who, what in (("es", "child"), ("ss", "child"), ("es", "ike"), ("ss", "ike")):
        before = es.established_on(survivor)[0]
        if who == "es":
            request = (
                kx.RekeyRequest(child_sa=before.children[0].id)
                if what == "child"
                else kx.RekeyRequest(ike_sa=before.id)
            )
            es.stub(survivor).Rekey(request)
        else:
            charon.swanctl("--rekey", "--child" if what == "child" else "--ike", "net" if what == "child" else "pair")

        def changed(before: kx.IkeSaInfo = before, what: str = what) -> bool:
            now = es.established_on(survivor)
            if len(now) != 1 or len(now[0].children) != 1:
                return False
            return now[0].id != before.id if what == "ike" else now[0].children[0].id != before.children[0].id

        wait_until(changed, timeout=15, what=f"{what} rekey started by {who} after the takeover")
        assert ping(), f"no traffic after the {what} rekey by {who}"
    assert charon.sa_count() == 1
    final = es.established_on(survivor)[0]
    assert es.owners() == {final.id: survivor}
