"""The kernel dataplane backend: Esplanade steers, Linux XFRM carries the packets.

`KernelXfrmBackend` implements `esplanade.dataplane.backend.DataplaneBackend` on NETLINK_XFRM,
as strongSwan's kernel-netlink does for charon:

- `install_child_sa(record, policies=())` adds the inbound SA, then the outbound SA, then
  the given policies. All or nothing: if any step fails, the steps already taken are
  undone (SAs deleted, policies removed or restored) before the error is raised.
- `install_policy(policy)` adds the kernel policies of one SPD entry (one or several, see
  `xfrm_selector`); installing an id again with different content replaces it in place
  (XFRM_MSG_UPDPOLICY), again all or nothing.
- SAs and policies meet through the reqid. A record's own reqid wins; a record with reqid
  0 gets one allocated per Child SA (a rekey, `rekey_of`, inherits its predecessor's),
  and a policy with reqid 0 takes the reqid of the Child SA it names in `child_sa`
  (reserved ahead if that Child SA is not installed yet).
- Kernel events: XFRM_MSG_EXPIRE soft -> SOFT_EXPIRE (rekey), hard -> HARD_EXPIRE (the
  kernel already removed the SA); XFRM_MSG_ACQUIRE on a trap policy -> ACQUIRE naming
  the policy. The backend's own INSTALLED/DELETED events go to the same stream.
- `counters()` reads bytes, packets and sequence numbers of the installed SAs from one
  SA dump.
- `set_identity_filter(child_sa, selectors)`: the Child SA's IN and FWD PROTECT entries become
  ALLOW entries for the granted part of their selectors plus a BLOCK over the rest
  (`xfrm_policy.narrowed_policies`); the kernel's inbound policy check drops the rest of the
  decapsulated packets. New entries go in before old ones go out; None restores the negotiated
  entries. `identity_filter_drops()` can only give the namespace's policy-check counters
  (`xfrm_stat`), attributed to no Child SA.

Everything the backend programs lives in one network namespace (`netns`, None for its
own). `stop()` removes what this instance installed unless `keep_on_stop` is set.

Restarts (the kernel's state outlives the process):

- `start()` dumps the SAs and policies already in the kernel. While the first reconcile
  runs, an install that finds its SA or policy there with the same content adopts it (no
  netlink change; counters and sequence numbers carry on); one listed in the state journal
  (`state_journal`: what a predecessor installed) but with other content is replaced; an
  entry nobody listed is someone else's and a collision with it stays ALREADY_EXISTS.
  `finish_initial_sync()` then removes the journal's entries the store no longer wants.
- with a `persistence` (the sequence ledger) the kernel's counters are tied to the ledger
  (`sequence_keeper`): a new kernel SA starts after every number ever reserved under its
  SPI, NEWAE events and a periodic dump keep the ledger ahead of the counters. A Child SA
  the kernel had to get again (not adopted) raises SOFT_EXPIRE: rekey recommended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from esplanade.dataplane.backend import (
    AlreadyExists,
    BackendStatus,
    DataplaneBackend,
    DataplaneError,
    DataplaneEvent,
    DataplaneEventKind,
    FilterDrops,
    InvalidArgument,
    NotFound,
    SaCounters,
    Unsupported,
)
from esplanade.dataplane.kernel.sequence_keeper import KernelSequenceKeeper
from esplanade.dataplane.kernel.socket_options import bypass_ipsec, enable_esp_in_udp
from esplanade.dataplane.kernel.state_journal import JournalEntries, KernelStateJournal
from esplanade.dataplane.kernel.xfrm_client import XfrmClient
from esplanade.dataplane.kernel.xfrm_interface import create_xfrm_interface, delete_xfrm_interface
from esplanade.dataplane.kernel.xfrm_messages import XfrmGroup, XfrmMsgType
from esplanade.dataplane.kernel.xfrm_policy import (
    XfrmPolicy,
    XfrmPolicyKey,
    narrowed_policies,
    xfrm_policies_from_spd,
)
from esplanade.dataplane.kernel.xfrm_sa import (
    XfrmReplayState,
    XfrmSa,
    XfrmSaId,
    XfrmSaState,
    xfrm_sa_from_association,
)
from esplanade.dataplane.kernel.xfrm_selector import XfrmSelector, unpack_address
from esplanade.dataplane.kernel.xfrm_socket import XfrmEventSocket, XfrmSocket
from esplanade.dataplane.kernel.xfrm_stat import FILTER_DROP_COUNTERS, XfrmStatReader
from esplanade.dataplane.sa_persistence import SaPersistence
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy

log = logging.getLogger(__name__)

EVENT_QUEUE_SIZE = 4096
FIRST_REQID = 1
MARK_INTERVAL = 5.0  # seconds between the dumps that keep the sequence ledger ahead of the kernel
NO_TIMER_EVENTS = 0  # XFRMA_ETIMER_THRESH: NEWAE only on the packet threshold, never on a timer
Step = Callable[[], None]


@dataclass(slots=True)
class _InstalledChild:
    record: ChildSaRecord
    reqid: int
    inbound: XfrmSa
    outbound: XfrmSa
    policy_ids: list[str] = field(default_factory=list)
    gone: set[XfrmSaId] = field(default_factory=set)  # hard-expired: the kernel removed them


@dataclass(slots=True)
class _InstalledPolicy:
    policy: SpdPolicy
    kernel: list[XfrmPolicy]
    reqid: int = 0


class _Rollback:
    """Undo steps of a request in progress, run in reverse when a later step fails."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Step]] = []

    def done(self, what: str, undo: Step) -> None:
        self._undo.append((what, undo))

    def run(self) -> list[str]:
        failures = []
        for what, undo in reversed(self._undo):
            try:
                undo()
            except DataplaneError as exc:
                failures.append(f"{what}: {exc}")
                log.error("rollback of %s failed: %s", what, exc)
        self._undo.clear()
        return failures


