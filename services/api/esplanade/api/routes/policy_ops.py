"""/api/v1/policy: apply/diff a policy file, export, check a flow, what-if, compiled output."""

from __future__ import annotations

import ipaddress
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from google.protobuf import json_format

from esplanade.api.auth import Scope
from esplanade.api.conventions import ApiContext, Context, note_change, principal_of, scoped
from esplanade.api.policy_models import (
    ID_PATTERN,
    CheckBody,
    CompiledView,
    DecisionView,
    FlowFields,
    PolicyApplyBody,
    PolicyApplyResult,
    WhatIfBody,
    WhatIfView,
)
from esplanade.api.problems import ProblemError, problem_responses
from esplanade.api.service_clients import call
from esplanade.policy.decode import object_from_document
from esplanade.policy.diff import what_if
from esplanade.policy.evaluator import CheckContext, FiveTuple
from esplanade.policy.model import KINDS, Model
from esplanade.policy.policy_file import export_policy_yaml, load_policy_yaml
from esplanade.policy.problems import PolicyError, format_path
from esplanade.v1 import policy_pb2

router = APIRouter(prefix="/api/v1/policy", tags=["policy"])
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


def _result(reply: policy_pb2.ApplyResponse) -> dict[str, Any]:
    return {
        "applied": reply.applied,
        "revision": reply.revision,
        "changes": [
            {
                "action": c.action,
                "kind": c.kind,
                "id": c.id,
                "detail": c.detail,
                "fields": [
                    {"field": f.field, "old": json_format.MessageToDict(f.old), "new": json_format.MessageToDict(f.new)}
                    for f in c.fields
                ],
            }
            for c in reply.changes
        ],
        "affected_identities": list(reply.affected_identities),
    }


@router.post(
    "/apply",
    response_model=PolicyApplyResult,
    operation_id="apply_policy",
    responses=problem_responses(409, 422, 503),
    **scoped(Scope.ADMIN),
)
async def apply_policy(body: PolicyApplyBody, request: Request, ctx: Context) -> Any:
    """Make the stored policy equal this file, all or nothing (`dry_run`: only show the diff)."""
    reply = await call(
        "policy",
        ctx.clients.policy.Apply(
            policy_pb2.ApplyRequest(yaml=body.policy, dry_run=body.dry_run, actor=principal_of(request).actor)
        ),
    )
    result = _result(reply)
    note_change(request, None, {"applied": result["applied"], "changes": [c["detail"] for c in result["changes"]]})
    return result


@router.post(
    "/diff",
    response_model=PolicyApplyResult,
    operation_id="diff_policy",
    responses=problem_responses(422, 503),
    **scoped(Scope.READ_ONLY),
)
async def diff_policy(body: PolicyApplyBody, request: Request, ctx: Context) -> Any:
    """What applying this file would change (never writes; `dry_run` is ignored)."""
    reply = await call(
        "policy",
        ctx.clients.policy.Apply(
            policy_pb2.ApplyRequest(yaml=body.policy, dry_run=True, actor=principal_of(request).actor)
        ),
    )
    return _result(reply)


async def current_model(ctx: ApiContext) -> Model:
    objects = []
    for kind in KINDS:
        token = ""
        while True:
            reply = await call(
                "policy",
                ctx.clients.policy.ListObjects(
                    policy_pb2.ListObjectsRequest(kind=kind, page_size=1000, page_token=token)
                ),
            )
            for obj in reply.objects:
                document = json_format.MessageToDict(obj.document)
                for key in ("ports", "icmp_types"):
                    if key in document:
                        document[key] = [int(v) if isinstance(v, float) else v for v in document[key]]
                try:
                    objects.append(object_from_document(kind, document, obj.revision))
                except PolicyError:
                    continue
            if not reply.next_page_token:
                break
            token = reply.next_page_token
    return Model.of(objects)


