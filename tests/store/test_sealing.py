"""Sealing of secret fields: binding, tampering, keyrings, raw dumps, KEK rotation."""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from pydantic import SecretStr

from esplanade.config.settings import KekSettings
from esplanade.ipsec.sa import ChildSaRecord, SecurityAssociation
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import ENCR_AES_CBC_256, ENCR_AES_GCM_16_256, INTEG_HMAC_SHA2_256_128, Direction
from esplanade.store import schema
from esplanade.store.base import (
    Compare,
    Delete,
    KeyValue,
    Lease,
    Put,
    Store,
    TxnResult,
    WatchItem,
)
from esplanade.store.etcd import EtcdStore
from esplanade.store.factory import KEK_VALUE_SETTING, load_keyring
from esplanade.store.sealing import (
    KEK_FILE_SETTING,
    Keyring,
    KeyringError,
    SealedDocuments,
    SealedValueInvalid,
    Sealer,
    UnknownKeyId,
    is_sealed,
    open_document,
    rotate_kek,
    seal_document,
    sealed_kid,
)
from tests.etcd_server import EtcdServer

SEALED = re.compile(r"^sealed:v1:[A-Za-z0-9_.-]{1,64}:[A-Za-z0-9_-]+$")
PSK = b"correct horse battery staple, but longer"


def _key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate("k1")


def child_sa(child_id: str = "child-1") -> ChildSaRecord:
    ts_local, ts_remote = TrafficSelector.parse("10.0.0.0/24"), TrafficSelector.parse("10.1.0.0/24")
    inbound = SecurityAssociation(
        spi=0xC0FFEE01,
        direction=Direction.IN,
        src="192.0.2.2",
        dst="192.0.2.1",
        encr=ENCR_AES_GCM_16_256,
        encr_key=secrets.token_bytes(ENCR_AES_GCM_16_256.keymat_bytes),
        local_ts=(ts_local,),
        remote_ts=(ts_remote,),
    )
    outbound = SecurityAssociation(
        spi=0xC0FFEE02,
        direction=Direction.OUT,
        src="192.0.2.1",
        dst="192.0.2.2",
        encr=ENCR_AES_CBC_256,
        encr_key=secrets.token_bytes(ENCR_AES_CBC_256.keymat_bytes),
        integ=INTEG_HMAC_SHA2_256_128,
        integ_key=secrets.token_bytes(INTEG_HMAC_SHA2_256_128.key_bytes),
        local_ts=(ts_local,),
        remote_ts=(ts_remote,),
    )
    record = ChildSaRecord(
        id=child_id,
        connection="site-a",
        child="net",
        ike_sa="ike-1",
        identity="gw.example",
        inbound=inbound,
        outbound=outbound,
        created_at=1_700_000_000.0,
    )
    record.validate()
    return record


def secret_spellings(secret: bytes) -> list[bytes]:
    """Every way a dump could show `secret`: raw, hex (both cases), base64 (std/url, padded or not)."""
    b64 = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), b64, b64.rstrip(b"="), url, url.rstrip(b"=")]


# -- one value ----------------------------------------------------------------------------
def test_round_trip_and_format(keyring: Keyring) -> None:
    sealer = Sealer(keyring)
    sealed = sealer.seal("/esplanade/v1/config/connections/a", "psk", PSK)
    assert SEALED.match(sealed) and is_sealed(sealed) and sealed_kid(sealed) == "k1"
    assert sealer.open("/esplanade/v1/config/connections/a", "psk", sealed) == PSK
    again = sealer.seal("/esplanade/v1/config/connections/a", "psk", PSK)
    assert again != sealed, "a fresh nonce every time"
    assert sealer.open("/k", "f", sealer.seal("/k", "f", b"")) == b""


def test_sealed_value_is_bound_to_key_path_and_field(keyring: Keyring) -> None:
    sealer = Sealer(keyring)
    sealed = sealer.seal("/esplanade/v1/config/connections/a", "psk", PSK)
    for key, field_name in [
        ("/esplanade/v1/config/connections/b", "psk"),
        ("/esplanade/v1/config/connections/a", "private_key"),
        ("/esplanade/v1/config/connections/a/", "psk"),
        ("/esplanade/v1/config/connections/", "apsk"),  # no ambiguity from concatenation
    ]:
        with pytest.raises(SealedValueInvalid) as excinfo:
            sealer.open(key, field_name, sealed)
        assert PSK.decode() not in str(excinfo.value)


