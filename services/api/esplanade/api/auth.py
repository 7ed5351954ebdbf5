"""Bearer API tokens: scopes, salted hashes in the store, the bootstrap token, failure limits.

A token is ``esp_<id>_<secret>`` (id: 12 hex digits, secret: 43 url-safe characters, 256
bits). The store keeps, under ``api/tokens/<id>``, its name, scope, a random salt and
SHA-256(salt || token): never the token. A token of that much entropy needs no slow KDF;
comparison is constant-time. The bootstrap token may be any string of at least 32
characters read from `api.bootstrap_token_file`; it is stored under the id ``bootstrap``.

Scopes are ordered: ``read-only`` < ``operator`` < ``admin``. read-only may GET everything
except secrets and tokens; operator also runs live operations (initiate, terminate,
rekey); admin does everything.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from esplanade.store import schema
from esplanade.store.backoff import Backoff
from esplanade.store.base import CasConflict, Resync, Store, StoreError

log = logging.getLogger(__name__)

BOOTSTRAP_ID = "bootstrap"
TOKEN_PATTERN = re.compile(r"esp_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
MIN_BOOTSTRAP_TOKEN = 32


class Scope(StrEnum):
    READ_ONLY = "read-only"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"read-only": 0, "operator": 1, "admin": 2}[self.value]

    def allows(self, needed: Scope) -> bool:
        return self.rank >= needed.rank


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    scope: Scope

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}({self.name})"


def token_hash(salt: bytes, token: str) -> str:
    return hashlib.sha256(salt + token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """(id, token)."""
    token_id = secrets.token_hex(6)
    return token_id, f"esp_{token_id}_{secrets.token_urlsafe(32)}"


def token_document(name: str, scope: Scope, token: str, expires_at: float | None = None) -> dict[str, Any]:
    salt = secrets.token_bytes(16)
    return {
        "name": name,
        "scope": scope.value,
        "salt": salt.hex(),
        "hash": token_hash(salt, token),
        "created_at": time.time(),
        "expires_at": expires_at,
    }


def token_id_of(token: str) -> str:
    match = TOKEN_PATTERN.fullmatch(token)
    return match.group(1) if match else BOOTSTRAP_ID


def public_view(token_id: str, doc: dict[str, Any], revision: int) -> dict[str, Any]:
    return {
        "id": token_id,
        "name": str(doc.get("name", "")),
        "scope": str(doc.get("scope", "read-only")),
        "created_at": float(doc.get("created_at", 0.0)),
        "expires_at": doc.get("expires_at"),
        "revision": revision,
    }


class TokenVerifier:
    """Checks bearer tokens against the store, with a short cache of verified tokens.

    A cached token is dropped the moment its record changes in the store, whichever API
    replica revoked, rotated or re-scoped it: `follow_changes` watches ``api/tokens/``.
    Until that watch is established (and after it ended) nothing is cached, so a replica
    never answers from a cache that could miss a revocation. A cached token also stops at
    its own expiry, and every entry at `cache_seconds` as before.
    """

    def __init__(self, store: Store, cache_seconds: float = 5.0) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, float | None, Principal]] = {}  # digest -> (cached at, expires, who)
        self._following = False
        self._generation = 0  # bumped by every forget: a verify that read an older record caches nothing

    def forget(self, token_id: str) -> None:
        self._generation += 1
        for key, (_, _, principal) in list(self._cache.items()):
            if principal.token_id == token_id:
                del self._cache[key]

    def _forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()

    async def follow_changes(self) -> None:
        """Forget each token whose record changes, for as long as the store is open. While the
        store cannot be watched (a read refused at start) nothing is cached; it tries again."""
        prefix = schema.prefix("api", "tokens")
        backoff = Backoff(base=0.1, cap=2.0)
        while True:
            try:
                _, revision = await self.store.range(prefix, limit=1)
                self._forget_all()  # whatever was cached before the watch's start revision
                self._following = True
                backoff.reset()
                async for item in self.store.watch(prefix, revision + 1):
                    if isinstance(item, Resync):
                        self._forget_all()
                        continue
                    for event in item.events:
                        self.forget(event.kv.key.rsplit("/", 1)[-1])
                return  # the store was closed
            except StoreError as exc:
                log.warning("API token changes not followed (%s): verified tokens are not cached meanwhile", exc)
            finally:
                self._following = False
                self._forget_all()
            await asyncio.sleep(backoff.next_delay())

    async def verify(self, token: str) -> Principal | None:
        if not token or len(token) > 512:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None:
            cached_at, expires, principal = cached
            if now - cached_at < self.cache_seconds and (expires is None or time.time() < expires):
                return principal
            del self._cache[digest]
        generation = self._generation
        token_id = token_id_of(token)
        kv = await self.store.get(schema.api_token(token_id))
        if kv is None:
            return None
        try:
            doc = json.loads(kv.value)
            salt = bytes.fromhex(doc["salt"])
            scope = Scope(doc["scope"])
            expires_at = doc.get("expires_at")
            expires = None if expires_at is None else float(expires_at)
        except (ValueError, KeyError, TypeError):
            log.error("API token record %s is malformed", token_id)
            return None
        if not hmac.compare_digest(token_hash(salt, token), str(doc.get("hash", ""))):
            return None
        if expires is not None and expires <= time.time():
            return None
        principal = Principal(token_id, str(doc.get("name", "")), scope)
        if self._following and generation == self._generation and self.cache_seconds > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, expires, principal)
        return principal


async def ensure_bootstrap_token(store: Store, token_file: Path | None) -> str | None:
    """Make sure an admin can get in. Returns a freshly generated token (to print once), or None.

    With `token_file`, its token is (re)installed as the bootstrap token whenever it differs,
    so rotating a Kubernetes Secret rotates the token. Without it, a token is generated only
    if the store holds no API token at all (first start); concurrent first starts race on a
    create-only write and only the winner prints.
    """
    key = schema.api_token(BOOTSTRAP_ID)
    if token_file is not None:
        token = (await asyncio.to_thread(token_file.read_text, encoding="utf-8")).strip()
        if len(token) < MIN_BOOTSTRAP_TOKEN:
            raise ValueError(f"api.bootstrap_token_file={token_file}: the token must be at least 32 characters")
        kv = await store.get(key)
        if kv is not None:
            doc = json.loads(kv.value)
            if hmac.compare_digest(token_hash(bytes.fromhex(doc["salt"]), token), doc["hash"]):
                return None
        doc = token_document("bootstrap", Scope.ADMIN, token)
        await store.put(key, json.dumps(doc).encode())
        log.info("bootstrap admin token installed from api.bootstrap_token_file")
        return None
    existing, _ = await store.range(schema.prefix("api", "tokens"), limit=1)
    if existing:
        return None
    token = f"esp_bootstrap_{secrets.token_urlsafe(32)}"
    try:
        await store.put(
            key, json.dumps(token_document("bootstrap", Scope.ADMIN, token)).encode(), expect_mod_revision=0
        )
    except CasConflict:
        return None
    return token


def announce_bootstrap_token(token: str) -> None:
    """Print the bootstrap token once, on stdout (not through logging: log pipelines keep copies)."""
    sys.stdout.write(
        "\n==> Esplanade bootstrap admin token (shown once; create named tokens with it, then revoke it):\n"
        f"    {token}\n\n"
    )
    sys.stdout.flush()


class FailureLimiter:
    """Failed authentications per client address in a sliding minute; over the limit -> 429."""

    def __init__(self, per_minute: int, window: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._lock = asyncio.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.setdefault(address, deque())
        while times and now - times[0] > self.window:
            times.popleft()
        return times

    def retry_after(self, address: str) -> int:
        """Seconds to wait if `address` is over the limit, else 0."""
        now = time.monotonic()
        times = self._recent(address, now)
        if len(times) < self.per_minute:
            if not times:
                self._failures.pop(address, None)
            return 0
        return max(1, int(self.window - (now - times[0])) + 1)

    def failed(self, address: str) -> None:
        now = time.monotonic()
        self._recent(address, now).append(now)
        if len(self._failures) > 100_000:
            self._failures.clear()
