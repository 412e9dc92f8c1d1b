"""The FastAPI application: one router per resource, problem+json for every error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api import collateral, integrity, loans, problems, users, valuations
from archive.application import ArchiveApp
from archive.settings import Settings


def create_app(settings: Settings, archive: ArchiveApp | None = None) -> FastAPI:
    """Build the HTTP app around an ArchiveApp (made from ``settings`` unless given)."""
    own = archive is None
    archive = archive or ArchiveApp(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own:
            archive.close()

    app = FastAPI(
        title="loan-archive",
        version="0.1.0",
        summary="Event-sourced archive and audit service for loan files.",
        lifespan=lifespan,
    )
    app.state.archive = archive
    app.state.settings = settings
    problems.install(app)
    for module in (loans, collateral, valuations, users, integrity):
        app.include_router(module.router)

    @app.get("/healthz", tags=["health"], summary="Liveness and event-store reachability")
    def healthz(request: Request) -> JSONResponse:
        head = request.app.state.archive.head_position()
        return JSONResponse({"status": "ok", "backend": settings.backend, "log_head": head})

    return app
