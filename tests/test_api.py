"""HTTP behaviour of the API, on both backends, through FastAPI's TestClient.

Every test that takes the ``api`` fixture runs once on SQLite and once on PostgreSQL.
The fuzz tests at the end run on SQLite only, against an archive built here.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from factories import appraisal_fields, loan_terms, mortgage_fields
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from httpx import Response
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from api.app import create_app
from archive.application import ArchiveApp, operator_context
from archive.domain import CommandContext
from archive.settings import Settings
from projections.audit_trail import AuditTrailView
from projections.loan_files import LoanFilesView
from projections.runner import Projections
from projections.search import SearchView
from projections.store import open_store

PROBLEM_JSON = "application/problem+json"

USERS = {
    "archivist": "ines.archivist",
    "credit_officer": "ana.officer",
    "auditor": "raul.auditor",
    "compliance": "eva.compliance",
    "admin": "root.admin",
}
OFFICER = USERS["credit_officer"]

CHECKLIST = {
    "creditor_debtor_relationship_clear": True,
    "willingness_to_pay": True,
    "capacity_to_pay": False,
    "valid_assets": True,
    "asset_disposal_feasible": True,
    "liabilities_investigated": True,
}


# -- helpers ----------------------------------------------------------------------------------


def loan_body(loan_number: str = "CR-1", **overrides: Any) -> dict[str, Any]:
    """An OpenLoan request body (the factories speak the domain's ``currency_code``)."""
    body = loan_terms(loan_number)
    body["currency"] = body.pop("currency_code")
    body.update(overrides)
    return body


def mortgage_body(loan_number: str = "CR-1", **overrides: Any) -> dict[str, Any]:
    body = mortgage_fields(loan_number)
    body["currency"] = body.pop("currency_code")
    body.update(overrides)
    return body


def appraisal_body(loan_number: str = "CR-1", **overrides: Any) -> dict[str, Any]:
    body = appraisal_fields(loan_number)
    body["currency"] = body.pop("currency_code")
    body.update(overrides)
    return body


def assert_problem(resp: Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with ``status``; return its body."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text}"
    assert resp.headers["content-type"].split(";")[0].strip() == PROBLEM_JSON, resp.headers
    body = resp.json()
    assert body["status"] == status
    for key in ("type", "title", "detail"):
        assert isinstance(body[key], str), (key, body)
        assert body[key], (key, body)
    return body


def assert_ok(resp: Response, status: int = 200) -> dict[str, Any]:
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text}"
    assert resp.headers["content-type"].split(";")[0].strip() == "application/json"
    return resp.json()


def zulu(iso: str) -> str:
    """An ISO moment from the API (``+00:00``) written with ``Z``."""
    moment = datetime.fromisoformat(iso)
    assert moment.utcoffset() == timedelta(0)
    return moment.replace(tzinfo=None).isoformat() + "Z"


@dataclass
class Api:
    client: TestClient
    archive: ArchiveApp
    settings: Settings
    tokens: dict[str, str]

    def headers(self, role: str | None = "credit_officer", **extra: str) -> dict[str, str]:
        headers = dict(extra)
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return headers

    def get(self, path: str, role: str | None = "credit_officer", **kw: Any) -> Response:
        headers = {**self.headers(role), **kw.pop("headers", {})}
        return self.client.get(path, headers=headers, **kw)

    def post(
        self,
        path: str,
        json: Any = None,
        role: str | None = "credit_officer",
        **kw: Any,
    ) -> Response:
        headers = {**self.headers(role), **kw.pop("headers", {})}
        return self.client.post(path, json=json, headers=headers, **kw)

    def open(self, loan_number: str = "CR-1", **overrides: Any) -> dict[str, Any]:
        return assert_ok(self.post("/api/v1/loans", loan_body(loan_number, **overrides)), 201)

    def history(self, loan_number: str) -> list[dict[str, Any]]:
        return assert_ok(self.get(f"/api/v1/loans/{loan_number}/history"))

    def upload(self, loan_number: str = "CR-1") -> str:
        """A small PDF filed as the loan's contract; its document id."""
        form = {"loan_number": loan_number, "doc_type": "contract"}
        files = {"file": ("f.pdf", PDF)}
        return assert_ok(
            self.client.post(UPLOAD, data=form, files=files, headers=self.headers()), 201
        )["id"]


def make_api(settings: Settings, archive: ArchiveApp) -> Api:
    tokens = {
        role: archive.add_user(operator_context(), name, role) for role, name in USERS.items()
    }
    client = TestClient(create_app(settings, archive), raise_server_exceptions=False)
    return Api(client, archive, settings, tokens)


@pytest.fixture
def api(settings: Settings, archive: ArchiveApp) -> Api:
    return make_api(settings, archive)


# -- health and the OpenAPI document ------------------------------------------------------------


def test_healthz_needs_no_token_and_reports_the_log_head(api: Api) -> None:
    api.open()
    body = assert_ok(api.client.get("/healthz"))
    assert body["status"] == "ok"
    assert body["failing_views"] == []
    assert body["backend"] == api.settings.backend
    assert isinstance(body["log_head"], int)
    assert body["log_head"] == api.archive.head_position() > 0


def api_routes(app: Any) -> list[tuple[str, frozenset[str]]]:
    """(path, methods) of every APIRoute, looking inside included routers.

    Recent FastAPI keeps included routers as lazy entries in ``app.routes``; older
    versions copy their routes in. ``iter_route_contexts`` flattens the former.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI: app.routes is flat
        pairs = [(r, r) for r in app.routes]
    else:
        pairs = [(c.original_route, c) for c in iter_route_contexts(app.routes)]
    return [(c.path, frozenset(c.methods)) for orig, c in pairs if isinstance(orig, APIRoute)]


def test_openapi_lists_every_route_and_every_post_has_a_request_body(api: Api) -> None:
    doc = assert_ok(api.client.get("/openapi.json"))
    paths = doc["paths"]
    routes = api_routes(api.client.app)
    assert len(routes) > 20
    for path, methods in routes:
        assert path in paths, path
        for method in methods:
            operation = paths[path].get(method.lower())
            assert operation is not None, (method, path)
            if method == "POST":
                body = operation.get("requestBody")
                assert body is not None, f"POST {path} documents no request body"
                assert body["content"], path
                for media_type, content in body["content"].items():
                    assert content.get("schema"), (path, media_type)
    documented = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    served = {(m, p) for p, methods in routes for m in methods}
    assert documented == served


# -- opening and reading loan files --------------------------------------------------------------


def test_open_loan_answers_201_with_location_and_the_loan_reads_back(api: Api) -> None:
    resp = api.post("/api/v1/loans", loan_body("CR-1", reason="new mortgage"))
    created = assert_ok(resp, 201)
    assert resp.headers["location"] == "/api/v1/loans/CR-1"
    assert resp.headers["etag"] == '"1"'
    assert created["version"] == 1
    assert isinstance(created["position"], int)

    resp = api.get(resp.headers["location"])
    loan = assert_ok(resp)
    assert resp.headers["etag"] == '"1"'
    assert loan["loan_id"] == created["id"]
    assert loan["version"] == 1
    assert loan["loan_number"] == "CR-1"
    assert (loan["borrower_name"], loan["borrower_national_id"]) == ("Ana Pérez Núñez", "12345678Z")
    assert loan["opened_at"] == loan["updated_at"] and loan["as_of"] is None
    assert loan["status"] == "performing"
    assert loan["classification"] == "pass"
    assert loan["disbursement_date"] == "2024-01-15"
    # Money is a string, never a float.
    assert loan["principal"] == "100000.00"
    assert loan["interest_rate"] == "3.50"
    assert loan["outstanding"] == "100000.00"
    for key in ("repaid", "recovered"):
        assert isinstance(loan[key], str)
    assert loan["collateral"] == [] and loan["valuations"] == []


def test_one_loan_file_and_the_list_items_name_the_same_facts_alike(api: Api) -> None:
    """GET /loans/{n} is rebuilt from the log, GET /loans reads the view: one shape, one
    parser for clients, children included; now, by version and as of a moment alike."""
    api.open()
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    val = assert_ok(api.post("/api/v1/valuations", appraisal_body(collateral_id=reg)), 201)["id"]
    review = {"reviewer": "Carmen Ortiz", "reviewed_value": "120000.00", "notes": "comparables"}
    assert_ok(api.post(f"/api/v1/valuations/{val}/review", review))

    [item] = assert_ok(api.get("/api/v1/loans"))["items"]
    one = assert_ok(api.get("/api/v1/loans/CR-1"))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # after every event
    moment = assert_ok(api.get("/api/v1/loans/CR-1", params={"as_of": now}))
    at_version = assert_ok(api.get("/api/v1/loans/CR-1", params={"version": 1}))
    only_one, only_listed = {"chain_head", "as_of"}, {"position"}
    assert set(one) - only_one == set(item) - only_listed
    assert set(moment) == set(at_version) == set(one)
    for children in ("collateral", "valuations"):
        assert set(one[children][0]) == set(item[children][0]), children
        assert one[children][0] == moment[children][0], children
    # Equal facts are equal text too (times as the view writes them: fixed-width UTC).
    assert {k: v for k, v in one.items() if k not in only_one} == {
        k: v for k, v in item.items() if k not in only_listed
    }
    assert one["opened_at"].endswith("Z") and moment["as_of"] == now
    assert "id" not in one and "borrower" not in one and "created_on" not in one
    assert one["collateral"][0]["registration_id"] == item["collateral"][0]["registration_id"]
    assert one["collateral"][0]["cadastral_reference"] == "9872023VH5797S0001WX"
    reviewed = [
        (v["valuation_id"], v["reviewer"], v["review_notes"], v["overvalued"])
        for v in (one["valuations"][0], item["valuations"][0])
    ]
    assert reviewed == [(val, "Carmen Ortiz", "comparables", True)] * 2
    # A single record read on its own has the shape it has inside its loan file.
    assert assert_ok(api.get(f"/api/v1/collateral/{reg}")) == one["collateral"][0]
    assert assert_ok(api.get(f"/api/v1/valuations/{val}")) == one["valuations"][0]
    # And OpenAPI documents that one shape for both routes.
    doc = assert_ok(api.client.get("/openapi.json"))
    schemas = doc["components"]["schemas"]
    assert set(schemas["LoanFileOut"]["properties"]) == set(one) | only_listed
    assert set(schemas["CollateralOut"]["properties"]) == set(one["collateral"][0])
    assert set(schemas["ValuationOut"]["properties"]) == set(one["valuations"][0])
    listed = doc["paths"]["/api/v1/loans"]["get"]["responses"]["200"]["content"]
    single = doc["paths"]["/api/v1/loans/{loan_number}"]["get"]["responses"]["200"]["content"]
    assert listed["application/json"]["schema"] == {"$ref": "#/components/schemas/LoanFilePage"}
    assert single["application/json"]["schema"] == {"$ref": "#/components/schemas/LoanFileOut"}


def test_created_collateral_and_valuations_answer_with_a_location_that_resolves(
    api: Api,
) -> None:
    api.open()
    for path, body, key in (
        ("/api/v1/collateral", mortgage_body(), "registration_id"),
        ("/api/v1/valuations", appraisal_body(), "valuation_id"),
    ):
        resp = api.post(path, body)
        created = assert_ok(resp, 201)
        assert resp.headers["location"] == f"{path}/{created['id']}"
        assert assert_ok(api.get(resp.headers["location"]))[key] == created["id"]


@pytest.mark.parametrize(
    "loan_number",
    [" CR-9 ", "CR/2024/000123", "CR-Ñ-1", "贷款-1"],
    ids=["padded", "slashes", "latin1", "non-latin1"],
)
def test_a_created_loans_location_leads_to_it(api: Api, loan_number: str) -> None:
    """Whatever loan numbers the archive accepts, the Location it answers must resolve."""
    resp = api.post("/api/v1/loans", loan_body(loan_number))
    if resp.status_code == 422:  # refusing the number is a valid answer
        assert_problem(resp, 422)
        return
    created = assert_ok(resp, 201)
    location = resp.headers["location"]
    found = api.get(location)
    assert found.status_code == 200, f"Location {location!r} answers {found.status_code}"
    assert found.json()["loan_id"] == created["id"]


def test_money_is_serialised_as_strings_everywhere(api: Api) -> None:
    api.open()
    assert_ok(
        api.post("/api/v1/loans/CR-1/repayments", {"amount": "2500.10", "paid_on": "2024-02-01"})
    )
    loan = assert_ok(api.get("/api/v1/loans/CR-1"))
    assert loan["repayments"] == [{"amount": "2500.10", "paid_on": "2024-02-01"}]
    assert loan["repaid"] == "2500.10"
    assert loan["outstanding"] == "97499.90"
    [opened, repaid] = api.history("CR-1")
    assert opened["fields"]["principal"] == "100000.00"
    assert repaid["fields"]["amount"] == "2500.10"


# -- every LoanFile command ------------------------------------------------------------------------

COMMAND_STEPS: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "status",
        {"status": "overdue"},
        "StatusChanged",
        {"old_status": "performing", "new_status": "overdue"},
    ),
    (
        "classification",
        {"classification": "substandard"},
        "Classified",
        {"old_classification": "pass", "new_classification": "substandard"},
    ),
    (
        "officers",
        {"duty": "loan", "officer": "Marta Ruiz"},
        "OfficerAssigned",
        {"duty": "loan", "officer": "Marta Ruiz", "previous_officer": None},
    ),
    (
        "officers",
        {"duty": "collection", "officer": "Jorge Sanz"},
        "OfficerAssigned",
        {"duty": "collection", "officer": "Jorge Sanz", "previous_officer": None},
    ),
    (
        "investigation",
        {"checklist": CHECKLIST, "investigated_on": "2024-06-01", "notes": "visited the borrower"},
        "InvestigationRecorded",
        {"checklist": CHECKLIST, "investigated_on": "2024-06-01", "notes": "visited the borrower"},
    ),
    (
        "status",
        {"status": "non_performing"},
        "StatusChanged",
        {"old_status": "overdue", "new_status": "non_performing"},
    ),
    (
        "recovery-category",
        {"category": "recoverable_with_effort", "causes_of_default": ["job loss"]},
        "RecoveryCategorised",
        {"category": "recoverable_with_effort", "causes_of_default": ["job loss"]},
    ),
    (
        "recovery-plan",
        {
            "summary": "monthly instalments",
            "target_date": "2025-06-30",
            "target_amount": "50000.00",
        },
        "RecoveryPlanSet",
        {
            "summary": "monthly instalments",
            "target_date": "2025-06-30",
            "target_amount": "50000.00",
        },
    ),
    (
        "collection-actions",
        {
            "kind": "visit",
            "action_date": "2024-07-01",
            "outcome": "promised to pay",
            "amount_recovered": "1500.50",
            "officer": "Jorge Sanz",
        },
        "CollectionActionRecorded",
        {"kind": "visit", "amount_recovered": "1500.50", "officer": "Jorge Sanz"},
    ),
    (
        "repayments",
        {"amount": "2500.00", "paid_on": "2024-07-15"},
        "RepaymentRecorded",
        {"amount": "2500.00", "paid_on": "2024-07-15"},
    ),
    (
        "inspections",
        {
            "kind": "monthly",
            "inspected_on": "2024-07-31",
            "inspector": "Marta Ruiz",
            "findings": "property in good repair",
        },
        "InspectionRecorded",
        {"kind": "monthly", "inspector": "Marta Ruiz", "findings": "property in good repair"},
    ),
]


def test_every_loan_command_works_and_lands_in_the_history(api: Api) -> None:
    api.open("CR-1", reason="new mortgage")
    positions = []
    for i, (path, body, _, _) in enumerate(COMMAND_STEPS):
        resp = api.post(
            f"/api/v1/loans/CR-1/{path}",
            {**body, "reason": f"step {i}"},
            headers={"X-Correlation-Id": f"req-{i}"},
        )
        outcome = assert_ok(resp)
        assert outcome["version"] == i + 2, path
        assert resp.headers["etag"] == f'"{i + 2}"'
        positions.append(outcome["position"])
    assert positions == sorted(positions) and len(set(positions)) == len(positions)

    loan = assert_ok(api.get("/api/v1/loans/CR-1"))
    assert loan["version"] == len(COMMAND_STEPS) + 1
    assert loan["status"] == "non_performing"
    assert loan["classification"] == "substandard"
    assert loan["loan_officer"] == "Marta Ruiz"
    assert loan["collection_officer"] == "Jorge Sanz"
    assert [h["assigned_by"] for h in loan["officer_history"]] == [OFFICER, OFFICER]
    assert loan["investigation"]["checklist"] == CHECKLIST
    assert loan["investigation"]["investigated_by"] == OFFICER
    assert loan["recovery_category"] == "recoverable_with_effort"
    assert loan["causes_of_default"] == ["job loss"]
    assert loan["recovery_plan"]["target_amount"] == "50000.00"
    assert loan["recovery_plan"]["set_by"] == OFFICER
    assert loan["collection_actions"][0]["amount_recovered"] == "1500.50"
    assert loan["repayments"] == [{"amount": "2500.00", "paid_on": "2024-07-15"}]
    assert loan["inspections"][0]["findings"] == "property in good repair"
    assert loan["recovered"] == "1500.50"
    assert loan["repaid"] == "2500.00"
    assert loan["outstanding"] == "95999.50"

    history = api.history("CR-1")
    assert len(history) == len(COMMAND_STEPS) + 1
    assert [e["position"] for e in history] == sorted({e["position"] for e in history})
    assert [e["version"] for e in history] == list(range(1, len(COMMAND_STEPS) + 2))
    assert {e["aggregate_id"] for e in history} == {loan["loan_id"]}
    assert {e["aggregate_type"] for e in history} == {"LoanFile"}
    opened, *changes = history
    assert opened["type"] == "Opened"
    assert opened["actor"] == OFFICER
    assert opened["role"] == "credit_officer"
    assert opened["reason"] == "new mortgage"
    assert opened["fields"]["loan_number"] == "CR-1"
    assert opened["position"] < changes[0]["position"]
    for i, (event, (_, _, kind, fields)) in enumerate(zip(changes, COMMAND_STEPS, strict=True)):
        assert event["type"] == kind
        assert event["actor"] == OFFICER
        assert event["role"] == "credit_officer"
        assert event["reason"] == f"step {i}"
        assert event["correlation_id"] == f"req-{i}"
        assert event["position"] == positions[i]
        datetime.fromisoformat(event["time"])
        for key, value in fields.items():
            assert event["fields"][key] == value, (kind, key)


def test_a_refused_command_changes_nothing(api: Api) -> None:
    api.open()
    body = assert_problem(api.post("/api/v1/loans/CR-1/status", {"status": "written_off"}), 422)
    assert "performing" in body["detail"] and "written_off" in body["detail"]
    resp = api.get("/api/v1/loans/CR-1")
    assert resp.headers["etag"] == '"1"'
    assert resp.json()["status"] == "performing"
    assert len(api.history("CR-1")) == 1


# -- collateral ------------------------------------------------------------------------------------


def test_collateral_routes_and_the_repeated_mortgage_rule(api: Api) -> None:
    api.open("CR-1")
    api.open("CR-2")

    resp = api.post("/api/v1/collateral", mortgage_body("CR-1", reason="first mortgage"))
    filed = assert_ok(resp, 201)
    assert filed["version"] == 1
    assert resp.headers["etag"] == '"1"'
    reg = filed["id"]
    resp = api.get(f"/api/v1/collateral/{reg}")
    state = assert_ok(resp)
    assert resp.headers["etag"] == '"1"'
    assert state["loan_number"] == "CR-1"
    assert state["status"] == "pending"
    assert state["lien_rank"] == 1
    assert state["secured_amount"] == "120000.00"
    assert state["cadastral_reference"] == "9872023VH5797S0001WX"
    assert state["repeated_mortgage"] is None
    collateral = assert_ok(api.get("/api/v1/loans/CR-1"))["collateral"]
    assert [c["registration_id"] for c in collateral] == [reg]

    # The same property for another loan: rank 1 is refused, rank 2 is a flagged repeat.
    assert_problem(api.post("/api/v1/collateral", mortgage_body("CR-2", lien_rank=1)), 422)
    resp = api.post(
        "/api/v1/collateral",
        mortgage_body("CR-2", lien_rank=2, cadastral_reference="9872023-vh5797s-0001wx"),
    )
    second = assert_ok(resp, 201)["id"]
    events = [e for e in api.history("CR-2") if e["aggregate_id"] == second]
    assert [e["type"] for e in events] == ["Filed", "RepeatedMortgageFlagged"]
    assert all(e["aggregate_type"] == "MortgageRegistration" for e in events)
    [other] = events[1]["fields"]["other_liens"]
    assert other["loan_number"] == "CR-1"
    assert other["lien_rank"] == 1
    assert other["registration_id"] == reg
    flagged = assert_ok(api.get(f"/api/v1/collateral/{second}"))
    assert flagged["repeated_mortgage"]["other_liens"][0]["loan_number"] == "CR-1"

    entry = {"registry_entry": "Tomo 1234, Libro 56, Folio 78", "registered_on": "2024-01-20"}
    assert assert_ok(api.post(f"/api/v1/collateral/{reg}/registration", entry))["version"] == 2
    visit = {
        "officer": "Marta Ruiz",
        "verified_on": "2024-03-01",
        "findings": "as described",
        "defects": ["damp in the basement"],
    }
    assert (
        assert_ok(api.post(f"/api/v1/collateral/{reg}/site-verifications", visit))["version"] == 3
    )
    released = api.post(f"/api/v1/collateral/{reg}/release", {"released_on": "2025-02-01"})
    assert assert_ok(released)["version"] == 4
    assert released.headers["etag"] == '"4"'
    assert_problem(
        api.post(f"/api/v1/collateral/{reg}/release", {"released_on": "2025-02-02"}), 422
    )

    state = assert_ok(api.get(f"/api/v1/collateral/{reg}"))
    assert state["status"] == "released"
    assert state["registry_entry"] == "Tomo 1234, Libro 56, Folio 78"
    assert state["registered_on"] == "2024-01-20"
    assert state["released_on"] == "2025-02-01"
    assert state["site_verifications"][0]["defects"] == ["damp in the basement"]
    past = assert_ok(api.get(f"/api/v1/collateral/{reg}", params={"version": 2}))
    assert past["status"] == "registered"
    assert past["site_verifications"] == []

    events = [e for e in api.history("CR-1") if e["aggregate_id"] == reg]
    assert [e["type"] for e in events] == ["Filed", "Registered", "SiteVerified", "Released"]
    assert {e["actor"] for e in events} == {OFFICER}
    assert events[0]["reason"] == "first mortgage"


def test_the_history_names_the_loans_own_liens_as_the_audit_trail_does(api: Api) -> None:
    """A property's lien index is shared by the loans it secures: a loan's history has the
    liens added and released for its own registrations (the repeated-mortgage facts), by
    position, as the audit trail files them under the loan; not the property's indexing,
    nor another loan's lien on the same property."""
    api.open("CR-1")
    api.open("CR-2")
    first = assert_ok(api.post("/api/v1/collateral", mortgage_body("CR-1")), 201)["id"]
    second = assert_ok(api.post("/api/v1/collateral", mortgage_body("CR-2", lien_rank=2)), 201)
    second = second["id"]
    entry = {"registry_entry": "T-1", "registered_on": "2024-01-20"}
    assert_ok(api.post(f"/api/v1/collateral/{first}/registration", entry))
    assert_ok(api.post(f"/api/v1/collateral/{first}/release", {"released_on": "2025-02-01"}))
    assert_ok(api.post(f"/api/v1/collateral/{second}/release", {"released_on": "2025-02-01"}))

    for loan, mine in (("CR-1", first), ("CR-2", second)):
        history = api.history(loan)
        positions = [e["position"] for e in history]
        assert positions == sorted(set(positions)), loan
        liens = [e for e in history if e["aggregate_type"] == "PropertyLiens"]
        assert [(e["type"], e["fields"]["registration_id"]) for e in liens] == [
            ("LienAdded", mine),
            ("LienReleased", mine),
        ], loan
        assert liens[0]["fields"]["loan_number"] == loan
        for event in liens:  # annotated from the audit trail: summary and diff
            assert event["summary"] and event["diff"], event
        assert liens[1]["diff"]["live"] == {"before": True, "after": False}, liens[1]
        trail = assert_ok(
            api.get("/api/v1/audit-trail", "auditor", params={"loan_number": loan, "limit": 1000})
        )["items"]
        assert {r["position"] for r in trail} == set(positions), loan
        assert [r["position"] for r in trail if r["aggregate_type"] == "PropertyLiens"] == [
            e["position"] for e in liens
        ]
        # The loan as of its lien's release: the collateral released there too.
        released = zulu(liens[1]["time"])
        past = assert_ok(api.get(f"/api/v1/loans/{loan}", params={"as_of": released}))
        assert [c["status"] for c in past["collateral"]] == ["released"], loan


def test_history_writes_every_fact_as_the_audit_trail_does(api: Api) -> None:
    """An auditor checks the history against the trail event by event as text: a time
    is fixed-width UTC with Z in both (the history wrote ``+00:00``, and dropped the
    microseconds of a moment on a whole second)."""
    api.open()
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    assert_ok(
        api.post(
            f"/api/v1/collateral/{reg}/registration",
            {"registry_entry": "T-1", "registered_on": "2024-01-20"},
        )
    )
    history = api.history("CR-1")
    trail = assert_ok(
        api.get("/api/v1/audit-trail", "auditor", params={"loan_number": "CR-1", "limit": 1000})
    )["items"]
    by_position = {r["position"]: r for r in trail}
    assert set(by_position) == {e["position"] for e in history}
    for event in history:
        row = by_position[event["position"]]
        assert event["time"] == row["occurred_at"], event
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["time"])
        assert (event["actor"], event["reason"], event["version"]) == (
            row["actor_id"],
            row["reason"],
            row["aggregate_version"],
        )
    opened = next(e for e in history if e["aggregate_type"] == "MortgageRegistration")
    assert opened["time"] == assert_ok(api.get(f"/api/v1/collateral/{reg}"))["filed_at"]


