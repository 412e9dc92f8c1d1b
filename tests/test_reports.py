"""Portfolio reports and the per-loan analysis report, on both backends.

One small, realistic portfolio is built through the archive's commands (NPLs with and
without officers, a write-off under collection, a repeated mortgage, an overvalued
appraisal, superseded and due valuations, village-group and cooperative loans), the
views are caught up, and every report is checked figure by figure; then the same
reports over HTTP (roles, 404, PDF) and through the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from factories import appraisal_fields, loan_terms, mortgage_fields
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pypdf import PdfReader
from typer.testing import CliRunner

from api import problems
from api import reports as reports_api
from archive.application import ArchiveApp, operator_context
from archive.domain import CommandContext
from archive.report_cli import reports_app
from archive.settings import Settings
from projections import analysis, reports
from projections.reports import ReportError
from projections.runner import Projections
from projections.store import Store, open_store

AS_OF = date(2025, 6, 30)
ANA = "Ana Pérez Núñez"
CHECKLIST = {
    "creditor_debtor_relationship_clear": True,
    "willingness_to_pay": False,
    "capacity_to_pay": True,
    "valid_assets": True,
    "asset_disposal_feasible": True,
    "liabilities_investigated": True,
}
REF_A = "9872023VH5797S0001WX"  # CR-1 first lien, CR-2 second: a repeated mortgage
REF_B = "1234567AB1234N0001QQ"  # CR-7 only
REF_C = "7654321CD7654S0001ZZ"  # CR-3 (released) then CR-7: not repeated any more


@dataclass
class Portfolio:
    archive: ArchiveApp
    store: Store
    projections: Projections
    ids: dict[str, UUID]


def build(archive: ArchiveApp, ctx: CommandContext) -> dict[str, UUID]:
    ids: dict[str, UUID] = {}

    def open_(number: str, **terms: Any) -> None:
        archive.open_loan(ctx, **loan_terms(number, **terms))

    def do(number: str, method: str, *args: Any) -> None:
        archive.change_loan(ctx, number, None, lambda lf: getattr(lf, method)(ctx, *args))

    def to_npl(number: str) -> None:
        do(number, "change_status", "overdue")
        do(number, "change_status", "non_performing")

    def collateral(key: str, number: str, ref: str, rank: int, secured: str) -> UUID:
        fields = mortgage_fields(number, cadastral_reference=ref, lien_rank=rank)
        fields["secured_amount"] = secured
        ids[key] = archive.register_collateral(ctx, **fields).id
        return ids[key]

    def appraise(key: str, number: str, supersedes: UUID | None = None, **kw: Any) -> UUID:
        ids[key] = archive.appraise(ctx, supersedes=supersedes, **appraisal_fields(number, **kw)).id
        return ids[key]

    def review(key: str, value: str) -> None:
        archive.review_valuation(ctx, ids[key], None, reviewer="Eva Ruiz", reviewed_value=value)

    # CR-1: Ana's mortgage, a complete NPL file.
    open_("CR-1")
    to_npl("CR-1")
    do("CR-1", "assign_officer", "loan", "María López")
    do("CR-1", "assign_officer", "collection", "Joaquín Ibáñez")
    do("CR-1", "classify", "doubtful")
    do("CR-1", "record_investigation", CHECKLIST, "2025-02-01", "Visita al domicilio")
    do("CR-1", "categorise_recovery", "recoverable_with_effort", ["pérdida de empleo"])
    do("CR-1", "set_recovery_plan", "Venta pactada del piso", "2025-12-31", "60000.00")
    do("CR-1", "record_repayment", "1000.00", "2025-01-31")
    do("CR-1", "record_collection_action", "visit", "2025-03-10", "promesa", "2000.00", "JI")
    do("CR-1", "record_collection_action", "call", "2025-05-20", "sin respuesta", "0.00", "JI")
    do("CR-1", "record_inspection", "monthly", "2025-06-15", "María López", "sin cambios")
    do("CR-1", "record_inspection", "quarterly", "2025-02-20", "María López", "vivienda ok")
    do("CR-1", "record_inspection", "quarterly", "2025-07-05", "María López", "después")
    reg_a1 = collateral("A1", "CR-1", REF_A, 1, "120000.00")
    archive.change_collateral(
        ctx, reg_a1, None, lambda c: c.mark_registered(ctx, "T-1", "2024-01-20")
    )
    appraise("V1", "CR-1", collateral_id=reg_a1, appraisal_date="2024-07-10")
    review("V1", "120000.00")  # cut 30000 = 20 % of 150000: flagged (25 % > 10 %)

    # CR-2: Bernardo's business loan, an NPL without collection officer or investigation,
    # second lien on Ana's flat.
    open_(
        "CR-2",
        borrower_name="Bernardo Sáez",
        borrower_national_id="87654321X",
        product="business",
        principal="50000.00",
    )
    to_npl("CR-2")
    do("CR-2", "assign_officer", "loan", "María López")
    do("CR-2", "classify", "substandard")
    do("CR-2", "record_inspection", "quarterly", "2025-01-10", "María López", "cerrado")
    collateral("A2", "CR-2", REF_A, 2, "40000.00")
    appraise(
        "V2",
        "CR-2",
        appraised_value="50000.00",
        appraisal_date="2025-06-01",
        revaluation_due="2025-12-01",
    )
    review("V2", "48000.00")  # cut 2000 = 4 %

    # CR-3: Ana again (id written with a dash), performing; its mortgage was released.
    open_("CR-3", borrower_national_id="12345678-z", product="personal", principal="20000.00")
    reg_c3 = collateral("C3", "CR-3", REF_C, 1, "30000.00")
    appraise(
        "V3",
        "CR-3",
        collateral_id=reg_c3,
        agency="Valoraciones Mediterráneo",
        appraised_value="31000.00",
        appraisal_date="2024-01-10",
    )

    # CR-4: a village group's loan, written off and still under collection.
    open_(
        "CR-4",
        borrower_name="Comité de San Pedro",
        borrower_national_id="G44000001",
        product="village_group",
        village_group="Grupo Aldea San Pedro",
        principal="30000.00",
    )
    to_npl("CR-4")
    do("CR-4", "assign_officer", "loan", "Pedro Gil")
    do("CR-4", "assign_officer", "collection", "Joaquín Ibáñez")
    do("CR-4", "classify", "loss")
    do("CR-4", "record_investigation", CHECKLIST, "2025-01-15")
    do("CR-4", "categorise_recovery", "temporarily_unrecoverable", ["sequía", "emigración"])
    do("CR-4", "change_status", "written_off")
    do("CR-4", "record_collection_action", "visit", "2025-04-02", "pago parcial", "500.00", "JI")
    do("CR-4", "record_inspection", "monthly", "2025-05-29", "Pedro Gil", "sin cambios")
    do("CR-4", "record_inspection", "quarterly", "2025-04-15", "Pedro Gil", "sin cambios")

    # CR-5: a cooperative, performing.
    open_(
        "CR-5",
        borrower_name="Cooperativa Agraria del Jiloca",
        borrower_national_id="F44000002",
        product="cooperative",
        village_group="Cooperativa del Jiloca",
        principal="60000.00",
    )

    # CR-6: same village group, repaid and settled; its valuation needs no monitoring.
    open_(
        "CR-6",
        borrower_name="Íñigo Martínez",
        borrower_national_id="33333333P",
        product="village_group",
        village_group="Grupo Aldea San Pedro",
        principal="10000.00",
    )
    appraise(
        "V6", "CR-6", agency="Tasa Rural SL", appraised_value="9000.00", appraisal_date="2024-02-01"
    )
    do("CR-6", "record_repayment", "10000.00", "2025-03-01")
    do("CR-6", "change_status", "settled")

    # CR-7: Carmen's mortgage; the first valuation was superseded by a newer one.
    open_(
        "CR-7",
        borrower_name="Carmen Ortiz",
        borrower_national_id="55555555K",
        principal="200000.00",
    )
    reg_b = collateral("B7", "CR-7", REF_B, 1, "250000.00")
    collateral("C7", "CR-7", REF_C, 2, "50000.00")  # second lien on CR-3's property
    first = appraise(
        "V7a",
        "CR-7",
        collateral_id=reg_b,
        agency="Valoraciones Mediterráneo",
        appraised_value="260000.00",
        appraisal_date="2023-05-01",
    )
    review("V7a", "250000.00")  # cut 10000 = 3.85 %
    appraise(
        "V7b",
        "CR-7",
        supersedes=first,
        collateral_id=reg_b,
        agency="Valoraciones  Mediterráneo",  # same agency, sloppy spacing
        appraised_value="255000.00",
        appraisal_date="2024-05-20",
    )
    review("V7b", "250000.00")  # cut 5000 = 1.96 %
    archive.release_collateral(ctx, reg_c3, None, "2025-02-01")
    return ids


@pytest.fixture
def portfolio(
    archive: ArchiveApp, officer: CommandContext, settings: Settings
) -> Iterator[Portfolio]:
    ids = build(archive, officer)
    store = open_store(settings)
    projections = Projections(archive, store)
    projections.catch_up()
    yield Portfolio(archive, store, projections, ids)
    store.close()


def head(p: Portfolio, report: dict[str, Any], name: str) -> None:
    assert report["report"] == name
    assert report["as_of"] == AS_OF.isoformat()
    assert report["position"] == p.archive.head_position()


# -- the reports, figure by figure -----------------------------------------------------------------


def test_portfolio_reports(portfolio: Portfolio) -> None:
    p, store = portfolio, portfolio.store

    npl = reports.npl_portfolio(store, AS_OF)
    head(p, npl, "npl_portfolio")
    assert npl["currency"] == "EUR"
    performing = npl["non_performing"]
    assert (performing["count"], performing["outstanding"]) == (2, "147000.00")
    assert performing["by_recovery_category"] == [
        {"recovery_category": "recoverable", "count": 0, "outstanding": "0.00"},
        {"recovery_category": "recoverable_with_effort", "count": 1, "outstanding": "97000.00"},
        {"recovery_category": "temporarily_unrecoverable", "count": 0, "outstanding": "0.00"},
        {"recovery_category": "uncategorised", "count": 1, "outstanding": "50000.00"},
    ]
    tiers = {
        r["classification"]: (r["count"], r["outstanding"]) for r in performing["by_classification"]
    }
    assert list(tiers) == ["pass", "special_mention", "substandard", "doubtful", "loss"]
    assert tiers["doubtful"] == (1, "97000.00") and tiers["substandard"] == (1, "50000.00")
    assert tiers["pass"] == (0, "0.00")
    written_off = npl["written_off"]
    assert (written_off["count"], written_off["outstanding"]) == (1, "29500.00")
    assert {r["recovery_category"]: r["count"] for r in written_off["by_recovery_category"]}[
        "temporarily_unrecoverable"
    ] == 1
    assert {r["classification"]: r["outstanding"] for r in written_off["by_classification"]}[
        "loss"
    ] == "29500.00"
    assert npl["totals"] == {"count": 3, "outstanding": "176500.00"}

    ledgers = reports.officer_ledgers(store, AS_OF)
    head(p, ledgers, "officer_ledgers")
    maria, pedro = ledgers["loan_officers"]
    assert (maria["officer"], maria["count"], maria["outstanding"]) == (
        "María López",
        2,
        "147000.00",
    )
    assert (maria["collection_actions"], maria["last_action_date"], maria["recovered"]) == (
        2,
        "2025-05-20",
        "2000.00",
    )
    assert maria["loans"][0] == {
        "loan_number": "CR-1",
        "borrower_name": ANA,
        "status": "non_performing",
        "classification": "doubtful",
        "recovery_category": "recoverable_with_effort",
        "outstanding": "97000.00",
        "collection_actions": 2,
        "last_action_date": "2025-05-20",
        "recovered": "2000.00",
    }
    assert [line["loan_number"] for line in maria["loans"]] == ["CR-1", "CR-2"]
    assert maria["loans"][1]["collection_actions"] == 0
    assert (pedro["officer"], pedro["count"], pedro["outstanding"], pedro["recovered"]) == (
        "Pedro Gil",
        1,
        "29500.00",
        "500.00",
    )
    [joaquin] = ledgers["collection_officers"]
    assert (joaquin["officer"], joaquin["count"], joaquin["outstanding"]) == (
        "Joaquín Ibáñez",
        2,
        "126500.00",
    )
    assert (joaquin["collection_actions"], joaquin["last_action_date"], joaquin["recovered"]) == (
        3,
        "2025-05-20",
        "2500.00",
    )
    assert ledgers["unassigned"] == {"loan_officer": [], "collection_officer": ["CR-2"]}

    gaps = reports.npl_gaps(store, AS_OF)
    head(p, gaps, "npl_gaps")
    assert (gaps["checked"], gaps["complete"]) == (3, 2)
    assert gaps["missing_counts"] == {
        "loan_officer": 0,
        "collection_officer": 1,
        "investigation": 1,
    }
    assert gaps["items"] == [
        {
            "loan_number": "CR-2",
            "borrower_name": "Bernardo Sáez",
            "status": "non_performing",
            "loan_officer": "María López",
            "collection_officer": None,
            "missing": ["collection_officer", "investigation"],
        }
    ]

    repeated = reports.repeated_mortgages(store, AS_OF)
    head(p, repeated, "repeated_mortgages")
    assert repeated["count"] == 1
    [prop] = repeated["properties"]
    assert (prop["cadastral_reference"], prop["total_secured"], prop["currency"]) == (
        REF_A,
        "160000.00",
        "EUR",
    )
    assert [
        (lien["loan_number"], lien["lien_rank"], lien["secured_amount"], lien["flagged"])
        for lien in prop["liens"]
    ] == [("CR-1", 1, "120000.00", False), ("CR-2", 2, "40000.00", True)]
    assert prop["liens"][0]["registration_status"] == "registered"
    assert prop["liens"][1]["registration_status"] == "pending"
    assert prop["liens"][1]["borrower_name"] == "Bernardo Sáez"
    assert prop["liens"][0]["registration_id"] == str(p.ids["A1"])

    agencies = reports.overvaluation_by_agency(store, AS_OF)
    head(p, agencies, "overvaluation_by_agency")
    aragon, mediterraneo, rural = agencies["agencies"]
    assert aragon == {
        "agency": "Tasaciones Aragón SA",
        "appraisals": 2,
        "reviewed": 2,
        "overvalued": 1,
        "overvalued_share": "50.00",
        "average_cut": "16000.00",
        "max_cut": "30000.00",
        "average_cut_pct": "12.00",
        "max_cut_pct": "20.00",
    }
    assert mediterraneo == {
        "agency": "Valoraciones Mediterráneo",
        "appraisals": 3,  # the superseded and the unreviewed ones count as appraisals
        "reviewed": 2,
        "overvalued": 0,
        "overvalued_share": "0.00",
        "average_cut": "7500.00",
        "max_cut": "10000.00",
        "average_cut_pct": "2.90",
        "max_cut_pct": "3.85",
    }
    assert rural == {
        "agency": "Tasa Rural SL",
        "appraisals": 1,
        "reviewed": 0,
        "overvalued": 0,
        "overvalued_share": None,
        "average_cut": None,
        "max_cut": None,
        "average_cut_pct": None,
        "max_cut_pct": None,
    }

    due = reports.revaluations_due(store, AS_OF)
    head(p, due, "revaluations_due")
    assert (due["days"], due["due_by"], due["count"], due["overdue"]) == (30, "2025-07-30", 2, 1)
    assert [
        (
            i["loan_number"],
            i["valuation_id"],
            i["revaluation_due"],
            i["days_until_due"],
            i["overdue"],
        )
        for i in due["items"]
    ] == [
        ("CR-7", str(p.ids["V7b"]), "2025-05-20", -41, True),
        ("CR-1", str(p.ids["V1"]), "2025-07-10", 10, False),
    ]
    assert due["items"][1]["cadastral_reference"] == REF_A
    assert due["items"][1]["reviewed_value"] == "120000.00"
    # Nine days ahead the CR-1 revaluation is not yet due; a year ahead CR-2's is too.
    assert [i["loan_number"] for i in reports.revaluations_due(store, AS_OF, 9)["items"]] == [
        "CR-7"
    ]
    later = reports.revaluations_due(store, AS_OF, 365)["items"]
    assert [i["loan_number"] for i in later] == ["CR-7", "CR-1", "CR-2"]

    overdue = reports.inspections_overdue(store, AS_OF)
    head(p, overdue, "inspections_overdue")
    assert (overdue["checked"], overdue["count"]) == (3, 3)
    assert overdue["overdue_counts"] == {"monthly": 2, "quarterly": 2}
    by_loan = {i["loan_number"]: i for i in overdue["items"]}
    assert by_loan["CR-1"]["overdue"] == ["quarterly"]
    assert by_loan["CR-1"]["last_quarterly"] == "2025-02-20"  # the July one is after as_of
    assert by_loan["CR-1"]["quarterly_next_due"] == "2025-05-20"
    assert by_loan["CR-1"]["last_monthly"] == "2025-06-15"
    assert not by_loan["CR-1"]["monthly_overdue"]
    assert by_loan["CR-2"]["overdue"] == ["monthly", "quarterly"]
    assert by_loan["CR-2"]["last_monthly"] is None
    assert by_loan["CR-4"]["overdue"] == ["monthly"]  # 2025-05-29 is a day too old
    assert by_loan["CR-4"]["monthly_next_due"] == "2025-06-29"
    # A day earlier the monthly one of CR-4 was still in time.
    earlier = reports.inspections_overdue(store, date(2025, 6, 29))
    assert {i["loan_number"]: i["overdue"] for i in earlier["items"]}.get("CR-4") is None

    top = reports.concentration(store, AS_OF, top=3)
    head(p, top, "concentration")
    assert (top["total_outstanding"], top["borrowers"], top["loans"]) == ("427000.00", 4, 5)
    assert [
        (
            i["rank"],
            i["national_id"],
            i["loans"],
            i["outstanding"],
            i["share"],
            i["cumulative_share"],
        )
        for i in top["items"]
    ] == [
        (1, "55555555K", ["CR-7"], "200000.00", "46.84", "46.84"),
        (2, "12345678Z", ["CR-1", "CR-3"], "117000.00", "27.40", "74.24"),
        (3, "F44000002", ["CR-5"], "60000.00", "14.05", "88.29"),
    ]
    assert top["items"][1]["borrower_name"] == ANA
    assert reports.concentration(store, AS_OF, top=10)["items"][-1]["cumulative_share"] == "100.00"

    groups = reports.village_group_loans(store, AS_OF)
    head(p, groups, "village_group_loans")
    jiloca, san_pedro = groups["groups"]
    assert (jiloca["group"], jiloca["products"], jiloca["count"], jiloca["outstanding"]) == (
        "Cooperativa del Jiloca",
        ["cooperative"],
        1,
        "60000.00",
    )
    assert (jiloca["npl_count"], jiloca["npl_outstanding"], jiloca["npl_share"]) == (
        0,
        "0.00",
        "0.00",
    )
    assert (san_pedro["group"], san_pedro["count"], san_pedro["outstanding"]) == (
        "Grupo Aldea San Pedro",
        2,
        "29500.00",
    )
    assert (san_pedro["npl_count"], san_pedro["npl_outstanding"], san_pedro["npl_share"]) == (
        1,
        "29500.00",
        "100.00",
    )
    assert (san_pedro["collection_actions"], san_pedro["recovered"]) == (1, "500.00")
    assert [
        (r["loan_number"], r["status"], r["npl"], r["outstanding"]) for r in san_pedro["loans"]
    ] == [
        ("CR-4", "written_off", True, "29500.00"),
        ("CR-6", "settled", False, "0.00"),
    ]
    assert san_pedro["loans"][0]["last_action_date"] == "2025-04-02"
    assert groups["totals"] == {
        "groups": 2,
        "count": 3,
        "outstanding": "89500.00",
        "npl_count": 1,
        "npl_outstanding": "29500.00",
    }


def test_amounts_in_two_currencies_are_never_added(
    portfolio: Portfolio, officer: CommandContext
) -> None:
    p = portfolio
    p.archive.open_loan(
        officer,
        **loan_terms(
            "CR-9", borrower_national_id="99999999R", principal="5000.00", currency_code="USD"
        ),
    )
    p.projections.catch_up()
    with pytest.raises(ReportError, match="EUR, USD"):
        reports.concentration(p.store, AS_OF)
    euros = reports.concentration(p.store, AS_OF, currency="eur")
    assert (euros["currency"], euros["total_outstanding"], euros["loans"]) == (
        "EUR",
        "427000.00",
        5,
    )
    dollars = reports.concentration(p.store, AS_OF, currency="USD")
    assert [(i["loans"], i["share"]) for i in dollars["items"]] == [(["CR-9"], "100.00")]
    # Reports over the NPLs only are not affected by a performing USD loan.
    assert reports.npl_portfolio(p.store, AS_OF)["currency"] == "EUR"
    with pytest.raises(ReportError, match="ISO 4217"):
        reports.npl_portfolio(p.store, AS_OF, currency="euro")
    with pytest.raises(ReportError, match="top"):
        reports.concentration(p.store, AS_OF, top=0)


def test_empty_views_answer_empty_reports(settings: Settings, archive: ArchiveApp) -> None:
    with open_store(settings) as store:
        Projections(archive, store).catch_up()
        for name, report in reports.REPORTS.items():
            body = report(store, AS_OF)
            assert (body["report"], body["position"], body["as_of"]) == (name, 0, "2025-06-30")
        totals = reports.npl_portfolio(store, AS_OF)["totals"]
    assert totals == {"count": 0, "outstanding": "0.00"}


def test_the_default_reporting_date_is_the_archives_utc_today(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """date.today() is the server's local date: at any hour one of these zones is on
    another day than UTC, the clock of every event and date rule."""
    for zone in ("Etc/GMT-14", "Etc/GMT+12"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        assert reports.report_date(None) == datetime.now(UTC).date(), zone
    monkeypatch.undo()
    time.tzset()


# -- as CSV, to file in a spreadsheet -----------------------------------------------------------------


def csv_rows(text: str) -> list[dict[str, str]]:
    """The rows of a CSV text, checked to be RFC 4180 lines (CRLF) as the audit export's."""
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", ""), text
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_every_portfolio_report_flattens_to_one_row_per_line(portfolio: Portfolio) -> None:
    store = portfolio.store
    assert set(reports.CSV_LAYOUTS) == set(reports.REPORTS)
    for name, make in reports.REPORTS.items():
        text = reports.report_csv(make(store, AS_OF))
        header = next(csv.reader(io.StringIO(text, newline="")))
        assert tuple(header) == reports.CSV_LAYOUTS[name][0], name

    npl = csv_rows(reports.report_csv(reports.npl_portfolio(store, AS_OF)))
    assert len(npl) == 2 * (4 + 5)  # each status: 3 categories + uncategorised, 5 classes
    assert {
        "status": "non_performing",
        "breakdown": "recovery_category",
        "category": "recoverable_with_effort",
        "count": "1",
        "outstanding": "97000.00",
        "currency": "EUR",
    } in npl
    # Amounts are exact decimal text: a sheet's sum of one breakdown is the JSON total.
    for status, total in (("non_performing", "147000.00"), ("written_off", "29500.00")):
        for breakdown in ("recovery_category", "classification"):
            amounts = [
                Decimal(r["outstanding"])
                for r in npl
                if (r["status"], r["breakdown"]) == (status, breakdown)
            ]
            assert str(sum(amounts, Decimal("0.00"))) == total, (status, breakdown)

    ledgers = csv_rows(reports.report_csv(reports.officer_ledgers(store, AS_OF)))
    assert [(r["duty"], r["officer"], r["loan_number"]) for r in ledgers] == [
        ("loan_officer", "María López", "CR-1"),
        ("loan_officer", "María López", "CR-2"),
        ("loan_officer", "Pedro Gil", "CR-4"),
        ("collection_officer", "Joaquín Ibáñez", "CR-1"),
        ("collection_officer", "Joaquín Ibáñez", "CR-4"),
        ("collection_officer", "", "CR-2"),  # no collection officer: still on the sheet
    ]
    assert ledgers[0] == {
        "duty": "loan_officer",
        "officer": "María López",
        "loan_number": "CR-1",
        "borrower_name": ANA,
        "status": "non_performing",
        "classification": "doubtful",
        "recovery_category": "recoverable_with_effort",
        "outstanding": "97000.00",
        "collection_actions": "2",
        "last_action_date": "2025-05-20",
        "recovered": "2000.00",
        "currency": "EUR",
    }
    # The unassigned loan's figures are its own (as under its loan officer), not blanks.
    assert {k: v for k, v in ledgers[-1].items() if k not in ("duty", "officer")} == {
        k: v for k, v in ledgers[1].items() if k not in ("duty", "officer")
    }
    assert ledgers[-1]["outstanding"] == "50000.00"

    assert csv_rows(reports.report_csv(reports.npl_gaps(store, AS_OF))) == [
        {
            "loan_number": "CR-2",
            "borrower_name": "Bernardo Sáez",
            "status": "non_performing",
            "loan_officer": "María López",
            "collection_officer": "",
            "missing_loan_officer": "false",
            "missing_collection_officer": "true",
            "missing_investigation": "true",
        }
    ]

    liens = csv_rows(reports.report_csv(reports.repeated_mortgages(store, AS_OF)))
    assert [
        (r["cadastral_reference"], r["lien_rank"], r["loan_number"], r["secured_amount"])
        for r in liens
    ] == [(REF_A, "1", "CR-1", "120000.00"), (REF_A, "2", "CR-2", "40000.00")]
    assert [(r["flagged"], r["registration_status"]) for r in liens] == [
        ("false", "registered"),
        ("true", "pending"),
    ]
    assert liens[0]["registration_id"] == str(portfolio.ids["A1"])

    agencies = csv_rows(reports.report_csv(reports.overvaluation_by_agency(store, AS_OF)))
    assert [a["agency"] for a in agencies] == [
        "Tasaciones Aragón SA",
        "Valoraciones Mediterráneo",
        "Tasa Rural SL",
    ]
    assert (agencies[0]["max_cut"], agencies[0]["max_cut_pct"], agencies[0]["currency"]) == (
        "30000.00",
        "20.00",
        "EUR",
    )
    assert (agencies[2]["reviewed"], agencies[2]["average_cut"]) == ("0", "")  # null: empty

    due = csv_rows(reports.report_csv(reports.revaluations_due(store, AS_OF)))
    assert [(r["loan_number"], r["days_until_due"], r["overdue"]) for r in due] == [
        ("CR-7", "-41", "true"),  # a negative count of days is a number, left as it is
        ("CR-1", "10", "false"),
    ]

    overdue = {
        r["loan_number"]: r
        for r in csv_rows(reports.report_csv(reports.inspections_overdue(store, AS_OF)))
    }
    assert list(overdue) == ["CR-1", "CR-2", "CR-4"]
    assert (overdue["CR-2"]["last_monthly"], overdue["CR-2"]["monthly_overdue"]) == ("", "true")
    assert (overdue["CR-1"]["quarterly_next_due"], overdue["CR-1"]["monthly_overdue"]) == (
        "2025-05-20",
        "false",
    )

    top = csv_rows(reports.report_csv(reports.concentration(store, AS_OF, top=3)))
    assert [(r["rank"], r["loans"], r["share"], r["total_outstanding"]) for r in top] == [
        ("1", "CR-7", "46.84", "427000.00"),
        ("2", "CR-1, CR-3", "27.40", "427000.00"),
        ("3", "CR-5", "14.05", "427000.00"),
    ]

    groups = csv_rows(reports.report_csv(reports.village_group_loans(store, AS_OF)))
    assert [(g["group"], g["loan_number"], g["npl"], g["outstanding"]) for g in groups] == [
        ("Cooperativa del Jiloca", "CR-5", "false", "60000.00"),
        ("Grupo Aldea San Pedro", "CR-4", "true", "29500.00"),
        ("Grupo Aldea San Pedro", "CR-6", "false", "0.00"),
    ]


