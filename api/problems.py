"""RFC 9457 problem details for every error, so clients see one shape whatever failed."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from archive.exceptions import ArchiveError, AuthenticationError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    request: Request,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An RFC 9457 problem response; ``headers`` are added (e.g. the ``Allow`` of a 405)."""
    body = {
        "type": f"/problems/{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    sent = dict(headers or {})
    if status == 401:
        sent.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=sent)


def _unparsed_body(error: Mapping[str, Any]) -> bool:
    """Whether FastAPI left a JSON body as bytes because its Content-Type was not JSON
    (curl's ``-d`` sends form-urlencoded): JSON never decodes to bytes. Reported as
    "Input should be a valid dictionary", which sends the client looking at its fields."""
    return tuple(error.get("loc", ())) == ("body",) and isinstance(error.get("input"), bytes)


def _described(error: Mapping[str, Any]) -> dict[str, str]:
    """One validation error as ``location`` and ``message``. FastAPI reports a body that
    is not JSON at ``body.<offset>`` as "JSON decode error", which reads as a field
    named by a number and drops what the parser found: both are said here."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid" and len(loc) == 2 and isinstance(loc[1], int):
        found = (error.get("ctx") or {}).get("error", "")
        return {"location": "body", "message": f"not valid JSON at character {loc[1]}: {found}"}
    return {"location": ".".join(str(p) for p in loc), "message": error.get("msg", "")}


def _routes(app: FastAPI) -> Iterable[Any]:
    """Every route, those of included routers too: recent FastAPI keeps an included
    router as one lazy entry of ``app.routes``; older versions copy its routes in."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI: app.routes is flat
        return app.routes
    return iter_route_contexts(app.routes)


def _allowed_methods(request: Request) -> list[str]:
    """Every method a route answers at this path. Starlette's 405 names only the first
    route whose path matched, so ``/api/v1/loans`` (GET and POST, two routes) said
    ``Allow: POST`` to an OPTIONS, and ``/documents/fixity-checks`` ``Allow: GET``."""
    methods: set[str] = set()
    for route in _routes(request.app):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(ArchiveError)
    def archive_error(request: Request, exc: ArchiveError) -> JSONResponse:
        return problem(exc.status, exc.title, str(exc), request)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(_unparsed_body(e) for e in exc.errors()):
            sent = request.headers.get("content-type") or "no Content-Type"
            return problem(
                415,
                "Unsupported media type",
                f"the body must be JSON sent with Content-Type: application/json (got {sent})",
                request,
            )
        errors = [_described(e) for e in exc.errors()]
        summary = "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5])
        return problem(422, "Invalid request", summary, request, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            return problem(
                405,
                "Method not allowed",
                f"{request.method} is not allowed here; use {' or '.join(allowed)}",
                request,
                headers={**(exc.headers or {}), "Allow": ", ".join(allowed)},
            )
        title = {404: "Not found", 405: "Method not allowed", 413: "Content too large"}.get(
            exc.status_code, "HTTP error"
        )
        return problem(exc.status_code, title, str(exc.detail), request, headers=exc.headers)

    @app.exception_handler(Exception)
    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(
            500, "Internal error", "an unexpected error occurred; it was logged", request
        )


__all__ = ["PROBLEM_JSON", "AuthenticationError", "install", "problem"]