def test_tampering_is_detected(keyring: Keyring) -> None:
    sealer = Sealer(keyring)
    sealed = sealer.seal("/k", "f", PSK)
    head, body = sealed.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    for position in (0, 11, 12, len(raw) // 2, len(raw) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(raw)
        tampered[position] ^= 0x01
        forged = f"{head}:{base64.urlsafe_b64encode(bytes(tampered)).rstrip(b'=').decode()}"
        with pytest.raises(SealedValueInvalid):
            sealer.open("/k", "f", forged)
    truncated = f"{head}:{base64.urlsafe_b64encode(bytes(raw[:20])).decode()}"
    with pytest.raises(SealedValueInvalid):
        sealer.open("/k", "f", truncated)
    for garbage in ("sealed:v1:k1", "sealed:v1:k1:!!!", "sealed:v1::AAAA", "plain text"):
        with pytest.raises(SealedValueInvalid):
            sealer.open("/k", "f", garbage)


def test_relabelled_key_id_does_not_open(keyring: Keyring) -> None:
    two = keyring.with_new_active("k2")
    sealed = Sealer(two).seal("/k", "f", PSK)
    relabelled = sealed.replace("sealed:v1:k2:", "sealed:v1:k1:")
    with pytest.raises(SealedValueInvalid):
        Sealer(two).open("/k", "f", relabelled)


def test_unknown_key_id_is_a_clear_error(keyring: Keyring, tmp_path: Path) -> None:
    sealed = Sealer(Keyring.generate("old-kek")).seal("/k", "psk", PSK)
    path = tmp_path / "kek"
    path.write_text(keyring.to_text())
    with pytest.raises(UnknownKeyId) as excinfo:
        Sealer(Keyring.from_file(path)).open("/k", "psk", sealed)
    message = str(excinfo.value)
    assert "'old-kek'" in message and KEK_FILE_SETTING in message and str(path) in message
    assert excinfo.value.kid == "old-kek"


# -- keyrings -----------------------------------------------------------------------------
def test_keyring_text_format(tmp_path: Path) -> None:
    text = f"# rotated 2024-05\nk2:{_key(2)}\n\n# old one, still needed\nk1:{_key(1)}\n"
    keyring = Keyring.parse(text, "test")
    assert keyring.active == "k2" and keyring.kids == ("k2", "k1")
    assert keyring.keys["k1"] == bytes([1]) * 32
    inline = load_keyring(KekSettings(value=SecretStr(f"k2:{_key(2)},k1:{_key(1)}")))
    assert inline.kids == ("k2", "k1")
    urlsafe = Keyring.parse("k:" + base64.urlsafe_b64encode(b"\xff" * 32).decode().rstrip("="), "test")
    assert urlsafe.keys["k"] == b"\xff" * 32
    path = tmp_path / "kek"
    path.write_text(keyring.to_text())
    assert load_keyring(KekSettings(file=path)).keys == keyring.keys
    assert Keyring.parse(keyring.to_text(), "round trip").kids == keyring.kids


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no key found"),
        ("# only a comment\n", "no key found"),
        ("k1" + _key(1), "kid:base64key"),
        (f"k1:{base64.b64encode(b'short').decode()}", "is 5 bytes"),
        ("k1:not*base64*at*all", "not valid base64"),
        (f"k1:{_key(1)}\nk1:{_key(2)}", "appears twice"),
        (f"bad/kid:{_key(1)}", "key id"),
    ],
)
def test_malformed_keyrings_name_the_setting_and_hide_the_key(text: str, needle: str) -> None:
    with pytest.raises(KeyringError) as excinfo:
        load_keyring(KekSettings(value=SecretStr(text)))
    message = str(excinfo.value)
    assert needle in message and KEK_VALUE_SETTING in message
    for token in re.split(r"[\s:,]+", text):
        if len(token) > 16:
            assert token not in message, "key material in an error message"


def test_missing_keyring_settings(tmp_path: Path) -> None:
    with pytest.raises(KeyringError) as excinfo:
        load_keyring(KekSettings())
    assert KEK_FILE_SETTING in str(excinfo.value) and KEK_VALUE_SETTING in str(excinfo.value)
    missing = tmp_path / "absent"
    with pytest.raises(KeyringError) as excinfo:
        load_keyring(KekSettings(file=missing))
    assert f"{KEK_FILE_SETTING}={missing}: the KEK file does not exist" in str(excinfo.value)


