"""Start-up refusals that must happen before anything is created, and the runner's settings parsing."""

from __future__ import annotations

import pytest

from esplanade.dataplane.userspace.datapath import DatapathSettings, DatapathStartError, OuterKind, UserspaceDatapath
from esplanade.dataplane.userspace.diagnostic_node import settings_from_document
from esplanade.dataplane.userspace.mtu import DfPolicy
from esplanade.dataplane.userspace.offloads import TunOffloadMode
from esplanade.dataplane.userspace.passthrough_transform import PassThroughTransform
from esplanade.dataplane.userspace.transform import PacketTransform, WorkerContext


def _passthrough(context: WorkerContext) -> PacketTransform:
    return PassThroughTransform([], context)


def test_a_diagnostic_transform_needs_explicit_consent() -> None:
    datapath = UserspaceDatapath(DatapathSettings(tun_name="never0"), _passthrough)
    with pytest.raises(DatapathStartError, match="diagnostic"):
        datapath.start()
    assert datapath.device is None


@pytest.mark.parametrize(
    "settings",
    [DatapathSettings(workers=0, diagnostic_transform=True), DatapathSettings(path_mtu=500, diagnostic_transform=True)],
)
def test_impossible_settings_are_refused_up_front(settings: DatapathSettings) -> None:
    datapath = UserspaceDatapath(settings, _passthrough)
    with pytest.raises(DatapathStartError):
        datapath.start()
    assert datapath.device is None


def test_runner_settings_from_json() -> None:
    settings = settings_from_document(
        {"outer": "raw", "tun_offload_mode": "tso", "outer_df": "clear", "routes": ["10.0.0.0/8"], "workers": 2}
    )
    assert settings.outer is OuterKind.RAW and settings.tun_offload_mode is TunOffloadMode.TSO
    assert settings.outer_df is DfPolicy.CLEAR and settings.routes == ("10.0.0.0/8",) and settings.workers == 2
    with pytest.raises(ValueError, match="unknown settings"):
        settings_from_document({"tun": "x"})