def test_empty_reports_are_a_header_line(settings: Settings, archive: ArchiveApp) -> None:
    """Nothing to list is the header alone; the NPL portfolio's buckets are always there."""
    with open_store(settings) as store:
        Projections(archive, store).catch_up()
        for name, make in reports.REPORTS.items():
            text = reports.report_csv(make(store, AS_OF))
            header = ",".join(reports.CSV_LAYOUTS[name][0]) + "\r\n"
            assert text.startswith(header), name
            if name == "npl_portfolio":
                rows = csv_rows(text)
                assert len(rows) == 18 and {r["count"] for r in rows} == {"0"}
                assert {(r["outstanding"], r["currency"]) for r in rows} == {("0.00", "")}
            else:
                assert text == header, name


def test_the_csv_never_hands_a_spreadsheet_a_formula_but_keeps_negative_amounts(
    portfolio: Portfolio, officer: CommandContext
) -> None:
    """Typed text that starts like a formula is defused as in the audit trail export; a
    review above the appraisal is a negative cut, which must stay a number."""
    p = portfolio
    p.archive.open_loan(officer, **loan_terms("CR-9", borrower_name='=HYPERLINK("x")'))
    for status in ("overdue", "non_performing"):
        p.archive.change_loan(
            officer, "CR-9", None, lambda lf, s=status: lf.change_status(officer, s)
        )
    valuation = p.archive.appraise(
        officer,
        supersedes=None,
        **appraisal_fields("CR-9", agency="@Tasa Sur", appraised_value="100000.00"),
    ).id
    p.archive.review_valuation(
        officer, valuation, None, reviewer="Eva Ruiz", reviewed_value="105000.00"
    )
    p.projections.catch_up()

    gaps = csv_rows(reports.report_csv(reports.npl_gaps(p.store, AS_OF)))
    assert {g["loan_number"]: g["borrower_name"] for g in gaps}["CR-9"] == '\'=HYPERLINK("x")'
    [sur] = [
        a
        for a in csv_rows(reports.report_csv(reports.overvaluation_by_agency(p.store, AS_OF)))
        if "Tasa Sur" in a["agency"]
    ]
    assert sur["agency"] == "'@Tasa Sur"
    assert (sur["max_cut"], sur["max_cut_pct"]) == ("-5000.00", "-5.00")


