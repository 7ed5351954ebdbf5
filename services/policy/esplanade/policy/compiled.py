"""The compiled policy of one identity: its document in the store, and what IKE and the dataplane take from it.

Stored as JSON under ``policy/compiled/<identity>`` (`esplanade.store.schema.compiled_policy`)::

    {
      "format": 1,
      "identity": "alice",
      "digest": "5d0c6f0e9a1b2c3d4e5f60718293a4b5",
      "parts": [
        {"rules": ["eng-git", "eng-wiki"],
         "selectors": ["10.1.2.3[tcp/22]", "10.1.2.3[tcp/443]", "10.1.8.0/22[udp/53]"]},
        {"rules": ["oncall-db"],
         "when": {"time_window": {"days": ["sat", "sun"], "start": "00:00", "end": "24:00",
                                  "timezone": "Europe/Berlin"},
                  "posture": ["managed"]},
         "selectors": ["10.2.0.0/24[tcp/5432]"]}
      ],
      "unresolved": ["wiki"]
    }

The allow set is the union of the parts whose conditions hold. A part is the exact allow set
of the rules with one same set of conditions, as traffic selectors in their text form
(``CIDR-or-range[proto/ports]``, `TrafficSelector.parse`); ICMP ports hold type<<8|code. The
first part, if it has no "when", is unconditional. "unresolved" lists DNS-name resources
that grant nothing because their name has no address yet (fail closed). "digest" is the
same for identities whose allow sets are equal, whatever their id.

Conditions are carried, not compiled away, because they depend on facts the compiler does
not have:
- source networks and posture are facts of the connection: IKE and the dataplane evaluate
  them once per IKE SA (`ConnectFacts`), when the client authenticates;
- time windows depend on the clock: selectors and routes include timed parts (an SA outlives
  a window's edges), and the dataplane's `PacketFilter` opens and closes them on its wall
  clock at minute boundaries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.policy.conditions import ConnectFacts, connect_failure
from esplanade.policy.decode import conditions_to_document, decode_conditions
from esplanade.policy.filters import PacketFilter, TimedPart
from esplanade.policy.model import NO_CONDITIONS, Conditions, IPNetwork
from esplanade.policy.problems import PolicyError
from esplanade.policy.selector_sets import (
    IKE_MAX_SELECTORS,
    coarsen,
    network_selectors,
    routes,
    selectors_from_spans,
    span_of,
)

FORMAT = 1


class CompiledDocumentError(ValueError):
    """A compiled-policy document that cannot be read; treat the identity as allowed nothing."""


@dataclass(frozen=True, slots=True)
class CompiledPart:
    rules: tuple[str, ...]
    conditions: Conditions
    selectors: tuple[TrafficSelector, ...]

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"rules": list(self.rules)}
        if not self.conditions.empty:
            doc["when"] = conditions_to_document(self.conditions)
        doc["selectors"] = [str(ts) for ts in self.selectors]
        return doc


def parts_digest(part_documents: Sequence[dict[str, Any]], unresolved: Sequence[str]) -> str:
    body = {"parts": list(part_documents), "unresolved": list(unresolved)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def compiled_document(
    identity: str, part_documents: list[dict[str, Any]], unresolved: Sequence[str], digest: str
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "identity": identity,
        "digest": digest,
        "parts": part_documents,
        "unresolved": list(unresolved),
    }


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    identity: str
    parts: tuple[CompiledPart, ...]
    unresolved: tuple[str, ...] = ()
    digest: str = ""

    # -- the document ---------------------------------------------------------------------
    def to_document(self) -> dict[str, Any]:
        parts = [p.to_document() for p in self.parts]
        digest = self.digest or parts_digest(parts, self.unresolved)
        return compiled_document(self.identity, parts, self.unresolved, digest)

    @classmethod
    def from_document(cls, doc: Any) -> CompiledPolicy:
        try:
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise CompiledDocumentError("not a compiled policy document of format 1")
            parts = []
            for part in doc["parts"]:
                when = part.get("when")
                conditions = decode_conditions(when) if when is not None else NO_CONDITIONS
                selectors = tuple(TrafficSelector.parse(text) for text in part["selectors"])
                parts.append(CompiledPart(tuple(str(r) for r in part["rules"]), conditions, selectors))
            return cls(str(doc["identity"]), tuple(parts), tuple(doc.get("unresolved", ())), str(doc.get("digest", "")))
        except (KeyError, TypeError, ValueError, PolicyError) as exc:
            if isinstance(exc, CompiledDocumentError):
                raise
            raise CompiledDocumentError(f"malformed compiled policy document: {exc}") from None

    # -- what the consumers take ----------------------------------------------------------
    def connect_parts(self, facts: ConnectFacts) -> list[CompiledPart]:
        """The parts whose connect-time conditions hold for this connection (timed ones included)."""
        return [p for p in self.parts if connect_failure(p.conditions, facts) is None]

    def selectors(self, facts: ConnectFacts, limit: int = IKE_MAX_SELECTORS) -> list[TrafficSelector]:
        """Traffic selectors for IKE narrowing (RFC 7296 §2.9): exact, or coarsened to `limit`."""
        parts = self.connect_parts(facts)
        if len(parts) == 1:
            exact = list(parts[0].selectors)
        else:
            exact = selectors_from_spans(span_of(ts) for p in parts for ts in p.selectors)
        return coarsen(exact, limit)

    def network_selectors(
        self, facts: ConnectFacts, networks: Sequence[IPNetwork], limit: int = IKE_MAX_SELECTORS
    ) -> list[TrafficSelector]:
        """Coarse IKE narrowing (``access_narrowing: networks``): address-only selectors for the
        site `networks` holding the granted addresses (`selector_sets.network_selectors`)."""
        return network_selectors((ts for p in self.connect_parts(facts) for ts in p.selectors), networks, limit)

    def routes(self, facts: ConnectFacts, limit: int = 0) -> list[IPNetwork]:
        """Split-tunnel routes (INTERNAL_IP4_SUBNET / INTERNAL_IP6_SUBNET): addresses only."""
        return routes((ts for p in self.connect_parts(facts) for ts in p.selectors), limit)

    def packet_filter(self, facts: ConnectFacts, now: float | None = None) -> PacketFilter:
        """The dataplane filter for this identity's SAs of one connection (`now`: see `PacketFilter`)."""
        static: list[TrafficSelector] = []
        timed: list[TimedPart] = []
        for part in self.connect_parts(facts):
            window = part.conditions.time_window
            if window is None:
                static.extend(part.selectors)
            else:
                timed.append(TimedPart(part.selectors, window.contains))
        return PacketFilter(static, timed, now)
