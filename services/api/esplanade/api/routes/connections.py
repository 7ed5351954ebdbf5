"""/api/v1/connections: IKE connections and their children (swanctl model)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from google.protobuf import struct_pb2

from esplanade.api.auth import Scope
from esplanade.api.config_collection import ConfigCollection
from esplanade.api.connection_models import (
    NAME_PATTERN,
    ChildBody,
    ConnectionBody,
    ConnectionCreate,
    ConnectionView,
    stored_document,
    view_of,
)
from esplanade.api.conventions import (
    ApiContext,
    Context,
    Cursor,
    IfMatch,
    Limit,
    Page,
    etag,
    note_change,
    page_of,
    parse_if_match,
    scoped,
)
from esplanade.api.problems import FieldError, ProblemError, problem_responses
from esplanade.api.service_clients import call
from esplanade.store import schema
from esplanade.store.sealing import is_sealed
from esplanade.v1 import keyexchange_pb2

router = APIRouter(prefix="/api/v1/connections", tags=["connections"])
NameParam = Annotated[str, Path(pattern=NAME_PATTERN, description="Connection name.")]
ChildParam = Annotated[str, Path(pattern=NAME_PATTERN, description="Child name.")]

CONNECTION_LINKS = {
    "GetConnection": {"operationId": "get_connection", "parameters": {"name": "$response.body#/name"}},
    "ReplaceConnection": {"operationId": "replace_connection", "parameters": {"name": "$response.body#/name"}},
    "DeleteConnection": {"operationId": "delete_connection", "parameters": {"name": "$response.body#/name"}},
}


def connections(ctx: ApiContext) -> ConfigCollection:
    return ConfigCollection(
        ctx.store, ctx.documents, schema.connection, schema.prefix("config", "connections"), "connection"
    )


async def _check_references(ctx: ApiContext, body: ConnectionBody) -> None:
    errors: list[FieldError] = []
    for field, refs, key, label in (
        ("local.certs", body.local.certs, schema.certificate, "certificate"),
        ("remote.certs", body.remote.certs, schema.certificate, "certificate"),
        ("local.cacerts", body.local.cacerts, schema.ca, "CA"),
        ("remote.cacerts", body.remote.cacerts, schema.ca, "CA"),
        ("pools", body.pools, schema.pool, "pool"),
    ):
        for i, ref in enumerate(refs):
            if await ctx.store.get(key(ref)) is None:
                errors.append(FieldError(field=f"{field}[{i}]", message=f"no {label} '{ref}'"))
    if errors:
        raise ProblemError(422, "the connection refers to objects that do not exist", errors)


async def _validate_with_keyexchange(ctx: ApiContext, name: str, document: dict[str, Any], psk: str | None) -> None:
    config = struct_pb2.Struct()
    config.update({**document, **({"psk": psk} if psk else {})})
    request = keyexchange_pb2.LoadConnectionRequest(name=name, config=config, validate_only=True)
    await call("keyexchange", ctx.clients.keyexchange.LoadConnection(request))


async def _current_psk(ctx: ApiContext, name: str, current: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(sealed value to keep, plaintext for validation) of the stored PSK."""
    sealed = current.get("psk") if current else None
    if not is_sealed(sealed):
        return None, None
    assert isinstance(sealed, str)
    plaintext = ctx.sealer.open(schema.connection(name), "psk", sealed).decode("utf-8", "replace")
    return sealed, plaintext


async def _write(
    request: Request, ctx: ApiContext, name: str, body: ConnectionBody, if_match: int | None, create_only: bool
) -> tuple[dict[str, Any], int, bool]:
    await _check_references(ctx, body)
    collection = connections(ctx)
    found = await collection.read(name)
    current = found[0] if found else None
    if create_only and found is not None:
        raise ProblemError(409, f"connection '{name}' already exists")
    document = stored_document(body)
    kept, old_plain = await _current_psk(ctx, name, current)
    new_psk = body.psk.get_secret_value() if body.psk is not None else None
    await _validate_with_keyexchange(ctx, name, document, new_psk or old_plain)
    if new_psk is not None:
        document["psk"] = new_psk.encode()
    elif kept is not None:
        document["psk"] = kept

    def build(_: dict[str, Any] | None) -> dict[str, Any]:
        return document

    if create_only:
        revision = await collection.write(name, document, 0)
        before, created = None, True
    else:
        before, _, revision, created = await collection.replace(name, build, if_match)
    after = view_of(name, document, revision)
    note_change(request, view_of(name, before, 0) if before else None, after)
    return after, revision, created


@router.get("", response_model=Page[ConnectionView], operation_id="list_connections", **scoped(Scope.READ_ONLY))
async def list_connections(
    ctx: Context,
    limit: Limit = 100,
    cursor: Cursor = None,
    remote_addr: Annotated[str | None, Query(max_length=253, description="Only connections to this peer.")] = None,
    child: Annotated[str | None, Query(max_length=64, description="Only connections with this child.")] = None,
) -> Page[dict[str, Any]]:
    """Connections, by name."""
    items = [view_of(name, doc, rev) for name, doc, rev in await connections(ctx).all()]
    if remote_addr:
        items = [c for c in items if remote_addr in c.get("remote_addrs", [])]
    if child:
        items = [c for c in items if child in c.get("children", {})]
    return page_of(items, lambda c: c["name"], limit, cursor, ctx.settings.api.max_page_size)