def test_a_report_without_a_csv_form_says_so() -> None:
    with pytest.raises(ReportError, match="loan_analysis report has no CSV form"):
        reports.report_csv({"report": "loan_analysis"})


# -- the per-loan analysis report --------------------------------------------------------------------


def pdf_text(content: bytes) -> str:
    return "\n".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(content)).pages)


def test_loan_analysis_json_and_pdf(portfolio: Portfolio) -> None:
    p = portfolio
    report = analysis.loan_analysis(p.archive, p.store, "CR-1", AS_OF)
    head(p, report, "loan_analysis")
    loan = p.archive.get_loan("CR-1")
    assert report["chain_head"] == loan.chain_head
    assert report["integrity"]["ok"] is True
    assert report["loan"]["borrower_name"] == ANA
    assert report["loan"]["outstanding"] == "97000.00"
    assert report["officers"]["loan_officer"] == "María López"
    assert [h["duty"] for h in report["officers"]["history"]] == ["loan", "collection"]
    checklist = {c["item"]: c["answer"] for c in report["investigation"]["checklist"]}
    assert checklist == CHECKLIST
    assert report["classification"]["current"] == "doubtful"
    assert [(c["from"], c["to"]) for c in report["classification"]["history"]] == [
        ("pass", "doubtful")
    ]
    assert [(s["from"], s["to"]) for s in report["status_history"]] == [
        ("performing", "overdue"),
        ("overdue", "non_performing"),
    ]
    assert report["recovery"]["category"] == "recoverable_with_effort"
    assert report["recovery"]["causes_of_default"] == ["pérdida de empleo"]
    assert report["recovery"]["plan"]["target_amount"] == "60000.00"
    assert report["collection_summary"] == {
        "count": 2,
        "recovered": "2000.00",
        "last_action_date": "2025-05-20",
    }
    assert report["inspections"]["overdue"] == ["quarterly"]
    [valuation] = report["valuations"]
    assert (valuation["counted"], valuation["cut_pct"], valuation["overvalued"]) == (
        True,
        "20.00",
        True,
    )
    assert report["coverage"] == {
        "collateral_value": "120000.00",
        "outstanding": "97000.00",
        "ratio": "1.2371",
        "percent": "123.71",
        "valuations_counted": 1,
    }
    # History: every event of the loan, its collateral and valuation, in log order.
    positions = [h["position"] for h in report["history"]]
    assert positions == sorted(positions)
    expected = [pos for pos, _ in p.archive.loan_events("CR-1")]
    assert positions == expected
    assert report["history"][0]["event"] == "LoanFile.Opened"
    assert report["history"][0]["actor"] == "officer.one"
    assert any(h["summary"] == "status overdue → non_performing" for h in report["history"])

    # CR-7: the superseded valuation does not count; CR-6 (settled, nothing
    # outstanding) has no coverage figure.
    cr7 = analysis.loan_analysis(p.archive, p.store, "CR-7", AS_OF)
    assert [(v["counted"], v["not_counted_because"]) for v in cr7["valuations"]] == [
        (False, "superseded"),
        (True, None),
    ]
    assert (cr7["coverage"]["ratio"], cr7["coverage"]["percent"]) == ("1.2500", "125.00")
    cr6 = analysis.loan_analysis(p.archive, p.store, "CR-6", AS_OF)
    assert (cr6["coverage"]["ratio"], cr6["coverage"]["percent"]) == (None, None)

    content = analysis.analysis_pdf(report)
    assert content.startswith(b"%PDF-")
    text = pdf_text(content)
    squeezed = "".join(text.split())
    assert "CR-1" in text
    assert ANA in text
    assert "123.71 %" in text
    assert loan.chain_head in squeezed
    assert "María López" in text and "pérdida de empleo" in text
    if analysis.find_font() is not None:  # DejaVu embedded: arrows too
        assert "overdue → non_performing" in text


