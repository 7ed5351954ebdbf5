"""Which kernel SAs and policies this dataplane installed, on a file that lives as long as they do.

XFRM state belongs to the network namespace, not to the process: after a restart (kill -9,
an upgrade, a container restart) the SAs and policies of the previous process are still in
the kernel and keep carrying traffic. The kernel has no field that says who installed an
entry, so the backend writes the identities of what it installs here (SA ids: destination,
SPI, protocol; policy keys: direction, selector, mark, if_id; no keys or other secrets) and
its successor reads them back:

- an entry that the store still wants with the same content is adopted as it is (counters,
  sequence numbers and replay window carry on);
- one the store wants with other content is replaced;
- one the store no longer wants is removed once the first reconcile is done.

It also lists the identity filters of the Child SAs (Child SA id -> selectors, the text form;
`KernelXfrmBackend.set_identity_filter`): a successor narrows the policies it installs during
its first reconcile with them until the policy enforcer has set the filters again, so a restart
never widens a governed Child SA's entries, not even for a moment (see the backend).

Entries that are not listed here belong to someone else (another daemon, an admin) and are
never touched: a collision with one stays an ALREADY_EXISTS error.

Put the file where it lives exactly as long as the network namespace: tmpfs `/run` for the
host namespace (both go at reboot), a pod `emptyDir` for a pod's namespace. A journal that
outlives its namespace lists entries that are no longer there (harmless: they are skipped);
one that dies before it costs the sweep of leftovers, never correctness of what is adopted.

Writes are atomic (temporary file + rename) and happen after each change has been applied.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicyKey
from esplanade.dataplane.kernel.xfrm_sa import XfrmSaId
from esplanade.dataplane.kernel.xfrm_selector import XfrmSelector
from esplanade.ipsec.selectors import TrafficSelector

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class JournalEntries:
    sas: frozenset[XfrmSaId] = field(default_factory=frozenset)
    policies: frozenset[XfrmPolicyKey] = field(default_factory=frozenset)
    filters: dict[str, tuple[TrafficSelector, ...]] = field(default_factory=dict)


def _policy_key_document(key: XfrmPolicyKey) -> dict[str, Any]:
    return {
        "direction": key.direction,
        "selector": asdict(key.selector),
        "mark": list(key.mark) if key.mark else None,
        "if_id": key.if_id,
    }


def _policy_key_from(document: dict[str, Any]) -> XfrmPolicyKey:
    mark = document.get("mark")
    return XfrmPolicyKey(
        direction=int(document["direction"]),
        selector=XfrmSelector(**document["selector"]),
        mark=(int(mark[0]), int(mark[1])) if mark else None,
        if_id=int(document.get("if_id", 0)),
    )


class KernelStateJournal:
    """Load and rewrite the list of what this dataplane installed (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.write_failures = 0
        self.last_error = ""

    def load(self) -> JournalEntries:
        """What a predecessor left; empty if there is no (readable) journal."""
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return JournalEntries()
        except (OSError, ValueError) as exc:
            log.warning("kernel state journal %s unreadable, adopting nothing from it: %s", self.path, exc)
            return JournalEntries()
        try:
            if document.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {document.get('version')!r}")
            sas = frozenset(XfrmSaId(str(d), int(s), int(p)) for d, s, p in document.get("sas", []))
            policies = frozenset(_policy_key_from(p) for p in document.get("policies", []))
            filters = {
                str(child): tuple(TrafficSelector.parse(str(text)) for text in selectors)
                for child, selectors in dict(document.get("filters", {})).items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("kernel state journal %s malformed, adopting nothing from it: %s", self.path, exc)
            return JournalEntries()
        return JournalEntries(sas, policies, filters)

    def save(
        self,
        sas: Iterable[XfrmSaId],
        policies: Iterable[XfrmPolicyKey],
        filters: Mapping[str, tuple[TrafficSelector, ...]] | None = None,
    ) -> None:
        """Replace the journal atomically. A failure is logged and counted, never raised:
        the kernel change it follows has been made already."""
        document = {
            "version": FORMAT_VERSION,
            "sas": sorted([sa.dst, sa.spi, sa.proto] for sa in sas),
            "policies": sorted((_policy_key_document(key) for key in policies), key=json.dumps),
            "filters": {child: [str(s) for s in selectors] for child, selectors in sorted((filters or {}).items())},
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(document, out, separators=(",", ":"))
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self.write_failures += 1
            self.last_error = str(exc)
            log.error("kernel state journal %s not written: %s", self.path, exc)
