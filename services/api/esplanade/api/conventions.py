"""What every route shares: the API context, scopes, ETag/If-Match, cursor pages, audit notes.

- ``ETag`` is the store mod_revision of the object, quoted: ``"42"``.
- ``If-Match: "42"`` on PUT/DELETE writes only if the object is still at revision 42 (else
  412); ``If-Match: *`` only if it exists. Without If-Match a write still cannot lose a
  concurrent update: it compares against the revision it read and answers 409 if another
  write came in between.
- Lists take ``?limit=`` (1..api.max_page_size, default 100) and ``?cursor=`` (opaque, from
  ``next_cursor``) and answer ``{"items": [...], "next_cursor": "..." | null}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from esplanade.api.auth import FailureLimiter, Principal, Scope, TokenVerifier
from esplanade.api.problems import ProblemError
from esplanade.api.readiness import Readiness
from esplanade.api.service_clients import ServiceClients
from esplanade.config.settings import Settings
from esplanade.journal.audit import AuditLog
from esplanade.store.base import Store
from esplanade.store.sealing import SealedDocuments, Sealer

T = TypeVar("T")
DEFAULT_PAGE = 100


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    sealer: Sealer
    clients: ServiceClients
    verifier: TokenVerifier
    limiter: FailureLimiter
    audit: AuditLog
    # the services' health (GET /readyz, GET /api/v1/status); None in tests that need none
    readiness: Readiness | None = None
    # set when the server begins to shut down: open event streams end on it, so that uvicorn's
    # wait for open connections is not a wait for every SSE client to hang up
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    documents: SealedDocuments = field(init=False)

    def __post_init__(self) -> None:
        self.documents = SealedDocuments(self.store, self.sealer)


def context_of(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Context = Annotated[ApiContext, Depends(context_of)]

bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer esp_...`.")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def require(scope: Scope) -> Callable[..., Coroutine[Any, Any, Principal]]:
    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        ctx = context_of(request)
        address = client_address(request)
        wait = ctx.limiter.retry_after(address)
        if wait:
            raise ProblemError(
                429, "too many failed authentications from this address", headers={"Retry-After": str(wait)}
            )
        principal = await ctx.verifier.verify(credentials.credentials) if credentials else None
        if principal is None:
            ctx.limiter.failed(address)
            detail = "a bearer token is required" if credentials is None else "the token is not valid"
            raise ProblemError(401, detail, headers={"WWW-Authenticate": 'Bearer realm="esplanade"'})
        request.state.principal = principal
        if not principal.scope.allows(scope):
            raise ProblemError(403, f"this needs the {scope.value} scope; the token has {principal.scope.value}")
        return principal

    return dependency


def scoped(scope: Scope) -> dict[str, Any]:
    """Route keyword arguments: enforce `scope` and document it as x-required-scope."""
    return {"dependencies": [Depends(require(scope))], "openapi_extra": {"x-required-scope": scope.value}}


def principal_of(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


def _query_names(dependant: Any) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """Unknown query parameters are refused (422), as unknown body fields are: a typo is not ignored."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    allowed = _query_names(dependant)
    unknown = sorted({name for name in request.query_params if name not in allowed})
    if unknown:
        raise ProblemError(
            422, f"unknown query parameter {unknown[0]!r}", [(f"query.{name}", "unknown parameter") for name in unknown]
        )


# -- ETag / If-Match ---------------------------------------------------------------------------
MUST_EXIST = -2


def etag(revision: int) -> str:
    return f'"{revision}"'


def parse_if_match(value: str | None) -> int | None:
    """None: no condition; MUST_EXIST for '*'; else the revision. Malformed -> 400."""
    if value is None:
        return None
    text = value.strip()
    if text == "*":
        return MUST_EXIST
    text = text.removeprefix("W/").strip('"')
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise ProblemError(400, 'If-Match must be an ETag of this API ("42") or *', [("header.If-Match", "malformed")])
    return int(text)


IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description='Write only if the object is at this revision (its ETag, e.g. "42"), or exists (*).',
        pattern=r'^(\*|(W/)?"?[1-9][0-9]{0,17}"?)$',
    ),
]


def check_if_match(expected: int | None, current_revision: int | None, what: str) -> None:
    """412 if `expected` does not match the object's current revision (None: absent)."""
    if expected is None:
        return
    if expected == MUST_EXIST:
        if current_revision is None:
            raise ProblemError(412, f"{what} does not exist (If-Match: *)")
        return
    if current_revision != expected:
        now = "it does not exist" if current_revision is None else f"it is at revision {current_revision}"
        raise ProblemError(412, f"{what} changed: If-Match names revision {expected}, {now}")


# -- pages -------------------------------------------------------------------------------------
class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null: last page.")


def encode_cursor(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str:
    if not cursor:
        return ""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ProblemError(422, "the cursor is not one this API gave out", [("query.cursor", "invalid")]) from None


Limit = Annotated[int, Query(ge=1, le=1000, description="Page size (at most api.max_page_size).")]
Cursor = Annotated[str | None, Query(max_length=1024, pattern=r"^[A-Za-z0-9_-]*$", description="From next_cursor.")]


def page_of(items: Sequence[T], key: Callable[[T], str], limit: int, cursor: str | None, max_size: int) -> Page[T]:
    """Items after the cursor (sorted by `key`), at most `limit`."""
    after = decode_cursor(cursor)
    limit = min(limit, max_size)
    chosen = [item for item in items if key(item) > after] if after else list(items)
    if len(chosen) > limit:
        return Page(items=chosen[:limit], next_cursor=encode_cursor(key(chosen[limit - 1])))
    return Page(items=chosen, next_cursor=None)


# -- audit notes (the audit middleware records them) ------------------------------------------
def note_change(request: Request, before: Any = None, after: Any = None, detail: str = "") -> None:
    request.state.audit_before = before
    request.state.audit_after = after
    if detail:
        request.state.audit_detail = detail
