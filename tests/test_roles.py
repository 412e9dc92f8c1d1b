"""The role x route table: who may call what.

``EXPECTED`` below is written by hand from the access policy, not read from the code.
Every API route must be declared in it: a new route fails ``test_every_route_is_declared``
until someone decides who may call it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from factories import appraisal_fields, loan_terms, mortgage_fields
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from httpx import Response

from api.app import create_app
from archive.application import ArchiveApp, operator_context
from archive.domain import CommandContext, Role
from archive.settings import Settings

PROBLEM_JSON = "application/problem+json"

ARCHIVIST = "archivist"
OFFICER = "credit_officer"
AUDITOR = "auditor"
COMPLIANCE = "compliance"
ADMIN = "admin"
ROLES = (ARCHIVIST, OFFICER, AUDITOR, COMPLIANCE, ADMIN)

EVERYONE = frozenset(ROLES)
WRITERS = frozenset({OFFICER})
REPLAYERS = frozenset({AUDITOR, OFFICER, COMPLIANCE, ADMIN})
ADMINS = frozenset({ADMIN})
VERIFIERS = frozenset({AUDITOR, ADMIN})

LOANS = "/api/v1/loans"
LOAN = LOANS + "/{loan_number}"
COLLATERAL = "/api/v1/collateral"
REGISTRATION = COLLATERAL + "/{registration_id}"
VALUATIONS = "/api/v1/valuations"
VALUATION = VALUATIONS + "/{valuation_id}"
USERS = "/api/v1/users"
DOCUMENTS = "/api/v1/documents"
DOCUMENT = DOCUMENTS + "/{document_id}"

EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("POST", LOANS): WRITERS,
    ("GET", LOAN): EVERYONE,
    ("GET", LOAN + "/history"): REPLAYERS,
    ("POST", LOAN + "/status"): WRITERS,
    ("POST", LOAN + "/classification"): WRITERS,
    ("POST", LOAN + "/officers"): WRITERS,
    ("POST", LOAN + "/investigation"): WRITERS,
    ("POST", LOAN + "/recovery-category"): WRITERS,
    ("POST", LOAN + "/recovery-plan"): WRITERS,
    ("POST", LOAN + "/collection-actions"): WRITERS,
    ("POST", LOAN + "/repayments"): WRITERS,
    ("POST", LOAN + "/inspections"): WRITERS,
    ("POST", COLLATERAL): WRITERS,
    ("GET", REGISTRATION): EVERYONE,
    ("POST", REGISTRATION + "/registration"): WRITERS,
    ("POST", REGISTRATION + "/site-verifications"): WRITERS,
    ("POST", REGISTRATION + "/release"): WRITERS,
    ("POST", VALUATIONS): WRITERS,
    ("GET", VALUATION): EVERYONE,
    ("POST", VALUATION + "/review"): WRITERS,
    ("POST", VALUATION + "/revaluation"): WRITERS,
    # Originals: archivists (and the officers who gather them) upload; everyone may read
    # and download (each download is recorded); archivists and admins place legal holds;
    # auditors and admins run fixity checks, as they verify the hash chains.
    ("POST", DOCUMENTS): frozenset({ARCHIVIST, OFFICER}),
    ("GET", DOCUMENT): EVERYONE,
    ("GET", DOCUMENT + "/original"): EVERYONE,
    ("HEAD", DOCUMENT + "/original"): EVERYONE,
    ("POST", DOCUMENT + "/legal-hold"): frozenset({ARCHIVIST, ADMIN}),
    ("POST", DOCUMENTS + "/fixity-checks"): VERIFIERS,
    ("GET", USERS + "/me"): EVERYONE,
    ("POST", USERS): ADMINS,
    ("POST", USERS + "/{name}/tokens"): ADMINS,
    ("POST", USERS + "/{name}/tokens/revoke"): ADMINS,
    ("POST", USERS + "/{name}/role"): ADMINS,
    ("POST", USERS + "/{name}/deactivate"): ADMINS,
    ("GET", "/api/v1/integrity"): VERIFIERS,
    ("GET", "/api/v1/integrity/loans/{loan_number}"): VERIFIERS,
    # Read models: the loan list is for everyone; the audit trail for those who audit or
    # check compliance; the views' status for verifiers; rebuilding them for admins.
    ("GET", LOANS): EVERYONE,
    ("GET", "/api/v1/audit-trail"): frozenset({AUDITOR, COMPLIANCE, ADMIN}),
    ("GET", "/api/v1/audit-trail/export"): frozenset({AUDITOR, COMPLIANCE, ADMIN}),
    ("GET", "/api/v1/projections"): VERIFIERS,
    ("POST", "/api/v1/projections/{name}/rebuild"): ADMINS,
    # Full-text search of the originals: compliance, auditors and credit officers.
    ("GET", "/api/v1/search"): frozenset({COMPLIANCE, AUDITOR, OFFICER}),
    # Credit-management reports: for those who manage, audit or check the portfolio.
    **{
        ("GET", "/api/v1/reports/" + name): REPLAYERS
        for name in (
            "npl-portfolio",
            "officer-ledgers",
            "npl-gaps",
            "repeated-mortgages",
            "overvaluation-by-agency",
            "revaluations-due",
            "inspections-overdue",
            "concentration",
            "village-group-loans",
            "loans/{loan_number}/analysis",
            "loans/{loan_number}/analysis.pdf",
        )
    },
}

# The one write an auditor may make: a fixity check re-reads every original and records
# the outcome, as verifying the hash chains does. Compliance may make none.
AUDITOR_WRITES = {("POST", DOCUMENTS + "/fixity-checks")}

UNAUTHENTICATED = {"/healthz"}
FRAMEWORK = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

CHECKLIST = {
    "creditor_debtor_relationship_clear": True,
    "willingness_to_pay": True,
    "capacity_to_pay": True,
    "valid_assets": True,
    "asset_disposal_feasible": True,
    "liabilities_investigated": True,
}


# -- the routes the app serves ------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    method: str
    path: str
    dependant: Any


def served_routes(app: FastAPI) -> list[Served]:
    """Every (method, path) of an APIRoute, looking inside included routers.

    Recent FastAPI keeps included routers as lazy entries in ``app.routes``; older
    versions copy their routes in. ``iter_route_contexts`` flattens the former.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI: app.routes is flat
        pairs = [(r, r) for r in app.routes]
    else:
        pairs = [(c.original_route, c) for c in iter_route_contexts(app.routes)]
    return [
        Served(method, c.path, c.dependant)
        for original, c in pairs
        if isinstance(original, APIRoute) and c.path not in UNAUTHENTICATED | FRAMEWORK
        for method in sorted(c.methods)
    ]


