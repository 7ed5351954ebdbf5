"""The TUN room on a real kernel: reads, plain and merged (USO) writes, bad frames, offload probing."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from esplanade.dataplane.userspace.netconfig import LinkConfigurator, NetConfigError, TunLinkConfig
from esplanade.dataplane.userspace.offloads import OffloadReport, probe_tun_offloads
from esplanade.dataplane.userspace.segmentation import coalesce_for_tun
from esplanade.dataplane.userspace.tun import TunDevice, TunError, TunOffload, TunSettings
from esplanade.dataplane.userspace.vnet_header import VNET_HDR_LEN, VnetHeader
from tests.conditions import wait_until
from tests.dataplane.compiled_module import requires_compiled
from tests.dataplane.userspace.packet_builders import udp_datagrams
from tests.netns_topology import inside_netns

pytestmark = pytest.mark.netns

TUN = "dptun0"


@pytest.fixture
def tun(scratch: str) -> Iterator[tuple[str, TunDevice]]:
    with inside_netns(scratch):
        device = TunDevice.create(TunSettings(name=TUN, queues=2, vnet_hdr=True, multi_queue=True))
    try:
        with LinkConfigurator(scratch) as links:
            links.configure_tun(
                TunLinkConfig(name=TUN, mtu=1400, addresses=("10.99.0.1/24",), routes=("10.99.1.0/24",), txqlen=2000)
            )
        yield scratch, device
    finally:
        device.close()


def test_link_configuration_is_applied(tun: tuple[str, TunDevice]) -> None:
    name, _ = tun
    with LinkConfigurator(name) as links:
        assert links.link_mtu(TUN) == 1400
        assert links.path_mtu("10.99.1.7") == 1400
        links.replace_route("10.99.2.0/24", TUN, mtu=1300)
        assert links.path_mtu("10.99.2.1") == 1300
        links.delete_route("10.99.2.0/24", TUN)
        links.delete_route("10.99.2.0/24", TUN)  # already gone: fine
        with pytest.raises(NetConfigError):
            links.set_link("nosuchdev0", mtu=1000)
        with pytest.raises(NetConfigError):
            links.set_link(TUN, mtu=20)  # below the minimum: refused by the kernel, typed error


def _udp_socket(ns: str, port: int) -> socket.socket:
    with inside_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("10.99.0.1", port))
    sock.settimeout(5)
    return sock


def test_routed_packets_are_read_with_a_plain_vnet_header(tun: tuple[str, TunDevice]) -> None:
    name, device = tun
    sock = _udp_socket(name, 7000)
    try:
        sock.sendto(b"hello tunnel", ("10.99.1.5", 9))
        frames: list[bytes] = []

        def read_some() -> bool:
            for queue in device.queues:
                frames.extend(queue.read_batch(8))
            return bool(frames)

        wait_until(read_some, timeout=5, what="a frame on one of the queues")
        (frame,) = [f for f in frames if IP(f[VNET_HDR_LEN:]).dst == "10.99.1.5"]
        assert VnetHeader.unpack(frame) == VnetHeader()
        packet = IP(frame[VNET_HDR_LEN:])
        assert packet[UDP].dport == 9 and bytes(packet[UDP].payload) == b"hello tunnel"
    finally:
        sock.close()


def test_plain_and_merged_udp_writes_are_delivered(tun: tuple[str, TunDevice]) -> None:
    name, device = tun
    sock = _udp_socket(name, 7001)
    try:
        one = raw(IP(src="10.99.1.5", dst="10.99.0.1") / UDP(sport=5, dport=7001) / Raw(b"single"))
        assert device.queues[0].write_packets([one]) == 1
        assert sock.recvfrom(100) == (b"single", ("10.99.1.5", 5))
        datagrams = udp_datagrams(12, 100, src="10.99.1.5", dst="10.99.0.1", sport=6, dport=7001, last_size=40)
        frames = coalesce_for_tun(datagrams, merge_udp=True)
        assert len(frames) == 1, "one USO frame"
        assert device.queues[1].write_batch(frames) == 1
        received = [sock.recvfrom(200)[0] for _ in datagrams]
        assert received == [bytes(UDP(d[20:]).payload) for d in datagrams]
    finally:
        sock.close()


def test_a_bad_frame_is_a_counted_drop(tun: tuple[str, TunDevice]) -> None:
    _, device = tun
    queue = device.queues[0]
    bad = bytes([0, 9]) + bytes(8) + raw(IP(src="10.99.1.5", dst="10.99.0.1") / UDP())
    assert queue.write_batch([bad, b"\x00" * 5]) == 0
    assert queue.drops["write_EINVAL"] == 2


def test_offload_probe_and_negotiation(tun: tuple[str, TunDevice]) -> None:
    _, device = tun
    report = OffloadReport(kernel=os.uname().release)
    probe_tun_offloads(device, report)
    assert report.tun_csum and report.tun_tso
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    assert report.tun_uso is ((major, minor) >= (6, 2))
    with pytest.raises(TunError):
        device.set_offload(TunOffload.CSUM | TunOffload.USO4)  # USO4 without USO6: EINVAL, typed


def test_device_creation_errors_are_typed(scratch: str) -> None:
    with inside_netns(scratch), pytest.raises(TunError):
        TunDevice.create(TunSettings(name="x" * 20))
    with pytest.raises(TunError):
        TunDevice.create(TunSettings(name="ok0", queues=2, multi_queue=False))


@requires_compiled
def test_compiled_frame_reads_and_writes(tun: tuple[str, TunDevice]) -> None:
    """`read_frames` / `write_frames`: the same frames as the per-frame calls, one call per batch,
    failures counted by errno, a buffer reused from read to read."""
    from esplanade.dataplane.fastpath.tun_frames import coalesce_frames

    name, device = tun
    sock = _udp_socket(name, 7002)
    try:
        for k in range(5):
            sock.sendto(bytes([k]) * (100 + k), ("10.99.1.5", 9))
        frames_read: list[bytes] = []

        def read_all() -> bool:
            for queue in device.queues:
                frames_read.extend(queue.read_frames(8).to_list())  # copies: the queue reuses its buffer
            return len([f for f in frames_read if IP(f[VNET_HDR_LEN:]).dst == "10.99.1.5"]) >= 5

        wait_until(read_all, timeout=5, what="five frames")
        ours = [f for f in frames_read if IP(f[VNET_HDR_LEN:]).dst == "10.99.1.5"]
        payloads = [bytes(IP(f[VNET_HDR_LEN:])[UDP].payload) for f in ours]
        assert payloads == [bytes([k]) * (100 + k) for k in range(5)]
        assert all(VnetHeader.unpack(f) == VnetHeader() for f in ours)
        datagrams = udp_datagrams(6, 100, src="10.99.1.5", dst="10.99.0.1", sport=6, dport=7002)
        frames = coalesce_frames([*datagrams, bytes([0, 9]) + bytes(30)], merge_udp=True)
        queue = device.queues[0]
        assert queue.write_frames(frames) == frames.count - 1  # the USO frame went, the junk did not
        assert queue.drops["write_EINVAL"] == 1
        assert [sock.recvfrom(200)[0] for _ in datagrams] == [bytes(UDP(d[20:]).payload) for d in datagrams]
    finally:
        sock.close()
