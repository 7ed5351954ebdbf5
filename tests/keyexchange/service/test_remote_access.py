"""Remote access between two Esplanade sites: a client (virtual IP requested via CP) and a
gateway with a pool and split-tunnel subnets. Real processes in netns kxs-rc / kxs-rg."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Iterator

import pytest

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.store import schema
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer
from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import wait_until
from tests.keyexchange.esp_tunnel import EspState
from tests.keyexchange.service.sites import Site, link_sites, nsx

pytestmark = [pytest.mark.netns]

PSK = "remote-access-psk-0123456789abcdef"
SPLIT = "10.96.2.0/24"  # behind the gateway, announced to clients
OTHER = "10.96.3.1"  # also behind the gateway, NOT announced
POOL = "10.96.100.0/28"


@pytest.fixture(scope="module")
def ra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    base = tmp_path_factory.mktemp("ra")
    client = Site("kxs-rc", 14, "198.18.14.1", "10.96.1.1", base / "client")
    gw = Site("kxs-rg", 15, "198.18.14.2", "10.96.2.1", base / "gw")
    try:
        for s in (client, gw):
            s.create_netns()
        link_sites(client, gw, "kxsrc0", "kxsrg0")
        nsx(gw.ns, "ip", "addr", "add", f"{OTHER}/32", "dev", "lo")
        nsx(client.ns, "ip", "route", "add", "10.96.0.0/16", "via", gw.wan_ip)  # the clear path, outside the tunnel
        nsx(gw.ns, "ip", "route", "add", POOL, "dev", "lo")  # replaced below by the dataplane TUN
        nsx(gw.ns, "ip", "route", "del", POOL, "dev", "lo")
        for s in (client, gw):
            s.start_dataplane()
            s.start_keyexchange()
        nsx(gw.ns, "ip", "route", "add", POOL, "dev", "esp0", "src", gw.inner_ip)
        gw.load_pool("clients", {"addrs": POOL, "subnets": [SPLIT], "dns": ["10.96.2.53"]})
        gw.load(
            "rw",
            {
                "local_addrs": [gw.wan_ip],
                "local": {"auth": "psk", "id": "gw.kxs.test"},
                "remote": {"auth": "psk", "id": "client.kxs.test"},
                "psk": PSK,
                "pools": ["clients"],
                "unbound_peers": "negotiated",  # no access policy here: the client is ungoverned
                "encap": True,
                "children": {"net": {"local_ts": SPLIT, "esp_proposals": ["aes256gcm16"]}},
            },
        )
        client.load(
            "vpn",
            {
                "local_addrs": [client.wan_ip],
                "remote_addrs": [gw.wan_ip],
                "local": {"auth": "psk", "id": "client.kxs.test"},
                "remote": {"auth": "psk", "id": "gw.kxs.test"},
                "psk": PSK,
                "vips": ["0.0.0.0"],
                "encap": True,
                "children": {"net": {"remote_ts": "0.0.0.0/0", "esp_proposals": ["aes256gcm16"]}},
            },
        )
        client.kx_stub().Initiate(kx.InitiateRequest(connection="vpn"))
        wait_until(lambda: client.established("vpn") and gw.established("rw"), timeout=20, what="remote access up")
        yield client, gw
    finally:
        for s in (client, gw):
            s.stop()
            s.delete_netns()


def test_client_gets_virtual_ip_and_split_routes_only(ra: tuple[Site, Site]) -> None:
    client, gw = ra
    sa = client.established("vpn")[0]
    assert len(sa.virtual_ips) == 1
    vip = sa.virtual_ips[0]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network(POOL)
    child = sa.children[0]
    assert child.local_ts == [f"{vip}/32"] and child.remote_ts == [SPLIT]
    assert gw.established("rw")[0].virtual_ips == [vip]
    # keyexchange configures the address on its netconfig thread, just after the IKE SA is up
    wait_until(
        lambda: (
            f"{vip}/32" in nsx(client.ns, "ip", "-4", "addr", "show", "dev", "esp0").stdout
            and f"src {vip}" in nsx(client.ns, "ip", "-4", "route", "show", "dev", "esp0").stdout
        ),
        timeout=10,
        what="the virtual IP and its split route on esp0",
    )
    routes = nsx(client.ns, "ip", "-4", "route", "show", "dev", "esp0").stdout
    assert routes.split()[0] == SPLIT and f"src {vip}" in routes and "default" not in routes, routes
    # inside the split: through the tunnel, from the virtual IP
    assert client.ping(gw.inner_ip, src=vip)
    before = client.established("vpn")[0].children[0].packets_out
    # outside the split: the host's own route, never the tunnel
    nsx(client.ns, "ping", "-c", "2", "-i", "0.2", "-W", "1", OTHER, check=False)
    route = nsx(client.ns, "ip", "route", "get", OTHER).stdout
    assert "esp0" not in route
    assert client.established("vpn")[0].children[0].packets_out == before


def test_gateway_drops_traffic_outside_the_negotiated_selectors(ra: tuple[Site, Site]) -> None:
    """A client that encrypts traffic its Child SA does not cover (from an address other than
    its virtual IP) has it dropped by the gateway's dataplane: policy_mismatch."""
    client, gw = ra
    child_id = client.established("vpn")[0].children[0].id
    sealer = Sealer(Keyring.parse(client.kek, "client kek"))

    async def record() -> ChildSaRecord:
        store = EmbeddedStore(client.store_path)
        await store.connect()
        try:
            kv = await store.get(schema.child_sa(child_id))
            assert kv is not None
            return ChildSaRecord.from_document(json.loads(kv.value), sealer.bind(kv.key).open)
        finally:
            await store.close()

    out = asyncio.run(record()).outbound
    state = EspState(out)
    state.seq = 1_000_000  # beyond anything the client sent
    before = gw.drops().get("policy_mismatch", 0)
    forged_src = "10.96.1.1"  # the client's own LAN address, not its virtual IP
    inner = _icmp_echo(forged_src, gw.inner_ip)
    esp = state.encrypt(inner, 4)
    assert out.encap is not None
    sender = (
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f" s.sendto(bytes.fromhex('{esp.hex()}'), ('{out.dst}', {out.encap.dst_port}))"
    )
    nsx(client.ns, "python3", "-c", sender)
    wait_until(lambda: gw.drops().get("policy_mismatch", 0) > before, timeout=5, what="policy_mismatch drop")


def _icmp_echo(src: str, dst: str) -> bytes:
    icmp = bytearray(b"\x08\x00\x00\x00\x12\x34\x00\x01" + b"x" * 32)
    csum = _checksum(bytes(icmp))
    icmp[2:4] = csum.to_bytes(2, "big")
    total = 20 + len(icmp)
    hdr = bytearray(
        b"\x45\x00"
        + total.to_bytes(2, "big")
        + b"\x00\x01\x00\x00\x40\x01\x00\x00"
        + socket.inet_aton(src)
        + socket.inet_aton(dst)
    )
    hdr[10:12] = _checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + bytes(icmp)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
