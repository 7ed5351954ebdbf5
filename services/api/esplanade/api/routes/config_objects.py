"""/api/v1/{pools,certificates,cas,crls}: store-backed configuration objects."""

import ipaddress
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, StringConstraints

from esplanade.api.auth import Scope
from esplanade.api.config_collection import ConfigCollection
from esplanade.api.connection_models import NAME_PATTERN, IpAddress, Name, SecretState
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
from esplanade.api.pki_parsing import (
    certificate_facts,
    check_private_key,
    crl_facts,
    load_certificate,
    load_crl,
)
from esplanade.api.problems import ProblemError, problem_responses
from esplanade.store import schema

router = APIRouter()
NameParam = Annotated[str, Path(pattern=NAME_PATTERN)]
Pem = Annotated[str, StringConstraints(min_length=1, max_length=65536)]


def _cidr(value: str) -> str:
    if "-" in value:
        lo, hi = value.split("-", 1)
        a, b = ipaddress.ip_address(lo), ipaddress.ip_address(hi)
        if a.version != b.version or int(a) > int(b):
            raise ValueError("a range is low-high of one IP version")
        return f"{a}-{b}"
    return str(ipaddress.ip_network(value, strict=False))


Cidr = Annotated[
    str, StringConstraints(min_length=2, max_length=91, pattern=r"^[0-9A-Fa-f.:/-]+$"), AfterValidator(_cidr)
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- pools -------------------------------------------------------------------------------------
class PoolBody(Strict):
    """A virtual IP pool (swanctl `pools.<name>`)."""

    addrs: Cidr = Field(description="Addresses handed out: a CIDR or a range a-b.")
    dns: list[IpAddress] = Field(default_factory=list, max_length=8)
    nbns: list[IpAddress] = Field(default_factory=list, max_length=4)
    subnets: list[Cidr] = Field(default_factory=list, max_length=64, description="Split-tunnel subnets.")


class PoolCreate(PoolBody):
    name: Name


class PoolView(PoolBody):
    name: str
    revision: int


# -- certificates, CAs, CRLs ---------------------------------------------------------------------
class CertificateBody(Strict):
    pem: Pem = Field(description="The certificate (PEM).")
    private_key: SecretStr | None = Field(
        None, description="Its private key (PEM, unencrypted; write-only).", json_schema_extra={"writeOnly": True}
    )


class CertificateCreate(CertificateBody):
    name: Name


class CertificateView(BaseModel):
    name: str
    pem: str
    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str
    fingerprint_sha256: str
    key_type: str
    is_ca: bool
    subject_alt_names: list[str]
    private_key: SecretState
    revision: int


class CaBody(Strict):
    pem: Pem = Field(description="The CA certificate (PEM).")


class CaCreate(CaBody):
    name: Name


class CaView(BaseModel):
    name: str
    pem: str
    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str
    fingerprint_sha256: str
    key_type: str
    is_ca: bool
    subject_alt_names: list[str]
    revision: int


class CrlBody(Strict):
    crl: Pem = Field(description="The CRL: PEM, or DER in base64.")


class CrlCreate(CrlBody):
    name: Name


class CrlView(BaseModel):
    name: str
    crl: str
    issuer: str
    last_update: str
    next_update: str | None
    revoked: int
    revision: int


def _pool_doc(body: BaseModel, _: dict[str, Any] | None) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude={"name"})


def _pool_view(name: str, doc: dict[str, Any], revision: int) -> dict[str, Any]:
    return {**doc, "name": name, "revision": revision}


def _cert_doc(body: BaseModel, current: dict[str, Any] | None) -> dict[str, Any]:
    assert isinstance(body, CertificateBody)
    cert = load_certificate(body.pem)
    doc: dict[str, Any] = {"pem": body.pem.strip() + "\n"}
    if body.private_key is not None:
        doc["private_key"] = check_private_key(body.private_key.get_secret_value(), cert)
    elif current and current.get("private_key") and current.get("pem", "").strip() == body.pem.strip():
        doc["private_key"] = current["private_key"]  # the same certificate again: keep its sealed key
    return doc


def _cert_view(name: str, doc: dict[str, Any], revision: int) -> dict[str, Any]:
    facts = certificate_facts(load_certificate(doc["pem"]))
    return {
        "name": name,
        "pem": doc["pem"],
        **facts,
        "private_key": {"set": bool(doc.get("private_key"))},
        "revision": revision,
    }


def _ca_doc(body: BaseModel, _: dict[str, Any] | None) -> dict[str, Any]:
    assert isinstance(body, CaBody)
    cert = load_certificate(body.pem)
    if not certificate_facts(cert)["is_ca"]:
        raise ProblemError(422, "not a CA certificate", [("pem", "basicConstraints CA:TRUE is missing")])
    return {"pem": body.pem.strip() + "\n"}


def _ca_view(name: str, doc: dict[str, Any], revision: int) -> dict[str, Any]:
    return {"name": name, "pem": doc["pem"], **certificate_facts(load_certificate(doc["pem"])), "revision": revision}


def _crl_doc(body: BaseModel, _: dict[str, Any] | None) -> dict[str, Any]:
    assert isinstance(body, CrlBody)
    return {"crl": load_crl(body.crl)[1]}


