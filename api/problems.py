"""RFC 9457 problem details for every error, so clients see one shape whatever failed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
        errors = [
            {
                "location": ".".join(str(p) for p in e.get("loc", ())),
                "message": e.get("msg", ""),
            }
            for e in exc.errors()
        ]
        summary = "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5])
        return problem(422, "Invalid request", summary, request, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        return problem(exc.status_code, title, str(exc.detail), request, headers=exc.headers)

    @app.exception_handler(Exception)
    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(
            500, "Internal error", "an unexpected error occurred; it was logged", request
        )


__all__ = ["PROBLEM_JSON", "AuthenticationError", "install", "problem"]
