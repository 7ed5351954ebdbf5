"""Automatic backend choice: kernel when it has ESP and the algorithms, userspace otherwise."""

from __future__ import annotations

import pytest

from esplanade.dataplane.backend import InvalidArgument, Unsupported
from esplanade.dataplane.backend_selection import BackendMode, choose_backend
from esplanade.dataplane.kernel.esp_probe import DEFAULT_REQUIRED, PROBE_NAMES, KernelEspProbe

NO_ESP = KernelEspProbe(
    False,
    "kernel lacks ESP (xfrm_state add: EPROTONOSUPPORT: Requested type not found)",
    {name: "EPROTONOSUPPORT: Requested type not found" for name in PROBE_NAMES},
)
FULL = KernelEspProbe(True, "kernel has ESP (probe installed aes128gcm16, ...)", dict.fromkeys(PROBE_NAMES, ""))
NO_CHACHA = KernelEspProbe(
    True, "kernel has ESP", {**FULL.results, "chacha20poly1305": "ENOSYS: Requested AEAD algorithm not found"}
)


def test_auto_picks_userspace_with_the_probe_reason_when_esp_is_missing() -> None:
    choice = choose_backend("auto", probe=lambda: NO_ESP)
    assert choice.name == "userspace"
    assert choice.reason == "kernel lacks ESP (xfrm_state add: EPROTONOSUPPORT: Requested type not found)"


def test_auto_picks_the_kernel_when_everything_is_there() -> None:
    choice = choose_backend(BackendMode.AUTO, probe=lambda: FULL)
    assert choice.name == "kernel" and "all required algorithms available" in choice.reason
    assert set(DEFAULT_REQUIRED) <= set(choice.capabilities)


def test_auto_picks_userspace_when_a_required_algorithm_is_missing() -> None:
    choice = choose_backend("auto", probe=lambda: NO_CHACHA)
    assert choice.name == "userspace"
    assert "lacks chacha20poly1305 (ENOSYS: Requested AEAD algorithm not found)" in choice.reason
    assert choose_backend("auto", required=("aes128gcm16",), probe=lambda: NO_CHACHA).name == "kernel"


def test_explicit_overrides() -> None:
    def no_probe() -> KernelEspProbe:
        raise AssertionError("userspace must not probe the kernel")

    assert choose_backend("userspace", probe=no_probe).reason == "userspace backend selected by configuration"
    assert choose_backend("kernel", probe=lambda: FULL).name == "kernel"
    with pytest.raises(Unsupported, match="kernel backend requested, but kernel lacks ESP"):
        choose_backend("kernel", probe=lambda: NO_ESP)
    with pytest.raises(Unsupported, match="chacha20poly1305"):
        choose_backend("kernel", probe=lambda: NO_CHACHA)
    with pytest.raises(InvalidArgument, match="not one of auto, kernel, userspace"):
        choose_backend("dpdk", probe=lambda: FULL)
