"""The IKE endpoint: demultiplexes datagrams to IKE SAs by SPI, creates responder SAs for
IKE_SA_INIT (with COOKIE protection of half-open state, §2.6), starts initiators from a
connection config, and runs reauthentication and INITIAL_CONTACT across SAs.

Same sans-IO surface as one IKE SA: `receive_datagram`, `datagrams_to_send`, `get_timer`,
`handle_timer`, `next_event`, plus commands (`initiate`, `rekey_child`, ...).
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import logging
import os
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable

from esplanade.ipsec.selectors import IPAddress
from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2.access import AccessGrant
from esplanade.keyexchange.ikev2.constants import IKE_HEADER_LEN, NATT_PORT, ExchangeType, HeaderFlag, NotifyType
from esplanade.keyexchange.ikev2.cookies import CookieJar
from esplanade.keyexchange.ikev2.errors import IkeError, InvalidMajorVersion, ParseError, UnsupportedCriticalPayload
from esplanade.keyexchange.ikev2.events import Address, Datagram, Event, IkeSaDeleted, IkeSaEstablished
from esplanade.keyexchange.ikev2.ike_sa import EngineHooks, IkeSa, IkeState, notify_data_of
from esplanade.keyexchange.ikev2.message import Message, decode_message, encode_plain, parse_header
from esplanade.keyexchange.ikev2.payloads import NoncePayload, NotifyPayload, notify_of

MAX_DATAGRAM = 65535
log = logging.getLogger(__name__)
# the fields every IKE major version keeps in place (RFC 7296 §3.1): SPIs, next payload,
# version, exchange type, flags, Message ID
_V_ANY_HEADER = struct.Struct("!8s8sBBBBI")


class IkeDispatcher:
    def __init__(
        self,
        configs: Iterable[ConnectionConfig],
        *,
        require_install_ack: bool = True,
        cookie_threshold: int = 30,
        cookie_threshold_ip: int = 3,
        block_threshold: int = 5,
        install_timeout: float = 10.0,
        ack_initiator_installs: bool = False,
        id_prefix: str = "",
        allocate_spi: Callable[[], int] | None = None,
        wall_time: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        now: float = 0.0,
        new_ike_spi: Callable[[], bytes] | None = None,
        access_for: Callable[[IkeSa], AccessGrant | None] | None = None,
        responder: bool = True,
    ) -> None:
        """`responder=False` (a dial-out-only connector): every IKE_SA_INIT request is dropped
        unanswered (counted as `dropped_init_not_responder`); this side only initiates."""
        self.configs: dict[str, ConnectionConfig] = {c.name: c for c in configs}
        self.responder = responder
        self.cookie_threshold = cookie_threshold
        self.cookie_threshold_ip = cookie_threshold_ip
        self.block_threshold = block_threshold
        self.sas: dict[str, IkeSa] = {}
        self._by_spi: dict[bytes, IkeSa] = {}  # our own IKE SPI -> SA
        self._half_open: dict[tuple[bytes, str, int], IkeSa] = {}  # (SPIi, peer ip, port) -> responder SA
        self._half_open_keys: dict[str, tuple[bytes, str, int]] = {}
        self._half_open_ips: dict[str, int] = {}
        self._spis_in_use: set[int] = set()
        self._leases: dict[str, dict[str, str]] = {}  # pool -> address -> ike id
        self._seq = 0
        self._events: deque[Event] = deque()
        self._datagrams: list[Datagram] = []
        self._reauth_started: set[str] = set()
        self._reauth_children: dict[str, list[str]] = {}
        self.cookies = CookieJar(now)
        self._timer_heap: list[tuple[float, int, str]] = []
        self._deadlines: dict[str, float] = {}
        self._timer_seq = 0
        self.counters: dict[str, int] = {}
        self.id_prefix = id_prefix
        self.on_register: Callable[[IkeSa], None] | None = None  # a shell's bookkeeping of new IKE SAs
        self.hooks = EngineHooks(
            allocate_spi=self._allocate_spi if allocate_spi is None else allocate_spi,
            wall_time=wall_time,
            new_ike_id=self._new_id,
            allocate_address=self._allocate_address,
            require_install_ack=require_install_ack,
            rng=rng or random.Random(),  # noqa: S311 - lifetime jitter, not key material
            install_timeout=install_timeout,
            ack_initiator_installs=ack_initiator_installs,
            new_ike_spi=new_ike_spi if new_ike_spi is not None else lambda: os.urandom(8),
            access_for=access_for,
        )

    # -- bookkeeping ----------------------------------------------------------------------------
    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _new_id(self) -> str:
        self._seq += 1
        return f"{self.id_prefix}ike-{self._seq}"

    def _allocate_spi(self) -> int:
        while True:
            spi = int.from_bytes(os.urandom(4), "big")
            if spi >= 0x100 and spi not in self._spis_in_use:
                self._spis_in_use.add(spi)
                return spi

    def _allocate_address(self, pool: PoolConfig, ike: IkeSa) -> IPAddress | None:
        leases = self._leases.setdefault(pool.name, {})
        for addr in pool.addrs.hosts() if pool.addrs.num_addresses > 2 else pool.addrs:
            if str(addr) not in leases:
                leases[str(addr)] = ike.id
                return addr
        return None

    def _release(self, ike: IkeSa) -> None:
        for leases in self._leases.values():
            for addr in [a for a, owner in leases.items() if owner == ike.id]:
                del leases[addr]
        for c in ike.children.values():
            self._spis_in_use.discard(c.spi_in)

    def _register(self, ike: IkeSa) -> None:
        if self.on_register is not None:
            self.on_register(ike)
        self.sas[ike.id] = ike
        self._by_spi[ike.spi_i if ike.initiator else ike.spi_r] = ike

    def adopt(self, sa: IkeSa, now: float) -> None:
        """Take over an IKE SA restored from another instance's state (`IkeSa.from_state`)."""
        if sa.id in self.sas:
            raise ValueError(f"IKE SA {sa.id} is already here")
        sa.hooks = self.hooks
        self._register(sa)
        for child in sa.children.values():
            self._spis_in_use.add(child.spi_in)
        for address in sa.assigned_ips:
            for pool in sa.config.pools:
                self._leases.setdefault(pool.name, {})[address] = sa.id
        self._schedule(sa)

    def release(self, ike_id: str) -> IkeSa | None:
        """Forget an IKE SA without a word to the peer: another instance carries it on."""
        sa = self.sas.pop(ike_id, None)
        if sa is None:
            return None
        self._by_spi.pop(sa.spi_i if sa.initiator else sa.spi_r, None)
        self._release(sa)
        self._deadlines.pop(ike_id, None)
        return sa

    def half_open_count(self, ip: str | None = None) -> int:
        """Responder IKE SAs that answered IKE_SA_INIT but are not authenticated yet (O(1))."""
        return len(self._half_open) if ip is None else self._half_open_ips.get(ip, 0)

    def _half_open_add(self, key: tuple[bytes, str, int], sa: IkeSa) -> None:
        self._half_open[key] = sa
        self._half_open_keys[sa.id] = key
        self._half_open_ips[key[1]] = self._half_open_ips.get(key[1], 0) + 1

    def _half_open_remove(self, sa: IkeSa) -> None:
        key = self._half_open_keys.pop(sa.id, None)
        if key is None or self._half_open.get(key) is not sa:
            return
        del self._half_open[key]
        left = self._half_open_ips[key[1]] - 1
        if left:
            self._half_open_ips[key[1]] = left
        else:
            del self._half_open_ips[key[1]]

    # -- sans-IO surface ------------------------------------------------------------------------
    def datagrams_to_send(self) -> list[Datagram]:
        out, self._datagrams = self._datagrams, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest deadline of any IKE SA: a heap with lazily dropped stale entries, O(log n)."""
        heap = self._timer_heap
        while heap:
            deadline, _, sa_id = heap[0]
            if self._deadlines.get(sa_id) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def handle_timer(self, now: float) -> None:
        due: list[IkeSa] = []
        heap = self._timer_heap
        while heap and heap[0][0] <= now:
            deadline, _, sa_id = heapq.heappop(heap)
            if self._deadlines.get(sa_id) == deadline and sa_id in self.sas:
                del self._deadlines[sa_id]
                due.append(self.sas[sa_id])
        for sa in due:
            try:
                sa.handle_timer(now)
            except Exception:  # a bug: this SA's state is not to be trusted, the others' timers go on
                self.count("timer_internal_errors")
                log.exception("IKE SA %s: internal error in its timer; the SA is dropped", sa.id)
                sa.destroy("internal error in its timer")
            self._collect(sa, now)

    def _schedule(self, sa: IkeSa) -> None:
        deadline = sa.get_timer() if sa.state != IkeState.DELETED else None
        if deadline == self._deadlines.get(sa.id):
            return
        if deadline is None:
            self._deadlines.pop(sa.id, None)
            return
        self._deadlines[sa.id] = deadline
        self._timer_seq += 1
        heapq.heappush(self._timer_heap, (deadline, self._timer_seq, sa.id))
        if len(self._timer_heap) > 2 * len(self._deadlines) + 64:
            # drop stale entries (replaced deadlines, forgotten SAs) so the heap stays O(live SAs)
            self._timer_heap = [e for e in self._timer_heap if self._deadlines.get(e[2]) == e[0]]
            heapq.heapify(self._timer_heap)

    def receive_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        """One UDP payload as received; on port 4500 it still carries the non-ESP marker."""
        try:
            self._receive(data, local, remote, now)
        except IkeError:
            self.count("dropped_errors")
        except Exception:  # the boundary: no datagram may crash the service; a bug if this counts
            self.count("dropped_internal_errors")

    def _receive(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        if local[1] == NATT_PORT:
            if len(data) == 1 and data[0] == 0xFF:
                self.count("keepalives")
                return
            if data[:4] != b"\x00\x00\x00\x00":
                self.count("esp_on_ike_path")
                return
            data = data[4:]
        if len(data) > MAX_DATAGRAM or len(data) < IKE_HEADER_LEN:
            self.count("dropped_short")
            return
        try:
            hdr = parse_header(data)
        except InvalidMajorVersion:
            self.count("dropped_bad_header")
            self._answer_higher_major_version(data, local, remote)
            return
        except ParseError:
            self.count("dropped_bad_header")
            return
        # the I flag says the sender is the original initiator: then our SPI is SPIr
        our_spi = hdr.spi_r if hdr.from_initiator else hdr.spi_i
        if hdr.exchange == ExchangeType.IKE_SA_INIT and not hdr.is_response:
            self._receive_init_request(data, local, remote, now)
            return
        sa = self._by_spi.get(hdr.spi_i) if hdr.exchange == ExchangeType.IKE_SA_INIT else self._by_spi.get(our_spi)
        if sa is None:
            self.count("dropped_unknown_spi")
            return
        try:
            msg = decode_message(data)
        except ParseError:
            self.count("dropped_parse_errors")
            return
        if hdr.exchange != ExchangeType.IKE_SA_INIT and (msg.spi_i != sa.spi_i or msg.spi_r != sa.spi_r):
            self.count("dropped_spi_mismatch")
            return
        sa.receive_message(msg, local, remote, now)
        self._collect(sa, now)

    def _receive_init_request(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        if not self.responder:
            self.count("dropped_init_not_responder")
            return
        try:
            msg = decode_message(data)
        except UnsupportedCriticalPayload as exc:
            # §2.5: rejected, and the response MUST say so; stateless, like a COOKIE
            self.count("dropped_parse_errors")
            hdr = parse_header(data)
            if hdr.spi_r == bytes(8) and hdr.message_id == 0:
                self.count("unsupported_critical_sent")
                notify = NotifyPayload(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, notify_data_of(exc))
                self._answer_unprotected(hdr.spi_i, hdr.spi_r, hdr.exchange, hdr.message_id, notify, local, remote)
            return
        except ParseError:
            self.count("dropped_parse_errors")
            return
        if msg.spi_r != bytes(8) or msg.message_id != 0:
            self.count("dropped_bad_init")
            return
        key = (msg.spi_i, remote[0], remote[1])
        existing = self._half_open.get(key)
        if existing is not None and existing.state != IkeState.DELETED:
            if existing.init_request == data and existing.cached_response is not None:
                self.count("init_retransmits")
                for d in existing.cached_response[1]:
                    self._datagrams.append(d)
            return
        nonce = next((p for p in msg.payloads if isinstance(p, NoncePayload)), None)
        if nonce is None:
            self.count("dropped_bad_init")
            return
        if self.half_open_count(remote[0]) >= self.block_threshold and self.block_threshold:
            self.count("blocked_init")
            return
        if self._cookie_required(remote[0]):
            cookie = notify_of(msg.payloads, NotifyType.COOKIE)
            if cookie is None or not self.cookies.check(cookie.data, nonce.data, remote[0], msg.spi_i, now):
                self.count("cookies_sent")
                reply = Message(
                    msg.spi_i,
                    bytes(8),
                    ExchangeType.IKE_SA_INIT,
                    0,
                    from_initiator=False,
                    response=True,
                    payloads=[
                        NotifyPayload(NotifyType.COOKIE, self.cookies.make(nonce.data, remote[0], msg.spi_i, now))
                    ],
                )
                self._datagrams.append(Datagram(encode_plain(reply), local, remote, local[1] == NATT_PORT))
                return
            self.count("cookies_valid")
        configs = self._configs_for(local, remote)
        if not configs:
            self.count("dropped_no_config")
            return
        sa = IkeSa(self._new_id(), configs[0], False, local, remote, now, self.hooks, spi_i=msg.spi_i)
        sa.candidate_configs = tuple(configs)
        self._register(sa)
        self._half_open_add(key, sa)
        sa.receive_message(msg, local, remote, now)
        self._collect(sa, now)

    def _answer_higher_major_version(self, data: bytes, local: Address, remote: Address) -> None:
        """§2.5, §1.5: an IKE_SA_INIT request of a higher major version SHOULD get an unprotected
        INVALID_MAJOR_VERSION (our version in the header). Never for a response (no loops) nor
        for a lower major version (IKEv1 is not ours to answer)."""
        spi_i, spi_r, _next, version, exchange, flags, message_id = _V_ANY_HEADER.unpack_from(data)
        if (
            not self.responder
            or version >> 4 <= 2
            or exchange != ExchangeType.IKE_SA_INIT
            or flags & HeaderFlag.RESPONSE
        ):
            return
        self.count("invalid_major_version_sent")
        notify = NotifyPayload(NotifyType.INVALID_MAJOR_VERSION)
        self._answer_unprotected(spi_i, spi_r, exchange, message_id, notify, local, remote)

    def _answer_unprotected(
        self,
        spi_i: bytes,
        spi_r: bytes,
        exchange: int,
        message_id: int,
        notify: NotifyPayload,
        local: Address,
        remote: Address,
    ) -> None:
        """A response outside any IKE SA (§1.5): the request's SPIs, exchange and Message ID."""
        reply = Message(spi_i, spi_r, exchange, message_id, from_initiator=False, response=True, payloads=[notify])
        self._datagrams.append(Datagram(encode_plain(reply), local, remote, local[1] == NATT_PORT))

    def _cookie_required(self, ip: str) -> bool:
        if self.cookie_threshold and self.half_open_count() >= self.cookie_threshold:
            return True
        return bool(self.cookie_threshold_ip and self.half_open_count(ip) >= self.cookie_threshold_ip)

    def _configs_for(self, local: Address, remote: Address) -> list[ConnectionConfig]:
        out = []
        for cfg in self.configs.values():
            if not _addr_ok(cfg.remote_addrs, remote[0]) or not _addr_ok(cfg.local_addrs, local[0]):
                continue
            out.append(cfg)
        return out

    # -- configuration ------------------------------------------------------------------------------
    def set_config(self, config: ConnectionConfig) -> None:
        """Add or replace a connection. Running IKE SAs keep the config they were set up with
        until they are rekeyed by reauthentication or deleted (as strongSwan's --load-conns)."""
        self.configs[config.name] = config

    def remove_config(self, name: str, now: float) -> list[str]:
        """Unload a connection and delete its IKE SAs; returns the IKE SAs being deleted."""
        self.configs.pop(name, None)
        doomed = [sa.id for sa in self.sas.values() if sa.config.name == name and sa.state != IkeState.DELETED]
        for ike_id in doomed:
            self.delete_ike(ike_id, now, "connection unloaded")
        return doomed

    # -- commands ---------------------------------------------------------------------------------
    def initiate(
        self,
        connection: str,
        now: float,
        child: str | None = "",
        local: Address | None = None,
        remote: Address | None = None,
        reauth_of: str = "",
    ) -> str:
        """Start an IKE SA (and, unless `child` is None, its first Child SA) from a connection."""
        from esplanade.keyexchange.ikev2.tasks.ike_init import IkeInit

        cfg = self.configs[connection]
        if child == "":
            child = cfg.children[0].name if cfg.children else None
        if local is None:
            local = (cfg.local_addrs[0] if cfg.local_addrs else "0.0.0.0", cfg.local_port)
        if remote is None:
            if not cfg.remote_addrs:
                raise ValueError(f"connection {connection} has no remote address to initiate to")
            remote = (cfg.remote_addrs[0], cfg.remote_port)
        sa = IkeSa(self._new_id(), cfg, True, local, remote, now, self.hooks)
        sa.reauth_of = reauth_of
        self._register(sa)
        sa.queue_task(IkeInit(child))
        sa.run_queue(now)
        self._collect(sa, now)
        return sa.id

    def _sa(self, ike_id: str) -> IkeSa:
        sa = self.sas.get(ike_id)
        if sa is None:
            raise KeyError(f"no IKE SA {ike_id}")
        return sa

    def _run(self, sa: IkeSa, now: float) -> None:
        sa.run_queue(now)
        self._collect(sa, now)

    def create_child(self, ike_id: str, child: str, now: float) -> None:
        from esplanade.keyexchange.ikev2.tasks.child_create import ChildCreate

        sa = self._sa(ike_id)
        sa.config.child(child)
        sa.queue_task(ChildCreate(child))
        self._run(sa, now)

    def rekey_child(self, ike_id: str, child_id: str, now: float) -> None:
        from esplanade.keyexchange.ikev2.tasks.child_rekey import ChildRekey

        sa = self._sa(ike_id)
        sa.queue_task(ChildRekey(child_id))
        self._run(sa, now)

    def delete_child(self, ike_id: str, child_id: str, now: float) -> None:
        from esplanade.keyexchange.ikev2.tasks.child_delete import ChildDelete

        sa = self._sa(ike_id)
        c = sa.children[child_id]
        sa.queue_task(ChildDelete([c.spi_in]))
        self._run(sa, now)

    def rekey_ike(self, ike_id: str, now: float) -> None:
        from esplanade.keyexchange.ikev2.tasks.ike_rekey import IkeRekey

        sa = self._sa(ike_id)
        sa.queue_task(IkeRekey())
        self._run(sa, now)

    def delete_ike(self, ike_id: str, now: float, reason: str = "deleted") -> None:
        from esplanade.keyexchange.ikev2.tasks.ike_delete import IkeDelete

        sa = self._sa(ike_id)
        sa.queue.clear()
        sa.queue_task(IkeDelete(reason))
        self._run(sa, now)

    def dpd(self, ike_id: str, now: float) -> None:
        from esplanade.keyexchange.ikev2.tasks.ike_dpd import IkeDpd

        sa = self._sa(ike_id)
        sa.queue_task(IkeDpd())
        self._run(sa, now)

    def reauth(self, ike_id: str, now: float) -> None:
        sa = self._sa(ike_id)
        sa.reauth_requested = True
        self._collect(sa, now)

    def child_traffic_seen(self, child_id: str, now: float) -> None:
        """The dataplane saw authenticated ESP on this Child SA: the peer is alive (no DPD needed)."""
        sa = self._sa_of_child(child_id)
        if sa is not None:
            sa.last_inbound = max(sa.last_inbound, now)
            self._schedule(sa)

    def child_expired(self, child_id: str, hard: bool, now: float) -> None:
        """A byte/packet lifetime of the dataplane ran out: rekey (soft) or delete (hard)."""
        from esplanade.keyexchange.ikev2.tasks.child_delete import ChildDelete
        from esplanade.keyexchange.ikev2.tasks.child_rekey import ChildRekey

        sa = self._sa_of_child(child_id)
        if sa is None:
            return
        child = sa.children[child_id]
        sa.queue_task(ChildDelete([child.spi_in], reason="hard lifetime expired") if hard else ChildRekey(child_id))
        self._run(sa, now)

    def _sa_of_child(self, child_id: str) -> IkeSa | None:
        for sa in self.sas.values():
            if child_id in sa.children:
                return sa
        return None

    def initiate_children(self, connection: str, names: list[str], now: float) -> str:
        """One IKE SA carrying these Child SAs: the first in IKE_AUTH, the rest in CREATE_CHILD_SA."""
        ike = self.initiate(connection, now, child=names[0] if names else None)
        if len(names) > 1:
            self._reauth_children[ike] = names
        return ike

    def start_configured(self, now: float) -> list[str]:
        """Initiate every connection with a child whose start_action is "start" (swanctl --load-conns)."""
        started = []
        for cfg in self.configs.values():
            names = [c.name for c in cfg.children if c.start_action == "start"]
            if names and cfg.remote_addrs:
                ike = self.initiate(cfg.name, now, child=names[0])
                self._reauth_children[ike] = names
                started.append(ike)
        return started

    def inbound_sa_installed(self, ike_id: str, child_id: str, now: float) -> None:
        sa = self.sas.get(ike_id)
        if sa is None:
            return
        sa.inbound_sa_installed(child_id, now)
        self._collect(sa, now)

    # -- after every call into an SA -----------------------------------------------------------------
    def _collect(self, sa: IkeSa, now: float) -> None:
        restart: list[tuple[str, list[str]]] = []
        self._collect_one(sa, now, restart)
        for connection, names in restart:
            if connection in self.configs:
                ike = self.initiate(connection, now, child=names[0])
                self._reauth_children[ike] = names

    def _restart_after(self, sa: IkeSa, ev: IkeSaDeleted) -> list[tuple[str, list[str]]]:
        """dpd_action=restart / close_action=start: renegotiate what the peer lost or tore down."""
        if not sa.established_at or not sa.config.remote_addrs or sa.reauth_requested:
            return []
        if "dead peer" in ev.reason:
            names = [c.name for c in sa.config.children if c.dpd_action == "restart"]
        elif ev.reason == "deleted by peer":
            names = [c.name for c in sa.config.children if c.close_action == "start"]
        else:
            names = []
        return [(sa.config.name, names)] if names else []

    def _collect_one(self, sa: IkeSa, now: float, restart: list[tuple[str, list[str]]]) -> None:
        pending = [sa]
        while pending:
            s = pending.pop()
            self._datagrams.extend(s.datagrams_to_send())
            for new in s.spawned:
                self._register(new)
                new.run_queue(now)
                pending.append(new)
            s.spawned.clear()
            while (ev := s.next_event()) is not None:
                self._events.append(ev)
                if isinstance(ev, IkeSaEstablished):
                    self._on_established(s, ev, now)
                elif isinstance(ev, IkeSaDeleted):
                    restart.extend(self._restart_after(s, ev))
            if s.reauth_requested and s.id not in self._reauth_started and s.state == IkeState.ESTABLISHED:
                self._start_reauth(s, now)
            if s.state == IkeState.DELETED:
                self._forget(s)
            else:
                self._schedule(s)

    def _on_established(self, sa: IkeSa, ev: IkeSaEstablished, now: float) -> None:
        self._half_open_remove(sa)
        extra = self._reauth_children.pop(sa.id, [])[1:]
        if extra:
            from esplanade.keyexchange.ikev2.tasks.child_create import ChildCreate

            for name in extra:  # the Child SAs beyond the one IKE_AUTH carried
                sa.queue_task(ChildCreate(name))
            sa.run_queue(now)
            self._datagrams.extend(sa.datagrams_to_send())
        if ev.reauth_of and ev.reauth_of in self.sas:
            from esplanade.keyexchange.ikev2.tasks.ike_delete import IkeDelete

            old = self.sas[ev.reauth_of]
            old.queue.clear()
            old.queue_task(IkeDelete("reauthenticated"))
            old.run_queue(now)
            self._drain(old)
        if not sa.initiator and sa.initial_contact and sa.config.unique != "never" and sa.peer_id is not None:
            for other in list(self.sas.values()):
                if (
                    (
                        other is not sa
                        and not other.initiator
                        and other.peer_id == sa.peer_id
                        and other.config is sa.config
                    )
                    and other.state != IkeState.DELETED
                    and not sa.reauth_of
                ):
                    other.destroy("replaced (INITIAL_CONTACT)")
                    self._drain(other)

    def _start_reauth(self, old: IkeSa, now: float) -> None:
        self._reauth_started.add(old.id)
        names = list(dict.fromkeys(c.name for c in old.children.values()))
        new_id = self.initiate(
            old.config.name,
            now,
            child=names[0] if names else None,
            local=(old.local[0], old.config.local_port),
            remote=(old.remote[0], old.config.remote_port if old.remote[1] == NATT_PORT else old.remote[1]),
            reauth_of=old.id,
        )
        self._reauth_children[new_id] = names

    def _drain(self, sa: IkeSa) -> None:
        self._datagrams.extend(sa.datagrams_to_send())
        while (ev := sa.next_event()) is not None:
            self._events.append(ev)
        if sa.state == IkeState.DELETED:
            self._forget(sa)
        else:
            self._schedule(sa)

    def _forget(self, sa: IkeSa) -> None:
        self.sas.pop(sa.id, None)
        self._deadlines.pop(sa.id, None)
        for spi in (sa.spi_i, sa.spi_r):
            if self._by_spi.get(spi) is sa:
                del self._by_spi[spi]
        self._half_open_remove(sa)
        self._reauth_started.discard(sa.id)
        self._release(sa)


@functools.lru_cache(maxsize=4096)
def _addr_ok(allowed: tuple[str, ...], ip: str) -> bool:
    if not allowed:
        return True
    for a in allowed:
        if a in ("%any", "0.0.0.0", "::"):
            return True
        try:
            if "/" in a and ipaddress.ip_address(ip) in ipaddress.ip_network(a, strict=False):
                return True
            if ipaddress.ip_address(a) == ipaddress.ip_address(ip):
                return True
        except ValueError:
            continue
    return False


__all__ = ["IkeDispatcher", "IkeSaDeleted"]
