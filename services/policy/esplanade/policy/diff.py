"""Dry-run and apply planning: what changes between two models, and what a flow would meet.

`diff` lists object changes with field-level detail, `plan_apply` turns them into store
writes that the store layer commits in one transaction (all or nothing) guarded by
`plan_conditions`, and `what_if` answers one check against both models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from esplanade.policy.compiler import Evaluator, PolicyCompiler, Resolver
from esplanade.policy.decode import object_to_document
from esplanade.policy.evaluator import CheckContext, Decision, FiveTuple
from esplanade.policy.model import KINDS, SINGULAR, Model
from esplanade.policy.problems import PolicyError
from esplanade.policy.validation import validate_model
from esplanade.store import schema


class ChangeAction(Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str  # dotted: "conditions.time_window.start"
    old: Any  # None: absent
    new: Any


@dataclass(frozen=True, slots=True)
class ObjectChange:
    action: ChangeAction
    kind: str
    id: str
    fields: tuple[FieldChange, ...]

    @property
    def key(self) -> str:
        return schema.policy_object(self.kind, self.id)

    def __str__(self) -> str:
        sign = {ChangeAction.CREATE: "+", ChangeAction.UPDATE: "~", ChangeAction.DELETE: "-"}[self.action]
        head = f"{sign} {SINGULAR[self.kind]} '{self.id}'"
        if self.action is not ChangeAction.UPDATE:
            return head
        details = "; ".join(f"{f.field}: {_show(f.old)} -> {_show(f.new)}" for f in self.fields)
        return f"{head}: {details}"


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _field_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[FieldChange, ...]:
    a, b = _flatten(old), _flatten(new)
    return tuple(FieldChange(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def diff(current: Model, desired: Model) -> list[ObjectChange]:
    """Every object created, updated (with its changed fields) or deleted, kind by kind."""
    changes: list[ObjectChange] = []
    for kind in KINDS:
        have, want = current.kind(kind), desired.kind(kind)
        for object_id in sorted(have.keys() | want.keys()):
            old, new = have.get(object_id), want.get(object_id)
            if old == new:
                continue
            old_doc = object_to_document(old) if old is not None else {}
            new_doc = object_to_document(new) if new is not None else {}
            action = ChangeAction.CREATE if old is None else ChangeAction.DELETE if new is None else ChangeAction.UPDATE
            changes.append(ObjectChange(action, kind, object_id, _field_changes(old_doc, new_doc)))
    return changes


def plan_apply(current: Model, desired: Model) -> list[tuple[str, dict[str, Any] | None]]:
    """Store writes that turn `current` into `desired`: (key, document) or (key, None) to delete.

    Raises `PolicyError` if `desired` is not valid: nothing of an invalid model is written.
    """
    problems = validate_model(desired)
    if problems:
        raise PolicyError(problems)
    writes: list[tuple[str, dict[str, Any] | None]] = []
    for change in diff(current, desired):
        if change.action is ChangeAction.DELETE:
            writes.append((change.key, None))
        else:
            writes.append((change.key, object_to_document(desired.kind(change.kind)[change.id])))
    return writes


def plan_conditions(current: Model, desired: Model) -> list[tuple[str, int]]:
    """Compare-and-swap guards for `plan_apply`'s writes: (key, expected mod_revision).

    A created key must still be absent (0); an updated or deleted one must still be at the
    revision `current` was read at. Objects read without a revision (0) are not guarded.
    """
    guards: list[tuple[str, int]] = []
    for change in diff(current, desired):
        if change.action is ChangeAction.CREATE:
            guards.append((change.key, 0))
        else:
            revision = current.kind(change.kind)[change.id].revision
            if revision:
                guards.append((change.key, revision))
    return guards


@dataclass(frozen=True, slots=True)
class WhatIf:
    current: Decision
    desired: Decision

    @property
    def changed(self) -> bool:
        return (self.current.action, self.current.rule) != (self.desired.action, self.desired.rule)


def what_if(
    current: Model,
    desired: Model,
    identity: str,
    flow: FiveTuple,
    context: CheckContext,
    resolver: Resolver | None = None,
) -> WhatIf:
    """The decision for one flow under the current model and under the desired one."""
    return WhatIf(
        Evaluator(current, resolver).check(identity, flow, context),
        Evaluator(desired, resolver).check(identity, flow, context),
    )


def affected_identities(current: Model, desired: Model, resolver: Resolver | None = None) -> list[str]:
    """Identities whose compiled access would change (for a dry-run summary)."""
    compiler = PolicyCompiler(resolver)
    compiler.load(current)
    return sorted(compiler.update(desired).changed)
