"""Every compiled-lane test here runs twice: once with AES-GCM SAs on our VAES AES-GCM
(`csrc/espfast_aesgcm.c`) and once forced onto OpenSSL's EVP (the `_espfast.aesgcm_policy`
switch, the same one `ESPLANADE_ESP_AESGCM=openssl` sets). The accelerated run is skipped,
with the reason, only on a CPU without AES-NI/PCLMULQDQ/AVX2/VAES/VPCLMULQDQ. The sanitizer
module builds its own binaries (it covers both implementations inside its harness)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from esplanade.dataplane.fastpath.hot_path import load_compiled

IMPLEMENTATIONS = ["vaes", "openssl"]
NOT_PARAMETRIZED = ("test_sanitizer_fuzz",)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "aesgcm_implementation" in metafunc.fixturenames and not metafunc.module.__name__.endswith(NOT_PARAMETRIZED):
        metafunc.parametrize("aesgcm_implementation", IMPLEMENTATIONS, indirect=True, scope="module")


@pytest.fixture(autouse=True, scope="module")
def aesgcm_implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """The AES-GCM implementation new compiled SAs take: 'vaes' or 'openssl' ('default' unparametrized)."""
    wanted = getattr(request, "param", "default")
    module = load_compiled()[0]
    if module is None or wanted == "default":
        yield wanted
        return
    if wanted == "vaes" and module.aesgcm_accelerated() is None:
        pytest.skip("this CPU lacks AES-NI/PCLMULQDQ/AVX2/VAES/VPCLMULQDQ: only OpenSSL's AES-GCM runs here")
    previous = module.aesgcm_policy("auto" if wanted == "vaes" else "openssl")
    try:
        yield wanted
    finally:
        module.aesgcm_policy(previous)
