"""The FastAPI application: one router per resource, problem+json for every error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api import (
    audit,
    collateral,
    documents,
    integrity,
    loans,
    problems,
    projection_status,
    reports,
    search,
    users,
    valuations,
)
from archive.application import ArchiveApp
from archive.principals import Principals
from archive.settings import Settings
from projections.runner import Projections


class RefuseOversizedUploads:
    """Answer 413 from the declared length, before a byte of the body is read.

    Plain ASGI: ``@app.middleware("http")`` (BaseHTTPMiddleware) costs about 0.1 ms on
    every request, uploads or not."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            request = Request(scope)
            if documents.too_large(request, self.limit):
                response = problems.problem(
                    413, "Content too large", f"uploads are limited to {self.limit} bytes", request
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings, archive: ArchiveApp | None = None) -> FastAPI:
    """Build the HTTP app around an ArchiveApp (made from ``settings`` unless given)."""
    own = archive is None
    archive = archive or ArchiveApp(settings)
    views = Projections.open(settings, archive)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        views.start()
        yield
        views.close()
        if own:
            archive.close()

    app = FastAPI(
        title="loan-archive",
        version="0.1.0",
        summary="Event-sourced archive and audit service for loan files.",
        lifespan=lifespan,
    )
    app.state.archive = archive
    app.state.principals = Principals(archive)  # see api.deps.authenticate
    app.state.projections = views
    app.state.settings = settings
    problems.install(app)
    for module in (
        loans,
        collateral,
        valuations,
        documents,
        audit,
        projection_status,
        reports,
        search,
        users,
        integrity,
    ):
        app.include_router(module.router)

    app.add_middleware(RefuseOversizedUploads, limit=settings.max_upload_bytes)

    @app.get("/healthz", tags=["health"], summary="Liveness, event-store reachability, views")
    def healthz(request: Request) -> JSONResponse:
        """200 while the process serves and its event store answers. ``status`` is
        "degraded" while a view's follower keeps failing (its routes answer 503; it is
        retried, never skipped): the signal to alert on. Restarting would not help, so
        it is not an error status. Only names here, as no token is needed; the error is
        in ``GET /api/v1/projections``."""
        head = request.app.state.archive.head_position()
        failing = request.app.state.projections.failing()
        return JSONResponse(
            {
                "status": "degraded" if failing else "ok",
                "backend": settings.backend,
                "log_head": head,
                "failing_views": failing,
            }
        )

    return app
