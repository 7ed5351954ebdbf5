"""Kernel events reach the backend's event stream; failed installs leave nothing behind.

- a soft byte/packet/time lifetime -> XFRM_MSG_EXPIRE (soft) -> SOFT_EXPIRE (rekey now);
  the hard one -> HARD_EXPIRE, and the kernel has removed the SA;
- a trap policy plus matching traffic -> XFRM_MSG_ACQUIRE -> ACQUIRE naming the policy;
- an install whose policy collides, or whose second SA fails, is rolled back completely;
- replay thresholds (XFRM_MSG_NEWAE) make the kernel report replay progress on the
  AEVENTS group, as HA setups use it to sync sequence numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from esplanade.dataplane.backend import AlreadyExists, DataplaneEventKind, NotFound
from esplanade.dataplane.kernel.xfrm_messages import XfrmAeFlag, XfrmGroup, XfrmMsgType
from esplanade.dataplane.kernel.xfrm_policy import xfrm_policies_from_spd
from esplanade.dataplane.kernel.xfrm_sa import XfrmReplayState, XfrmSaId, xfrm_sa_from_association
from esplanade.dataplane.kernel.xfrm_socket import XfrmEventSocket
from esplanade.ipsec.sa import Lifetime
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import IpProto
from tests.conditions import wait_until
from tests.dataplane.kernel.backend_harness import EventWatcher, started_backend
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.netns_topology import NetnsPair, in_netns, netns, netns_pair

pytestmark = pytest.mark.vm
GCM = TRANSFORMS_BY_LABEL["aes128gcm16"]


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as p:
        yield p


def peers(pair: NetnsPair) -> tuple[Peer, Peer]:
    return Peer(pair.a.outer4, pair.a.inner4), Peer(pair.b.outer4, pair.b.inner4)


async def test_packet_lifetimes_raise_soft_then_hard_expire(pair: NetnsPair) -> None:
    a, b = peers(pair)
    lifetime = Lifetime(soft_packets=3, hard_packets=6)
    record_a, record_b = child_sa_pair("expire", a, b, GCM, lifetime=lifetime)
    async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
        watcher = EventWatcher(backend_a)
        await backend_a.install_child_sa(record_a, protect_policies(record_a))
        await backend_b.install_child_sa(record_b, protect_policies(record_b))
        in_netns(pair.a.netns, "ping", "-c", "8", "-i", "0.1", "-W", "1", "-I", a.inner, b.inner, check=False)
        soft = await watcher.wait_for(DataplaneEventKind.SOFT_EXPIRE, spi=record_a.outbound.spi)
        assert soft.child_sa == record_a.id and "soft packet lifetime" in soft.reason
        hard = await watcher.wait_for(DataplaneEventKind.HARD_EXPIRE, spi=record_a.outbound.spi)
        assert hard.child_sa == record_a.id
        with pytest.raises(NotFound):  # the kernel removed the hard-expired SA itself
            backend_a.client.get_sa(XfrmSaId(b.outer, record_a.outbound.spi, IpProto.ESP))
        await backend_a.delete_child_sa(record_a.id)  # still clean, although one SA is gone
        # (the pings after the hard expire made the kernel ACQUIRE a new SA: it keeps a
        # larval SPI-0 state for that until its acquire timeout)
        assert [s for s in backend_a.client.dump_sas() if s.sa.spi] == []
        await watcher.close()


async def test_time_lifetimes_raise_expire_without_traffic() -> None:
    a, b = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
    record, _ = child_sa_pair("timed", a, b, GCM, lifetime=Lifetime(soft_seconds=1, hard_seconds=2))
    with netns("ev") as ns:
        async with started_backend(ns) as backend:
            watcher = EventWatcher(backend)
            await backend.install_child_sa(record)
            soft = await watcher.wait_for(DataplaneEventKind.SOFT_EXPIRE, spi=record.inbound.spi, timeout=15)
            assert "soft time lifetime" in soft.reason
            await watcher.wait_for(DataplaneEventKind.HARD_EXPIRE, spi=record.outbound.spi, timeout=15)
            await watcher.close()


async def test_trap_policy_and_traffic_raise_acquire(pair: NetnsPair) -> None:
    a, b = peers(pair)
    record_a, _ = child_sa_pair("trap", a, b, GCM)
    trap = dataclasses.replace(protect_policies(record_a)[0], id="trap-out", trap=True, reqid=77, child_sa="")
    async with started_backend(pair.a.netns) as backend:
        watcher = EventWatcher(backend)
        await backend.install_policy(trap)
        in_netns(pair.a.netns, "ping", "-c", "1", "-W", "1", "-I", a.inner, b.inner, check=False)
        acquire = await watcher.wait_for(DataplaneEventKind.ACQUIRE)
        assert acquire.policy == "trap-out"
        assert f"{a.inner} -> {b.inner} proto 1" in acquire.reason and "reqid 77" in acquire.reason
        await watcher.close()


async def test_install_rolls_back_when_a_policy_collides(pair: NetnsPair) -> None:
    a, b = peers(pair)
    record_a, _ = child_sa_pair("collide", a, b, GCM)
    policies = protect_policies(record_a)
    async with started_backend(pair.a.netns) as backend:
        # a foreign policy (another daemon, an admin) already holds the inbound selector
        foreign = xfrm_policies_from_spd(policies[1], reqid=99)[0]
        backend.client.add_policy(foreign)
        with pytest.raises(AlreadyExists):
            await backend.install_child_sa(record_a, policies)
        assert backend.client.dump_sas() == []
        assert backend.client.dump_policies() == [foreign]
        assert backend.status().details["child_sas"] == "0"
        assert backend.status().details["policies"] == "0"


async def test_install_rolls_back_the_inbound_sa_when_the_outbound_one_fails(pair: NetnsPair) -> None:
    a, b = peers(pair)
    record_a, _ = child_sa_pair("half", a, b, GCM)
    other, _ = child_sa_pair("other", a, b, GCM, spi_ab=record_a.outbound.spi, spi_ba=0xC0000001)
    async with started_backend(pair.a.netns) as backend:
        backend.client.add_sa(xfrm_sa_from_association(other.outbound, reqid=5))
        with pytest.raises(AlreadyExists):
            await backend.install_child_sa(record_a)
        assert [s.sa.spi for s in backend.client.dump_sas()] == [record_a.outbound.spi]


async def test_policy_with_port_range_expands_and_replaces_in_place() -> None:
    with netns("pol") as ns:
        async with started_backend(ns) as backend:
            policy = SpdPolicy(
                id="web",
                direction=PolicyDirection.OUT,
                local_ts=TrafficSelector.parse("10.1.0.0/24"),
                remote_ts=TrafficSelector.parse("10.2.0.0-10.2.0.5[tcp/8080-8083]"),
                tunnel_src="192.0.2.1",
                tunnel_dst="192.0.2.2",
                reqid=3,
            )
            await backend.install_policy(policy)
            assert len(backend.client.dump_policies()) == 2  # 10.2.0.0/30 + 10.2.0.4/31, one port block
            await backend.install_policy(dataclasses.replace(policy, priority=10))
            assert {p.priority for p in backend.client.dump_policies()} == {10}


async def test_replay_thresholds_produce_aevents(pair: NetnsPair) -> None:
    a, b = peers(pair)
    record_a, record_b = child_sa_pair("aevents", a, b, GCM)
    async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
        await backend_a.install_child_sa(record_a, protect_policies(record_a))
        await backend_b.install_child_sa(record_b, protect_policies(record_b))
        listener = XfrmEventSocket(pair.b.netns, (XfrmGroup.AEVENTS,))
        try:
            inbound = XfrmSaId(b.outer, record_b.inbound.spi, IpProto.ESP)
            backend_b.client.set_aevent_thresholds(inbound, src=a.outer, reqid=1, replay_packets=2, timer_tenths=100)
            in_netns(pair.a.netns, "ping", "-c", "4", "-i", "0.1", "-W", "2", "-I", a.inner, b.inner, check=False)

            def replay_updates() -> list[XfrmReplayState]:
                return [
                    XfrmReplayState.from_attrs(msg)
                    for kind, msg in listener.receive()
                    if kind == XfrmMsgType.NEWAE
                    and msg["sa_id_spi"] == record_b.inbound.spi
                    and msg["flags"] & XfrmAeFlag.CR
                ]

            updates = wait_until(replay_updates, timeout=10, what="NEWAE replay update on the AEVENTS group")
            assert updates[-1].highest_received >= 2
        finally:
            listener.close()
