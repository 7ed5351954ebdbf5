"""EtcdStore: the store contract on etcd v3.

It speaks etcd's gRPC API through aetcd's protocol bindings (`aetcd.rpc`: the generated
KV/Watch/Lease stubs and messages) over its own `grpc.aio` channels. aetcd's high-level
`Client` is not used because it cannot do what the contract needs: it has no TLS (it
only opens insecure channels), it cannot range at a revision or learn the revision a
watch started at, and its callback watcher drops the response boundaries (revisions) and
cancels itself on compaction. The stubs are all of etcd's API, so nothing is lost.

- Endpoints are "host:port" (a scheme, http:// or https://, is accepted and stripped).
  One channel per endpoint is opened lazily; when a call finds an endpoint unavailable
  the next call goes to the next endpoint.
- TLS: `ca_file` (trust anchor; the system roots if omitted), `cert_file` + `key_file`
  (client certificate, for etcd's `--client-cert-auth`).
- Every unary call has a deadline (`timeout`). A call that fails with the outcome
  unknown (etcd died mid-request) raises StoreUnavailable: re-read before retrying a
  non-idempotent write.
- Watches reconnect transparently with backoff from the last delivered revision + 1 and
  turn etcd's "compacted" answer into a `Resync` (a range at one revision).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from esplanade.store.backoff import Backoff
from esplanade.store.base import (
    CasConflict,
    Compare,
    Delete,
    EventType,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    Resync,
    Store,
    StoreError,
    StoreUnavailable,
    TxnResult,
    WatchBatch,
    WatchEvent,
    WatchItem,
)
from esplanade.store.request_rules import (
    check_lease_ttl,
    check_put,
    check_txn,
    decode_key,
    encode_key,
    prefix_end,
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Fast reconnects: etcd restarts in well under a second, gRPC's default first retry is 1 s.
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Notice a silently vanished etcd (no RST) on a long-lived watch stream. etcd refuses
    # pings more often than every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

_ALL_KEYS = b"\x00"  # as key and range_end: every key (etcd's convention)


def parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """Parse "host:port" (or a URL) -> (gRPC target, whether the URL asked for TLS)."""
    text = endpoint.strip()
    tls = False
    for scheme in ("https://", "http://"):
        if text.startswith(scheme):
            tls = scheme == "https://"
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return text, tls


@dataclass(slots=True)
class _Connection:
    endpoint: str
    channel: Any
    kv: Any
    watch: Any
    lease: Any


def _range_bounds(prefix: str) -> tuple[bytes, bytes]:
    if not prefix:
        return _ALL_KEYS, _ALL_KEYS
    start = encode_key(prefix)
    return start, prefix_end(start) or _ALL_KEYS


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=decode_key(kv.key),
        value=bytes(kv.value),
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        version=kv.version,
        lease=kv.lease,
    )


def _event(event: Any) -> WatchEvent:
    kind = EventType.DELETE if event.type == rpc.Event.DELETE else EventType.PUT
    prev = bytes(event.prev_kv.value) if event.HasField("prev_kv") else None
    return WatchEvent(type=kind, kv=_key_value(event.kv), prev_value=prev)


def _compare(key: bytes, mod_revision: int) -> Any:
    if mod_revision == 0:
        return rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)
    return rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=mod_revision)


class EtcdStore(Store):
    backend_name = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        parsed = [parse_endpoint(e) for e in endpoints]
        self._targets = [target for target, _ in parsed]
        self._tls = any(tls for _, tls in parsed) or ca_file is not None or cert_file is not None
        if (cert_file is None) != (key_file is None):
            raise ValueError("an etcd client certificate needs both cert_file and key_file")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self.timeout = timeout
        self._credentials: Any = None
        self._connections: dict[int, _Connection] = {}
        self._current = 0
        self._closed = asyncio.Event()
        self._connected = False

    def __repr__(self) -> str:
        return f"EtcdStore(endpoints={self._targets!r}, tls={self._tls})"

    # -- connection ---------------------------------------------------------------------
    async def connect(self) -> None:
        """Prepare channels (no round trip: `ping` tells whether etcd answers)."""
        if self._connected:
            return
        if self._tls:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=self._read_tls_file(self._ca_file, "CA certificate"),
                private_key=self._read_tls_file(self._key_file, "client key"),
                certificate_chain=self._read_tls_file(self._cert_file, "client certificate"),
            )
        self._closed = asyncio.Event()
        self._connected = True

    @staticmethod
    def _read_tls_file(path: str | Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read the etcd {what} {path}: {exc.strerror}") from None

    async def close(self) -> None:
        self._closed.set()
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            with contextlib.suppress(Exception):
                await conn.channel.close(grace=None)
        self._connected = False

    def _connection(self) -> _Connection:
        if not self._connected or self._closed.is_set():
            raise StoreUnavailable("the etcd store is not connected")
        index = self._current
        conn = self._connections.get(index)
        if conn is None:
            target = self._targets[index]
            options = list(_CHANNEL_OPTIONS)
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
            conn = _Connection(
                endpoint=target,
                channel=channel,
                kv=rpc.KVStub(channel),
                watch=rpc.WatchStub(channel),
                lease=rpc.LeaseStub(channel),
            )
            self._connections[index] = conn
        return conn

    def _failed(self, conn: _Connection) -> None:
        """Move on to the next endpoint after `conn`'s failed."""
        if len(self._targets) > 1 and self._targets[self._current] == conn.endpoint:
            self._current = (self._current + 1) % len(self._targets)

    def _translate(self, conn: _Connection, exc: grpc.aio.AioRpcError) -> Exception:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
            return LeaseNotFound(details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(f"etcd rejected the request: {details}")
        if code in _RETRYABLE:
            self._failed(conn)
            return StoreUnavailable(f"etcd at {conn.endpoint}: {code.name}: {details}")
        return StoreError(f"etcd at {conn.endpoint}: {code.name}: {details}")

    async def _unary(self, service: str, method: str, request: Any, *, idempotent: bool = False) -> Any:
        """One RPC with the deadline. Reads (`idempotent`) try each endpoint once before
        giving up; writes are not retried: their outcome is unknown when the call failed."""
        tries = len(self._targets) if idempotent else 1
        for attempt in range(tries):
            conn = self._connection()
            try:
                return await getattr(getattr(conn, service), method)(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                error = self._translate(conn, exc)
                if isinstance(error, StoreUnavailable) and attempt + 1 < tries:
                    continue
                raise error from exc
            except asyncio.CancelledError:
                if self._closed.is_set() and _not_cancelled_by_caller():
                    raise StoreUnavailable("the etcd store was closed") from None
                raise
        raise AssertionError("unreachable")

    # -- reads --------------------------------------------------------------------------
    async def ping(self) -> int:
        reply = await self._unary(
            "kv", "Range", rpc.RangeRequest(key=_ALL_KEYS, limit=1, keys_only=True), idempotent=True
        )
        return int(reply.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        reply = await self._unary("kv", "Range", rpc.RangeRequest(key=encode_key(key)), idempotent=True)
        return _key_value(reply.kvs[0]) if reply.kvs else None

    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        start, end = _range_bounds(prefix)
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit)
        reply = await self._unary("kv", "Range", request, idempotent=True)
        return [_key_value(kv) for kv in reply.kvs], int(reply.header.revision)

    # -- writes -------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None) -> int:
        raw = encode_key(key)
        check_put(raw, value)
        request = rpc.PutRequest(key=raw, value=bytes(value), lease=lease)
        if expect_mod_revision is None:
            reply = await self._unary("kv", "Put", request)
            return int(reply.header.revision)
        reply = await self._unary(
            "kv",
            "Txn",
            rpc.TxnRequest(
                compare=[_compare(raw, expect_mod_revision)],
                success=[rpc.RequestOp(request_put=request)],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=raw))],
            ),
        )
        if not reply.succeeded:
            raise _conflict(key, expect_mod_revision, reply.responses[0])
        return int(reply.header.revision)

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        raw = encode_key(key)
        request = rpc.DeleteRangeRequest(key=raw)
        if expect_mod_revision is None:
            reply = await self._unary("kv", "DeleteRange", request)
            return bool(reply.deleted)
        reply = await self._unary(
            "kv",
            "Txn",
            rpc.TxnRequest(
                compare=[_compare(raw, expect_mod_revision)],
                success=[rpc.RequestOp(request_delete_range=request)],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=raw))],
            ),
        )
        if not reply.succeeded:
            raise _conflict(key, expect_mod_revision, reply.responses[0])
        return bool(reply.responses[0].response_delete_range.deleted)

    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        check_txn(conditions, ops)
        success = []
        for op in ops:
            if isinstance(op, Put):
                success.append(
                    rpc.RequestOp(
                        request_put=rpc.PutRequest(key=encode_key(op.key), value=bytes(op.value), lease=op.lease)
                    )
                )
            else:
                success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=encode_key(op.key))))
        # On failure read every compared key, in the same transaction, to say which failed.
        failure = [
            rpc.RequestOp(request_range=rpc.RangeRequest(key=encode_key(c.key), keys_only=True)) for c in conditions
        ]
        reply = await self._unary(
            "kv",
            "Txn",
            rpc.TxnRequest(
                compare=[_compare(encode_key(c.key), c.mod_revision) for c in conditions],
                success=success,
                failure=failure,
            ),
        )
        revision = int(reply.header.revision)
        if reply.succeeded:
            return TxnResult(succeeded=True, revision=revision)
        failed = tuple(
            c for c, resp in zip(conditions, reply.responses, strict=True) if _mod_revision_of(resp) != c.mod_revision
        )
        return TxnResult(succeeded=False, revision=revision, failed=failed)

    async def compact(self, revision: int) -> None:
        try:
            await self._unary("kv", "Compact", rpc.CompactionRequest(revision=revision, physical=False))
        except StoreError as exc:
            text = str(exc)
            if "has been compacted" in text:
                return
            if "future revision" in text:
                raise ValueError(f"cannot compact revision {revision}: it is in the future") from None
            raise

    # -- leases -------------------------------------------------------------------------
    async def grant_lease(self, ttl: int) -> Lease:
        check_lease_ttl(ttl)
        reply = await self._unary("lease", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl, ID=0))
        if reply.error:
            raise StoreError(f"etcd refused the lease: {reply.error}")
        return Lease(id=int(reply.ID), ttl=int(reply.TTL))

    async def keepalive(self, lease_id: int) -> int:
        conn = self._connection()
        call = conn.lease.LeaseKeepAlive(timeout=self.timeout)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._translate(conn, exc) from exc
        finally:
            call.cancel()
        if reply is grpc.aio.EOF:
            self._failed(conn)
            raise StoreUnavailable(f"etcd at {conn.endpoint} ended the keepalive stream")
        if reply.TTL <= 0:
            raise LeaseNotFound(f"lease {lease_id:x} expired or was revoked")
        return int(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._unary("lease", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id))

    # -- watch --------------------------------------------------------------------------
    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        if start_revision < 0:
            raise ValueError("start_revision must be >= 0")
        return self._watch(prefix, start_revision)

    async def _watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchItem]:
        start, end = _range_bounds(prefix)
        next_revision = start_revision
        backoff = Backoff()
        while not self._closed.is_set():
            try:
                conn = self._connection()
            except StoreUnavailable:
                return
            call = conn.watch.Watch()
            resync = False
            try:
                await call.write(
                    rpc.WatchRequest(
                        create_request=rpc.WatchCreateRequest(
                            key=start,
                            range_end=end,
                            start_revision=next_revision,
                            prev_kv=True,
                            progress_notify=True,
                        )
                    )
                )
                while True:
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        raise _StreamEnded
                    if reply.compact_revision:
                        resync = True
                        break
                    if reply.created:
                        backoff.reset()
                        if next_revision == 0:
                            next_revision = int(reply.header.revision) + 1
                    if reply.canceled:
                        raise _StreamEnded
                    if reply.events:
                        events = tuple(_event(e) for e in reply.events)
                        revision = events[-1].kv.mod_revision
                        next_revision = revision + 1
                        yield WatchBatch(revision=revision, events=events)
                    elif not reply.created:
                        # Progress notification: nothing under the prefix up to this revision.
                        next_revision = max(next_revision, int(reply.header.revision) + 1)
            except (grpc.aio.AioRpcError, _StreamEnded) as exc:
                if self._closed.is_set():
                    return
                if isinstance(exc, grpc.aio.AioRpcError):
                    error = self._translate(conn, exc)
                    if not isinstance(error, StoreUnavailable):
                        raise error from exc
                else:
                    self._failed(conn)
                await self._sleep(backoff.next_delay())
                continue
            except asyncio.CancelledError:
                if self._closed.is_set() and _not_cancelled_by_caller():
                    return
                raise
            finally:
                call.cancel()
            if resync:
                snapshot = await self._resync(start, end, backoff)
                if snapshot is None:
                    return
                next_revision = snapshot.revision + 1
                yield snapshot

    async def _resync(self, start: bytes, end: bytes, backoff: Backoff) -> Resync | None:
        """A consistent snapshot of the range: one read at one revision. None if closed."""
        while not self._closed.is_set():
            try:
                reply = await self._unary("kv", "Range", rpc.RangeRequest(key=start, range_end=end), idempotent=True)
            except StoreUnavailable:
                await self._sleep(backoff.next_delay())
                continue
            return Resync(revision=int(reply.header.revision), kvs=tuple(_key_value(kv) for kv in reply.kvs))
        return None

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), delay)


class _StreamEnded(Exception):
    """etcd ended or cancelled a watch stream without an RPC error."""


def _conflict(key: str, expected: int, response: Any) -> CasConflict:
    kvs = response.response_range.kvs
    current = _key_value(kvs[0]) if kvs else None
    return CasConflict(key, expected, current.mod_revision if current else 0, current)


def _mod_revision_of(response: Any) -> int:
    kvs = response.response_range.kvs
    return int(kvs[0].mod_revision) if kvs else 0


def _not_cancelled_by_caller() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0
