"""gRPC interceptors: W3C trace context across calls, and a deadline on every call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_tracer = trace.get_tracer("esplanade.rpc")


def _with_metadata(details: grpc.aio.ClientCallDetails, extra: list[tuple[str, str]], timeout: float) -> Any:
    metadata = list(details.metadata or []) + extra
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout if details.timeout is not None else timeout,
        metadata=grpc.aio.Metadata(*metadata),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


def _trace_headers() -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


class _ClientInterceptorBase:
    def __init__(self, default_timeout: float, stream_timeout: float | None = None) -> None:
        self.default_timeout = default_timeout
        # Server-streamed feeds (events, the IKE relay) live as long as the process.
        self.stream_timeout = stream_timeout

    def _details(self, details: grpc.aio.ClientCallDetails, streaming: bool) -> Any:
        timeout = self.stream_timeout if streaming else self.default_timeout
        return _with_metadata(details, _trace_headers(), timeout)  # type: ignore[arg-type]


class UnaryUnaryClient(_ClientInterceptorBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        with _tracer.start_as_current_span(method, kind=SpanKind.CLIENT):
            return await continuation(self._details(details, streaming=False), request)


class UnaryStreamClient(_ClientInterceptorBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self._details(details, streaming=True), request)


class StreamStreamClient(_ClientInterceptorBase, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details, streaming=True), request_iterator)


def client_interceptors(default_timeout: float) -> list[Any]:
    return [
        UnaryUnaryClient(default_timeout),
        UnaryStreamClient(default_timeout),
        StreamStreamClient(default_timeout),
    ]


class ServerTracing(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Continue the caller's trace in a SERVER span around each unary handler."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: Any
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = details.method
        carrier = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            ctx = propagate.extract(carrier)
            with _tracer.start_as_current_span(method, context=ctx, kind=SpanKind.SERVER) as span:
                try:
                    return await inner(request, context)
                except Exception as exc:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    raise

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