def test_impossible_dates_are_422_naming_the_date_and_change_nothing(api: Api) -> None:
    api.open()  # disbursed 2024-01-15
    ahead = (datetime.now(UTC).date() + timedelta(days=2)).isoformat()
    for path, body, detail in (
        ("/api/v1/loans/CR-1/repayments", {"amount": "10", "paid_on": "2024-01-14"}, "before"),
        ("/api/v1/loans/CR-1/repayments", {"amount": "10", "paid_on": ahead}, "in the future"),
        (
            "/api/v1/loans/CR-1/inspections",
            {"kind": "monthly", "inspected_on": ahead, "inspector": "P", "findings": "ok"},
            "in the future",
        ),
        ("/api/v1/valuations", appraisal_body(appraisal_date=ahead), "in the future"),
    ):
        problem = assert_problem(api.post(path, body), 422)
        assert detail in problem["detail"], problem
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    entry = {"registry_entry": "T-1", "registered_on": "2024-01-20"}
    assert_ok(api.post(f"/api/v1/collateral/{reg}/registration", entry))
    early = api.post(f"/api/v1/collateral/{reg}/release", {"released_on": "2024-01-19"})
    assert "before the registration date 2024-01-20" in assert_problem(early, 422)["detail"]
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 2  # the collateral link
    assert assert_ok(api.get(f"/api/v1/collateral/{reg}"))["status"] == "registered"


