"""The shared namespace test bed builds what it promises and leaves nothing behind."""

from __future__ import annotations

import os

import pytest
from pyroute2 import netns

from tests.netns_topology import Topology

pytestmark = pytest.mark.netns


def test_three_nodes_on_a_bridge_with_site_hosts_and_a_clean_teardown() -> None:
    topo = Topology("dpth-", 3, site_hosts=True)
    with topo:
        names = [ns for node in topo.nodes for ns in node.namespaces()] + [str(topo.switch_ns)]
        assert set(names) <= set(netns.listnetns())
        for node in topo.nodes:
            for other in topo.nodes:
                if other is not node:
                    assert node.run(["ping", "-c1", "-W2", other.underlay_addr]).returncode == 0
            # the host reaches its gateway, but no other site: that is the tunnel's job
            assert node.run(["ping", "-c1", "-W2", node.site_addr], host=True).returncode == 0
        a, b = topo.nodes[:2]
        assert b.host_addr is not None
        assert a.run(["ping", "-c1", "-W1", b.host_addr], host=True).returncode != 0
        sleeper = a.popen(["sleep", "600"])
        stray = b.popen(["sleep", "600"], host=True)
    assert sleeper.poll() is not None and stray.poll() is not None
    assert not set(names) & set(netns.listnetns())


def test_teardown_also_runs_when_the_test_body_fails() -> None:
    topo = Topology("dpth-", 2)
    with pytest.raises(RuntimeError), topo:
        created = [n.name for n in topo.nodes]
        proc = topo.nodes[0].popen(["sleep", "600"])
        raise RuntimeError("test body failed")
    assert not set(created) & set(netns.listnetns())
    assert proc.poll() is not None
    assert not os.path.exists(f"/proc/{proc.pid}/status") or proc.returncode is not None
