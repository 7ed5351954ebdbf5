from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns_topology import scratch_netns

NETNS_PREFIX = "dpth-"


@pytest.fixture
def scratch() -> Iterator[str]:
    """A fresh network namespace (lo up) for one test; gone afterwards."""
    with scratch_netns(NETNS_PREFIX) as name:
        yield name