@router.get(
    "/export",
    operation_id="export_policy",
    response_class=Response,
    responses={
        200: {"content": {"application/yaml": {"schema": {"type": "object"}}}, "description": "The policy file"}
    },
    **scoped(Scope.READ_ONLY),
)
async def export_policy(ctx: Context) -> Response:
    """The whole policy as a policy file (YAML) that `apply` takes back unchanged."""
    return Response(export_policy_yaml(await current_model(ctx)), media_type="application/yaml")


def _flow(flow: FlowFields) -> FiveTuple:
    protocol = PROTOCOLS[flow.protocol] if isinstance(flow.protocol, str) else flow.protocol
    try:
        five_tuple = FiveTuple.parse(flow.src, flow.dst, protocol, flow.src_port, flow.dst_port)
    except ValueError:
        raise ProblemError(422, "src and dst must be IP addresses", [("flow.src", "must be an IP address")]) from None
    if five_tuple.src.version != five_tuple.dst.version:
        raise ProblemError(422, "src and dst differ in IP version", [("flow.dst", "must be the IP version of src")])
    return five_tuple


@router.post(
    "/check",
    response_model=DecisionView,
    operation_id="check_flow",
    responses=problem_responses(422, 503),
    **scoped(Scope.READ_ONLY),
)
async def check_flow(body: CheckBody, ctx: Context) -> Any:
    """May this identity send this flow now? (the compiled policy's answer)"""
    five_tuple = _flow(body.flow)
    request = policy_pb2.CheckRequest(
        identity=body.identity,
        flow=policy_pb2.FiveTuple(
            src=str(five_tuple.src),
            dst=str(five_tuple.dst),
            protocol=five_tuple.protocol,
            src_port=five_tuple.src_port,
            dst_port=five_tuple.dst_port,
        ),
        source_address=body.source_address,
        posture=body.posture,
        time=body.time,
    )
    reply = await call("policy", ctx.clients.policy.Check(request))
    return {"allow": reply.allow, "rule": reply.rule, "reason": reply.reason}


@router.post(
    "/what-if",
    response_model=WhatIfView,
    operation_id="what_if",
    responses=problem_responses(422, 503),
    **scoped(Scope.READ_ONLY),
)
async def what_if_route(body: WhatIfBody, ctx: Context) -> Any:
    """The decision for one flow under the current policy and under the given policy file."""
    five_tuple = _flow(body.flow)
    try:
        desired = load_policy_yaml(body.policy)
    except PolicyError as exc:
        raise ProblemError(
            422, "the policy file is invalid", [(f"policy.{format_path(p.path)}", str(p)) for p in exc.problems]
        ) from None
    source = None
    if body.source_address:
        try:
            source = ipaddress.ip_address(body.source_address)
        except ValueError:
            raise ProblemError(422, "source_address is not an IP address", [("source_address", "invalid")]) from None
    context = CheckContext(body.time or time.time(), source, frozenset(body.posture))
    result = what_if(await current_model(ctx), desired, body.identity, five_tuple, context)

    def decision(d: Any) -> dict[str, Any]:
        return {"allow": d.action.value == "allow", "rule": d.rule, "reason": d.reason}

    return {"current": decision(result.current), "desired": decision(result.desired), "changed": result.changed}


@router.get(
    "/compiled/{identity}",
    response_model=CompiledView,
    operation_id="get_compiled_policy",
    responses=problem_responses(404, 503),
    **scoped(Scope.READ_ONLY),
)
async def get_compiled(identity: Annotated[str, Path(pattern=ID_PATTERN)], ctx: Context) -> Any:
    """The compiled selectors, routes and filter document of one identity."""
    reply = await call("policy", ctx.clients.policy.GetCompiled(policy_pb2.GetCompiledRequest(identity=identity)))
    return {
        "identity": reply.identity,
        "selectors": [s.text for s in reply.selectors],
        "routes": list(reply.routes),
        "document": json_format.MessageToDict(reply.filter),
        "revision": reply.revision,
    }


__all__ = ["note_change", "router"]
