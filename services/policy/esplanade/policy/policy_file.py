"""Policy as code: the whole model as one YAML file, loaded all-or-nothing with located errors.

The file::

    version: 1
    sites:
      - {id: fra1, networks: [10.1.0.0/16]}
    groups:
      - {id: engineering}
    identities:
      - id: alice
        kind: user
        ike_ids: ["email:alice@example.com"]
        groups: [engineering]
    resources:
      - {id: git, destination: 10.1.2.3, protocol: tcp, ports: [22, 443], site: fra1}
    rules:
      - id: eng-git
        groups: [engineering]
        resources: [git]
        conditions:
          time_window: {days: [mon-fri], start: "07:00", end: "20:00", timezone: Europe/Berlin}
          source_networks: [198.51.100.0/24]
          posture: [managed]

The loader reads PyYAML's node tree (compose), not constructed Python values: every scalar
is taken as the text that was written and typed by the field it sits in, so YAML 1.1
surprises (``19:00`` as the integer 1140, ``no`` as false) cannot happen, and every node
keeps its line and column for the error report. Anchors and aliases are refused (they make
small files expand into huge ones), and so are duplicate keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from esplanade.policy.decode import decode_partial_object, object_to_document, unknown_field_message
from esplanade.policy.model import KINDS, SINGULAR, Model
from esplanade.policy.problems import Path, PolicyError, Problem
from esplanade.policy.validation import validate_model

FORMAT_VERSION = 1
TOP_LEVEL_FIELDS = ("version", *KINDS)
MAX_NODES = 2_000_000
ALIAS_PROBLEM = "anchors and aliases are not supported"

Location = tuple[int, int]

# libyaml's composer and emitter when PyYAML was built with it (both keep node marks).
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Tree:
    """A YAML node tree as plain data (str/None scalars, dicts, lists) plus node locations."""

    def __init__(self) -> None:
        self.values: dict[Path, Location] = {}
        self.keys: dict[Path, Location] = {}
        self.problems: list[Problem] = []
        self._seen: set[int] = set()

    def convert(self, node: yaml.Node, path: Path) -> Any:
        mark = node.start_mark
        self.values[path] = (mark.line + 1, mark.column + 1)
        if id(node) in self._seen:
            self.problems.append(Problem(path, ALIAS_PROBLEM, mark.line + 1, mark.column + 1))
            return None
        self._seen.add(id(node))
        if len(self._seen) > MAX_NODES:
            raise _TooLarge(path, mark.line + 1, mark.column + 1)
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:null" and node.style is None:
                return None
            return str(node.value)
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.MappingNode)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_mark = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(Problem(path, "mapping keys must be plain text", *key_mark))
                continue
            key = str(key_node.value)
            if key in out:
                self.problems.append(Problem((*path, key), f"duplicate key '{key}'", *key_mark))
                continue
            self.keys[(*path, key)] = key_mark
            out[key] = self.convert(value_node, (*path, key))
        return out

    def locate(self, path: Path, at_key: bool) -> Location:
        if at_key and path in self.keys:
            return self.keys[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.values:
                return self.values[path[:end]]
        return (1, 1)


class _TooLarge(Exception):
    def __init__(self, path: Path, line: int, column: int) -> None:
        self.problem = Problem(path, f"the policy file has more than {MAX_NODES} nodes", line, column)


def load_policy_yaml(text: str) -> Model:
    """Parse and validate a whole policy file; raise `PolicyError` with every problem, by line."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise PolicyError([Problem((), f"not valid YAML: {exc.problem}", line, column)]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem((), f"not valid YAML: {exc}", 1, 1)]) from None
    if root is None:
        raise PolicyError([Problem((), "the policy file is empty", 1, 1)])
    tree = _Tree()
    try:
        data = tree.convert(root, ())
    except _TooLarge as exc:
        raise PolicyError([exc.problem]) from None
    problems = tree.problems
    if any(p.message == ALIAS_PROBLEM for p in problems):
        # An alias stands for a whole subtree; without it the rest would only add noise.
        raise PolicyError(sorted(problems, key=lambda p: (p.line, p.column)))

    def report(path: Path, message: str, at_key: bool = False) -> None:
        problems.append(Problem(path, message, *tree.locate(path, at_key)))

    def where(path: Path) -> str:
        return f"line {tree.locate((*path, 'id'), False)[0]}"

    decoded = _decode_file(data, report, where)
    if decoded is not None:
        model, positions, undecoded = decoded
        for problem in validate_model(model, lambda kind, oid: positions[(kind, oid)], undecoded):
            report(problem.path, problem.message)
    if problems or decoded is None or any(decoded[2].values()):
        problems.sort(key=lambda p: (p.line, p.column))
        raise PolicyError(problems)
    return decoded[0]


_Decoded = tuple[Model, dict[tuple[str, str], Path], dict[str, set[str]]]


def _decode_file(data: Any, report: Callable[[Path, str, bool], None], where: Callable[[Path], str]) -> _Decoded | None:
    """The objects that decoded, their paths, and the ids of objects that did not."""
    if not isinstance(data, dict):
        report((), "the policy file must be a mapping with the keys version, " + ", ".join(KINDS), False)
        return None
    for key in data:
        if key not in TOP_LEVEL_FIELDS:
            report((key,), unknown_field_message("the policy file", key, TOP_LEVEL_FIELDS), True)
    version = data.get("version")
    if version is None:
        report((), "the policy file: missing field 'version'", False)
    elif version != str(FORMAT_VERSION):
        report(("version",), f"the policy file: unsupported version '{version}' (this release reads version 1)", False)
    positions: dict[tuple[str, str], Path] = {}
    by_kind: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
    undecoded: dict[str, set[str]] = {kind: set() for kind in KINDS}
    first_seen: dict[tuple[str, str], Path] = {}
    for kind in KINDS:
        items = data.get(kind)
        if items is None:
            continue
        if not isinstance(items, list):
            report((kind,), f"the policy file: '{kind}' must be a list", False)
            continue
        for i, item in enumerate(items):
            path: Path = (kind, i)
            raw_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(raw_id, str) and (kind, raw_id) in first_seen:
                first = first_seen[(kind, raw_id)]
                message = f"duplicate {SINGULAR[kind]} id '{raw_id}' (first defined at {where(first)})"
                report((*path, "id"), message, False)
            obj, whole = decode_partial_object(kind, item, path, report)
            if isinstance(raw_id, str):
                first_seen.setdefault((kind, raw_id), path)
                if not whole:
                    undecoded[kind].add(raw_id)
            if obj is not None and obj.id and positions.setdefault((kind, obj.id), path) is path:
                by_kind[kind][obj.id] = obj
    return Model(**by_kind), positions, undecoded


def export_policy_yaml(model: Model) -> str:
    """The whole model as a policy file that `load_policy_yaml` reads back to an equal model."""
    data: dict[str, Any] = {"version": FORMAT_VERSION}
    for kind in KINDS:
        data[kind] = [object_to_document(obj) for obj in model.kind(kind).values()]
    body = yaml.dump(data, Dumper=_DUMPER, sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)
    return "# Esplanade access policy. Apply with a dry-run first: every change is listed.\n" + body
