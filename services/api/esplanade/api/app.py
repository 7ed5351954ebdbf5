"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from esplanade.api.readiness import Readiness
from esplanade.config.settings import Settings
from esplanade.store.base import Store


def create_app(settings: Settings, store: Store) -> FastAPI:
    readiness = Readiness(settings, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await readiness.close()

    app = FastAPI(title="Esplanade", version="v1", lifespan=lifespan)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Live: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "A dependency is down"}})
    async def readyz() -> Any:
        """Ready: the store and the keyexchange, dataplane and policy services all answer SERVING."""
        checks = await readiness.check()
        ready = all(state == "SERVING" for state in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    return app