def _fail(exc: DataplaneError, rollback: _Rollback) -> DataplaneError:
    failures = rollback.run()
    if failures:
        exc.add_note("rollback incomplete: " + "; ".join(failures))
    return exc


class KernelXfrmBackend:
    """DataplaneBackend on Linux XFRM (see the module docstring)."""

    name = "kernel"

    def __init__(
        self,
        *,
        netns: str | None = None,
        reason: str = "kernel backend selected by configuration",
        capabilities: Sequence[str] = (),
        event_groups: Iterable[XfrmGroup] = (XfrmGroup.EXPIRE, XfrmGroup.ACQUIRE),
        keep_on_stop: bool = False,
        wall_clock: Callable[[], float] = time.time,
        client: XfrmClient | None = None,
        persistence: SaPersistence | None = None,
        sequence_block: int = 1 << 20,
        replay_block: int = 1 << 16,
        journal: KernelStateJournal | None = None,
        mark_interval: float = MARK_INTERVAL,
        xfrm_stat: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """`client` replaces the netlink client (tests); then no event socket is opened.
        `persistence` ties the kernel's sequence counters to the ledger; `journal` records
        what this instance installed, for its successor (see the module docstring).
        `xfrm_stat` replaces the reader of the namespace's XFRM counters (tests)."""
        self.netns = netns
        self._client_override = client
        self._reason = reason
        self._capabilities = tuple(capabilities)
        self._keeper = (
            KernelSequenceKeeper(
                persistence,
                sequence_block=sequence_block,
                replay_block=replay_block,
                on_refused=self._sequence_refused,
            )
            if persistence is not None
            else None
        )
        groups = tuple(event_groups)
        if self._keeper is not None and XfrmGroup.AEVENTS not in groups:
            groups += (XfrmGroup.AEVENTS,)
        self._event_groups = groups
        self._keep_on_stop = keep_on_stop
        self._wall_clock = wall_clock
        self._journal = journal
        self._mark_interval = mark_interval
        self._sock: XfrmSocket | None = None
        self._client: XfrmClient | None = None
        self._events_sock: XfrmEventSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[DataplaneEvent | None] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self._children: dict[str, _InstalledChild] = {}
        self._policies: dict[str, _InstalledPolicy] = {}
        self._reqids: dict[str, int] = {}  # child SA id -> reqid (also reserved ahead)
        self._next_reqid = FIRST_REQID
        self._sa_owner: dict[XfrmSaId, str] = {}
        self._policy_owner: dict[XfrmPolicyKey, str] = {}  # the policy whose entry the kernel holds
        # Policies waiting under another's entry for the same kernel key (the kernel holds one
        # per selector and direction): a trap entry under the Child SA that installed over it
        # comes back when that Child SA goes, as strongSwan's policy history does.
        self._shadowed: dict[XfrmPolicyKey, dict[str, XfrmPolicy]] = {}
        # what the kernel held when we started, until the first reconcile is done
        self._preexisting_sas: dict[XfrmSaId, XfrmSaState] = {}
        self._preexisting_policies: dict[XfrmPolicyKey, XfrmPolicy] = {}
        self._journaled = JournalEntries()  # what a predecessor installed (ours to replace or remove)
        self._marks_task: asyncio.Task[None] | None = None
        # identity filters (`set_identity_filter`): Child SA -> the selectors its inbound entries allow
        self._filters: dict[str, tuple[TrafficSelector, ...]] = {}
        # a predecessor's filters (journal), narrowing the entries until the first reconcile is done
        self._inherited_filters: dict[str, tuple[TrafficSelector, ...]] = {}
        self._stat_override = xfrm_stat
        self._stat_reader: XfrmStatReader | None = None
        self._stat_baseline: dict[str, int] = {}
        self.events_dropped = 0
        self.adopted = {"sas": 0, "policies": 0}
        self.replaced = {"sas": 0, "policies": 0}
        self.swept = {"sas": 0, "policies": 0}

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is not None:
            return
        if self._client_override is not None:
            self._client = self._client_override
            self._read_preexisting_state()
            self._stat_baseline = self._read_stat()
            return
        where = f"network namespace {self.netns!r}" if self.netns else "this network namespace"
        try:
            self._sock = XfrmSocket(self.netns)
            if self._event_groups:
                self._events_sock = XfrmEventSocket(self.netns, self._event_groups)
        except OSError as exc:
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            raise DataplaneError(f"cannot open NETLINK_XFRM in {where}: {exc}") from exc
        self._client = XfrmClient(self._sock)
        self._loop = asyncio.get_running_loop()
        if self._events_sock is not None:
            self._loop.add_reader(self._events_sock.fileno(), self._read_kernel_events)
        self._read_preexisting_state()
        if self._stat_override is None:
            try:
                self._stat_reader = XfrmStatReader(self.netns)
            except OSError as exc:
                log.warning("XFRM counters of %s not readable, identity filter drops not counted: %s", where, exc)
        self._stat_baseline = self._read_stat()
        if self._keeper is not None and self._mark_interval > 0:
            self._marks_task = self._loop.create_task(self._follow_marks(), name="kernel-sequence-marks")

    def _read_preexisting_state(self) -> None:
        """What the kernel holds before we install anything: candidates for adoption."""
        client = self.client
        self._journaled = self._journal.load() if self._journal is not None else JournalEntries()
        self._inherited_filters = dict(self._journaled.filters)
        try:
            self._preexisting_sas = {state.sa.id: state for state in client.dump_sas() if state.sa.spi}
            self._preexisting_policies = {p.key: p for p in client.dump_policies()}
        except DataplaneError as exc:
            log.warning("cannot read the kernel's SAs and policies at start, adopting none: %s", exc)
            self._preexisting_sas, self._preexisting_policies = {}, {}
        if self._preexisting_sas or self._preexisting_policies:
            ours = sum(1 for sa_id in self._preexisting_sas if sa_id in self._journaled.sas)
            ours += sum(1 for key in self._preexisting_policies if key in self._journaled.policies)
            log.info(
                "kernel holds %d SAs and %d policies already (%d installed by a predecessor)",
                len(self._preexisting_sas),
                len(self._preexisting_policies),
                ours,
            )

    async def finish_initial_sync(self) -> None:
        """The first reconcile is done: what a predecessor installed and the store no longer
        wants goes; entries nobody listed stay (they are someone else's)."""
        client = self.client
        for child_sa_id in list(self._inherited_filters):
            # a predecessor's filter the enforcer did not set again: the Child SA is no longer
            # governed (or gone), its entries go back to the negotiated ones
            if child_sa_id in self._children:
                try:
                    self._set_filter(child_sa_id, None)
                except DataplaneError as exc:
                    log.error("cannot lift the identity filter a predecessor left on %s: %s", child_sa_id, exc)
            self._inherited_filters.pop(child_sa_id, None)
        for sa_id, state in self._preexisting_sas.items():
            if sa_id in self._journaled.sas and sa_id not in self._sa_owner:
                with contextlib.suppress(NotFound):
                    try:
                        client.delete_sa(sa_id, mark=state.sa.mark)
                        self.swept["sas"] += 1
                    except DataplaneError as exc:
                        log.error("cannot remove %s left by a predecessor: %s", sa_id, exc)
        for key in self._preexisting_policies:
            if key in self._journaled.policies and key not in self._policy_owner:
                with contextlib.suppress(NotFound):
                    try:
                        client.delete_policy(key)
                        self.swept["policies"] += 1
                    except DataplaneError as exc:
                        log.error("cannot remove %s left by a predecessor: %s", key, exc)
        if self.swept["sas"] or self.swept["policies"]:
            log.info(
                "removed %d SAs and %d policies a predecessor left and the store no longer wants",
                self.swept["sas"],
                self.swept["policies"],
            )
        self._preexisting_sas, self._preexisting_policies = {}, {}
        self._journaled = JournalEntries()
        self._save_journal()

    async def stop(self) -> None:
        if self._client is None:
            return
        if self._marks_task is not None:
            self._marks_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._marks_task
            self._marks_task = None
        if not self._keep_on_stop:
            for child_id in list(self._children):
                with contextlib.suppress(DataplaneError):
                    await self.delete_child_sa(child_id)
            for policy_id in list(self._policies):
                with contextlib.suppress(DataplaneError):
                    await self.delete_policy(policy_id)
        elif self._keeper is not None:
            # the kernel keeps the SAs: leave the ledger ahead of them for the successor
            with contextlib.suppress(DataplaneError):
                self._observe_all()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._keeper.drain(), 2.0)
        if self._keeper is not None:
            await self._keeper.close()
        if self._events_sock is not None and self._loop is not None:
            self._loop.remove_reader(self._events_sock.fileno())
            self._events_sock.close()
            self._events_sock = None
        if self._sock is not None:
            self._sock.close()
        if self._stat_reader is not None:
            self._stat_reader.close()
            self._stat_reader = None
        self._sock = self._client = None
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def _save_journal(self) -> None:
        if self._journal is None:
            return
        sas = set(self._sa_owner) | {sa_id for sa_id in self._journaled.sas if sa_id in self._preexisting_sas}
        policies = set(self._policy_owner) | {
            key for key in self._journaled.policies if key in self._preexisting_policies
        }
        self._journal.save(sas, policies, {**self._inherited_filters, **self._filters})

    @property
    def client(self) -> XfrmClient:
        """The netlink client (for diagnostics and tests); raises if not started."""
        if self._client is None:
            raise DataplaneError("kernel backend is not started")
        return self._client

    def status(self) -> BackendStatus:
        details = {
            "netns": self.netns or "",
            "child_sas": str(len(self._children)),
            "policies": str(len(self._policies)),
            "identity_filters": str(len(self._filters)),
            "events_dropped": str(self.events_dropped),
            "event_overruns": str(self._events_sock.overruns if self._events_sock else 0),
        }
        for what, counts in (("adopted", self.adopted), ("replaced", self.replaced), ("swept", self.swept)):
            for kind, count in counts.items():
                details[f"kernel_{what}_{kind}"] = str(count)
        if self._keeper is not None:
            details["sequence_mark_writes"] = str(self._keeper.writes)
            details["sequence_mark_failures"] = str(self._keeper.failures)
        if self._journal is not None:
            details["kernel_journal"] = str(self._journal.path)
            details["kernel_journal_write_failures"] = str(self._journal.write_failures)
        return BackendStatus(name=self.name, reason=self._reason, capabilities=self._capabilities, details=details)

    # -- Child SAs ----------------------------------------------------------------------
    def _reqid_for_child(self, record: ChildSaRecord) -> int:
        explicit = record.inbound.reqid or record.outbound.reqid
        if explicit:
            return explicit
        if record.id in self._reqids:
            return self._reqids[record.id]
        if record.rekey_of and record.rekey_of in self._reqids:
            return self._reqids[record.rekey_of]
        return self._allocate_reqid()

    def _allocate_reqid(self) -> int:
        used = set(self._reqids.values())
        while self._next_reqid in used:
            self._next_reqid += 1
        reqid = self._next_reqid
        self._next_reqid += 1
        return reqid

    async def install_child_sa(self, record: ChildSaRecord, policies: Sequence[SpdPolicy] = ()) -> None:
        """Add both SAs of `record`, then `policies`; all or nothing."""
        client = self.client
        existing = self._children.get(record.id)
        if existing is not None:
            if existing.record == record:
                return
            raise AlreadyExists(f"Child SA {record.id!r} is already installed with other content")
        try:
            record.validate()
        except ValueError as exc:
            raise InvalidArgument(f"Child SA {record.id!r}: {exc}") from None
        reqid = self._reqid_for_child(record)
        elapsed = max(0.0, self._wall_clock() - record.created_at) if record.created_at > 0 else 0.0
        inbound = xfrm_sa_from_association(record.inbound, reqid=reqid, elapsed=elapsed)
        outbound = xfrm_sa_from_association(record.outbound, reqid=reqid, elapsed=elapsed)
        for sa in (inbound, outbound):
            if sa.id in self._sa_owner:
                raise AlreadyExists(f"{sa.id} already belongs to Child SA {self._sa_owner[sa.id]!r}")
        adopted = {sa.id for sa in (inbound, outbound) if self._adoptable(sa)}
        if self._keeper is not None:
            inbound, outbound = await self._with_ledger(record, inbound, outbound, adopted)
        rollback = _Rollback()
        installed_policies: list[str] = []
        reserved = record.id in self._reqids
        self._reqids[record.id] = reqid
        try:
            for sa in (inbound, outbound):
                if sa.id in adopted:
                    continue  # the kernel holds it already, as the record wants it
                stale = self._preexisting_sas.get(sa.id)
                if stale is not None and sa.id in self._journaled.sas:
                    # a predecessor's SA with other content: the store's version replaces it
                    with contextlib.suppress(NotFound):
                        client.delete_sa(sa.id, mark=stale.sa.mark)
                    del self._preexisting_sas[sa.id]
                    rollback.done(f"replace {sa.id}", partial(self._restore_preexisting, stale))
                    self.replaced["sas"] += 1
                client.add_sa(sa)
                rollback.done(f"add {sa.id}", partial(client.delete_sa, sa.id, mark=sa.mark))
            for policy in policies:
                if self._policies.get(policy.id, None) is not None and self._policies[policy.id].policy == policy:
                    continue  # installed on its own before: it stays when the Child SA goes
                self._install_policy(policy, rollback, default_reqid=reqid)
                installed_policies.append(policy.id)
        except DataplaneError as exc:
            if not reserved:
                self._reqids.pop(record.id, None)
            if self._keeper is not None:
                self._keeper.forget(record.inbound.spi, record.outbound.spi)
            raise _fail(exc, rollback) from exc.__cause__
        self._children[record.id] = _InstalledChild(record, reqid, inbound, outbound, installed_policies)
        inherited = self._current_filter(record.rekey_of) if record.rekey_of else None
        if inherited is not None and self._current_filter(record.id) is None:
            # a rekey carries its predecessor's filter until the enforcer sets its own: the
            # policies that move over to it stay narrowed
            self._filters[record.id] = inherited
        self._sa_owner[inbound.id] = record.id
        self._sa_owner[outbound.id] = record.id
        for sa_id in adopted:
            self._preexisting_sas.pop(sa_id, None)
            self.adopted["sas"] += 1
        self._save_journal()
        self._emit(DataplaneEvent(DataplaneEventKind.INSTALLED, child_sa=record.id, spi=record.inbound.spi))
        if self._keeper is not None and adopted:
            self._observe_child(self._children[record.id])
        if self._keeper is not None and len(adopted) < 2:
            # The kernel got (one of) these SAs anew with keys it had before: the sequence
            # numbers continue from the ledger, the inbound window from its floor. A rekey
            # ends any doubt about numbers no process saw (sequence_keeper docstring).
            restarted = self._keeper.durable_outbound(record.outbound.spi) > self._keeper.sequence_block or (
                self._keeper.durable_inbound(record.inbound.spi) > 0
            )
            if restarted:
                self._emit(
                    DataplaneEvent(
                        DataplaneEventKind.SOFT_EXPIRE,
                        child_sa=record.id,
                        spi=record.inbound.spi,
                        reason="reinstalled from the sequence ledger: rekey recommended",
                    )
                )

    def _adoptable(self, sa: XfrmSa) -> bool:
        """The kernel held this SA when we started, with the same keys and parameters."""
        state = self._preexisting_sas.get(sa.id)
        return state is not None and sa.same_keyed_sa(state.sa)

    def _restore_preexisting(self, state: XfrmSaState) -> None:
        self.client.add_sa(state.sa)
        self._preexisting_sas[state.sa.id] = state

    async def _with_ledger(
        self, record: ChildSaRecord, inbound: XfrmSa, outbound: XfrmSa, adopted: set[XfrmSaId]
    ) -> tuple[XfrmSa, XfrmSa]:
        """Start new kernel SAs after every sequence number the ledger has seen, and ask for
        NEWAE events that keep the ledger ahead of them."""
        keeper = self._keeper
        assert keeper is not None
        try:
            if outbound.id not in adopted:
                last = await keeper.start_outbound(record.id, outbound.spi)
                if not outbound.esn and last >= 0xFFFFFFFF:
                    raise Unsupported(
                        f"SA spi {outbound.spi:#010x}: the ledger shows every 32-bit sequence number used; rekey"
                    )
                outbound = replace(
                    outbound,
                    initial_replay=XfrmReplayState.sending_after(last) if last else None,
                    replay_thresh=keeper.outbound_threshold,
                    etimer_thresh=NO_TIMER_EVENTS,
                )
            if inbound.id not in adopted:
                floor = await keeper.inbound_floor(record.id, inbound.spi)
                if not inbound.esn and floor > 0xFFFFFFFF:
                    floor = 0xFFFFFFFF
                window = inbound.replay_window
                start = XfrmReplayState.receiving_above(floor, window) if floor and window else None
                inbound = replace(
                    inbound, initial_replay=start, replay_thresh=keeper.inbound_threshold, etimer_thresh=NO_TIMER_EVENTS
                )
        except DataplaneError:
            keeper.forget(record.inbound.spi, record.outbound.spi)
            raise
        except Exception as exc:
            keeper.forget(record.inbound.spi, record.outbound.spi)
            raise DataplaneError(
                f"Child SA {record.id!r}: cannot read the sequence ledger: {type(exc).__name__}: {exc}"
            ) from None
        return inbound, outbound

    async def delete_child_sa(self, child_sa_id: str) -> None:
        """Remove both SAs (and the policies installed with them); all or nothing."""
        client = self.client
        child = self._children.get(child_sa_id)
        if child is None:
            raise NotFound(f"Child SA {child_sa_id!r} is not installed")
        rollback = _Rollback()
        try:
            for policy_id in reversed(child.policy_ids):
                if policy_id in self._policies:
                    self._delete_policy(policy_id, rollback)
            for sa in (child.outbound, child.inbound):
                if sa.id in child.gone:
                    continue
                try:
                    client.delete_sa(sa.id, mark=sa.mark)
                except NotFound:
                    continue  # expired and removed by the kernel meanwhile
                rollback.done(f"delete {sa.id}", partial(client.add_sa, sa))
        except DataplaneError as exc:
            raise _fail(exc, rollback) from exc.__cause__
        del self._children[child_sa_id]
        for sa in (child.inbound, child.outbound):
            self._sa_owner.pop(sa.id, None)
        self._forget_unused_filter(child_sa_id)
        if not any(p.policy.child_sa == child_sa_id for p in self._policies.values()):
            self._reqids.pop(child_sa_id, None)
        if self._keeper is not None:
            self._keeper.forget(child.inbound.spi, child.outbound.spi)
        self._save_journal()
        self._emit(DataplaneEvent(DataplaneEventKind.DELETED, child_sa=child_sa_id, spi=child.record.inbound.spi))

    # -- policies -----------------------------------------------------------------------
    def _reqid_for_policy(self, policy: SpdPolicy, default_reqid: int) -> int:
        if policy.reqid:
            return policy.reqid
        if default_reqid:
            return default_reqid
        if not policy.child_sa:
            return 0
        if policy.child_sa not in self._reqids:
            self._reqids[policy.child_sa] = self._allocate_reqid()
        return self._reqids[policy.child_sa]

    async def install_policy(self, policy: SpdPolicy) -> None:
        rollback = _Rollback()
        try:
            self._install_policy(policy, rollback, default_reqid=0)
        except DataplaneError as exc:
            raise _fail(exc, rollback) from exc.__cause__
        self._save_journal()

    def _install_policy(self, policy: SpdPolicy, rollback: _Rollback, *, default_reqid: int) -> None:
        previous = self._policies.get(policy.id)
        if previous is not None and previous.policy == policy:
            return
        if previous is not None and default_reqid:
            raise AlreadyExists(f"policy {policy.id!r} is already installed")
        reqid = self._reqid_for_policy(policy, default_reqid)
        wanted = self._kernel_entries(policy, reqid, self._filter_of(policy))
        self._program(policy, reqid, wanted, previous, rollback)

    def _program(
        self,
        policy: SpdPolicy,
        reqid: int,
        wanted: list[XfrmPolicy],
        previous: _InstalledPolicy | None,
        rollback: _Rollback,
    ) -> None:
        """Bring the kernel entries of `policy` from `previous` to `wanted`: entries are added and
        updated in `wanted`'s order, then the ones no longer wanted are released."""
        client = self.client
        old = {p.key: p for p in previous.kernel} if previous else {}
        for kp in wanted:
            owner = self._policy_owner.get(kp.key)
            if owner is not None and owner != policy.id and self._holder(kp.key).priority == kp.priority:
                raise AlreadyExists(f"{kp.key} already belongs to policy {owner!r}")
        self._snapshot_policy_books(rollback)
        waiting: set[XfrmPolicyKey] = set()
        for kp in wanted:
            owner = self._policy_owner.get(kp.key)
            if owner is not None and owner != policy.id:
                # another policy holds the kernel's entry: the better priority (lower) holds it,
                # the other waits underneath for its turn
                holder = self._holder(kp.key)
                if kp.priority < holder.priority:
                    client.update_policy(kp)
                    rollback.done(f"supersede {holder}", partial(client.update_policy, holder))
                    self._shadowed.setdefault(kp.key, {})[owner] = holder
                    self._unshadow(kp.key, policy.id)
                    self._policy_owner[kp.key] = policy.id
                else:
                    self._shadowed.setdefault(kp.key, {})[policy.id] = kp
                    waiting.add(kp.key)
                continue
            if kp.key in old:
                if old[kp.key] != kp:
                    client.update_policy(kp)
                    rollback.done(f"update {kp}", partial(client.update_policy, old[kp.key]))
            elif kp.key in self._preexisting_policies and (
                kp == self._preexisting_policies[kp.key] or kp.key in self._journaled.policies
            ):
                # in the kernel since before we started: as wanted (adopt), or a predecessor's
                # with other content (replace in place, no gap in protection)
                before = self._preexisting_policies.pop(kp.key)
                rollback.done(f"adopt {kp.key}", partial(self._preexisting_policies.__setitem__, kp.key, before))
                if before == kp:
                    self.adopted["policies"] += 1
                else:
                    client.update_policy(kp)
                    rollback.done(f"replace {kp}", partial(client.update_policy, before))
                    self.replaced["policies"] += 1
            else:
                client.add_policy(kp)
                rollback.done(f"add {kp}", partial(client.delete_policy, kp.key))
        wanted_keys = {kp.key for kp in wanted}
        for key, before in old.items():
            if key not in wanted_keys:
                self._release(key, policy.id, before, rollback)
        self._commit_policy(policy, reqid, wanted, previous, waiting)

    def _holder(self, key: XfrmPolicyKey) -> XfrmPolicy:
        """The entry the kernel holds for `key` (of the policy that owns it)."""
        owner = self._policies[self._policy_owner[key]]
        return next(kp for kp in owner.kernel if kp.key == key)

    def _unshadow(self, key: XfrmPolicyKey, policy_id: str) -> None:
        waiting = self._shadowed.get(key)
        if waiting is not None:
            waiting.pop(policy_id, None)
            if not waiting:
                del self._shadowed[key]

    def _release(self, key: XfrmPolicyKey, policy_id: str, entry: XfrmPolicy, rollback: _Rollback) -> None:
        """`policy_id` gives up `key`: a policy waiting underneath takes the kernel's entry over
        (the best priority first), else the entry goes."""
        if self._policy_owner.get(key) != policy_id:
            self._unshadow(key, policy_id)
            return
        waiting = self._shadowed.get(key, {})
        if waiting:
            successor, successor_entry = min(waiting.items(), key=lambda item: item[1].priority)
            self.client.update_policy(successor_entry)
            rollback.done(f"hand {key} back", partial(self.client.update_policy, entry))
            self._unshadow(key, successor)
            self._policy_owner[key] = successor
            return
        try:
            self.client.delete_policy(key)
            rollback.done(f"delete {entry}", partial(self.client.add_policy, entry))
        except NotFound:
            pass
        self._policy_owner.pop(key, None)

    def _snapshot_policy_books(self, rollback: _Rollback) -> None:
        """A rollback step that puts the policy bookkeeping back as it is now."""
        owners = dict(self._policy_owner)
        shadowed = {key: dict(waiting) for key, waiting in self._shadowed.items()}
        policies = dict(self._policies)

        def restore() -> None:
            self._policy_owner = owners
            self._shadowed = shadowed
            self._policies = policies

        rollback.done("restore the policy bookkeeping", restore)

    def _commit_policy(
        self,
        policy: SpdPolicy,
        reqid: int,
        kernel: list[XfrmPolicy],
        previous: _InstalledPolicy | None,
        waiting: set[XfrmPolicyKey],
    ) -> None:
        """Record the new state (the snapshot in the rollback restores the bookkeeping)."""
        if previous is not None:
            for kp in previous.kernel:
                if self._policy_owner.get(kp.key) == policy.id:
                    self._policy_owner.pop(kp.key)
        self._policies[policy.id] = _InstalledPolicy(policy, kernel, reqid)
        for kp in kernel:
            if kp.key not in waiting:
                self._policy_owner[kp.key] = policy.id

    async def delete_policy(self, policy_id: str) -> None:
        installed = self._policies.get(policy_id)
        if installed is None:
            raise NotFound(f"policy {policy_id!r} is not installed")
        rollback = _Rollback()
        try:
            self._delete_policy(policy_id, rollback)
        except DataplaneError as exc:
            raise _fail(exc, rollback) from exc.__cause__
        self._save_journal()
        for child in self._children.values():
            if policy_id in child.policy_ids:
                child.policy_ids.remove(policy_id)
        child_sa = installed.policy.child_sa
        self._forget_unused_filter(child_sa)
        still_used = child_sa in self._children or any(p.policy.child_sa == child_sa for p in self._policies.values())
        if child_sa and not still_used:  # drop a reqid reserved for that Child SA alone
            self._reqids.pop(child_sa, None)

    def _delete_policy(self, policy_id: str, rollback: _Rollback) -> None:
        installed = self._policies[policy_id]
        self._snapshot_policy_books(rollback)
        for kp in installed.kernel:
            self._release(kp.key, policy_id, kp, rollback)
        del self._policies[policy_id]

    # -- identity filters ----------------------------------------------------------------
    def _filter_of(self, policy: SpdPolicy) -> tuple[TrafficSelector, ...] | None:
        """The identity filter that narrows this entry: its Child SA's, if it is an inbound PROTECT one."""
        if not policy.child_sa or policy.action != PolicyAction.PROTECT or policy.direction == PolicyDirection.OUT:
            return None
        return self._current_filter(policy.child_sa)

    def _current_filter(self, child_sa_id: str) -> tuple[TrafficSelector, ...] | None:
        """The filter set on a Child SA, else the one a predecessor left on it (first reconcile)."""
        if child_sa_id in self._filters:
            return self._filters[child_sa_id]
        return self._inherited_filters.get(child_sa_id)

    @staticmethod
    def _kernel_entries(policy: SpdPolicy, reqid: int, granted: tuple[TrafficSelector, ...] | None) -> list[XfrmPolicy]:
        if granted is None:
            return xfrm_policies_from_spd(policy, reqid=reqid)
        return narrowed_policies(policy, reqid=reqid, granted=granted)

    def _forget_unused_filter(self, child_sa_id: str) -> None:
        """A filter stays while its Child SA is installed or a policy still names it (fail closed)."""
        if child_sa_id in self._children:
            return
        if any(p.policy.child_sa == child_sa_id for p in self._policies.values()):
            return
        self._filters.pop(child_sa_id, None)
        self._inherited_filters.pop(child_sa_id, None)

    async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
        """What the Child SA's decapsulated packets may reach: its IN and FWD entries become one
        ALLOW entry per granted part of their selectors and a BLOCK entry over the rest
        (`xfrm_policy.narrowed_policies`), enforced by the kernel's inbound policy check. None
        restores the negotiated entries; an empty list lets nothing through. Policies of the
        Child SA installed later are narrowed too. All or nothing: a filter that cannot be
        expressed raises InvalidArgument and leaves the previous one in place."""
        self._set_filter(child_sa_id, selectors)

    async def set_identity_filters(self, filters: dict[str, list[TrafficSelector] | None]) -> dict[str, str]:
        """`set_identity_filter` for many Child SAs (each all or nothing on its own); returns the
        Child SAs whose filter was not applied, with why."""
        errors: dict[str, str] = {}
        for child_sa_id, selectors in filters.items():
            try:
                self._set_filter(child_sa_id, selectors)
            except DataplaneError as exc:
                errors[child_sa_id] = str(exc)
        return errors

    def _set_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
        if child_sa_id not in self._children:
            raise NotFound(f"Child SA {child_sa_id!r} is not installed")
        granted = None if selectors is None else tuple(selectors)
        if granted is not None:
            for selector in granted:
                if not isinstance(selector, TrafficSelector):
                    raise InvalidArgument(f"filter of Child SA {child_sa_id!r}: {selector!r} is not a traffic selector")
        plans: list[tuple[_InstalledPolicy, list[XfrmPolicy]]] = []
        for installed in self._policies.values():
            policy = installed.policy
            inbound_protect = policy.action == PolicyAction.PROTECT and policy.direction != PolicyDirection.OUT
            if policy.child_sa != child_sa_id or not inbound_protect:
                continue
            wanted = self._kernel_entries(installed.policy, installed.reqid, granted)  # may refuse: nothing done yet
            if wanted != installed.kernel:
                plans.append((installed, wanted))
        rollback = _Rollback()
        try:
            for installed, wanted in plans:
                self._program(installed.policy, installed.reqid, wanted, self._policies[installed.policy.id], rollback)
        except DataplaneError as exc:
            raise _fail(exc, rollback) from exc.__cause__
        self._inherited_filters.pop(child_sa_id, None)
        if granted is None:
            self._filters.pop(child_sa_id, None)
        else:
            self._filters[child_sa_id] = granted
        self._save_journal()

    def identity_filter(self, child_sa_id: str) -> tuple[TrafficSelector, ...] | None:
        """The filter a Child SA carries (None: none)."""
        return self._current_filter(child_sa_id)

    def _read_stat(self) -> dict[str, int]:
        try:
            if self._stat_override is not None:
                return self._stat_override()
            if self._stat_reader is not None:
                return self._stat_reader.read()
        except OSError as exc:
            log.debug("XFRM counters not readable: %s", exc)
        return {}

    async def identity_filter_drops(self) -> FilterDrops:
        """What the kernel dropped in its inbound policy check since this backend started
        (XfrmInPolBlock, XfrmInNoPols, XfrmInTmplMismatch of the namespace), in
        `FilterDrops.unattributed`: the kernel counts per namespace, so these include drops no
        identity filter caused, and no count is per Child SA (`xfrm_stat` docstring)."""
        now = self._read_stat()
        drops = FilterDrops()
        for name in FILTER_DROP_COUNTERS:
            if name in now:
                drops.unattributed[name] = max(0, now[name] - self._stat_baseline.get(name, 0))
        return drops

    # -- counters and replay state ------------------------------------------------------
    def counters(self) -> list[SaCounters]:
        states = {state.sa.id: state for state in self.client.dump_sas()}
        out = []
        for child in self._children.values():
            for direction, sa in (("in", child.inbound), ("out", child.outbound)):
                state = states.get(sa.id)
                if state is None:
                    continue
                top = state.replay.highest_received if direction == "in" else state.replay.last_sent
                out.append(SaCounters(sa.spi, direction, state.packets, state.bytes, top))
                self._observe(child, sa, state.replay)
        return out

    # -- the sequence ledger (sequence_keeper) -------------------------------------------
    def _observe(self, child: _InstalledChild, sa: XfrmSa, replay: XfrmReplayState) -> None:
        if self._keeper is None or sa.id in child.gone:
            return
        if sa is child.outbound:
            self._keeper.observe_outbound(child.record.id, sa.spi, replay.last_sent)
        else:
            self._keeper.observe_inbound(child.record.id, sa.spi, replay.highest_received)

    def _observe_child(self, child: _InstalledChild) -> None:
        for sa in (child.inbound, child.outbound):
            try:
                replay = self.client.get_replay_state(sa.id, src=sa.src, reqid=sa.reqid)
            except DataplaneError as exc:
                log.warning("cannot read the sequence numbers of %s: %s", sa.id, exc)
                continue
            self._observe(child, sa, replay)

    def _observe_all(self) -> None:
        """One dump: every SA's counters against the ledger (catches lost NEWAE events)."""
        states = {state.sa.id: state for state in self.client.dump_sas()}
        for child in self._children.values():
            for sa in (child.inbound, child.outbound):
                state = states.get(sa.id)
                if state is not None:
                    self._observe(child, sa, state.replay)

    async def _follow_marks(self) -> None:
        while True:
            await asyncio.sleep(self._mark_interval)
            try:
                self._observe_all()
            except DataplaneError as exc:
                log.warning("sequence marks not checked: %s", exc)

    def _on_aevent(self, msg: Any) -> None:
        sa_id = XfrmSaId(
            unpack_address(msg["sa_id_daddr"], int(msg["sa_id_family"])),
            int(msg["sa_id_spi"]),
            int(msg["sa_id_proto"]),
        )
        child_id = self._sa_owner.get(sa_id)
        if child_id is None:
            return
        child = self._children[child_id]
        sa = child.inbound if child.inbound.id == sa_id else child.outbound
        self._observe(child, sa, XfrmReplayState.from_attrs(msg))

    def _sequence_refused(self, child_sa: str, spi: int) -> None:
        self._emit(
            DataplaneEvent(
                DataplaneEventKind.SEQUENCE_EXHAUSTED,
                child_sa=child_sa,
                spi=spi,
                reason="sequence numbers of this SPI are held by another dataplane instance: rekey",
            )
        )

    def _child_sa(self, child_sa_id: str, direction: str) -> XfrmSa:
        child = self._children.get(child_sa_id)
        if child is None:
            raise NotFound(f"Child SA {child_sa_id!r} is not installed")
        if direction not in ("in", "out"):
            raise InvalidArgument(f"direction must be 'in' or 'out', not {direction!r}")
        return child.inbound if direction == "in" else child.outbound

    def replay_state(self, child_sa_id: str, direction: str) -> XfrmReplayState:
        """Sequence numbers and replay window of one SA (XFRM_MSG_GETAE)."""
        sa = self._child_sa(child_sa_id, direction)
        return self.client.get_replay_state(sa.id, src=sa.src, reqid=sa.reqid)

    def restore_replay_state(self, child_sa_id: str, direction: str, state: XfrmReplayState) -> None:
        """Set sequence numbers (XFRM_MSG_NEWAE), e.g. to continue after a failover."""
        sa = self._child_sa(child_sa_id, direction)
        self.client.set_replay_state(sa.id, state, src=sa.src, reqid=sa.reqid, esn=sa.uses_replay_esn)

    # -- sockets and interfaces ---------------------------------------------------------
    def bypass_socket(self, sock: socket.socket, *, esp_in_udp: bool = False) -> None:
        """Exempt an IKE socket from IPsec policies (and decapsulate ESP-in-UDP on it)."""
        try:
            bypass_ipsec(sock)
            if esp_in_udp:
                enable_esp_in_udp(sock)
        except OSError as exc:
            raise DataplaneError(f"cannot set IPsec bypass on socket {sock.getsockname()}: {exc}") from exc

    async def add_xfrm_interface(self, name: str, if_id: int, *, link: str | None = None) -> int:
        """Create an XFRM interface for route-based VPN; returns its ifindex."""
        return await create_xfrm_interface(name, if_id, netns=self.netns, link=link)

    async def delete_xfrm_interface(self, name: str) -> None:
        await delete_xfrm_interface(name, netns=self.netns)

    # -- events -------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[DataplaneEvent]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def _emit(self, event: DataplaneEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.events_dropped += 1
            log.warning("dataplane event queue full, dropped %s", event.kind.value)

    def _read_kernel_events(self) -> None:
        if self._events_sock is None:
            return
        try:
            messages = self._events_sock.receive()
        except OSError as exc:
            log.error("reading XFRM events failed: %s", exc)
            return
        for msg_type, msg in messages:
            self.process_kernel_message(msg_type, msg)

    def process_kernel_message(self, msg_type: int, msg: Any) -> None:
        """Turn one decoded XFRM notification into events (EXPIRE, ACQUIRE; others ignored)."""
        if msg_type == XfrmMsgType.EXPIRE:
            self._on_expire(msg)
        elif msg_type == XfrmMsgType.ACQUIRE:
            self._on_acquire(msg)
        elif msg_type == XfrmMsgType.NEWAE:
            self._on_aevent(msg)

    def _on_expire(self, msg: Any) -> None:
        sa = XfrmSa.from_message(msg, prefix="state_")
        hard = bool(msg["hard"])
        child_id = self._sa_owner.get(sa.id, "")
        if hard and child_id:
            self._children[child_id].gone.add(sa.id)
        limit = _expired_limit(msg, hard)
        kind = DataplaneEventKind.HARD_EXPIRE if hard else DataplaneEventKind.SOFT_EXPIRE
        reason = f"{'hard' if hard else 'soft'} {limit} lifetime of {sa.id} ran out"
        self._emit(DataplaneEvent(kind, child_sa=child_id, spi=sa.spi, reason=reason))

    def _on_acquire(self, msg: Any) -> None:
        policy = XfrmPolicy.from_message(msg, prefix="policy_")
        flow = XfrmSelector.from_fields(msg, "sel_")
        policy_id = self._policy_owner.get(policy.key, "")
        if policy_id in self._policies and self._policies[policy_id].policy.child_sa:
            # the Child SA's entry sits over a trap entry (its SA expired): the trap answers
            traps = [pid for pid in self._shadowed.get(policy.key, {}) if not self._policies[pid].policy.child_sa]
            policy_id = traps[0] if traps else policy_id
        reqid = policy.templates[0].reqid if policy.templates else 0
        reason = f"acquire for {flow.saddr} -> {flow.daddr} proto {flow.proto} (reqid {reqid})"
        self._emit(DataplaneEvent(DataplaneEventKind.ACQUIRE, policy=policy_id, reason=reason))


def _expired_limit(msg: Any, hard: bool) -> str:
    """Which limit ran out: bytes, packets or seconds (by comparing current use to the limits)."""
    side = "hard" if hard else "soft"
    if int(msg["state_curlft_bytes"]) >= int(msg[f"state_lft_{side}_byte_limit"]):
        return "byte"
    if int(msg["state_curlft_packets"]) >= int(msg[f"state_lft_{side}_packet_limit"]):
        return "packet"
    return "time"


def _conforms_to_the_protocol(backend: KernelXfrmBackend) -> DataplaneBackend:
    return backend  # mypy checks that KernelXfrmBackend implements DataplaneBackend