def declared_roles(dependant: Any) -> set[frozenset[str]]:
    """The role sets of every ``require(...)`` guard among a route's dependencies."""
    found = set()
    for dep in dependant.dependencies:
        allowed = getattr(dep.call, "allowed_roles", None)
        if allowed is not None:
            found.add(frozenset(str(getattr(r, "value", r)) for r in allowed))
        found |= declared_roles(dep)
    return found


# -- a small archive with something for every route to act on --------------------------------------

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"

# A request: path parameters (beyond the defaults) and the httpx keyword arguments.
Request = tuple[dict[str, str], dict[str, Any]]


@dataclass
class World:
    client: TestClient
    tokens: dict[str, str]
    params: dict[str, str]  # path placeholder -> an existing thing
    requests: dict[tuple[str, str], Request]
    by_role: dict[tuple[str, str, str], Request]  # (method, path, role) -> another request

    def request_for(self, method: str, template: str, role: str) -> Request:
        found = self.by_role.get((method, template, role))
        return found or self.requests.get((method, template), ({}, {}))

    def send(
        self,
        method: str,
        template: str,
        role: str | None,
        path_params: dict[str, str] | None = None,
        **kw: Any,
    ) -> Response:
        params = {**self.params, **(path_params or {})}
        path = fill(template, params)
        headers = dict(kw.pop("headers", {}))
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return self.client.request(method, path, headers=headers, **kw)


def fill(template: str, params: dict[str, str]) -> str:
    return template.format(**{k: v for k, v in params.items() if f"{{{k}}}" in template})


def http_body(fields: dict[str, Any]) -> dict[str, Any]:
    """The factories speak the domain's ``currency_code``; the API says ``currency``."""
    body = dict(fields)
    body["currency"] = body.pop("currency_code")
    return body


