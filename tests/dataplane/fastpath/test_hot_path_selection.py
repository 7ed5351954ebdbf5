"""`dataplane.hot_path`, the status report, the pure-Python fallback without the module, and the
build hook's behaviour without a compiler."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from esplanade.config.settings import Settings
from esplanade.dataplane.fastpath import (
    CompiledEspBatch,
    HotPathUnavailable,
    PythonEspBatch,
    hot_path_status,
    load_compiled,
    make_esp_batch_core,
)
from esplanade.dataplane.fastpath.hot_path import COMPILED_MODULE
from esplanade.dataplane.fastpath.tun_frames import split_frames
from tests.dataplane.esp.suites import sa_pair
from tests.dataplane.fastpath.test_esp_differential import keys
from tests.dataplane.fastpath.twins import AEAD_SUITES, inbound, outbound

ROOT = Path(__file__).resolve().parents[3]
PACKET = bytes.fromhex("4500001c00000000401100000a0000010a000002") + bytes(8)


@pytest.fixture
def module_missing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if the package had been installed without a compiler."""
    monkeypatch.setitem(sys.modules, COMPILED_MODULE, None)  # type: ignore[arg-type]
    load_compiled.cache_clear()
    yield
    load_compiled.cache_clear()


def round_trip(requested: str) -> tuple[str, list[bytes]]:
    core, status = make_esp_batch_core(requested)  # type: ignore[arg-type]
    out_a, in_a = sa_pair(AEAD_SUITES[0], **keys(AEAD_SUITES[0]))
    core.install_outbound(outbound(out_a, reserved_upto=10), out_a)
    core.install_inbound(inbound(in_a), in_a)
    return status.active, core.decrypt(core.encrypt([PACKET] * 3, 0.0), 0.0).to_list()


def test_setting_exists_and_defaults_to_auto() -> None:
    assert Settings().dataplane.hot_path == "auto"


def test_auto_takes_the_compiled_loop() -> None:
    core, status = make_esp_batch_core("auto")
    assert isinstance(core, CompiledEspBatch) and core.hot_path == "compiled"
    assert status.active == "compiled" and "OpenSSL" in str(status.build["openssl"])
    assert round_trip("auto") == ("compiled", [PACKET] * 3)


def test_python_forced() -> None:
    core, status = make_esp_batch_core("python")
    assert isinstance(core, PythonEspBatch)
    assert status.as_dict() == {
        "requested": "python",
        "active": "python",
        "reason": "dataplane.hot_path is python",
        "build": {},
    }
    assert round_trip("python") == ("python", [PACKET] * 3)


def test_module_missing_falls_back_to_python(module_missing: None) -> None:
    status = hot_path_status("auto")
    assert status.active == "python" and "not available" in status.reason
    assert round_trip("auto") == ("python", [PACKET] * 3)
    with pytest.raises(HotPathUnavailable, match="compiled"):
        make_esp_batch_core("compiled")
    with pytest.raises(HotPathUnavailable):
        split_frames([])


def test_module_with_other_drop_reasons_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ModuleType(COMPILED_MODULE)
    fake.DROP_REASON_NAMES = ("", "replay")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, COMPILED_MODULE, fake)
    load_compiled.cache_clear()
    try:
        status = hot_path_status("auto")
        assert status.active == "python" and "drop reasons" in status.reason
    finally:
        load_compiled.cache_clear()


def _hook_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hatch_build_under_test", ROOT / "hatch_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_without_a_compiler_is_a_note_not_a_failure(tmp_path: Path) -> None:
    hook = _hook_module()
    path, why = hook.compile_espfast(ROOT, tmp_path, cc="/nonexistent/cc")
    assert path is None and "no C compiler" in why
    assert not any(tmp_path.iterdir())


def test_build_without_libssl_headers_is_a_note(tmp_path: Path) -> None:
    hook = _hook_module()
    fake_cc = tmp_path / "cc"
    fake_cc.write_text("#!/bin/sh\necho 'fatal error: openssl/evp.h: No such file or directory' >&2\nexit 1\n")
    fake_cc.chmod(0o755)
    path, why = hook.compile_espfast(ROOT, tmp_path / "out", cc=str(fake_cc))
    assert path is None and "libssl-dev" in why


def test_build_skipped_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPLANADE_BUILD_ESPFAST", "0")
    path, why = _hook_module().compile_espfast(ROOT, tmp_path)
    assert path is None and "ESPLANADE_BUILD_ESPFAST=0" in why


def test_build_with_the_system_compiler(tmp_path: Path) -> None:
    path, why = _hook_module().compile_espfast(ROOT, tmp_path)
    assert path is not None, why
    assert path.name.startswith("_espfast") and path.stat().st_size > 0
