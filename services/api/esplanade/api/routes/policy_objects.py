"""/api/v1/{identities,groups,sites,resources,rules}: policy objects, through the policy service."""

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response
from google.protobuf import json_format, struct_pb2

from esplanade.api.auth import Scope
from esplanade.api.conventions import (
    MUST_EXIST,
    ApiContext,
    Context,
    Cursor,
    IfMatch,
    Limit,
    Page,
    decode_cursor,
    encode_cursor,
    etag,
    note_change,
    parse_if_match,
    principal_of,
    scoped,
)
from esplanade.api.policy_models import ID_PATTERN, KIND_MODELS, SINGULAR
from esplanade.api.problems import ProblemError, problem_responses
from esplanade.api.service_clients import call
from esplanade.v1 import policy_pb2

IdParam = Annotated[str, Path(pattern=ID_PATTERN, description="Object id.")]


def view(obj: policy_pb2.PolicyObject) -> dict[str, Any]:
    document = json_format.MessageToDict(obj.document)
    for key, value in list(document.items()):
        # Struct numbers come back as floats: ports 443.0 -> 443.
        if isinstance(value, list):
            document[key] = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    return {**document, "id": obj.id, "revision": obj.revision}


async def fetch(ctx: ApiContext, kind: str, object_id: str) -> dict[str, Any] | None:
    try:
        obj = await call("policy", ctx.clients.policy.GetObject(policy_pb2.GetObjectRequest(kind=kind, id=object_id)))
    except ProblemError as exc:
        if exc.status == 404:
            return None
        raise
    return view(obj)


