"""`SaPersistence` on the store: outbound sequence blocks and inbound replay floors.

Keys (`esplanade.store.schema`)::

    dataplane/seq/<spi hex>      {"upto": N, "child_sa": id, "holder": incarnation, "node": node}
    dataplane/replay/<spi hex>   {"upto": N, "child_sa": id, "node": node}

Sequence blocks. `upto` is the highest outbound sequence number ever reserved under the SPI;
it only grows (compare-and-swap on the key's mod_revision). A sender may use a number only
once a value at or above it is durable. A new outbound SA (a fresh install, or a restart)
claims the block right after the stored value, so it starts at ``upto + 1`` and a crash
costs at most the unused rest of one block, never a repeated number (and never a repeated
AES-GCM / ChaCha20-Poly1305 nonce, which is the sequence number).

Each process is one *incarnation* (a random id). A later reservation of the same SPI must
find the key as this incarnation left it; if another incarnation wrote it meanwhile,
another dataplane sends under the same SPI and this one refuses to go on (`reserve` returns
None: its sender stops when its block runs out) rather than risk a repeated nonce. A CAS
conflict on our own value (a write that succeeded although its answer was lost) is retried.

Outbound SPIs are chosen by the peers, so two Child SAs toward different peers may share
one; they then share one monotonic counter, which is safe (their keys differ).

Replay floors: the highest floor an inbound SA asked for, raised monotonically; a restarted
inbound SA rejects everything at or below it (`esp.sa_state.InboundSa`). The one exception
is a graceful hand-over (`hand_over_replay_floor`): the releasing node removed the inbound SA
first, so its exact window top is a safe floor and the next owner drops none of the peer's
packets; after a crash the block-ahead floor stands (up to a block and a half dropped).

`forget` deletes both keys when the Child SA is deleted: IKE never reuses keys, so a later
SA under the same SPI is a new SA. Manually keyed SAs must not be re-created with the keys
of a deleted one (RFC 4303 §3.3.3 advises against anti-replay with manual keys for this reason).

Store round trips per Child SA, in the common case (SPIs this ledger has never seen): one
transaction at install (`start_children`: the blocks of every Child SA installed together are
claimed on condition that none of their keys exists, which also proves their replay floors
are 0; the first floor each inbound SA will ask for is written in the same transaction, so
that request then finds it durable) and one at delete (`forget_ops`/`forget`: conditioned on
the keys being as this incarnation last saw them). Whatever does not match that case (a
restart, a reused SPI, someone else's write) takes the general path: reads, then CAS.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from esplanade.dataplane.sa_persistence import ChildClaim
from esplanade.store import schema
from esplanade.store.base import MAX_TXN_OPS, CasConflict, Compare, Delete, KeyValue, Put, Store
from esplanade.store.sealing import encode_document

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 20


def _decode(kv: KeyValue | None) -> dict[str, Any]:
    if kv is None:
        return {}
    try:
        document = json.loads(kv.value)
    except (UnicodeDecodeError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _upto(document: dict[str, Any]) -> int:
    value = document.get("upto", 0)
    return value if isinstance(value, int) and value >= 0 else 0


class SequenceLedgerError(RuntimeError):
    """The ledger could not be updated (the store kept changing under us)."""


class StoreSaPersistence:
    """Implements `esplanade.dataplane.sa_persistence.SaPersistence` on a `Store`."""

    def __init__(self, store: Store, node: str, incarnation: str | None = None) -> None:
        self.store = store
        self.node = node
        self.incarnation = incarnation or secrets.token_hex(8)
        self._revisions: dict[int, int] = {}  # SPI -> mod_revision of our last write
        self._written: dict[int, int] = {}  # SPI -> the value of our last write
        self._written_for: dict[int, str] = {}  # SPI -> the Child SA our last write named
        # inbound SPI -> (child SA, mod_revision of its replay key (0: known absent), its floor),
        # as this incarnation last saw or wrote it
        self._replay_seen: dict[int, tuple[str, int, int]] = {}
        self.writes = 0
        self.fast_starts = 0
        self.fast_forgets = 0

    def _document(self, child_sa: str, upto: int) -> bytes:
        return encode_document({"upto": upto, "child_sa": child_sa, "holder": self.incarnation, "node": self.node})

    async def start_outbound(self, child_sa: str, spi: int, block: int) -> tuple[int, int]:
        # optimistic: a new SPI has no key yet; a conflict tells us what is there
        start, upto = await self._raise_bound(
            child_sa, spi, None, lambda stored: stored + block, "no sequence block reserved"
        )
        return start + 1, upto

    async def _raise_bound(
        self, child_sa: str, spi: int, kv: KeyValue | None, bound_over: Callable[[int], int], failure: str
    ) -> tuple[int, int]:
        """Write the bound `bound_over(stored bound)` for `child_sa`, compare-and-swap against
        `kv` (what we believe is stored), retried on conflicts: (stored bound, new bound)."""
        key = schema.sequence_reservation(spi)
        for _ in range(CAS_ATTEMPTS):
            stored = _upto(_decode(kv))
            upto = bound_over(stored)
            try:
                revision = await self.store.put(
                    key, self._document(child_sa, upto), expect_mod_revision=kv.mod_revision if kv else 0
                )
            except CasConflict as conflict:
                kv = conflict.current
                continue
            self._revisions[spi] = revision
            self._written[spi] = upto
            self._written_for[spi] = child_sa
            self.writes += 1
            return stored, upto
        raise SequenceLedgerError(f"{key} kept changing; {failure}")

    async def start_child(
        self, child_sa: str, outbound_spi: int, inbound_spi: int, block: int, first_floor: int = 0
    ) -> tuple[int, int, int]:
        """`start_outbound` and `replay_floor` of a new Child SA: (next_seq, reserved_upto, replay_floor).

        One transaction when neither key exists (the block is then 1..block and the floor 0;
        `first_floor`, the floor the inbound SA will ask for first, is persisted with it),
        else the general path."""
        return (await self.start_children([ChildClaim(child_sa, outbound_spi, inbound_spi, first_floor)], block))[0]

    async def start_children(self, claims: Sequence[ChildClaim], block: int) -> list[tuple[int, int, int]]:
        """`start_child` of several Child SAs, in one transaction when none of their keys
        exists; whatever else is found goes the general path, one by one."""
        out: list[tuple[int, int, int] | None] = [None] * len(claims)
        chunk: list[int] = []
        seen: set[tuple[str, int]] = set()  # a chunk names each key once
        for i, claim in enumerate(claims):
            keys = {("seq", claim.outbound_spi), ("replay", claim.inbound_spi)}
            if seen & keys or len(chunk) == MAX_TXN_OPS // 2:
                await self._start_chunk(claims, chunk, block, out)
                chunk, seen = [], set()
            chunk.append(i)
            seen |= keys
        await self._start_chunk(claims, chunk, block, out)
        return [claimed for claimed in out if claimed is not None]

    def _floor_document(self, child_sa: str, upto: int) -> bytes:
        return encode_document({"upto": upto, "child_sa": child_sa, "node": self.node})

    async def _start_chunk(
        self, claims: Sequence[ChildClaim], chunk: list[int], block: int, out: list[tuple[int, int, int] | None]
    ) -> None:
        if not chunk:
            return
        conditions: list[Compare] = []
        ops: list[Put | Delete] = []
        keys: dict[int, tuple[str, str]] = {}
        for i in chunk:
            claim = claims[i]
            seq_key = schema.sequence_reservation(claim.outbound_spi)
            replay_key = schema.replay_high_water(claim.inbound_spi)
            keys[i] = (seq_key, replay_key)
            conditions += [Compare(seq_key, 0), Compare(replay_key, 0)]
            ops.append(Put(seq_key, self._document(claim.child_sa, block)))
            if claim.first_floor > 0:
                ops.append(Put(replay_key, self._floor_document(claim.child_sa, claim.first_floor)))
        result = await self.store.commit(conditions, ops)
        if result.succeeded:
            for i in chunk:
                claim = claims[i]
                self._revisions[claim.outbound_spi] = result.revision
                self._written[claim.outbound_spi] = block
                self._written_for[claim.outbound_spi] = claim.child_sa
                replay_revision = result.revision if claim.first_floor > 0 else 0
                self._replay_seen[claim.inbound_spi] = (claim.child_sa, replay_revision, claim.first_floor)
                out[i] = (1, block, 0)
            self.writes += len(chunk)
            self.fast_starts += len(chunk)
            return
        # the claims whose keys exist take the general path; the others try again together
        failed = {c.key for c in result.failed}
        free = [i for i in chunk if not failed.intersection(keys[i])]
        if free and len(free) < len(chunk):
            await self._start_chunk(claims, free, block, out)
        for i in chunk:
            if out[i] is not None:
                continue
            claim = claims[i]
            next_seq, reserved = await self.start_outbound(claim.child_sa, claim.outbound_spi, block)
            out[i] = (next_seq, reserved, await self.replay_floor(claim.child_sa, claim.inbound_spi))

    async def adopt_outbound(self, child_sa: str, spi: int, last_sent: int, block: int) -> int:
        kv = await self.store.get(schema.sequence_reservation(spi))
        _, upto = await self._raise_bound(
            child_sa, spi, kv, lambda stored: max(stored, last_sent + block), "sequence numbers not adopted"
        )
        return upto

    async def reserve(self, child_sa: str, spi: int, upto: int) -> int | None:
        key = schema.sequence_reservation(spi)
        written = self._written.get(spi, 0)
        if upto <= written:
            return written  # durable already: the ledger never goes down
        expected = self._revisions.get(spi)
        kv: KeyValue | None = None
        if expected is None:
            kv = await self.store.get(key)
            if kv is not None and _decode(kv).get("holder") != self.incarnation:
                return None
            expected = kv.mod_revision if kv else 0
        for _ in range(CAS_ATTEMPTS):
            current = _upto(_decode(kv)) if kv is not None else 0
            if kv is not None and current >= upto:  # durable already (a write of ours whose answer was lost)
                self._revisions[spi] = kv.mod_revision
                self._written[spi] = current
                self._written_for.pop(spi, None)  # whose write it was is not known here
                return current
            try:
                revision = await self.store.put(key, self._document(child_sa, upto), expect_mod_revision=expected)
            except CasConflict as conflict:
                kv = conflict.current
                if kv is not None and _decode(kv).get("holder") != self.incarnation:
                    log.error("%s was reserved by another dataplane instance (%s)", key, _decode(kv).get("node"))
                    return None
                expected = kv.mod_revision if kv else 0
                continue
            self._revisions[spi] = revision
            self._written[spi] = upto
            self._written_for[spi] = child_sa
            self.writes += 1
            return upto
        raise SequenceLedgerError(f"{key} kept changing; sequence block not reserved")

    async def replay_floor(self, child_sa: str, spi: int) -> int:
        kv = await self.store.get(schema.replay_high_water(spi))
        document = _decode(kv)
        if kv is None:
            self._replay_seen[spi] = (child_sa, 0, 0)
        elif document.get("child_sa") == child_sa:
            self._replay_seen[spi] = (child_sa, kv.mod_revision, _upto(document))
        if document.get("child_sa", child_sa) != child_sa:
            return 0  # the floor of an earlier SA that used this SPI
        return _upto(document)

    async def persist_replay_floor(self, child_sa: str, spi: int, upto: int) -> None:
        seen = self._replay_seen.get(spi)
        if seen is not None and seen[0] == child_sa and seen[1] and seen[2] >= upto:
            return  # durable already (written with the Child SA's sequence block, or before): floors only rise
        key = schema.replay_high_water(spi)
        kv = await self.store.get(key)
        for _ in range(CAS_ATTEMPTS):
            document = _decode(kv)
            if kv is not None and document.get("child_sa") == child_sa and _upto(document) >= upto:
                self._replay_seen[spi] = (child_sa, kv.mod_revision, _upto(document))
                return
            try:
                revision = await self.store.put(
                    key, self._floor_document(child_sa, upto), expect_mod_revision=kv.mod_revision if kv else 0
                )
            except CasConflict as conflict:
                kv = conflict.current
                continue
            self._replay_seen[spi] = (child_sa, revision, upto)
            self.writes += 1
            return
        raise SequenceLedgerError(f"{key} kept changing; replay floor not persisted")

    async def hand_over_replay_floor(self, child_sa: str, spi: int, top: int) -> None:
        """A graceful hand-over: this node removed the inbound SA (it accepts nothing more) and
        still holds the owner record; `top` is the last number it accepted. The next owner may
        accept everything above it, so the floor is set to exactly `top`, below the block-ahead
        floor. Never used after a crash: then only the block-ahead floor is known to be safe.
        A floor another node wrote (a later owner) or another SA's floor is left alone."""
        key = schema.replay_high_water(spi)
        kv = await self.store.get(key)
        for _ in range(CAS_ATTEMPTS):
            document = _decode(kv)
            if kv is not None and (
                document.get("child_sa", child_sa) != child_sa or document.get("node", self.node) != self.node
            ):
                return
            value = encode_document({"upto": top, "child_sa": child_sa, "node": self.node, "handover": True})
            try:  # a conflict is a late block-ahead write of ours (safe, only higher): lower it again
                revision = await self.store.put(key, value, expect_mod_revision=kv.mod_revision if kv else 0)
            except CasConflict as conflict:
                kv = conflict.current
                continue
            # what is durable now: a later `persist_replay_floor` must not skip on the higher floor
            self._replay_seen[spi] = (child_sa, revision, top)
            self.writes += 1
            return

    def forget_ops(
        self, child_sa: str, inbound_spi: int, outbound_spi: int
    ) -> tuple[list[Compare], list[Delete]] | None:
        """Forget the Child SA inside the caller's store transaction: the conditions and deletes
        to commit with its own ops, or None when the keys are not as this incarnation last saw
        them. If that transaction fails (or for None), `forget` finds out by reading."""
        revision = self._revisions.pop(outbound_spi, None)
        self._written.pop(outbound_spi, None)
        written_for = self._written_for.pop(outbound_spi, None)
        seen = self._replay_seen.pop(inbound_spi, None)
        if revision is None or written_for != child_sa or seen is None or seen[0] != child_sa:
            return None
        seq_key = schema.sequence_reservation(outbound_spi)
        replay_key = schema.replay_high_water(inbound_spi)
        ops = [Delete(seq_key)] + ([Delete(replay_key)] if seen[1] else [])
        return [Compare(seq_key, revision), Compare(replay_key, seen[1])], ops

    async def forget(self, child_sa: str, inbound_spi: int, outbound_spi: int) -> None:
        plan = self.forget_ops(child_sa, inbound_spi, outbound_spi)
        if plan is not None and (await self.store.commit(*plan)).succeeded:
            self.fast_forgets += 1  # both keys as we last saw them: deleted in one transaction
            return
        seq_key = schema.sequence_reservation(outbound_spi)
        replay_key = schema.replay_high_water(inbound_spi)
        if _decode(await self.store.get(seq_key)).get("child_sa") == child_sa:
            await self.store.delete(seq_key)
        if _decode(await self.store.get(replay_key)).get("child_sa") == child_sa:
            await self.store.delete(replay_key)