def test_collateral_errors(api: Api) -> None:
    api.open()
    assert_problem(api.post("/api/v1/collateral", mortgage_body("NOPE")), 404)
    assert_problem(api.post("/api/v1/collateral", mortgage_body(cadastral_reference="x")), 422)
    assert_problem(api.post("/api/v1/collateral", mortgage_body(secured_amount="-1")), 422)
    unknown = "00000000-0000-0000-0000-000000000000"
    assert_problem(api.get(f"/api/v1/collateral/{unknown}"), 404)
    assert_problem(api.get("/api/v1/collateral/not-a-uuid"), 422)
    assert_problem(
        api.post(f"/api/v1/collateral/{unknown}/release", {"released_on": "2030-01-01"}), 404
    )


def test_a_collateral_or_valuation_version_beyond_the_head_is_404(api: Api) -> None:
    """As for loans: asking for version 99 of a version-1 record must not answer the head."""
    api.open()
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    val = assert_ok(api.post("/api/v1/valuations", appraisal_body()), 201)["id"]
    for path in (f"/api/v1/collateral/{reg}", f"/api/v1/valuations/{val}"):
        assert_ok(api.get(path, params={"version": 1}))
        resp = api.get(path, params={"version": 99})
        assert_problem(resp, 404)


def test_an_out_of_range_version_is_a_client_error(api: Api) -> None:
    api.open()
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    val = assert_ok(api.post("/api/v1/valuations", appraisal_body()), 201)["id"]
    doc = api.upload()
    paths = (
        f"/api/v1/collateral/{reg}",
        f"/api/v1/valuations/{val}",
        f"/api/v1/documents/{doc}",
        "/api/v1/loans/CR-1",
    )
    for path in paths:
        for version in ("0", "-1", str(2**63), str(10**30)):
            resp = api.get(path, params={"version": version})
            assert resp.status_code in (404, 422), (path, version, resp.status_code, resp.text)
            assert_problem(resp, resp.status_code)
        # No version 0 or below: refused alike everywhere, as an invalid query parameter.
        for version in ("0", "-1"):
            problem = assert_problem(api.get(path, params={"version": version}), 422)
            assert problem["type"] == "/problems/invalid-request", (path, version, problem)
            assert "version" in problem["detail"], problem
        assert_ok(api.get(path, params={"version": 1}))


