"""Test-only keyexchange and dataplane gRPC servicers: enough state to drive live operations.

They follow the gRPC contract (proto/esplanade/v1) and the API's expectations of it:
LoadConnection(validate_only) refuses a document whose proposals contain "bogus" with
INVALID_ARGUMENT "connections.<name>.proposals: ..." (keyexchange's ConfigError form).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import grpc

from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc, ipsec_pb2, keyexchange_pb2, keyexchange_pb2_grpc


class FakeKeyExchange(keyexchange_pb2_grpc.KeyExchangeServicer):
    def __init__(self) -> None:
        self.sas: dict[str, keyexchange_pb2.IkeSaInfo] = {}
        self.loaded: dict[str, dict[str, Any]] = {}
        self.watchers: list[asyncio.Queue[keyexchange_pb2.KeyExchangeEvent]] = []
        self.numbers = itertools.count(1)

    def _event(self, kind: str, sa: keyexchange_pb2.IkeSaInfo, child: str = "") -> None:
        event = keyexchange_pb2.KeyExchangeEvent(
            time=time.time(), kind=kind, connection=sa.connection, ike_sa=sa.id, child_sa=child
        )
        for queue in self.watchers:
            queue.put_nowait(event)

    async def LoadConnection(self, request: Any, context: Any) -> keyexchange_pb2.LoadConnectionResponse:
        config = dict(request.config)
        proposals = list(config.get("proposals", []))
        if any("bogus" in p for p in proposals):
            field = f"connections.{request.name}.proposals"
            context.set_trailing_metadata((("esplanade-field", field),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: unknown algorithm 'bogus'")
        if not request.validate_only:
            self.loaded[request.name] = config
        return keyexchange_pb2.LoadConnectionResponse(revision=0)

    async def UnloadConnection(self, request: Any, context: Any) -> keyexchange_pb2.UnloadConnectionResponse:
        self.loaded.pop(request.name, None)
        return keyexchange_pb2.UnloadConnectionResponse()

    async def ListConnections(self, request: Any, context: Any) -> keyexchange_pb2.ListConnectionsResponse:
        return keyexchange_pb2.ListConnectionsResponse()

    async def Initiate(self, request: Any, context: Any) -> keyexchange_pb2.InitiateResponse:
        n = next(self.numbers)
        sa_id = f"ike-{n}"
        child = keyexchange_pb2.ChildSaInfo(
            id=f"child-{n}",
            name=request.child or "net",
            state="INSTALLED",
            spi_in=0xC0000000 + n,
            spi_out=0xD0000000 + n,
            mode="TUNNEL",
            protocol="ESP",
            encr="AES_GCM_16-256",
            local_ts=["10.1.0.0/16"],
            remote_ts=["10.2.0.0/16"],
            bytes_in=1000 * n,
            bytes_out=2000 * n,
            packets_in=10 * n,
            packets_out=20 * n,
            established_at=time.time(),
            udp_encap=True,
        )
        sa = keyexchange_pb2.IkeSaInfo(
            id=sa_id,
            connection=request.connection,
            state="ESTABLISHED",
            initiator=True,
            local_addr="192.0.2.1",
            local_port=4500,
            remote_addr="192.0.2.2",
            remote_port=4500,
            local_id="gw1.example.com",
            remote_id="gw2.example.com",
            spi_i=f"{n:016x}",
            spi_r=f"{n + 100:016x}",
            encr="AES_GCM_16-256",
            prf="PRF_HMAC_SHA2_256",
            ke="ECP_256",
            established_at=time.time(),
            children=[child],
        )
        self.sas[sa_id] = sa
        self._event("ike_up", sa)
        self._event("child_up", sa, child.id)
        return keyexchange_pb2.InitiateResponse(ike_sa=sa_id)

    async def Terminate(self, request: Any, context: Any) -> keyexchange_pb2.TerminateResponse:
        if request.ike_sa:
            sa = self.sas.pop(request.ike_sa, None)
            if sa is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no IKE SA {request.ike_sa}")
            assert sa is not None
            self._event("ike_down", sa)
            return keyexchange_pb2.TerminateResponse(terminated=1)
        for sa in self.sas.values():
            for child in sa.children:
                if child.id == request.child_sa:
                    self._event("child_down", sa, child.id)
                    return keyexchange_pb2.TerminateResponse(terminated=1)
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such SA")
        raise AssertionError

    async def Rekey(self, request: Any, context: Any) -> keyexchange_pb2.RekeyResponse:
        if request.ike_sa and request.ike_sa in self.sas:
            self._event("ike_rekeyed", self.sas[request.ike_sa])
            return keyexchange_pb2.RekeyResponse()
        for sa in self.sas.values():
            for child in sa.children:
                if child.id == request.child_sa:
                    self._event("child_rekeyed", sa, child.id)
                    return keyexchange_pb2.RekeyResponse()
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such SA")
        raise AssertionError

    async def ListSas(self, request: Any, context: Any) -> keyexchange_pb2.ListSasResponse:
        sas = [s for s in self.sas.values() if not request.connection or s.connection == request.connection]
        return keyexchange_pb2.ListSasResponse(ike_sas=sas)

    async def ListTunnels(self, request: Any, context: Any) -> keyexchange_pb2.ListTunnelsResponse:
        up = {s.connection for s in self.sas.values()}
        return keyexchange_pb2.ListTunnelsResponse(
            tunnels=[
                keyexchange_pb2.Tunnel(
                    connection="gw", up="gw" in up, reason="established" if "gw" in up else "not initiated"
                ),
                keyexchange_pb2.Tunnel(
                    connection="dead", up=False, reason="IKE_SA_INIT failed: TIMEOUT (peer did not answer)"
                ),
            ]
        )

    async def WatchEvents(self, request: Any, context: Any) -> Any:
        queue: asyncio.Queue[keyexchange_pb2.KeyExchangeEvent] = asyncio.Queue()
        self.watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.watchers.remove(queue)


class FakeDataplane(dataplane_pb2_grpc.DataplaneServicer):
    async def GetCounters(self, request: Any, context: Any) -> dataplane_pb2.GetCountersResponse:
        sas = [
            ipsec_pb2.SaCounters(
                child_sa=request.child_sa or "child-1", spi=0xC0000001, direction=1, packets=5, bytes=500
            )
        ]
        drops = [ipsec_pb2.DropCounter(reason="replay", packets=2)]
        return dataplane_pb2.GetCountersResponse(sas=sas, drops=drops, node="node-a")

    async def GetStatus(self, request: Any, context: Any) -> dataplane_pb2.GetStatusResponse:
        return dataplane_pb2.GetStatusResponse(node="node-a", backend="userspace")

    FLOWS = (
        dataplane_pb2.FlowRecord(
            id=1, start=1000.0, end=1010.0, identity="alice", resource="wiki", connection="gw",
            src="10.0.0.2", dst="10.1.0.5", protocol=6, src_port=40000, dst_port=443, direction="out",
            bytes=5000, packets=10, decision="allow", node="node-a", flows=1,
        ),
        dataplane_pb2.FlowRecord(
            id=2, start=1020.0, end=1030.0, identity="bob", resource="db", connection="gw",
            src="10.0.0.3", dst="10.1.0.6", protocol=6, src_port=40001, dst_port=5432, direction="out",
            bytes=60, packets=1, decision="deny", node="node-a", flows=1,
        ),
        dataplane_pb2.FlowRecord(  # still running, far in the future: always among the top talkers
            id=0, start=4e9, end=4e9, identity="carol", resource="wiki", connection="gw",
            src="10.0.0.4", dst="10.1.0.5", protocol=6, src_port=40002, dst_port=443, direction="out",
            bytes=90000, packets=70, decision="allow", node="node-a", flows=1,
        ),
    )  # fmt: skip

    async def QueryFlows(self, request: Any, context: Any) -> dataplane_pb2.QueryFlowsResponse:
        flows = [
            f
            for f in self.FLOWS
            if (f.id > request.after_id or (f.id == 0 and request.include_active))
            and (not request.identity or f.identity == request.identity)
            and (not request.resource or f.resource == request.resource)
            and (not request.decision or f.decision == request.decision)
            and (not request.since or f.end >= request.since)
            and (not request.until or f.end < request.until)
        ]
        return dataplane_pb2.QueryFlowsResponse(flows=flows, node="node-a")

    async def WatchEvents(self, request: Any, context: Any) -> Any:
        await asyncio.Event().wait()
        yield dataplane_pb2.DataplaneEvent()  # never reached
