"""The IKE relay's local transport: `IkeDatagramBatch` records on a Unix SOCK_SEQPACKET socket.

A keyexchange on the same host as its dataplane need not pay gRPC's per-message cost (HTTP/2
framing, the completion-queue poller thread, a coroutine hop each way) for every IKE datagram.
The dataplane listens on a Unix socket (`dataplane.ike_relay_socket`, mode 0600) and names it
with a random token in GetStatus (`ike_relay_socket`, `ike_relay_token`); a keyexchange that
reaches the dataplane over gRPC asks GetStatus, connects, says which instance it is and
checks that the token the socket answers with is the one GetStatus named (the same path on
another host, a stale file: it keeps using gRPC). After that the socket carries exactly what
a RelayIkeBatch stream carries, one serialized `IkeDatagramBatch` per record, and the
dataplane routes by instance the same way.

Handshake: client -> server one record, the instance name (UTF-8, at most 255 bytes); server ->
client one record, the token (ASCII). Then records both ways until either side closes.

Install notices (v1.3): right after this node installed inbound SAs, the dataplane sends every
local client a record with `installed_child_sas` (and no datagrams). It is the in-band form of
the store ack `dataplane/acks/<child id>/<node>` (written just after, for restarts and other
readers): a keyexchange on this host releases the IKE_AUTH / CREATE_CHILD_SA response on the
first of the two, without the ack's commit and watch on the critical path. An older client
ignores the unknown field and waits for the store ack as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import DecodeError

from esplanade.v1 import dataplane_pb2

RECORD_MAX = 1 << 17  # receive buffer: a record never exceeds RECORD_PAYLOAD_TARGET + one datagram
RECORD_PAYLOAD_TARGET = 48 * 1024  # a record takes datagrams until their payloads reach this
SOCKET_BUFFER = 1 << 20  # SO_SNDBUF/SO_RCVBUF: a record must fit whole
INSTANCE_MAX = 255
TOKEN_BYTES = 16


def encode_records(datagrams: Iterable[dataplane_pb2.IkeDatagram]) -> list[bytes]:
    """The datagrams as records, in order; several to a record up to RECORD_PAYLOAD_TARGET."""
    records: list[bytes] = []
    batch: list[dataplane_pb2.IkeDatagram] = []
    size = 0
    for datagram in datagrams:
        if batch and size + len(datagram.payload) > RECORD_PAYLOAD_TARGET:
            records.append(dataplane_pb2.IkeDatagramBatch(datagrams=batch).SerializeToString())
            batch, size = [], 0
        batch.append(datagram)
        size += len(datagram.payload)
    if batch:
        records.append(dataplane_pb2.IkeDatagramBatch(datagrams=batch).SerializeToString())
    return records


def encode_installed(child_ids: Iterable[str]) -> bytes:
    """One record telling keyexchange these Child SAs' inbound SAs are installed."""
    return dataplane_pb2.IkeDatagramBatch(installed_child_sas=list(child_ids)).SerializeToString()


def decode_record(record: bytes) -> dataplane_pb2.IkeDatagramBatch | None:
    """One record (datagrams and/or installed Child SAs); None if it is not an IkeDatagramBatch."""
    try:
        return dataplane_pb2.IkeDatagramBatch.FromString(record)
    except DecodeError:
        return None
