"""gRPC stubs of keyexchange, dataplane and policy, and gRPC errors as problem documents."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from esplanade.api.problems import FieldError, ProblemError
from esplanade.config.settings import Settings
from esplanade.rpc.server import open_channel
from esplanade.v1 import dataplane_pb2_grpc, keyexchange_pb2_grpc, policy_pb2_grpc

T = TypeVar("T")
DEPENDENCIES = ("keyexchange", "dataplane", "policy")


class ServiceClients:
    def __init__(self, settings: Settings) -> None:
        self.channels = {name: open_channel(getattr(settings.endpoints, name), settings.grpc) for name in DEPENDENCIES}
        self.keyexchange = keyexchange_pb2_grpc.KeyExchangeStub(self.channels["keyexchange"])
        self.dataplane = dataplane_pb2_grpc.DataplaneStub(self.channels["dataplane"])
        self.policy = policy_pb2_grpc.PolicyStub(self.channels["policy"])

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


_FIELD_PREFIX = re.compile(r"^connections\.[^.]+\.")


def _trailing(error: grpc.aio.AioRpcError, key: str) -> str:
    for k, v in error.trailing_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


def field_errors(error: grpc.aio.AioRpcError) -> list[FieldError]:
    """Field problems of a gRPC error: policy's esplanade-errors, or keyexchange's "field: reason"."""
    raw = _trailing(error, "esplanade-errors")
    if raw:
        try:
            return [
                FieldError(field=str(e.get("field", "")), message=str(e.get("message", ""))) for e in json.loads(raw)
            ]
        except (ValueError, TypeError, AttributeError):
            pass
    details = error.details() or ""
    field = _trailing(error, "esplanade-field")
    message = details
    if not field:
        head, sep, tail = details.partition(": ")
        if sep and " " not in head:
            field, message = head, tail
    elif details.startswith(field + ": "):
        message = details[len(field) + 2 :]
    return [FieldError(field=_FIELD_PREFIX.sub("", field), message=message)] if field or message else []


async def call(service: str, awaitable: Awaitable[T], *, if_match: bool = False, not_found: str | None = None) -> T:
    """Await a gRPC call; map its failure to a problem (never a traceback)."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as error:
        raise problem_of(service, error, if_match=if_match, not_found=not_found) from None


def problem_of(service: str, error: grpc.aio.AioRpcError, *, if_match: bool, not_found: str | None) -> ProblemError:
    code = error.code()
    details = error.details() or code.name
    reason = _trailing(error, "esplanade-reason")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ProblemError(422, details, field_errors(error))
    if code == grpc.StatusCode.NOT_FOUND:
        return ProblemError(404, not_found or details)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return ProblemError(409, details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if reason == "revision_mismatch" and if_match:
            return ProblemError(412, details)
        return ProblemError(409, details, field_errors(error))
    if code == grpc.StatusCode.ABORTED:
        return ProblemError(409, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProblemError(504, f"{service} did not answer in time")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
        return ProblemError(503, f"{service} is unavailable ({code.name})", headers={"Retry-After": "5"})
    return ProblemError(502, f"{service} failed: {code.name}")
