"""The IKE SA: explicit state table, message IDs, retransmission, timers, and task dispatch.

Sans-IO like aioquic's connection: `receive_message()` (the dispatcher has decoded the
header), `datagrams_to_send()`, `get_timer()`, `handle_timer(now)`, `next_event()`. The
exchanges themselves live in `tasks/`, one class per exchange step, as in strongSwan.

Message IDs use a window of one (§2.3): one request of ours outstanding at a time, and the
peer's requests answered strictly in order, the last response cached for retransmissions.
An unauthenticated message (one whose SK payload does not verify) never changes state.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

from esplanade.ipsec.sa import ChildSaRecord, Lifetime
from esplanade.ipsec.selectors import IPAddress
from esplanade.ipsec.transforms import IntegAlgorithm, ProtocolId
from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2 import ike_sa_state
from esplanade.keyexchange.ikev2.access import AccessGrant
from esplanade.keyexchange.ikev2.auth.identity import Identity
from esplanade.keyexchange.ikev2.child_sa import ChildSa, ChildState
from esplanade.keyexchange.ikev2.constants import NATT_PORT, ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.crypto.keymat import IkeKeys, derive_ike_keys, sk_ciphers
from esplanade.keyexchange.ikev2.crypto.prf import PRFS, Prf
from esplanade.keyexchange.ikev2.crypto.sk import SkCipher
from esplanade.keyexchange.ikev2.errors import IkeError, IntegrityCheckFailed, ParseError, UnsupportedCriticalPayload
from esplanade.keyexchange.ikev2.events import (
    Address,
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    Datagram,
    Event,
    ExchangeCompleted,
    IkeSaDeleted,
    InstallInboundSa,
    NegotiationFailed,
)
from esplanade.keyexchange.ikev2.message import (
    Message,
    encode_encrypted,
    encode_plain,
    finish_inner,
    open_fragment,
    open_message,
)
from esplanade.keyexchange.ikev2.payloads import DeletePayload, NotifyPayload, Payload, SkfPayload
from esplanade.keyexchange.ikev2.proposals import Suite

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.tasks.base import Task


class IkeState(enum.Enum):
    CREATED = "created"
    INIT_SENT = "init_sent"
    INIT_DONE = "init_done"  # responder: answered IKE_SA_INIT (half-open)
    INTERMEDIATE_SENT = "intermediate_sent"
    AUTH_SENT = "auth_sent"
    ESTABLISHED = "established"
    REKEYING = "rekeying"
    REKEYED = "rekeyed"  # replaced by a new IKE SA, waiting for the delete
    DELETING = "deleting"
    DELETED = "deleted"


# which exchanges a peer may start in each state (responder side), h11 style
ALLOWED_REQUESTS: dict[IkeState, frozenset[int]] = {
    IkeState.CREATED: frozenset({ExchangeType.IKE_SA_INIT}),
    IkeState.INIT_DONE: frozenset({ExchangeType.IKE_INTERMEDIATE, ExchangeType.IKE_AUTH}),
    IkeState.INIT_SENT: frozenset(),
    IkeState.INTERMEDIATE_SENT: frozenset(),
    IkeState.AUTH_SENT: frozenset(),
    IkeState.ESTABLISHED: frozenset(
        {ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL, ExchangeType.IKE_FOLLOWUP_KE}
    ),
    IkeState.REKEYING: frozenset(
        {ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL, ExchangeType.IKE_FOLLOWUP_KE}
    ),
    IkeState.REKEYED: frozenset({ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA}),
    # CREATE_CHILD_SA: answered TEMPORARY_FAILURE while we close the IKE SA (§2.25.2, tasks/dispatch.py)
    IkeState.DELETING: frozenset({ExchangeType.INFORMATIONAL, ExchangeType.CREATE_CHILD_SA}),
    IkeState.DELETED: frozenset(),
}
TRANSITIONS: dict[IkeState, frozenset[IkeState]] = {
    IkeState.CREATED: frozenset({IkeState.INIT_SENT, IkeState.INIT_DONE, IkeState.ESTABLISHED, IkeState.DELETED}),
    IkeState.INIT_SENT: frozenset(
        {IkeState.INIT_SENT, IkeState.INTERMEDIATE_SENT, IkeState.AUTH_SENT, IkeState.DELETED}
    ),
    IkeState.INIT_DONE: frozenset({IkeState.ESTABLISHED, IkeState.DELETED}),
    IkeState.INTERMEDIATE_SENT: frozenset({IkeState.INTERMEDIATE_SENT, IkeState.AUTH_SENT, IkeState.DELETED}),
    IkeState.AUTH_SENT: frozenset({IkeState.ESTABLISHED, IkeState.DELETED}),
    IkeState.ESTABLISHED: frozenset({IkeState.REKEYING, IkeState.REKEYED, IkeState.DELETING, IkeState.DELETED}),
    IkeState.REKEYING: frozenset({IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING, IkeState.DELETED}),
    IkeState.REKEYED: frozenset({IkeState.DELETING, IkeState.DELETED}),
    IkeState.DELETING: frozenset({IkeState.DELETED}),
    IkeState.DELETED: frozenset(),
}


class InvalidTransition(IkeError):
    pass


@dataclass(slots=True)
class Outstanding:
    """Our request in flight: what to retransmit and when."""

    message_id: int
    datagrams: list[Datagram]
    task: Task
    sent_at: float
    attempt: int = 0
    deadline: float = 0.0


@dataclass(slots=True)
class HeldResponse:
    """A response built but released only after the dataplane installed these inbound SAs."""

    message_id: int
    payloads: list[Payload]
    waiting: set[str]
    exchange: int
    after_send: list[Any] = field(default_factory=list)
    deadline: float = float("inf")  # give up on the dataplane's acknowledgement then
    children: tuple[str, ...] = ()


@dataclass(slots=True)
class Reassembly:
    message_id: int
    total: int
    first_inner: int = 0
    parts: dict[int, bytes] = field(default_factory=dict)
    started: float = 0.0


@dataclass(frozen=True, slots=True)
class EngineHooks:
    """What the owning dispatcher provides: SPI allocation, wall clock, install-ack policy."""

    allocate_spi: Callable[[], int]
    wall_time: Callable[[], float]
    new_ike_id: Callable[[], str]
    allocate_address: Callable[[PoolConfig, IkeSa], IPAddress | None]
    require_install_ack: bool = True
    rng: random.Random = field(default_factory=random.Random)
    # How long a held response waits for `inbound_sa_installed` before the exchange fails.
    install_timeout: float = 10.0
    # Initiator rekeys: delete the old Child SA only once the new inbound SA is acknowledged
    # too, so the peer never switches to an SA our dataplane cannot decrypt yet.
    ack_initiator_installs: bool = False
    # Our IKE SPIs when we initiate (SPIi): several keyexchange instances behind one relay pick
    # SPIs that the relay's rendezvous hashing routes back to themselves.
    new_ike_spi: Callable[[], bytes] = field(default=lambda: os.urandom(8))
    # Responder: what the access policy grants an authenticated peer (`ikev2.access`).
    access_for: Callable[[IkeSa], AccessGrant | None] | None = None


HALF_OPEN_TIMEOUT = 30.0
MAX_FRAGMENTS = 64  # RFC 7383 allows more; a bound on reassembly memory per IKE SA
FRAGMENT_TIMEOUT = 30.0
IKE_REKEY_DELETE_TIMEOUT = 10.0


class IkeSa:
    """One IKE SA, from either side."""

    def __init__(
        self,
        ike_id: str,
        config: ConnectionConfig,
        initiator: bool,
        local: Address,
        remote: Address,
        now: float,
        hooks: EngineHooks,
        spi_i: bytes | None = None,
        spi_r: bytes = bytes(8),
    ) -> None:
        self.id = ike_id
        self.config = config
        self.initiator = initiator
        self.local = local
        self.remote = remote
        self.hooks = hooks
        self.spi_i = spi_i if spi_i is not None else hooks.new_ike_spi()
        # the responder picks its SPI now; the initiator learns SPIr from the IKE_SA_INIT response
        self.spi_r = spi_r if initiator else os.urandom(8)
        self.state = IkeState.CREATED
        self.created_at = now
        self.established_at: float | None = None
        # negotiated
        self.suite: Suite | None = None
        self.prf: Prf = PRFS[5]
        self.keys: IkeKeys | None = None
        self.out_cipher: SkCipher | None = None
        self.in_cipher: SkCipher | None = None
        self.ni = b""
        self.nr = b""
        self.init_request = b""  # IKE_SA_INIT request as sent/received (RealMessage1)
        self.init_response = b""  # RealMessage2
        self.int_auth_i = b""  # RFC 9242 IntAuth_iN chain value
        self.int_auth_r = b""
        self.auth_message_id = 0
        self.pending_additional_ke: list[int] = []
        self.nat_local = False
        self.nat_remote = False
        self.peer_fragmentation = False
        self.peer_intermediate = False
        self.peer_sig_hashes: tuple[int, ...] = ()
        self.peer_certreq = False
        self.peer_id: Identity | None = None
        self.peer_certs: list[Any] = []
        self.virtual_ips: list[str] = []
        self.assigned_ips: list[str] = []  # responder: handed out from a pool
        self.access: AccessGrant | None = None  # responder: the policy's grant to the peer (None: not governed)
        self.dns: list[str] = []
        self.split_subnets: list[str] = []
        self.children: dict[str, ChildSa] = {}
        self.rekey_of = ""
        self.reauth_of = ""
        # message IDs (window size 1)
        self.next_request_id = 0
        self.next_peer_id = 0
        self.outstanding: Outstanding | None = None
        self.queue: deque[Task] = deque()
        self.deferred: list[tuple[float, Task]] = []  # (when, task): queued then (retries, §2.25)
        self.cached_response: tuple[int, list[Datagram]] | None = None
        self.last_request_digest = b""
        self._first_fragment_digest = b""
        self.held: HeldResponse | None = None
        # initiator rekeys waiting for the new inbound SA's ack: new child id -> (old inbound SPI, deadline)
        self.deletes_after_install: dict[str, tuple[int, float]] = {}
        self.active_responder_tasks: list[Task] = []
        self.reassembly: dict[bool, Reassembly] = {}  # by "is a response"
        # timers
        self.rekey_at: float | None = None
        self.reauth_at: float | None = None
        self.expire_at: float | None = None
        self.keepalive_at: float | None = None
        self.last_inbound = now
        self.last_outbound = now
        self.delete_deadline: float | None = None
        # output
        self._datagrams: list[Datagram] = []
        self._events: deque[Event] = deque()
        self.spawned: list[IkeSa] = []  # IKE SAs created by rekey, for the dispatcher to adopt
        self.counters: dict[str, int] = {}
        self._child_seq = 0
        # exchange bookkeeping shared by tasks
        self.shared_secrets: list[bytes] = []
        self.skeyseed = b""
        self.rekeying_children: dict[str, Task] = {}
        self.rekey_collisions: dict[str, Any] = {}
        self.ike_rekey_task: Any = None
        self.ike_rekey_collision: Any = None
        self.reauth_requested = False
        self.pending_followups: dict[bytes, Any] = {}  # RFC 9370 link -> responder state
        self.initial_contact = False
        self.candidate_configs: tuple[ConnectionConfig, ...] = (config,)

    # -- helpers --------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"IkeSa({self.id}, {self.config.name}, {self.state.value}, {'I' if self.initiator else 'R'})"

    # -- moving between instances (ike_sa_state.py) ------------------------------------------
    def quiescent(self) -> bool:
        """No exchange in progress: `to_state` may capture it."""
        return ike_sa_state.quiescent(self)

    def to_state(self, now: float, wall: float, seal: ike_sa_state.Seal) -> dict[str, Any]:
        """This IKE SA as a document (secrets through `seal`); raises NotQuiescent mid-exchange."""
        return ike_sa_state.state_of(self, now, wall, seal)

    @classmethod
    def from_state(
        cls,
        document: dict[str, Any],
        config: ConnectionConfig,
        hooks: EngineHooks,
        now: float,
        wall: float,
        open_: ike_sa_state.Open,
    ) -> IkeSa:
        """The IKE SA `to_state` captured, going on with the same message IDs, keys and Child SAs."""
        ike_id, connection, initiator, local, remote, spi_i, spi_r = ike_sa_state.header_of(document)
        if config.name != connection:
            raise ike_sa_state.StateError(f"IKE SA {ike_id} belongs to connection {connection!r}, not {config.name!r}")
        sa = cls(ike_id, config, initiator, local, remote, now, hooks, spi_i=spi_i, spi_r=spi_r)
        sa.spi_i, sa.spi_r = spi_i, spi_r
        try:
            ike_sa_state.restore_into(sa, document, now, wall, open_)
        except ike_sa_state.StateError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            problem = type(exc).__name__
            raise ike_sa_state.StateError(f"IKE SA {ike_id}: stored state is malformed ({problem})") from None
        return sa

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def set_state(self, new: IkeState) -> None:
        if new != self.state and new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"IKE SA {self.id}: {self.state.value} -> {new.value} is not allowed")
        self.state = new

    @property
    def established(self) -> bool:
        return self.state in (IkeState.ESTABLISHED, IkeState.REKEYING)

    @property
    def encap(self) -> bool:
        return self.config.encap or self.nat_local or self.nat_remote

    def emit(self, event: Event) -> None:
        self._events.append(event)

    def new_child_id(self) -> str:
        self._child_seq += 1
        return f"{self.id}.c{self._child_seq}"

    def remote_identity_text(self) -> str:
        return str(self.peer_id) if self.peer_id is not None else ""

    def integ(self) -> IntegAlgorithm | None:
        return self.suite.integ if self.suite else None

    def install_keys(self, keys: IkeKeys) -> None:
        assert self.suite is not None
        self.keys = keys
        self.out_cipher, self.in_cipher = sk_ciphers(keys, self.suite.cipher, self.suite.integ, self.initiator)

    def derive_keys(self, skeyseed: bytes) -> None:
        assert self.suite is not None
        self.skeyseed = skeyseed  # kept for the strongSwan key cross-check; never logged
        self.install_keys(
            derive_ike_keys(
                self.prf, self.suite.cipher, self.suite.integ, skeyseed, self.ni, self.nr, self.spi_i, self.spi_r
            )
        )

    def float_to_natt(self) -> None:
        """§2.23: move IKE to port 4500 once NAT is detected (or encapsulation forced)."""
        if self.local[1] != NATT_PORT:
            self.local = (self.local[0], NATT_PORT)
        if self.remote[1] == 500:
            self.remote = (self.remote[0], NATT_PORT)

    def nat_hash(self, spi_r: bytes, addr: Address) -> bytes:
        data = self.spi_i + spi_r + packed_address(addr[0]) + addr[1].to_bytes(2, "big")
        return hashlib.sha1(data, usedforsecurity=False).digest()

    # -- public sans-IO surface -----------------------------------------------------------
    def datagrams_to_send(self) -> list[Datagram]:
        out, self._datagrams = self._datagrams, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        deadlines = [
            d
            for d in (
                self.outstanding.deadline if self.outstanding else None,
                self.rekey_at if self.established else None,
                self.reauth_at if self.established else None,
                self.expire_at if self.established else None,
                self._dpd_deadline(),
                self.keepalive_at if self.established and self.nat_local else None,
                self.delete_deadline,
                self.created_at + HALF_OPEN_TIMEOUT if self.state == IkeState.INIT_DONE else None,
                self.held.deadline if self.held is not None else None,
                min((d for _, d in self.deletes_after_install.values()), default=None),
                min((when for when, _ in self.deferred), default=None),
                min((r.started for r in self.reassembly.values()), default=-FRAGMENT_TIMEOUT) + FRAGMENT_TIMEOUT
                if self.reassembly
                else None,
            )
            if d is not None
        ]
        if self.established and self.outstanding is None:
            for c in self.children.values():
                if c.expire_at is not None:  # any state: a replaced SA the peer never deleted expires too
                    deadlines.append(c.expire_at)
                if c.state == ChildState.INSTALLED and c.rekey_at is not None:
                    deadlines.append(c.rekey_at)
        return min(deadlines) if deadlines else None

    def _dpd_deadline(self) -> float | None:
        if not self.config.dpd_delay or not self.established or self.outstanding is not None:
            return None
        return self.last_inbound + self.config.dpd_delay

    def handle_timer(self, now: float) -> None:
        if self.state == IkeState.DELETED:
            return
        if self.state == IkeState.INIT_DONE and now >= self.created_at + HALF_OPEN_TIMEOUT:
            self.count("half_open_timeout")
            self.destroy("half-open IKE SA timed out")
            return
        for key, r in list(self.reassembly.items()):
            if now >= r.started + FRAGMENT_TIMEOUT:
                del self.reassembly[key]
        if self.held is not None and now >= self.held.deadline and self._install_timed_out(self.held, now):
            return
        for child_id, (_, deadline) in list(self.deletes_after_install.items()):
            if now >= deadline:
                self.count("install_ack_timeouts")
                self._release_rekeyed(child_id, now)
        if self.delete_deadline is not None and now >= self.delete_deadline:
            self.destroy("rekeyed IKE SA was not deleted by the peer in time")
            return
        o = self.outstanding
        if o is not None and now >= o.deadline:
            if o.attempt >= self.config.retransmit.tries:
                self._give_up(o)
                return
            o.attempt += 1
            o.deadline = now + self.config.retransmit.delay(o.attempt)
            self.count("retransmits")
            for d in o.datagrams:
                self._datagrams.append(self._with_endpoints(d))
        if self.deferred:
            due = [task for when, task in self.deferred if now >= when]
            self.deferred = [(when, task) for when, task in self.deferred if now < when]
            self.queue.extend(due)
        if not self.established:
            return
        from esplanade.keyexchange.ikev2.tasks import child_rekey, ike_dpd, ike_reauth, ike_rekey

        if self.expire_at is not None and now >= self.expire_at:
            # §1.4.1: the peer learns of it (as from strongSwan), but the lifetime is hard: the
            # DELETE goes once and we do not wait for its answer
            self.send_oneshot([DeletePayload(ProtocolId.IKE)], now)
            self.destroy("IKE SA hard lifetime expired")
            return
        if self.reauth_at is not None and now >= self.reauth_at:
            self.reauth_at = None
            self.queue_task(ike_reauth.IkeReauth())
        if self.rekey_at is not None and now >= self.rekey_at:
            self.rekey_at = None
            self.queue_task(ike_rekey.IkeRekey())
        for c in list(self.children.values()):
            if c.expire_at is not None and now >= c.expire_at:
                self.remove_child(c, "hard lifetime expired")
                from esplanade.keyexchange.ikev2.tasks import child_delete

                self.queue_task(child_delete.ChildDelete([c.spi_in], quiet=True))
            elif c.rekey_at is not None and now >= c.rekey_at and c.state == ChildState.INSTALLED:
                c.rekey_at = None
                self.queue_task(child_rekey.ChildRekey(c.id))
        dpd = self._dpd_deadline()
        if dpd is not None and now >= dpd and not self.queue:
            self.queue_task(ike_dpd.IkeDpd())
        if self.keepalive_at is not None and self.nat_local and now >= self.keepalive_at:
            self.keepalive_at = now + self.config.keepalive_interval
            self._datagrams.append(Datagram(b"\xff", self.local, self.remote, non_esp_marker=False))
        self.run_queue(now)

    def _give_up(self, o: Outstanding) -> None:
        self.outstanding = None
        self.count("retransmit_timeouts")
        self.emit(ExchangeCompleted(self.id, o.task.exchange.name, o.sent_at, o.deadline, "timeout", "TIMEOUT"))
        o.task.on_timeout(self)
        if self.state in (IkeState.ESTABLISHED, IkeState.REKEYING, IkeState.REKEYED, IkeState.DELETING):
            self.destroy("peer did not answer (retransmission limit reached): dead peer")
        else:
            self.emit(NegotiationFailed(self.id, 0, "peer did not answer (retransmission limit reached)", o.task.name))
            self.destroy("peer did not answer")

    # -- commands ---------------------------------------------------------------------------
    def queue_task(self, task: Task) -> None:
        self.queue.append(task)

    def defer_task(self, task: Task, when: float) -> None:
        """Queue `task` at `when`, e.g. a retry after TEMPORARY_FAILURE (§2.25: retry later,
        not at once, or the two peers ping-pong for as long as the refusal lasts)."""
        self.deferred.append((when, task))

    def run_queue(self, now: float) -> None:
        """Start the next queued exchange if none is outstanding (window size 1)."""
        # Each queued task is tried once per call: one that cannot start may queue a successor
        # (an IKE rekey waiting for a Child SA rekey), which waits for the next call instead of
        # spinning here forever should its condition not clear.
        tries = len(self.queue)
        while self.outstanding is None and self.queue and self.state != IkeState.DELETED and tries > 0:
            tries -= 1
            task = self.queue.popleft()
            if not task.can_start(self):
                continue
            payloads = task.build_request(self)
            if payloads is None:
                continue
            self.send_request(task, payloads, now)

    def send_request(self, task: Task, payloads: list[Payload], now: float) -> None:
        mid = task.fixed_message_id if task.fixed_message_id is not None else self.next_request_id
        msg = Message(
            self.spi_i,
            self.spi_r,
            task.exchange,
            mid,
            from_initiator=self.initiator,
            response=False,
            payloads=payloads,
        )
        datagrams = self.encode(msg, task)
        self.next_request_id = max(self.next_request_id, mid + 1)
        o = Outstanding(mid, datagrams, task, now, 0, now + self.config.retransmit.delay(0))
        self.outstanding = o
        self.last_outbound = now
        self._datagrams.extend(datagrams)

    def encode(self, msg: Message, task: Task | None = None) -> list[Datagram]:
        marker = self.local[1] == NATT_PORT
        if msg.exchange == ExchangeType.IKE_SA_INIT:
            raw = encode_plain(msg)
            if task is not None:
                task.on_encoded(self, msg, raw)
            return [Datagram(raw, self.local, self.remote, marker)]
        assert self.out_cipher is not None
        frag = self.config.fragment_size - 28 - (4 if marker else 0) if self.peer_fragmentation else 0
        raws, plain = encode_encrypted(msg, self.out_cipher, frag)
        if task is not None:
            task.on_encoded(self, msg, plain)
        return [Datagram(r, self.local, self.remote, marker) for r in raws]

    def send_oneshot(self, payloads: list[Payload], now: float) -> None:
        """An INFORMATIONAL request that is sent once and never waited for (error reports before teardown)."""
        msg = Message(
            self.spi_i,
            self.spi_r,
            ExchangeType.INFORMATIONAL,
            self.next_request_id,
            from_initiator=self.initiator,
            response=False,
            payloads=payloads,
        )
        self.next_request_id += 1
        self._datagrams.extend(self.encode(msg))

    def _with_endpoints(self, d: Datagram) -> Datagram:
        if d.local == self.local and d.remote == self.remote:
            return d
        return Datagram(d.data, self.local, self.remote, self.local[1] == NATT_PORT)

    def send_response(self, mid: int, exchange: int, payloads: list[Payload], task: Task | None = None) -> None:
        msg = Message(
            self.spi_i, self.spi_r, exchange, mid, from_initiator=self.initiator, response=True, payloads=payloads
        )
        datagrams = self.encode(msg, task)
        self.cached_response = (mid, datagrams)
        self._datagrams.extend(datagrams)

    def inbound_sa_installed(self, child_id: str, now: float) -> None:
        """The dataplane acknowledged the inbound SA of `child_id`: release a held response
        (responder) or the delete of the Child SA it replaced (initiator rekey)."""
        if child_id in self.deletes_after_install:
            self._release_rekeyed(child_id, now)
            return
        h = self.held
        if h is None or child_id not in h.waiting:
            return
        h.waiting.discard(child_id)
        if h.waiting:
            return
        self.held = None
        self.send_response(h.message_id, h.exchange, h.payloads)
        for fn in h.after_send:
            fn(now)
        self.run_queue(now)

    def _release_rekeyed(self, child_id: str, now: float) -> None:
        from esplanade.keyexchange.ikev2.tasks.child_delete import ChildDelete

        old_spi, _ = self.deletes_after_install.pop(child_id)
        old = self.find_child_by_spi(old_spi, inbound=True)
        if old is not None and old.state == ChildState.REKEYED:
            self.queue.appendleft(ChildDelete([old_spi]))
        self.run_queue(now)

    def _install_timed_out(self, h: HeldResponse, now: float) -> bool:
        """The dataplane never acknowledged: fail the exchange without leaving half an SA.

        IKE_AUTH: the IKE SA is not established yet, so it goes (the initiator's
        retransmissions find nothing and it times out). CREATE_CHILD_SA: the new Child SA is
        dropped and the peer gets TEMPORARY_FAILURE (§2.25: it may retry later); a Child SA
        being rekeyed stays in place.
        """
        self.held = None
        self.count("install_ack_timeouts")
        reason = f"the dataplane did not acknowledge the inbound SA within {self.hooks.install_timeout:g}s"
        exchange = "ike_auth" if h.exchange == ExchangeType.IKE_AUTH else "create_child_sa"
        self.emit(NegotiationFailed(self.id, NotifyType.TEMPORARY_FAILURE, reason, exchange))
        for child_id in h.children:
            c = self.children.get(child_id)
            if c is not None:
                self.remove_child(c, reason)
        if h.exchange == ExchangeType.IKE_AUTH:
            self.destroy(reason)
            return True
        self.send_response(h.message_id, h.exchange, [NotifyPayload(NotifyType.TEMPORARY_FAILURE)])
        self.run_queue(now)
        return False

    # -- receiving --------------------------------------------------------------------------
    def receive_message(self, msg: Message, local: Address, remote: Address, now: float) -> None:
        """Handle a decoded message addressed to this SA (SPIs matched by the dispatcher)."""
        if self.state == IkeState.DELETED:
            return
        try:
            if msg.response:
                self._receive_response(msg, local, remote, now)
            else:
                self._receive_request(msg, local, remote, now)
        except ParseError as exc:
            self.count("invalid_syntax")
            self._on_parse_error(msg, exc, now)
        except IntegrityCheckFailed:
            self.count("icv_failures")
        self.run_queue(now)

    def _on_parse_error(self, msg: Message, exc: ParseError, now: float) -> None:
        # §2.21.2: INVALID_SYNTAX in a response only to an authenticated request
        authenticated = msg.encrypted and bool(msg.inner_plain)
        if not msg.response and authenticated and exc.notify is not None and msg.message_id == self.next_peer_id:
            self.next_peer_id += 1
            self.send_response(msg.message_id, msg.exchange, [NotifyPayload(exc.notify, notify_data_of(exc))])

    def _decrypt(self, msg: Message, now: float) -> bool:
        """Open the SK/SKF payload; False while fragments are missing. Raises on ICV failure."""
        if not msg.encrypted:
            return True
        if self.in_cipher is None:
            raise IntegrityCheckFailed("no keys yet")
        if isinstance(msg.sealed, SkfPayload):
            frag = msg.sealed
            if frag.total > MAX_FRAGMENTS:
                self.count("too_many_fragments")
                return False
            plain = open_fragment(msg, self.in_cipher)
            # requests and responses reassemble apart: both may be in flight at once
            r = self.reassembly.get(msg.response)
            if r is None or r.message_id != msg.message_id or r.total != frag.total:
                r = self.reassembly[msg.response] = Reassembly(msg.message_id, frag.total, started=now)
            if frag.number == 1:
                r.first_inner = frag.first_inner
            r.parts[frag.number] = plain
            if len(r.parts) < r.total:
                return False
            del self.reassembly[msg.response]
            whole = b"".join(r.parts[i] for i in range(1, r.total + 1))
            finish_inner(msg, r.first_inner, whole)
            msg.sealed = SkfPayload(r.first_inner, 1, 1, b"")
            return True
        open_message(msg, self.in_cipher)
        return True

    def _note_authenticated(self, msg: Message, local: Address, remote: Address, now: float) -> None:
        self.last_inbound = now
        if not msg.encrypted or local[1] != NATT_PORT:
            return
        if local != self.local and self.local[1] != NATT_PORT:
            # the peer floated to 4500 (§2.23): follow it
            self.local = local
            self.remote = remote
        elif remote != self.remote:
            # §2.23: the peer's NAT mapping changed; follow it (authenticated messages only)
            self.remote = remote
            self.count("nat_mapping_changes")
            if self.established:
                self._refresh_child_endpoints()

    def _refresh_child_endpoints(self) -> None:
        wall = self.hooks.wall_time()
        for c in self.children.values():
            if c.state in (ChildState.INSTALLED, ChildState.REKEYING):
                self.emit(ChildSaEstablished(self.id, c.id, self.child_record(c, wall)))

    def _receive_response(self, msg: Message, local: Address, remote: Address, now: float) -> None:
        o = self.outstanding
        if o is None or msg.message_id != o.message_id or msg.exchange != o.task.exchange:
            self.count("unexpected_responses")
            return
        if msg.exchange != ExchangeType.IKE_SA_INIT and not msg.encrypted:
            self.count("unprotected_responses")
            return
        if not self._decrypt(msg, now):
            return
        self._note_authenticated(msg, local, remote, now)
        self.outstanding = None
        task = o.task
        first = len(self._events)
        again = task.process_response(self, msg, now)
        failed = next((e for e in islice(self._events, first, None) if isinstance(e, NegotiationFailed)), None)
        outcome, notify = ("failed", failed.notify_name) if failed is not None else ("ok", "")
        # the exchange's completion goes before its consequences (established, failed, ...)
        done = ExchangeCompleted(self.id, task.exchange.name, o.sent_at, now, outcome, notify)
        self._events.insert(first, done)
        if again and self.state != IkeState.DELETED:
            self.queue.appendleft(task)

    def _receive_request(self, msg: Message, local: Address, remote: Address, now: float) -> None:
        mid = msg.message_id
        first_fragment = not isinstance(msg.sealed, SkfPayload) or msg.sealed.number == 1
        if self.cached_response is not None and mid == self.cached_response[0] and mid == self.next_peer_id - 1:
            # a retransmitted request - the same bytes as the one we answered (the first fragment
            # stands for a fragmented one) - gets the cached response; anything else is dropped
            if not first_fragment or _digest(msg.raw) != self.last_request_digest:
                self.count("dropped_not_a_retransmission")
                return
            self.count("retransmitted_requests")
            for d in self.cached_response[1]:
                self._datagrams.append(self._with_endpoints(d))
            return
        if mid != self.next_peer_id:
            self.count("invalid_message_id")
            return
        if self.held is not None and self.held.message_id == mid:
            return  # still waiting for the dataplane; the retransmit finds the response later
        if msg.exchange not in ALLOWED_REQUESTS[self.state]:
            self.count("requests_in_wrong_state")
            return
        if msg.exchange != ExchangeType.IKE_SA_INIT and not msg.encrypted:
            self.count("unprotected_requests")
            return
        digest = _digest(msg.raw) if first_fragment else b""
        if not self._decrypt(msg, now):
            if first_fragment:
                self._first_fragment_digest = digest
            return
        self.last_request_digest = digest if first_fragment else self._first_fragment_digest
        self._note_authenticated(msg, local, remote, now)
        from esplanade.keyexchange.ikev2.tasks.dispatch import responder_task

        task = responder_task(self, msg)
        self.next_peer_id += 1
        payloads = task.process_request(self, msg, now)
        if payloads is None:
            return
        if task.awaiting_install and self.hooks.require_install_ack:
            self.held = HeldResponse(
                mid,
                payloads,
                set(task.awaiting_install),
                msg.exchange,
                task.after_send,
                now + self.hooks.install_timeout,
                tuple(task.awaiting_install),
            )
            return
        self.send_response(mid, msg.exchange, payloads, task)
        for fn in task.after_send:
            fn(now)

    # -- children -------------------------------------------------------------------------
    def child_record(self, c: ChildSa, wall: float | None = None) -> ChildSaRecord:
        replay, lifetime = self._child_limits(c)
        try:
            cfg = self.config.child(c.name)
            if_ids = (cfg.if_id_in, cfg.if_id_out)
        except KeyError:
            if_ids = (0, 0)
        return c.record(
            self.config.name,
            self.id,
            self.remote_identity_text(),
            self.local,
            self.remote,
            self.encap and c.protocol == ProtocolId.ESP,  # AH never crosses NAT (RFC 3948)
            self.hooks.wall_time() if wall is None else wall,
            replay,
            lifetime,
            if_ids,
            # governed at IKE_AUTH: the dataplane keeps the SA governed, even after a restart
            governed_by=self.access.identity if self.access is not None else "",
        )

    def _child_limits(self, c: ChildSa) -> tuple[int, Lifetime]:
        """Replay window and the lifetimes the dataplane enforces (bytes/packets; hard seconds as a backstop)."""
        try:
            cfg = self.config.child(c.name)
        except KeyError:
            return 32, Lifetime()
        return cfg.replay_window, Lifetime(
            soft_bytes=cfg.rekey_bytes,
            hard_bytes=cfg.life_bytes,
            soft_packets=cfg.rekey_packets,
            hard_packets=cfg.life_packets,
            hard_seconds=int(cfg.life_time),
        )

    def child_schedule(self, c: ChildSa, now: float) -> None:
        try:
            cfg = self.config.child(c.name)
        except KeyError:
            return
        if cfg.rekey_time:
            c.rekey_at = now + cfg.rekey_time - self.hooks.rng.uniform(0, cfg.rand_time)
        if cfg.life_time:
            c.expire_at = now + cfg.life_time

    def announce_child(self, c: ChildSa, now: float, rekeyed: ChildSa | None = None) -> None:
        self.child_schedule(c, now)
        record = self.child_record(c)
        if rekeyed is not None:
            self.emit(ChildSaRekeyed(self.id, rekeyed.id, c.id, record))
        else:
            self.emit(ChildSaEstablished(self.id, c.id, record))

    def request_install(self, c: ChildSa) -> None:
        """Responder: hand the inbound SA to the dataplane before the response goes out."""
        record = self.child_record(c)
        c.state = ChildState.INSTALLING
        self.emit(InstallInboundSa(self.id, c.id, record.inbound, record))

    def find_child_by_spi(self, spi: int, inbound: bool) -> ChildSa | None:
        for c in self.children.values():
            if (c.spi_in if inbound else c.spi_out) == spi:
                return c
        return None

    def remove_child(self, c: ChildSa, reason: str) -> None:
        if self.children.pop(c.id, None) is not None:
            c.state = ChildState.DELETED
            self.emit(ChildSaDeleted(self.id, c.id, reason))

    # -- lifecycle ----------------------------------------------------------------------------
    def select_config_for(self, peer: Identity) -> None:
        """Responder: switch to the candidate connection whose remote identity fits the peer; one
        that names the peer exactly wins over a `%any` one (a site's connector is not a remote user)."""
        candidates = (self.config, *(c for c in self.candidate_configs if c is not self.config))
        exact = next((c for c in candidates if not c.remote.id.is_any and c.remote.id.matches(peer)), None)
        if exact is not None:
            self.config = exact
            return
        if self.config.remote.id.matches(peer):
            return
        for cfg in self.candidate_configs:
            if cfg.remote.id.matches(peer):
                self.config = cfg
                return

    def mark_established(self, now: float) -> None:
        self.set_state(IkeState.ESTABLISHED)
        self.mark_established_timers(now)

    def mark_established_timers(self, now: float) -> None:
        self.established_at = now
        self.last_inbound = now
        cfg = self.config
        if cfg.rekey_time:
            self.rekey_at = now + cfg.rekey_time - self.hooks.rng.uniform(0, cfg.rand_time)
        if cfg.reauth_time:
            self.reauth_at = now + cfg.reauth_time - self.hooks.rng.uniform(0, cfg.rand_time)
        if cfg.rekey_time or cfg.reauth_time:
            self.expire_at = now + max(cfg.rekey_time, cfg.reauth_time) + cfg.over_time
        if self.nat_local:
            self.keepalive_at = now + cfg.keepalive_interval

    def fail(self, notify: int, reason: str, exchange: str) -> None:
        self.emit(NegotiationFailed(self.id, notify, reason, exchange))
        self.destroy(reason)

    def destroy(self, reason: str) -> None:
        """Forget this SA and its children locally (no message)."""
        if self.state == IkeState.DELETED:
            return
        for c in list(self.children.values()):
            self.remove_child(c, reason)
        self.state = IkeState.DELETED
        self.outstanding = None
        self.queue.clear()
        self.deferred.clear()
        self.held = None
        self.emit(IkeSaDeleted(self.id, reason))

    def adopt_children(self, old: IkeSa) -> None:
        """After an IKE rekey the Child SAs move to the new IKE SA (§2.18), and with them the
        queued exchanges about them (creating, rekeying, deleting): on the old IKE SA they
        could never start, and a Child SA whose rekey was lost that way ran into its hard
        lifetime. Exchanges of the old IKE SA itself (its delete, DPD, follow-ups) stay."""
        from esplanade.keyexchange.ikev2.tasks.child_create import ChildCreate
        from esplanade.keyexchange.ikev2.tasks.child_delete import ChildDelete

        for cid, c in list(old.children.items()):
            self.children[cid] = c
        old.children.clear()
        moving = [t for t in old.queue if isinstance(t, ChildCreate | ChildDelete)]
        if moving:
            old.queue = deque(t for t in old.queue if not isinstance(t, ChildCreate | ChildDelete))
            self.queue.extend(moving)
        self.deferred += [(when, t) for when, t in old.deferred if isinstance(t, ChildCreate | ChildDelete)]
        old.deferred = [(when, t) for when, t in old.deferred if not isinstance(t, ChildCreate | ChildDelete)]
        self.peer_id = old.peer_id
        self.peer_certs = old.peer_certs
        self.peer_fragmentation = old.peer_fragmentation
        self.nat_local, self.nat_remote = old.nat_local, old.nat_remote
        self.virtual_ips, self.dns, self.split_subnets = old.virtual_ips, old.dns, old.split_subnets
        self.assigned_ips = old.assigned_ips
        self.access = old.access
        self._child_seq = old._child_seq

    def notify_error_in(self, msg: Message) -> NotifyPayload | None:
        for p in msg.payloads:
            if isinstance(p, NotifyPayload) and p.type < 16384:
                return p
        return None


def notify_data_of(exc: ParseError) -> bytes:
    """The Notification Data of the error notify answering `exc`: §3.10.1 wants the one-octet
    payload type in UNSUPPORTED_CRITICAL_PAYLOAD, nothing in the others we send."""
    if isinstance(exc, UnsupportedCriticalPayload):
        return bytes((exc.payload_type,))
    return b""


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


@functools.lru_cache(maxsize=4096)
def packed_address(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def notify_name(ntype: int) -> str:
    try:
        return NotifyType(ntype).name
    except ValueError:
        return str(ntype)
