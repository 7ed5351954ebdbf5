"""Inside the VM only: load the kernel modules the guest tests need.

These tests are collected by the pytest run *inside* the VM (tests/vm/test_kernel_vm.py
starts it); tests/vm/conftest.py keeps the host's pytest away from them.
"""

from __future__ import annotations

import os
import subprocess

import pytest

# No udev in the guest: nothing loads drivers on device events. The kernel's own
# request_module() still loads esp4, crypto templates etc. on demand, but aesni_intel
# (picked by CPU feature, not by name) would never load, and GCM would run on aes-generic.
GUEST_MODULES = (
    "xfrm_user",
    "esp4",
    "esp6",
    "ah4",
    "ah6",
    "xfrm_interface",
    "veth",
    "tun",  # the userspace backend's TUN (tests/vm/guest/test_mixed_backends.py)
    "aesni_intel",
    "chacha20poly1305",
)


@pytest.fixture(scope="session", autouse=True)
def guest_kernel_modules() -> None:
    if os.environ.get("ESPLANADE_IN_VM") != "1":
        pytest.fail("guest tests run inside the VM: use tests/vm/test_kernel_vm.py")
    proc = subprocess.run(["modprobe", "-a", *GUEST_MODULES], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"modprobe failed: {proc.stderr}"
