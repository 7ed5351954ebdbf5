"""Settings: documented, strict about unknown keys, and failing in one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from esplanade.config.loading import ConfigError, load_settings, require_kek
from esplanade.config.reference import configuration_reference

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == configuration_reference(), "run `make docs`"


def test_every_setting_is_documented() -> None:
    for line in configuration_reference().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented setting: {line}"


def test_defaults_load() -> None:
    settings = load_settings(environ={})
    assert settings.store.backend == "embedded"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "esplanade.yaml"
    path.write_text("store:\n  backend: etcd\n  etcd_endpoints: ['127.0.0.1:2379']\ndataplane:\n  workers: 3\n")
    settings = load_settings(path, environ={"ESPLANADE_DATAPLANE__WORKERS": "5"})
    assert settings.store.backend == "etcd"
    assert settings.dataplane.workers == 5


@pytest.mark.parametrize(
    ("yaml_text", "environ", "message"),
    [
        ("store:\n  bakend: etcd\n", {}, "unknown setting store.bakend"),
        ("", {"ESPLANADE_STOR__BACKEND": "etcd"}, "unknown setting ESPLANADE_STOR__BACKEND"),
        ("", {"ESPLANADE_ENDPOINTS__API": "localhost"}, "bad setting endpoints.api (ESPLANADE_ENDPOINTS__API)"),
        ("store:\n  backend: etcd\n  etcd_endpoints: ['10.0.0.1:99999']\n", {}, "bad setting store.etcd_endpoints.0"),
        ("store:\n  backend: etcd\n", {}, "etcd_endpoints is required"),
        ("dataplane: [1, 2\n", {}, "is not valid YAML"),
    ],
)
def test_bad_config_names_the_setting(tmp_path: Path, yaml_text: str, environ: dict[str, str], message: str) -> None:
    path = tmp_path / "esplanade.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=environ)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_kek_is_refused() -> None:
    with pytest.raises(ConfigError, match="missing setting kek"):
        require_kek(load_settings(environ={}))


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"ESPLANADE_STORE__BACKND": "x"}, "esplanade: unknown setting ESPLANADE_STORE__BACKND"),
        (
            {"ESPLANADE_KEYEXCHANGE__LISTEN_ADDRESSES": '["10.0.0.300"]'},
            "esplanade: bad setting keyexchange.listen_addresses.0",
        ),
        ({}, "esplanade: missing setting kek"),
    ],
)
def test_cli_fails_with_one_line_and_no_traceback(environ: dict[str, str], expected: str) -> None:
    env = {"PATH": "/usr/bin:/bin", **environ}
    result = subprocess.run(
        [sys.executable, "-m", "esplanade.cli.main", "serve", "policy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
