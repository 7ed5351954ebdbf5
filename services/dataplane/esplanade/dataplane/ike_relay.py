"""The IKE relay: the dataplane owns UDP 500 and 4500, keyexchange speaks IKE over gRPC.

The kernel hands IKE that arrives on a UDP_ENCAP_ESPINUDP socket to its daemon; here the
dataplane does the same for keyexchange. Datagrams from the network (UDP 500, and UDP 4500
behind the non-ESP marker, which is removed) go to one connected `RelayIke` stream, with the
addresses and ports they came from and reached; datagrams keyexchange sends on its stream
leave from the local port it names (500 as they are, 4500 with the marker added; a payload
of the single byte 0xFF on 4500 is a NAT keep-alive and leaves without it, RFC 3948 §2.3).

Routing over several connected keyexchange instances: every message of an IKE SA carries
the initiator's SPI (the first 8 bytes of the IKE header, RFC 7296 §3.1). If an owner record
(`keyexchange/owners/<ike id>`, followed by `IkeOwnerRoutes`) names the instance holding the
IKE SA with that SPI and its stream is connected, the datagram goes there. Otherwise the
stream is picked by rendezvous hashing of the SPI over the connected streams
(`esplanade.cluster.rendezvous.choose(spi.hex(), stream keys)`): new IKE SAs spread over the
instances, an instance that initiates picks SPIs that hash to itself, and after an instance
died the survivor that takes an IKE SA over is the same rendezvous winner (over the live
instances). A stream's key is the `esplanade-instance` metadata of the call (the instance
name, stable across reconnects), or a per-connection token.

Nothing here parses IKE beyond those 8 bytes; anything shorter is dropped and counted.

Two stream shapes carry the same datagrams: `RelayIke` (one datagram per message) and
`RelayIkeBatch` (each message holds every datagram queued for the stream at that moment, so
a busy relay sends a few messages instead of many). A stream's queue is the same for both.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from esplanade.cluster.rendezvous import choose
from esplanade.v1 import dataplane_pb2

log = logging.getLogger(__name__)

STREAM_QUEUE = 1024
BATCH_MAX = 64  # datagrams per RelayIkeBatch message
IKE_SPI_BYTES = 8

# (local address, remote address, remote port, message) -> sent?
IkeSender = Callable[[str, str, int, bytes], Awaitable[bool]]


@dataclass(eq=False)
class RelayStream:
    key: str
    # datagrams for the client; None marks the end (the client closed its side)
    queue: asyncio.Queue[dataplane_pb2.IkeDatagram | None] = field(default_factory=lambda: asyncio.Queue(STREAM_QUEUE))
    delivered: int = 0

    async def next_batch(self, limit: int = BATCH_MAX) -> list[dataplane_pb2.IkeDatagram] | None:
        """Wait for a datagram, then take it with whatever else is queued (up to `limit`);
        None once the stream was closed."""
        first = await self.queue.get()
        if first is None:
            return None
        batch = [first]
        queue = self.queue
        while len(batch) < limit and not queue.empty():
            item = queue.get_nowait()
            if item is None:
                queue.put_nowait(None)  # end after this batch
                break
            batch.append(item)
        return batch

    def close(self) -> None:
        """The client is done sending: what waits for datagrams ends."""
        if self.queue.full():
            self.queue.get_nowait()  # the stream ends: its oldest datagram would not leave anyway
        self.queue.put_nowait(None)


class IkeRelay:
    def __init__(self, ike_port: int = 500, natt_port: int = 4500) -> None:
        self.ike_port = ike_port
        self.natt_port = natt_port
        self._streams: dict[int, RelayStream] = {}
        self._tokens = itertools.count(1)
        self._senders: dict[int, IkeSender] = {}
        self.counters: Counter[str] = Counter()
        self.owners: dict[bytes, str] = {}  # IKE initiator SPI -> instance holding the IKE SA

    # -- streams ------------------------------------------------------------------------
    def attach(self, key: str = "") -> RelayStream:
        token = next(self._tokens)
        stream = RelayStream(key or f"stream-{token}")
        self._streams[token] = stream
        self.counters["streams_attached"] += 1
        return stream

    def detach(self, stream: RelayStream) -> None:
        for token, candidate in list(self._streams.items()):
            if candidate is stream:
                del self._streams[token]

    @property
    def connected(self) -> int:
        return len(self._streams)

    def choose(self, spi: bytes) -> RelayStream | None:
        if len(self._streams) == 1:  # one keyexchange (the usual case): no owner or hash to weigh
            return next(iter(self._streams.values()))
        by_key = {stream.key: stream for stream in self._streams.values()}  # the newest stream of a key
        owner = self.owners.get(spi)
        if owner is not None and owner in by_key:
            self.counters["routed_by_owner"] += 1
            return by_key[owner]
        key = choose(spi.hex(), list(by_key))
        return by_key[key] if key is not None else None

    # -- from the network ---------------------------------------------------------------
    def deliver(self, local_addr: str, local_port: int, remote_addr: str, remote_port: int, payload: bytes) -> None:
        """An IKE datagram arrived (marker already removed); hand it to its keyexchange stream."""
        port_name = "4500" if local_port == self.natt_port else "500"
        if len(payload) < IKE_SPI_BYTES:
            self.counters[f"dropped_runt_{port_name}"] += 1
            return
        stream = self.choose(payload[:IKE_SPI_BYTES])
        if stream is None:
            self.counters[f"dropped_no_client_{port_name}"] += 1
            return
        datagram = dataplane_pb2.IkeDatagram(
            local_addr=local_addr,
            local_port=local_port,
            remote_addr=remote_addr,
            remote_port=remote_port,
            payload=payload,
        )
        try:
            stream.queue.put_nowait(datagram)
        except asyncio.QueueFull:
            self.counters[f"dropped_client_slow_{port_name}"] += 1
            return
        stream.delivered += 1
        self.counters[f"received_{port_name}"] += 1

    # -- to the network -----------------------------------------------------------------
    def set_sender(self, port: int, sender: IkeSender) -> None:
        self._senders[port] = sender

    async def send(self, datagram: dataplane_pb2.IkeDatagram) -> bool:
        sender = self._senders.get(datagram.local_port)
        if sender is None:
            self.counters["dropped_bad_local_port"] += 1
            return False
        if not datagram.remote_addr or not 0 < datagram.remote_port < 65536 or not datagram.payload:
            self.counters["dropped_malformed_send"] += 1
            return False
        ok = await sender(datagram.local_addr, datagram.remote_addr, datagram.remote_port, bytes(datagram.payload))
        name = "4500" if datagram.local_port == self.natt_port else "500"
        self.counters[f"sent_{name}" if ok else f"send_failed_{name}"] += 1
        return ok

    def status(self) -> dict[str, str]:
        out = {f"relay_{k}": str(v) for k, v in sorted(self.counters.items())}
        out["relay_clients"] = str(self.connected)
        return out