def test_reprs_hold_no_key_material(keyring: Keyring) -> None:
    key_b64 = base64.b64encode(keyring.keys["k1"]).decode()
    for text in (repr(keyring), str(keyring), repr(Sealer(keyring)), repr(Sealer(keyring).bind("/k"))):
        assert key_b64 not in text and keyring.keys["k1"].hex() not in text
        assert repr(keyring.keys["k1"]) not in text


# -- documents ----------------------------------------------------------------------------
def test_documents_seal_every_bytes_value_under_its_path(keyring: Keyring) -> None:
    bound = Sealer(keyring).bind("/esplanade/v1/config/connections/a")
    document = {"name": "a", "auth": {"psk": PSK, "id": "gw"}, "children": [{"psk": b"child"}, {"x": 1}]}
    sealed = seal_document(bound, document)
    assert is_sealed(sealed["auth"]["psk"]) and is_sealed(sealed["children"][0]["psk"])
    assert sealed["name"] == "a" and sealed["children"][1] == {"x": 1}
    assert bound.open("auth.psk", sealed["auth"]["psk"]) == PSK
    assert bound.open("children.0.psk", sealed["children"][0]["psk"]) == b"child"
    assert open_document(bound, sealed) == document
    moved = dict(sealed, name=sealed["auth"]["psk"])
    with pytest.raises(SealedValueInvalid):
        open_document(bound, moved)


def test_child_sa_record_round_trip_and_field_binding(keyring: Keyring) -> None:
    record = child_sa()
    bound = Sealer(keyring).bind(schema.child_sa(record.id))
    document = record.to_document(bound.seal)
    text = json.dumps(document).encode()
    for secret in (record.inbound.encr_key, record.outbound.encr_key, record.outbound.integ_key):
        for spelling in secret_spellings(secret):
            assert spelling not in text
    assert ChildSaRecord.from_document(json.loads(text), bound.open) == record
    swapped = json.loads(text)
    swapped["outbound"]["encr_key"] = swapped["inbound"]["encr_key"]
    with pytest.raises(SealedValueInvalid):
        ChildSaRecord.from_document(swapped, bound.open)
    other = Sealer(keyring).bind(schema.child_sa("child-2"))
    with pytest.raises(SealedValueInvalid):
        ChildSaRecord.from_document(json.loads(text), other.open)


async def test_sealed_documents_in_the_store(store: Store, keyring: Keyring) -> None:
    documents = SealedDocuments(store, Sealer(keyring))
    key = schema.connection("site-a")
    await documents.put(key, {"name": "site-a", "psk": PSK}, expect_mod_revision=0)
    got = await documents.get(key)
    assert got is not None
    document, kv = got
    assert document == {"name": "site-a", "psk": PSK}
    assert PSK not in kv.value
    raw = await documents.get_sealed(key)
    assert raw is not None and is_sealed(raw[0]["psk"])
    assert await documents.get(schema.connection("absent")) is None


# -- what an operator can see -----------------------------------------------------------------
async def _write_secrets(store: Store, keyring: Keyring) -> tuple[ChildSaRecord, list[bytes]]:
    record = child_sa()
    bound = Sealer(keyring).bind(schema.child_sa(record.id))
    await store.put(schema.child_sa(record.id), json.dumps(record.to_document(bound.seal)).encode())
    await SealedDocuments(store, Sealer(keyring)).put(schema.connection("site-a"), {"name": "site-a", "psk": PSK})
    secrets_written = [PSK, record.inbound.encr_key, record.outbound.encr_key, record.outbound.integ_key]
    return record, secrets_written


@pytest.mark.etcd
async def test_raw_etcd_dump_shows_no_secret(etcd_server: EtcdServer, keyring: Keyring) -> None:
    async with EtcdStore([etcd_server.endpoint]) as store:
        _, written = await _write_secrets(store, keyring)
    dump = etcd_server.dump()
    assert schema.child_sa("child-1").encode() in dump and b"sealed:v1:k1:" in dump
    for secret in written:
        for spelling in secret_spellings(secret):
            assert spelling not in dump


async def test_raw_embedded_file_shows_no_secret(tmp_path: Path, keyring: Keyring) -> None:
    from esplanade.store.embedded import EmbeddedStore

    db = tmp_path / "state.db"
    async with EmbeddedStore(db) as store:
        _, written = await _write_secrets(store, keyring)
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"sealed:v1:k1:" in files
    for secret in written:
        for spelling in secret_spellings(secret):
            assert spelling not in files


