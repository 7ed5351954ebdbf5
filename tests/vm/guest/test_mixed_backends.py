"""Mixed backends: an Esplanade site on the kernel backend and one on the userspace backend.

Two sites in two namespaces inside the VM, each with its own keyexchange + dataplane
processes and embedded store: `mix-k` with `dataplane.backend=kernel` (Linux XFRM, real
kernel ESP) and `mix-u` with the userspace backend (TUN `esp0`, UDP 4500 and a raw socket
for protocol 50). IKEv2 (PSK) between them, then ping and TCP both ways, over ESP-in-UDP
(RFC 3948) and over plain ESP (IP protocol 50).

"The same ESP wire format" is proven on the wire: packets captured on the kernel site's
WAN link are parsed as RFC 4303 ESP and opened with the keys the kernel holds (`ip xfrm
state`) by an AES-GCM of their own (RFC 4106: salt || IV nonce, SPI || sequence AAD):
each side's packets carry the SPI the other side chose, consecutive sequence numbers,
a fresh IV, the monotonic 1, 2, 3... padding to a 4-byte boundary, next header 4 (IPv4)
and the inner ICMP packet. The two dataplanes' per-SA packet counters agree, and neither
counted an ICV, replay or malformed drop.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from esplanade.store import schema
from esplanade.v1 import dataplane_pb2 as dp
from esplanade.v1 import ipsec_pb2
from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import ConditionTimeout, wait_until
from tests.keyexchange.service.sites import Site, link_sites, nsx
from tests.vm.guest.service_peers import UP_TIMEOUT, diagnostics, kernel_site, unload_all, xfrm_spis, xfrm_states

pytestmark = [pytest.mark.vm]

NS_K, NS_U = "mix-k", "mix-u"
K_IP, U_IP = "198.18.31.1", "198.18.31.2"
K_INNER, U_INNER = "10.96.1.1", "10.96.2.1"
K_NET, U_NET = "10.96.1.0/24", "10.96.2.0/24"
WAN_K, WAN_U = "mixw0", "mixw1"  # the veth between the sites: WAN_K in mix-k, WAN_U in mix-u
PSK = "mixed-backends-psk-0123456789abcdef"
TCP_BYTES = 1 << 16  # echoed back: each transfer crosses the tunnel both ways
PINGS = 4
POLL = 0.3
ESP_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
GCM_ICV, GCM_IV = 16, 8


@dataclass
class Pair:
    k: Site  # kernel backend
    u: Site  # userspace backend


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("mixed")
    k = kernel_site(NS_K, 31, K_IP, K_INNER, base / "k")
    u = Site(NS_U, 32, U_IP, U_INNER, base / "u", backend="userspace")
    started = time.monotonic()
    try:
        for s in (k, u):
            s.create_netns()
        link_sites(k, u, WAN_K, WAN_U)
        # the kernel site: a gateway's default route, the XFRM policies pick what is tunnelled;
        # the userspace site: the peer's network routed into the TUN
        nsx(NS_K, "ip", "route", "add", "default", "via", U_IP)
        # all four services start at once: their imports alone take tens of seconds in the VM
        for s in (k, u):
            s.start_dataplane(wait=False)
            s.start_keyexchange(wait=False)
        for s in (k, u):
            s.wait_dataplane()
            s.wait_keyexchange()
        nsx(NS_U, "ip", "route", "add", K_NET, "dev", "esp0", "src", U_INNER)
        print(f"[vm] kernel and userspace sites up in {time.monotonic() - started:.1f}s")
        yield Pair(k, u)
    finally:
        for s in (k, u):
            s.stop()
            s.delete_netns()


def conn(me: Site, peer: Site, local_net: str, remote_net: str, encap: bool) -> dict[str, Any]:
    return {
        "local_addrs": [me.wan_ip],
        "remote_addrs": [peer.wan_ip],
        "local": {"auth": "psk", "id": f"{me.ns}.test"},
        "remote": {"auth": "psk", "id": f"{peer.ns}.test"},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "encap": encap,
        "children": {"net": {"local_ts": local_net, "remote_ts": remote_net, "esp_proposals": ["aes256gcm16"]}},
    }


def explain(p: Pair) -> str:
    return diagnostics(NS_K, logs=p.k.logs()[-4000:] + "\n" + p.u.logs()[-4000:])


def expect(p: Pair, predicate: Any, what: str, timeout: float = 60) -> Any:
    try:
        return wait_until(predicate, timeout=timeout, interval=POLL, what=what)
    except ConditionTimeout as exc:
        raise AssertionError(f"{exc}\n{explain(p)}") from None


def reset_and_up(p: Pair, encap: bool, initiator: Site) -> kx.ChildSaInfo:
    for s in (p.k, p.u):
        unload_all(s)
    for s in (p.k, p.u):
        expect(p, lambda s=s: not s.sas(), f"no IKE SAs in {s.ns}", timeout=30)
        expect(p, lambda s=s: not s.store_range(schema.prefix("sas", "child")), f"no Child SAs in {s.ns}", timeout=30)
    expect(p, lambda: not xfrm_spis(NS_K), "no kernel SAs left", timeout=30)
    p.k.load("mix", conn(p.k, p.u, K_NET, U_NET, encap))
    p.u.load("mix", conn(p.u, p.k, U_NET, K_NET, encap))
    initiator.kx_stub().Initiate(kx.InitiateRequest(connection="mix"))
    expect(p, lambda: p.k.established("mix") and p.u.established("mix"), "SAs up on both sites", timeout=UP_TIMEOUT)
    k_child = p.k.established("mix")[0].children[0]
    u_child = p.u.established("mix")[0].children[0]
    # one Child SA, seen from both ends: each side's outbound SPI is the other's inbound
    assert (k_child.spi_out, k_child.spi_in) == (u_child.spi_in, u_child.spi_out)
    return k_child


# -- the wire ---------------------------------------------------------------------------------


@dataclass
class EspPacket:
    src: str
    dst: str
    udp: bool  # ESP-in-UDP (RFC 3948) rather than IP protocol 50
    spi: int
    seq: int
    iv: bytes
    body: bytes  # ciphertext || ICV


class Capture:
    """tcpdump on the kernel site's WAN veth until `count` ESP packets, read back from its pcap."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = path
        # ESP, plain or in UDP 4500 (not IKE behind the non-ESP marker, not a 1-byte keep-alive)
        wanted = "esp or (udp port 4500 and udp[4:2] > 9 and udp[8:4] != 0)"
        self.proc = subprocess.Popen(
            [
                *("ip", "netns", "exec", NS_K, "tcpdump", "-Z", "root", "-i", WAN_K, "-n", "--immediate-mode"),
                *("-s", "0", "-c", str(count), "-w", str(path), wanted),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        seen = ""
        while "listening on" not in seen:  # "tcpdump: listening on mixw0, ...": capturing from now on
            line = self.proc.stderr.readline()
            assert line, f"tcpdump ended: {seen}"
            seen += line

    def stop(self) -> list[EspPacket]:
        """The packets, once tcpdump has its `count` (or after 20 s: what it has then)."""
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=30)
        return list(esp_packets(self.path.read_bytes()))


def esp_packets(pcap: bytes) -> Iterator[EspPacket]:
    """The ESP packets (plain or in UDP) of an Ethernet pcap; IKE and keep-alives left out."""
    magic = struct.unpack("<I", pcap[:4])[0]
    assert magic == 0xA1B2C3D4, hex(magic)  # microsecond pcap, little endian
    assert struct.unpack("<I", pcap[20:24])[0] == 1  # LINKTYPE_ETHERNET
    offset = 24
    while offset + 16 <= len(pcap):
        incl = struct.unpack("<I", pcap[offset + 8 : offset + 12])[0]
        frame = pcap[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        if frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        proto, src, dst = ip[9], socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        payload = ip[ihl:total]
        udp = proto == socket.IPPROTO_UDP
        if udp:
            sport, dport, length = struct.unpack("!HHH", payload[:6])
            assert (sport, dport) == (ESP_PORT, ESP_PORT), (sport, dport)
            assert length == len(payload), (length, len(payload))
            payload = payload[8:]
            if len(payload) <= 1 or payload[:4] == NON_ESP_MARKER:  # keep-alive, IKE
                continue
        elif proto != 50:
            continue
        spi, seq = struct.unpack("!II", payload[:8])
        yield EspPacket(src, dst, udp, spi, seq, payload[8 : 8 + GCM_IV], payload[8 + GCM_IV :])


def kernel_gcm_keys(ns: str) -> dict[int, bytes]:
    """SPI -> the rfc4106(gcm(aes)) key material (key || 4-byte salt) the kernel holds."""
    keys = {}
    for block in xfrm_states(ns):
        spi = re.search(r"spi (0x[0-9a-f]+)", block)
        aead = re.search(r"aead rfc4106\(gcm\(aes\)\) 0x([0-9a-f]+) (?:\(\d+ bits\) )?(\d+)", block)
        assert spi and aead, block
        assert aead.group(2) == str(GCM_ICV * 8), block
        keys[int(spi.group(1), 16)] = bytes.fromhex(aead.group(1))
    return keys


def open_esp(packet: EspPacket, material: bytes) -> bytes:
    """RFC 4106 / 4303: the inner IP packet, after checking the ICV, padding and next header."""
    key, salt = material[:-4], material[-4:]
    aad = struct.pack("!II", packet.spi, packet.seq)
    plain = AESGCM(key).decrypt(salt + packet.iv, packet.body, aad)  # raises InvalidTag
    assert len(plain) % 4 == 0, f"ESP trailer not 4-byte aligned: {len(plain)}"
    pad_len, next_header = plain[-2], plain[-1]
    assert next_header == 4, f"next header {next_header}, expected 4 (IPv4, tunnel mode)"
    padding = plain[-2 - pad_len : -2]
    assert padding == bytes(range(1, pad_len + 1)), f"padding {padding.hex()} is not 1, 2, 3, ..."
    inner = plain[: -2 - pad_len]
    assert inner[0] >> 4 == 4 and struct.unpack("!H", inner[2:4])[0] == len(inner), inner[:20].hex()
    return inner


def check_wire(p: Pair, child: kx.ChildSaInfo, encap: bool, capture_dir: Path) -> None:
    """Ping both ways under a capture; every ESP packet on the wire opens as RFC 4303 + 4106."""
    keys = kernel_gcm_keys(NS_K)
    assert set(keys) == {child.spi_in, child.spi_out}, (keys.keys(), child)
    capture = Capture(capture_dir / f"mixed-{'udp' if encap else 'esp'}.pcap", count=4 * PINGS)
    try:
        assert p.k.ping(U_INNER, count=PINGS), explain(p)
        assert p.u.ping(K_INNER, count=PINGS), explain(p)
    finally:
        packets = capture.stop()
    senders = {child.spi_out: (K_IP, U_IP, K_INNER, U_INNER), child.spi_in: (U_IP, K_IP, U_INNER, K_INNER)}
    for spi, (outer_src, outer_dst, inner_src, inner_dst) in senders.items():
        sent = [x for x in packets if x.spi == spi]
        # 2 x PINGS requests or replies from each side under its outbound SPI
        assert len(sent) == 2 * PINGS, f"{len(sent)} packets under {spi:#010x}: {packets}"
        assert all((x.src, x.dst, x.udp) == (outer_src, outer_dst, encap) for x in sent), sent
        seqs = [x.seq for x in sent]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] >= 1, seqs
        assert len({x.iv for x in sent}) == len(sent), "an IV was used twice"
        for x in sent:
            inner = open_esp(x, keys[spi])
            assert inner[9] == socket.IPPROTO_ICMP, inner[:20].hex()
            assert (socket.inet_ntoa(inner[12:16]), socket.inet_ntoa(inner[16:20])) == (inner_src, inner_dst)


def sa_packets(site: Site) -> dict[tuple[int, int], int]:
    reply = site.dp_stub().GetCounters(dp.GetCountersRequest(), timeout=10)
    return {(c.spi, c.direction): c.packets for c in reply.sas}


def check_counters(p: Pair, child: kx.ChildSaInfo) -> None:
    """What one side sent under an SPI, the other received under it: no packet lost or dropped."""
    out, inbound = ipsec_pb2.DIRECTION_OUT, ipsec_pb2.DIRECTION_IN

    def agree() -> bool:
        k, u = sa_packets(p.k), sa_packets(p.u)
        k_to_u = k.get((child.spi_out, out), 0)
        u_to_k = u.get((child.spi_in, out), 0)
        return 0 < k_to_u == u.get((child.spi_out, inbound)) and 0 < u_to_k == k.get((child.spi_in, inbound))

    try:
        wait_until(agree, timeout=30, interval=POLL, what="the sites' per-SA packet counters agree")
    except ConditionTimeout as exc:
        raise AssertionError(f"{exc}: kernel {sa_packets(p.k)}, userspace {sa_packets(p.u)}\n{explain(p)}") from None
    drops = {reason: n for reason, n in p.u.drops().items() if n}
    for bad in ("icv_failure", "replay", "malformed", "unknown_spi"):
        assert bad not in drops, drops
    stats = dict(line.split() for line in nsx(NS_K, "cat", "/proc/net/xfrm_stat").stdout.splitlines())
    for bad in ("XfrmInStateProtoError", "XfrmInStateSeqError", "XfrmInHdrError", "XfrmInNoStates"):
        assert stats[bad] == "0", stats


def transfer_both_ways(p: Pair) -> None:
    assert p.k.tcp_to(p.u, nbytes=TCP_BYTES), f"TCP kernel -> userspace\n{explain(p)}"
    assert p.u.tcp_to(p.k, nbytes=TCP_BYTES, port=7778), f"TCP userspace -> kernel\n{explain(p)}"


@pytest.mark.parametrize(
    ("encap", "initiator"), [(True, "kernel"), (False, "userspace")], ids=["esp-in-udp", "plain-esp"]
)
def test_kernel_and_userspace_sites_pass_traffic(pair: Pair, encap: bool, initiator: str, tmp_path: Path) -> None:
    child = reset_and_up(pair, encap, pair.k if initiator == "kernel" else pair.u)
    states = xfrm_states(NS_K)
    assert len(states) == 2, states
    for block in states:
        assert "mode tunnel" in block and "aead rfc4106(gcm(aes))" in block, block
        if encap:
            assert "encap type espinudp sport 4500 dport 4500" in block, block
        else:
            assert "encap" not in block, block
    status = pair.u.dp_stub().GetStatus(dp.GetStatusRequest(), timeout=10)
    assert status.backend == "userspace" and "+raw" in status.details["outer"], dict(status.details)
    assert pair.k.dp_stub().GetStatus(dp.GetStatusRequest(), timeout=10).backend == "kernel"
    check_wire(pair, child, encap, tmp_path)
    transfer_both_ways(pair)
    check_counters(pair, child)
