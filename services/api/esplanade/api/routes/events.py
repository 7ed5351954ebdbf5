"""/api/v1/events: Server-Sent Events of SAs, rekeys, auth failures, dataplane and policy changes.

Fan-in of KeyExchange.WatchEvents, Dataplane.WatchEvents and a store watch on ``policy/``
(object changes, not compiled documents). Each event is::

    event: ike_up
    data: {"source": "keyexchange", "kind": "ike_up", "time": ..., "connection": "gw", ...}

A source that fails is retried (with back-off) and reported once as ``event: source_down``.
Idle streams get a ``: keep-alive`` comment every `api.events_keepalive_seconds`. When the
server shuts down, every stream ends with a ``: server stopping`` comment (clients reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from google.protobuf import json_format

from esplanade.api.auth import Scope
from esplanade.api.conventions import ApiContext, Context, scoped
from esplanade.policy.store_state import object_key_parts
from esplanade.store import schema
from esplanade.store.base import Resync
from esplanade.v1 import dataplane_pb2, keyexchange_pb2

router = APIRouter(tags=["events"])
Event = dict[str, Any]
Emit = Callable[[Event], Awaitable[None]]


async def keyexchange_events(ctx: ApiContext, emit: Emit) -> None:
    stream = ctx.clients.keyexchange.WatchEvents(keyexchange_pb2.WatchEventsRequest(), timeout=None)
    async for event in stream:
        doc = json_format.MessageToDict(event, preserving_proto_field_name=True)
        await emit({"source": "keyexchange", **doc})


async def dataplane_events(ctx: ApiContext, emit: Emit) -> None:
    stream = ctx.clients.dataplane.WatchEvents(dataplane_pb2.WatchDataplaneEventsRequest(), timeout=None)
    async for event in stream:
        doc = json_format.MessageToDict(event, preserving_proto_field_name=True)
        await emit({"source": "dataplane", **doc, "kind": f"dataplane_{event.kind}"})


async def policy_events(ctx: ApiContext, emit: Emit) -> None:
    async for item in ctx.store.watch(schema.prefix("policy")):
        if isinstance(item, Resync):
            await emit({"source": "policy", "kind": "policy_resync", "time": time.time(), "revision": item.revision})
            continue
        for event in item.events:
            parts = object_key_parts(event.kv.key)
            if parts is None:
                continue
            await emit(
                {
                    "source": "policy",
                    "kind": "policy_changed",
                    "time": time.time(),
                    "action": "delete" if event.type.value == "delete" else "put",
                    "object_kind": parts[0],
                    "id": parts[1],
                    "revision": event.kv.mod_revision,
                }
            )


async def _retrying(name: str, source: Callable[[], Awaitable[None]], emit: Emit) -> None:
    delay = 0.5
    reported = False
    while True:
        try:
            await source()
            delay = 0.5
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, Exception) as exc:
            if not reported:
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                await emit({"source": name, "kind": "source_down", "time": time.time(), "reason": reason})
                reported = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


def format_event(event: Event) -> str:
    return f"event: {event.get('kind', 'message')}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def event_stream(
    ctx: ApiContext, request: Request, kinds: set[str], sources: set[str], limit: int
) -> AsyncIterator[str]:
    # None is the end of the stream: the server is stopping
    queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=10_000)

    def enqueue(event: Event | None) -> None:
        if queue.full():
            queue.get_nowait()  # a slow client loses the oldest events, never blocks the sources
        queue.put_nowait(event)

    async def emit(event: Event) -> None:
        if (not kinds or event.get("kind") in kinds) and (not sources or event.get("source") in sources):
            enqueue(event)

    async def end_when_stopping() -> None:
        await ctx.stopping.wait()
        enqueue(None)

    feeds = {
        "keyexchange": lambda: keyexchange_events(ctx, emit),
        "dataplane": lambda: dataplane_events(ctx, emit),
        "policy": lambda: policy_events(ctx, emit),
    }
    tasks = [
        asyncio.create_task(_retrying(name, feed, emit))
        for name, feed in feeds.items()
        if not sources or name in sources
    ]
    tasks.append(asyncio.create_task(end_when_stopping()))
    sent = 0
    try:
        yield ": connected\n\n"
        while limit == 0 or sent < limit:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=ctx.settings.api.events_keepalive_seconds)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                continue
            if event is None:
                yield ": server stopping\n\n"
                return
            yield format_event(event)
            sent += 1
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@router.get(
    "/api/v1/events",
    operation_id="stream_events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "SSE stream"}},
    **scoped(Scope.READ_ONLY),
)
async def stream_events(
    request: Request,
    ctx: Context,
    kinds: Annotated[str | None, Query(max_length=1024, description="Comma-separated event kinds to keep.")] = None,
    sources: Annotated[
        str | None, Query(max_length=64, description="Comma-separated: keyexchange, dataplane, policy.")
    ] = None,
    limit: Annotated[int, Query(ge=0, le=1_000_000, description="Stop after this many events (0: never).")] = 0,
) -> StreamingResponse:
    """Follow events as Server-Sent Events. When the server shuts down the stream ends with a
    `: server stopping` comment: reconnect."""
    kind_set = {k.strip() for k in (kinds or "").split(",") if k.strip()}
    source_set = {s.strip() for s in (sources or "").split(",") if s.strip()}
    return StreamingResponse(
        event_stream(ctx, request, kind_set, source_set, limit),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
