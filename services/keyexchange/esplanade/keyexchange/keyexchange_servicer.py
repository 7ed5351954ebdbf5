"""The `esplanade.v1.KeyExchange` gRPC service.

Errors: a bad document -> INVALID_ARGUMENT naming the field (`connections.x.proposals: ...`);
a lost compare-and-swap -> ABORTED; an unknown connection, child or SA -> NOT_FOUND; the
store down -> UNAVAILABLE. No reply or error message ever carries a secret.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format, struct_pb2

from esplanade.keyexchange.connection_documents import DocumentError, document_from_request
from esplanade.keyexchange.ikev2.ike_sa import IkeState
from esplanade.keyexchange.sa_listing import Clock, ike_info
from esplanade.store.base import CasConflict, StoreError
from esplanade.v1 import keyexchange_pb2, keyexchange_pb2_grpc

if TYPE_CHECKING:
    from esplanade.keyexchange.service import KeyExchangeNode

log = logging.getLogger(__name__)


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


class KeyExchangeServicer(keyexchange_pb2_grpc.KeyExchangeServicer):
    def __init__(self, node: KeyExchangeNode) -> None:
        self.node = node

    async def LoadConnection(
        self, request: keyexchange_pb2.LoadConnectionRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.LoadConnectionResponse:
        document = document_from_request(json_format.MessageToDict(request.config))
        try:
            if request.validate_only:
                self.node.catalog.validate(request.name, document)
                return keyexchange_pb2.LoadConnectionResponse(revision=0)
            revision = await self.node.catalog.save(request.name, document, request.expect_revision)
        except DocumentError as exc:
            context.set_trailing_metadata((("esplanade-field", exc.field),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except CasConflict as exc:
            await context.abort(grpc.StatusCode.ABORTED, f"connection {request.name} changed meanwhile: {exc}")
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {type(exc).__name__}")
        return keyexchange_pb2.LoadConnectionResponse(revision=revision)

    async def LoadPool(
        self, request: keyexchange_pb2.LoadPoolRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.LoadPoolResponse:
        document = json_format.MessageToDict(request.config)
        try:
            revision = await self.node.catalog.save_pool(request.name, document)
        except DocumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {type(exc).__name__}")
        return keyexchange_pb2.LoadPoolResponse(revision=revision)

    async def UnloadConnection(
        self, request: keyexchange_pb2.UnloadConnectionRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.UnloadConnectionResponse:
        try:
            existed = await self.node.catalog.delete(request.name)
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {type(exc).__name__}")
        if not existed:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no connection {request.name!r}")
        return keyexchange_pb2.UnloadConnectionResponse()

    async def ListConnections(
        self, request: keyexchange_pb2.ListConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.ListConnectionsResponse:
        try:
            listing = await self.node.catalog.listing()
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {type(exc).__name__}")
        return keyexchange_pb2.ListConnectionsResponse(
            connections=[keyexchange_pb2.Connection(name=n, config=_struct(d), revision=r) for n, d, r in listing]
        )

    async def Initiate(
        self, request: keyexchange_pb2.InitiateRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.InitiateResponse:
        try:
            ike = self.node.engine.initiate(request.connection, request.child)
            self.node.spans.begin(ike)  # the negotiation joins the caller's trace
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "not found")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return keyexchange_pb2.InitiateResponse(ike_sa=ike)

    async def Terminate(
        self, request: keyexchange_pb2.TerminateRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.TerminateResponse:
        engine = self.node.engine
        d = engine.dispatcher
        try:
            if request.child_sa:
                sa = engine.ike_of_child(request.child_sa)
                engine.call(d.delete_child, sa.id, request.child_sa)
                return keyexchange_pb2.TerminateResponse(terminated=1)
            if request.ike_sa:
                engine.ike_sa(request.ike_sa)
                engine.call(d.delete_ike, request.ike_sa)
                return keyexchange_pb2.TerminateResponse(terminated=1)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "not found")
        if not request.connection:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name one of ike_sa, child_sa or connection")
        doomed = [
            sa.id for sa in d.sas.values() if sa.config.name == request.connection and sa.state != IkeState.DELETED
        ]
        for ike_id in doomed:
            engine.call(d.delete_ike, ike_id)
        return keyexchange_pb2.TerminateResponse(terminated=len(doomed))

    async def Rekey(
        self, request: keyexchange_pb2.RekeyRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.RekeyResponse:
        engine = self.node.engine
        d = engine.dispatcher
        try:
            if request.child_sa:
                sa = engine.ike_of_child(request.child_sa)
                engine.call(d.rekey_child, sa.id, request.child_sa)
            elif request.ike_sa:
                engine.ike_sa(request.ike_sa)
                engine.call(d.reauth if request.reauth else d.rekey_ike, request.ike_sa)
            else:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name ike_sa or child_sa")
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "not found")
        return keyexchange_pb2.RekeyResponse()

    async def ListSas(
        self, request: keyexchange_pb2.ListSasRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.ListSasResponse:
        node = self.node
        fresh = await node.follower.read_counters()
        counters = {**node.follower.counters, **fresh}
        clock = Clock(node.engine.now)
        reqids = {cid: w.record.inbound.reqid for cid, w in node.handoff.written.items()}
        sas = [
            ike_info(sa, counters, clock, node.instance, reqids)
            for sa in list(node.engine.dispatcher.sas.values())
            if not request.connection or sa.config.name == request.connection
        ]
        return keyexchange_pb2.ListSasResponse(ike_sas=sas)

    async def WatchEvents(
        self, request: keyexchange_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[keyexchange_pb2.KeyExchangeEvent]:
        async for ev in self.node.feed.watch():
            yield ev

    async def ListTunnels(
        self, request: keyexchange_pb2.ListTunnelsRequest, context: grpc.aio.ServicerContext
    ) -> keyexchange_pb2.ListTunnelsResponse:
        return keyexchange_pb2.ListTunnelsResponse(
            tunnels=[
                keyexchange_pb2.Tunnel(
                    connection=t.connection,
                    up=t.up,
                    reason=t.reason,
                    ike_sas=t.ike_sas,
                    child_sas=t.child_sas,
                    since=t.since,
                )
                for t in self.node.tunnels.states()
            ]
        )
