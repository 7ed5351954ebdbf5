"""Who an authenticated IKE peer is to the policy, and what it may reach: the consumers' view.

IKE (narrowing, split-tunnel routes, the connect decision) and the dataplane (per-Child-SA
filters) both need, for an authenticated IKE identity, the policy identity it binds to and that
identity's compiled document (`policy/compiled/<identity>`). `AccessTable` is that view, built
from store key-values (sans-IO: the caller feeds puts and deletes); `AccessView` follows the
store (one range + one watch on ``policy/``) and tells listeners which policy identities
changed, so a rule change reaches live SAs.

A peer whose IKE identity binds to no policy identity is *not governed*: site-to-site peers and
connections that predate the policy model keep their negotiated selectors. A bound identity
with no (or an unreadable) compiled document is allowed nothing (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from esplanade.policy.compiled import CompiledDocumentError, CompiledPolicy
from esplanade.policy.decode import parse_ike_id
from esplanade.policy.model import Identity, IkeId, IPNetwork, Site
from esplanade.policy.store_state import POLICY_PREFIX, decode_kv, object_key_parts
from esplanade.store import schema
from esplanade.store.base import KeyValue, Resync, Store, StoreError, WatchBatch

log = logging.getLogger(__name__)

COMPILED_PREFIX = schema.prefix("policy", "compiled")


def ike_id_from_peer_text(text: str) -> IkeId | None:
    """The policy form of an authenticated peer identity as IKE prints it (`Identity.__str__`:
    ``alice@example.com``, ``host.example.com``, ``192.0.2.1``, ``C=CH, O=Example, CN=alice``;
    the same inference as `Identity.parse`). None for what no policy identity can bind
    (``%any``, key ids, empty)."""
    text = text.strip()
    if not text or text == "%any" or text.startswith(("@#", "DN:")):
        return None
    try:
        ipaddress.ip_address(text)
        kind = "ip"
    except ValueError:
        if "=" in text:
            kind = "dn"
        elif "@" in text:
            kind = "email"
        else:
            kind = "fqdn"
    try:
        return parse_ike_id(f"{kind}:{text.removeprefix('@')}")
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Access:
    """What the policy says about one authenticated peer."""

    identity: str  # the policy identity id
    compiled: CompiledPolicy  # empty (no parts) when nothing is granted or the document is unreadable
    site_networks: tuple[IPNetwork, ...] = ()  # every site's networks (coarse IKE narrowing)

    @property
    def grants_nothing(self) -> bool:
        return not any(part.selectors for part in self.compiled.parts)


class AccessTable:
    """IKE identity -> policy identity -> compiled policy, from store key-values."""

    def __init__(self) -> None:
        self.identities: dict[str, Identity] = {}
        self.by_ike_id: dict[IkeId, str] = {}
        # every identity that lists an IKE id, in the order they were put: the first one binds it.
        # A valid model binds each IKE id once; the others are claims in flight (an IKE id moved
        # from one identity to another in one transaction arrives as two puts, in either order).
        self._claims: dict[IkeId, list[str]] = {}
        self.unreadable: set[str] = set()  # identities whose document does not decode: granted nothing
        self.compiled: dict[str, CompiledPolicy] = {}
        self.sites: dict[str, Site] = {}
        self.revision = 0

    def lookup(self, peer_identity: str) -> Access | None:
        """None: the peer is not governed by policy (its IKE identity binds to no policy identity)."""
        ike_id = ike_id_from_peer_text(peer_identity)
        if ike_id is None:
            return None
        identity = self.by_ike_id.get(ike_id)
        if identity is None:
            return None
        compiled = self.compiled.get(identity)
        if compiled is None or identity in self.unreadable:
            compiled = CompiledPolicy(identity, ())
        return Access(identity, compiled, self.site_networks())

    def site_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(net for site_id in sorted(self.sites) for net in self.sites[site_id].networks)

    def load(self, kvs: Iterable[KeyValue]) -> set[str]:
        """Replace everything; returns the policy identities whose access may have changed."""
        before_ids = dict(self.by_ike_id)
        before_compiled = dict(self.compiled)
        before_unreadable = set(self.unreadable)
        self.identities.clear()
        self.by_ike_id.clear()
        self._claims.clear()
        self.unreadable.clear()
        self.compiled.clear()
        self.sites.clear()
        for kv in kvs:
            self.put(kv)
        every = set(before_compiled) | set(self.compiled)
        changed = {i for i in every if before_compiled.get(i) != self.compiled.get(i)}
        changed |= {i for k, i in before_ids.items() if self.by_ike_id.get(k) != i}
        changed |= {i for k, i in self.by_ike_id.items() if before_ids.get(k) != i}
        changed |= before_unreadable ^ self.unreadable
        return changed

    def put(self, kv: KeyValue) -> set[str]:
        if kv.key.startswith(COMPILED_PREFIX):
            identity = kv.key[len(COMPILED_PREFIX) :]
            try:
                compiled = CompiledPolicy.from_document(json.loads(kv.value))
            except (ValueError, CompiledDocumentError) as exc:
                log.error("unreadable compiled policy %s (granting nothing): %s", kv.key, exc)
                compiled = CompiledPolicy(identity, ())
            if self.compiled.get(identity) == compiled:
                return set()
            self.compiled[identity] = compiled
            return {identity}
        parts = object_key_parts(kv.key)
        if parts is not None and parts[0] == "sites":
            # sites change no filter (only the coarse narrowing of SAs set up later): nobody to tell
            site = decode_kv("sites", kv)
            if isinstance(site, Site):
                self.sites[site.id] = site
            else:
                self.sites.pop(parts[1], None)
            return set()
        if parts is None or parts[0] != "identities":
            return set()
        obj = decode_kv("identities", kv)
        if isinstance(obj, Identity):
            self.unreadable.discard(obj.id)
        else:
            # Unreadable (by hand, or a newer version's document): it stays bound, to nothing. Left
            # unbound, its peers would be ungoverned and keep whatever they negotiated.
            obj = self._unreadable(parts[1], kv)
        changed = self._unbind(obj.id)
        self.identities[obj.id] = obj
        for ike_id in obj.ike_ids:
            claims = self._claims.setdefault(ike_id, [])
            if obj.id not in claims:
                claims.append(obj.id)
            self.by_ike_id.setdefault(ike_id, obj.id)
        return changed | {obj.id}

    def _unreadable(self, identity: str, kv: KeyValue) -> Identity:
        """A stand-in for an identity document that does not decode: the IKE ids it still names
        (read leniently) and those it had, bound to an identity granted nothing."""
        self.unreadable.add(identity)
        ike_ids: list[IkeId] = []
        try:
            listed = json.loads(kv.value).get("ike_ids", [])
            for text in listed if isinstance(listed, list) else ():
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    ike_ids.append(parse_ike_id(str(text)))
        except (ValueError, AttributeError):
            pass
        old = self.identities.get(identity)
        for ike_id in old.ike_ids if old is not None else ():
            if ike_id not in ike_ids:
                ike_ids.append(ike_id)
        return Identity(identity, ike_ids=tuple(ike_ids))

    def delete(self, key: str) -> set[str]:
        if key.startswith(COMPILED_PREFIX):
            identity = key[len(COMPILED_PREFIX) :]
            return {identity} if self.compiled.pop(identity, None) is not None else set()
        parts = object_key_parts(key)
        if parts is not None and parts[0] == "sites":
            self.sites.pop(parts[1], None)
            return set()
        if parts is None or parts[0] != "identities":
            return set()
        changed = self._unbind(parts[1])
        self.unreadable.discard(parts[1])
        if self.identities.pop(parts[1], None) is not None:
            changed.add(parts[1])
        return changed

    def _unbind(self, identity: str) -> set[str]:
        """Withdraw `identity`'s claims; an IKE id it bound passes to the next identity that lists
        it (never left unbound, i.e. ungoverned, while some identity still names it)."""
        old = self.identities.get(identity)
        if old is None:
            return set()
        changed = {identity}
        for ike_id in old.ike_ids:
            claims = [c for c in self._claims.get(ike_id, ()) if c != identity]
            self._claims[ike_id] = claims
            if not claims:
                self._claims.pop(ike_id, None)
            if self.by_ike_id.get(ike_id) == identity:
                if claims:
                    self.by_ike_id[ike_id] = claims[0]
                    changed.add(claims[0])
                else:
                    del self.by_ike_id[ike_id]
        return changed


AccessListener = Callable[[set[str]], Awaitable[None]]


class AccessView:
    """An `AccessTable` kept in step with the store; `listeners` hear which identities changed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table = AccessTable()
        self.ready = asyncio.Event()
        self.listeners: list[AccessListener] = []
        self.changes = 0  # batches that changed someone's access (for tests and status)

    def lookup(self, peer_identity: str) -> Access | None:
        return self.table.lookup(peer_identity)

    async def run(self) -> None:
        """Follow the store for good: a store error (connection lost) reloads everything."""
        delay = 0.1
        while True:
            try:
                await self._follow()
            except StoreError as exc:
                log.warning("policy watch interrupted (%s); reloading", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _follow(self) -> None:
        kvs, revision = await self.store.range(POLICY_PREFIX)
        await self._notify(self.table.load(kvs))
        self.table.revision = revision
        self.ready.set()
        async for item in self.store.watch(POLICY_PREFIX, revision + 1):
            if isinstance(item, Resync):
                await self._notify(self.table.load(item.kvs))
                self.table.revision = item.revision
            elif isinstance(item, WatchBatch):
                changed: set[str] = set()
                for event in item.events:
                    if event.type.value == "put":
                        changed |= self.table.put(event.kv)
                    else:
                        changed |= self.table.delete(event.kv.key)
                self.table.revision = item.revision
                await self._notify(changed)

    async def _notify(self, changed: set[str]) -> None:
        if not changed:
            return
        self.changes += 1
        for listener in list(self.listeners):
            try:
                await listener(changed)
            except Exception:  # a listener's failure must not stop the view
                log.exception("access listener failed")