# -- valuations ------------------------------------------------------------------------------------


def test_valuation_review_overvaluation_revaluation_and_supersession(api: Api) -> None:
    api.open()
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    resp = api.post("/api/v1/valuations", appraisal_body(collateral_id=reg, reason="initial"))
    first = assert_ok(resp, 201)["id"]
    assert resp.headers["etag"] == '"1"'
    val = assert_ok(api.get(f"/api/v1/valuations/{first}"))
    assert val["appraised_value"] == "150000.00"
    assert val["collateral_id"] == reg
    assert val["revaluation_due"] == "2025-01-10"
    assert val["reviewer"] is None and val["overvaluation"] is None and not val["overvalued"]

    # The appraiser cannot review their own appraisal (case does not disguise them).
    own = {"reviewer": "luis gómez", "reviewed_value": "150000.00"}
    assert_problem(api.post(f"/api/v1/valuations/{first}/review", own), 422)

    # Reviewed 20% below the appraisal: beyond the 10% margin, so flagged.
    review = {"reviewer": "Carmen Ortiz", "reviewed_value": "120000.00", "notes": "comparables"}
    resp = api.post(f"/api/v1/valuations/{first}/review", review)
    assert assert_ok(resp)["version"] == 3
    val = assert_ok(api.get(f"/api/v1/valuations/{first}"))
    assert (val["reviewer"], val["review_notes"]) == ("Carmen Ortiz", "comparables")
    assert val["reviewed_value"] == "120000.00" and val["overvalued"] is True
    assert val["overvaluation"] == {"excess_ratio": "0.2500", "margin": "0.10", "cut": "30000.00"}
    events = [e for e in api.history("CR-1") if e["aggregate_id"] == first]
    assert [e["type"] for e in events] == ["Appraised", "Reviewed", "OvervaluationFlagged"]
    assert events[2]["fields"]["appraised_value"] == "150000.00"
    assert events[2]["fields"]["reviewed_value"] == "120000.00"
    assert {e["actor"] for e in events} == {OFFICER}
    assert_problem(api.post(f"/api/v1/valuations/{first}/review", review), 422)  # reviewed once

    # A new appraisal supersedes the first; within the margin it is not flagged.
    body = appraisal_body(
        appraised_value="130000.00", appraisal_date="2024-09-01", supersedes=first
    )
    second = assert_ok(api.post("/api/v1/valuations", body), 201)["id"]
    assert assert_ok(api.get(f"/api/v1/valuations/{first}"))["superseded_by"] == second
    within = {"reviewer": "Carmen Ortiz", "reviewed_value": "125000.00"}
    assert assert_ok(api.post(f"/api/v1/valuations/{second}/review", within))["version"] == 2
    assert assert_ok(api.get(f"/api/v1/valuations/{second}"))["overvaluation"] is None
    assert_problem(api.post("/api/v1/valuations", appraisal_body(supersedes=first)), 422)

    due = {"revaluation_due": "2025-03-01"}
    assert assert_ok(api.post(f"/api/v1/valuations/{second}/revaluation", due))["version"] == 3
    assert assert_ok(api.get(f"/api/v1/valuations/{second}"))["revaluation_due"] == "2025-03-01"
    early = {"revaluation_due": "2024-01-01"}
    assert_problem(api.post(f"/api/v1/valuations/{second}/revaluation", early), 422)

    loan = assert_ok(api.get("/api/v1/loans/CR-1"))
    assert [v["valuation_id"] for v in loan["valuations"]] == [first, second]


def test_valuation_errors(api: Api) -> None:
    api.open("CR-1")
    api.open("CR-2")
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body("CR-2")), 201)["id"]
    assert_problem(api.post("/api/v1/valuations", appraisal_body(collateral_id=reg)), 422)
    assert_problem(api.post("/api/v1/valuations", appraisal_body("NOPE")), 404)
    assert_problem(api.post("/api/v1/valuations", appraisal_body(method="guess")), 422)
    assert_problem(api.post("/api/v1/valuations", appraisal_body(appraised_value="0")), 422)
    val = assert_ok(api.post("/api/v1/valuations", appraisal_body()), 201)["id"]
    assert_problem(
        api.post(f"/api/v1/valuations/{val}/review", {"reviewer": "X", "reviewed_value": "-5"}), 422
    )


def test_an_appraisal_at_the_end_of_the_calendar_is_refused_not_a_500(api: Api) -> None:
    """The default revaluation date is a year on: an appraisal in 9999 has none to give."""
    api.open()
    resp = api.post("/api/v1/valuations", appraisal_body(appraisal_date="9999-06-01"))
    assert resp.status_code < 500, resp.text
    assert_problem(resp, 422)


def test_an_extreme_overvaluation_is_flagged_not_a_500(api: Api) -> None:
    api.open()
    # Amounts are bounded below 10^15: an absurd appraisal is refused outright ...
    absurd = api.post("/api/v1/valuations", appraisal_body(appraised_value="1E27"))
    assert_problem(absurd, 422)
    # ... and the largest accepted one against the smallest review is flagged, not a 500.
    body = appraisal_body(appraised_value="999999999999999.99")
    val = assert_ok(api.post("/api/v1/valuations", body), 201)["id"]
    resp = api.post(f"/api/v1/valuations/{val}/review", {"reviewer": "X", "reviewed_value": "0.01"})
    assert resp.status_code < 500, resp.text
    if resp.status_code == 200:
        assert assert_ok(api.get(f"/api/v1/valuations/{val}"))["overvaluation"] is not None
    else:
        assert_problem(resp, 422)


def test_an_accepted_amount_never_makes_the_loan_unreadable(api: Api) -> None:
    """Either the archive refuses an absurd principal, or it can show the loan it accepted."""
    resp = api.post("/api/v1/loans", loan_body("CR-1", principal="1E+1000000"))
    if resp.status_code == 201:
        assert_ok(api.get("/api/v1/loans/CR-1"))
    else:
        assert_problem(resp, 422)


def test_an_integer_beyond_any_column_is_refused_not_stored(api: Api) -> None:
    """Events are forever: a term or lien rank no view column can hold would wedge the
    read models for every caller, so the request is refused before anything is stored."""
    for term in (10**20, 2**31, 1201, 0):
        assert_problem(api.post("/api/v1/loans", loan_body("CR-9", term_months=term)), 422)
    assert_problem(api.get("/api/v1/loans/CR-9"), 404)
    api.open("CR-1", term_months=1200)
    for rank in (10**20, 2**31, 1000):
        assert_problem(api.post("/api/v1/collateral", mortgage_body(lien_rank=rank)), 422)
    listed = assert_ok(api.get("/api/v1/loans"))
    assert [loan["loan_number"] for loan in listed["items"]] == ["CR-1"]
    assert listed["items"][0]["collateral"] == []


def test_text_with_a_nul_character_is_refused_and_the_views_keep_reading(api: Api) -> None:
    """PostgreSQL text cannot hold U+0000: an accepted one would fail every view forever."""
    assert_problem(api.post("/api/v1/loans", loan_body("CR-9", borrower_name="Ana\x00")), 422)
    api.open()
    nul_bodies = {
        "/api/v1/loans/CR-1/status": {"status": "overdue", "reason": "three\x00missed"},
        "/api/v1/loans/CR-1/recovery-category": {
            "category": "recoverable",
            "causes_of_default": ["sequ\x00ía"],
        },
        "/api/v1/loans/CR-1/investigation": {
            "checklist": {**CHECKLIST, "valid_assets\x00": True},
            "investigated_on": "2024-09-01",
        },
        "/api/v1/collateral": mortgage_body(owner="\x00"),
        "/api/v1/valuations": appraisal_body(agency="Tinsa\x00"),
    }
    for path, body in nul_bodies.items():
        problem = assert_problem(api.post(path, body), 422)
        assert "NUL" in problem["detail"], problem
    assert_problem(api.post("/api/v1/users", {"name": "x\x00", "role": "auditor"}, "admin"), 422)
    assert assert_ok(api.get("/api/v1/loans"))["total"] == 1
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 1
    assert_ok(api.get("/api/v1/audit-trail", role="auditor"))


