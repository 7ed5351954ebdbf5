"""ASGI middleware: the request size limit, the audit record of every mutating call, and the
latency of every request by route."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from opentelemetry import propagate, trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from esplanade.api.problems import PROBLEM_MEDIA_TYPE, TYPE_BASE
from esplanade.journal.audit import AuditLog
from esplanade.telemetry.metrics import meter

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def _send_problem(send: Send, status: int, title: str, detail: str, path: str) -> None:
    body = json.dumps(
        {
            "type": TYPE_BASE + "too-large",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": path,
            "errors": [{"field": "", "message": detail}],
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, by Content-Length or while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"the request body exceeds {self.max_bytes} bytes (api.max_body_bytes)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = 0
                if length > self.max_bytes:
                    await _drain(receive)
                    await _send_problem(send, 413, "Request body too large", detail, scope.get("path", ""))
                    return
        seen = 0
        refused = False

        async def limited() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer 413 now; the application sees a client that went away.
                    refused = True
                    await _send_problem(send, 413, "Request body too large", detail, scope.get("path", ""))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not refused:
                raise


async def _drain(receive: Receive) -> None:
    """Read (and drop) what the client sends, up to a bound, so it sees our answer."""
    budget = 64 << 20
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class AuditTrail:
    """Record every POST/PUT/PATCH/DELETE under /api/: who, what, before/after, result, trace id."""

    def __init__(self, app: ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        # The parent: the HTTP server span when one is current (FastAPI's own instrumentation,
        # which already continued the caller's traceparent), else the caller's traceparent. Always
        # extracting from the headers made this span a second root beside FastAPI's server span.
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            parent = propagate.extract(carrier)
        tracer = trace.get_tracer("esplanade.api")
        with tracer.start_as_current_span(f"{scope['method']} {scope['path']}", context=parent):
            try:
                await self.app(scope, receive, watching)
            finally:
                self._record(scope, status)

    def _record(self, scope: Scope, status: int) -> None:
        state: dict[str, Any] = scope.get("state", {})
        principal = state.get("principal")
        route = scope.get("route")
        template = getattr(route, "path", scope["path"])
        client = scope.get("client")
        try:
            self.audit.record(
                actor=principal.actor if principal is not None else "anonymous",
                action=f"{scope['method']} {template}",
                target=scope["path"],
                before=state.get("audit_before"),
                after=state.get("audit_after"),
                result="ok" if status < 400 else f"error {status}",
                source=client[0] if client else "",
                detail=str(state.get("audit_detail", "")),
            )
        except Exception:  # the audit journal failing must be loud, but not turn a done write into a 500
            log.exception("could not write the audit record")


class RequestMetrics:
    """`http.server.request.duration` (OpenTelemetry HTTP semantic conventions) by method, route
    template (never the raw path: bounded labels) and status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.duration = meter("api").create_histogram(
            "http.server.request.duration", unit="s", description="Duration of HTTP requests by route"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watching)
        finally:
            route = getattr(scope.get("route"), "path", "") or "unmatched"
            attrs = {"http.request.method": scope["method"], "http.route": route, "http.response.status_code": status}
            self.duration.record(time.perf_counter() - started, attrs)
