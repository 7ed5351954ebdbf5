"""/api/v1/flows (the dataplane's flow log) and /api/v1/status (the platform at a glance).

The audit log is /api/v1/audit (`tokens_audit`). Flows live on the dataplane node that saw
them (a bounded local journal, never in the store); this API asks the dataplane for them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from esplanade.api.auth import Scope
from esplanade.api.conventions import ApiContext, Context, Cursor, Limit, decode_cursor, encode_cursor, scoped
from esplanade.api.problems import ProblemError, problem_responses
from esplanade.api.service_clients import call
from esplanade.store import schema
from esplanade.v1 import dataplane_pb2, keyexchange_pb2

router = APIRouter(tags=["observability"])
TOP_TALKERS = 5
TOP_TALKER_WINDOW = 3600.0  # seconds of flows that count toward the top talkers


class FlowView(BaseModel):
    id: int = Field(description="0 for a flow still running (include_active).")
    start: float
    end: float
    identity: str
    resource: str
    connection: str
    src: str
    dst: str
    protocol: int
    src_port: int
    dst_port: int
    direction: str
    bytes: int
    packets: int
    decision: str
    reason: str
    node: str
    flows: int = Field(description=">1: an aggregate of this many flows (flood protection).")


class FlowPage(BaseModel):
    items: list[FlowView]
    next_cursor: str | None = None


def flow_view(f: dataplane_pb2.FlowRecord) -> dict[str, Any]:
    return {name: getattr(f, name) for name in FlowView.model_fields}


async def query_flows(ctx: ApiContext, request: dataplane_pb2.QueryFlowsRequest) -> dataplane_pb2.QueryFlowsResponse:
    return await call("dataplane", ctx.clients.dataplane.QueryFlows(request))


Text = Annotated[str | None, Query(max_length=256)]


@router.get(
    "/api/v1/flows",
    response_model=FlowPage,
    operation_id="list_flows",
    responses=problem_responses(503),
    **scoped(Scope.READ_ONLY),
)
async def list_flows(
    ctx: Context,
    limit: Limit = 100,
    cursor: Cursor = None,
    identity: Text = None,
    resource: Text = None,
    decision: Annotated[str | None, Query(pattern=r"^(allow|deny)$")] = None,
    connection: Text = None,
    since: Annotated[float | None, Query(ge=0, le=1e11, description="Flows that ended at or after (POSIX s).")] = None,
    until: Annotated[float | None, Query(ge=0, le=1e11, description="Flows that ended before (POSIX s).")] = None,
    active: Annotated[bool, Query(description="Also the flows still running (on the last page).")] = False,
) -> Any:
    """The flow log of the dataplane: per identity, resource and flow, oldest first."""
    after = decode_cursor(cursor)
    if after and not after.isdigit():
        raise ProblemError(422, "the cursor is not one this API gave out", [("query.cursor", "invalid")])
    request = dataplane_pb2.QueryFlowsRequest(
        identity=identity or "",
        resource=resource or "",
        decision=decision or "",
        connection=connection or "",
        since=since or 0.0,
        until=until or 0.0,
        after_id=int(after or 0),
        limit=min(limit, ctx.settings.api.max_page_size),
        include_active=active,
    )
    reply = await query_flows(ctx, request)
    return {
        "items": [flow_view(f) for f in reply.flows],
        "next_cursor": encode_cursor(str(reply.next_cursor)) if reply.next_cursor else None,
    }


# -- status --------------------------------------------------------------------------------------
class TunnelView(BaseModel):
    connection: str
    up: bool
    reason: str
    ike_sas: int
    child_sas: int
    since: float


class TalkerView(BaseModel):
    identity: str
    connection: str
    bytes: int
    packets: int


class StatusView(BaseModel):
    services: dict[str, str] = Field(description="SERVING, NOT_SERVING or unreachable, per service and the store.")
    nodes: list[dict[str, Any]]
    tunnels: list[TunnelView]
    top_talkers: list[TalkerView] = Field(description="Most bytes in the last hour, by identity and connection.")
    errors: list[str] = Field(description="Parts of the status that could not be read.")


async def _tunnels(ctx: ApiContext) -> list[dict[str, Any]]:
    reply = await ctx.clients.keyexchange.ListTunnels(keyexchange_pb2.ListTunnelsRequest())
    return [
        {
            "connection": t.connection,
            "up": t.up,
            "reason": t.reason,
            "ike_sas": t.ike_sas,
            "child_sas": t.child_sas,
            "since": t.since,
        }
        for t in reply.tunnels
    ]


async def _top_talkers(ctx: ApiContext) -> list[dict[str, Any]]:
    since = time.time() - TOP_TALKER_WINDOW
    totals: dict[tuple[str, str], list[int]] = {}
    after = 0
    for _ in range(20):  # at most 20k flow records: a bound on the work of one status call
        request = dataplane_pb2.QueryFlowsRequest(since=since, after_id=after, limit=1000, include_active=True)
        reply = await ctx.clients.dataplane.QueryFlows(request)
        for f in reply.flows:
            entry = totals.setdefault((f.identity, f.connection), [0, 0])
            entry[0] += f.bytes
            entry[1] += f.packets
        if not reply.next_cursor:
            break
        after = reply.next_cursor
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:TOP_TALKERS]
    return [{"identity": i, "connection": c, "bytes": b, "packets": p} for (i, c), (b, p) in ranked]


async def _nodes(ctx: ApiContext) -> list[dict[str, Any]]:
    prefix = schema.prefix("dataplane", "nodes")
    kvs, _ = await ctx.store.range(prefix)
    nodes = []
    for kv in kvs:
        try:
            doc = json.loads(kv.value)
        except ValueError:
            doc = {}
        nodes.append(
            {"name": kv.key[len(prefix) :], "backend": doc.get("backend", "") if isinstance(doc, dict) else ""}
        )
    return nodes


@router.get("/api/v1/status", response_model=StatusView, operation_id="get_status", **scoped(Scope.READ_ONLY))
async def get_status(ctx: Context) -> Any:
    """Services, dataplane nodes, tunnels up or down and why, and the top talkers. Parts that
    cannot be read are named in `errors`; the rest is still shown."""
    checks = ctx.readiness.check() if ctx.readiness is not None else asyncio.sleep(0, {})
    results = await asyncio.gather(checks, _nodes(ctx), _tunnels(ctx), _top_talkers(ctx), return_exceptions=True)
    parts = ("services", "nodes", "tunnels", "top_talkers")
    status: dict[str, Any] = {"errors": []}
    for name, result in zip(parts, results, strict=True):
        if isinstance(result, BaseException):
            detail = result.code().name if isinstance(result, grpc.aio.AioRpcError) else type(result).__name__
            status["errors"].append(f"{name}: {detail}")
            status[name] = {} if name == "services" else []
        else:
            status[name] = result
    return status
