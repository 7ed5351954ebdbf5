"""The incremental policy compiler: model changes in, changed per-identity outputs out.

Identities with the same (existing) groups have the same access, so the compiler compiles
once per distinct group set (an "access class") and hands every member the class's output:
the `AccessIndex` the evaluator scans and the parts of the compiled document.

A change marks what it can affect and nothing else:
- a rule: the classes holding any of its old or new groups (not if only its description moved);
- a resource: the classes holding a group of a rule that names it (not for a site or
  description change: those change no packet's fate);
- a DNS resolution: as the resources with that name;
- a group created or deleted: the identities that list it (their class changes);
- an identity: itself (it may move to another class, compiled already or not);
- a site: nothing.
Only identities whose document actually changed are returned, so only those store keys are
rewritten.

DNS-name resources are resolved by an injected resolver when the compiler first meets the
name (a fake in tests; in the service, a cache the shell fills). The shell re-resolves on
its own schedule and calls `set_resolution`, which recompiles only the classes concerned.
A name without addresses grants nothing (fail closed) and is listed as "unresolved". Access
follows whatever the trusted resolver returns: resolve with the organisation's own DNS.

The compiler trusts no reference: a rule naming a missing group or resource grants nothing
for it, and a group that does not exist confers nothing (deleting a group revokes access).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from esplanade.policy.compiled import CompiledPolicy, compiled_document, parts_digest
from esplanade.policy.decode import conditions_to_document
from esplanade.policy.evaluator import AccessIndex, CheckContext, Decision, FiveTuple, Grant, deny_unknown_identity
from esplanade.policy.model import KIND_OF, Conditions, Identity, IPAddress, Model, PolicyObject, Resource, Rule
from esplanade.policy.selector_sets import merged_spans, selector_text
from esplanade.policy.spans import Span, resource_spans
from esplanade.store import schema

Resolver = Callable[[str], Sequence[str]]  # DNS name -> addresses (raise or return [] when unknown)
ClassKey = frozenset[str]


@dataclass(frozen=True, slots=True)
class Removal:
    kind: str
    id: str


Change = PolicyObject | Removal


@dataclass(slots=True)
class CompileStats:
    classes_compiled: int = 0
    identities_recompiled: int = 0  # members of the classes compiled (each got a fresh output)

    def reset(self) -> None:
        self.classes_compiled = 0
        self.identities_recompiled = 0


@dataclass(frozen=True, slots=True)
class CompileResult:
    """Identities whose compiled document changed: the new document, or None if the identity is gone."""

    changed: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)

    def writes(self) -> list[tuple[str, dict[str, Any] | None]]:
        """(store key, document or None to delete), for one store transaction."""
        return [(schema.compiled_policy(identity), doc) for identity, doc in sorted(self.changed.items())]


@dataclass(slots=True)
class _AccessClass:
    index: AccessIndex
    part_documents: list[dict[str, Any]]  # shared by every member's document: read-only
    unresolved: tuple[str, ...]
    digest: str
    members: set[str] = field(default_factory=set)


class PolicyCompiler:
    def __init__(self, resolver: Resolver | None = None) -> None:
        self._resolver = resolver
        self.model = Model()
        self.stats = CompileStats()
        self._rules_by_group: dict[str, set[str]] = {}
        self._rules_by_resource: dict[str, set[str]] = {}
        self._identities_by_group: dict[str, set[str]] = {}
        self._resources_by_name: dict[str, set[str]] = {}
        self._resolved: dict[str, tuple[IPAddress, ...]] = {}
        self._spans: dict[str, tuple[Span, ...]] = {}
        self._class_of: dict[str, ClassKey] = {}
        self._classes: dict[ClassKey, _AccessClass] = {}
        self._digests: dict[str, str] = {}

    # -- feeding it ---------------------------------------------------------------------------
    def load(self, model: Model) -> CompileResult:
        """Compile `model` from scratch (replacing whatever was loaded)."""
        resolver, stats = self._resolver, self.stats
        self.__init__(resolver)  # type: ignore[misc]
        self.stats = stats
        return self.apply(model.objects())

    def update(self, desired: Model) -> CompileResult:
        """Move to `desired`, recompiling only what the difference affects."""
        changes: list[Change] = []
        for kind in ("sites", "groups", "identities", "resources", "rules"):
            current, wanted = self.model.kind(kind), desired.kind(kind)
            changes += [obj for oid, obj in wanted.items() if current.get(oid) != obj]
            changes += [Removal(kind, oid) for oid in current if oid not in wanted]
        return self.apply(changes)

    def apply(self, changes: Iterable[Change]) -> CompileResult:
        """Apply puts (objects) and removals, as a store watch delivers them."""
        dirty_groups: set[str] = set()
        dirty_identities: set[str] = set()
        model = self.model
        objects: dict[str, dict[str, Any]] = {kind: dict(model.kind(kind)) for kind in KIND_OF.values()}
        for change in changes:
            if isinstance(change, Removal):
                kind, oid, new = change.kind, change.id, None
            else:
                kind, oid, new = KIND_OF[type(change)], change.id, change
            old = objects[kind].get(oid)
            if new is None:
                objects[kind].pop(oid, None)
            else:
                objects[kind][oid] = new
            if kind == "rules":
                dirty_groups |= self._rule_changed(cast(Rule | None, old), cast(Rule | None, new))
            elif kind == "resources":
                old_res, new_res = cast(Resource | None, old), cast(Resource | None, new)
                dirty_groups |= self._resource_changed(oid, old_res, new_res, objects["rules"])
            elif kind == "groups":
                if (old is None) != (new is None):
                    dirty_identities |= self._identities_by_group.get(oid, set())
            elif kind == "identities":
                self._identity_changed(oid, cast(Identity | None, old), cast(Identity | None, new))
                dirty_identities.add(oid)
        self.model = Model(**objects)
        return self._recompile(dirty_groups, dirty_identities)

    def set_resolution(self, name: str, addresses: Sequence[str]) -> CompileResult:
        """New addresses for a DNS name (the shell re-resolved it)."""
        parsed = _parse_addresses(addresses)
        name = name.lower().removesuffix(".")
        if self._resolved.get(name) == parsed:
            return CompileResult()
        self._resolved[name] = parsed
        dirty: set[str] = set()
        for resource_id in self._resources_by_name.get(name, set()):
            self._spans.pop(resource_id, None)
            for rule_id in self._rules_by_resource.get(resource_id, set()):
                dirty.update(self.model.rules[rule_id].groups)
        return self._recompile(dirty, set())

    def dns_names(self) -> set[str]:
        """Every DNS name that some resource uses (for the shell to keep resolved)."""
        return {name for name, ids in self._resources_by_name.items() if ids}

    # -- index maintenance --------------------------------------------------------------------
    def _rule_changed(self, old: Rule | None, new: Rule | None) -> set[str]:
        if (
            old is not None
            and new is not None
            and (old.groups, old.resources, old.conditions)
            == (
                new.groups,
                new.resources,
                new.conditions,
            )
        ):
            return set()
        if old is not None:
            for g in old.groups:
                self._rules_by_group.get(g, set()).discard(old.id)
            for r in old.resources:
                self._rules_by_resource.get(r, set()).discard(old.id)
        if new is not None:
            for g in new.groups:
                self._rules_by_group.setdefault(g, set()).add(new.id)
            for r in new.resources:
                self._rules_by_resource.setdefault(r, set()).add(new.id)
        return set(old.groups if old else ()) | set(new.groups if new else ())

    def _resource_changed(
        self, resource_id: str, old: Resource | None, new: Resource | None, rules: Mapping[str, Rule]
    ) -> set[str]:
        if (
            old is not None
            and new is not None
            and (old.destination, old.protocol, old.ports, old.icmp_types)
            == (
                new.destination,
                new.protocol,
                new.ports,
                new.icmp_types,
            )
        ):
            return set()
        self._spans.pop(resource_id, None)
        if old is not None and old.destination.dns_name:
            self._resources_by_name.get(old.destination.dns_name, set()).discard(resource_id)
        if new is not None and new.destination.dns_name:
            name = new.destination.dns_name
            self._resources_by_name.setdefault(name, set()).add(resource_id)
            if name not in self._resolved:
                self._resolved[name] = self._resolve(name)
        dirty: set[str] = set()
        for rule_id in self._rules_by_resource.get(resource_id, set()):
            dirty.update(rules[rule_id].groups)
        return dirty

    def _identity_changed(self, identity_id: str, old: Identity | None, new: Identity | None) -> None:
        for g in old.groups if old else ():
            self._identities_by_group.get(g, set()).discard(identity_id)
        for g in new.groups if new else ():
            self._identities_by_group.setdefault(g, set()).add(identity_id)

    def _resolve(self, name: str) -> tuple[IPAddress, ...]:
        if self._resolver is None:
            return ()
        try:
            return _parse_addresses(self._resolver(name))
        except Exception:  # a resolver failure grants nothing: fail closed, retried by set_resolution
            return ()

    # -- compiling ----------------------------------------------------------------------------
    def _recompile(self, dirty_groups: set[str], dirty_identities: set[str]) -> CompileResult:
        model = self.model
        joining: dict[ClassKey, set[str]] = {}
        for identity_id in dirty_identities:
            old_key = self._class_of.pop(identity_id, None)
            if old_key is not None:
                self._classes[old_key].members.discard(identity_id)
            identity = model.identities.get(identity_id)
            if identity is not None:
                key = frozenset(g for g in identity.groups if g in model.groups)
                self._class_of[identity_id] = key
                joining.setdefault(key, set()).add(identity_id)
        for key in [k for k, c in self._classes.items() if not c.members and k not in joining]:
            del self._classes[key]
        stale = {key for key in self._classes if key & dirty_groups} | (joining.keys() - self._classes.keys())
        touched = set(dirty_identities)
        for key in stale:
            members = self._classes[key].members if key in self._classes else set()
            self._classes[key] = self._compile_class(key)
            self._classes[key].members = members
            touched |= members
        for key, ids in joining.items():
            self._classes[key].members |= ids
        self.stats.classes_compiled += len(stale)
        self.stats.identities_recompiled += sum(len(self._classes[key].members) for key in stale)
        changed: dict[str, dict[str, Any] | None] = {}
        for identity_id in touched:
            class_key = self._class_of.get(identity_id)
            if class_key is None:
                if self._digests.pop(identity_id, None) is not None:
                    changed[identity_id] = None
                continue
            access = self._classes[class_key]
            if self._digests.get(identity_id) != access.digest:
                self._digests[identity_id] = access.digest
                changed[identity_id] = self._document(identity_id, access)
        return CompileResult(changed)

    def _spans_of(self, resource_id: str) -> tuple[Span, ...]:
        cached = self._spans.get(resource_id)
        if cached is not None:
            return cached
        resource = self.model.resources.get(resource_id)
        spans: tuple[Span, ...] = ()
        if resource is not None:
            name = resource.destination.dns_name
            spans = resource_spans(resource, self._resolved.get(name, ()) if name else ())
        self._spans[resource_id] = spans
        return spans

    def _compile_class(self, key: ClassKey) -> _AccessClass:
        model = self.model
        rule_ids = sorted({rule_id for g in key for rule_id in self._rules_by_group.get(g, ())})
        grants: list[tuple[Span, Grant]] = []
        by_conditions: dict[Conditions, tuple[list[str], list[Span]]] = {}
        unresolved: set[str] = set()
        for rule_id in rule_ids:
            rule = model.rules[rule_id]
            conditions = None if rule.conditions.empty else rule.conditions
            part_rules, part_spans = by_conditions.setdefault(rule.conditions, ([], []))
            part_rules.append(rule_id)
            for resource_id in rule.resources:
                spans = self._spans_of(resource_id)
                resource = model.resources.get(resource_id)
                if not spans and resource is not None and resource.destination.dns_name:
                    unresolved.add(resource_id)
                for span in spans:
                    grants.append((span, Grant(rule_id, resource_id, span.proto, span.plo, span.phi, conditions)))
                part_spans.extend(spans)
        part_documents: list[dict[str, Any]] = []
        for conditions, (part_rules, part_spans) in sorted(
            by_conditions.items(), key=lambda item: (not item[0].empty, item[1][0][0])
        ):
            doc: dict[str, Any] = {"rules": part_rules}
            if not conditions.empty:
                doc["when"] = conditions_to_document(conditions)
            doc["selectors"] = [selector_text(span) for span in merged_spans(part_spans)]
            part_documents.append(doc)
        unresolved_ids = tuple(sorted(unresolved))
        digest = parts_digest(part_documents, unresolved_ids)
        return _AccessClass(AccessIndex.build(grants), part_documents, unresolved_ids, digest)

    def _document(self, identity_id: str, access: _AccessClass) -> dict[str, Any]:
        return compiled_document(identity_id, access.part_documents, access.unresolved, access.digest)

    # -- reading it ---------------------------------------------------------------------------
    def compiled(self, identity_id: str) -> CompiledPolicy | None:
        key = self._class_of.get(identity_id)
        if key is None:
            return None
        return CompiledPolicy.from_document(self._document(identity_id, self._classes[key]))

    def documents(self) -> dict[str, dict[str, Any]]:
        """Every identity's compiled document (for a full resync of the store)."""
        return {i: self._document(i, self._classes[k]) for i, k in sorted(self._class_of.items())}

    def check(self, identity_id: str, flow: FiveTuple, context: CheckContext) -> Decision:
        key = self._class_of.get(identity_id)
        if key is None:
            return deny_unknown_identity(identity_id)
        return self._classes[key].index.check(flow, context)

    @property
    def resolutions(self) -> Mapping[str, tuple[IPAddress, ...]]:
        return self._resolved


def _parse_addresses(addresses: Iterable[str]) -> tuple[IPAddress, ...]:
    out: set[IPAddress] = set()
    for text in addresses:
        try:
            out.add(ipaddress.ip_address(text))
        except ValueError:
            continue  # a resolver's junk answer grants nothing
    return tuple(sorted(out, key=lambda a: (a.version, int(a))))


class Evaluator:
    """A compiled model to check flows against (what-if, tests, the policy service's Check)."""

    def __init__(self, model: Model, resolver: Resolver | None = None) -> None:
        self.compiler = PolicyCompiler(resolver)
        self.compiler.load(model)

    def check(self, identity_id: str, flow: FiveTuple, context: CheckContext) -> Decision:
        return self.compiler.check(identity_id, flow, context)
