"""kill -9 the dataplane mid-stream, restart it: it reinstalls everything from etcd by itself,
traffic resumes, and no (SPI, sequence number) nor (SPI, IV) ever left the node twice.

The witness is tcpdump on the sending node's underlay (veth offloads off, so every ESP packet
is captured as it leaves, not as a GSO super-packet), and the capture must be lossless. The
sequence block is the smallest allowed (1024) so the sender goes through many store
reservations before it is killed.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

import pytest

from demo.manual_sites import SiteService, install_tunnel, random_kek
from esplanade.v1 import dataplane_pb2, ipsec_pb2
from tests.conditions import wait_until
from tests.dataplane.e2e.netns_etcd import NetnsEtcd
from tests.dataplane.e2e.traffic import UdpStream
from tests.dataplane.e2e.underlay_capture import UnderlayCapture
from tests.netns_topology import Topology

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]

BLOCK = 1024


def outbound_top(site: SiteService, spi: int) -> int:
    with site.client() as stub:
        reply = stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10)
    return next((c.packets for c in reply.sas if c.spi == spi and c.direction == ipsec_pb2.DIRECTION_OUT), 0)


def test_kill_9_and_restart_resumes_without_reusing_a_sequence_number(tmp_path: Path) -> None:
    kek = random_kek()
    settings = {"ESPLANADE_DATAPLANE__SEQUENCE_BLOCK": str(BLOCK)}
    with Topology("dps-", 2, offloads=False) as topo:
        a, b = topo.nodes
        etcd_a, etcd_b = NetnsEtcd(tmp_path / "etcd-a", a.name), NetnsEtcd(tmp_path / "etcd-b", b.name)
        site_a = SiteService(a, tmp_path, "site-a", kek, store="etcd", etcd_endpoint=etcd_a.endpoint, settings=settings)
        site_b = SiteService(b, tmp_path, "site-b", kek, store="etcd", etcd_endpoint=etcd_b.endpoint, settings=settings)
        try:
            etcd_a.start()
            etcd_b.start()
            site_a.start()
            site_b.start()
            keys = install_tunnel(site_a, site_b)
            with (
                UnderlayCapture(
                    a, tmp_path / "a-ul0.pcap", f"src host {a.underlay_addr} and (udp port 4500 or esp)"
                ) as capture,
                UdpStream(a, b, rate=4000) as stream,
            ):
                wait_until(
                    lambda: outbound_top(site_a, keys.spi_ab) > 4 * BLOCK, timeout=30, what="several blocks sent"
                )
                assert site_a.proc is not None
                workers = [
                    int(p) for p in Path(f"/proc/{site_a.proc.pid}/task/{site_a.proc.pid}/children").read_text().split()
                ]
                site_a.kill()
                wait_until(
                    lambda: not any(Path(f"/proc/{w}").exists() for w in workers), timeout=10, what="workers gone"
                )
                received_at_kill = stream.received
                site_a.start()  # no install call: it reads etcd
                wait_until(lambda: stream.received > received_at_kill + 4000, timeout=30, what="traffic resumed")
                wait_until(
                    lambda: outbound_top(site_a, keys.spi_ab) > 2 * BLOCK, timeout=30, what="blocks after restart"
                )
            assert capture.lossless, capture.report
            assert "reconciled from the store: 1 Child SAs, 2 policies installed" in site_a.log()
            with site_a.client() as stub:
                assert stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10).child_sas == 1
        finally:
            site_a.stop()
            site_b.stop()
            etcd_a.stop()
            etcd_b.stop()

    headers = [h for h in capture.esp_headers() if h.spi == keys.spi_ab]
    sequence_numbers = [h.seq for h in headers]
    ivs = [h.iv for h in headers]
    assert len(headers) > 6 * BLOCK  # more than 4 blocks before the kill, 2 after
    repeated = [s for s, n in Counter(sequence_numbers).items() if n > 1]
    assert repeated == [], f"sequence numbers sent twice: {repeated[:10]}"
    assert len(set(ivs)) == len(ivs), "an explicit IV (AES-GCM nonce) was sent twice"
    # the restart shows as one jump past the block the first incarnation held
    jumps = [(x, y) for x, y in itertools.pairwise(sequence_numbers) if y != x + 1]
    assert len(jumps) == 1, jumps[:5]
    before, after = jumps[0]
    assert after > before and after - before <= 2 * BLOCK + 1
    assert os.path.getsize(tmp_path / "a-ul0.pcap") > 0
