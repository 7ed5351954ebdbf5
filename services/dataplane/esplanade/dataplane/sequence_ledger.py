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
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from esplanade.store import schema
from esplanade.store.base import CasConflict, KeyValue, Store
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
        self.writes = 0
        # reservations made ahead for installs about to happen (a node taking over many SAs):
        # (child_sa, spi) -> (next_seq, upto) of start_outbound, (child_sa, spi) -> replay floor
        self._started: dict[tuple[str, int], tuple[int, int]] = {}
        self._floors: dict[tuple[str, int], int] = {}

    async def prepare(self, child_sa: str, outbound_spi: int, inbound_spi: int, block: int) -> None:
        """Reserve the first sequence block and read the replay floor of an SA about to be
        installed, so many installs can do their store round trips concurrently; the install's
        own `start_outbound` / `replay_floor` then take these (once)."""
        self._started[(child_sa, outbound_spi)] = await self.start_outbound(child_sa, outbound_spi, block)
        self._floors[(child_sa, inbound_spi)] = await self.replay_floor(child_sa, inbound_spi)

    def _document(self, child_sa: str, upto: int) -> bytes:
        return encode_document({"upto": upto, "child_sa": child_sa, "holder": self.incarnation, "node": self.node})

    async def start_outbound(self, child_sa: str, spi: int, block: int) -> tuple[int, int]:
        prepared = self._started.pop((child_sa, spi), None)
        if prepared is not None and self._written.get(spi) == prepared[1]:
            return prepared  # reserved by `prepare` and nobody wrote since (it would have raised the mark)
        key = schema.sequence_reservation(spi)
        kv = await self.store.get(key)
        for _ in range(CAS_ATTEMPTS):
            start = _upto(_decode(kv))
            upto = start + block
            try:
                revision = await self.store.put(
                    key, self._document(child_sa, upto), expect_mod_revision=kv.mod_revision if kv else 0
                )
            except CasConflict as conflict:
                kv = conflict.current
                continue
            self._revisions[spi] = revision
            self._written[spi] = upto
            self.writes += 1
            return start + 1, upto
        raise SequenceLedgerError(f"{key} kept changing; no sequence block reserved")

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
            self.writes += 1
            return upto
        raise SequenceLedgerError(f"{key} kept changing; sequence block not reserved")

    async def replay_floor(self, child_sa: str, spi: int) -> int:
        prepared = self._floors.pop((child_sa, spi), None)
        if prepared is not None:
            return prepared
        document = _decode(await self.store.get(schema.replay_high_water(spi)))
        if document.get("child_sa", child_sa) != child_sa:
            return 0  # the floor of an earlier SA that used this SPI
        return _upto(document)

    async def persist_replay_floor(self, child_sa: str, spi: int, upto: int) -> None:
        key = schema.replay_high_water(spi)
        kv = await self.store.get(key)
        for _ in range(CAS_ATTEMPTS):
            document = _decode(kv)
            if kv is not None and document.get("child_sa") == child_sa and _upto(document) >= upto:
                return
            value = encode_document({"upto": upto, "child_sa": child_sa, "node": self.node})
            try:
                await self.store.put(key, value, expect_mod_revision=kv.mod_revision if kv else 0)
            except CasConflict as conflict:
                kv = conflict.current
                continue
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
                await self.store.put(key, value, expect_mod_revision=kv.mod_revision if kv else 0)
            except CasConflict as conflict:
                kv = conflict.current
                continue
            self.writes += 1
            return

    async def forget(self, child_sa: str, inbound_spi: int, outbound_spi: int) -> None:
        self._revisions.pop(outbound_spi, None)
        self._written.pop(outbound_spi, None)
        seq_key = schema.sequence_reservation(outbound_spi)
        if _decode(await self.store.get(seq_key)).get("child_sa") == child_sa:
            await self.store.delete(seq_key)
        replay_key = schema.replay_high_water(inbound_spi)
        if _decode(await self.store.get(replay_key)).get("child_sa") == child_sa:
            await self.store.delete(replay_key)