def test_true_is_not_a_whole_number(api: Api) -> None:
    """Lax validation read JSON true as 1: a one-month term, a first-rank lien, or a
    stale-write check against version 1 that passed."""
    api.open()
    refused = {
        "/api/v1/loans": loan_body("CR-2", term_months=True),
        "/api/v1/collateral": mortgage_body(lien_rank=True),
        "/api/v1/loans/CR-1/status": {"status": "overdue", "expected_version": True},
    }
    for path, body in refused.items():
        problem = assert_problem(api.post(path, body), 422)
        assert "not true or false" in problem["detail"], problem
    assert assert_ok(api.get("/api/v1/loans"))["total"] == 1
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 1
    # Numbers stay numbers.
    assert_ok(api.post("/api/v1/loans/CR-1/status", {"status": "overdue", "expected_version": 1}))


@pytest.mark.parametrize("answer", [1, 0, "yes", "no", "true"])
def test_checklist_answers_are_true_or_false(api: Api, answer: object) -> None:
    """A checklist answer read laxly ("yes", 1) would be stored as a finding forever."""
    api.open()
    body = {
        "checklist": {**CHECKLIST, "willingness_to_pay": answer},
        "investigated_on": "2024-06-01",
    }
    problem = assert_problem(api.post("/api/v1/loans/CR-1/investigation", body), 422)
    assert "willingness_to_pay" in problem["detail"], problem
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 1


class StuckSearchView(SearchView):
    """Fault injection: a search index that cannot apply anything until it is mended."""

    mended = False

    def apply_batch(self, *args: Any) -> None:
        if not self.mended:
            raise RuntimeError("cannot apply this event")
        super().apply_batch(*args)


