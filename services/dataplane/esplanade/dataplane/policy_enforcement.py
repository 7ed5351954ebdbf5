"""Zero-trust enforcement: every Child SA of a policy identity carries that identity's filter.

The reconciler calls `on_installed` for each Child SA it installs (before it acks the inbound
SA, so keyexchange answers the peer only once the filter is in place) and `on_removed` when it
goes. The `AccessView` (store watch on ``policy/``) calls back with the identities whose
compiled policy or IKE binding changed; their live SAs get the new filter at once, so revoking a
rule cuts flows on existing tunnels. Timed rule parts open and close at minute boundaries.

The filter of an SA: the selectors of the compiled parts whose connect-time conditions hold for
it (its peer's outer address; posture is not known here, so posture-bound parts stay closed)
and whose time window is open now. A peer whose IKE identity binds to no policy identity is not
governed (site-to-site); a bound identity with nothing granted gets an empty filter (drop all).
An SA stays governed for its lifetime: when its IKE identity stops binding (the identity deleted,
its IKE id removed) it gets the empty filter, never its negotiated selectors back.

A filter the backend refuses closes the SA (the empty filter) rather than leaving it open, and
is tried again every `retry_seconds` until it applies: a passing fault (a worker restarting)
must not leave a user's tunnel carrying nothing until the next policy change. When a batch
fails as a whole, its filters are applied one by one, so one bad SA closes only itself.

Drops: the userspace backend counts them (`identity_filter` and, for packets outside the SA's narrowed
selectors, `policy_mismatch`); every `poll_seconds` the per-SA counts and sampled packet headers
(of both kinds: the flow's 5-tuple) become `DROP` decision events (aggregated and rate-limited by
`DecisionEvents`), never store writes. Unsampled drops are logged per SA without a flow. The
kernel backend enforces the filter with XFRM policies and can only report its namespace's
policy-check drops (`FilterDrops.unattributed`): logged as a count for no identity.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from esplanade.dataplane.backend import DataplaneError, FilterDrops
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.policy.access_view import Access, AccessView
from esplanade.policy.conditions import ConnectFacts
from esplanade.policy.decision_events import DecisionEvents
from esplanade.policy.decision_log import DecisionEvent, DecisionKind
from esplanade.policy.evaluator import DEFAULT_DENY, Action, FiveTuple
from esplanade.policy.filters import parse_inner_packet

log = logging.getLogger(__name__)

DROP_REASON = "identity filter: no rule grants this flow"
OUTSIDE_REASON = "outside the Child SA's selectors (narrowed to the identity's grant)"


class FilteringBackend(Protocol):
    async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None: ...

    async def identity_filter_drops(self) -> FilterDrops: ...


@dataclass(frozen=True, slots=True)
class AppliedFilter:
    identity: str
    selectors: tuple[str, ...]
    timed: bool  # depends on the clock: re-evaluate at minute boundaries


def filter_selectors(access: Access, record: ChildSaRecord, wall_now: float) -> tuple[list[TrafficSelector], bool]:
    """The selectors an SA's decapsulated packets may match, and whether a time window is involved."""
    try:
        source = ipaddress.ip_address(record.inbound.src)
    except ValueError:
        source = None
    selectors: list[TrafficSelector] = []
    timed = False
    for part in access.compiled.connect_parts(ConnectFacts(source)):
        window = part.conditions.time_window
        if window is not None:
            timed = True
            if not window.contains(wall_now):
                continue
        selectors.extend(part.selectors)
    return selectors, timed


def flow_of(header: bytes) -> FiveTuple | None:
    parsed = parse_inner_packet(header)
    if parsed is None:
        return None
    make = ipaddress.IPv4Address if parsed.version == 4 else ipaddress.IPv6Address
    src_port = max(parsed.src_port, 0)
    dst_port = max(parsed.dst_port, 0)
    return FiveTuple(make(parsed.src), make(parsed.dst), parsed.proto, src_port, dst_port)


