"""The Policy gRPC servicer: objects, checks, compiled output and policy files.

Errors are gRPC statuses with a human sentence in `details` and, in trailing metadata,
``esplanade-reason`` (invalid | not_found | exists | revision_mismatch | referenced |
contention) and ``esplanade-errors`` (JSON list of ``{"field", "message"}``, field paths
inside the object's document such as ``groups[0]``). Never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from esplanade.policy.apply import apply_model, invalid_model
from esplanade.policy.compiled_sync import CompiledSync
from esplanade.policy.decode import object_to_document
from esplanade.policy.diff import affected_identities
from esplanade.policy.evaluator import CheckContext, FiveTuple
from esplanade.policy.model import KIND_OF, PolicyObject
from esplanade.policy.policy_file import load_policy_yaml
from esplanade.policy.problems import PolicyError
from esplanade.policy.store_state import FieldProblem, InvalidObject, ObjectNotFound, PolicyStore, PolicyWriteError
from esplanade.store.base import StoreError, StoreUnavailable
from esplanade.telemetry.metrics import policy_decisions
from esplanade.v1 import ipsec_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_YAML_BYTES = 4 << 20
# The latest instant a Check may ask about (as the REST API's bound): time windows read the
# local wall clock, which cannot show instants beyond year 9999, NaN or infinities.
MAX_CHECK_TIME = 1e11


def to_struct(document: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(document)
    return message


def to_value(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message


def integral(value: Any) -> Any:
    """Struct numbers are doubles: 443.0 back to 443, so documents decode as written."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral(v) for v in value]
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    return value


