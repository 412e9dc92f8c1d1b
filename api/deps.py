"""Dependencies shared by the routers: the application, the caller, and command plumbing."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.encoding import jsonable
from api.problems import problem
from archive.application import ArchiveApp, Outcome, Principal, StaleVersionError
from archive.domain import CommandContext, Role
from archive.exceptions import (
    ArchiveError,
    AuthenticationError,
    DomainError,
    PermissionDeniedError,
    PreconditionFailedError,
)
from archive.principals import Principals
from projections.audit_trail import AuditTrailView
from projections.loan_files import LoanFilesView
from projections.runner import Projections

bearer = HTTPBearer(auto_error=False, description="A token from `loan-archive users add`.")

ALL_ROLES = frozenset(Role)


async def get_archive(request: Request) -> ArchiveApp:
    """Async because it only reads app state: a sync dependency costs a thread-pool hop."""
    return request.app.state.archive


Archive = Annotated[ArchiveApp, Depends(get_archive)]


def principals(request: Request) -> Principals:
    """The app's principal cache (``create_app`` makes it; an app assembled by hand,
    as in the benchmarks, gets one on first use)."""
    state = request.app.state
    found: Principals | None = getattr(state, "principals", None)
    if found is None or found.archive is not state.archive:
        found = state.principals = Principals(state.archive)
    return found


def log_head(request: Request) -> int:
    """The log head as of this request: read with the caller's authentication (one
    statement for both), else now. Either way it is read after the request arrived, so
    the read barrier it feeds covers every write acknowledged before."""
    head: int | None = getattr(request.state, "log_head", None)
    if head is None:
        head = request.app.state.archive.head_position()
    return head


def authenticate(request: Request, token: str) -> Principal:
    """The token's principal, checked against the log in one read (see archive.principals);
    that read's log head is kept for the request's read barrier."""
    principal, request.state.log_head = principals(request).authenticate(token)
    return principal


READ_WAIT_SECONDS = 2.0


def fresh_views(request: Request, names: Sequence[str]) -> Projections:
    """The read models, with the ``names`` views brought up to the log head as of this
    request, so a client always reads its own earlier writes (bounded wait; 503 if they
    lag behind). Only the views a route reads are waited for: one stuck view delays its
    own routes, not every read."""
    views: Projections = request.app.state.projections
    head = log_head(request)
    if not views.fresh(head, READ_WAIT_SECONDS, names):
        raise ViewsLaggingError(
            f"the {', '.join(names)} view has not yet reached position {head}; retry shortly"
        )
    return views


def _loan_files(request: Request) -> Projections:
    return fresh_views(request, (LoanFilesView.name,))


def _audit_trail(request: Request) -> Projections:
    return fresh_views(request, (AuditTrailView.name,))


LoanFilesViews = Annotated[Projections, Depends(_loan_files)]
AuditTrailViews = Annotated[Projections, Depends(_audit_trail)]


class ViewsLaggingError(ArchiveError):
    status = 503
    title = "Read models lagging"


async def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller. Async so that the usual case, a principal AuthFirstRoute already
    checked, costs no thread-pool hop; the token lookup itself reads the database and
    so runs in the pool."""
    known = getattr(request.state, "principal", None)
    if known is not None:
        return known
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("send Authorization: Bearer <token>")
    return await run_in_threadpool(authenticate, request, credentials.credentials)


def admit(principal: Principal, allowed: frozenset[Role]) -> Principal:
    if principal.role not in allowed:
        names = ", ".join(sorted(r.value for r in allowed))
        raise PermissionDeniedError(f"role {principal.role.value} may not do this; needs {names}")
    return principal


def require(*roles: Role) -> Callable[..., Principal]:
    """A dependency that admits only callers with one of ``roles``."""
    allowed = frozenset(roles)

    async def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        return admit(principal, allowed)  # pure: async, so no thread-pool hop

    check.allowed_roles = allowed  # type: ignore[attr-defined]  # read by AuthFirstRoute
    return check