def test_the_pdf_falls_back_to_a_core_font(portfolio: Portfolio) -> None:
    report = analysis.loan_analysis(portfolio.archive, portfolio.store, "CR-1", AS_OF)
    text = pdf_text(analysis.analysis_pdf(report, font=None))
    assert ANA in text  # Latin-1 accents survive
    assert "overdue -> non_performing" in text  # the rest is transliterated
    assert analysis.latin1("Łódź → ok") == "Lódz -> ok"


def test_only_the_recovery_book_owes_inspections(portfolio: Portfolio) -> None:
    """A settled (CR-6) or performing (CR-5) loan was filed with both inspections
    OVERDUE; a settled loan with nothing outstanding covers n/a, never a division by 0."""
    p = portfolio
    for number in ("CR-5", "CR-6"):
        report = analysis.loan_analysis(p.archive, p.store, number, AS_OF)
        duty = report["inspections"]
        assert (duty["required"], duty["overdue"]) == (False, []), number
        assert not duty["monthly_overdue"] and not duty["quarterly_overdue"]
        text = pdf_text(analysis.analysis_pdf(report, font=None))
        assert "OVERDUE" not in text and "No inspections due" in text, number
    settled = analysis.loan_analysis(p.archive, p.store, "CR-6", AS_OF)
    assert (settled["coverage"]["ratio"], settled["coverage"]["percent"]) == (None, None)
    assert "Collateral coverage: n/a" in pdf_text(analysis.analysis_pdf(settled, font=None))
    written_off = analysis.loan_analysis(p.archive, p.store, "CR-4", AS_OF)["inspections"]
    assert (written_off["required"], written_off["overdue"]) == (True, ["monthly"])


