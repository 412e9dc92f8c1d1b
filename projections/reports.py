"""Portfolio reports over the loan_files view: the credit-management practice's ledgers.

Each report is one function taking the views ``Store`` (and, where dates matter, the
reporting date ``as_of``, today by default) and returning a JSON-ready dict: money as
decimal strings (never floats), dates as ISO text, shares as percentages with two
decimals ("40.00"). Every report says the date it is for (``as_of``) and the view
``position`` its figures are consistent with: all rows of one report are read in one
snapshot of the views database.

The figures are the view's current state; ``as_of`` is the reporting date that the
date rules (due revaluations, overdue inspections) are measured against.

Reports that add money up refuse to add different currencies: when the selection
holds more than one, they ask for a ``currency`` (which also filters).

``report_csv`` flattens a report into the rows a spreadsheet files (``CSV_LAYOUTS``),
written as the audit trail export writes CSV.

Which loans are which:

- an NPL (non-performing loan) has status ``non_performing``; a ``written_off`` loan
  was an NPL and stays under collection until it is settled. Together they are the
  *recovery book*: the ledgers, the gaps and the inspection duty cover both, each row
  saying its status; ``npl_portfolio`` shows them apart;
- the *live portfolio* (concentration) is every loan not settled and not written off;
- a *live* mortgage registration is one not released.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from archive.dates import today
from archive.exceptions import DomainError
from archive.loans import Classification, LoanStatus, Product, RecoveryCategory
from archive.valuations import add_months
from projections import registry
from projections.encoding import csv_lines, inert, loads
from projections.loan_files import COLLATERAL, LOANS, VALUATIONS, LoanFilesView
from projections.store import Row, Store, Tx
from projections.view import Tables

NPL = LoanStatus.NON_PERFORMING.value
WRITTEN_OFF = LoanStatus.WRITTEN_OFF.value
SETTLED = LoanStatus.SETTLED.value
RECOVERY_BOOK = (NPL, WRITTEN_OFF)
GROUP_PRODUCTS = (Product.VILLAGE_GROUP.value, Product.COOPERATIVE.value)
UNCATEGORISED = "uncategorised"

ZERO = Decimal("0.00")
CENT = Decimal("0.01")
HUNDRED = Decimal(100)
MAX_DAYS = 3660
MAX_TOP = 1000
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class ReportError(DomainError):
    """A report asked for something it cannot answer (mixed currencies, bad bounds)."""

    title = "Invalid report request"


# -- small helpers --------------------------------------------------------------------------------


def money(value: Decimal) -> str:
    return str(value.quantize(CENT, rounding=ROUND_HALF_UP))


def percent(part: Decimal, whole: Decimal) -> str | None:
    """``part`` as a percentage of ``whole`` with two decimals; None when whole is 0."""
    if whole == 0:
        return None
    return str((part * HUNDRED / whole).quantize(CENT, rounding=ROUND_HALF_UP))


def report_date(as_of: date | None) -> date:
    """``as_of``, by default the archive's today: the UTC date that stamps every event
    (the server's local date made a report run near midnight a day off)."""
    return today() if as_of is None else as_of


def _amount(row: Row, column: str) -> Decimal:
    value = row.get(column)
    return ZERO if value is None else Decimal(value)


def _iso(value: date | None) -> str | None:
    return None if value is None else value.isoformat()


def _day(text: str | None) -> date | None:
    return None if text is None else date.fromisoformat(text[:10])


def check_currency(currency: str | None) -> str | None:
    if currency is None:
        return None
    code = currency.strip().upper()
    if not _CURRENCY.match(code):
        raise ReportError(f"currency must be an ISO 4217 code like EUR, got {currency!r}")
    return code


def one_currency(rows: Iterable[Row], currency: str | None) -> tuple[list[Row], str | None]:
    """The rows in ``currency`` (validated); without one, the rows' single currency.

    Amounts in different currencies are never added up: a selection holding several
    currencies needs an explicit ``currency``.
    """
    rows = list(rows)
    code = check_currency(currency)
    if code is not None:
        return [r for r in rows if r["currency"] == code], code
    found = sorted({r["currency"] for r in rows})
    if len(found) > 1:
        raise ReportError(
            f"the selection holds amounts in {', '.join(found)}; "
            "choose one with the currency parameter"
        )
    return rows, (found[0] if found else None)


def _head(name: str, as_of: date, position: int, **extra: Any) -> dict[str, Any]:
    return {"report": name, "as_of": as_of.isoformat(), "position": position, **extra}


def _borrower(row: Row) -> str:
    return row["borrower_name"]


def _actions(row: Row) -> list[dict[str, Any]]:
    return loads(row["collection_actions"]) or []


def _action_summary(row: Row) -> dict[str, Any]:
    actions = _actions(row)
    dates = [a["action_date"] for a in actions]
    return {
        "collection_actions": len(actions),
        "last_action_date": max(dates) if dates else None,
        "recovered": money(_amount(row, "recovered")),
    }


# -- one consistent read of the view --------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Rows of the loan_files view read in one transaction, and the view's position."""

    position: int
    loans: list[Row]
    collateral: list[Row]
    valuations: list[Row]

    def loans_by_number(self) -> dict[str, Row]:
        return {r["loan_number"]: r for r in self.loans}


def _select(tx: Tx, table: str, where: dict[str, Sequence[str]] | None, order: str) -> list[Row]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, values in (where or {}).items():
        clauses.append(f"{column} IN ({', '.join('?' for _ in values)})")
        params.extend(values)
    clause = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    return tx.execute(f"SELECT * FROM {table}{clause} ORDER BY {order}", params)


def snapshot(
    store: Store,
    *,
    loans: dict[str, Sequence[str]] | None = None,
    collateral: bool = False,
    valuations: bool = False,
) -> Snapshot:
    """Loans (those matching ``loans``, e.g. ``{"status": RECOVERY_BOOK}``), and on demand
    every collateral and valuation row, from the active generation, in one read."""
    with store.read() as tx:
        current = registry.active(tx, LoanFilesView.name)
        if current is None:
            return Snapshot(0, [], [], [])
        t: Tables = LoanFilesView().tables(current.generation)
        return Snapshot(
            position=current.position,
            loans=_select(tx, t[LOANS], loans, "loan_number"),
            collateral=(
                _select(tx, t[COLLATERAL], None, "cadastral_reference, lien_rank, filed_at")
                if collateral
                else []
            ),
            valuations=(
                _select(tx, t[VALUATIONS], None, "appraised_at, valuation_id") if valuations else []
            ),
        )


def view_position(store: Store) -> int:
    with store.read() as tx:
        current = registry.active(tx, LoanFilesView.name)
    return 0 if current is None else current.position


# -- 1. the NPL portfolio -------------------------------------------------------------------------


def _breakdown(rows: list[Row]) -> dict[str, Any]:
    by_category = {c.value: [0, ZERO] for c in RecoveryCategory}
    by_category[UNCATEGORISED] = [0, ZERO]
    by_tier = {c.value: [0, ZERO] for c in Classification}
    total = ZERO
    for row in rows:
        amount = _amount(row, "outstanding")
        total += amount
        for bucket in (
            by_category[row["recovery_category"] or UNCATEGORISED],
            by_tier.setdefault(row["classification"], [0, ZERO]),
        ):
            bucket[0] += 1
            bucket[1] += amount
    return {
        "count": len(rows),
        "outstanding": money(total),
        "by_recovery_category": [
            {"recovery_category": k, "count": n, "outstanding": money(a)}
            for k, (n, a) in by_category.items()
        ],
        "by_classification": [
            {"classification": k, "count": n, "outstanding": money(a)}
            for k, (n, a) in by_tier.items()
        ],
    }


def npl_portfolio(
    store: Store, as_of: date | None = None, currency: str | None = None
) -> dict[str, Any]:
    """NPLs and written-off loans apart, each by recovery category (the three of the
    practice, plus "uncategorised") and by five-tier classification: counts and
    outstanding amounts, with totals."""
    day = report_date(as_of)
    snap = snapshot(store, loans={"status": RECOVERY_BOOK})
    rows, code = one_currency(snap.loans, currency)
    npl = [r for r in rows if r["status"] == NPL]
    written_off = [r for r in rows if r["status"] == WRITTEN_OFF]
    return _head(
        "npl_portfolio",
        day,
        snap.position,
        currency=code,
        non_performing=_breakdown(npl),
        written_off=_breakdown(written_off),
        totals={
            "count": len(rows),
            "outstanding": money(sum((_amount(r, "outstanding") for r in rows), ZERO)),
        },
    )


# -- 2. officers' ledgers ---------------------------------------------------------------------------


def _ledger_line(row: Row) -> dict[str, Any]:
    return {
        "loan_number": row["loan_number"],
        "borrower_name": _borrower(row),
        "status": row["status"],
        "classification": row["classification"],
        "recovery_category": row["recovery_category"],
        "outstanding": money(_amount(row, "outstanding")),
        **_action_summary(row),
    }


def _ledgers(rows: list[Row], column: str) -> list[dict[str, Any]]:
    by_officer: dict[str, list[Row]] = {}
    for row in rows:
        if row[column] is not None:
            by_officer.setdefault(row[column], []).append(row)
    ledgers = []
    for officer in sorted(by_officer, key=lambda o: (o.casefold(), o)):
        loans = [_ledger_line(r) for r in by_officer[officer]]
        dates = [line["last_action_date"] for line in loans if line["last_action_date"]]
        ledgers.append(
            {
                "officer": officer,
                "loans": loans,
                "count": len(loans),
                "outstanding": money(
                    sum((_amount(r, "outstanding") for r in by_officer[officer]), ZERO)
                ),
                "collection_actions": sum(line["collection_actions"] for line in loans),
                "last_action_date": max(dates) if dates else None,
                "recovered": money(
                    sum((_amount(r, "recovered") for r in by_officer[officer]), ZERO)
                ),
            }
        )
    return ledgers


def officer_ledgers(
    store: Store, as_of: date | None = None, currency: str | None = None
) -> dict[str, Any]:
    """The recovery book by responsible loan officer and by collection officer: each
    officer's loans (number, borrower, outstanding, category), their collection actions
    (count, last date) and the amounts recovered. Loans without an officer of a duty are
    listed under ``unassigned`` (see ``npl_gaps``)."""
    day = report_date(as_of)
    snap = snapshot(store, loans={"status": RECOVERY_BOOK})
    rows, code = one_currency(snap.loans, currency)
    return _head(
        "officer_ledgers",
        day,
        snap.position,
        currency=code,
        loan_officers=_ledgers(rows, "loan_officer"),
        collection_officers=_ledgers(rows, "collection_officer"),
        unassigned={
            "loan_officer": [r["loan_number"] for r in rows if r["loan_officer"] is None],
            "collection_officer": [
                r["loan_number"] for r in rows if r["collection_officer"] is None
            ],
        },
    )


# -- 3. gaps in NPL files -----------------------------------------------------------------------------

GAPS = ("loan_officer", "collection_officer", "investigation")


def npl_gaps(store: Store, as_of: date | None = None) -> dict[str, Any]:
    """Loans of the recovery book that lack the responsible loan officer, the collection
    officer or the investigation checklist, saying which; with counts per gap."""
    day = report_date(as_of)
    snap = snapshot(store, loans={"status": RECOVERY_BOOK})
    items = []
    counts = dict.fromkeys(GAPS, 0)
    for row in snap.loans:
        missing = [gap for gap in GAPS if row[gap] is None]
        for gap in missing:
            counts[gap] += 1
        if missing:
            items.append(
                {
                    "loan_number": row["loan_number"],
                    "borrower_name": _borrower(row),
                    "status": row["status"],
                    "loan_officer": row["loan_officer"],
                    "collection_officer": row["collection_officer"],
                    "missing": missing,
                }
            )
    return _head(
        "npl_gaps",
        day,
        snap.position,
        checked=len(snap.loans),
        complete=len(snap.loans) - len(items),
        missing_counts=counts,
        items=items,
    )


# -- 4. repeated mortgages ------------------------------------------------------------------------------


def repeated_mortgages(store: Store, as_of: date | None = None) -> dict[str, Any]:
    """Properties (by cadastral reference) securing more than one live loan, i.e. with
    registrations of several loans not released: the loans, lien ranks and secured
    amounts, lowest rank first."""
    day = report_date(as_of)
    snap = snapshot(store, collateral=True)
    loans = snap.loans_by_number()
    by_property: dict[str, list[Row]] = {}
    for row in snap.collateral:
        if row["status"] != "released":
            by_property.setdefault(row["cadastral_reference"], []).append(row)
    properties = []
    for reference in sorted(by_property):
        liens = sorted(by_property[reference], key=lambda r: (r["lien_rank"], r["filed_at"]))
        if len({r["loan_number"] for r in liens}) < 2:
            continue
        currencies = {r["currency"] for r in liens}
        properties.append(
            {
                "cadastral_reference": reference,
                "address": liens[0]["address"],
                "owner": liens[0]["owner"],
                "liens": [
                    {
                        "loan_number": r["loan_number"],
                        "borrower_name": (
                            loans[r["loan_number"]]["borrower_name"]
                            if r["loan_number"] in loans
                            else None
                        ),
                        "loan_status": (
                            loans[r["loan_number"]]["status"] if r["loan_number"] in loans else None
                        ),
                        "registration_id": r["registration_id"],
                        "lien_rank": r["lien_rank"],
                        "secured_amount": money(_amount(r, "secured_amount")),
                        "currency": r["currency"],
                        "registration_status": r["status"],
                        "registry_entry": r["registry_entry"],
                        "flagged": r["repeated_mortgage"] is not None,
                    }
                    for r in liens
                ],
                "total_secured": (
                    money(sum((_amount(r, "secured_amount") for r in liens), ZERO))
                    if len(currencies) == 1
                    else None
                ),
                "currency": currencies.pop() if len(currencies) == 1 else None,
            }
        )
    return _head(
        "repeated_mortgages", day, snap.position, count=len(properties), properties=properties
    )


# -- 5. overvaluation by appraisal agency ----------------------------------------------------------------


def _agency_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def overvaluation_by_agency(
    store: Store, as_of: date | None = None, currency: str | None = None
) -> dict[str, Any]:
    """Per appraisal agency: appraisals, reviewed valuations, how many the review flagged
    overvalued and their share of the reviewed, and the cut the review made (appraised -
    reviewed), average and maximum, in money and as % of the appraised value. Superseded
    valuations count: an agency's record is its whole history. Agencies whose appraisals
    are most often cut come first."""
    day = report_date(as_of)
    snap = snapshot(store, valuations=True)
    rows, code = one_currency(snap.valuations, currency)
    agencies: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = agencies.setdefault(
            _agency_key(row["agency"]),
            {"agency": row["agency"], "appraisals": 0, "cuts": [], "overvalued": 0},
        )
        entry["appraisals"] += 1
        if row["reviewed_value"] is None:
            continue
        appraised = _amount(row, "appraised_value")
        cut = appraised - _amount(row, "reviewed_value")
        entry["cuts"].append((cut, cut * HUNDRED / appraised))
        entry["overvalued"] += 1 if row["overvalued"] else 0
    items = []
    for entry in agencies.values():
        cuts = entry.pop("cuts")
        reviewed = len(cuts)
        amounts = [c for c, _ in cuts]
        shares = [s for _, s in cuts]

        def pct(value: Decimal) -> str:
            return str(value.quantize(CENT, rounding=ROUND_HALF_UP))

        items.append(
            {
                **entry,
                "reviewed": reviewed,
                "overvalued_share": percent(Decimal(entry["overvalued"]), Decimal(reviewed)),
                "average_cut": money(sum(amounts, ZERO) / reviewed) if reviewed else None,
                "max_cut": money(max(amounts)) if reviewed else None,
                "average_cut_pct": pct(sum(shares, Decimal(0)) / reviewed) if reviewed else None,
                "max_cut_pct": pct(max(shares)) if reviewed else None,
            }
        )
    items.sort(
        key=lambda i: (
            -Decimal(i["overvalued_share"] or -1),
            -i["reviewed"],
            _agency_key(i["agency"]),
        )
    )
    return _head(
        "overvaluation_by_agency",
        day,
        snap.position,
        currency=code,
        agencies=items,
    )


# -- 6. revaluations due ------------------------------------------------------------------------------


def check_days(days: int) -> int:
    if not 0 <= days <= MAX_DAYS:
        raise ReportError(f"days must be between 0 and {MAX_DAYS}, got {days}")
    return days


def revaluations_due(store: Store, as_of: date | None = None, days: int = 30) -> dict[str, Any]:
    """Valuations still in force (not superseded) whose revaluation is due by ``as_of`` +
    ``days``: overdue first, then by due date. Valuations of settled loans and of
    released mortgages need no monitoring and are left out."""
    day = report_date(as_of)
    horizon = day + timedelta(days=check_days(days))
    snap = snapshot(store, collateral=True, valuations=True)
    loans = snap.loans_by_number()
    collateral = {r["registration_id"]: r for r in snap.collateral}
    items = []
    for row in snap.valuations:
        due = date.fromisoformat(row["revaluation_due"])
        loan = loans.get(row["loan_number"])
        secured = collateral.get(row["collateral_id"]) if row["collateral_id"] else None
        if row["superseded_by"] is not None or due > horizon:
            continue
        if loan is not None and loan["status"] == SETTLED:
            continue
        if secured is not None and secured["status"] == "released":
            continue
        items.append(
            {
                "valuation_id": row["valuation_id"],
                "loan_number": row["loan_number"],
                "borrower_name": None if loan is None else loan["borrower_name"],
                "loan_status": None if loan is None else loan["status"],
                "collateral_id": row["collateral_id"],
                "cadastral_reference": None if secured is None else secured["cadastral_reference"],
                "agency": row["agency"],
                "appraised_value": money(_amount(row, "appraised_value")),
                "reviewed_value": (
                    None if row["reviewed_value"] is None else money(_amount(row, "reviewed_value"))
                ),
                "currency": row["currency"],
                "appraisal_date": row["appraisal_date"],
                "revaluation_due": row["revaluation_due"],
                "days_until_due": (due - day).days,
                "overdue": due < day,
            }
        )
    items.sort(key=lambda i: (i["revaluation_due"], i["loan_number"], i["valuation_id"]))
    return _head(
        "revaluations_due",
        day,
        snap.position,
        days=days,
        due_by=horizon.isoformat(),
        overdue=sum(1 for i in items if i["overdue"]),
        count=len(items),
        items=items,
    )


# -- 7. inspections overdue -----------------------------------------------------------------------------

INSPECTION_MONTHS = {"monthly": 1, "quarterly": 3}


def inspection_status(inspections: list[dict[str, Any]], day: date) -> dict[str, Any]:
    """For each kind (monthly, quarterly): the last inspection on or before ``day``, when
    the next one is due (last + its period; null if never inspected) and whether it is
    overdue (never inspected, or the last one is more than a period before ``day``)."""
    done = [i for i in inspections if _day(i["inspected_on"]) <= day]  # type: ignore[operator]
    status: dict[str, Any] = {}
    for kind, months in INSPECTION_MONTHS.items():
        dates = [d for i in done if i["kind"] == kind and (d := _day(i["inspected_on"]))]
        last = max(dates) if dates else None
        status[f"last_{kind}"] = _iso(last)
        status[f"{kind}_next_due"] = None if last is None else _iso(add_months(last, months))
        status[f"{kind}_overdue"] = last is None or last < add_months(day, -months)
    status["overdue"] = [k for k in INSPECTION_MONTHS if status[f"{k}_overdue"]]
    return status


def inspections_overdue(store: Store, as_of: date | None = None) -> dict[str, Any]:
    """Loans of the recovery book whose monthly or quarterly post-loan inspection is
    overdue ("inspecciones mensuales y trimestrales de cada préstamo moroso"): the last
    monthly inspection is more than a month before ``as_of`` (or there was none), or the
    last quarterly more than three months. Inspections dated after ``as_of`` do not
    count. A kind's ``next_due`` is the last inspection plus its period (null: never
    inspected)."""
    day = report_date(as_of)
    snap = snapshot(store, loans={"status": RECOVERY_BOOK})
    items = []
    counts = dict.fromkeys(INSPECTION_MONTHS, 0)
    for row in snap.loans:
        status = inspection_status(loads(row["inspections"]) or [], day)
        for kind in status["overdue"]:
            counts[kind] += 1
        if status["overdue"]:
            items.append(
                {
                    "loan_number": row["loan_number"],
                    "borrower_name": _borrower(row),
                    "status": row["status"],
                    "loan_officer": row["loan_officer"],
                    "collection_officer": row["collection_officer"],
                    **status,
                }
            )
    return _head(
        "inspections_overdue",
        day,
        snap.position,
        checked=len(snap.loans),
        overdue_counts=counts,
        count=len(items),
        items=items,
    )


# -- 8. concentration ------------------------------------------------------------------------------------


def check_top(top: int) -> int:
    if not 1 <= top <= MAX_TOP:
        raise ReportError(f"top must be between 1 and {MAX_TOP}, got {top}")
    return top


def national_id_key(value: str) -> str:
    """National ids are compared without spaces, dashes, dots or case."""
    return "".join(ch for ch in value.upper() if ch.isalnum()) or value


def concentration(
    store: Store, as_of: date | None = None, top: int = 10, currency: str | None = None
) -> dict[str, Any]:
    """The ``top`` borrowers (by national id) by outstanding amount in the live
    portfolio (loans neither settled nor written off), each one's share of the live
    portfolio's total and the cumulative share."""
    day = report_date(as_of)
    check_top(top)
    snap = snapshot(store)
    live = [r for r in snap.loans if r["status"] not in (SETTLED, WRITTEN_OFF)]
    rows, code = one_currency(live, currency)
    total = sum((_amount(r, "outstanding") for r in rows), ZERO)
    borrowers: dict[str, list[Row]] = {}
    for row in rows:
        borrowers.setdefault(national_id_key(row["borrower_national_id"]), []).append(row)
    ranked = sorted(
        (
            (sum((_amount(r, "outstanding") for r in loans), ZERO), key, loans)
            for key, loans in borrowers.items()
        ),
        key=lambda t: (-t[0], t[1]),
    )
    items = []
    cumulative = ZERO
    for rank, (amount, key, loans) in enumerate(ranked[:top], start=1):
        cumulative += amount
        biggest = max(loans, key=lambda r: (_amount(r, "outstanding"), r["loan_number"]))
        items.append(
            {
                "rank": rank,
                "national_id": key,
                "borrower_name": biggest["borrower_name"],
                "loans": [r["loan_number"] for r in loans],
                "outstanding": money(amount),
                "share": percent(amount, total),
                "cumulative_share": percent(cumulative, total),
            }
        )
    return _head(
        "concentration",
        day,
        snap.position,
        currency=code,
        top=top,
        total_outstanding=money(total),
        borrowers=len(borrowers),
        loans=len(rows),
        items=items,
    )


# -- 9. village-group and cooperative loans ---------------------------------------------------------------


def village_group_loans(
    store: Store, as_of: date | None = None, currency: str | None = None
) -> dict[str, Any]:
    """Loans of product village_group or cooperative, by group: each loan's status,
    outstanding amount, NPL flag (non-performing or written off) and collection actions;
    per group the outstanding (settled loans excluded), the NPL count and amount and
    their share, the collection actions and the amount recovered."""
    day = report_date(as_of)
    snap = snapshot(store, loans={"product": GROUP_PRODUCTS})
    rows, code = one_currency(snap.loans, currency)
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row["village_group"] or "", []).append(row)
    items = []
    for name in sorted(groups, key=lambda g: (g.casefold(), g)):
        loans = groups[name]
        open_loans = [r for r in loans if r["status"] != SETTLED]
        npls = [r for r in loans if r["status"] in RECOVERY_BOOK]
        outstanding = sum((_amount(r, "outstanding") for r in open_loans), ZERO)
        npl_outstanding = sum((_amount(r, "outstanding") for r in npls), ZERO)
        lines = [
            {
                "loan_number": r["loan_number"],
                "borrower_name": _borrower(r),
                "product": r["product"],
                "status": r["status"],
                "classification": r["classification"],
                "outstanding": money(_amount(r, "outstanding")),
                "npl": r["status"] in RECOVERY_BOOK,
                "collection_officer": r["collection_officer"],
                **_action_summary(r),
            }
            for r in loans
        ]
        items.append(
            {
                "group": name,
                "products": sorted({r["product"] for r in loans}),
                "count": len(loans),
                "outstanding": money(outstanding),
                "npl_count": len(npls),
                "npl_outstanding": money(npl_outstanding),
                "npl_share": percent(npl_outstanding, outstanding),
                "collection_actions": sum(line["collection_actions"] for line in lines),
                "recovered": money(sum((_amount(r, "recovered") for r in loans), ZERO)),
                "loans": lines,
            }
        )
    return _head(
        "village_group_loans",
        day,
        snap.position,
        currency=code,
        groups=items,
        totals={
            "groups": len(items),
            "count": len(rows),
            "outstanding": money(
                sum((_amount(r, "outstanding") for r in rows if r["status"] != SETTLED), ZERO)
            ),
            "npl_count": sum(i["npl_count"] for i in items),
            "npl_outstanding": money(sum((Decimal(i["npl_outstanding"]) for i in items), ZERO)),
        },
    )


