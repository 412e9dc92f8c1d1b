"""The per-process principal cache (archive/principals.py) and its use by the API: one
read per request, and every revocation, deactivation or role change, by any process,
effective on the very next request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.testclient import TestClient
from starlette.concurrency import run_in_threadpool

from api import problems
from api.app import create_app
from api.deps import AuthFirstRoute, authorize, require_in_handler
from archive.application import ArchiveApp, operator_context
from archive.domain import Role
from archive.exceptions import AuthenticationError
from archive.principals import Principals
from archive.settings import Settings
from archive.users import token_digest

ME = "/api/v1/users/me"
SEARCH = "/api/v1/search?q=hipoteca"


@pytest.fixture
def client(settings: Settings, archive: ArchiveApp) -> Iterator[TestClient]:
    with TestClient(create_app(settings, archive), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def other_process(settings: Settings) -> Iterator[ArchiveApp]:
    """A second application on the same database: what the CLI or another server does."""
    other = ArchiveApp(settings)
    yield other
    other.close()


def get(client: TestClient, path: str, token: str) -> Any:
    return client.get(path, headers={"Authorization": f"Bearer {token}"})


def cached(client: TestClient, token: str) -> bool:
    principals: Principals = client.app.state.principals  # type: ignore[attr-defined]
    return token_digest(token) in principals._entries


def test_a_token_revoked_by_another_process_is_refused_on_the_next_request(
    client: TestClient, archive: ArchiveApp, other_process: ArchiveApp
) -> None:
    token = archive.add_user(operator_context(), "ana.compliance", "compliance")
    for _ in range(2):
        assert get(client, SEARCH, token).status_code == 200
        assert get(client, ME, token).json() == {"name": "ana.compliance", "role": "compliance"}
    assert cached(client, token)
    other_process.revoke_token(operator_context("left the bank"), token)
    for path in (SEARCH, ME):
        refused = get(client, path, token)
        assert refused.status_code == 401, refused.text
        assert "revoked" in refused.json()["detail"]
    assert not cached(client, token)


def test_a_user_deactivated_or_demoted_elsewhere_is_refused_on_the_next_request(
    client: TestClient, archive: ArchiveApp, other_process: ArchiveApp
) -> None:
    first = archive.add_user(operator_context(), "eva.auditor", "auditor")
    second = archive.issue_token(operator_context(), "eva.auditor")
    assert get(client, SEARCH, first).status_code == 200
    assert get(client, SEARCH, second).status_code == 200
    ctx = operator_context("moved to archiving")
    other_process.change_user(ctx, "eva.auditor", lambda u: u.change_role(ctx, "archivist"))
    demoted = get(client, SEARCH, first)
    assert demoted.status_code == 403, demoted.text  # search is not for archivists
    assert get(client, ME, second).json()["role"] == "archivist"
    ctx = operator_context("left the bank")
    other_process.change_user(ctx, "eva.auditor", lambda u: u.deactivate(ctx))
    for token in (first, second):
        refused = get(client, ME, token)
        assert refused.status_code == 401
        assert "deactivated" in refused.json()["detail"]


def test_a_known_principal_costs_one_read_that_also_gives_the_log_head(
    archive: ArchiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = archive.add_user(operator_context(), "ana.compliance", "compliance")
    principals = Principals(archive)
    principal, head = principals.authenticate(token)
    assert (principal.name, principal.role, head) == (
        "ana.compliance",
        Role.COMPLIANCE,
        archive.head_position(),
    )

    def no_rebuild(token: str) -> None:
        raise AssertionError("a cached principal must not be rebuilt from its aggregates")

    monkeypatch.setattr(archive, "authenticate", no_rebuild)
    reads = []
    real = principals.versions
    monkeypatch.setattr(principals, "versions", lambda *a: reads.append(a) or real(*a))
    archive.add_user(operator_context(), "someone.else", "auditor")  # the log moves on
    assert principals.authenticate(token) == (principal, archive.head_position())
    assert len(reads) == 1


def test_unknown_tokens_are_not_remembered_and_the_cache_is_bounded(
    archive: ArchiveApp,
) -> None:
    principals = Principals(archive, size=2)
    with pytest.raises(AuthenticationError, match="unknown"):
        principals.authenticate("la_not-a-token")
    assert not principals._entries
    tokens = [archive.add_user(operator_context(), f"user.{n}", "auditor") for n in range(3)]
    for token in tokens:
        principals.authenticate(token)
    assert list(principals._entries) == [token_digest(t) for t in tokens[1:]]
    assert principals.authenticate(tokens[0])[0].name == "user.0"  # evicted: derived again


def test_a_change_landing_while_a_principal_is_derived_is_never_cached_as_current(
    archive: ArchiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The versions are read before the aggregates, so the state is never older than the
    versions it is cached with: a deactivation landing just before that read (after an
    earlier derivation would have run) is refused now and on every later request."""
    token = archive.add_user(operator_context(), "ana.compliance", "compliance")
    principals = Principals(archive)
    principals.authenticate(token)
    ctx = operator_context("role review")
    archive.change_user(ctx, "ana.compliance", lambda u: u.change_role(ctx, "auditor"))
    real = principals.versions
    calls = []

    def deactivated_meanwhile(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 2:  # the stale entry was detected; now the re-derivation's read
            archive.change_user(ctx, "ana.compliance", lambda u: u.deactivate(ctx))
        return real(*args)

    monkeypatch.setattr(principals, "versions", deactivated_meanwhile)
    for _ in range(2):
        with pytest.raises(AuthenticationError, match="deactivated"):
            principals.authenticate(token)
    assert len(calls) >= 2


# -- routes that authenticate in their handler's thread-pool hop (require_in_handler) -------


def test_search_authenticates_in_the_one_hop_that_runs_the_query(
    client: TestClient, archive: ArchiveApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = archive.add_user(operator_context(), "ana.compliance", "compliance")
    hops = []
    real = anyio.to_thread.run_sync

    async def counted(*args: Any, **kwargs: Any) -> Any:
        hops.append(args[0])
        return await real(*args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    assert get(client, SEARCH, token).status_code == 200
    assert len(hops) == 1


def test_the_caller_is_checked_before_a_bad_search_is_refused(
    client: TestClient, archive: ArchiveApp, other_process: ArchiveApp
) -> None:
    """Parameters are validated before the handler authenticates, yet a caller who may not
    search learns 401/403, never a 422: AuthFirstRoute holds the 422 back until then."""
    searcher = archive.add_user(operator_context(), "ana.compliance", "compliance")
    archivist = archive.add_user(operator_context(), "rosa.archivist", "archivist")
    for bad in ("/api/v1/search", "/api/v1/search?q=", "/api/v1/search?q=-only&limit=0"):
        assert get(client, bad, searcher).status_code == 422, bad
        assert get(client, bad, archivist).status_code == 403, bad
        assert get(client, bad, "la_forged").status_code == 401, bad
        assert client.get(bad).status_code == 401, bad
    other_process.revoke_token(operator_context(), searcher)
    assert get(client, "/api/v1/search?q=", searcher).status_code == 401


def test_a_handler_that_forgets_to_authorize_answers_500(
    settings: Settings, archive: ArchiveApp
) -> None:
    router = APIRouter(route_class=AuthFirstRoute)

    @router.get("/checked", dependencies=[Depends(require_in_handler(Role.AUDITOR))])
    async def checked(request: Request) -> dict[str, str]:
        return {"name": (await run_in_threadpool(authorize, request)).name}

    @router.get("/forgetful", dependencies=[Depends(require_in_handler(Role.AUDITOR))])
    async def forgetful() -> dict[str, str]:
        return {"secret": "answered to anyone"}

    app = FastAPI()
    app.state.archive = archive
    problems.install(app)
    app.include_router(router)
    token = archive.add_user(operator_context(), "eva.auditor", "auditor")
    other = archive.add_user(operator_context(), "ana.compliance", "compliance")
    with TestClient(app, raise_server_exceptions=False) as c:
        assert get(c, "/checked", token).json() == {"name": "eva.auditor"}
        assert get(c, "/checked", other).status_code == 403
        assert get(c, "/forgetful", token).status_code == 500
        assert "secret" not in get(c, "/forgetful", token).text