def test_the_pdf_never_drops_letters_no_font_can_draw(
    settings: Settings, archive: ArchiveApp, officer: CommandContext
) -> None:
    """DejaVu has no CJK glyphs: fpdf logged a warning and the filed PDF named the
    borrower "Zoë  Ñandú"; the core font wrote "???". Both now write the code points.
    A bare loan (no collateral, no valuations) covers 0.00 %."""
    name = "Zoë 李小龍 Ñandú"
    archive.open_loan(officer, **loan_terms("CR-8", borrower_name=name))
    with open_store(settings) as store:
        Projections(archive, store).catch_up()
        report = analysis.loan_analysis(archive, store, "CR-8", AS_OF)
    assert report["coverage"] == {
        "collateral_value": "0.00",
        "outstanding": "100000.00",
        "ratio": "0.0000",
        "percent": "0.00",
        "valuations_counted": 0,
    }
    for font in ("auto", None):
        text = pdf_text(analysis.analysis_pdf(report, font=font))
        assert "Zoë [U+674E][U+5C0F][U+9F8D] Ñandú" in text, font
    assert analysis.latin1("龍") == "[U+9F8D]"


def test_the_pdf_files_the_longest_texts_a_loan_can_hold(
    settings: Settings, archive: ArchiveApp
) -> None:
    """A 2000-character reason or a 4000-character collection outcome (both allowed) was
    a table row taller than a page: fpdf refused it and the PDF route was a 500. The
    cell now starts the text and points to a note after the table with all of it."""
    long_reason = ("motivo detallado " * 118)[:2000]
    outcome = ("el deudor promete pagar " * 167)[:4000]
    ctx = CommandContext("officer.one", "credit_officer", long_reason)
    archive.open_loan(ctx, **loan_terms("CR-8"))
    archive.change_loan(ctx, "CR-8", None, lambda lf: lf.change_status(ctx, "overdue"))
    archive.change_loan(
        ctx,
        "CR-8",
        None,
        lambda lf: lf.record_collection_action(ctx, "call", "2025-03-10", outcome, "0.00", "JI"),
    )
    with open_store(settings) as store:
        Projections(archive, store).catch_up()
        report = analysis.loan_analysis(archive, store, "CR-8", AS_OF)
    text = pdf_text(analysis.analysis_pdf(report, font=None))
    footer = ("Generated ", "Loan chain head:", "Page ")  # between pages of a long note
    body = [line for line in text.splitlines() if not line.startswith(footer)]
    squeezed = "".join("".join(body).split())
    assert "[note1]" in squeezed and "[note4]" in squeezed
    assert "".join(outcome.split()) in squeezed
    assert "".join(long_reason.split()) in squeezed


