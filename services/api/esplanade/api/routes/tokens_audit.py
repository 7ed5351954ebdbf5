"""/api/v1/tokens (admin) and /api/v1/audit (the audit journal, redacted)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from esplanade.api.auth import Scope, new_token, public_view, token_document
from esplanade.api.conventions import (
    Context,
    Cursor,
    Limit,
    Page,
    decode_cursor,
    encode_cursor,
    note_change,
    page_of,
    scoped,
)
from esplanade.api.problems import ProblemError, problem_responses
from esplanade.store import schema

router = APIRouter()
TOKEN_ID = r"^([0-9a-f]{12}|bootstrap)$"  # noqa: S105 (a pattern, not a secret)


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
    scope: Scope
    expires_at: float | None = Field(None, gt=0, le=1e11, description="POSIX seconds; null: never.")


class TokenView(BaseModel):
    id: str
    name: str
    scope: Scope
    created_at: float
    expires_at: float | None
    revision: int


class TokenCreated(TokenView):
    token: str = Field(description="The token itself: shown this once, never again.")


@router.post(
    "/api/v1/tokens",
    status_code=201,
    response_model=TokenCreated,
    operation_id="create_token",
    tags=["tokens"],
    responses={
        **problem_responses(422),
        201: {"links": {"GetToken": {"operationId": "get_token", "parameters": {"token_id": "$response.body#/id"}}}},
    },
    **scoped(Scope.ADMIN),
)
async def create_token(body: TokenCreate, request: Request, response: Response, ctx: Context) -> Any:
    """Create an API token. The reply holds the token once; the store keeps only a salted hash."""
    token_id, token = new_token()
    doc = token_document(body.name, body.scope, token, body.expires_at)
    revision = await ctx.store.put(schema.api_token(token_id), json.dumps(doc).encode(), expect_mod_revision=0)
    view = public_view(token_id, doc, revision)
    note_change(request, None, view)
    response.headers["Location"] = f"/api/v1/tokens/{token_id}"
    return {**view, "token": token}


@router.get(
    "/api/v1/tokens",
    response_model=Page[TokenView],
    operation_id="list_tokens",
    tags=["tokens"],
    **scoped(Scope.ADMIN),
)
async def list_tokens(
    ctx: Context,
    limit: Limit = 100,
    cursor: Cursor = None,
    scope: Annotated[Scope | None, Query(description="Only tokens of this scope.")] = None,
) -> Any:
    prefix = schema.prefix("api", "tokens")
    kvs, _ = await ctx.store.range(prefix)
    items = [public_view(kv.key[len(prefix) :], json.loads(kv.value), kv.mod_revision) for kv in kvs]
    if scope is not None:
        items = [t for t in items if t["scope"] == scope.value]
    return page_of(items, lambda t: t["id"], limit, cursor, ctx.settings.api.max_page_size)


@router.get(
    "/api/v1/tokens/{token_id}",
    response_model=TokenView,
    operation_id="get_token",
    tags=["tokens"],
    responses=problem_responses(404),
    **scoped(Scope.ADMIN),
)
async def get_token(token_id: Annotated[str, Path(pattern=TOKEN_ID)], ctx: Context) -> Any:
    kv = await ctx.store.get(schema.api_token(token_id))
    if kv is None:
        raise ProblemError(404, f"token '{token_id}' does not exist")
    return public_view(token_id, json.loads(kv.value), kv.mod_revision)


@router.delete(
    "/api/v1/tokens/{token_id}",
    status_code=204,
    operation_id="revoke_token",
    tags=["tokens"],
    responses=problem_responses(404),
    **scoped(Scope.ADMIN),
)
async def revoke_token(token_id: Annotated[str, Path(pattern=TOKEN_ID)], request: Request, ctx: Context) -> Response:
    """Revoke a token (404 if there is none). Effective at once on this API instance."""
    kv = await ctx.store.get(schema.api_token(token_id))
    if kv is None:
        raise ProblemError(404, f"token '{token_id}' does not exist")
    await ctx.store.delete(schema.api_token(token_id))
    ctx.verifier.forget(token_id)
    note_change(request, public_view(token_id, json.loads(kv.value), kv.mod_revision), None)
    return Response(status_code=204)


# -- audit -------------------------------------------------------------------------------------
class AuditRecord(BaseModel):
    id: int
    time: float
    actor: str
    action: str
    target: str
    before: Any = None
    after: Any = None
    result: str
    source: str = ""
    detail: str = ""
    trace_id: str = ""


@router.get(
    "/api/v1/audit",
    response_model=Page[AuditRecord],
    operation_id="list_audit",
    tags=["audit"],
    **scoped(Scope.READ_ONLY),
)
async def list_audit(
    ctx: Context,
    limit: Limit = 100,
    cursor: Cursor = None,
    actor: Annotated[str | None, Query(max_length=256)] = None,
    action: Annotated[str | None, Query(max_length=256, description='e.g. "PUT /api/v1/connections/{name}"')] = None,
    target: Annotated[str | None, Query(max_length=512)] = None,
    result: Annotated[str | None, Query(max_length=64, description='"ok" or "error 412"...')] = None,
    since: Annotated[float | None, Query(ge=0, le=1e11)] = None,
    until: Annotated[float | None, Query(ge=0, le=1e11)] = None,
) -> Any:
    """Audit records, oldest first, with secrets redacted."""
    after = decode_cursor(cursor)
    if after and not after.isdigit():
        raise ProblemError(422, "the cursor is not one this API gave out", [("query.cursor", "invalid")])
    equals = {k: v for k, v in (("actor", actor), ("action", action), ("target", target), ("result", result)) if v}
    page = ctx.audit.query(
        equals=equals,
        since=since,
        until=until,
        after_id=int(after or 0),
        limit=min(limit, ctx.settings.api.max_page_size),
    )
    records = [{k: r.get(k) for k in AuditRecord.model_fields} for r in page.records]
    return {"items": records, "next_cursor": encode_cursor(str(page.next_cursor)) if page.next_cursor else None}


__all__ = ["page_of", "router"]
