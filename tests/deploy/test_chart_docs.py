"""The chart's values are documented, in values.yaml, in README.md and in values.schema.json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import ModuleType
from typing import Any

import yaml

from tests.deploy.chart import CHART_DIR, REPO

VALUES_TEXT = (CHART_DIR / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
README = (CHART_DIR / "README.md").read_text()
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def table_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_values_table", REPO / "scripts" / "chart_values_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def leaf_paths(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        return [p for key, value in values.items() for p in leaf_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_readme_values_table_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chart_values_table.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_every_top_level_value_appears_in_the_readme_table() -> None:
    table = README.split("<!-- values-table:start", 1)[1]
    for key in VALUES:
        assert f"| `{key}` |" in table or f"| `{key}." in table, f"{key} missing from README.md"


def test_every_value_is_documented() -> None:
    documented = {row.path for row in table_generator().documented_values(VALUES_TEXT)}
    for path in leaf_paths(VALUES):
        prefixes = [".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 2)]
        assert any(p in documented for p in prefixes), f"{path} has no `# --` comment"


def test_schema_knows_every_value_and_nothing_else() -> None:
    def walk(values: dict[str, Any], schema: dict[str, Any], where: str) -> None:
        properties = schema.get("properties", {})
        for key, value in values.items():
            assert key in properties, f"{where}{key} is not in values.schema.json"
            if isinstance(value, dict) and properties[key].get("additionalProperties") is False:
                walk(value, properties[key], f"{where}{key}.")
        if schema.get("additionalProperties") is False and not where.endswith("resources."):
            extra = set(properties) - set(values) - {"global"}
            assert not extra, f"{where}: schema properties without a value: {extra}"

    walk(VALUES, SCHEMA, "")
