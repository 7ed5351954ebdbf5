"""Sealing of secret fields: AES-256-GCM under a key-encryption key (KEK), bound to place.

Sealed form, a compact string that sits inside JSON documents::

    sealed:v1:<kid>:<base64url(nonce[12] || ciphertext || tag[16]), no padding>

The associated data binds the format version, the key id, the store key path and the field
name (each length-prefixed), so a sealed value copied to another key, or to another field
of the same document, fails to open, and so does any altered byte.

Field names are the dotted path of the value in its JSON document (`psk`,
`inbound.encr_key`, `children.0.psk`): `ChildSaRecord.to_document(seal)` names its fields
that way, `SealedDocuments` seals every `bytes` value under its path, and `rotate_kek`
relies on the convention to re-seal values it finds anywhere under /esplanade/v1/.

Keyring: the active key id plus every key still needed to open old values. Text format
(the file named by the setting kek.file, e.g. a mounted Kubernetes Secret, or the text of
kek.value; see `esplanade.store.factory.load_keyring`), one key per line (or separated by
commas/whitespace), `#` comments::

    # first key = active: new values are sealed under it
    k2:6lJ0...base64 of 32 random bytes...=
    k1:q8Xb...=

Key ids are 1-64 characters of [A-Za-z0-9_.-]. `esplanade kek generate` prints a
fresh line.

Rotation without downtime:
1. add the new key as a *second* line everywhere (every process can open both);
2. move it to the first line everywhere (new values are sealed under it);
3. run `rotate_kek(store, keyring)`: re-seals every value under the old key (CAS on
   mod_revision, retried on conflict) and records in meta/kek which key ids are still
   referenced (and which keyring keys can go);
4. when meta/kek shows the old kid unreferenced, remove its line.

Nothing here logs, and no exception message carries plaintext or key material.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from esplanade.store import schema
from esplanade.store.base import CasConflict, KeyValue, LeaseNotFound, Store, StoreError

SEALED_PREFIX = "sealed:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEK_FILE_SETTING = "kek.file (ESPLANADE_KEK__FILE)"
_KID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_AAD_LABEL = b"esplanade sealed field v1"


class SealingError(StoreError):
    """A sealed value cannot be made or opened."""


class KeyringError(SealingError):
    """The KEK setting is missing or malformed. The message names the setting."""


class UnknownKeyId(SealingError):
    """The value was sealed under a key id the keyring does not hold."""

    def __init__(self, kid: str, where: str, source: str) -> None:
        super().__init__(
            f"{where} was sealed under KEK id {kid!r}, which the keyring ({source}) does not hold:"
            " add that key back to the keyring (as a non-first line) to open it"
        )
        self.kid = kid


class SealedValueInvalid(SealingError):
    """The value is malformed or does not authenticate for this key path and field."""


# ---------------------------------------------------------------------------------------
# Keyring
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Keyring:
    """The active KEK id and every KEK by id. Its repr shows ids, never key material."""

    active: str
    keys: Mapping[str, bytes] = field(repr=False)
    source: str = "in-memory keyring"

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise KeyringError(f"{self.source}: the active key id {self.active!r} has no key")
        for kid, key in self.keys.items():
            if not _KID.fullmatch(kid):
                raise KeyringError(f"{self.source}: key id {kid!r} is not 1-64 characters of [A-Za-z0-9_.-]")
            if len(key) != KEY_BYTES:
                raise KeyringError(f"{self.source}: key {kid!r} is {len(key)} bytes; a KEK is {KEY_BYTES} bytes")

    @property
    def kids(self) -> tuple[str, ...]:
        """Key ids, the active one first."""
        return (self.active, *(k for k in self.keys if k != self.active))

    @classmethod
    def parse(cls, text: str, source: str) -> Keyring:
        """Parse the text format (see the module doc). `source` names the setting in errors."""
        tokens: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.extend(t for t in re.split(r"[\s,]+", line) if t)
        if not tokens:
            raise KeyringError(f"{source}: no key found; expected lines of the form kid:base64key (first = active)")
        keys: dict[str, bytes] = {}
        for number, token in enumerate(tokens, start=1):
            kid, sep, encoded = token.partition(":")
            if not sep or not kid or not encoded:
                raise KeyringError(f"{source}: entry {number} is not of the form kid:base64key")
            if not _KID.fullmatch(kid):
                raise KeyringError(f"{source}: entry {number}: key id is not 1-64 characters of [A-Za-z0-9_.-]")
            if kid in keys:
                raise KeyringError(f"{source}: key id {kid!r} appears twice")
            try:
                key = base64.b64decode(
                    encoded.replace("-", "+").replace("_", "/") + "=" * (-len(encoded) % 4), validate=True
                )
            except (binascii.Error, ValueError):
                raise KeyringError(f"{source}: key {kid!r} is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise KeyringError(
                    f"{source}: key {kid!r} is {len(key)} bytes; a KEK is {KEY_BYTES} random bytes, base64-encoded"
                )
            keys[kid] = key
        return cls(active=next(iter(keys)), keys=keys, source=source)

    @classmethod
    def from_file(cls, path: str | Path, setting: str = KEK_FILE_SETTING) -> Keyring:
        source = f"{setting}={path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyringError(f"{source}: the KEK file does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise KeyringError(f"{source}: cannot read the KEK file: {reason}") from None
        return cls.parse(text, source)

    @classmethod
    def generate(cls, kid: str = "k1") -> Keyring:
        return cls(active=kid, keys={kid: secrets.token_bytes(KEY_BYTES)}, source="generated keyring")

    def with_new_active(self, kid: str, key: bytes | None = None) -> Keyring:
        """This keyring with `kid` (a new random key if `key` is None) as the active key."""
        keys = {kid: key if key is not None else self.keys.get(kid) or secrets.token_bytes(KEY_BYTES)}
        keys.update((k, v) for k, v in self.keys.items() if k != kid)
        return Keyring(active=kid, keys=keys, source=self.source)

    def without(self, kid: str) -> Keyring:
        if kid == self.active:
            raise KeyringError(f"{self.source}: cannot remove the active key {kid!r}")
        return Keyring(active=self.active, keys={k: v for k, v in self.keys.items() if k != kid}, source=self.source)

    def to_text(self) -> str:
        """The keyring file's text. It holds key material: write it only to a protected file."""
        lines = ["# esplanade KEK keyring: first key = active"]
        lines += [f"{kid}:{base64.b64encode(self.keys[kid]).decode()}" for kid in self.kids]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Sealing one value