#: every portfolio report by its name (the per-loan analysis is in ``projections.analysis``)
REPORTS = {
    "npl_portfolio": npl_portfolio,
    "officer_ledgers": officer_ledgers,
    "npl_gaps": npl_gaps,
    "repeated_mortgages": repeated_mortgages,
    "overvaluation_by_agency": overvaluation_by_agency,
    "revaluations_due": revaluations_due,
    "inspections_overdue": inspections_overdue,
    "concentration": concentration,
    "village_group_loans": village_group_loans,
}


# -- CSV: one row per line of a report ----------------------------------------------------------------
#
# Spreadsheets want flat rows: each report becomes the rows a reader files and filters,
# one per loan, lien, agency, borrower or breakdown bucket, with the figures that describe
# a group (its officer, property, group name, the report's currency) repeated on each of
# its rows. Totals the rows add up to are left out (a sum in the sheet would count them
# twice); what the rows cannot give (concentration's portfolio total) is a column.

Flat = Iterator[dict[str, Any]]


def _npl_portfolio_rows(report: dict[str, Any]) -> Flat:
    """Each status's breakdowns; a loan counts once by category and once by class."""
    for status in ("non_performing", "written_off"):
        for breakdown in ("recovery_category", "classification"):
            for line in report[status][f"by_{breakdown}"]:
                yield {
                    "status": status,
                    "breakdown": breakdown,
                    "category": line[breakdown],
                    "count": line["count"],
                    "outstanding": line["outstanding"],
                    "currency": report["currency"],
                }


