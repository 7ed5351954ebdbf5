"""Render the Helm chart with the real Helm SDK (helm-python-sdk, Helm's Go code over a C ABI).

No cluster is involved: `lookup` returns nothing, so generated secrets are made afresh per render.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "esplanade"
VALUE_SETS_DIR = Path(__file__).resolve().parent / "values"
RELEASE = "esp"
NAMESPACE = "esplanade"

# The configurations users choose; "default" is the chart's own values.yaml.
VALUE_SETS = ["default", *sorted(p.stem for p in VALUE_SETS_DIR.glob("*.yaml"))]

WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}


def value_set(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    loaded = yaml.safe_load((VALUE_SETS_DIR / f"{name}.yaml").read_text())
    return loaded or {}


@dataclass
class Rendered:
    """One render: every manifest document, and NOTES.txt."""

    documents: list[dict[str, Any]]
    notes: str
    texts: dict[str, str] = field(repr=False)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        matches = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
        return matches[0]

    def workloads(self) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] in WORKLOAD_KINDS]

    def containers(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(workload, container) for every container and init container."""
        for workload in self.workloads():
            spec = workload["spec"]["template"]["spec"]
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                yield workload, container

    def manifest_text(self) -> str:
        """Everything rendered except NOTES.txt, as text."""
        return "\n".join(text for path, text in self.texts.items() if not path.endswith("NOTES.txt"))


@functools.cache
def loaded_chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render(values: dict[str, Any] | None = None) -> Rendered:
    """Render the chart; a failing template raises helm.HelmError with Helm's message."""
    texts = loaded_chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)
    documents: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(texts.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        documents.extend(d for d in yaml.safe_load_all(text) if d)
    return Rendered(documents=documents, notes=notes, texts=texts)


def render_error(values: dict[str, Any]) -> str:
    """The message of a render that must fail."""
    try:
        render(values)
    except helm.HelmError as exc:
        return str(exc)
    raise AssertionError(f"render succeeded with {values}")


def component_of(document: dict[str, Any]) -> str:
    return str(document["metadata"]["labels"]["app.kubernetes.io/component"])


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def workload_of(rendered: Rendered, component: str) -> dict[str, Any]:
    matches = [w for w in rendered.workloads() if component_of(w) == component]
    assert len(matches) == 1, f"{component}: {len(matches)} workloads"
    return matches[0]
