"""RFC 9457 problem documents for every error the API returns, including FastAPI's own.

Every 4xx/5xx body is ``application/problem+json``::

    {"type": "https://esplanade.dev/problems/validation", "title": "Request validation failed",
     "status": 422, "detail": "...", "instance": "/api/v1/connections/gw",
     "errors": [{"field": "children.net.local_ts[0]", "message": "..."}]}

Field paths are dotted with list indexes in brackets, relative to the request body (or
``query.limit``, ``path.name``, ``header.If-Match`` for other parts of the request). A
problem never echoes the value that was refused (it could be a secret) and never carries a
traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://esplanade.dev/problems/"

TITLES = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    412: "Precondition failed",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Request validation failed",
    428: "Precondition required",
    429: "Too many requests",
    500: "Internal error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}
TYPES = {
    401: "unauthenticated",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    412: "precondition-failed",
    413: "too-large",
    422: "validation",
    429: "rate-limited",
    503: "unavailable",
}


class FieldError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(description="Dotted path of the offending field ('' for the whole request).")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URI naming the kind of problem.")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str = ""
    instance: str = ""
    errors: list[FieldError] = Field(default_factory=list)


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str = "",
        errors: Sequence[tuple[str, str]] | Sequence[FieldError] = (),
        *,
        title: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or TITLES.get(status, "Error"))
        self.status = status
        self.detail = detail
        self.errors = [e if isinstance(e, FieldError) else FieldError(field=e[0], message=e[1]) for e in errors]
        self.title = title or TITLES.get(status, "Error")
        self.kind = kind or TYPES.get(status, "error")
        self.headers = headers or {}


def problem_response(
    status: int,
    detail: str = "",
    errors: Sequence[FieldError] = (),
    *,
    instance: str = "",
    title: str | None = None,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + (kind or TYPES.get(status, "error")),
        "title": title or TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": instance,
        "errors": [e.model_dump() for e in errors],
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def field_path(location: Sequence[int | str]) -> str:
    """('body', 'children', 'net', 'local_ts', 0) -> 'children.net.local_ts[0]'."""
    parts = list(location)
    prefix = ""
    if parts and parts[0] == "body":
        parts = parts[1:]
    elif parts and parts[0] in ("query", "path", "header", "cookie"):
        prefix = f"{parts[0]}."
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-after[", "function-before[", "function-wrap[")):
            continue  # pydantic validator frames in a union path
        else:
            out += f".{part}" if out else str(part)
    return prefix + out


def validation_errors(exc: RequestValidationError) -> list[FieldError]:
    errors: list[FieldError] = []
    for error in exc.errors():
        location = list(error.get("loc", ()))
        kind = error.get("type", "")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "json_invalid":
            message = f"malformed JSON: {error.get('ctx', {}).get('error', 'cannot parse')}"
            location = ["body"]
        elif kind == "missing":
            message = "required"
        # Union branches add a type tag to the location ("str", "int", a model name): drop
        # them, the field path is what the client needs.
        cleaned = [p for p in location if not (isinstance(p, str) and _is_type_tag(p))]
        errors.append(FieldError(field=field_path(cleaned), message=message))
    seen: set[tuple[str, str]] = set()
    unique = []
    for e in errors:
        if (e.field, e.message) not in seen:
            seen.add((e.field, e.message))
            unique.append(e)
    return unique


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list[str]", "list[int]", "dict"} or part.startswith(
        ("constrained-", "list[", "function-", "union[", "literal[", "json-or-python[", "is-instance[")
    )


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.detail,
            exc.errors,
            instance=request.url.path,
            title=exc.title,
            kind=exc.kind,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        detail = "; ".join(f"{e.field or 'body'}: {e.message}" for e in errors[:5])
        return problem_response(422, detail, errors, instance=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else ""
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no resource at {request.url.path}"
        if exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(exc.status_code, detail, instance=request.url.path, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return problem_response(500, "internal error; see the API service log", instance=request.url.path)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting problem answers."""
    return {status: {"description": TITLES.get(status, "Error")} for status in statuses}