def _officer_ledger_rows(report: dict[str, Any]) -> Flat:
    """A row per loan per duty; the loans without an officer of a duty come last with
    the officer empty, so each duty lists the whole recovery book (a loan's figures are
    the same under either duty: they are taken from the other one when it has them)."""
    lines = {
        line["loan_number"]: line
        for duty in ("loan_officers", "collection_officers")
        for ledger in report[duty]
        for line in ledger["loans"]
    }
    currency = report["currency"]
    for duty in ("loan_officer", "collection_officer"):
        for ledger in report[f"{duty}s"]:
            for line in ledger["loans"]:
                yield {"duty": duty, "officer": ledger["officer"], **line, "currency": currency}
        for number in report["unassigned"][duty]:
            line = lines.get(number, {"loan_number": number})
            yield {"duty": duty, "officer": None, **line, "currency": currency}


def _npl_gap_rows(report: dict[str, Any]) -> Flat:
    """A row per incomplete loan; what it misses as one true/false column per gap."""
    for item in report["items"]:
        yield {**item, **{f"missing_{gap}": gap in item["missing"] for gap in GAPS}}


def _repeated_mortgage_rows(report: dict[str, Any]) -> Flat:
    for prop in report["properties"]:
        for lien in prop["liens"]:
            yield {
                "cadastral_reference": prop["cadastral_reference"],
                "address": prop["address"],
                "owner": prop["owner"],
                **lien,
            }


