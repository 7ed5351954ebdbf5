"""The Dockerfile is right where Docker cannot check it here: its stages, user and entry point,
and that the entry point it names is the package's console script and runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import typer

from esplanade.cli.main import SERVICE_MODULES
from tests.deploy.chart import REPO, component_of, pod_spec, render


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for word, arguments in self.instructions if word == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile with their instructions (line continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        word, _, arguments = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", arguments.strip(), re.IGNORECASE)
            assert match, f"bad FROM: {line}"
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif stages:
            stages[-1].instructions.append((word, arguments.strip()))
    return stages


DOCKERFILE = REPO / "Dockerfile"


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_multi_stage_build_compiles_in_the_builder_only() -> None:
    builder, runtime = stages()
    assert builder.name == "builder"
    assert builder.base == runtime.base == "${PYTHON_IMAGE}"
    build_steps = " ".join(builder.all("RUN"))
    for package in ("gcc", "libssl-dev"):
        assert re.search(rf"apt-get install .*\b{package}\b", build_steps)
    assert "pip wheel" in build_steps and "--constraint constraints.txt" in build_steps
    runtime_steps = " ".join(runtime.all("RUN"))
    assert "gcc" not in runtime_steps and "-dev" not in runtime_steps
    assert "libssl3" in runtime_steps
    assert any(c.startswith("--from=builder /opt/esplanade") for c in runtime.all("COPY"))


def test_copied_sources_exist_and_are_not_ignored() -> None:
    (builder, _) = stages()
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    }
    for copy in builder.all("COPY"):
        sources = copy.split()[:-1]
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"


def test_runs_as_a_non_root_user() -> None:
    (_, runtime) = stages()
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric user lets runAsNonRoot verify it"
    assert gid.isdigit() and int(gid) != 0
    # The chart runs the image with the same UID (and only the dataplane as root).
    for workload in render({}).workloads():
        if component_of(workload) in ("api", "policy", "keyexchange"):
            assert pod_spec(workload)["securityContext"]["runAsUser"] == int(uid)


def test_entry_point_is_the_package_console_script() -> None:
    (_, runtime) = stages()
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (command,) = runtime.all("CMD")
    assert json.loads(entrypoint) == ["esplanade"], "exec form, one image for every service"
    verb, service = json.loads(command)
    assert verb == "serve" and service in SERVICE_MODULES
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["esplanade"] == "esplanade.cli.main:app"
    module, _, attribute = scripts["esplanade"].partition(":")
    app = getattr(__import__(module, fromlist=[attribute]), attribute)
    assert isinstance(app, typer.Typer)


def test_installed_console_script_serves_help() -> None:
    script = Path(sys.executable).parent / "esplanade"
    assert script.exists(), "the package's console script is installed next to this interpreter"
    result = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "keyexchange | dataplane | policy | api" in result.stdout


def test_chart_containers_use_the_image_entry_point() -> None:
    for workload in render({}).workloads():
        component = component_of(workload)
        if component == "etcd":
            continue
        (container,) = pod_spec(workload)["containers"]
        assert "command" not in container, "the image's ENTRYPOINT runs"
        assert container["args"] == ["serve", component]
