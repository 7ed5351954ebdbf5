"""Connections in the store (`config/connections/<name>`, pools at `config/pools/<name>`),
kept in step with the running engine by a watch.

The API writes documents (validated first, CAS on the revision); every instance applies
them from the watch, so a load, replace or unload reaches the engine without a restart and
a restart recovers everything from the store. A stored document that does not validate (it
was written around the API) is logged with the field and skipped; the engine keeps the
last good version of that connection.

start_action: `start` connections are initiated when first seen (at start-up: all of them);
`trap` children get trap entries in `spd/` (`<connection>.<child>.trap<i>.out`, trap=true)
whose traffic the dataplane reports as an acquire.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from esplanade.ipsec.transforms import IpProto
from esplanade.keyexchange.child_sa_handoff import trap_policies
from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.connection_documents import (
    DocumentError,
    StoredObjects,
    check_name,
    connection_config,
    pool_config,
    public_view,
)
from esplanade.keyexchange.engine_driver import IkeEngine
from esplanade.store import schema
from esplanade.store.base import Delete, EventType, KeyValue, Put, Resync, Store, StoreError, WatchBatch
from esplanade.store.sealing import (
    SealedDocuments,
    Sealer,
    SealingError,
    decode_document,
    encode_document,
    open_document,
)

log = logging.getLogger(__name__)

CONNECTIONS = schema.prefix("config", "connections")
POOLS = schema.prefix("config", "pools")
CERTS = schema.prefix("config", "certs")
CAS = schema.prefix("config", "cas")


def trap_tunnel(cfg: ConnectionConfig) -> tuple[str, str]:
    """(local, remote) outer addresses of a trap template: only when the connection names
    exactly one address of each side, of one family (else the acquire leaves them open)."""
    if len(cfg.local_addrs) != 1 or len(cfg.remote_addrs) != 1:
        return "", ""
    try:
        local, remote = (ipaddress.ip_address(a) for a in (cfg.local_addrs[0], cfg.remote_addrs[0]))
    except ValueError:
        return "", ""
    return (str(local), str(remote)) if local.version == remote.version else ("", "")


class ConnectionCatalog:
    def __init__(self, store: Store, sealer: Sealer, engine: IkeEngine) -> None:
        self.store = store
        self.docs = SealedDocuments(store, sealer)
        self.engine = engine
        self.documents: dict[str, dict[str, Any]] = {}  # opened (secrets as bytes): re-validated when pools change
        self.revisions: dict[str, int] = {}
        self.pools: dict[str, PoolConfig] = {}
        self.certs: dict[str, tuple[bytes, bytes | None]] = {}  # certificate id -> (PEM, PEM private key)
        self.cas: dict[str, bytes] = {}
        self.traps: dict[str, list[str]] = {}  # connection -> SPD ids of its trap entries
        self.trap_connection: dict[str, tuple[str, str]] = {}  # trap SPD id -> (connection, child)
        self.started = False  # after start-up, new start_action=start connections are initiated at once
        self.on_initiate: Callable[[str], None] = lambda name: None

    # -- start-up and the watch --------------------------------------------------------------
    async def load_all(self) -> int:
        """Apply every pool and connection in the store; return the revision they were read at."""
        revision = 0
        for prefix in (CERTS, CAS):
            kvs, rev = await self.store.range(prefix)
            revision = max(revision, rev)
            for kv in kvs:
                self._apply_object(kv)
        pools, rev = await self.store.range(POOLS)
        for kv in pools:
            self._apply_pool(kv)
        conns, rev2 = await self.store.range(CONNECTIONS)
        for kv in conns:
            await self._apply_connection(kv)
        return max(revision, rev, rev2)

    @property
    def objects(self) -> StoredObjects:
        return StoredObjects(self.certs, self.cas)

    def _apply_object(self, kv: KeyValue) -> None:
        try:
            doc = open_document(self.docs.bind(kv.key), decode_document(kv.key, kv.value))
            pem = str(doc["pem"]).encode()
        except (SealingError, KeyError) as exc:
            log.error("%s in the store is unusable, ignored: %s", kv.key, exc)
            return
        if kv.key.startswith(CERTS):
            key = doc.get("private_key")
            self.certs[kv.key[len(CERTS) :]] = (pem, key if isinstance(key, bytes) else None)
        else:
            self.cas[kv.key[len(CAS) :]] = pem

    def start_configured(self) -> list[str]:
        self.started = True
        started = []
        for name, cfg in list(self.engine.dispatcher.configs.items()):
            if self._start_children(cfg):
                started.append(self._initiate(name, cfg))
        return started

    def _start_children(self, cfg: ConnectionConfig) -> list[str]:
        return [c.name for c in cfg.children if c.start_action == "start"] if cfg.remote_addrs else []

    def _initiate(self, name: str, cfg: ConnectionConfig) -> str:
        names = self._start_children(cfg)
        ike = str(self.engine.call(self.engine.dispatcher.initiate_children, name, names))
        self.on_initiate(name)
        return ike

    async def follow(self, revision: int) -> None:
        async for item in self.store.watch(schema.prefix("config"), revision + 1):
            if isinstance(item, Resync):
                await self._resync(item.kvs)
                continue
            assert isinstance(item, WatchBatch)
            for ev in item.events:
                key = ev.kv.key
                if key.startswith((CERTS, CAS)):
                    if ev.type == EventType.PUT:
                        self._apply_object(ev.kv)
                    elif key.startswith(CERTS):
                        self.certs.pop(key[len(CERTS) :], None)
                    else:
                        self.cas.pop(key[len(CAS) :], None)
                    await self._revalidate()
                elif key.startswith(POOLS):
                    if ev.type == EventType.PUT:
                        self._apply_pool(ev.kv)
                        await self._revalidate()
                    else:
                        self.pools.pop(key[len(POOLS) :], None)
                elif key.startswith(CONNECTIONS):
                    if ev.type == EventType.PUT:
                        await self._apply_connection(ev.kv)
                    else:
                        await self._remove(key[len(CONNECTIONS) :])

    async def _resync(self, kvs: tuple[KeyValue, ...]) -> None:
        present = {kv.key[len(CONNECTIONS) :] for kv in kvs if kv.key.startswith(CONNECTIONS)}
        for kv in kvs:
            if kv.key.startswith(POOLS):
                self._apply_pool(kv)
            elif kv.key.startswith((CERTS, CAS)):
                self._apply_object(kv)
        for kv in kvs:
            if kv.key.startswith(CONNECTIONS):
                await self._apply_connection(kv)
        for name in list(self.documents):
            if name not in present:
                await self._remove(name)

    def _apply_pool(self, kv: KeyValue) -> None:
        name = kv.key[len(POOLS) :]
        try:
            self.pools[name] = pool_config(name, decode_document(kv.key, kv.value))
        except (DocumentError, SealingError) as exc:
            log.error("pool %s in the store is invalid, ignored: %s", name, exc)

    async def _revalidate(self) -> None:
        for name, doc in list(self.documents.items()):
            try:
                self.engine.set_config(connection_config(name, doc, self.pools, self.objects))
            except DocumentError:
                continue

    async def _apply_connection(self, kv: KeyValue) -> None:
        name = kv.key[len(CONNECTIONS) :]
        if self.revisions.get(name) == kv.mod_revision:
            return
        try:
            doc = open_document(self.docs.bind(kv.key), decode_document(kv.key, kv.value))
            cfg = connection_config(name, doc, self.pools, self.objects)
        except (DocumentError, SealingError) as exc:
            log.error("connection %s in the store is invalid, keeping the previous version: %s", name, exc)
            return
        new = name not in self.documents
        self.documents[name] = doc
        self.revisions[name] = kv.mod_revision
        self.engine.set_config(cfg)
        await self._write_traps(cfg)
        log.info("connection %s %s (revision %d)", name, "loaded" if new else "replaced", kv.mod_revision)
        if new and self.started and self._start_children(cfg):
            self._initiate(name, cfg)

    async def _remove(self, name: str) -> None:
        if self.documents.pop(name, None) is None:
            return
        self.revisions.pop(name, None)
        deleted = self.engine.remove_config(name)
        await self._write_traps(None, name)
        log.info("connection %s unloaded (%d IKE SAs deleted)", name, len(deleted))

    async def _write_traps(self, cfg: ConnectionConfig | None, name: str = "") -> None:
        name = cfg.name if cfg is not None else name
        wanted = []
        if cfg is not None:
            for child in cfg.children:
                if child.start_action == "trap":
                    for p in trap_policies(
                        cfg.name,
                        child.name,
                        child.local_ts,
                        child.remote_ts,
                        tunnel=trap_tunnel(cfg),
                        mode=child.mode,
                        protocol=IpProto.AH if child.ah_proposals else IpProto.ESP,
                        if_id=child.if_id_out,
                    ):
                        wanted.append(p)
                        self.trap_connection[p.id] = (cfg.name, child.name)
        old = set(self.traps.get(name, []))
        ops: list[Put | Delete] = [Put(schema.spd_policy(p.id), encode_document(p.to_document())) for p in wanted]
        ops += [Delete(schema.spd_policy(pid)) for pid in old - {p.id for p in wanted}]
        for pid in old - {p.id for p in wanted}:
            self.trap_connection.pop(pid, None)
        self.traps[name] = [p.id for p in wanted]
        if not self.traps[name]:
            del self.traps[name]
        if ops:
            try:
                await self.store.commit([], ops)
            except StoreError as exc:
                log.warning("cannot write the trap policies of %s: %s", name, exc)

    # -- API writes (validated, CAS) ------------------------------------------------------
    def validate(self, name: str, document: dict[str, Any]) -> ConnectionConfig:
        """Check a document against what this instance knows (pools, certificates, CAs)."""
        check_name("connection", name)
        return connection_config(name, document, self.pools, self.objects)  # DocumentError names the field

    async def save(self, name: str, document: dict[str, Any], expect_revision: int = 0) -> int:
        """Validate and write a connection; raise DocumentError or CasConflict."""
        self.validate(name, document)
        key = schema.connection(name)
        if not expect_revision:
            current = await self.store.get(key)
            expect_revision = current.mod_revision if current is not None else 0
        revision = await self.docs.put(key, document, expect_mod_revision=expect_revision)
        # apply it here at once (the watch then skips this revision): an Initiate right after works
        written = await self.store.get(key)
        if written is not None and written.mod_revision == revision:
            await self._apply_connection(written)
        return revision

    async def delete(self, name: str) -> bool:
        existed = await self.store.delete(schema.connection(name))
        await self._remove(name)
        return existed

    async def save_pool(self, name: str, document: dict[str, Any]) -> int:
        check_name("pool", name)
        self.pools[name] = pool_config(name, document)
        revision = await self.store.put(schema.pool(name), encode_document(document))
        await self._revalidate()
        return revision

    async def listing(self) -> list[tuple[str, dict[str, Any], int]]:
        kvs, _ = await self.store.range(CONNECTIONS)
        out = []
        for kv in kvs:
            try:
                doc = decode_document(kv.key, kv.value)
            except SealingError:
                continue
            out.append((kv.key[len(CONNECTIONS) :], public_view(doc), kv.mod_revision))
        return out
