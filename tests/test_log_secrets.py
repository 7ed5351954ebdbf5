"""The log scanner finds a secret in every form it may take in a log line, and nothing else."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.log_secrets import find_leaks, is_log, logs_under

KEY = bytes(range(0xA0, 0xC0))


def test_every_form_is_found(tmp_path: Path) -> None:
    forms = {
        "hex.log": KEY.hex(),
        "HEX.log": KEY.hex().upper(),
        "b64.jsonl": base64.b64encode(KEY).decode(),
        "b64url.log": base64.urlsafe_b64encode(KEY).decode().rstrip("="),
        "colons.log": ":".join(f"{b:02X}" for b in KEY),
        "raw.log": "psk=marker-secret-123",
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(f'{{"message": "x {text} y"}}\n')
    (tmp_path / "clean.log").write_text('{"message": "nothing here"}\n')
    (tmp_path / "charon.log").write_text(KEY.hex())  # the oracle's own log is not ours
    (tmp_path / "swanctl.conf").write_text(KEY.hex())  # configuration, not a log
    logs = logs_under(tmp_path)
    assert {p.name for p in logs} == set(forms) | {"clean.log"}
    leaks = find_leaks(logs, {KEY: "key", b"marker-secret-123": "marker"})
    assert {leak.split(":")[0].rsplit("/", 1)[1] for leak in leaks} == set(forms)
    assert not is_log(tmp_path / "missing.log")
