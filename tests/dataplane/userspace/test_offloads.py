"""Offload detection on this kernel, and the feature-by-feature fallback decisions."""

from __future__ import annotations

import os

import pytest

from esplanade.dataplane.userspace.offloads import (
    TSO_OFFLOADS,
    USO_OFFLOADS,
    OffloadReport,
    TunOffloadMode,
    choose_features,
    detect_offloads,
)
from esplanade.dataplane.userspace.tun import TunError, TunOffload
from tests.netns_topology import inside_netns


def _kernel_at_least(major: int, minor: int) -> bool:
    found = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    return found >= (major, minor)


@pytest.mark.netns
def test_detection_reports_what_this_kernel_offers(scratch: str) -> None:
    with inside_netns(scratch):
        report = detect_offloads()
    assert report.kernel == os.uname().release
    assert report.tun_vnet_hdr and report.tun_multi_queue and report.tun_csum and report.tun_tso
    assert report.tun_uso is _kernel_at_least(6, 2)
    assert report.udp_gso is _kernel_at_least(4, 18)
    assert report.udp_gro is _kernel_at_least(5, 0)
    assert report.reuseport_cbpf
    assert report.as_dict()["kernel"] == report.kernel
    with inside_netns(scratch):
        assert "espprobe" not in " ".join(os.listdir("/sys/class/net")), "the probe device is gone"


def _full() -> OffloadReport:
    return OffloadReport(
        kernel="6.18",
        tun_vnet_hdr=True,
        tun_multi_queue=True,
        tun_csum=True,
        tun_tso=True,
        tun_uso=True,
        udp_gso=True,
        udp_gro=True,
        reuseport_cbpf=True,
    )


def test_everything_available_uses_merged_writes_and_no_tun_offload_by_default() -> None:
    features = choose_features(_full())
    assert features.vnet_hdr and features.merge_tcp and features.merge_udp
    assert features.udp_gso and features.udp_gro
    assert features.tun_offload == TunOffload.NONE
    assert choose_features(_full(), tun_mode=TunOffloadMode.TSO).tun_offload == TSO_OFFLOADS | USO_OFFLOADS


def test_debian_12_kernel_without_tun_uso_falls_back_for_udp_only() -> None:
    report = _full()
    report.tun_uso = False
    features = choose_features(report, tun_mode=TunOffloadMode.TSO)
    assert features.merge_tcp and not features.merge_udp
    assert features.tun_offload == TSO_OFFLOADS
    assert any("6.2" in reason for reason in features.reasons)


def test_each_missing_piece_falls_back_on_its_own() -> None:
    report = _full()
    report.udp_gso = False
    report.udp_gro = False
    report.tun_vnet_hdr = False
    features = choose_features(report)
    assert not (features.udp_gso or features.udp_gro or features.vnet_hdr or features.merge_tcp)
    assert len(features.reasons) >= 3
    off = choose_features(_full(), want_offloads=False)
    assert not (off.vnet_hdr or off.udp_gso or off.udp_gro) and "disabled" in off.reasons[0]
    report = _full()
    report.tun_multi_queue = False
    with pytest.raises(TunError):
        choose_features(report, workers=2)