def test_analysis_of_an_unknown_loan_is_not_found(portfolio: Portfolio) -> None:
    from archive.exceptions import NotFoundError

    with pytest.raises(NotFoundError):
        analysis.loan_analysis(portfolio.archive, portfolio.store, "CR-404")


def test_the_report_is_consistent_with_the_view_position(
    portfolio: Portfolio, officer: CommandContext
) -> None:
    p = portfolio
    before = p.archive.get_loan("CR-1").chain_head
    p.archive.change_loan(
        officer, "CR-1", None, lambda lf: lf.record_repayment(officer, "7000.00", "2025-06-01")
    )
    # The view has not caught up: the report is the one of the view's position.
    stale = analysis.loan_analysis(p.archive, p.store, "CR-1", AS_OF)
    assert stale["position"] == p.archive.head_position() - 1
    assert stale["history"][-1]["position"] <= stale["position"]
    assert (stale["chain_head"], stale["loan"]["outstanding"]) == (before, "97000.00")
    p.projections.catch_up()
    fresh = analysis.loan_analysis(p.archive, p.store, "CR-1", AS_OF)
    assert fresh["chain_head"] == p.archive.get_loan("CR-1").chain_head != before
    assert fresh["coverage"]["percent"] == "133.33"  # 120000 / 90000


