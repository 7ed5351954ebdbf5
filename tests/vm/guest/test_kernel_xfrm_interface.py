"""Route-based VPN: an XFRM interface (if_id) carries the traffic a route sends into it.

Both gateways get an `xfrm` interface with if_id 42 and catch-all policies and SAs bound
to that if_id. Such policies match only packets routed through the interface, so the route
alone decides what is protected: with the route the ping passes through the SA; with the
route pointing at the veth, the same ping passes in the clear and the SA counters stay still.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from esplanade.ipsec.selectors import TrafficSelector
from tests.dataplane.kernel.backend_harness import started_backend
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.netns_topology import NetnsPair, in_netns, ip_batch, netns_pair

pytestmark = pytest.mark.vm
IF_ID = 42


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as p:
        yield p


def ping(netns: str, src: str, dst: str) -> int:
    return in_netns(netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", "-I", src, dst, check=False).returncode


async def test_xfrm_interface_carries_routed_traffic(pair: NetnsPair) -> None:
    a, b = Peer(pair.a.outer4, pair.a.inner4), Peer(pair.b.outer4, pair.b.inner4)
    record_a, record_b = child_sa_pair("xfrmi", a, b, TRANSFORMS_BY_LABEL["aes256gcm16"], if_id=IF_ID)
    anywhere = TrafficSelector.from_network("0.0.0.0/0")
    async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
        for side, backend, record, peer in ((pair.a, backend_a, record_a, b), (pair.b, backend_b, record_b, a)):
            index = await backend.add_xfrm_interface("ipsec0", IF_ID)
            assert index > 0
            policies = protect_policies(record, if_id=IF_ID, local_ts=anywhere, remote_ts=anywhere)
            await backend.install_child_sa(record, policies)
            # the plain route to the peer's inner address goes away: only ipsec0 leads there
            ip_batch([f"route replace {peer.inner}/32 dev ipsec0 src {side.inner4}"], netns=side.netns)

        assert ping(pair.a.netns, a.inner, b.inner) == 0
        packets = {(c.spi, c.direction): c.packets for c in backend_a.counters()}
        assert packets[(record_a.outbound.spi, "out")] == 2
        assert packets[(record_a.inbound.spi, "in")] == 2

        # Route through the veth on both sides: policies bound to an if_id only see packets
        # of their interface, so the same catch-all policies let the ping pass in the clear.
        ip_batch([f"route replace {b.inner}/32 via {b.outer} src {a.inner}"], netns=pair.a.netns)
        ip_batch([f"route replace {a.inner}/32 via {a.outer} src {b.inner}"], netns=pair.b.netns)
        assert ping(pair.a.netns, a.inner, b.inner) == 0
        packets = {(c.spi, c.direction): c.packets for c in backend_a.counters()}
        assert packets[(record_a.outbound.spi, "out")] == 2
        assert packets[(record_a.inbound.spi, "in")] == 2

        await backend_a.delete_xfrm_interface("ipsec0")
        assert "ipsec0" not in in_netns(pair.a.netns, "ip", "-br", "link").stdout
