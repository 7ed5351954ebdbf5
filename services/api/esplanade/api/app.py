"""The FastAPI application: /healthz, /readyz, /docs, /openapi.json and /api/v1/*."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from esplanade.api.auth import FailureLimiter, TokenVerifier
from esplanade.api.conventions import ApiContext, reject_unknown_query
from esplanade.api.middleware import AuditTrail, BodyLimit, RequestMetrics
from esplanade.api.openapi_document import build_openapi
from esplanade.api.problems import install_problem_handlers
from esplanade.api.readiness import Readiness
from esplanade.api.routes import (
    config_objects,
    connections,
    events,
    live,
    observability,
    policy_objects,
    policy_ops,
    tokens_audit,
)
from esplanade.api.service_clients import ServiceClients
from esplanade.config.settings import Settings
from esplanade.journal.audit import AuditLog
from esplanade.store.base import Store
from esplanade.store.sealing import Sealer

# Swagger UI 5 (renders OpenAPI 3.1), served from the fastapi-offline wheel: no CDN.
DOCS_ASSETS = files("fastapi_offline") / "static"
DESCRIPTION = """Manage Esplanade: IKE connections (swanctl model), zero-trust policy (identities, groups,
sites, resources, rules), PKI, pools, tokens, and live SAs.

Conventions: bearer tokens with scopes (read-only < operator < admin; `x-required-scope` on each
operation); `ETag` = store revision, `If-Match` on PUT/DELETE (stale: 412; concurrent change
without If-Match: 409); cursor pages (`?limit=&cursor=`); errors are RFC 9457
`application/problem+json` naming the field; DELETE of an absent object is 404."""


def native_telemetry_settings() -> dict[str, Any]:
    """FastAPI >= 0.16x instruments itself once an OpenTelemetry SDK provider is set. Keep its
    HTTP server span (every request, the parent of the audit span and of the gRPC calls), and
    turn off what would double ours: its `http.server.request.duration` duplicates
    `RequestMetrics` (bounded labels, documented), its log records (validation failures,
    unhandled exceptions with message and stack) repeat what the problem handlers log, outside
    our log pipeline, and its per-request operation spans (dependencies, endpoint,
    serialization) cost ~30 us each for no operator question.
    Older FastAPI has no `telemetry` argument; our middleware does it all there."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": True, "metrics": False, "logs": False, "operation_spans": False}}


def create_app(
    settings: Settings,
    store: Store,
    sealer: Sealer,
    audit: AuditLog | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    readiness = Readiness(settings, store)
    metrics_registry = registry or CollectorRegistry()
    audit_log = audit or AuditLog(settings.api.audit_log_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = ServiceClients(settings)
        verifier = TokenVerifier(store, settings.api.token_cache_seconds)
        token_changes = asyncio.create_task(verifier.follow_changes(), name="api-token-changes")
        app.state.ctx = ApiContext(
            settings=settings,
            store=store,
            sealer=sealer,
            clients=clients,
            verifier=verifier,
            limiter=FailureLimiter(settings.api.auth_failures_per_minute),
            audit=audit_log,
            readiness=readiness,
        )
        try:
            yield
        finally:
            token_changes.cancel()
            await asyncio.gather(token_changes, return_exceptions=True)
            await clients.close()
            await readiness.close()

    app = FastAPI(
        title="Esplanade",
        version="v1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(reject_unknown_query)],
        **native_telemetry_settings(),
    )
    install_problem_handlers(app)

    app.add_middleware(AuditTrail, audit=audit_log)
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(RequestMetrics)
    app.mount("/docs/assets", StaticFiles(directory=str(DOCS_ASSETS)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Esplanade API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon.png",
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Live: the process answers."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition of this service's OpenTelemetry metrics (no auth, like /healthz)."""
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", tags=["health"], responses={503: {"description": "The store does not answer"}})
    async def readyz() -> Any:
        """Ready: the store answers. The keyexchange, dataplane and policy services' health is in
        `checks` but does not gate: an API that left its Service whenever one of them was down
        would hide the very status an operator needs (their calls answer 503 meanwhile)."""
        checks = await readiness.check()
        ready = checks["store"] == "SERVING"
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    for module in (connections, policy_objects, policy_ops, config_objects, live, events, tokens_audit, observability):
        app.include_router(module.router)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app