def seed(settings: Settings, archive: ArchiveApp) -> World:
    tokens = {role: archive.add_user(operator_context(), f"{role}.user", role) for role in ROLES}
    for name in ("victim.token", "victim.role", "victim.gone"):
        archive.add_user(operator_context(), name, ARCHIVIST)
    leaked = archive.add_user(operator_context(), "victim.leak", ARCHIVIST)
    ctx = CommandContext(f"{OFFICER}.user", OFFICER, "seed")
    archive.open_loan(ctx, **loan_terms("CR-1"))
    reg = archive.register_collateral(ctx, **mortgage_fields("CR-1")).id
    doomed = archive.register_collateral(
        ctx, **mortgage_fields("CR-1", cadastral_reference="2222222BB2222B0001BB")
    ).id
    val = archive.appraise(ctx, **appraisal_fields("CR-1", collateral_id=reg)).id
    doc = archive.register_document(
        ctx, io.BytesIO(PDF), loan_number="CR-1", doc_type="contract", original_filename="c.pdf"
    ).id
    # Two non-performing loans with both officers: one to categorise, one to plan.
    for number in ("NPL-1", "NPL-2"):
        archive.open_loan(ctx, **loan_terms(number))
        for status in ("overdue", "non_performing"):
            archive.change_loan(
                ctx, number, None, lambda loan, s=status: loan.change_status(ctx, s)
            )
        for duty in ("loan", "collection"):
            archive.change_loan(
                ctx, number, None, lambda loan, d=duty: loan.assign_officer(ctx, d, f"{d} officer")
            )
    archive.change_loan(
        ctx, "NPL-2", None, lambda loan: loan.categorise_recovery(ctx, "recoverable", ["illness"])
    )

    loan, npl1, npl2 = {"loan_number": "CR-1"}, {"loan_number": "NPL-1"}, {"loan_number": "NPL-2"}
    upload = {
        "files": {"file": ("deed.pdf", PDF, "application/pdf")},
        "data": {"loan_number": "CR-1", "doc_type": "mortgage_deed"},
    }
    requests: dict[tuple[str, str], Request] = {
        ("POST", LOANS): ({}, {"json": http_body(loan_terms("CR-NEW"))}),
        ("POST", "/api/v1/projections/{name}/rebuild"): ({"name": "audit_trail"}, {"json": {}}),
        ("GET", "/api/v1/search"): ({}, {"params": {"q": "tasación"}}),
        ("POST", LOAN + "/status"): (loan, {"json": {"status": "overdue"}}),
        ("POST", LOAN + "/classification"): (loan, {"json": {"classification": "doubtful"}}),
        ("POST", LOAN + "/officers"): (loan, {"json": {"duty": "loan", "officer": "Marta"}}),
        ("POST", LOAN + "/investigation"): (
            loan,
            {"json": {"checklist": CHECKLIST, "investigated_on": "2024-06-01"}},
        ),
        ("POST", LOAN + "/recovery-category"): (
            npl1,
            {"json": {"category": "recoverable", "causes_of_default": ["job loss"]}},
        ),
        ("POST", LOAN + "/recovery-plan"): (
            npl2,
            {"json": {"summary": "instalments", "target_date": "2025-06-30", "target_amount": "5"}},
        ),
        ("POST", LOAN + "/collection-actions"): (
            loan,
            {
                "json": {
                    "kind": "call",
                    "action_date": "2024-07-01",
                    "outcome": "no answer",
                    "officer": "M",
                }
            },
        ),
        ("POST", LOAN + "/repayments"): (
            loan,
            {"json": {"amount": "100.00", "paid_on": "2024-07-15"}},
        ),
        ("POST", LOAN + "/inspections"): (
            loan,
            {
                "json": {
                    "kind": "quarterly",
                    "inspected_on": "2024-07-31",
                    "inspector": "M",
                    "findings": "ok",
                }
            },
        ),
        ("POST", COLLATERAL): (
            {},
            {"json": http_body(mortgage_fields(cadastral_reference="3333333CC3333C0001CC"))},
        ),
        ("POST", REGISTRATION + "/registration"): (
            {},
            {"json": {"registry_entry": "T-1", "registered_on": "2024-01-20"}},
        ),
        ("POST", REGISTRATION + "/site-verifications"): (
            {},
            {"json": {"officer": "M", "verified_on": "2024-03-01", "findings": "as described"}},
        ),
        ("POST", REGISTRATION + "/release"): (
            {"registration_id": str(doomed)},
            {"json": {"released_on": "2025-02-01"}},
        ),
        ("POST", VALUATIONS): ({}, {"json": http_body(appraisal_fields("CR-1"))}),
        ("POST", VALUATION + "/review"): (
            {},
            {"json": {"reviewer": "C", "reviewed_value": "150000.00"}},
        ),
        ("POST", VALUATION + "/revaluation"): ({}, {"json": {"revaluation_due": "2025-06-01"}}),
        ("POST", DOCUMENTS): ({}, upload),
        ("POST", DOCUMENT + "/legal-hold"): ({}, {"json": {"on": True, "reason": "litigation"}}),
        ("POST", DOCUMENTS + "/fixity-checks"): ({}, {}),
        ("POST", USERS): ({}, {"json": {"name": "new.user", "role": ARCHIVIST}}),
        ("POST", USERS + "/{name}/tokens"): ({"name": "victim.token"}, {"json": {}}),
        ("POST", USERS + "/{name}/tokens/revoke"): (
            {"name": "victim.leak"},
            {"json": {"token": leaked, "reason": "found in a log"}},
        ),
        ("POST", USERS + "/{name}/role"): ({"name": "victim.role"}, {"json": {"role": AUDITOR}}),
        ("POST", USERS + "/{name}/deactivate"): (
            {"name": "victim.gone"},
            {"json": {"reason": "left"}},
        ),
    }
    # Where two roles may act, the second undoes the first's change rather than repeat it.
    by_role: dict[tuple[str, str, str], Request] = {
        ("POST", DOCUMENT + "/legal-hold", ADMIN): ({}, {"json": {"on": False}}),
    }
    params = {
        "loan_number": "CR-1",
        "registration_id": str(reg),
        "valuation_id": str(val),
        "document_id": str(doc),
    }
    client = TestClient(create_app(settings, archive), raise_server_exceptions=False)
    return World(client, tokens, params, requests, by_role)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path, demo_data=False)
    archive = ArchiveApp(settings)
    try:
        yield seed(settings, archive)
    finally:
        archive.close()