def test_a_stuck_view_delays_only_the_routes_that_read_it(
    settings: Settings, archive: ArchiveApp
) -> None:
    app = create_app(settings, archive)
    stuck_view = StuckSearchView()
    views = Projections(
        archive,
        open_store(settings),
        [LoanFilesView(), AuditTrailView(), stuck_view],
        poll_interval=0.05,
        owns_store=True,
    )
    app.state.projections = views  # no lifespan: only these followers run
    token = archive.add_user(operator_context(), "ana.auditor", "auditor")
    archive.open_loan(CommandContext("ana", "credit_officer"), **loan_terms("CR-1"))
    client = TestClient(app, raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {token}"}
    views.start()
    try:
        assert client.get("/api/v1/loans", headers=auth).json()["total"] == 1
        assert client.get("/api/v1/audit-trail", headers=auth).status_code == 200
        assert client.get("/api/v1/reports/npl-portfolio", headers=auth).status_code == 200
        assert client.get("/api/v1/loans/CR-1/history", headers=auth).status_code == 200
        stuck = client.get("/api/v1/search", params={"q": "hipoteca"}, headers=auth)
        assert stuck.status_code == 503, stuck.text
        assert "search view has not yet reached" in stuck.json()["detail"]
        # Monitoring sees it: /healthz names the view (no token, no detail) ...
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert health.json()["failing_views"] == ["search"]
        # ... and the operators' status gives the error and since when it fails.
        status = {s["view"]: s for s in client.get("/api/v1/projections", headers=auth).json()}
        assert status["search"]["error"] == "RuntimeError: cannot apply this event"
        assert status["search"]["failing_since"] is not None
        assert status["search"]["lag"] > 0
        assert status["loan_files"]["error"] is None
        assert status["loan_files"]["failing_since"] is None
        # Mended, the view catches up on its next retry and the alert clears.
        stuck_view.mended = True
        deadline = time.monotonic() + 30
        while client.get("/healthz").json()["status"] != "ok":
            assert time.monotonic() < deadline, "the mended view never recovered"
            time.sleep(0.1)
        assert client.get("/api/v1/search", params={"q": "x"}, headers=auth).status_code == 200
    finally:
        views.close()


# -- the past -------------------------------------------------------------------------------------


def test_past_states_by_version_and_by_moment(api: Api) -> None:
    api.open()
    assert_ok(api.post("/api/v1/loans/CR-1/status", {"status": "overdue"}))
    assert_ok(api.post("/api/v1/loans/CR-1/classification", {"classification": "doubtful"}))
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    entry = {"registry_entry": "T-1", "registered_on": "2024-01-20"}
    assert_ok(api.post(f"/api/v1/collateral/{reg}/registration", entry))

    resp = api.get("/api/v1/loans/CR-1", params={"version": 1})
    v1 = assert_ok(resp)
    assert resp.headers["etag"] == '"1"'
    assert (v1["version"], v1["status"], v1["classification"]) == (1, "performing", "pass")
    v2 = assert_ok(api.get("/api/v1/loans/CR-1", params={"version": 2}))
    assert (v2["version"], v2["status"], v2["classification"]) == (2, "overdue", "pass")
    v3 = assert_ok(api.get("/api/v1/loans/CR-1", params={"version": 3}))
    assert v3["classification"] == "doubtful" and v3["collateral"] == []
    v4 = assert_ok(api.get("/api/v1/loans/CR-1", params={"version": 4}))
    assert [c["status"] for c in v4["collateral"]] == ["pending"]  # registered only later
    head = assert_ok(api.get("/api/v1/loans/CR-1"))
    assert [c["status"] for c in head["collateral"]] == ["registered"]

    times = {
        e["version"]: e["time"] for e in api.history("CR-1") if e["aggregate_type"] == "LoanFile"
    }
    resp = api.get("/api/v1/loans/CR-1", params={"as_of": zulu(times[1])})
    past = assert_ok(resp)
    assert resp.headers["etag"] == '"1"'
    assert (past["version"], past["status"]) == (1, "performing")
    past = assert_ok(api.get("/api/v1/loans/CR-1", params={"as_of": zulu(times[2])}))
    assert (past["version"], past["status"], past["classification"]) == (2, "overdue", "pass")
    # The same moment in another zone is the same moment.
    madrid = datetime.fromisoformat(times[2]).astimezone(timezone(timedelta(hours=2)))
    past = assert_ok(api.get("/api/v1/loans/CR-1", params={"as_of": madrid.isoformat()}))
    assert past["version"] == 2
    now = assert_ok(api.get("/api/v1/loans/CR-1", params={"as_of": zulu(head["updated_at"])}))
    assert now["version"] == head["version"]
    # Within the clock-skew tolerance a moment just ahead is still now.
    ahead = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    ahead_state = assert_ok(api.get("/api/v1/loans/CR-1", params={"as_of": ahead}))
    assert ahead_state["version"] == head["version"]
    assert [c["status"] for c in ahead_state["collateral"]] == ["registered"]


def test_bad_moments_and_versions(api: Api) -> None:
    api.open()
    naive = api.get("/api/v1/loans/CR-1", params={"as_of": "2030-01-01T00:00:00"})
    assert "zone" in assert_problem(naive, 422)["detail"]
    before = api.get("/api/v1/loans/CR-1", params={"as_of": "2000-01-01T00:00:00Z"})
    assert_problem(before, 404)
    assert_problem(api.get("/api/v1/loans/CR-1", params={"as_of": "yesterday"}), 422)
    assert_problem(api.get("/api/v1/loans/CR-1", params={"version": 0}), 422)
    assert_problem(api.get("/api/v1/loans/CR-1", params={"version": "one"}), 422)
    assert_problem(api.get("/api/v1/loans/CR-1", params={"version": 2}), 404)
    both = {"version": 1, "as_of": "2030-01-01T00:00:00Z"}
    assert_problem(api.get("/api/v1/loans/CR-1", params=both), 422)


def test_collateral_valuations_and_documents_as_they_were_at_a_moment(api: Api) -> None:
    """``?as_of=`` rebuilds them as the loan file's does (it was ignored: an auditor asking
    for a past state got today's, with a 200)."""
    api.open()
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    val = assert_ok(api.post("/api/v1/valuations", appraisal_body()), 201)["id"]
    doc = api.upload()
    entry = {"registry_entry": "T-1", "registered_on": "2024-01-20"}
    assert_ok(api.post(f"/api/v1/collateral/{reg}/registration", entry))
    review = {"reviewer": "Carmen Ortiz", "reviewed_value": "120000.00"}
    assert_ok(api.post(f"/api/v1/valuations/{val}/review", review))
    hold = {"on": True, "reason": "litigio"}
    assert_ok(api.post(f"/api/v1/documents/{doc}/legal-hold", hold, "archivist"))
    created = {e["aggregate_id"]: zulu(e["time"]) for e in api.history("CR-1") if e["version"] == 1}
    for path, key, field, then, now in (
        ("collateral", reg, "status", "pending", "registered"),
        ("valuations", val, "reviewer", None, "Carmen Ortiz"),
        ("documents", doc, "legal_hold", False, True),
    ):
        url = f"/api/v1/{path}/{key}"
        past = assert_ok(api.get(url, "auditor", params={"as_of": created[key]}))
        assert (past["version"], past[field]) == (1, then), path
        head = assert_ok(api.get(url, "auditor", params={"as_of": datetime.now(UTC).isoformat()}))
        assert head == assert_ok(api.get(url, "auditor")) and head[field] == now, path
        before = api.get(url, "auditor", params={"as_of": "2000-01-01T00:00:00Z"})
        assert "did not exist at 2000-01-01" in assert_problem(before, 404)["detail"], path
        both = {"version": 1, "as_of": created[key]}
        assert_problem(api.get(url, "auditor", params=both), 422)
        naive = api.get(url, "auditor", params={"as_of": "2024-01-01T00:00:00"})
        assert "zone" in assert_problem(naive, 422)["detail"], path
    unknown = "/api/v1/collateral/00000000-0000-0000-0000-000000000000"
    assert (
        "not found"
        in assert_problem(api.get(unknown, "auditor", params={"as_of": created[reg]}), 404)[
            "detail"
        ]
    )


def test_a_moment_in_the_future_is_a_422_naming_it(api: Api) -> None:
    """The future has no state yet: answering the head labelled with a later moment would
    claim to know it. A few minutes ahead are allowed for the caller's clock."""
    api.open()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    for moment in (tomorrow, "2999-01-01T00:00:00Z"):
        problem = assert_problem(api.get("/api/v1/loans/CR-1", params={"as_of": moment}), 422)
        assert "as_of" in problem["detail"] and "in the future" in problem["detail"], problem
        assert moment[:19] in problem["detail"], problem
    skewed = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    assert_problem(api.get("/api/v1/loans/CR-1", params={"as_of": skewed}), 422)


def test_a_moment_outside_the_utc_calendar_is_a_422_not_a_500(api: Api) -> None:
    """9999-12-31T23:59:59-01:00 is a valid ISO moment with no UTC form: the rebuild
    compares it with the events' UTC times and the answer echoes it in UTC."""
    api.open()
    for moment in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+14:00"):
        problem = assert_problem(api.get("/api/v1/loans/CR-1", params={"as_of": moment}), 422)
        assert "as_of" in problem["detail"] and "UTC" in problem["detail"], problem


# -- optimistic locking and errors --------------------------------------------------------------


def test_if_match_and_expected_version(api: Api) -> None:
    api.open()
    assert_ok(
        api.post("/api/v1/loans/CR-1/status", {"status": "overdue"}, headers={"If-Match": '"1"'})
    )
    stale = api.post(
        "/api/v1/loans/CR-1/status", {"status": "performing"}, headers={"If-Match": '"1"'}
    )
    assert_problem(stale, 412)
    stale = api.post("/api/v1/loans/CR-1/status", {"status": "performing", "expected_version": 1})
    assert_problem(stale, 409)
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 2
    resp = api.post(
        "/api/v1/loans/CR-1/status", {"status": "performing"}, headers={"If-Match": 'W/"2"'}
    )
    assert assert_ok(resp)["version"] == 3
    assert resp.headers["etag"] == '"3"'
    resp = api.post("/api/v1/loans/CR-1/status", {"status": "overdue", "expected_version": 3})
    assert assert_ok(resp)["version"] == 4
    assert_problem(
        api.post("/api/v1/loans/CR-1/status", {"status": "x"}, headers={"If-Match": "v4"}), 422
    )
    # Collateral and valuations honour If-Match too.
    reg = assert_ok(api.post("/api/v1/collateral", mortgage_body()), 201)["id"]
    entry = {"registry_entry": "T-1", "registered_on": "2024-01-20"}
    stale = api.post(f"/api/v1/collateral/{reg}/registration", entry, headers={"If-Match": '"2"'})
    assert_problem(stale, 412)
    assert_problem(
        api.post(f"/api/v1/collateral/{reg}/registration", {**entry, "expected_version": 2}), 409
    )


def test_client_errors(api: Api) -> None:
    api.open()
    assert_problem(api.post("/api/v1/loans", loan_body("CR-1")), 409)
    assert_problem(api.get("/api/v1/loans/NOPE"), 404)
    assert_problem(api.get("/api/v1/loans/NOPE/history"), 404)
    assert_problem(api.post("/api/v1/loans/NOPE/status", {"status": "overdue"}), 404)
    assert_problem(api.post("/api/v1/loans", loan_body("CR-2", principal="-100.00")), 422)
    assert_problem(api.post("/api/v1/loans", loan_body("CR-2", principal="ten")), 422)
    assert_problem(api.post("/api/v1/loans", loan_body("CR-2", product="yacht")), 422)
    assert_problem(api.post("/api/v1/loans", loan_body("CR-2", surprise=1)), 422)
    assert_problem(api.post("/api/v1/loans", loan_body("CR-2", maturity_date="2020-01-01")), 422)
    assert_problem(api.post("/api/v1/loans/CR-1/classification", {"classification": "awful"}), 422)
    forbidden = api.post("/api/v1/loans/CR-1/status", {"status": "written_off"})
    assert_problem(forbidden, 422)
    assert_problem(api.post("/api/v1/loans/CR-1/status", {"status": "settled", "bogus": 1}), 422)
    assert_problem(
        api.post("/api/v1/loans/CR-1/status", {"status": "overdue", "expected_version": 0}), 422
    )
    malformed = api.headers(**{"Content-Type": "application/json"})
    assert_problem(
        api.client.post("/api/v1/loans/CR-1/status", content=b"{", headers=malformed), 422
    )
    assert_problem(api.client.put("/api/v1/loans/CR-1", headers=api.headers()), 405)
    assert_problem(api.client.get("/api/v1/nothing-here", headers=api.headers()), 404)
    # None of that left a trace.
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 1
    assert_problem(api.get("/api/v1/loans/CR-2"), 404)


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_sent_as_another_media_type_is_a_415_saying_so(
    api: Api, content_type: str | None
) -> None:
    """curl -d sends form-urlencoded: the body was then left unparsed and the answer was a
    422 'Input should be a valid dictionary', which sends the client checking its fields."""
    api.open()
    headers = api.headers(**({"Content-Type": content_type} if content_type else {}))
    body = json.dumps({"status": "overdue"}).encode()
    resp = api.client.post("/api/v1/loans/CR-1/status", content=body, headers=headers)
    detail = assert_problem(resp, 415)["detail"]
    assert "Content-Type: application/json" in detail
    assert (content_type or "no Content-Type") in detail
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 1
    # JSON under a +json type is JSON; an optional body may still be left out.
    headers = api.headers(**{"Content-Type": "application/merge-patch+json"})
    assert_ok(api.client.post("/api/v1/loans/CR-1/status", content=body, headers=headers))
    assert_ok(api.post("/api/v1/documents/fixity-checks", role="auditor"))


def test_a_body_that_is_not_json_says_where_and_why(api: Api) -> None:
    """Not 'body.22: JSON decode error', which reads as a field named 22."""
    api.open()
    headers = api.headers(**{"Content-Type": "application/json"})
    resp = api.client.post("/api/v1/loans/CR-1/status", content=b'{"status": }', headers=headers)
    problem = assert_problem(resp, 422)
    assert problem["detail"] == "body: not valid JSON at character 11: Expecting value"
    assert problem["errors"] == [
        {"location": "body", "message": "not valid JSON at character 11: Expecting value"}
    ]


def test_a_405_names_the_allowed_methods(api: Api) -> None:
    """RFC 9110: a 405 carries Allow; the problem handler must not drop the header."""
    resp = api.client.put("/api/v1/loans/CR-1", headers=api.headers())
    assert_problem(resp, 405)
    assert resp.headers["allow"] == "GET"
    resp = api.client.get("/api/v1/loans/CR-1/status", headers=api.headers())
    assert_problem(resp, 405)
    assert resp.headers["allow"] == "POST"


def test_a_405_names_every_method_the_path_answers(api: Api) -> None:
    """A path served by several routes (GET and POST /loans) names all their methods, and
    the detail says which to use instead of repeating the title."""
    resp = api.client.options("/api/v1/loans", headers=api.headers())
    body = assert_problem(resp, 405)
    assert resp.headers["allow"] == "GET, POST"
    assert body["detail"] == "OPTIONS is not allowed here; use GET or POST"
    resp = api.client.put("/api/v1/documents/fixity-checks", headers=api.headers())
    assert_problem(resp, 405)
    assert "POST" in resp.headers["allow"].split(", ")


def test_extreme_offsets_and_moments_are_client_errors_not_500s(api: Api) -> None:
    api.open()
    huge = str(10**20)
    assert_problem(api.get("/api/v1/loans", params={"offset": huge}), 422)
    assert_problem(api.get("/api/v1/audit-trail", "auditor", params={"offset": huge}), 422)
    for name, moment in (
        ("since", "0001-01-01T00:00:00+14:00"),
        ("until", "9999-12-31T23:59:59-12:00"),
    ):
        for path in ("/api/v1/audit-trail", "/api/v1/audit-trail/export"):
            problem = assert_problem(api.get(path, "auditor", params={name: moment}), 422)
            assert name in problem["detail"]
    everything = api.get("/api/v1/audit-trail", "auditor", params={"since": "0001-01-01T00:00:00Z"})
    assert assert_ok(everything)["total"] >= 1
    assert assert_ok(api.get("/api/v1/loans", params={"offset": 10**12}))["items"] == []


def test_reversed_time_ranges_and_nul_filters_are_422s_on_the_audit_trail(api: Api) -> None:
    """A reversed range matches nothing (an empty page would read as "no events"), and a
    NUL in a text filter is refused before PostgreSQL sees it (a 500 there, or an export
    cut short after its 200)."""
    api.open()
    reversed_range = {"since": "2030-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"}
    for path in ("/api/v1/audit-trail", "/api/v1/audit-trail/export"):
        problem = assert_problem(api.get(path, "auditor", params=reversed_range), 422)
        assert "reversed" in problem["detail"], problem
        for name in ("loan_number", "actor"):
            problem = assert_problem(api.get(path, "auditor", params={name: "CR\x001"}), 422)
            assert name in problem["detail"] and "NUL" in problem["detail"], problem
    for name in ("loan_officer", "collection_officer", "branch"):
        problem = assert_problem(api.get("/api/v1/loans", params={name: "\x00"}), 422)
        assert name in problem["detail"], problem
    # An empty range is no mistake: since is inclusive, until exclusive.
    same = {"since": "2030-01-01T00:00:00Z", "until": "2030-01-01T00:00:00Z"}
    assert assert_ok(api.get("/api/v1/audit-trail", "auditor", params=same))["items"] == []


def test_a_misspelt_list_filter_is_a_422_naming_the_values_not_an_empty_page(api: Api) -> None:
    api.open()
    assert_ok(api.post("/api/v1/loans/CR-1/status", {"status": "overdue"}))
    for name, wrong in (
        ("status", "npl"),
        ("classification", "LOSS"),
        ("recovery_category", "lost"),
        ("product", "yacht"),
    ):
        problem = assert_problem(api.get("/api/v1/loans", params={name: wrong}), 422)
        assert name in problem["detail"], problem
    assert (
        "non_performing"
        in assert_problem(api.get("/api/v1/loans", params={"status": "npl"}), 422)["detail"]
    )
    listed = assert_ok(
        api.get("/api/v1/loans", params={"status": "overdue", "product": "mortgage"})
    )
    assert [loan["loan_number"] for loan in listed["items"]] == ["CR-1"]


# -- authentication --------------------------------------------------------------------------------


def test_missing_or_bad_tokens_are_401(api: Api) -> None:
    api.open()
    for headers in (
        {},
        {"Authorization": "Bearer la_not-a-real-token"},
        {"Authorization": f"Basic {api.tokens['admin']}"},
        {"Authorization": "Bearer"},
    ):
        for resp in (
            api.client.get("/api/v1/loans/CR-1", headers=headers),
            api.client.post(
                "/api/v1/loans/CR-1/status", json={"status": "overdue"}, headers=headers
            ),
            api.client.get("/api/v1/users/me", headers=headers),
        ):
            assert_problem(resp, 401)
            assert resp.headers["www-authenticate"].startswith("Bearer"), headers
    assert assert_ok(api.get("/api/v1/loans/CR-1"))["version"] == 1


def test_a_deactivated_users_token_is_401(api: Api) -> None:
    token = api.archive.add_user(operator_context(), "leaving.user", "credit_officer")
    me = api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert assert_ok(me) == {"name": "leaving.user", "role": "credit_officer"}
    assert_ok(api.post("/api/v1/users/leaving.user/deactivate", {"reason": "left"}, role="admin"))
    for resp in (
        api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}),
        api.client.post(
            "/api/v1/loans", json=loan_body(), headers={"Authorization": f"Bearer {token}"}
        ),
    ):
        body = assert_problem(resp, 401)
        assert "deactivated" in body["detail"]
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert_problem(api.get("/api/v1/loans/CR-1"), 404)  # the open did not happen


