"""Applying a whole policy (a policy file): all or nothing, however large.

A plan that fits in one store transaction (its writes, its compare-and-swap guards from
`plan_conditions` and the generation bump within `MAX_TXN_OPS`) is one transaction.

A larger plan cannot be one transaction (etcd refuses more than 128 ops), so it is applied
in chunks under an *apply lock* and rolled back if anything fails:

1. **Lock.** One CAS transaction on ``policy/_meta/generation`` sets ``applying`` (apply id,
   actor, deadline). Every other policy write refuses while the lock is live (ABORTED:
   retry), so the model read for the plan stays the model the chunks are written onto.
2. **Journal.** The before-image of every key the plan touches is written under
   ``policy/_apply/<id>/<n>`` before any object changes.
3. **Chunks.** Writes go in dependency order (creates and updates of sites, groups,
   identities, resources, rules; then deletes in the reverse order), at most 127 per
   transaction, each guarded by its keys' CAS conditions and by the lock's revision, and
   each pushing the lock's deadline forward.
4. **Release.** The lock is cleared and the journal deleted.

If a chunk fails (a guard no longer holds, the store errs) the journal's before-images are
written back and the lock released: nothing of the plan remains. If the applying process
dies, its lock's deadline passes; the next policy write (or a policy service start) finds
the expired lock and rolls back from the journal the same way.

Readers: the compiler (`compiled_sync`) defers every change it sees while the lock is held
and compiles the end state once, so compiled documents and checks never reflect a
half-applied plan. Only a raw reader of ``policy/<kind>/`` keys could see one.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from esplanade.policy.decode import encode_document, object_to_document
from esplanade.policy.diff import ObjectChange, diff, plan_apply, plan_conditions
from esplanade.policy.model import KINDS, Model
from esplanade.policy.problems import PolicyError, format_path
from esplanade.policy.store_state import (
    WRITE_ATTEMPTS,
    FieldProblem,
    Generation,
    InvalidObject,
    PolicyStore,
    RevisionMismatch,
    WriteContention,
    object_key_parts,
    read_model,
)
from esplanade.store import schema
from esplanade.store.base import MAX_TXN_OPS, Compare, Delete, Put, StoreError

log = logging.getLogger(__name__)

LOCK_SECONDS = 30.0
JOURNAL_ENTRIES_PER_KEY = 64
T = TypeVar("T")


@dataclass(frozen=True)
class ApplyOutcome:
    changes: list[ObjectChange]
    applied: bool
    revision: int


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ordered(writes: list[tuple[str, dict[str, Any] | None]]) -> list[tuple[str, dict[str, Any] | None]]:
    rank = {kind: i for i, kind in enumerate(KINDS)}

    def kind_rank(key: str) -> int:
        parts = object_key_parts(key)
        return rank[parts[0]] if parts else 0

    puts = sorted((w for w in writes if w[1] is not None), key=lambda w: kind_rank(w[0]))
    deletes = sorted((w for w in writes if w[1] is None), key=lambda w: -kind_rank(w[0]))
    return puts + deletes


def invalid_model(exc: PolicyError) -> InvalidObject:
    return InvalidObject(
        "the policy is invalid: nothing was applied", [FieldProblem(format_path(p.path), str(p)) for p in exc.problems]
    )


async def apply_model(ps: PolicyStore, desired: Model, actor: str, dry_run: bool = False) -> ApplyOutcome:
    """Make the stored policy equal `desired` (dry run: only say what would change)."""
    async with ps.write_lock:
        return await _apply_model(ps, desired, actor, dry_run)


async def _apply_model(ps: PolicyStore, desired: Model, actor: str, dry_run: bool) -> ApplyOutcome:
    for _ in range(WRITE_ATTEMPTS):
        current, generation = await ps.snapshot()
        if generation.applying and await ps._interrupted_apply(generation):
            continue
        try:
            writes = plan_apply(current, desired)
        except PolicyError as exc:
            raise invalid_model(exc) from None
        changes = diff(current, desired)
        if dry_run or not writes:
            return ApplyOutcome(changes, False, generation.revision)
        guards = plan_conditions(current, desired)
        if len(writes) + 1 <= MAX_TXN_OPS and len(guards) + 1 <= MAX_TXN_OPS:
            conditions = [Compare(schema.POLICY_GENERATION, generation.revision)]
            conditions += [Compare(key, revision) for key, revision in guards]
            ops: list[Put | Delete] = [Put(k, encode_document(d)) if d is not None else Delete(k) for k, d in writes]
            ops.append(Put(schema.POLICY_GENERATION, generation.next_document()))
            result = await ps.store.commit(conditions, ops)
            if not result.succeeded:
                ps.forget()
                continue
            revision = result.revision
        else:
            revision = await _apply_in_chunks(ps, current, generation, writes, dict(guards), actor)
        ps.forget()
        _audit(ps, actor, changes, revision)
        return ApplyOutcome(changes, True, revision)
    raise WriteContention("the policy changed concurrently too many times; retry")


async def _apply_in_chunks(
    ps: PolicyStore,
    current: Model,
    generation: Generation,
    writes: list[tuple[str, dict[str, Any] | None]],
    guards: dict[str, int],
    actor: str,
) -> int:
    store = ps.store
    apply_id = secrets.token_hex(8)

    def lock(number: int) -> dict[str, Any]:
        return {"id": apply_id, "actor": actor, "deadline": ps.clock() + LOCK_SECONDS, "generation": number}

    locked = await store.commit(
        [Compare(schema.POLICY_GENERATION, generation.revision)],
        [Put(schema.POLICY_GENERATION, generation.next_document(lock(generation.number + 1)))],
    )
    if not locked.succeeded:
        raise WriteContention("the policy changed while the apply was planned; retry")
    lock_gen = Generation(locked.revision, generation.number + 1, lock(generation.number + 1))
    ordered = _ordered(writes)
    images: list[list[Any]] = []
    for key, _ in ordered:
        parts = object_key_parts(key)
        assert parts is not None
        obj = current.kind(parts[0]).get(parts[1])
        images.append([key, object_to_document(obj) if obj is not None else None])
    try:
        for n, part in enumerate(chunks(images, JOURNAL_ENTRIES_PER_KEY)):
            await store.put(schema.policy_apply_journal(apply_id, n), encode_document({"images": list(part)}))
        for batch in chunks(ordered, MAX_TXN_OPS - 1):
            conditions = [Compare(schema.POLICY_GENERATION, lock_gen.revision)]
            conditions += [Compare(k, guards[k]) for k, _ in batch if k in guards]
            ops: list[Put | Delete] = [Put(k, encode_document(d)) if d is not None else Delete(k) for k, d in batch]
            next_lock = lock(lock_gen.number + 1)
            ops.append(Put(schema.POLICY_GENERATION, lock_gen.next_document(next_lock)))
            result = await store.commit(conditions, ops)
            if not result.succeeded:
                raise RevisionMismatch("an object changed while the policy was being applied: nothing was applied")
            lock_gen = Generation(result.revision, lock_gen.number + 1, next_lock)
        released = await store.commit(
            [Compare(schema.POLICY_GENERATION, lock_gen.revision)],
            [Put(schema.POLICY_GENERATION, lock_gen.next_document())],
        )
        if not released.succeeded:
            raise RevisionMismatch("the apply lock was taken over: nothing was applied")
    except BaseException:
        await _roll_back(ps, apply_id, lock_gen)
        raise
    await _delete_journal(ps, apply_id)
    return released.revision


async def _roll_back(ps: PolicyStore, apply_id: str, lock_gen: Generation) -> None:
    """Write the journal's before-images back and release the lock (compare on the lock)."""
    store = ps.store
    kvs, _ = await store.range(schema.policy_apply_prefix(apply_id))
    images: list[list[Any]] = []
    for kv in sorted(kvs, key=lambda kv: int(kv.key.rsplit("/", 1)[1])):
        images.extend(json.loads(kv.value).get("images", []))
    revision = lock_gen.revision
    number = lock_gen.number
    for part in chunks(images[::-1], MAX_TXN_OPS - 1):
        ops: list[Put | Delete] = [Put(k, encode_document(d)) if d is not None else Delete(k) for k, d in part]
        ops.append(Put(schema.POLICY_GENERATION, Generation(revision, number).next_document(lock_gen.applying)))
        result = await store.commit([Compare(schema.POLICY_GENERATION, revision)], ops)
        if not result.succeeded:
            log.error("rolling back policy apply %s: the lock was taken over; leaving it to its holder", apply_id)
            return
        revision, number = result.revision, number + 1
    await store.commit(
        [Compare(schema.POLICY_GENERATION, revision)],
        [Put(schema.POLICY_GENERATION, Generation(revision, number).next_document())],
    )
    await _delete_journal(ps, apply_id)
    ps.forget()
    log.warning("policy apply %s rolled back (%d objects restored)", apply_id, len(images))


async def _delete_journal(ps: PolicyStore, apply_id: str) -> None:
    try:
        kvs, _ = await ps.store.range(schema.policy_apply_prefix(apply_id))
        for part in chunks([kv.key for kv in kvs], MAX_TXN_OPS):
            await ps.store.commit([], [Delete(k) for k in part])
    except StoreError as exc:
        log.warning("could not delete the journal of policy apply %s: %s", apply_id, exc)


async def recover_interrupted_apply(ps: PolicyStore) -> bool:
    """Roll back an apply whose holder died (its lock expired). True if one was rolled back."""
    _, generation, _ = await read_model(ps.store)
    applying = generation.applying
    if not applying or float(applying.get("deadline", 0)) > ps.clock():
        return False
    log.warning("policy apply %s by %r was interrupted; rolling it back", applying.get("id"), applying.get("actor"))
    await _roll_back(ps, str(applying.get("id", "")), generation)
    return True


def _audit(ps: PolicyStore, actor: str, changes: list[ObjectChange], revision: int) -> None:
    if ps.audit is None:
        return
    ps.audit.record(
        actor or "unknown",
        "policy.apply",
        "policy",
        after={"changes": [str(c) for c in changes], "revision": revision},
    )