# -- over HTTP ----------------------------------------------------------------------------------------

ROLES = {
    "archivist": "ines.archivist",
    "credit_officer": "ana.officer",
    "auditor": "raul.auditor",
    "compliance": "eva.compliance",
    "admin": "root.admin",
}


def reports_client(p: Portfolio) -> tuple[TestClient, dict[str, str]]:
    """The reports router over the portfolio's archive and views, and a token per role."""
    tokens = {
        role: p.archive.add_user(operator_context(), name, role) for role, name in ROLES.items()
    }
    p.projections.catch_up()
    app = FastAPI()
    app.state.archive = p.archive
    app.state.projections = p.projections
    problems.install(app)
    app.include_router(reports_api.router)
    return TestClient(app, raise_server_exceptions=False), tokens


def test_reports_over_http(portfolio: Portfolio) -> None:
    p = portfolio
    client, tokens = reports_client(p)

    def get(path: str, role: str = "auditor", **params: Any) -> Any:
        return client.get(
            f"/api/v1/reports{path}",
            params=params,
            headers={"Authorization": f"Bearer {tokens[role]}"},
        )

    position = p.archive.head_position()
    for role in ("auditor", "credit_officer", "compliance", "admin"):
        body = get("/npl-portfolio", role, as_of="2025-06-30").json()
        assert (body["as_of"], body["position"]) == ("2025-06-30", position)
        assert body["totals"] == {"count": 3, "outstanding": "176500.00"}
    denied = get("/npl-portfolio", "archivist")
    assert denied.status_code == 403
    assert denied.headers["content-type"].startswith("application/problem+json")
    assert client.get("/api/v1/reports/npl-gaps").status_code == 401

    assert get("/officer-ledgers").json()["unassigned"]["collection_officer"] == ["CR-2"]
    assert get("/npl-gaps").json()["items"][0]["missing"] == ["collection_officer", "investigation"]
    assert get("/repeated-mortgages").json()["properties"][0]["cadastral_reference"] == REF_A
    assert get("/overvaluation-by-agency").json()["agencies"][0]["max_cut_pct"] == "20.00"
    due = get("/revaluations-due", as_of="2025-06-30", days=9).json()
    assert [i["loan_number"] for i in due["items"]] == ["CR-7"]
    assert get("/revaluations-due", days=-1).status_code == 422
    # The calendar ends in 9999: a reporting date past the last one is a 422, never a 500.
    for path in (
        "/npl-portfolio",
        "/revaluations-due",
        "/inspections-overdue",
        "/loans/CR-1/analysis",
        "/loans/CR-1/analysis.pdf",
    ):
        late = get(path, as_of="9999-12-31")
        assert late.status_code == 422, (path, late.text)
        assert late.headers["content-type"].startswith("application/problem+json")
        assert get(path, as_of="9899-12-31").status_code == 200, path
        # It starts in year 1, and inspections look a quarter back: the same at that end.
        early = get(path, as_of="0001-01-01")
        assert early.status_code == 422, (path, early.text)
        assert early.headers["content-type"].startswith("application/problem+json")
        assert get(path, as_of="0002-01-01").status_code == 200, path
    assert get("/revaluations-due", as_of="9899-12-31", days=3660).status_code == 200
    overdue = get("/inspections-overdue", as_of="2025-06-30").json()
    assert overdue["overdue_counts"] == {"monthly": 2, "quarterly": 2}
    top = get("/concentration", top=1).json()
    assert [(i["national_id"], i["share"]) for i in top["items"]] == [("55555555K", "46.84")]
    assert get("/concentration", currency="USD").json()["items"] == []
    assert get("/village-group-loans").json()["totals"]["npl_outstanding"] == "29500.00"
    assert get("/npl-portfolio", as_of="yesterday").status_code == 422

    body = get("/loans/CR-1/analysis", as_of="2025-06-30").json()
    assert (body["coverage"]["percent"], body["position"]) == ("123.71", position)
    missing = get("/loans/CR-404/analysis")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert get("/loans/CR-404/analysis.pdf").status_code == 404
    # PostgreSQL refuses a NUL in a query: it was a 500; no loan number holds one.
    for path in ("/loans/CR%001/analysis", "/loans/CR%001/analysis.pdf"):
        nul = get(path)
        assert nul.status_code == 422, nul.text
        assert nul.headers["content-type"].startswith("application/problem+json")
        assert "path.loan_number" in nul.json()["detail"]
    assert get("/loans/CR-1/analysis.pdf", "archivist").status_code == 403

    pdf = get("/loans/CR-1/analysis.pdf")
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["content-disposition"] == 'attachment; filename="loan-analysis-CR-1.pdf"'
    text = pdf_text(pdf.content)
    assert ANA in text and "123.71 %" in text
    assert p.archive.get_loan("CR-1").chain_head in "".join(text.split())

    # Without the views running the reports say so.
    del client.app.state.projections  # type: ignore[attr-defined]
    assert get("/npl-gaps").status_code == 503


TABULAR_ROUTES = [name.replace("_", "-") for name in reports.REPORTS]


def test_reports_as_csv_over_http(portfolio: Portfolio) -> None:
    """``format=csv`` on every portfolio route, as the audit trail export offers it: the
    same report's rows, a CSV attachment named after the report and its date."""
    p = portfolio
    client, tokens = reports_client(p)

    def get(path: str, role: str | None = "auditor", **params: Any) -> Any:
        headers = {} if role is None else {"Authorization": f"Bearer {tokens[role]}"}
        return client.get(f"/api/v1/reports{path}", params=params, headers=headers)

    for route in TABULAR_ROUTES:
        as_json = get(f"/{route}", as_of="2025-06-30")
        assert as_json.headers["content-type"] == "application/json", route
        assert get(f"/{route}", as_of="2025-06-30", format="json").json() == as_json.json()
        sheet = get(f"/{route}", as_of="2025-06-30", format="csv")
        assert sheet.status_code == 200, (route, sheet.text)
        assert sheet.headers["content-type"] == "text/csv; charset=utf-8", route
        assert sheet.headers["content-disposition"] == (
            f'attachment; filename="{route}-2025-06-30.csv"'
        )
        assert sheet.text == reports.report_csv(as_json.json()), route
        # Role checks are the routes' own: the format changes nothing about who may read.
        denied = get(f"/{route}", "archivist", format="csv")
        assert denied.status_code == 403, route
        assert denied.headers["content-type"].startswith("application/problem+json")
        assert get(f"/{route}", None, format="csv").status_code == 401, route
        for unknown in ("xml", "CSV", "jsonl", ""):
            refused = get(f"/{route}", format=unknown)
            assert refused.status_code == 422, (route, unknown, refused.text)
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert "query.format" in refused.json()["detail"], refused.json()

    ledgers = csv_rows(get("/officer-ledgers", as_of="2025-06-30", format="csv").text)
    assert ("collection_officer", "", "CR-2", "50000.00") in [
        (r["duty"], r["officer"], r["loan_number"], r["outstanding"]) for r in ledgers
    ]
    due = csv_rows(get("/revaluations-due", as_of="2025-06-30", days=9, format="csv").text)
    assert [(r["loan_number"], r["overdue"]) for r in due] == [("CR-7", "true")]
    # A report that cannot be answered is the same problem as in JSON, not a CSV.
    p.archive.open_loan(
        CommandContext("officer.one", "credit_officer", "test"),
        **loan_terms("CR-9", borrower_national_id="99999999R", currency_code="USD"),
    )
    p.projections.catch_up()
    mixed = get("/concentration", format="csv")
    assert mixed.status_code == 422
    assert mixed.headers["content-type"].startswith("application/problem+json")
    assert "choose one with the currency parameter" in mixed.json()["detail"]
    dollars = csv_rows(get("/concentration", currency="USD", format="csv").text)
    assert [(r["loans"], r["currency"]) for r in dollars] == [("CR-9", "USD")]


