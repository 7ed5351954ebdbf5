"""Two namespaces, each with its own kernel backend and static keys, pass ping and TCP.

Tunnel and transport mode, plain ESP and ESP-in-UDP (RFC 3948, with the encapsulating
UDP socket bypassing IPsec as IKE's would), ESN on, IPv4 and IPv6, AH. The SA counters on
both sides prove that the traffic went through the SAs, and the policies make sure it
could not have gone around them.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.ipsec.transforms import Mode
from tests.conditions import wait_until
from tests.dataplane.kernel.backend_harness import started_backend, udp_socket_in
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.netns_topology import NetnsPair, Side, in_netns, netns_pair

pytestmark = pytest.mark.vm

TCP_BYTES = 1 << 19


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as p:
        yield p


def peers(pair: NetnsPair, family: int | str) -> tuple[Peer, Peer]:
    if family == 6:
        return Peer(pair.a.outer6, pair.a.inner6), Peer(pair.b.outer6, pair.b.inner6)
    if family == "6in4":  # IPv6 inside, IPv4 outside: one tunnel SA carries both families
        return Peer(pair.a.outer4, pair.a.inner6), Peer(pair.b.outer4, pair.b.inner6)
    return Peer(pair.a.outer4, pair.a.inner4), Peer(pair.b.outer4, pair.b.inner4)


def ping(side: Side, src: str, dst: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return in_netns(side.netns, "ping", "-c", str(count), "-i", "0.2", "-W", "3", "-I", src, dst, check=False)


@contextlib.contextmanager
def iperf_server(side: Side) -> Iterator[None]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", side.netns, "iperf3", "-s", "-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: ":5201 " in in_netns(side.netns, "ss", "-Hltn").stdout, timeout=20, what="iperf3 listening")
        yield
    finally:
        server.kill()
        server.wait()


def tcp_transfer(client: Side, src: str, dst: str, server: Side) -> int:
    """Send TCP_BYTES with iperf3; return how many bytes the server says it received."""
    with iperf_server(server):
        argv = ("iperf3", "-c", dst, "-B", src, "-n", str(TCP_BYTES), "-J")
        proc = in_netns(client.netns, *argv, timeout=90, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    received = int(json.loads(proc.stdout)["end"]["sum_received"]["bytes"])
    assert received > TCP_BYTES // 2, proc.stdout
    return received


def counters_by_spi(backend: KernelXfrmBackend) -> dict[tuple[int, str], int]:
    return {(c.spi, c.direction): c.bytes for c in backend.counters()}


# name: (mode, ESP-in-UDP, IP version, transform, TCP transfer besides ping)
SCENARIOS = {
    "tunnel-esp-aes128gcm16": (Mode.TUNNEL, False, 4, "aes128gcm16", True),
    "tunnel-espinudp-chacha20poly1305": (Mode.TUNNEL, True, 4, "chacha20poly1305", True),
    "transport-esp-aes128-sha256": (Mode.TRANSPORT, False, 4, "aes128-sha256", True),
    "transport-espinudp-aes256gcm16": (Mode.TRANSPORT, True, 4, "aes256gcm16", True),
    "tunnel-esp-ipv6-aes256-sha512": (Mode.TUNNEL, False, 6, "aes256-sha512", False),
    "tunnel-esp-ipv6-in-ipv4-aes256gcm16": (Mode.TUNNEL, False, "6in4", "aes256gcm16", False),
    "tunnel-esp-null-sha256": (Mode.TUNNEL, False, 4, "null-sha256", False),
    "tunnel-ah-sha256": (Mode.TUNNEL, False, 4, "ah-sha256", False),
    "transport-ah-sha384-ipv6": (Mode.TRANSPORT, False, 6, "ah-sha384", False),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_ping_and_tcp_through_kernel_sas(pair: NetnsPair, scenario: str) -> None:
    mode, encap, family, label, with_tcp = SCENARIOS[scenario]
    a, b = peers(pair, family)
    record_a, record_b = child_sa_pair(scenario, a, b, TRANSFORMS_BY_LABEL[label], mode=mode, encap=encap, esn=True)
    src, dst = (a.inner, b.inner) if mode == Mode.TUNNEL else (a.outer, b.outer)
    with contextlib.ExitStack() as sockets:
        async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
            if encap:  # the NAT-T port: in the real gateway this is the IKE socket on 4500
                for side, backend, addr in ((pair.a, backend_a, a.outer), (pair.b, backend_b, b.outer)):
                    backend.bypass_socket(sockets.enter_context(udp_socket_in(side.netns, addr, 4500)), esp_in_udp=True)
            await backend_a.install_child_sa(record_a, protect_policies(record_a))
            await backend_b.install_child_sa(record_b, protect_policies(record_b))

            result = ping(pair.a, src, dst)
            assert result.returncode == 0, result.stdout + result.stderr
            transferred = tcp_transfer(pair.a, src, dst, pair.b) if with_tcp else 1
            # both kernels counted (at least) the TCP payload that arrived through their SAs
            sent = counters_by_spi(backend_a)[(record_a.outbound.spi, "out")]
            received = counters_by_spi(backend_b)[(record_b.inbound.spi, "in")]
            assert sent >= transferred and received >= transferred, (sent, received, transferred)
            states = {s.sa.id: s for s in backend_a.client.dump_sas()}
            out_state = next(s for s in states.values() if s.sa.spi == record_a.outbound.spi)
            assert out_state.sa.esn and out_state.replay.last_sent == out_state.packets > 0
            assert (out_state.sa.encap is not None) == encap

            await backend_a.delete_child_sa(record_a.id)
            assert backend_a.client.dump_sas() == [] and backend_a.client.dump_policies() == []
            if encap:  # the IKE sockets keep their per-socket bypass policies
                assert len(backend_a.client.dump_policies(include_socket_policies=True)) == 2
            # with B still protecting and A in the clear, nothing gets through any more
            assert ping(pair.a, src, dst, count=1).returncode != 0


async def test_counters_and_replay_state_follow_traffic(pair: NetnsPair) -> None:
    a, b = peers(pair, 4)
    record_a, record_b = child_sa_pair("replay", a, b, TRANSFORMS_BY_LABEL["aes128gcm16"], esn=True)
    async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
        await backend_a.install_child_sa(record_a, protect_policies(record_a))
        await backend_b.install_child_sa(record_b, protect_policies(record_b))
        assert ping(pair.a, a.inner, b.inner, count=4).returncode == 0
        sent = backend_a.replay_state(record_a.id, "out")
        received = backend_b.replay_state(record_b.id, "in")
        assert sent.last_sent == 4 and received.highest_received == 4
        counters = {(c.spi, c.direction): c for c in backend_a.counters()}
        assert counters[(record_a.outbound.spi, "out")].packets == 4
        assert counters[(record_a.outbound.spi, "out")].replay_window_top == 4
        assert counters[(record_a.inbound.spi, "in")].packets == 4

        # The sender continues from a restored sequence number (as after a failover);
        # the receiver's window follows.
        backend_a.restore_replay_state(record_a.id, "out", replace(sent, oseq=1000))
        assert backend_a.replay_state(record_a.id, "out").last_sent == 1000
        assert ping(pair.a, a.inner, b.inner, count=1).returncode == 0
        assert backend_b.replay_state(record_b.id, "in").highest_received == 1001

        # Both ends restored past 2^32: ESN carries the high half, which only the ICV covers.
        backend_b.restore_replay_state(record_b.id, "in", replace(received, seq=3, seq_hi=1, bitmap=(0b111, 0)))
        backend_a.restore_replay_state(record_a.id, "out", replace(sent, oseq=5, oseq_hi=1))
        assert ping(pair.a, a.inner, b.inner, count=1).returncode == 0
        assert backend_b.replay_state(record_b.id, "in").highest_received == (1 << 32) + 6

        # A receiver that has seen later packets drops the replayed range: nothing gets in.
        backend_b.restore_replay_state(record_b.id, "in", replace(received, seq=5000, seq_hi=1, bitmap=(0, 0)))
        assert ping(pair.a, a.inner, b.inner, count=1).returncode != 0
        # (ESN inference, RFC 4303 Appendix A: a sequence number below the window belongs to
        # the next 2^32 block, so the ICV, which covers the high half, does not verify)
        inbound = {state.sa.spi: state for state in backend_b.client.dump_sas()}[record_b.inbound.spi]
        assert inbound.integrity_failed >= 1
