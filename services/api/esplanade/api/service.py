"""The api service process: FastAPI on uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn
from fastapi import FastAPI

from esplanade.api.app import create_app
from esplanade.api.auth import announce_bootstrap_token, ensure_bootstrap_token
from esplanade.config.loading import ConfigError
from esplanade.config.settings import Settings
from esplanade.runtime.service_host import setup_telemetry
from esplanade.store.factory import open_sealer, open_store

log = logging.getLogger(__name__)

# after this long, requests still running at shutdown are cancelled (Kubernetes sends SIGKILL
# 30 s after SIGTERM by default; this leaves the rest of the process time to close cleanly)
GRACEFUL_SHUTDOWN_SECONDS = 10


class ApiServer(uvicorn.Server):
    """uvicorn's server, which first tells open event streams to end when it shuts down:
    uvicorn waits for open connections to finish, and an SSE stream never finishes by itself."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ctx = getattr(self.app.state, "ctx", None)
        if ctx is not None:
            ctx.stopping.set()
        await super().shutdown(sockets)


def server_config(settings: Settings, app: FastAPI) -> uvicorn.Config:
    """uvicorn's configuration for the API at `endpoints.api`. Forwarded headers are believed
    from `api.trusted_proxies` only (uvicorn's own FORWARDED_ALLOW_IPS is not consulted)."""
    host, _, port = settings.endpoints.api.rpartition(":")
    return uvicorn.Config(
        app,
        host=host.strip("[]"),
        port=int(port),
        log_config=None,
        access_log=False,
        limit_concurrency=1024,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        proxy_headers=True,
        forwarded_allow_ips=list(settings.api.trusted_proxies),
    )


async def serve(settings: Settings) -> None:
    registry = setup_telemetry("api", settings)
    sealer = open_sealer(settings.kek)
    store = open_store(settings.store)
    await store.connect()
    try:
        token = await ensure_bootstrap_token(store, settings.api.bootstrap_token_file)
    except (OSError, ValueError) as exc:
        await store.close()
        raise ConfigError(str(exc)) from None
    if token is not None:
        announce_bootstrap_token(token)
    app = create_app(settings, store, sealer, registry=registry)
    server = ApiServer(server_config(settings, app), app)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    # uvicorn installs its own handlers in serve(); capture_signals is skipped this way.
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    try:
        await server.serve()
    finally:
        await store.close()