# -- through the CLI -----------------------------------------------------------------------------------


def test_reports_through_the_cli(portfolio: Portfolio, settings: Settings, tmp_path: Any) -> None:
    p = portfolio
    auditor = p.archive.add_user(operator_context(), "raul.auditor", "auditor")
    archivist = p.archive.add_user(operator_context(), "ines.archivist", "archivist")
    env = {"ARCHIVE_DATA_DIR": str(settings.data_dir), "ARCHIVE_TOKEN": auditor}
    if settings.database_url:
        env["ARCHIVE_DATABASE_URL"] = settings.database_url
    runner = CliRunner()

    def run(*args: str, **extra: str) -> Any:
        return runner.invoke(reports_app, list(args), env={**env, **extra})

    result = run("npl-portfolio", "--as-of", "2025-06-30")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["as_of"], body["totals"]["outstanding"]) == ("2025-06-30", "176500.00")
    assert body["position"] == p.archive.head_position()

    late = run("inspections-overdue", "--as-of", "9999-12-31")
    assert late.exit_code == 2 and "reporting dates end at 9899-12-31" in late.output, late.output
    assert late.exception is None or isinstance(late.exception, SystemExit), late.exception
    early = run("inspections-overdue", "--as-of", "0001-01-01")
    assert early.exit_code == 2 and "reporting dates start at 0002-01-01" in early.output

    result = run("concentration", "--top", "2", "--table")
    assert result.exit_code == 0, result.output
    assert "55555555K" in result.stdout and "46.84" in result.stdout

    # Piped (not a terminal, even at 80 columns), no table cuts a figure short.
    ledgers = json.loads(run("officer-ledgers").stdout)
    piped = run("officer-ledgers", "--table", COLUMNS="80").stdout
    assert "…" not in piped
    for officer in ledgers["loan_officers"] + ledgers["collection_officers"]:
        for loan in officer["loans"]:
            assert loan["loan_number"] in piped and loan["outstanding"] in piped, piped
            assert loan["borrower_name"] in piped, piped
    # What no table shows is on the heading line: the loans without an officer (CR-2 has
    # no collection officer), the totals, the chain check; the tables alone left them out.
    assert "unassigned.loan_officer=-  unassigned.collection_officer=CR-2" in piped, piped
    portfolio_table = run("npl-portfolio", "--table").stdout
    assert "totals.count=3  totals.outstanding=176500.00" in portfolio_table
    analysis_table = run("analysis", "CR-1", "--table").stdout
    assert "integrity.ok=yes" in analysis_table and "coverage.percent=123.71" in analysis_table

    for command in (
        "officer-ledgers",
        "npl-gaps",
        "repeated-mortgages",
        "overvaluation-by-agency",
        "revaluations-due",
        "inspections-overdue",
        "village-group-loans",
    ):
        assert run(command, "--table").exit_code == 0, command
        assert json.loads(run(command).stdout)["report"] == command.replace("-", "_")

    target = tmp_path / "cr1.pdf"
    result = run("analysis", "CR-1", "--pdf", str(target))
    assert result.exit_code == 0, result.output
    assert ANA in pdf_text(target.read_bytes())
    assert json.loads(run("analysis", "CR-1").stdout)["coverage"]["percent"] == "123.71"

    denied = run("npl-gaps", ARCHIVE_TOKEN=archivist)
    assert denied.exit_code != 0
    assert "may not" in str(denied.exception)
    unknown = run("analysis", "CR-404")
    assert "not found" in str(unknown.exception)


def test_reports_as_csv_through_the_cli(portfolio: Portfolio, settings: Settings) -> None:
    """``--format csv`` prints the rows ``format=csv`` answers over HTTP, on stdout."""
    p = portfolio
    auditor = p.archive.add_user(operator_context(), "raul.auditor", "auditor")
    env = {"ARCHIVE_DATA_DIR": str(settings.data_dir), "ARCHIVE_TOKEN": auditor}
    if settings.database_url:
        env["ARCHIVE_DATABASE_URL"] = settings.database_url
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(reports_app, list(args), env=env)

    for route in TABULAR_ROUTES:
        as_json = run(route, "--as-of", "2025-06-30")
        assert as_json.exit_code == 0, as_json.output
        sheet = run(route, "--as-of", "2025-06-30", "--format", "csv")
        assert sheet.exit_code == 0, sheet.output
        # The bytes: the runner's text turns the CSV's CRLF into LF.
        expected = reports.report_csv(json.loads(as_json.stdout))
        assert sheet.stdout_bytes.decode() == expected, route
        # --table is --format table, kept; both spellings print the same tables.
        assert run(route, "--format", "table").stdout == run(route, "--table").stdout
    top = csv_rows(run("concentration", "--top", "2", "--format", "csv").stdout_bytes.decode())
    assert [(r["national_id"], r["outstanding"]) for r in top] == [
        ("55555555K", "200000.00"),
        ("12345678Z", "117000.00"),
    ]

    unknown = run("npl-gaps", "--format", "xml")
    assert unknown.exit_code == 2 and unknown.stdout == "", unknown.output
    assert "Invalid value for '--format'" in unknown.output, unknown.output
    both = run("npl-gaps", "--table", "--format", "csv")
    assert both.exit_code == 2 and both.stdout == "", both.output
    assert "--table and --format csv: choose one" in both.output, both.output