def _crl_view(name: str, doc: dict[str, Any], revision: int) -> dict[str, Any]:
    loaded, pem = load_crl(doc["crl"])
    return {"name": name, "crl": pem, **crl_facts(loaded), "revision": revision}


Builder = Callable[[BaseModel, dict[str, Any] | None], dict[str, Any]]
Viewer = Callable[[str, dict[str, Any], int], dict[str, Any]]


def add_collection_routes(
    path: str,
    singular: str,
    key: Callable[[str], str],
    prefix: str,
    models: tuple[type[BaseModel], type[BaseModel], type[BaseModel]],
    build: Builder,
    show: Viewer,
) -> None:
    body_model, create_model, view_model = models
    base = f"/api/v1/{path}"
    tags: list[str | Enum] = [path]
    links = {
        f"Get{singular.title()}": {"operationId": f"get_{singular}", "parameters": {"name": "$response.body#/name"}},
        f"Delete{singular.title()}": {
            "operationId": f"delete_{singular}",
            "parameters": {"name": "$response.body#/name"},
        },
    }

    def collection(ctx: ApiContext) -> ConfigCollection:
        return ConfigCollection(ctx.store, ctx.documents, key, prefix, singular)

    async def list_items(ctx: Context, limit: Limit = 100, cursor: Cursor = None) -> Any:
        items = [show(name, doc, rev) for name, doc, rev in await collection(ctx).all()]
        return page_of(items, lambda i: i["name"], limit, cursor, ctx.settings.api.max_page_size)

    async def create_item(
        body: Annotated[create_model, Body()],  # type: ignore[valid-type]
        request: Request,
        response: Response,
        ctx: Context,
    ) -> Any:
        name = body.name  # type: ignore[attr-defined]
        doc = build(body, None)
        revision = await collection(ctx).write(name, doc, 0)
        view = show(name, doc, revision)
        note_change(request, None, view)
        response.headers["Location"] = f"{base}/{name}"
        response.headers["ETag"] = etag(revision)
        return view

    async def get_item(name: NameParam, response: Response, ctx: Context) -> Any:
        doc, revision = await collection(ctx).get(name)
        response.headers["ETag"] = etag(revision)
        return show(name, doc, revision)

    async def replace_item(
        name: NameParam,
        body: Annotated[body_model, Body()],  # type: ignore[valid-type]
        request: Request,
        response: Response,
        ctx: Context,
        if_match: IfMatch = None,
    ) -> Any:
        before, doc, revision, created = await collection(ctx).replace(
            name, lambda current: build(body, current), parse_if_match(if_match)
        )
        view = show(name, doc, revision)
        note_change(request, show(name, before, 0) if before else None, view)
        response.headers["ETag"] = etag(revision)
        if created:
            response.status_code = 201
            response.headers["Location"] = f"{base}/{name}"
        return view

    async def delete_item(name: NameParam, request: Request, ctx: Context, if_match: IfMatch = None) -> Response:
        before = await collection(ctx).delete(name, parse_if_match(if_match))
        note_change(request, show(name, before, 0), None)
        return Response(status_code=204)

    router.add_api_route(
        base,
        list_items,
        methods=["GET"],
        response_model=Page[view_model],  # type: ignore[valid-type]
        operation_id=f"list_{path}",
        tags=tags,
        **scoped(Scope.READ_ONLY),
    )
    router.add_api_route(
        base,
        create_item,
        methods=["POST"],
        status_code=201,
        response_model=view_model,
        operation_id=f"create_{singular}",
        tags=tags,
        responses={**problem_responses(409, 422), 201: {"links": links}},
        **scoped(Scope.ADMIN),
    )
    router.add_api_route(
        base + "/{name}",
        get_item,
        methods=["GET"],
        response_model=view_model,
        operation_id=f"get_{singular}",
        tags=tags,
        responses=problem_responses(404),
        **scoped(Scope.READ_ONLY),
    )
    router.add_api_route(
        base + "/{name}",
        replace_item,
        methods=["PUT"],
        response_model=view_model,
        operation_id=f"replace_{singular}",
        tags=tags,
        responses={**problem_responses(409, 412, 422), 201: {"model": view_model, "description": "Created"}},
        **scoped(Scope.ADMIN),
    )
    router.add_api_route(
        base + "/{name}",
        delete_item,
        methods=["DELETE"],
        status_code=204,
        operation_id=f"delete_{singular}",
        tags=tags,
        responses=problem_responses(404, 409, 412),
        **scoped(Scope.ADMIN),
    )


add_collection_routes(
    "pools",
    "pool",
    schema.pool,
    schema.prefix("config", "pools"),
    (PoolBody, PoolCreate, PoolView),
    _pool_doc,
    _pool_view,
)
add_collection_routes(
    "certificates",
    "certificate",
    schema.certificate,
    schema.prefix("config", "certs"),
    (CertificateBody, CertificateCreate, CertificateView),
    _cert_doc,
    _cert_view,
)
add_collection_routes(
    "cas", "ca", schema.ca, schema.prefix("config", "cas"), (CaBody, CaCreate, CaView), _ca_doc, _ca_view
)
add_collection_routes(
    "crls", "crl", schema.crl, schema.prefix("config", "crls"), (CrlBody, CrlCreate, CrlView), _crl_doc, _crl_view
)