def _struct(document: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(document)
    return message


async def put_object(
    request: Request, ctx: ApiContext, kind: str, object_id: str, document: dict[str, Any], if_match: int | None
) -> tuple[dict[str, Any], bool]:
    before = await fetch(ctx, kind, object_id)
    if if_match == MUST_EXIST and before is None:
        raise ProblemError(412, f"{SINGULAR[kind]} '{object_id}' does not exist (If-Match: *)")
    expect = if_match if if_match is not None and if_match > 0 else (before["revision"] if before else -1)
    put = policy_pb2.PutObjectRequest(
        object=policy_pb2.PolicyObject(kind=kind, id=object_id, document=_struct(document)),
        expect_revision=expect,
        actor=principal_of(request).actor,
    )
    await call("policy", ctx.clients.policy.PutObject(put), if_match=if_match is not None)
    after = await fetch(ctx, kind, object_id)
    if after is None:
        raise ProblemError(409, f"{SINGULAR[kind]} '{object_id}' was deleted concurrently")
    note_change(request, before, after)
    return after, before is None


def add_kind_routes(router: APIRouter, kind: str) -> None:
    fields_model, create_model, view_model = KIND_MODELS[kind]
    singular = SINGULAR[kind]
    base = f"/api/v1/{kind}"
    links = {
        f"Get{singular.title()}": {"operationId": f"get_{singular}", "parameters": {"object_id": "$response.body#/id"}},
        f"Replace{singular.title()}": {
            "operationId": f"replace_{singular}",
            "parameters": {"object_id": "$response.body#/id"},
        },
        f"Delete{singular.title()}": {
            "operationId": f"delete_{singular}",
            "parameters": {"object_id": "$response.body#/id"},
        },
    }

    async def list_objects(
        ctx: Context,
        limit: Limit = 100,
        cursor: Cursor = None,
        id_prefix: Annotated[str | None, Query(max_length=128, description="Only ids starting with this.")] = None,
    ) -> Any:
        limit = min(limit, ctx.settings.api.max_page_size)
        after = decode_cursor(cursor)
        items: list[dict[str, Any]] = []
        token = after
        while len(items) <= limit:
            reply = await call(
                "policy",
                ctx.clients.policy.ListObjects(
                    policy_pb2.ListObjectsRequest(kind=kind, page_size=limit + 1, page_token=token)
                ),
            )
            items += [view(o) for o in reply.objects if not id_prefix or o.id.startswith(id_prefix)]
            if not reply.next_page_token:
                break
            token = reply.next_page_token
        if len(items) > limit:
            return {"items": items[:limit], "next_cursor": encode_cursor(items[limit - 1]["id"])}
        return {"items": items, "next_cursor": None}

    async def create_object(
        body: Annotated[create_model, Body()],  # type: ignore[valid-type]
        request: Request,
        response: Response,
        ctx: Context,
    ) -> Any:
        document = body.model_dump(mode="json", exclude_none=True)  # type: ignore[attr-defined]
        object_id = document.pop("id")
        if await fetch(ctx, kind, object_id) is not None:
            raise ProblemError(409, f"{singular} '{object_id}' already exists")
        after, _ = await put_object(request, ctx, kind, object_id, document, None)
        response.headers["Location"] = f"{base}/{object_id}"
        response.headers["ETag"] = etag(after["revision"])
        return after

    async def get_object(object_id: IdParam, response: Response, ctx: Context) -> Any:
        found = await fetch(ctx, kind, object_id)
        if found is None:
            raise ProblemError(404, f"{singular} '{object_id}' does not exist")
        response.headers["ETag"] = etag(found["revision"])
        return found

    async def replace_object(
        object_id: IdParam,
        body: Annotated[fields_model, Body()],  # type: ignore[valid-type]
        request: Request,
        response: Response,
        ctx: Context,
        if_match: IfMatch = None,
    ) -> Any:
        document = body.model_dump(mode="json", exclude_none=True)  # type: ignore[attr-defined]
        after, created = await put_object(request, ctx, kind, object_id, document, parse_if_match(if_match))
        response.headers["ETag"] = etag(after["revision"])
        if created:
            response.status_code = 201
            response.headers["Location"] = f"{base}/{object_id}"
        return after

    async def delete_object(object_id: IdParam, request: Request, ctx: Context, if_match: IfMatch = None) -> Response:
        expected = parse_if_match(if_match)
        before = await fetch(ctx, kind, object_id)
        if before is None:
            raise ProblemError(404, f"{singular} '{object_id}' does not exist")
        if expected is not None and expected != MUST_EXIST and expected != before["revision"]:
            raise ProblemError(412, f"{singular} '{object_id}' is at revision {before['revision']}, not {expected}")
        delete = policy_pb2.DeleteObjectRequest(
            kind=kind, id=object_id, expect_revision=before["revision"], actor=principal_of(request).actor
        )
        await call("policy", ctx.clients.policy.DeleteObject(delete), if_match=expected is not None)
        note_change(request, before, None)
        return Response(status_code=204)

    tags: list[str | Enum] = [kind]
    router.add_api_route(
        base,
        list_objects,
        methods=["GET"],
        response_model=Page[view_model],  # type: ignore[valid-type]
        operation_id=f"list_{kind}",
        summary=f"List {kind}",
        tags=tags,
        **scoped(Scope.READ_ONLY),
    )
    router.add_api_route(
        base,
        create_object,
        methods=["POST"],
        status_code=201,
        response_model=view_model,
        operation_id=f"create_{singular}",
        summary=f"Create a {singular}",
        tags=tags,
        responses={**problem_responses(409, 422, 503), 201: {"links": links}},
        **scoped(Scope.ADMIN),
    )
    router.add_api_route(
        base + "/{object_id}",
        get_object,
        methods=["GET"],
        response_model=view_model,
        operation_id=f"get_{singular}",
        summary=f"Get a {singular}",
        tags=tags,
        responses=problem_responses(404),
        **scoped(Scope.READ_ONLY),
    )
    router.add_api_route(
        base + "/{object_id}",
        replace_object,
        methods=["PUT"],
        response_model=view_model,
        operation_id=f"replace_{singular}",
        summary=f"Create or replace a {singular}",
        tags=tags,
        responses={**problem_responses(409, 412, 422, 503), 201: {"model": view_model, "description": "Created"}},
        **scoped(Scope.ADMIN),
    )
    router.add_api_route(
        base + "/{object_id}",
        delete_object,
        methods=["DELETE"],
        status_code=204,
        operation_id=f"delete_{singular}",
        summary=f"Delete a {singular}",
        tags=tags,
        responses=problem_responses(404, 409, 412),
        **scoped(Scope.ADMIN),
    )


router = APIRouter()
for _kind in KIND_MODELS:
    add_kind_routes(router, _kind)