def _village_group_rows(report: dict[str, Any]) -> Flat:
    for group in report["groups"]:
        for line in group["loans"]:
            yield {"group": group["group"], **line, "currency": report["currency"]}


def _items(key: str, *shared: str) -> Callable[[dict[str, Any]], Flat]:
    """The report's list ``key``, a row per entry, with the report's ``shared`` figures."""

    def rows(report: dict[str, Any]) -> Flat:
        for item in report[key]:
            yield {**item, **{name: report[name] for name in shared}}

    return rows


#: per report: its CSV columns, in order, and how its rows are drawn from the report
CSV_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], Flat]]] = {
    "npl_portfolio": (
        ("status", "breakdown", "category", "count", "outstanding", "currency"),
        _npl_portfolio_rows,
    ),
    "officer_ledgers": (
        (
            "duty",
            "officer",
            "loan_number",
            "borrower_name",
            "status",
            "classification",
            "recovery_category",
            "outstanding",
            "collection_actions",
            "last_action_date",
            "recovered",
            "currency",
        ),
        _officer_ledger_rows,
    ),
    "npl_gaps": (
        (
            "loan_number",
            "borrower_name",
            "status",
            "loan_officer",
            "collection_officer",
            *(f"missing_{gap}" for gap in GAPS),
        ),
        _npl_gap_rows,
    ),
    "repeated_mortgages": (
        (
            "cadastral_reference",
            "address",
            "owner",
            "lien_rank",
            "loan_number",
            "borrower_name",
            "loan_status",
            "registration_id",
            "registration_status",
            "registry_entry",
            "secured_amount",
            "currency",
            "flagged",
        ),
        _repeated_mortgage_rows,
    ),
    "overvaluation_by_agency": (
        (
            "agency",
            "appraisals",
            "reviewed",
            "overvalued",
            "overvalued_share",
            "average_cut",
            "max_cut",
            "average_cut_pct",
            "max_cut_pct",
            "currency",
        ),
        _items("agencies", "currency"),
    ),
    "revaluations_due": (
        (
            "revaluation_due",
            "days_until_due",
            "overdue",
            "valuation_id",
            "loan_number",
            "borrower_name",
            "loan_status",
            "collateral_id",
            "cadastral_reference",
            "agency",
            "appraisal_date",
            "appraised_value",
            "reviewed_value",
            "currency",
        ),
        _items("items"),
    ),
    "inspections_overdue": (
        (
            "loan_number",
            "borrower_name",
            "status",
            "loan_officer",
            "collection_officer",
            "last_monthly",
            "monthly_next_due",
            "monthly_overdue",
            "last_quarterly",
            "quarterly_next_due",
            "quarterly_overdue",
        ),
        _items("items"),
    ),
    "concentration": (
        (
            "rank",
            "national_id",
            "borrower_name",
            "loans",
            "outstanding",
            "share",
            "cumulative_share",
            "total_outstanding",
            "currency",
        ),
        _items("items", "total_outstanding", "currency"),
    ),
    "village_group_loans": (
        (
            "group",
            "loan_number",
            "borrower_name",
            "product",
            "status",
            "classification",
            "npl",
            "outstanding",
            "collection_officer",
            "collection_actions",
            "last_action_date",
            "recovered",
            "currency",
        ),
        _village_group_rows,
    ),
}

_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def csv_cell(value: Any) -> Any:
    """One cell: null empty, booleans ``true``/``false`` as in JSON, lists joined by
    ", ", decimal text exact (a negative cut is a number, not a formula to defuse) and
    any other text through the audit export's ``inert``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return value
    return inert(value)


def report_csv(report: dict[str, Any]) -> str:
    """A portfolio report as CSV text: a header line of the layout's columns, then its
    rows, written as the audit trail export writes them (``encoding.csv_lines``)."""
    name = report["report"]
    if name not in CSV_LAYOUTS:
        raise ReportError(f"the {name} report has no CSV form")
    columns, rows = CSV_LAYOUTS[name]
    cells = ([csv_cell(row.get(column)) for column in columns] for row in rows(report))
    return "".join(csv_lines(columns, cells))
