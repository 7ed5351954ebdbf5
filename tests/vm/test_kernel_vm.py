"""The kernel backend against a kernel with ESP: Debian's 6.1 under qemu (TCG).

One boot runs the whole guest suite (tests/vm/guest) with pytest inside the VM, since
Python there is 13-30x slower and every boot and interpreter start costs seconds. Each
guest test function then shows up here as its own test, passing if all its cases
passed in the VM. The run is bounded by `VM_SUITE_TIMEOUT`.
"""

from __future__ import annotations

import ast
import compileall
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm.harness import VmResult, ensure_vm_ready, run_in_vm

VM_SUITE_TIMEOUT = 1200.0  # ~10 min on a loaded 2-core machine, most of it the service tests
# the fixture's VM run counts against the first test's pytest-timeout
pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(VM_SUITE_TIMEOUT + 120)]

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(__file__).resolve().parent / "guest"


def guest_test_names() -> list[str]:
    """`module::function` of every test function in the guest suite (read, not imported)."""
    names = []
    for path in sorted(GUEST_DIR.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                names.append(f"{path.stem}::{node.name}")
    return names


@dataclass
class GuestRun:
    result: VmResult
    cases: dict[str, list[tuple[str, str, str]]]  # module::function -> [(case, outcome, message)]


def parse_junit(path: Path) -> dict[str, list[tuple[str, str, str]]]:
    cases: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314 - our own report
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "")
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                message = (child.get("message") or "") + "\n" + (child.text or "")
        cases[f"{module}::{name.split('[', 1)[0]}"].append((name, outcome, message))
    return cases


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    ensure_vm_ready()
    # compiled here, once: the guest would otherwise compile into its throw-away overlay
    for part in ("lib", "services", "tests"):
        compileall.compile_dir(ROOT / part, quiet=1)
    report_dir = tmp_path_factory.mktemp("vm-report")
    report = report_dir / "guest.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(GUEST_DIR.relative_to(ROOT)),
        "-q",
        "-p",
        "no:cacheprovider",
        "--durations=15",
        f"--junitxml={report}",
    ]
    result = run_in_vm(command, timeout=VM_SUITE_TIMEOUT, cwd=ROOT, rw_dir=report_dir)
    # the guest's own summary (slowest tests) shows with `pytest -s` or `-rP`
    sys.stdout.write(f"\n[vm] guest suite: exit {result.returncode} after {result.seconds:.1f}s\n")
    sys.stdout.write(result.stdout[-4000:])
    if not report.exists():
        pytest.fail(f"the guest suite produced no report:\n{result.describe()}")
    return GuestRun(result, parse_junit(report))


@pytest.mark.parametrize("name", guest_test_names())
def test_in_kernel_vm(guest_run: GuestRun, name: str) -> None:
    cases = guest_run.cases.get(name)
    assert cases, f"{name} did not run in the VM:\n{guest_run.result.describe()}"
    failed = [f"{case}: {outcome}\n{message}" for case, outcome, message in cases if outcome != "passed"]
    assert not failed, "\n\n".join(failed)
