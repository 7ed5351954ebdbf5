"""Malformed input at the real sockets (UDP 4500 and raw ESP): truncated, oversized, wrong
padding, bad next header and garbage datagrams are dropped and counted by reason, nothing
raises, and protected traffic keeps flowing while the flood lasts."""

from __future__ import annotations

import random
import re
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from demo.manual_sites import TunnelKeys, child_sa_for, manual_sites
from esplanade.dataplane.esp.cipher_suites import esp_cipher_for
from esplanade.ipsec.transforms import ENCR_AES_GCM_16_128
from esplanade.v1 import dataplane_pb2
from tests.netns_topology import Node, inside_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FLOOD_ROUNDS = 1500  # each round sends one of every kind, over UDP and over raw ESP


class Crafter:
    """Authentic ESP packets (right key, right ICV) with wrong content, for one SA."""

    def __init__(self, spi: int, key: bytes) -> None:
        self.spi = spi
        self.cipher = esp_cipher_for(ENCR_AES_GCM_16_128, key, None, b"")
        self.seq = 0

    def seal(self, plaintext: bytes) -> bytes:
        self.seq += 1
        header = self.spi.to_bytes(4, "big") + self.seq.to_bytes(4, "big")
        iv = self.seq.to_bytes(8, "big")
        return self.cipher.seal(header, iv, bytearray(plaintext), None)

    def kinds(self, rng: random.Random) -> dict[str, bytes]:
        inner = bytes.fromhex("4500003c000040004011") + bytes(2) + bytes([10, 80, 2, 1, 10, 80, 1, 1]) + bytes(40)
        oversized = bytearray(inner)
        oversized[2:4] = (60000).to_bytes(2, "big")  # claims more than it carries
        spi = self.spi.to_bytes(4, "big")
        return {
            "wrong_padding": self.seal(inner + b"\x07\x07" + bytes((2, 4))),
            "bad_next_header": self.seal(inner + b"\x01\x02" + bytes((2, 99))),
            "oversized_inner": self.seal(bytes(oversized) + b"\x01\x02" + bytes((2, 4))),
            "oversized_datagram": spi + rng.randbytes(60000),
            "truncated": spi + b"\x00\x00\x00\x09" + rng.randbytes(rng.randrange(0, 20)),
            "garbage": rng.randbytes(rng.randrange(8, 1400)),
        }


def kernel_receive_losses(node: Node) -> int:
    """Datagrams the kernel of `node`'s namespace dropped before any socket read them: UDP
    receive errors (buffer full), failed IP reassemblies (the 60,000-byte datagrams) and raw
    sockets' drops. Under CPU load the reader falls behind; what the kernel dropped the
    dataplane never saw, so it cannot count it."""
    snmp = node.run(["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
    rows = {
        names.split(":")[0]: dict(zip(names.split()[1:], values.split()[1:], strict=True))
        for names, values in zip(snmp[::2], snmp[1::2], strict=True)
    }
    raw = node.run(["cat", "/proc/net/raw"], check=True).stdout.splitlines()[1:]
    raw_drops = sum(int(line.split()[-1]) for line in raw if line.strip())
    return int(rows["Udp"]["InErrors"]) + int(rows["Ip"]["ReasmFails"]) + raw_drops


def flood(b: Node, a: Node, udp_sa: Crafter, raw_sa: Crafter, stop: threading.Event, sent: Counter[str]) -> None:
    rng = random.Random(1)
    with inside_netns(b.name):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    udp.bind((b.underlay_addr, 4600))
    try:
        for _ in range(FLOOD_ROUNDS):
            if stop.is_set():
                return
            for kind, payload in udp_sa.kinds(rng).items():
                udp.sendto(payload, (a.underlay_addr, 4500))
                sent[f"udp_{kind}"] += 1
            udp.sendto(b"\x01\x02\x03", (a.underlay_addr, 4500))  # a runt: shorter than SPI + sequence
            sent["udp_runt"] += 1
            for kind, payload in raw_sa.kinds(rng).items():
                raw.sendto(payload, (a.underlay_addr, 0))
                sent[f"raw_{kind}"] += 1
            # an ESP-in-UDP SA's packet arriving as plain ESP: wrong encapsulation
            raw.sendto(udp_sa.seal(bytes(60)), (a.underlay_addr, 0))
            sent["raw_wrong_encapsulation"] += 1
    finally:
        udp.close()
        raw.close()


def test_malformed_flood_is_counted_and_traffic_keeps_flowing(tmp_path: Path) -> None:
    with manual_sites(tmp_path, prefix="dps-") as (topo, site_a, _site_b, _keys):
        a, b = topo.nodes
        udp_keys, raw_keys = TunnelKeys.generate(), TunnelKeys.generate()
        with site_a.client() as stub:  # two more SAs whose keys the flood uses (no policies: never chosen for traffic)
            for keys, udp, child in ((udp_keys, True, "flood-udp"), (raw_keys, False, "flood-raw")):
                child_sa = child_sa_for(a, b, keys, local_is_a=True, udp=udp, child_id=child)
                stub.InstallChildSa(dataplane_pb2.InstallChildSaRequest(child_sa=child_sa), timeout=20)
        udp_sa, raw_sa = Crafter(udp_keys.spi_ba, udp_keys.key_ba), Crafter(raw_keys.spi_ba, raw_keys.key_ba)

        stop, sent = threading.Event(), Counter[str]()
        losses_before = kernel_receive_losses(a)
        flooder = threading.Thread(target=flood, args=(b, a, udp_sa, raw_sa, stop, sent), daemon=True)
        flooder.start()
        try:
            out = a.run(
                ["ping", "-n", "-c", "150", "-i", "0.02", "-W", "1", "-I", a.site_addr, b.site_addr], timeout=60
            )
        finally:
            stop.set()
            flooder.join(30)
        lost = kernel_receive_losses(a) - losses_before
        received = int(re.search(r"(\d+) received", out.stdout).group(1))  # type: ignore[union-attr]
        assert sum(sent.values()) > 5000, sent
        assert received >= 140, f"protected traffic stalled during the flood: {out.stdout[-300:]}"

        with site_a.client() as stub:
            reply = stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10)
            status = stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10)
        drops = {d.reason: d.packets for d in reply.drops}
        assert status.details["failed"] == ""
        assert not any(reason.startswith("loop_") for reason in drops), drops  # no transform exception, no control loss
        for reason in ("malformed", "icv_failure", "unknown_spi", "runt", "encapsulation_mismatch"):
            assert drops.get(reason, 0) > 0, (reason, drops)
        # every authentic malformed packet is a counted "malformed" drop of its SA (wrong padding,
        # bad next header, inner length beyond the payload), minus what the kernel dropped before
        # the dataplane could read it (never more than `lost` of any kind)
        assert lost < sum(sent.values()) // 2, f"the kernel dropped {lost} of {sum(sent.values())}: no test left"
        authentic = sum(
            sent[f"{p}_{k}"] for p in ("udp", "raw") for k in ("wrong_padding", "bad_next_header", "oversized_inner")
        )
        per_sa = {(c.child_sa, c.direction): c for c in reply.sas}
        assert per_sa, "the SAs are still installed"
        assert drops["malformed"] >= authentic - lost, (drops, sent, lost)
        oversized = sent["udp_oversized_datagram"] + sent["raw_oversized_datagram"]
        assert drops["icv_failure"] >= oversized - lost, (drops, sent, lost)
        assert drops["encapsulation_mismatch"] >= sent["raw_wrong_encapsulation"] - lost, (drops, sent, lost)
