"""Live state through keyexchange and dataplane: SAs, actions on them, counters, nodes.

Actions (initiate, terminate, rekey) finish later: they answer 202 with a Location to poll
(`/api/v1/sas/{id}`) and show up on the event stream (`/api/v1/events`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from esplanade.api.auth import Scope
from esplanade.api.connection_models import NAME_PATTERN
from esplanade.api.conventions import ApiContext, Context, Cursor, Limit, Page, note_change, page_of, scoped
from esplanade.api.problems import ProblemError, problem_responses
from esplanade.api.service_clients import call
from esplanade.store import schema
from esplanade.v1 import dataplane_pb2, ipsec_pb2, keyexchange_pb2

router = APIRouter(tags=["live"])
SA_ID = r"^[A-Za-z0-9._:-]{1,128}$"
SaId = Annotated[str, Path(pattern=SA_ID)]


class ChildSaView(BaseModel):
    id: str
    name: str
    state: str
    spi_in: str
    spi_out: str
    mode: str
    protocol: str
    encap: bool
    proposal: str
    local_ts: list[str]
    remote_ts: list[str]
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    established_at: float
    rekey_at: float
    expire_at: float
    node: str = Field("", description="Dataplane node carrying this Child SA (its owner record; scale-out).")


class IkeSaView(BaseModel):
    id: str
    connection: str
    state: str
    initiator: bool
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    local_id: str
    remote_id: str
    spi_i: str
    spi_r: str
    proposal: str
    nat_local: bool
    nat_remote: bool
    established_at: float
    rekey_at: float
    reauth_at: float
    virtual_ips: list[str]
    owner: str
    children: list[ChildSaView]


def _proposal(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def child_view(c: keyexchange_pb2.ChildSaInfo) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "state": c.state,
        "spi_in": f"{c.spi_in:08x}",
        "spi_out": f"{c.spi_out:08x}",
        "mode": c.mode,
        "protocol": c.protocol,
        "encap": c.udp_encap,
        "proposal": _proposal(c.encr, c.integ, c.ke),
        "local_ts": list(c.local_ts),
        "remote_ts": list(c.remote_ts),
        "bytes_in": c.bytes_in,
        "bytes_out": c.bytes_out,
        "packets_in": c.packets_in,
        "packets_out": c.packets_out,
        "established_at": c.established_at,
        "rekey_at": c.rekey_at,
        "expire_at": c.expire_at,
    }


def ike_view(s: keyexchange_pb2.IkeSaInfo) -> dict[str, Any]:
    return {
        "id": s.id,
        "connection": s.connection,
        "state": s.state,
        "initiator": s.initiator,
        "local_addr": s.local_addr,
        "local_port": s.local_port,
        "remote_addr": s.remote_addr,
        "remote_port": s.remote_port,
        "local_id": s.local_id,
        "remote_id": s.remote_id,
        "spi_i": s.spi_i,
        "spi_r": s.spi_r,
        "proposal": _proposal(s.encr, s.integ, s.prf, s.ke, *s.additional_ke),
        "nat_local": s.nat_local,
        "nat_remote": s.nat_remote,
        "established_at": s.established_at,
        "rekey_at": s.rekey_at,
        "reauth_at": s.reauth_at,
        "virtual_ips": list(s.virtual_ips),
        "owner": s.owner,
        "children": [child_view(c) for c in s.children],
    }


async def dataplane_owners(ctx: ApiContext) -> dict[str, str]:
    """Child SA id -> the dataplane node carrying it: `dataplane/owners/` (scale-out), else the install acks."""
    owners_prefix = schema.prefix("dataplane", "owners")
    kvs, _ = await ctx.store.range(owners_prefix)
    owners = {kv.key[len(owners_prefix) :]: str(_json_object(kv.value).get("node", "")) for kv in kvs}
    acks_prefix = schema.prefix("dataplane", "acks")
    acks, _ = await ctx.store.range(acks_prefix)
    for kv in acks:
        child, _, node = kv.key[len(acks_prefix) :].rpartition("/")
        owners.setdefault(child, node)
    return owners


async def list_sas(ctx: ApiContext, connection: str = "") -> list[dict[str, Any]]:
    reply = await call(
        "keyexchange", ctx.clients.keyexchange.ListSas(keyexchange_pb2.ListSasRequest(connection=connection))
    )
    views = [ike_view(s) for s in reply.ike_sas]
    owners = await dataplane_owners(ctx)
    for view in views:
        for child in view["children"]:
            child["node"] = owners.get(child["id"], "")
    return views


async def find_sa(ctx: ApiContext, sa_id: str) -> dict[str, Any]:
    for sa in await list_sas(ctx):
        if sa["id"] == sa_id:
            return sa
    raise ProblemError(404, f"no IKE SA '{sa_id}'")


@router.get("/api/v1/sas", response_model=Page[IkeSaView], operation_id="list_sas", **scoped(Scope.READ_ONLY))
async def get_sas(
    ctx: Context,
    limit: Limit = 100,
    cursor: Cursor = None,
    connection: Annotated[str | None, Query(max_length=64, pattern=NAME_PATTERN)] = None,
    state: Annotated[str | None, Query(max_length=32)] = None,
) -> Any:
    """IKE SAs with their Child SAs (what `swanctl --list-sas` shows)."""
    sas = await list_sas(ctx, connection or "")
    if state:
        sas = [s for s in sas if s["state"].lower() == state.lower()]
    return page_of(sas, lambda s: s["id"], limit, cursor, ctx.settings.api.max_page_size)


@router.get(
    "/api/v1/sas/{sa_id}",
    response_model=IkeSaView,
    operation_id="get_sa",
    responses=problem_responses(404, 503),
    **scoped(Scope.READ_ONLY),
)
async def get_sa(sa_id: SaId, ctx: Context) -> Any:
    return await find_sa(ctx, sa_id)


class Accepted(BaseModel):
    status: str = Field(description="What was started: initiating, terminating, rekeying.")
    ike_sa: str = ""
    child_sa: str = ""
    location: str = ""


class InitiateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    child: Annotated[str, Field(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")] = Field(
        "", description="The child to bring up; empty: every child."
    )


class RekeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reauth: bool = Field(False, description="Reauthenticate the IKE SA instead of rekeying it.")


def accepted(response: Response, request: Request, status: str, ike_sa: str = "", child_sa: str = "") -> dict[str, Any]:
    location = f"/api/v1/sas/{ike_sa}" if ike_sa else "/api/v1/events"
    response.headers["Location"] = location
    body = {"status": status, "ike_sa": ike_sa, "child_sa": child_sa, "location": location}
    note_change(request, None, body)
    return body


@router.post(
    "/api/v1/connections/{name}/initiate",
    status_code=202,
    response_model=Accepted,
    operation_id="initiate",
    responses=problem_responses(404, 409, 422, 503),
    **scoped(Scope.OPERATOR),
)
async def initiate(
    name: Annotated[str, Path(pattern=NAME_PATTERN)],
    body: InitiateBody,
    request: Request,
    response: Response,
    ctx: Context,
) -> Any:
    """Bring a connection (or one child) up; 202 with the IKE SA to poll."""
    if await ctx.store.get(schema.connection(name)) is None:
        raise ProblemError(404, f"connection '{name}' does not exist")
    reply = await call(
        "keyexchange",
        ctx.clients.keyexchange.Initiate(keyexchange_pb2.InitiateRequest(connection=name, child=body.child)),
        not_found=f"connection '{name}' is not loaded by keyexchange",
    )
    return accepted(response, request, "initiating", reply.ike_sa)


@router.post(
    "/api/v1/sas/{sa_id}/terminate",
    status_code=202,
    response_model=Accepted,
    operation_id="terminate_sa",
    responses=problem_responses(404, 503),
    **scoped(Scope.OPERATOR),
)
async def terminate_sa(sa_id: SaId, request: Request, response: Response, ctx: Context) -> Any:
    """Delete an IKE SA and its children (INFORMATIONAL delete to the peer)."""
    await call(
        "keyexchange",
        ctx.clients.keyexchange.Terminate(keyexchange_pb2.TerminateRequest(ike_sa=sa_id)),
        not_found=f"no IKE SA '{sa_id}'",
    )
    return accepted(response, request, "terminating", sa_id)


@router.post(
    "/api/v1/sas/{sa_id}/rekey",
    status_code=202,
    response_model=Accepted,
    operation_id="rekey_sa",
    responses=problem_responses(404, 503),
    **scoped(Scope.OPERATOR),
)
async def rekey_sa(sa_id: SaId, body: RekeyBody, request: Request, response: Response, ctx: Context) -> Any:
    await call(
        "keyexchange",
        ctx.clients.keyexchange.Rekey(keyexchange_pb2.RekeyRequest(ike_sa=sa_id, reauth=body.reauth)),
        not_found=f"no IKE SA '{sa_id}'",
    )
    return accepted(response, request, "rekeying", sa_id)


@router.post(
    "/api/v1/sas/{sa_id}/children/{child_sa}/terminate",
    status_code=202,
    response_model=Accepted,
    operation_id="terminate_child_sa",
    responses=problem_responses(404, 503),
    **scoped(Scope.OPERATOR),
)
async def terminate_child(
    sa_id: SaId, child_sa: Annotated[str, Path(pattern=SA_ID)], request: Request, response: Response, ctx: Context
) -> Any:
    await call(
        "keyexchange",
        ctx.clients.keyexchange.Terminate(keyexchange_pb2.TerminateRequest(child_sa=child_sa)),
        not_found=f"no Child SA '{child_sa}'",
    )
    return accepted(response, request, "terminating", sa_id, child_sa)


@router.post(
    "/api/v1/sas/{sa_id}/children/{child_sa}/rekey",
    status_code=202,
    response_model=Accepted,
    operation_id="rekey_child_sa",
    responses=problem_responses(404, 503),
    **scoped(Scope.OPERATOR),
)
async def rekey_child(
    sa_id: SaId, child_sa: Annotated[str, Path(pattern=SA_ID)], request: Request, response: Response, ctx: Context
) -> Any:
    await call(
        "keyexchange",
        ctx.clients.keyexchange.Rekey(keyexchange_pb2.RekeyRequest(child_sa=child_sa)),
        not_found=f"no Child SA '{child_sa}'",
    )
    return accepted(response, request, "rekeying", sa_id, child_sa)


# -- counters and nodes ------------------------------------------------------------------------
class SaCounterView(BaseModel):
    child_sa: str
    spi: str
    direction: str
    packets: int
    bytes: int
    owner: str


class DropView(BaseModel):
    reason: str
    packets: int


class CountersView(BaseModel):
    node: str
    sas: list[SaCounterView]
    drops: list[DropView]


def counters_view(reply: dataplane_pb2.GetCountersResponse) -> dict[str, Any]:
    return {
        "node": reply.node,
        "sas": [
            {
                "child_sa": c.child_sa,
                "spi": f"{c.spi:08x}",
                "direction": ipsec_pb2.Direction.Name(c.direction).removeprefix("DIRECTION_").lower(),
                "packets": c.packets,
                "bytes": c.bytes,
                "owner": c.owner,
            }
            for c in reply.sas
        ],
        "drops": [{"reason": d.reason, "packets": d.packets} for d in reply.drops],
    }


@router.get(
    "/api/v1/counters",
    response_model=CountersView,
    operation_id="get_counters",
    responses=problem_responses(503),
    **scoped(Scope.READ_ONLY),
)
async def get_counters(
    ctx: Context, child_sa: Annotated[str | None, Query(max_length=128, pattern=SA_ID)] = None
) -> Any:
    """Per-SA packet/byte counters and drop counters of the dataplane."""
    reply = await call(
        "dataplane", ctx.clients.dataplane.GetCounters(dataplane_pb2.GetCountersRequest(child_sa=child_sa or ""))
    )
    return counters_view(reply)


@router.get(
    "/api/v1/sas/{sa_id}/counters",
    response_model=CountersView,
    operation_id="get_sa_counters",
    responses=problem_responses(404, 503),
    **scoped(Scope.READ_ONLY),
)
async def get_sa_counters(sa_id: SaId, ctx: Context) -> Any:
    """Dataplane counters of every Child SA of one IKE SA."""
    sa = await find_sa(ctx, sa_id)
    merged: dict[str, Any] = {"node": "", "sas": [], "drops": []}
    for child in sa["children"]:
        reply = await call(
            "dataplane", ctx.clients.dataplane.GetCounters(dataplane_pb2.GetCountersRequest(child_sa=child["id"]))
        )
        view = counters_view(reply)
        merged["node"] = merged["node"] or view["node"]
        merged["sas"] += view["sas"]
    return merged


class NodeView(BaseModel):
    name: str
    document: dict[str, Any] = Field(description="What the node announced (backend, capacity, addresses).")
    revision: int
    owned_sas: int = Field(0, description="Child SAs whose owner record names this node (scale-out).")


@router.get("/api/v1/nodes", response_model=Page[NodeView], operation_id="list_nodes", **scoped(Scope.READ_ONLY))
async def list_nodes(ctx: Context, limit: Limit = 100, cursor: Cursor = None) -> Any:
    """Dataplane nodes that hold a live membership lease."""
    prefix = schema.prefix("dataplane", "nodes")
    kvs, _ = await ctx.store.range(prefix)
    owned = _owned_counts(await dataplane_owners(ctx))
    items = [
        {
            "name": kv.key[len(prefix) :],
            "document": _json_object(kv.value),
            "revision": kv.mod_revision,
            "owned_sas": owned.get(kv.key[len(prefix) :], 0),
        }
        for kv in kvs
    ]
    return page_of(items, lambda n: n["name"], limit, cursor, ctx.settings.api.max_page_size)


@router.get(
    "/api/v1/nodes/{node}",
    response_model=NodeView,
    operation_id="get_node",
    responses=problem_responses(404),
    **scoped(Scope.READ_ONLY),
)
async def get_node(node: Annotated[str, Path(pattern=NAME_PATTERN)], ctx: Context) -> Any:
    kv = await ctx.store.get(schema.dataplane_node(node))
    if kv is None:
        raise ProblemError(404, f"no dataplane node '{node}'")
    owned = _owned_counts(await dataplane_owners(ctx)).get(node, 0)
    return {"name": node, "document": _json_object(kv.value), "revision": kv.mod_revision, "owned_sas": owned}


def _owned_counts(owners: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in owners.values():
        counts[node] = counts.get(node, 0) + 1
    return counts


def _json_object(value: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(value)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {"value": doc}
