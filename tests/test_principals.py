"""The per-process principal cache (archive/principals.py) and its use by the API: one
read per request, and every revocation, deactivation or role change, by any process,
effective on the very next request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
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