@pytest.fixture
def bare_app(tmp_path: Path) -> Iterator[FastAPI]:
    settings = Settings(data_dir=tmp_path, demo_data=False)
    archive = ArchiveApp(settings)
    try:
        yield create_app(settings, archive)
    finally:
        archive.close()


def assert_problem(resp: Response, status: int, what: str) -> None:
    assert resp.status_code == status, (
        f"{what}: expected {status}, got {resp.status_code}: {resp.text}"
    )
    assert resp.headers["content-type"].split(";")[0] == PROBLEM_JSON, what
    if resp.request.method == "HEAD":
        assert resp.content == b"", what  # a HEAD answer has headers only (RFC 9110)
        return
    body = resp.json()
    assert body["status"] == status, what
    for key in ("type", "title", "detail"):
        assert isinstance(body[key], str) and body[key], (what, key)


POSTS = [t for m, t in EXPECTED if m == "POST"]


# -- the tests --------------------------------------------------------------------------------------


def test_the_table_knows_every_role() -> None:
    assert {r.value for r in Role} == set(ROLES)


def test_every_route_is_declared(bare_app: FastAPI) -> None:
    served = {(r.method, r.path) for r in served_routes(bare_app)}
    undeclared = served - EXPECTED.keys()
    assert not undeclared, f"routes missing from the role table: {sorted(undeclared)}"
    stale = EXPECTED.keys() - served
    assert not stale, f"the role table names routes the app does not serve: {sorted(stale)}"


def test_each_routes_guard_matches_the_table(bare_app: FastAPI) -> None:
    for route in served_routes(bare_app):
        guards = declared_roles(route.dependant)
        expected = EXPECTED.get((route.method, route.path))
        assert guards == {expected}, (route.method, route.path, guards)


def test_no_write_admits_auditors_or_compliance() -> None:
    for method, template in EXPECTED:
        allowed = EXPECTED[method, template]
        if method not in ("GET", "HEAD"):  # reads
            assert COMPLIANCE not in allowed, template
            assert AUDITOR not in allowed or (method, template) in AUDITOR_WRITES, template