# -- rotation -----------------------------------------------------------------------------
class InterferingStore(Store):
    """Delegates to `inner`; before the first CAS put on `target`, an old-version process
    rewrites that key (sealed under the old KEK again), so the rotation must retry."""

    def __init__(self, inner: Store, target: str, old: Keyring) -> None:
        self.inner, self.target, self.old = inner, target, old
        self.interfered = False
        self.backend_name = inner.backend_name

    async def put(self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None) -> int:
        if key == self.target and expect_mod_revision is not None and not self.interfered:
            self.interfered = True
            await SealedDocuments(self.inner, Sealer(self.old)).put(key, {"name": "site-b", "psk": b"changed"})
        return await self.inner.put(key, value, lease=lease, expect_mod_revision=expect_mod_revision)

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def ping(self) -> int:
        return await self.inner.ping()

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        return await self.inner.range(prefix, limit=limit)

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        return await self.inner.delete(key, expect_mod_revision=expect_mod_revision)

    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        return await self.inner.commit(conditions, ops)

    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        return self.inner.watch(prefix, start_revision)

    async def grant_lease(self, ttl: int) -> Lease:
        return await self.inner.grant_lease(ttl)

    async def keepalive(self, lease_id: int) -> int:
        return await self.inner.keepalive(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        await self.inner.revoke_lease(lease_id)

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)


async def test_rotation_reseals_everything_under_the_new_kek(store: Store, keyring: Keyring) -> None:
    old = keyring
    record, _ = await _write_secrets(store, old)
    lease = await store.grant_lease(300)
    docs = SealedDocuments(store, Sealer(old))
    await docs.put(schema.connection("leased"), {"name": "leased", "psk": b"leased psk"}, lease=lease.id)
    await docs.put(schema.connection("site-b"), {"name": "site-b", "psk": b"b psk"})
    await store.put(schema.pool("plain"), b'{"name":"plain","cidr":"10.9.0.0/24"}')
    await store.put(schema.crl("der"), b"\x30\x82not json")
    await store.put("/outside/esplanade", json.dumps({"x": Sealer(old).seal("/outside/esplanade", "x", b"y")}).encode())

    new = old.with_new_active("k2")
    interfering = InterferingStore(store, schema.connection("site-b"), old)
    report = await rotate_kek(interfering, new)
    assert interfering.interfered, "the rotation met a concurrent writer"
    assert report.skipped_keys == () and report.usage.unopenable == ()
    assert report.rewritten_keys == 4 and report.resealed_values == 6

    only_new = new.without("k1")
    new_docs = SealedDocuments(store, Sealer(only_new))
    got = await new_docs.get(schema.connection("site-a"))
    assert got is not None and got[0]["psk"] == PSK
    got = await new_docs.get(schema.connection("site-b"))
    assert got is not None and got[0]["psk"] == b"changed", "the concurrent write won, then was re-sealed"
    got = await new_docs.get(schema.connection("leased"))
    assert got is not None and got[1].lease == lease.id, "re-sealing kept the lease"
    raw = await new_docs.get_sealed(schema.child_sa(record.id))
    assert raw is not None
    bound = Sealer(only_new).bind(schema.child_sa(record.id))
    assert ChildSaRecord.from_document(raw[0], bound.open) == record
    pool = await store.get(schema.pool("plain"))
    assert pool is not None and pool.version == 1, "documents without secrets are not rewritten"

    meta_kv = await store.get(schema.KEK_META)
    assert meta_kv is not None
    meta = json.loads(meta_kv.value)
    assert meta["active"] == "k2"
    assert meta["referenced"] == {"k2": 6}
    assert meta["removable"] == ["k1"]
    assert meta["unopenable"] == []
    assert not any(len(v) > 40 for v in json.dumps(meta).split('"')), "no key material in meta/kek"

    again = await rotate_kek(store, new)
    assert again.rewritten_keys == 0 and again.usage.referenced == {"k2": 6}


async def test_usage_reports_values_the_keyring_cannot_open(store: Store, keyring: Keyring) -> None:
    stranger = Keyring.generate("lost")
    await SealedDocuments(store, Sealer(stranger)).put(schema.connection("orphan"), {"psk": PSK})
    report = await rotate_kek(store, keyring)
    assert report.usage.unopenable == (schema.connection("orphan"),)
    assert report.usage.referenced == {"lost": 1}
    assert report.rewritten_keys == 0