# ---------------------------------------------------------------------------------------
def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def sealed_kid(value: str) -> str:
    """The key id a sealed value names (not verified: that takes opening it)."""
    kid, sep, _ = value[len(SEALED_PREFIX) :].partition(":") if is_sealed(value) else ("", "", "")
    if not sep or not _KID.fullmatch(kid):
        raise SealedValueInvalid("not a sealed value (expected sealed:v1:<kid>:<base64url>)")
    return kid


def _aad(kid: str, key_path: str, field_name: str) -> bytes:
    parts = [_AAD_LABEL, kid.encode(), key_path.encode("utf-8", "surrogateescape"), field_name.encode()]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _where(key_path: str, field_name: str) -> str:
    return f"field {field_name!r} of {key_path}"


class Sealer:
    """Seals under the keyring's active KEK; opens under whichever KEK a value names."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._aeads = {kid: AESGCM(key) for kid, key in keyring.keys.items()}

    def __repr__(self) -> str:
        return f"Sealer(active={self.keyring.active!r}, kids={list(self.keyring.kids)!r})"

    def seal(self, key_path: str, field_name: str, plaintext: bytes) -> str:
        if not isinstance(plaintext, bytes | bytearray | memoryview):
            raise TypeError(f"{_where(key_path, field_name)}: sealing takes bytes, not {type(plaintext).__name__}")
        kid = self.keyring.active
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aeads[kid].encrypt(nonce, bytes(plaintext), _aad(kid, key_path, field_name))
        return f"{SEALED_PREFIX}{kid}:{base64.urlsafe_b64encode(nonce + sealed).rstrip(b'=').decode()}"

    def open(self, key_path: str, field_name: str, value: str) -> bytes:
        where = _where(key_path, field_name)
        if not is_sealed(value):
            raise SealedValueInvalid(f"{where} is not a sealed value")
        kid, sep, body = value[len(SEALED_PREFIX) :].partition(":")
        if not sep or not _KID.fullmatch(kid):
            raise SealedValueInvalid(f"{where}: malformed sealed value")
        aead = self._aeads.get(kid)
        if aead is None:
            raise UnknownKeyId(kid, where, self.keyring.source)
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise SealedValueInvalid(f"{where}: malformed sealed value (bad base64url)") from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise SealedValueInvalid(f"{where}: sealed value too short")
        try:
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(kid, key_path, field_name))
        except InvalidTag:
            raise SealedValueInvalid(
                f"{where} does not open under KEK {kid!r}: it was sealed for another key or field, or altered"
            ) from None

    def bind(self, key_path: str) -> BoundSealer:
        return BoundSealer(self, key_path)


@dataclass(frozen=True)
class BoundSealer:
    """seal/open for one store key: `ChildSaRecord.to_document(bound.seal)`,
    `ChildSaRecord.from_document(doc, bound.open)`."""

    sealer: Sealer
    key_path: str

    def seal(self, field_name: str, plaintext: bytes) -> str:
        return self.sealer.seal(self.key_path, field_name, plaintext)

    def open(self, field_name: str, value: str) -> bytes:
        return self.sealer.open(self.key_path, field_name, value)


# ---------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------
def _map_leaves(node: Any, path: str, fn: Callable[[str, Any], Any]) -> Any:
    if isinstance(node, dict):
        return {k: _map_leaves(v, f"{path}.{k}" if path else str(k), fn) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_map_leaves(v, f"{path}.{i}" if path else str(i), fn) for i, v in enumerate(node)]
    return fn(path, node)


def seal_document(bound: BoundSealer, document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `document` with every bytes value sealed under its dotted path."""

    def leaf(path: str, value: Any) -> Any:
        return bound.seal(path, bytes(value)) if isinstance(value, bytes | bytearray) else value

    sealed: dict[str, Any] = _map_leaves(dict(document), "", leaf)
    return sealed