def test_every_role_on_every_route(world: World) -> None:
    failures = []
    for (method, template), allowed in EXPECTED.items():
        for role in ROLES:
            path_params, kw = world.request_for(method, template, role)
            resp = world.send(method, template, role, path_params, **kw)
            what = f"{method} {template} as {role}"
            if role in allowed:
                if not 200 <= resp.status_code < 300:
                    failures.append(f"{what}: allowed, but got {resp.status_code}: {resp.text}")
            elif resp.status_code != 403:
                failures.append(f"{what}: forbidden, but got {resp.status_code}: {resp.text}")
            else:
                assert_problem(resp, 403, what)
    assert not failures, "\n".join(failures)


UNKNOWN_TARGETS = {
    "loan_number": "NOPE",
    "registration_id": "00000000-0000-0000-0000-000000000000",
    "valuation_id": "not-a-uuid",
    "document_id": "00000000-0000-0000-0000-000000000000",
    "name": "nobody.here",
}


@pytest.mark.parametrize("role", [AUDITOR, COMPLIANCE])
def test_auditors_and_compliance_only_ever_get_403_on_writes(world: World, role: str) -> None:
    """Whatever they send (a valid command, nonsense, unknown targets), the answer is 403."""
    for template in POSTS:
        if (role == AUDITOR and ("POST", template) in AUDITOR_WRITES) or role in EXPECTED[
            "POST", template
        ]:
            continue
        path_params, kw = world.requests[("POST", template)]
        attempts: list[tuple[str, dict[str, str], dict[str, Any]]] = [
            ("valid", path_params, kw),
            ("no body", path_params, {}),
            ("wrong shape", path_params, {"json": [1, "two", None]}),
            ("unknown fields", path_params, {"json": {"surprise": True}}),
            ("unknown target", UNKNOWN_TARGETS, kw),
            ("bad If-Match", path_params, {**kw, "headers": {"If-Match": "nope"}}),
            ("form data", path_params, {"data": {"a": "b"}}),
        ]
        for label, params, request_kw in attempts:
            resp = world.send("POST", template, role, params, **request_kw)
            assert_problem(resp, 403, f"POST {template} as {role} ({label})")


@pytest.mark.parametrize("role", [AUDITOR, COMPLIANCE])
def test_malformed_json_from_a_forbidden_role_is_still_403(world: World, role: str) -> None:
    """The role check comes first: a forbidden caller learns nothing about the body's shape."""
    failures = []
    for template in POSTS:
        if role in EXPECTED["POST", template]:
            continue
        resp = world.send(
            "POST",
            template,
            role,
            world.requests["POST", template][0],
            content=b'{"status": ',
            headers={"Content-Type": "application/json"},
        )
        if resp.status_code != 403:
            failures.append(
                f"POST {template} as {role}: {resp.status_code} {resp.json()['detail']}"
            )
    assert not failures, "\n".join(failures)


def test_malformed_json_without_a_token_is_401(world: World) -> None:
    """Authentication comes before parsing: an anonymous caller gets 401 whatever the body."""
    failures = []
    for template in POSTS:
        resp = world.send(
            "POST",
            template,
            None,
            world.requests["POST", template][0],
            content=b"{",
            headers={"Content-Type": "application/json"},
        )
        if resp.status_code != 401:
            failures.append(
                f"POST {template} anonymously: {resp.status_code} {resp.json()['detail']}"
            )
    assert not failures, "\n".join(failures)


def test_every_route_but_healthz_is_401_without_a_token(
    settings: Settings, archive: ArchiveApp
) -> None:
    """On both backends: no token (or a bad one), no answer but 401 with WWW-Authenticate.

    Every served route is tried, declared in the table or not.
    """
    client = TestClient(create_app(settings, archive), raise_server_exceptions=False)
    routes = served_routes(client.app)  # type: ignore[arg-type]
    assert len(routes) >= len(EXPECTED)
    for route in routes:
        path = re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000000", route.path)
        for headers in ({}, {"Authorization": "Bearer la_forged"}, {"Authorization": "Token x"}):
            body = {"json": {}} if route.method == "POST" else {}
            resp = client.request(route.method, path, headers=headers, **body)
            assert_problem(resp, 401, f"{route.method} {path} with {headers}")
            assert resp.headers["www-authenticate"].startswith("Bearer"), (route.method, path)
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