@router.post(
    "",
    status_code=201,
    response_model=ConnectionView,
    operation_id="create_connection",
    responses={**problem_responses(409, 422, 503), 201: {"links": CONNECTION_LINKS}},
    **scoped(Scope.ADMIN),
)
async def create_connection(body: ConnectionCreate, request: Request, response: Response, ctx: Context) -> Any:
    """Create a connection (409 if the name is taken). Keyexchange checks it before it is stored."""
    view, revision, _ = await _write(request, ctx, body.name, body, None, create_only=True)
    response.headers["Location"] = f"/api/v1/connections/{body.name}"
    response.headers["ETag"] = etag(revision)
    return view


@router.get(
    "/{name}",
    response_model=ConnectionView,
    operation_id="get_connection",
    responses=problem_responses(404),
    **scoped(Scope.READ_ONLY),
)
async def get_connection(name: NameParam, response: Response, ctx: Context) -> Any:
    document, revision = await connections(ctx).get(name)
    response.headers["ETag"] = etag(revision)
    return view_of(name, document, revision)


@router.put(
    "/{name}",
    response_model=ConnectionView,
    operation_id="replace_connection",
    responses={**problem_responses(409, 412, 422, 503), 201: {"model": ConnectionView, "description": "Created"}},
    **scoped(Scope.ADMIN),
)
async def replace_connection(
    name: NameParam, body: ConnectionBody, request: Request, response: Response, ctx: Context, if_match: IfMatch = None
) -> Any:
    """Create or replace a connection. Omitting `psk` keeps the stored one."""
    view, revision, created = await _write(request, ctx, name, body, parse_if_match(if_match), create_only=False)
    response.headers["ETag"] = etag(revision)
    if created:
        response.status_code = 201
        response.headers["Location"] = f"/api/v1/connections/{name}"
    return view


@router.delete(
    "/{name}",
    status_code=204,
    operation_id="delete_connection",
    responses=problem_responses(404, 409, 412),
    **scoped(Scope.ADMIN),
)
async def delete_connection(name: NameParam, request: Request, ctx: Context, if_match: IfMatch = None) -> Response:
    """Delete a connection (404 if it does not exist). Its SAs are closed by keyexchange."""
    before = await connections(ctx).delete(name, parse_if_match(if_match))
    note_change(request, view_of(name, before, 0), None)
    return Response(status_code=204)


# -- children ----------------------------------------------------------------------------------
class ChildView(ChildBody):
    name: str
    revision: int


@router.get(
    "/{name}/children",
    response_model=Page[ChildView],
    operation_id="list_children",
    responses=problem_responses(404),
    **scoped(Scope.READ_ONLY),
)
async def list_children(name: NameParam, ctx: Context, limit: Limit = 100, cursor: Cursor = None) -> Any:
    document, revision = await connections(ctx).get(name)
    items = [{**child, "name": n, "revision": revision} for n, child in sorted(document.get("children", {}).items())]
    return page_of(items, lambda c: c["name"], limit, cursor, ctx.settings.api.max_page_size)


@router.get(
    "/{name}/children/{child}",
    response_model=ChildView,
    operation_id="get_child",
    responses=problem_responses(404),
    **scoped(Scope.READ_ONLY),
)
async def get_child(name: NameParam, child: ChildParam, response: Response, ctx: Context) -> Any:
    document, revision = await connections(ctx).get(name)
    children = document.get("children", {})
    if child not in children:
        raise ProblemError(404, f"connection '{name}' has no child '{child}'")
    response.headers["ETag"] = etag(revision)
    return {**children[child], "name": child, "revision": revision}


@router.put(
    "/{name}/children/{child}",
    response_model=ChildView,
    operation_id="replace_child",
    responses=problem_responses(404, 409, 412, 422, 503),
    **scoped(Scope.ADMIN),
)
async def replace_child(
    name: NameParam,
    child: ChildParam,
    body: ChildBody,
    request: Request,
    response: Response,
    ctx: Context,
    if_match: IfMatch = None,
) -> Any:
    """Create or replace one child. The ETag is the connection's."""
    document, revision = await connections(ctx).get(name)
    merged = ConnectionBody.model_validate(
        {**{k: v for k, v in document.items() if k != "psk"}, "children": {**document.get("children", {})}}
    )
    merged.children[child] = body
    view, new_revision, _ = await _write(request, ctx, name, merged, parse_if_match(if_match) or revision, False)
    response.headers["ETag"] = etag(new_revision)
    return {**view["children"][child], "name": child, "revision": new_revision}


@router.delete(
    "/{name}/children/{child}",
    status_code=204,
    operation_id="delete_child",
    responses=problem_responses(404, 409, 412, 422, 503),
    **scoped(Scope.ADMIN),
)
async def delete_child(
    name: NameParam, child: ChildParam, request: Request, ctx: Context, if_match: IfMatch = None
) -> Response:
    document, revision = await connections(ctx).get(name)
    if child not in document.get("children", {}):
        raise ProblemError(404, f"connection '{name}' has no child '{child}'")
    remaining = {k: v for k, v in document.get("children", {}).items() if k != child}
    merged = ConnectionBody.model_validate({**{k: v for k, v in document.items() if k != "psk"}, "children": remaining})
    await _write(request, ctx, name, merged, parse_if_match(if_match) or revision, False)
    return Response(status_code=204)