class PolicyEnforcer:
    def __init__(
        self,
        backend: object,
        view: AccessView,
        decisions: DecisionEvents,
        *,
        poll_seconds: float = 1.0,
        retry_seconds: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend: FilteringBackend | None = backend if hasattr(backend, "set_identity_filter") else None  # type: ignore[assignment]
        self.view = view
        self.decisions = decisions
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self.wall_clock = wall_clock
        self.records: dict[str, ChildSaRecord] = {}  # installed Child SAs
        self.applied: dict[str, AppliedFilter] = {}  # Child SA -> the filter it carries
        self.refused: set[str] = set()  # Child SAs whose wanted filter the backend refused: retried
        self.filter_updates = 0
        self.errors = 0
        self._seen: dict[tuple[str, str], int] = {}  # (reason, Child SA) -> count already logged
        self.unattributed_drops = 0  # drops the backend reports for no Child SA (the kernel backend)
        self._lock = asyncio.Lock()
        view.listeners.append(self.on_access_changed)
        if hasattr(backend, "initial_filter"):  # the filter travels with the install (userspace backend)
            backend.initial_filter = self.initial_filter
        if self.backend is None:
            log.warning("this dataplane backend has no identity filters: policy is enforced by IKE narrowing only")

    # -- the reconciler's hooks ----------------------------------------------------------
    async def on_installed(self, record: ChildSaRecord) -> None:
        """Raises DataplaneError when a governed SA carries no filter at all (the backend refused
        its filter and the empty one): the reconciler then does not ack it, so keyexchange never
        answers the peer with an SA that would carry everything its selectors allow."""
        async with self._lock:
            self.records[record.id] = record
            if record.id in await self._apply_many([record]):
                raise DataplaneError(f"Child SA {record.id!r}: no identity filter applies, not even the empty one")

    def initial_filter(self, record: ChildSaRecord) -> list[TrafficSelector] | None:
        """The filter a Child SA should carry from its first packet, for a backend that installs it
        with the SA (None: not governed). `on_installed` then records it (and re-sends it, idempotent)."""
        access = self.view.lookup(record.identity)
        if access is None:
            return [] if record.governed_by else None  # governed at IKE_AUTH, bound no more: nothing
        selectors, _ = filter_selectors(access, record, self.wall_clock())
        return selectors

    async def on_removed(self, child_sa_id: str) -> None:
        async with self._lock:
            self.records.pop(child_sa_id, None)
            self.applied.pop(child_sa_id, None)
            self.refused.discard(child_sa_id)
            for reason in (DROP_REASON, OUTSIDE_REASON):
                self._seen.pop((reason, child_sa_id), None)

    # -- policy changes ------------------------------------------------------------------
    async def on_access_changed(self, identities: set[str]) -> None:
        async with self._lock:
            affected = []
            for record in list(self.records.values()):
                applied = self.applied.get(record.id)
                access = self.view.lookup(record.identity)
                now_identity = access.identity if access is not None else None
                was_identity = applied.identity if applied is not None else record.governed_by
                if now_identity in identities or was_identity in identities:
                    affected.append(record)
            await self._apply_many(affected)

    async def _apply_many(self, records: list[ChildSaRecord]) -> set[str]:
        """Bring the SAs' filters up to date: one batch to the backend when it takes batches.
        Returns the governed SAs left without any filter (the wanted one and the empty one refused)."""
        if self.backend is None or not records:
            return set()
        wall = self.wall_clock()
        changes: dict[str, tuple[ChildSaRecord, AppliedFilter | None, list[TrafficSelector] | None]] = {}
        for record in records:
            access = self.view.lookup(record.identity)
            current = self.applied.get(record.id)
            if access is None:
                # Governed once, governed for good: an SA whose identity lost its binding (deleted,
                # or its IKE id moved away) carries nothing, not its negotiated selectors.
                # The record says so too (`governed_by`), for a dataplane that never saw the SA
                # governed: one restarted, or taking over, after the identity went.
                governing = current.identity if current is not None else record.governed_by
                if governing and (current is None or current.selectors):
                    changes[record.id] = (record, AppliedFilter(governing, (), False), [])
                continue
            selectors, timed = filter_selectors(access, record, wall)
            applied = AppliedFilter(access.identity, tuple(str(s) for s in selectors), timed)
            if current != applied:
                changes[record.id] = (record, applied, selectors)
        self.refused.difference_update(r.id for r in records if r.id not in changes)  # nothing left to apply
        if not changes:
            return set()
        errors: dict[str, str] = {}
        batch = getattr(self.backend, "set_identity_filters", None)
        one_by_one = batch is None
        if batch is not None:
            try:
                errors = await batch({child: wanted for child, (_, _, wanted) in changes.items()})
            except DataplaneError as exc:
                log.warning(
                    "identity filter batch of %d Child SAs refused (%s): applying one by one", len(changes), exc
                )
                one_by_one = True
        if one_by_one:
            for child, (_, _, wanted) in changes.items():
                try:
                    await self.backend.set_identity_filter(child, wanted)
                except DataplaneError as exc:
                    errors[child] = str(exc)
        again = self.refused & errors.keys()  # refused before: logged then, quietly retried now
        self.refused.difference_update(child for child in changes if child not in errors)
        self.refused.update(errors)
        closed = await self._close_refused(changes, errors)
        left_open = {child for child in errors if child not in closed and changes[child][1] is not None}
        for child, (record, new, _) in changes.items():
            if child in errors:
                self.errors += 1
                level = logging.DEBUG if child in again else logging.ERROR
                if child in closed and new is not None:
                    self.applied[child] = AppliedFilter(new.identity, (), new.timed)
                    log.log(
                        level,
                        "identity filter of Child SA %s not applied (%s): it carries nothing until a filter"
                        " applies (retried every %.0f s)",
                        child,
                        errors[child],
                        self.retry_seconds,
                    )
                else:
                    log.log(level, "identity filter of Child SA %s not applied: %s", child, errors[child])
                continue
            if child in again:
                log.info("identity filter of Child SA %s applied on a retry", child)
            self.filter_updates += 1
            if new is None:
                self.applied.pop(child, None)
                log.info("Child SA %s of %s: no longer governed by policy (no filter)", child, record.identity)
            else:
                self.applied[child] = new
                log.info(
                    "Child SA %s of %s (policy identity %s): filter of %d selectors",
                    child,
                    record.identity,
                    new.identity,
                    len(new.selectors),
                )
        return left_open

    async def _close_refused(
        self,
        changes: dict[str, tuple[ChildSaRecord, AppliedFilter | None, list[TrafficSelector] | None]],
        errors: dict[str, str],
    ) -> set[str]:
        """Deny by default: a governed SA whose filter the backend refused (one it cannot
        express, a worker error) gets the empty filter instead, so that it carries nothing
        rather than everything its selectors allow (or a stale grant). Returns the SAs closed."""
        assert self.backend is not None
        refused = [child for child in errors if changes[child][1] is not None]
        closed: set[str] = set()
        for child in refused:
            try:
                await self.backend.set_identity_filter(child, [])
            except DataplaneError as exc:
                log.error("Child SA %s: not even the empty filter applies: %s", child, exc)
                continue
            closed.add(child)
        return closed

    # -- running -------------------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._time_windows())
            tasks.create_task(self._drops())
            tasks.create_task(self._retries())

    async def _retries(self) -> None:
        while True:
            await asyncio.sleep(self.retry_seconds)
            await self.retry_refused()

    async def retry_refused(self) -> None:
        """Try again the filters the backend refused (their SAs carry the empty filter meanwhile)."""
        async with self._lock:
            waiting = [self.records[child] for child in sorted(self.refused) if child in self.records]
            self.refused.intersection_update(self.records)
            if waiting:
                await self._apply_many(waiting)

    async def _time_windows(self) -> None:
        while True:
            wall = self.wall_clock()
            await asyncio.sleep(math.floor(wall / 60.0) * 60.0 + 60.0 - wall + 0.01)
            async with self._lock:
                timed = [self.records[c] for c, a in self.applied.items() if a.timed and c in self.records]
                await self._apply_many(timed)

    async def _drops(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.poll_drops()

    async def poll_drops(self) -> None:
        if self.backend is None:
            return
        try:
            drops = await self.backend.identity_filter_drops()
        except DataplaneError as exc:
            log.debug("filter drops not readable: %s", exc)
            return
        self._log_unattributed(drops)
        sampled: dict[tuple[str, str], int] = {}
        for reason, samples in ((DROP_REASON, drops.samples), (OUTSIDE_REASON, drops.outside_samples)):
            for child_id, header in samples:
                applied = self.applied.get(child_id)
                if applied is None:
                    continue
                event = DecisionEvent(
                    DecisionKind.DROP, Action.DENY, applied.identity, flow_of(header), DEFAULT_DENY, reason, child_id
                )
                self.decisions.record(event)
                sampled[(reason, child_id)] = sampled.get((reason, child_id), 0) + 1
        for reason, counts in ((DROP_REASON, drops.denied), (OUTSIDE_REASON, drops.outside_selectors)):
            for child_id, total in counts.items():
                delta = total - self._seen.get((reason, child_id), 0)
                self._seen[(reason, child_id)] = total
                delta -= sampled.get((reason, child_id), 0)
                applied = self.applied.get(child_id)
                if delta > 0 and applied is not None:
                    event = DecisionEvent(
                        DecisionKind.DROP, Action.DENY, applied.identity, None, DEFAULT_DENY, reason, child_id
                    )
                    self.decisions.record(event, delta)

    def _log_unattributed(self, drops: FilterDrops) -> None:
        """The kernel backend counts inbound policy-check drops per namespace only: logged as a
        count that names no identity (they include drops no filter caused)."""
        total = sum(drops.unattributed.values())
        delta = total - self.unattributed_drops
        self.unattributed_drops = total
        if delta > 0 and self.applied:
            counters = ", ".join(f"{name} {count}" for name, count in sorted(drops.unattributed.items()) if count)
            log.info(
                "dataplane dropped %d decapsulated packets in its policy check (identity filters among other"
                " causes; not attributed to a Child SA): %s since start",
                delta,
                counters,
            )
