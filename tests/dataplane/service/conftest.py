from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.manual_sites import SiteService, random_kek
from tests.netns_topology import Topology

PREFIX = "dps-"


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, SiteService, SiteService]]:
    """Two test-bed nodes, each running the real dataplane service on its own embedded store."""
    workdir = tmp_path_factory.mktemp("dps-sites")
    kek = random_kek()
    with Topology(PREFIX, 2) as topo:
        a, b = topo.nodes
        site_a = SiteService(a, workdir, "site-a", kek)
        site_b = SiteService(b, workdir, "site-b", kek)
        try:
            site_a.start()
            site_b.start()
            yield topo, site_a, site_b
        finally:
            codes = (site_a.stop(), site_b.stop())
            assert codes == (0, 0), f"dataplane exit codes {codes}: {site_a.log()[-2000:]} {site_b.log()[-2000:]}"


def store_path(site: SiteService) -> Path:
    return site.workdir / f"{site.name}-store.db"
