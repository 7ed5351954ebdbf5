"""`site.inbound: dial-out-only` on a real dataplane service in its own netns: the nftables table is
there while the service runs (put back if removed) and gone after a clean stop; a bad setting is a
clear error at start and installs nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from esplanade.v1 import dataplane_pb2
from tests.conditions import wait_until
from tests.keyexchange.service.sites import Site, nsx
from tests.zerotrust.gateway import DIAL_OUT_ONLY, nft_tables

pytestmark = [pytest.mark.netns]

NS = "zt2-dialout"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(NS, 97, "198.18.97.2", "10.97.0.1", tmp_path / "site")
    try:
        s.create_netns()
        nsx(NS, "ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1")
        nsx(NS, "ip", "addr", "add", "198.18.97.2/24", "dev", "wan0")
        for dev in ("wan0", "wan1"):
            nsx(NS, "ip", "link", "set", dev, "up")
        yield s
    finally:
        s.stop()
        s.delete_netns()


def test_the_dataplane_owns_the_table_while_it_runs_and_removes_it_on_a_clean_stop(site: Site) -> None:
    assert "esplanade_dial_out" not in nft_tables(NS)
    site._start_real_dataplane(**DIAL_OUT_ONLY)
    assert "table inet esplanade_dial_out" in nft_tables(NS)
    rules = nsx(NS, "nft", "list", "table", "inet", "esplanade_dial_out").stdout
    assert "policy drop" in rules and 'iifname "mgmt0" accept' in rules
    assert site.dp is not None
    nsx(NS, "nft", "delete", "table", "inet", "esplanade_dial_out")  # someone removes it: it comes back
    wait_until(lambda: "esplanade_dial_out" in nft_tables(NS), timeout=10, what="the table reinstalled")
    # the count follows the reinstall (it goes up once nft has returned): wait for it, then it stays at 1
    wait_until(lambda: reinstalls(site) == "1", timeout=10, what="the reinstall counted in GetStatus")
    assert "esplanade_dial_out" in nft_tables(NS)
    site.stop()  # SIGTERM: a clean stop
    assert "esplanade_dial_out" not in nft_tables(NS)
    assert "dial-out only: nftables table inet esplanade_dial_out removed" in site.dp_log.read_text()


def reinstalls(site: Site) -> str:
    details = site.dp_stub().GetStatus(dataplane_pb2.GetStatusRequest(), timeout=5).details
    return details["dial_out_table_reinstalls"]


def test_a_bad_management_interface_is_a_clear_error_and_installs_nothing(site: Site) -> None:
    site._start_real_dataplane(
        wait=False, ESPLANADE_SITE__INBOUND="dial-out-only", ESPLANADE_SITE__MANAGEMENT_INTERFACES='["mgmt0; drop"]'
    )
    assert site.dp is not None
    assert site.dp.wait(30) != 0
    log = site.dp_log.read_text(errors="replace")
    assert "site.management_interfaces" in log and "not an interface name" in log, log[-2000:]
    assert "esplanade_dial_out" not in nft_tables(NS)
