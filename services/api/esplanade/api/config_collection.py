"""Named JSON documents under one store prefix (connections, pools, certificates, CAs, CRLs).

Writes are compare-and-swap on the revision read (or named by If-Match), so a write never
silently overwrites a concurrent one. `bytes` values are sealed on the way in (the store key
path bound in); values already sealed pass through (a kept secret is never opened here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from esplanade.api.conventions import MUST_EXIST, check_if_match
from esplanade.api.problems import ProblemError
from esplanade.store.base import CasConflict, KeyValue, Store
from esplanade.store.sealing import SealedDocuments, decode_document, encode_document, seal_document


class ConfigCollection:
    def __init__(self, store: Store, documents: SealedDocuments, key: Callable[[str], str], prefix: str, label: str):
        self.store = store
        self.documents = documents
        self.key = key
        self.prefix = prefix
        self.label = label

    def what(self, name: str) -> str:
        return f"{self.label} '{name}'"

    async def all(self) -> list[tuple[str, dict[str, Any], int]]:
        kvs, _ = await self.store.range(self.prefix)
        out = []
        for kv in kvs:
            name = kv.key[len(self.prefix) :]
            if "/" not in name:
                out.append((name, decode_document(kv.key, kv.value), kv.mod_revision))
        return out

    async def read(self, name: str) -> tuple[dict[str, Any], KeyValue] | None:
        kv = await self.store.get(self.key(name))
        if kv is None:
            return None
        return decode_document(kv.key, kv.value), kv

    async def get(self, name: str) -> tuple[dict[str, Any], int]:
        found = await self.read(name)
        if found is None:
            raise ProblemError(404, f"{self.what(name)} does not exist")
        return found[0], found[1].mod_revision

    async def write(self, name: str, document: dict[str, Any], expect: int) -> int:
        """Write with CAS on `expect` (0: must not exist). A lost race is 409."""
        key = self.key(name)
        value = encode_document(seal_document(self.documents.bind(key), document))
        try:
            return await self.store.put(key, value, expect_mod_revision=expect)
        except CasConflict:
            if expect == 0:
                raise ProblemError(409, f"{self.what(name)} already exists") from None
            raise ProblemError(409, f"{self.what(name)} was changed concurrently; read it again") from None

    async def replace(
        self, name: str, build: Callable[[dict[str, Any] | None], dict[str, Any]], if_match: int | None
    ) -> tuple[dict[str, Any] | None, dict[str, Any], int, bool]:
        """Create or replace. `build(current)` gives the new document. Returns (before, after, revision, created)."""
        found = await self.read(name)
        current, revision = (found[0], found[1].mod_revision) if found else (None, None)
        check_if_match(if_match, revision, self.what(name))
        document = build(current)
        try:
            new_revision = await self.write(name, document, revision or 0)
        except ProblemError as exc:
            if if_match is not None and if_match != MUST_EXIST and exc.status == 409:
                raise ProblemError(412, f"{self.what(name)} changed after revision {if_match}") from None
            raise
        return current, document, new_revision, found is None

    async def delete(self, name: str, if_match: int | None) -> dict[str, Any]:
        found = await self.read(name)
        if found is None:
            raise ProblemError(404, f"{self.what(name)} does not exist")
        check_if_match(if_match, found[1].mod_revision, self.what(name))
        try:
            await self.store.delete(self.key(name), expect_mod_revision=found[1].mod_revision)
        except CasConflict:
            status = 412 if if_match is not None else 409
            raise ProblemError(status, f"{self.what(name)} was changed concurrently") from None
        return found[0]