def test_token_and_deactivation_need_no_body_and_an_admin_keeps_their_own_account(
    api: Api,
) -> None:
    assert_ok(api.post("/api/v1/users", {"name": "temp.user", "role": "auditor"}, "admin"), 201)
    issued = assert_ok(api.post("/api/v1/users/temp.user/tokens", role="admin"), 201)
    assert (
        assert_ok(
            api.get(
                "/api/v1/users/me",
                headers={"Authorization": f"Bearer {issued['token']}"},
                role=None,
            )
        )["name"]
        == "temp.user"
    )
    assert_ok(api.post("/api/v1/users/temp.user/deactivate", role="admin"))
    me = USERS["admin"]
    problem = assert_problem(api.post(f"/api/v1/users/{me}/deactivate", {}, role="admin"), 422)
    assert "your own account" in problem["detail"]
    demote = {"role": "auditor", "reason": "oops"}
    problem = assert_problem(api.post(f"/api/v1/users/{me}/role", demote, role="admin"), 422)
    assert "your own role" in problem["detail"]
    assert assert_ok(api.get("/api/v1/users/me", role="admin")) == {"name": me, "role": "admin"}


def test_users_routes(api: Api) -> None:
    me = assert_ok(api.get("/api/v1/users/me", role="auditor"))
    assert me == {"name": USERS["auditor"], "role": "auditor"}
    added = assert_ok(
        api.post("/api/v1/users", {"name": "new.user", "role": "archivist"}, role="admin"), 201
    )
    assert added["token"].startswith("la_")
    headers = {"Authorization": f"Bearer {added['token']}"}
    assert assert_ok(api.client.get("/api/v1/users/me", headers=headers))["role"] == "archivist"
    assert_problem(
        api.post("/api/v1/users", {"name": "new.user", "role": "archivist"}, role="admin"), 409
    )
    assert_problem(
        api.post("/api/v1/users", {"name": "Bad Name", "role": "archivist"}, role="admin"), 422
    )
    assert_problem(api.post("/api/v1/users", {"name": "x.y", "role": "king"}, role="admin"), 422)
    assert_ok(api.post("/api/v1/users/new.user/role", {"role": "auditor"}, role="admin"))
    assert assert_ok(api.client.get("/api/v1/users/me", headers=headers))["role"] == "auditor"
    second = assert_ok(api.post("/api/v1/users/new.user/tokens", {}, role="admin"), 201)["token"]
    assert second != added["token"]
    me = api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {second}"})
    assert assert_ok(me)["name"] == "new.user"
    assert_problem(api.post("/api/v1/users/nobody.here/tokens", {}, role="admin"), 404)


def test_one_leaked_token_is_revoked_and_the_users_other_tokens_keep_working(api: Api) -> None:
    added = assert_ok(api.post("/api/v1/users", {"name": "leaky", "role": "auditor"}, "admin"), 201)
    other = assert_ok(api.post("/api/v1/users/leaky/tokens", {}, role="admin"), 201)["token"]

    def me(token: str) -> Response:
        return api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})

    revoke = {"token": added["token"], "reason": "pasted in a ticket"}
    # Only for its own user: another user's name does not find it.
    assert_problem(api.post("/api/v1/users/someone.else/tokens/revoke", revoke, "admin"), 404)
    assert_problem(api.post("/api/v1/users/leaky/tokens/revoke", revoke, "auditor"), 403)
    assert assert_ok(api.post("/api/v1/users/leaky/tokens/revoke", revoke, "admin")) == {
        "name": "leaky",
        "status": "token revoked",
    }
    assert "revoked" in assert_problem(me(added["token"]), 401)["detail"]
    assert assert_ok(me(other))["name"] == "leaky"
    again = api.post("/api/v1/users/leaky/tokens/revoke", revoke, "admin")
    assert "already revoked" in assert_problem(again, 422)["detail"]
    unknown = {"token": "la_not-a-token"}
    assert_problem(api.post("/api/v1/users/leaky/tokens/revoke", unknown, "admin"), 404)
    user = api.archive.get_user("leaky")  # untouched: active, no event since registered
    assert user.active and user.version == 1


def test_integrity_routes(api: Api) -> None:
    api.open()
    assert_ok(api.post("/api/v1/loans/CR-1/status", {"status": "overdue"}))
    whole = assert_ok(api.get("/api/v1/integrity", role="auditor"))
    assert whole["ok"] is True and whole["first_breach"] is None
    assert whole["events_checked"] >= 2 + len(USERS) * 2
    one = assert_ok(api.get("/api/v1/integrity/loans/CR-1", role="auditor"))
    assert one == {"ok": True, "events_checked": 2, "aggregates_checked": 1, "first_breach": None}
    assert_problem(api.get("/api/v1/integrity/loans/NOPE", role="auditor"), 404)


# -- fuzzing (SQLite only) -------------------------------------------------------------------------

FUZZ_OFFICER = CommandContext(OFFICER, "credit_officer", "fuzz seed")
VICTIMS = ["victim.one", "victim.two"]


@dataclass
class FuzzTarget:
    api: Api
    values: dict[str, list[str]]  # path placeholder -> real values worth trying


@pytest.fixture
def fuzz(tmp_path: Path) -> Iterator[FuzzTarget]:
    settings = Settings(data_dir=tmp_path, demo_data=False)
    archive = ArchiveApp(settings)
    try:
        api = make_api(settings, archive)
        for name in VICTIMS:
            archive.add_user(operator_context(), name, "archivist")
        archive.open_loan(FUZZ_OFFICER, **loan_terms("CR-1"))
        archive.open_loan(FUZZ_OFFICER, **loan_terms("CR-2"))
        reg = archive.register_collateral(FUZZ_OFFICER, **mortgage_fields("CR-1")).id
        val = archive.appraise(FUZZ_OFFICER, **appraisal_fields("CR-1", collateral_id=reg)).id
        doc = archive.register_document(
            FUZZ_OFFICER,
            io.BytesIO(PDF),
            loan_number="CR-1",
            doc_type="contract",
            original_filename="contract.pdf",
        ).id
        yield FuzzTarget(
            api,
            {
                "loan": ["CR-1", "CR-2", "NOPE"],
                "reg": [str(reg), "00000000-0000-0000-0000-000000000000"],
                "val": [str(val)],
                "user": [*VICTIMS, "nobody.here"],
                "doc": [str(doc), "00000000-0000-0000-0000-000000000000"],
                "view": ["loan_files", "audit_trail", "no_such_view"],
            },
        )
    finally:
        archive.close()


