"""Identity filters in this machine's kernel, in a private network namespace: the narrowed IN and
FWD policies really appear (`ip xfrm policy`), are replaced and removed, and the namespace's
policy-check counters move for a packet the filter does not grant.

This kernel has no ESP, so the SAs live in a stand-in (`FakeKernel`) while every policy goes
to the kernel; packets through a real SA are in the VM (tests/vm/guest/test_identity_filter.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator

import pytest

from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.xfrm_client import XfrmClient
from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicy, XfrmPolicyKey
from esplanade.dataplane.kernel.xfrm_sa import XfrmSa, XfrmSaId, XfrmSaState
from esplanade.dataplane.kernel.xfrm_socket import XfrmSocket
from esplanade.dataplane.kernel.xfrm_stat import XfrmStatReader
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection
from tests.conditions import async_wait_until
from tests.dataplane.kernel.backend_harness import udp_socket_in
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.fake_kernel import FakeKernel
from tests.dataplane.kernel.netns_topology import NetnsPair, netns_pair, run

pytestmark = pytest.mark.netns

A, B = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
GCM = TRANSFORMS_BY_LABEL["aes128gcm16"]
SITE = TrafficSelector.from_network("10.1.0.0/16")
CLIENT = TrafficSelector.from_network("10.2.0.1/32")


class KernelPolicies:
    """Policies in the real kernel, SAs in a stand-in (this kernel refuses ESP SAs)."""

    def __init__(self, netns_name: str) -> None:
        self.sock = XfrmSocket(netns_name)
        self.real = XfrmClient(self.sock)
        self.sas = FakeKernel()

    def add_sa(self, sa: XfrmSa) -> None:
        self.sas.add_sa(sa)

    def delete_sa(self, sa_id: XfrmSaId, *, mark: tuple[int, int] | None = None) -> None:
        self.sas.delete_sa(sa_id, mark=mark)

    def dump_sas(self) -> list[XfrmSaState]:
        return self.sas.dump_sas()

    def add_policy(self, policy: XfrmPolicy) -> None:
        self.real.add_policy(policy)

    def update_policy(self, policy: XfrmPolicy) -> None:
        self.real.update_policy(policy)

    def delete_policy(self, key: XfrmPolicyKey) -> None:
        self.real.delete_policy(key)

    def dump_policies(self) -> list[XfrmPolicy]:
        return self.real.dump_policies()


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[NetnsPair, KernelXfrmBackend, str]]:
    """The gateway is side a (10.1.0.1 in the site 10.1.0.0/16), the client side b (10.2.0.1)."""
    with netns_pair() as pair:
        ns = pair.a.netns
        client = KernelPolicies(ns)
        # the counters are read through the namespace for real: only the netlink side is stood in
        stat = XfrmStatReader(ns)
        backend = KernelXfrmBackend(netns=ns, client=client, xfrm_stat=stat.read)  # type: ignore[arg-type]
        await backend.start()
        record, _ = child_sa_pair("c", A, B, GCM)
        await backend.install_child_sa(record)
        out, inbound = protect_policies(record, local_ts=SITE, remote_ts=CLIENT)
        fwd = dataclasses.replace(inbound, id="c-fwd", direction=PolicyDirection.FWD)
        for policy in (out, inbound, fwd):
            await backend.install_policy(policy)
        try:
            yield pair, backend, record.id
        finally:
            await backend.stop()
            client.sock.close()
            stat.close()


def policy_blocks(ns: str) -> list[str]:
    """`ip xfrm policy` output, one string per policy, whitespace collapsed."""
    text = run("ip", "-n", ns, "xfrm", "policy", "list").stdout
    blocks = re.split(r"\n(?=src )", text.strip())
    return [" ".join(block.split()) for block in blocks if block]


def inbound(ns: str) -> list[str]:
    return sorted(b for b in policy_blocks(ns) if " dir in " in b or " dir fwd " in b)


async def test_filter_policies_appear_in_the_kernel_are_replaced_and_removed(
    gateway: tuple[NetnsPair, KernelXfrmBackend, str],
) -> None:
    pair, backend, child = gateway
    ns = pair.a.netns
    negotiated = inbound(ns)
    assert len(negotiated) == 2 and all("src 10.2.0.1/32 dst 10.1.0.0/16" in b for b in negotiated)

    await backend.set_identity_filter(child, [TrafficSelector.parse("10.1.0.5/32[tcp/443]")])
    entries = inbound(ns)
    assert len(entries) == 4
    for direction in ("in", "fwd"):
        (allow,) = [b for b in entries if f"dir {direction} " in b and "dst 10.1.0.5/32" in b]
        assert "proto tcp dport 443" in allow and "priority 999" in allow and "reqid" in allow
        assert "action block" not in allow
        (block,) = [b for b in entries if f"dir {direction} " in b and "dst 10.1.0.0/16" in b]
        assert "action block priority 1000" in block and "tmpl" not in block

    await backend.set_identity_filter(child, [TrafficSelector.parse("10.1.0.6/32[udp/53]")])
    entries = inbound(ns)
    assert len(entries) == 4 and not any("10.1.0.5" in b for b in entries)
    assert sum("dst 10.1.0.6/32 proto udp dport 53" in b for b in entries) == 2

    await backend.set_identity_filter(child, [])
    entries = inbound(ns)
    assert len(entries) == 2 and all("action block" in b for b in entries)

    await backend.set_identity_filter(child, None)
    assert inbound(ns) == negotiated

    await backend.set_identity_filter(child, [TrafficSelector.parse("10.1.0.5/32[tcp/443]")])
    await backend.delete_child_sa(child)
    for policy_id in ("c-a-out", "c-a-in", "c-fwd"):
        await backend.delete_policy(policy_id)
    assert policy_blocks(ns) == []


async def test_a_packet_the_filter_does_not_grant_moves_the_namespace_counters(
    gateway: tuple[NetnsPair, KernelXfrmBackend, str],
) -> None:
    """Without ESP here, a cleartext packet from the client's namespace stands in for a
    decapsulated one: it meets the gateway's IN check and the BLOCK entry the empty filter left."""
    pair, backend, child = gateway
    gw, client = pair.a, pair.b
    await backend.set_identity_filter(child, [])
    before = await backend.identity_filter_drops()
    assert before.unattributed.get("XfrmInPolBlock") == 0
    with udp_socket_in(gw.netns, gw.inner4, 5353) as receiver, udp_socket_in(client.netns, client.inner4, 0) as sender:
        for _ in range(3):
            sender.sendto(b"denied", (gw.inner4, 5353))

        async def counted() -> bool:
            drops = await backend.identity_filter_drops()
            return drops.unattributed.get("XfrmInPolBlock", 0) >= 3

        await async_wait_until(counted, timeout=5.0, what="XfrmInPolBlock counting the blocked packets")
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(100)
    # a granted flow meets its ALLOW entry; in the clear it lacks the SA the template asks for
    await backend.set_identity_filter(child, [TrafficSelector.parse(f"{gw.inner4}/32[udp/5353]")])
    with udp_socket_in(gw.netns, gw.inner4, 5353) as receiver, udp_socket_in(client.netns, client.inner4, 0) as sender:
        sender.sendto(b"cleartext", (gw.inner4, 5353))

        async def mismatched() -> bool:
            drops = await backend.identity_filter_drops()
            return drops.unattributed.get("XfrmInTmplMismatch", 0) >= 1

        await async_wait_until(mismatched, timeout=5.0, what="XfrmInTmplMismatch counting the cleartext packet")