def require_in_handler(*roles: Role) -> Callable[..., Coroutine[Any, Any, None]]:
    """Declares that only callers with one of ``roles`` may use a route whose handler
    authenticates them itself, by calling ``authorize(request)`` first in the thread-pool
    hop that does its blocking work: one hop per request instead of two (each is two
    thread wake-ups, which a busy machine makes dear). AuthFirstRoute still answers
    401/403 before any other error, and refuses an answer made without ``authorize``."""
    allowed = frozenset(roles)

    async def declared(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        """Checks nothing (the handler does); declares the bearer scheme for OpenAPI."""

    declared.allowed_roles = allowed  # type: ignore[attr-defined]  # read by AuthFirstRoute
    declared.in_handler = True  # type: ignore[attr-defined]
    return declared


def _guard(dependant: Dependant) -> Callable[..., Any] | None:
    """The dependency that declares a route's roles (``require`` or ``require_in_handler``)."""
    for dependency in dependant.dependencies:
        if getattr(dependency.call, "allowed_roles", None) is not None:
            return dependency.call
        nested = _guard(dependency)
        if nested is not None:
            return nested
    return None


def _authorize(request: Request, roles: frozenset[Role]) -> Principal:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("send Authorization: Bearer <token>")
    return admit(authenticate(request, token.strip()), roles)


def authorize(request: Request) -> Principal:
    """The caller of a ``require_in_handler`` route, refused unless they have one of its
    roles; blocking (it reads the log), so call it in the handler's thread-pool hop,
    before anything else. The log head it reads is then the request's (``log_head``)."""
    principal = _authorize(request, request.state.allowed_roles)
    request.state.principal = principal
    return principal


class AuthFirstRoute(APIRoute):
    """Authenticate and check the role before the body is parsed, so a caller who may
    not use a route learns 401/403 whatever they sent, never a 422 (or a spooled upload)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guard = _guard(self.dependant)
        if guard is None:
            return handler
        roles: frozenset[Role] = guard.allowed_roles  # type: ignore[attr-defined]
        if getattr(guard, "in_handler", False):
            return self._authorized_in_handler(handler, roles)

        async def guarded(request: Request) -> Response:
            try:
                principal = await run_in_threadpool(_authorize, request, roles)
            except ArchiveError as exc:
                return problem(exc.status, exc.title, str(exc), request)
            request.state.principal = principal
            return await handler(request)

        return guarded

    def _authorized_in_handler(
        self, handler: Callable[[Request], Coroutine[Any, Any, Response]], roles: frozenset[Role]
    ) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Parameters are validated before the caller is known here, so any error met
        before ``authorize`` ran (a 422 included) waits until the caller is checked:
        401/403 comes first, as on every other route."""
        path = self.path

        async def guarded(request: Request) -> Response:
            request.state.allowed_roles = roles
            try:
                response = await handler(request)
            except Exception:
                if getattr(request.state, "principal", None) is None:
                    try:
                        await run_in_threadpool(authorize, request)
                    except ArchiveError as exc:
                        return problem(exc.status, exc.title, str(exc), request)
                raise
            if getattr(request.state, "principal", None) is None:
                raise RuntimeError(f"{path} answered without calling authorize(request)")
            return response

        return guarded


def context(
    principal: Principal,
    request: Request,
    reason: str | None,
) -> CommandContext:
    return principal.context(reason, request.headers.get("x-correlation-id"))


def state_response(state: dict[str, Any]) -> JSONResponse:
    """An aggregate's state as JSON, with its version as the ETag (for If-Match)."""
    return JSONResponse(jsonable(state), headers={"ETag": f'"{state["version"]}"'})


IF_MATCH = re.compile(r'^\s*(?:W/)?"?0*(\d{1,19})"?\s*$')
"""A version ETag: no version has more than 19 digits (``MAX_VERSION``), and a longer
number would reach int(), which refuses thousands of digits (a 500, not a 422)."""


def expected_version(if_match: str | None, body_version: int | None) -> tuple[int | None, bool]:
    """The version the caller expects, and whether it came from If-Match (412, not 409)."""
    if if_match is not None and if_match.strip() != "*":
        found = IF_MATCH.match(if_match)
        if not found:
            raise DomainError(f'If-Match must be a version ETag like "3", got {if_match!r}')
        header_version = int(found.group(1))
        if body_version is not None and body_version != header_version:
            raise DomainError("If-Match and expected_version disagree")
        return header_version, True
    return body_version, False


IfMatch = Annotated[str | None, Header(description='Version ETag, e.g. "3"; 412 if stale.')]


def run_command(
    call: Callable[[int | None], Outcome],
    if_match: str | None,
    body_version: int | None,
    status_code: int = 200,
    location: str | None = None,
) -> JSONResponse:
    """Run one command under optimistic locking and answer with its outcome and ETag."""
    version, from_header = expected_version(if_match, body_version)
    try:
        outcome = call(version)
    except StaleVersionError as exc:
        if from_header:
            raise PreconditionFailedError(str(exc)) from None
        raise
    headers = {"ETag": f'"{outcome.version}"'}
    if location:
        headers["Location"] = location
    body: dict[str, Any] = {
        "id": outcome.id,
        "version": outcome.version,
        "position": outcome.position,
    }
    return JSONResponse(jsonable(body), status_code=status_code, headers=headers)