def open_document(bound: BoundSealer, document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `document` with every sealed value opened (to bytes)."""

    def leaf(path: str, value: Any) -> Any:
        return bound.open(path, value) if is_sealed(value) else value

    opened: dict[str, Any] = _map_leaves(dict(document), "", leaf)
    return opened


def encode_document(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def decode_document(key: str, value: bytes) -> dict[str, Any]:
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SealingError(f"{key} does not hold a JSON document") from None
    if not isinstance(document, dict):
        raise SealingError(f"{key} holds JSON that is not an object")
    return document


class SealedDocuments:
    """JSON documents in the store whose `bytes` values are sealed on the way in and
    opened on the way out. Sealed strings already in a document pass through as they are."""

    def __init__(self, store: Store, sealer: Sealer) -> None:
        self.store = store
        self.sealer = sealer

    def bind(self, key: str) -> BoundSealer:
        return self.sealer.bind(key)

    async def put(
        self, key: str, document: Mapping[str, Any], *, lease: int = 0, expect_mod_revision: int | None = None
    ) -> int:
        value = encode_document(seal_document(self.bind(key), document))
        return await self.store.put(key, value, lease=lease, expect_mod_revision=expect_mod_revision)

    async def get(self, key: str) -> tuple[dict[str, Any], KeyValue] | None:
        """The document with its secrets opened (as bytes), and its KeyValue; None if absent."""
        kv = await self.store.get(key)
        if kv is None:
            return None
        return open_document(self.bind(key), decode_document(key, kv.value)), kv

    async def get_sealed(self, key: str) -> tuple[dict[str, Any], KeyValue] | None:
        """The document as stored (sealed strings left sealed), for `from_document(doc, open)`."""
        kv = await self.store.get(key)
        if kv is None:
            return None
        return decode_document(key, kv.value), kv


# ---------------------------------------------------------------------------------------
# KEK rotation
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KekUsage:
    """What meta/kek records: which KEK ids sealed the data, as of `revision`."""

    active: str
    referenced: dict[str, int]  # kid -> number of sealed values under it
    removable: tuple[str, ...]  # keyring ids that no value references any more
    unopenable: tuple[str, ...]  # keys holding a sealed value this keyring cannot open
    revision: int


@dataclass(frozen=True)
class RotationReport:
    usage: KekUsage
    resealed_values: int
    rewritten_keys: int
    skipped_keys: tuple[str, ...]  # conflicted on every attempt: run rotate_kek again


def _sealed_leaves(document: Any) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def leaf(path: str, value: Any) -> Any:
        if is_sealed(value):
            found.append((path, value))
        return value

    _map_leaves(document, "", leaf)
    return found


def _parse_json_object(value: bytes) -> dict[str, Any] | None:
    if not value.startswith(b"{"):
        return None
    try:
        document = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _reseal(sealer: Sealer, key: str, document: dict[str, Any]) -> tuple[dict[str, Any], int, bool]:
    """Re-seal values not under the active KEK. -> (document, values re-sealed, any unopenable)."""
    bound = sealer.bind(key)
    active = sealer.keyring.active
    count = 0
    unopenable = False

    def leaf(path: str, value: Any) -> Any:
        nonlocal count, unopenable
        if not is_sealed(value):
            return value
        try:
            if sealed_kid(value) == active:
                return value
            plaintext = bound.open(path, value)
        except SealingError:
            unopenable = True
            return value
        count += 1
        return bound.seal(path, plaintext)

    resealed: dict[str, Any] = _map_leaves(document, "", leaf)
    return resealed, count, unopenable


async def record_kek_usage(store: Store, keyring: Keyring, *, prefix: str = schema.ROOT) -> KekUsage:
    """Count sealed values by key id under `prefix` and write the result to meta/kek."""
    kvs, revision = await store.range(prefix)
    sealer = Sealer(keyring)
    referenced: dict[str, int] = {}
    unopenable: list[str] = []
    for kv in kvs:
        if kv.key == schema.KEK_META:
            continue
        document = _parse_json_object(kv.value)
        if document is None:
            continue
        bad = False
        for path, value in _sealed_leaves(document):
            try:
                kid = sealed_kid(value)
            except SealingError:
                bad = True
                continue
            referenced[kid] = referenced.get(kid, 0) + 1
            try:
                sealer.open(kv.key, path, value)
            except SealingError:
                bad = True
        if bad:
            unopenable.append(kv.key)
    usage = KekUsage(
        active=keyring.active,
        referenced=dict(sorted(referenced.items())),
        removable=tuple(k for k in keyring.kids if k != keyring.active and k not in referenced),
        unopenable=tuple(unopenable),
        revision=revision,
    )
    meta = {
        "active": usage.active,
        "keyring": list(keyring.kids),
        "referenced": usage.referenced,
        "removable": list(usage.removable),
        "unopenable": list(usage.unopenable),
        "revision": usage.revision,
        "recorded_at": time.time(),
    }
    await store.put(schema.KEK_META, encode_document(meta))
    return usage


async def rotate_kek(
    store: Store, keyring: Keyring, *, prefix: str = schema.ROOT, attempts_per_key: int = 20
) -> RotationReport:
    """Re-seal every sealed value under `prefix` not under the active KEK, then record usage.

    Each document is rewritten with CAS on its mod_revision (keeping its lease) and re-read
    and retried when a concurrent writer got there first; a key deleted meanwhile, or whose
    lease ran out, is left alone.
    """
    sealer = Sealer(keyring)
    kvs, _ = await store.range(prefix)
    resealed_values = rewritten = 0
    skipped: list[str] = []
    for first in kvs:
        if first.key == schema.KEK_META:
            continue
        kv: KeyValue | None = first
        for _attempt in range(attempts_per_key):
            if kv is None:
                break
            document = _parse_json_object(kv.value)
            if document is None:
                break
            updated, count, _ = _reseal(sealer, kv.key, document)
            if not count:
                break
            try:
                await store.put(kv.key, encode_document(updated), lease=kv.lease, expect_mod_revision=kv.mod_revision)
            except CasConflict as conflict:
                kv = conflict.current  # read atomically with the failed compare: retry at once
                continue
            except LeaseNotFound:
                break
            resealed_values += count
            rewritten += 1
            break
        else:
            skipped.append(first.key)
    usage = await record_kek_usage(store, keyring, prefix=prefix)
    return RotationReport(
        usage=usage, resealed_values=resealed_values, rewritten_keys=rewritten, skipped_keys=tuple(skipped)
    )