def object_message(obj: PolicyObject) -> policy_pb2.PolicyObject:
    return policy_pb2.PolicyObject(
        kind=KIND_OF[type(obj)], id=obj.id, document=to_struct(object_to_document(obj)), revision=obj.revision
    )


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: PolicyWriteError) -> None:
    context.set_trailing_metadata(
        (
            ("esplanade-reason", error.reason),
            ("esplanade-errors", json.dumps([e.to_json() for e in error.errors], ensure_ascii=True)),
        )
    )
    await context.abort(getattr(grpc.StatusCode, error.code), error.message)


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, policy_store: PolicyStore, sync: CompiledSync, clock: Callable[[], float] = time.time) -> None:
        self.policy_store = policy_store
        self.sync = sync
        self.clock = clock
        self.decisions = policy_decisions()

    async def _guard(self, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except PolicyWriteError as exc:
            await abort(context, exc)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the store is unavailable: {exc}")
        except (StoreError, ValueError) as exc:
            log.exception("policy request failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        raise AssertionError("unreachable")  # context.abort raises

    async def PutObject(
        self, request: policy_pb2.PutObjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.PutObjectResponse:
        obj = request.object
        document = integral(json_format.MessageToDict(obj.document))
        committed = await self._guard(
            context,
            lambda: self.policy_store.put(obj.kind, obj.id, document, request.expect_revision, request.actor),
        )
        return policy_pb2.PutObjectResponse(revision=committed.revision)

    async def GetObject(
        self, request: policy_pb2.GetObjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.PolicyObject:
        obj = await self._guard(context, lambda: self.policy_store.get(request.kind, request.id))
        return object_message(obj)

    async def DeleteObject(
        self, request: policy_pb2.DeleteObjectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.DeleteObjectResponse:
        await self._guard(
            context, lambda: self.policy_store.delete(request.kind, request.id, request.expect_revision, request.actor)
        )
        return policy_pb2.DeleteObjectResponse()

    async def ListObjects(
        self, request: policy_pb2.ListObjectsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.ListObjectsResponse:
        if request.page_size < 0:
            await abort(context, InvalidObject("page_size must not be negative", [FieldProblem("page_size", ">= 0")]))
        objects, revision = await self._guard(context, lambda: self.policy_store.list(request.kind))
        if request.page_token:
            objects = [o for o in objects if o.id > request.page_token]
        next_token = ""
        if request.page_size and len(objects) > request.page_size:
            objects = objects[: request.page_size]
            next_token = objects[-1].id
        return policy_pb2.ListObjectsResponse(
            objects=[object_message(o) for o in objects], next_page_token=next_token, revision=revision
        )

    async def Check(
        self, request: policy_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.CheckResponse:
        flow = request.flow
        errors: list[FieldProblem] = []
        try:
            five_tuple = FiveTuple.parse(flow.src, flow.dst, flow.protocol, flow.src_port, flow.dst_port)
            if five_tuple.src.version != five_tuple.dst.version:
                errors.append(FieldProblem("flow", "source and destination must be of the same IP version"))
        except ValueError:
            errors.append(FieldProblem("flow", "src and dst must be IP addresses"))
        source = None
        if request.source_address:
            try:
                source = ipaddress.ip_address(request.source_address)
            except ValueError:
                errors.append(FieldProblem("source_address", "not an IP address"))
        if flow.protocol > 255 or flow.src_port > 65535 or flow.dst_port > 65535:
            errors.append(FieldProblem("flow", "protocol is 0-255 and ports 0-65535"))
        if not (math.isfinite(request.time) and 0 <= request.time <= MAX_CHECK_TIME):
            errors.append(FieldProblem("time", f"POSIX seconds from 0 to {MAX_CHECK_TIME:.0f}; 0: now"))
        if errors:
            await abort(context, InvalidObject("invalid check request", errors))
        await self.sync.ready.wait()
        now = request.time or self.clock()
        decision = self.sync.compiler.check(
            request.identity, five_tuple, CheckContext(now, source, frozenset(request.posture))
        )
        self.decisions.add(1, {"decision": decision.action.value, "point": "check"})
        return policy_pb2.CheckResponse(
            allow=decision.action.value == "allow", rule=decision.rule, reason=decision.reason
        )

    async def GetCompiled(
        self, request: policy_pb2.GetCompiledRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.CompiledPolicy:
        await self.sync.ready.wait()
        compiled = self.sync.compiler.compiled(request.identity)
        if compiled is None:
            await abort(context, ObjectNotFound(f"identity '{request.identity}' has no compiled policy"))
            raise AssertionError("unreachable")
        selectors = [str(s) for part in compiled.parts for s in part.selectors]
        routes = sorted({str(n) for part in compiled.parts for s in part.selectors for n in s.networks()})
        return policy_pb2.CompiledPolicy(
            identity=compiled.identity,
            selectors=[ipsec_pb2.TrafficSelector(text=s) for s in selectors],
            routes=routes,
            filter=to_struct(compiled.to_document()),
            revision=self.sync.revision,
        )

    async def Apply(
        self, request: policy_pb2.ApplyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> policy_pb2.ApplyResponse:
        if len(request.yaml.encode()) > MAX_YAML_BYTES:
            await abort(context, InvalidObject("the policy file is too large", [FieldProblem("yaml", "at most 4 MiB")]))
        try:
            desired = load_policy_yaml(request.yaml)
        except PolicyError as exc:
            await abort(context, invalid_model(exc))
            raise AssertionError("unreachable") from None
        current, _ = await self._guard(context, self.policy_store.snapshot)
        outcome = await self._guard(
            context, lambda: apply_model(self.policy_store, desired, request.actor, request.dry_run)
        )
        affected = affected_identities(current, desired) if outcome.changes else []
        return policy_pb2.ApplyResponse(
            changes=[
                policy_pb2.PolicyChange(
                    action=c.action.value,
                    kind=c.kind,
                    id=c.id,
                    detail=str(c),
                    fields=[
                        policy_pb2.FieldChange(field=f.field, old=to_value(f.old), new=to_value(f.new))
                        for f in c.fields
                    ],
                )
                for c in outcome.changes
            ],
            applied=outcome.applied,
            revision=outcome.revision,
            affected_identities=affected,
        )
