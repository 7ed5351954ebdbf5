from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conditions import wait_until
from tests.scaleout.cluster import ScaleCluster
from tests.scaleout.probe import EchoProbe

pytestmark = [pytest.mark.netns, pytest.mark.etcd]


def test_smoke(tmp_path: Path) -> None:
    with ScaleCluster(tmp_path, nodes=3, tunnels=6) as cluster:
        cluster.start()
        cluster.install_tunnels()
        owners = cluster.wait_owned()
        print(owners)
        assert cluster.peer is not None
        with EchoProbe(cluster.peer_node.name, cluster.lan_ns, 6) as probe:
            start = time.monotonic()
            wait_until(lambda: probe.all_flowing(start + 0.5), timeout=20, what="echoes on every tunnel")
