"""The FastAPI application: one router per resource, problem+json for every error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

JSON_BODY_LIMIT = 1024 * 1024
"""Bytes of any request body but an upload's: the JSON bodies are a few kilobytes (their
text fields are capped far below this), and FastAPI reads one whole into memory and then
parses it before validating it (a 300 MB body raised the server's RSS by ~900 MB)."""

UPLOAD_PATH = documents.router.prefix  # POST: the one route whose body is streamed


class RefuseOversizedBodies:
    """Answer 413 for a body larger than its route takes: an upload's from its declared
    length, before a byte of it is read (the store counts what is streamed); any other
    body's from its declared length, or, sent without one (chunked), as it arrives, so a
    caller cannot have the server buffer gigabytes of JSON.

    Plain ASGI: ``@app.middleware("http")`` (BaseHTTPMiddleware) costs about 0.1 ms on
    every request, uploads or not."""

    def __init__(self, app: ASGIApp, limit: int, body_limit: int = JSON_BODY_LIMIT) -> None:
        self.app = app
        self.limit = limit
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            if documents.too_large(request, self.limit):
                detail = f"uploads are limited to {self.limit} bytes"
                await problems.problem(413, "Content too large", detail, request)(
                    scope, receive, send
                )
                return
            await self.app(scope, receive, send)
            return
        limit = self.body_limit
        detail = f"a request body is limited to {limit} bytes"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await problems.problem(413, "Content too large", detail, request)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            """Raised on the route's read of the body: FastAPI passes an HTTPException
            on, and the app answers it as problem+json."""
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise StarletteHTTPException(413, detail)
            return message

        await self.app(scope, counted, send)


class SecurityHeaders:
    """``X-Content-Type-Options: nosniff`` on every answer, so a browser never renders an
    original as other than its declared type (an HTML page that also passes for a PDF),
    and ``Cache-Control: no-store`` on every API answer that sets none: they carry loan
    files, originals and new bearer tokens, none of which belong in a browser's cache."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        private = scope["path"].startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if private and "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


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

    app.add_middleware(RefuseOversizedBodies, limit=settings.max_upload_bytes)
    app.add_middleware(SecurityHeaders)  # outermost: its headers go on the 413s too

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
