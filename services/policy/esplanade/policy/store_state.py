"""The policy model as the store holds it, and every write to it, serialized and validated.

Every object write (put, delete, apply) is one store transaction that also bumps the
generation key ``policy/_meta/generation`` under compare-and-swap. So policy writes are
serialized across policy service instances, and a write validated against the whole
model at generation g commits only if the model is still at g: an identity cannot be
bound to a group that another instance deleted in the meantime. A lost race on the
generation alone is retried; a lost race on the object's own revision is the caller's
conflict (`RevisionMismatch`).

Each instance caches the model together with the generation it was read at; one `get`
of the generation key tells whether the cache is current.

Applying a policy file whose plan fits in one transaction (`MAX_TXN_OPS`, 128 ops) is one
transaction. A larger plan is applied in chunks under an apply lock (see `apply.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from esplanade.journal.audit import AuditLog
from esplanade.policy.decode import encode_document, object_from_document, object_to_document
from esplanade.policy.model import KINDS, SINGULAR, Model, PolicyObject
from esplanade.policy.problems import PolicyError, Problem, format_path
from esplanade.policy.validation import validate_model
from esplanade.store import schema
from esplanade.store.base import Compare, Delete, KeyValue, Put, Store

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 8
POLICY_PREFIX = schema.prefix("policy")


# -- errors: each carries a gRPC status name, a machine reason and per-field problems ----------
@dataclass(frozen=True)
class FieldProblem:
    field: str  # dotted path inside the object's document ("groups[0]"), "" for the whole object
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class PolicyWriteError(Exception):
    code = "INTERNAL"
    reason = "internal"

    def __init__(self, message: str, errors: Sequence[FieldProblem] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.errors = list(errors)


class InvalidObject(PolicyWriteError):
    code, reason = "INVALID_ARGUMENT", "invalid"


class ObjectNotFound(PolicyWriteError):
    code, reason = "NOT_FOUND", "not_found"


class ObjectExists(PolicyWriteError):
    code, reason = "ALREADY_EXISTS", "exists"


class RevisionMismatch(PolicyWriteError):
    code, reason = "FAILED_PRECONDITION", "revision_mismatch"


class StillReferenced(PolicyWriteError):
    code, reason = "FAILED_PRECONDITION", "referenced"


class WriteContention(PolicyWriteError):
    """Another writer kept winning (or a chunked apply holds the lock): try again."""

    code, reason = "ABORTED", "contention"


# -- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    revision: int = 0  # mod_revision of the generation key; 0: absent
    number: int = 0
    applying: Mapping[str, Any] | None = None

    @classmethod
    def from_kv(cls, kv: KeyValue | None) -> Generation:
        if kv is None:
            return cls()
        try:
            doc = json.loads(kv.value)
            return cls(kv.mod_revision, int(doc.get("generation", 0)), doc.get("applying") or None)
        except (ValueError, TypeError, AttributeError):
            log.warning("policy generation key is malformed; treating it as generation 0")
            return cls(kv.mod_revision)

    def next_document(self, applying: Mapping[str, Any] | None = None) -> bytes:
        return encode_document({"generation": self.number + 1, "applying": dict(applying) if applying else None})


def object_key_parts(key: str) -> tuple[str, str] | None:
    """(kind, id) for a policy object key, None for compiled documents and bookkeeping keys."""
    if not key.startswith(POLICY_PREFIX):
        return None
    kind, sep, object_id = key[len(POLICY_PREFIX) :].partition("/")
    if not sep or kind not in KINDS or not object_id or "/" in object_id:
        return None
    return kind, object_id


def decode_kv(kind: str, kv: KeyValue) -> PolicyObject | None:
    try:
        return object_from_document(kind, json.loads(kv.value), kv.mod_revision)
    except (ValueError, PolicyError) as exc:
        # A document that no longer decodes (written by hand, or by a newer version) is left
        # out of the model, loudly: the compiler then grants nothing for it (fail closed).
        log.error("skipping undecodable policy document %s: %s", kv.key, str(exc).splitlines()[0])
        return None


def model_from_kvs(kvs: Sequence[KeyValue]) -> Model:
    objects: dict[str, dict[str, PolicyObject]] = {kind: {} for kind in KINDS}
    for kv in kvs:
        parts = object_key_parts(kv.key)
        if parts is None:
            continue
        obj = decode_kv(parts[0], kv)
        if obj is not None and obj.id == parts[1]:
            objects[parts[0]][obj.id] = obj
    return Model(**objects)  # type: ignore[arg-type]


async def read_model(store: Store) -> tuple[Model, Generation, int]:
    """The whole model, the generation it was read at (read first: see the module doc), and the revision."""
    generation = Generation.from_kv(await store.get(schema.POLICY_GENERATION))
    kvs, revision = await store.range(POLICY_PREFIX)
    return model_from_kvs(kvs), generation, revision


def problem_field(problem: Problem, kind: str, object_id: str) -> str:
    path = problem.path
    if path[:2] == (kind, object_id):
        path = path[2:]
    elif len(path) >= 2 and path[0] in KINDS:
        return ""
    return format_path(path)


def new_problems(before: Sequence[Problem], after: Sequence[Problem]) -> list[Problem]:
    seen = {(p.path, p.message) for p in before}
    return [p for p in after if (p.path, p.message) not in seen]


@dataclass
class _Cache:
    model: Model = field(default_factory=Model)
    generation: Generation | None = None
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class Committed:
    revision: int
    before: PolicyObject | None
    after: PolicyObject | None


class PolicyStore:
    """Reads and serialized, validated writes of policy objects."""

    def __init__(self, store: Store, audit: AuditLog | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock
        self._cache = _Cache()
        # Writers of this instance queue here instead of losing generation CAS races to
        # each other; the CAS still serializes against other policy instances.
        self.write_lock = asyncio.Lock()

    async def snapshot(self) -> tuple[Model, Generation]:
        generation = Generation.from_kv(await self.store.get(schema.POLICY_GENERATION))
        cache = self._cache
        if cache.generation is None or cache.generation.revision != generation.revision or generation.revision == 0:
            model, generation, _ = await read_model(self.store)
            self._cache = cache = _Cache(model, generation, validate_model(model))
        return cache.model, generation

    def remember(self, model: Model, generation: Generation) -> None:
        self._cache = _Cache(model, generation, validate_model(model))

    def forget(self) -> None:
        self._cache = _Cache()

    # -- single objects ---------------------------------------------------------------------------
    async def get(self, kind: str, object_id: str) -> PolicyObject:
        _check_kind(kind)
        model, _ = await self.snapshot()
        obj = model.kind(kind).get(object_id)
        if obj is None:
            raise ObjectNotFound(f"{SINGULAR[kind]} '{object_id}' does not exist")
        return obj

    async def list(self, kind: str) -> tuple[list[PolicyObject], int]:
        _check_kind(kind)
        model, generation = await self.snapshot()
        return sorted(model.kind(kind).values(), key=lambda o: o.id), generation.revision

    async def put(self, kind: str, object_id: str, document: Any, expect_revision: int, actor: str) -> Committed:
        """Create or replace. expect_revision: 0 create-or-replace, -1 must not exist, >0 CAS."""
        _check_kind(kind)
        obj = decode_for_put(kind, object_id, document)
        async with self.write_lock:
            return await self._put(kind, object_id, obj, expect_revision, actor)

    async def _put(self, kind: str, object_id: str, obj: PolicyObject, expect_revision: int, actor: str) -> Committed:
        for _ in range(WRITE_ATTEMPTS):
            model, generation = await self.snapshot()
            if await self._interrupted_apply(generation):
                continue
            current = model.kind(kind).get(object_id)
            _check_expectation(kind, object_id, current, expect_revision)
            desired = model.with_object(obj)
            fresh = new_problems(self._cache.problems, validate_model(desired))
            if fresh:
                raise InvalidObject(
                    f"{SINGULAR[kind]} '{object_id}' is not consistent with the policy",
                    [FieldProblem(problem_field(p, kind, object_id), p.message) for p in fresh],
                )
            key = schema.policy_object(kind, object_id)
            result = await self.store.commit(
                [
                    Compare(schema.POLICY_GENERATION, generation.revision),
                    Compare(key, current.revision if current else 0),
                ],
                [
                    Put(key, encode_document(object_to_document(obj))),
                    Put(schema.POLICY_GENERATION, generation.next_document()),
                ],
            )
            if result.succeeded:
                stored = replace(obj, revision=result.revision)
                self.remember(desired.with_object(stored), Generation(result.revision, generation.number + 1))
                self._audit(actor, "policy.put", kind, object_id, current, stored)
                return Committed(result.revision, current, stored)
            self.forget()
        raise WriteContention("the policy changed concurrently too many times; retry")

    async def delete(self, kind: str, object_id: str, expect_revision: int, actor: str) -> Committed:
        _check_kind(kind)
        async with self.write_lock:
            return await self._delete(kind, object_id, expect_revision, actor)

    async def _delete(self, kind: str, object_id: str, expect_revision: int, actor: str) -> Committed:
        for _ in range(WRITE_ATTEMPTS):
            model, generation = await self.snapshot()
            if await self._interrupted_apply(generation):
                continue
            current = model.kind(kind).get(object_id)
            if current is None:
                raise ObjectNotFound(f"{SINGULAR[kind]} '{object_id}' does not exist")
            _check_expectation(kind, object_id, current, expect_revision)
            desired = model.without(kind, object_id)
            fresh = new_problems(self._cache.problems, validate_model(desired))
            if fresh:
                raise StillReferenced(
                    f"{SINGULAR[kind]} '{object_id}' is still referred to; change the referring objects first",
                    [FieldProblem("", p.message) for p in fresh],
                )
            key = schema.policy_object(kind, object_id)
            result = await self.store.commit(
                [Compare(schema.POLICY_GENERATION, generation.revision), Compare(key, current.revision)],
                [Delete(key), Put(schema.POLICY_GENERATION, generation.next_document())],
            )
            if result.succeeded:
                self.remember(desired, Generation(result.revision, generation.number + 1))
                self._audit(actor, "policy.delete", kind, object_id, current, None)
                return Committed(result.revision, current, None)
            self.forget()
        raise WriteContention("the policy changed concurrently too many times; retry")

    async def _interrupted_apply(self, generation: Generation) -> bool:
        """Refuse while a chunked apply runs; roll back one whose holder died. True: read again."""
        applying = generation.applying
        if not applying:
            return False
        if float(applying.get("deadline", 0)) > self.clock():
            raise WriteContention(f"a policy apply by {applying.get('actor', '?')!r} is in progress; retry shortly")
        from esplanade.policy.apply import recover_interrupted_apply

        await recover_interrupted_apply(self)
        return True

    def _audit(self, actor: str, action: str, kind: str, object_id: str, before: Any, after: Any) -> None:
        if self.audit is None:
            return
        self.audit.record(
            actor or "unknown",
            action,
            f"{kind}/{object_id}",
            before=object_to_document(before) if before is not None else None,
            after=object_to_document(after) if after is not None else None,
        )


def decode_for_put(kind: str, object_id: str, document: Any) -> PolicyObject:
    if not isinstance(document, dict):
        raise InvalidObject("the document must be a JSON object", [FieldProblem("", "expected an object")])
    doc = dict(document)
    if "id" in doc and doc["id"] != object_id:
        raise InvalidObject(
            f"the document's id {doc['id']!r} differs from the object id {object_id!r}",
            [FieldProblem("id", f"must equal the object id '{object_id}'")],
        )
    doc["id"] = object_id
    try:
        return object_from_document(kind, doc)
    except PolicyError as exc:
        raise InvalidObject(
            f"invalid {SINGULAR[kind]} '{object_id}'",
            [FieldProblem(format_path(p.path), p.message) for p in exc.problems],
        ) from None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidObject(f"unknown kind {kind!r}", [FieldProblem("kind", f"must be one of {', '.join(KINDS)}")])


def _check_expectation(kind: str, object_id: str, current: PolicyObject | None, expect: int) -> None:
    label = f"{SINGULAR[kind]} '{object_id}'"
    if expect == -1 and current is not None:
        raise ObjectExists(f"{label} already exists")
    if expect > 0:
        if current is None:
            raise RevisionMismatch(f"{label} does not exist (expected revision {expect})")
        if current.revision != expect:
            raise RevisionMismatch(f"{label} is at revision {current.revision}, not {expect}")
