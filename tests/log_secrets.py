"""No PSK or key material in any log the test suite produces.

Tests plant secrets (`plant`): a marker PSK, the derived SA keys of a tunnel (taken from the
strongSwan peer's key dumps, an independent oracle). At the end of the session every log
under the session's temporary directory is searched for each of them, raw, in hex (either
case) and in base64 (standard and URL-safe, with or without padding); a find fails the run.

What counts as a log: files named `*.log`, `*.jsonl`, `*.out`, `*.err`, or with "log" in
the name (the services' JSON logs of `esplanade up`, site processes, flow exports, the
audit and flow journals), plus every record the test process itself logged (a root handler
writes them to `esplanade-inprocess.log` in the session directory). strongSwan's own debug
log (`charon.log`) is the oracle that prints the keys on purpose, so it is left out; so are
configuration files (swanctl.conf holds the PSK by design).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from esplanade.telemetry.logs import JsonLineFormatter

_planted: dict[bytes, str] = {}  # secret -> what it is (for the report; never the value)
LOG_SUFFIXES = (".log", ".jsonl", ".out", ".err")
EXCLUDED_NAMES = frozenset({"charon.log"})
MIN_SECRET = 8  # shorter byte strings match by chance


def plant(secret: bytes | str, what: str) -> None:
    value = secret.encode() if isinstance(secret, str) else secret
    if len(value) >= MIN_SECRET:
        _planted.setdefault(value, what)


def planted() -> dict[bytes, str]:
    return dict(_planted)


def forms(secret: bytes) -> list[tuple[str, bytes]]:
    out = [("raw", secret), ("hex", secret.hex().encode()), ("HEX", secret.hex().upper().encode())]
    for name, encoded in (("base64", base64.b64encode(secret)), ("base64url", base64.urlsafe_b64encode(secret))):
        out.append((name, encoded))
        out.append((f"{name} unpadded", encoded.rstrip(b"=")))
    # hex dumps with separators (xx:xx:.., "xx xx ..")
    out.append(("hex:colon", ":".join(f"{b:02x}" for b in secret).encode()))
    out.append(("hex spaced", " ".join(f"{b:02x}" for b in secret).encode()))
    return out


def is_log(path: Path) -> bool:
    if path.name in EXCLUDED_NAMES or not path.is_file():
        return False
    return path.suffix in LOG_SUFFIXES or "log" in path.name.lower()


def find_leaks(paths: list[Path], secrets: dict[bytes, str]) -> list[str]:
    searches = [(what, form, needle) for secret, what in secrets.items() for form, needle in forms(secret)]
    leaks = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        lowered = data.lower()
        for what, form, needle in searches:
            haystack = lowered if form in ("hex", "hex:colon", "hex spaced") else data
            if needle in haystack:
                leaks.append(f"{path}: {what} ({form})")
    return leaks


def logs_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if is_log(p))


_session_root: Path | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _session_root
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    _session_root = Path(factory.getbasetemp())
    handler = logging.FileHandler(_session_root / "esplanade-inprocess.log", encoding="utf-8")
    handler.setFormatter(JsonLineFormatter("tests"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO:  # INFO lines are where a careless secret would go
        root.setLevel(logging.INFO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.keyexchange.interop import PSK as INTEROP_PSK
    from tests.keyexchange.peers import PSK as MEMORY_PSK

    if _session_root is None:
        return
    plant(INTEROP_PSK, "the strongSwan interop PSK")
    plant(MEMORY_PSK, "the in-memory peers' PSK")
    for handler in logging.getLogger().handlers:
        handler.flush()
    leaks = find_leaks(logs_under(_session_root), planted())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("-", f"log secret scan: {len(planted())} secrets, {len(logs_under(_session_root))} logs")
    if leaks:
        if reporter is not None:
            reporter.write_line("SECRET MATERIAL IN LOGS:\n" + "\n".join(leaks), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