# Valid bodies for every POST route, keyed by path template with fuzzable placeholders.
UPLOAD = "/api/v1/documents"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
POST_BODIES: dict[str, dict[str, Any]] = {
    "/api/v1/loans": loan_body("FZ-1"),
    **{f"/api/v1/loans/{{loan}}/{path}": body for path, body, _, _ in COMMAND_STEPS},
    "/api/v1/collateral": mortgage_body("CR-2", cadastral_reference="1234567AB1234C0001DE"),
    "/api/v1/collateral/{reg}/registration": {
        "registry_entry": "T-1",
        "registered_on": "2024-01-20",
    },
    "/api/v1/collateral/{reg}/site-verifications": {
        "officer": "M",
        "verified_on": "2024-03-01",
        "findings": "ok",
        "defects": [],
    },
    "/api/v1/collateral/{reg}/release": {"released_on": "2025-02-01"},
    "/api/v1/valuations": appraisal_body("CR-1"),
    "/api/v1/valuations/{val}/review": {"reviewer": "C", "reviewed_value": "120000.00"},
    "/api/v1/valuations/{val}/revaluation": {"revaluation_due": "2025-06-01"},
    "/api/v1/users": {"name": "fuzz.user", "role": "auditor"},
    "/api/v1/users/{user}/tokens": {"reason": "fuzz"},
    "/api/v1/users/{user}/tokens/revoke": {"token": "la_fuzz", "reason": "fuzz"},
    "/api/v1/users/{user}/role": {"role": "auditor"},
    "/api/v1/users/{user}/deactivate": {"reason": "fuzz"},
    # Uploads are multipart: these fields go as form fields, next to a file.
    UPLOAD: {"loan_number": "CR-1", "doc_type": "contract", "sha256": None, "reason": "fuzz"},
    "/api/v1/documents/{doc}/legal-hold": {"on": True, "reason": "fuzz"},
    "/api/v1/documents/fixity-checks": {},
    "/api/v1/projections/{view}/rebuild": {"reason": "fuzz"},
}
ADMIN_ROUTES = ("/api/v1/users", "/api/v1/documents/fixity-checks", "/legal-hold", "/rebuild")
GET_PATHS = [
    "/api/v1/loans/{loan}",
    "/api/v1/loans/{loan}/history",
    "/api/v1/collateral/{reg}",
    "/api/v1/valuations/{val}",
    "/api/v1/integrity/loans/{loan}",
    "/api/v1/users/me",
    "/api/v1/integrity",
    "/api/v1/documents/{doc}",
    "/api/v1/documents/{doc}/original",
    "/api/v1/loans",
    "/api/v1/audit-trail",
    "/api/v1/audit-trail/export",
    "/api/v1/projections",
    "/api/v1/search",
    *(
        "/api/v1/reports/" + name
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
            "loans/{loan}/analysis",
            "loans/{loan}/analysis.pdf",
        )
    ),
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
edge_values = st.sampled_from(
    [
        "9999-12-31",
        "0001-01-01",
        "1E+1000000",
        "1E+27",
        "0.01",
        "-0.01",
        "0.001",
        "NaN",
        "Infinity",
        "CR-Ñ-1",
        "贷款-1",
        "CR/2024/1",
        " padded ",
        "",
        "\x00",
        2**63,
        -(2**63),
        10**30,
        1e308,
    ]
)
plausible = (
    json_values
    | edge_values
    | st.dates().map(date.isoformat)
    | st.decimals(allow_nan=False, allow_infinity=False).map(str)
    | st.datetimes(timezones=st.none() | st.timezones()).map(datetime.isoformat)
    | st.sampled_from(["overdue", "settled", "visit", "monthly", "loan", "pass", "EUR", "-1", "0"])
)
printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@st.composite
def post_requests(draw: st.DrawFn, values: dict[str, list[str]]) -> tuple[str, Any, dict[str, str]]:
    template = draw(st.sampled_from(sorted(POST_BODIES)))
    valid = POST_BODIES[template]
    path = template
    for name, real in values.items():
        if f"{{{name}}}" in path:
            value = draw(st.sampled_from(real) | st.text(max_size=12))
            path = path.replace(f"{{{name}}}", quote(value, safe=""))
    kind = draw(st.sampled_from(["any json", "random fields", "fields off", "one field off"]))
    if kind == "any json":
        body: Any = draw(json_values)
    elif kind == "random fields":
        keys = draw(st.sets(st.sampled_from(sorted(valid) or ["reason"])))
        body = {k: draw(plausible) for k in keys}
    else:
        body = dict(valid)
        keys = st.sampled_from(sorted(valid) or ["reason"])
        off = [draw(keys)] if kind == "one field off" else draw(st.sets(keys, max_size=3))
        for key in off:
            body[key] = draw(plausible)
    headers = {}
    if_match = draw(st.none() | printable | st.integers(-1, 5).map(lambda n: f'"{n}"'))
    if if_match is not None:
        headers["If-Match"] = if_match
    return path, body, headers


@st.composite
def get_requests(draw: st.DrawFn, values: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    path = draw(st.sampled_from(GET_PATHS))
    for name, real in values.items():
        if f"{{{name}}}" in path:
            value = draw(st.sampled_from(real) | st.text(max_size=12))
            path = path.replace(f"{{{name}}}", quote(value, safe=""))
    params = {}
    as_of = draw(
        st.none()
        | st.text(max_size=30)
        | st.datetimes(timezones=st.none() | st.timezones()).map(datetime.isoformat)
        | st.sampled_from(
            [
                "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59-01:00",
                "2024-01-01T00:00:00Z",
                "2024-01-01",
                "1700000000",
            ]
        )
    )
    if as_of is not None:
        params["as_of"] = as_of
    version = draw(
        st.none()
        | st.integers().map(str)
        | st.text(max_size=8)
        | st.sampled_from(["0", "-1", "1", "2", "99", str(2**63), str(10**30)])
    )
    if version is not None:
        params["version"] = version
    # The list and audit routes: paging, time windows, filters.
    for name in (
        "limit",
        "offset",
        "since",
        "until",
        "status",
        "format",
        "loan_number",
        "top",
        "days",
        "currency",
    ):
        value = draw(
            st.none()
            | st.text(max_size=12)
            | st.sampled_from(["0", "-1", "5", "10000", "csv", "json", "jsonl"])
        )
        if value is not None:
            params[name] = value
    if as_of is not None and draw(st.booleans()):
        params["since"] = as_of
    return path, params


FUZZ = hypothesis_settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def check_fuzz_response(resp: Response, request: str) -> None:
    assert resp.status_code < 500, f"{request} -> {resp.status_code}: {resp.text}"
    if resp.status_code >= 400:
        assert resp.headers["content-type"].split(";")[0] == PROBLEM_JSON, request
        if resp.request.method == "HEAD":
            return  # headers only
        body = resp.json()
        assert body["status"] == resp.status_code, request
        for key in ("type", "title", "detail"):
            assert isinstance(body[key], str), (request, body)


@hypothesis_settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_post_routes_never_fail_with_5xx(fuzz: FuzzTarget, data: st.DataObject) -> None:
    path, body, headers = data.draw(post_requests(fuzz.values))
    role = "admin" if any(marker in path for marker in ADMIN_ROUTES) else "credit_officer"
    headers = {**fuzz.api.headers(role), **headers}
    if path == UPLOAD and isinstance(body, dict):
        content = data.draw(st.just(PDF) | st.binary(max_size=64))
        form = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
        resp = fuzz.api.client.post(
            path, data=form, files={"file": ("f.pdf", content)}, headers=headers
        )
    else:
        headers["Content-Type"] = "application/json"
        resp = fuzz.api.client.post(path, content=json.dumps(body), headers=headers)
    check_fuzz_response(resp, f"POST {path} {headers} {json.dumps(body)[:500]}")


@hypothesis_settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuzz_get_routes_never_fail_with_5xx(fuzz: FuzzTarget, data: st.DataObject) -> None:
    path, params = data.draw(get_requests(fuzz.values))
    headers = fuzz.api.headers("admin")
    method = "GET"
    if path.endswith("/original"):
        method = data.draw(st.sampled_from(["GET", "HEAD"]))
        byte_range = data.draw(st.none() | printable.map(lambda r: "bytes=" + r) | printable)
        if byte_range is not None:
            headers["Range"] = byte_range
        held = data.draw(st.none() | printable | st.just("*"))
        if held is not None:
            headers["If-None-Match"] = held
    resp = fuzz.api.client.request(method, path, params=params, headers=headers)
    check_fuzz_response(resp, f"{method} {path} {params} {headers.get('Range')}")


def test_the_fuzzers_cover_every_route(api: Api) -> None:
    def shape(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "{}", path)

    served = {(m, shape(p)) for p, methods in api_routes(api.client.app) for m in methods}
    fuzzed = {("POST", shape(p)) for p in POST_BODIES} | {("GET", shape(p)) for p in GET_PATHS}
    fuzzed |= {("HEAD", shape(p)) for p in GET_PATHS if p.endswith("/original")}
    assert served - {("GET", "/healthz")} == fuzzed


@pytest.mark.parametrize(
    ("path", "example"),
    [
        ("/api/v1/loans/CR-1?as_of=99999999999", "2024-05-01T09:30:00Z"),
        ("/api/v1/loans/CR-1?as_of=1700000000.5", "2024-05-01T09:30:00Z"),
        ("/api/v1/audit-trail?since=1700000000", "2024-05-01T09:30:00Z"),
        ("/api/v1/audit-trail?until=%2B1700000000", "2024-05-01T09:30:00Z"),
        ("/api/v1/search?q=hipoteca&uploaded_from=20240101", "2024-05-01)"),
    ],
)
def test_moments_and_days_in_queries_are_iso_8601_not_numbers(
    api: Api, path: str, example: str
) -> None:
    """Lax parsing took a bare number for a Unix timestamp (as_of=99999999999 meant 1973).
    The example is one the parameter takes: a moment has a time and a zone."""
    api.open()
    problem = assert_problem(api.get(path, role="auditor"), 422)
    assert "ISO 8601" in problem["detail"] and example in problem["detail"], problem
