"""The loan_files view: every loan file as it stands now, with what is filed under it.

Four tables per generation: the loan files, their collateral (mortgage registrations),
valuations and documents. Listing and filtering is one indexed query instead of
replaying each loan's events; the archive's ``loan_file()`` stays the authority for
history (past versions, as-of reads). Money is kept as decimal text, dates and times
as ISO text, lists and objects as JSON text.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, ClassVar

from projections import registry
from projections.encoding import dumps, iso_utc, loads, opt, plain
from projections.store import Row, Store, Tx
from projections.view import (
    Handlers,
    Page,
    Tables,
    View,
    check_page,
    fetch_row,
    insert_row,
    update_row,
)

LOANS = "loan_files"
COLLATERAL = "loan_collateral"
VALUATIONS = "loan_valuations"
DOCUMENTS = "loan_documents"

handlers = Handlers()


class LoanFilesView(View):
    name: ClassVar[str] = "loan_files"
    schema_version: ClassVar[int] = 1
    table_names: ClassVar[tuple[str, ...]] = (LOANS, COLLATERAL, VALUATIONS, DOCUMENTS)
    handlers: ClassVar[Handlers] = handlers
    ddl: ClassVar[tuple[str, ...]] = (
        "CREATE TABLE {loan_files} ("
        " loan_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL UNIQUE,"
        " version INTEGER NOT NULL,"
        " borrower_name TEXT NOT NULL,"
        " borrower_national_id TEXT NOT NULL,"
        " product TEXT NOT NULL,"
        " village_group TEXT,"
        " principal TEXT NOT NULL,"
        " currency TEXT NOT NULL,"
        " interest_rate TEXT NOT NULL,"
        " term_months INTEGER NOT NULL,"
        " disbursement_date TEXT NOT NULL,"
        " maturity_date TEXT NOT NULL,"
        " branch TEXT NOT NULL,"
        " status TEXT NOT NULL,"
        " classification TEXT NOT NULL,"
        " loan_officer TEXT,"
        " collection_officer TEXT,"
        " recovery_category TEXT,"
        " causes_of_default TEXT NOT NULL,"
        " investigation TEXT,"
        " recovery_plan TEXT,"
        " officer_history TEXT NOT NULL,"
        " collection_actions TEXT NOT NULL,"
        " repayments TEXT NOT NULL,"
        " inspections TEXT NOT NULL,"
        " repaid TEXT NOT NULL,"
        " recovered TEXT NOT NULL,"
        " outstanding TEXT NOT NULL,"
        " opened_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL,"
        " position BIGINT NOT NULL)",
        *(
            f"CREATE INDEX {{loan_files}}_{column} ON {{loan_files}} ({column}, loan_number)"
            for column in (
                "status",
                "classification",
                "recovery_category",
                "loan_officer",
                "collection_officer",
                "branch",
                "product",
            )
        ),
        "CREATE TABLE {loan_collateral} ("
        " registration_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL,"
        " version INTEGER NOT NULL,"
        " cadastral_reference TEXT NOT NULL,"
        " address TEXT NOT NULL,"
        " owner TEXT NOT NULL,"
        " registry_office TEXT NOT NULL,"
        " registry_entry TEXT,"
        " lien_rank INTEGER NOT NULL,"
        " secured_amount TEXT NOT NULL,"
        " currency TEXT NOT NULL,"
        " status TEXT NOT NULL,"
        " registered_on TEXT,"
        " released_on TEXT,"
        " site_verifications TEXT NOT NULL,"
        " repeated_mortgage TEXT,"
        " filed_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)",
        "CREATE INDEX {loan_collateral}_loan ON {loan_collateral} (loan_number)",
        "CREATE TABLE {loan_valuations} ("
        " valuation_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL,"
        " version INTEGER NOT NULL,"
        " collateral_id TEXT,"
        " agency TEXT NOT NULL,"
        " appraiser TEXT NOT NULL,"
        " method TEXT NOT NULL,"
        " appraised_value TEXT NOT NULL,"
        " currency TEXT NOT NULL,"
        " appraisal_date TEXT NOT NULL,"
        " revaluation_due TEXT NOT NULL,"
        " reviewer TEXT,"
        " reviewed_value TEXT,"
        " review_notes TEXT,"
        " reviewed_at TEXT,"
        " overvalued INTEGER NOT NULL,"
        " overvaluation TEXT,"
        " superseded_by TEXT,"
        " appraised_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)",
        "CREATE INDEX {loan_valuations}_loan ON {loan_valuations} (loan_number)",
        "CREATE TABLE {loan_documents} ("
        " document_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL,"
        " version INTEGER NOT NULL,"
        " collateral_id TEXT,"
        " valuation_id TEXT,"
        " doc_type TEXT NOT NULL,"
        " original_filename TEXT NOT NULL,"
        " media_type TEXT NOT NULL,"
        " size BIGINT NOT NULL,"
        " sha256 TEXT NOT NULL,"
        " object_key TEXT NOT NULL,"
        " object_version TEXT,"
        " retain_until TEXT,"
        " supersedes TEXT,"
        " superseded_by TEXT,"
        " uploaded_by TEXT NOT NULL,"
        " uploaded_at TEXT NOT NULL,"
        " legal_hold INTEGER NOT NULL,"
        " downloads INTEGER NOT NULL,"
        " last_downloaded_at TEXT,"
        " fixity_status TEXT,"
        " fixity_checked_at TEXT,"
        " extraction_status TEXT,"
        " updated_at TEXT NOT NULL)",
        "CREATE INDEX {loan_documents}_loan ON {loan_documents} (loan_number)",
    )


# -- apply: LoanFile ----------------------------------------------------------------------


def _touch(event: Any, position: int) -> dict[str, Any]:
    return {
        "version": event.originator_version,
        "updated_at": iso_utc(event.timestamp),
        "position": position,
    }


def _update_loan(tx: Tx, t: Tables, position: int, event: Any, **changes: Any) -> None:
    update_row(
        tx, t[LOANS], "loan_id", str(event.originator_id), {**changes, **_touch(event, position)}
    )


def _loan(tx: Tx, t: Tables, event: Any) -> Row:
    row = fetch_row(tx, t[LOANS], "loan_id", str(event.originator_id))
    if row is None:  # pragma: no cover - a loan's events all follow its Opened event
        raise LookupError(f"loan {event.originator_id} has no row")
    return row


def _append(row: Row, column: str, item: dict[str, Any]) -> str:
    return dumps([*loads(row[column]), plain(item)])


@handlers.on("LoanFile.Opened")
def _opened(tx: Tx, t: Tables, position: int, e: Any) -> None:
    insert_row(
        tx,
        t[LOANS],
        {
            "loan_id": str(e.originator_id),
            "loan_number": e.loan_number,
            "borrower_name": e.borrower_name,
            "borrower_national_id": e.borrower_national_id,
            "product": e.product,
            "village_group": e.village_group,
            "principal": str(e.principal),
            "currency": e.currency,
            "interest_rate": str(e.interest_rate),
            "term_months": e.term_months,
            "disbursement_date": e.disbursement_date.isoformat(),
            "maturity_date": e.maturity_date.isoformat(),
            "branch": e.branch,
            "status": "performing",
            "classification": "pass",
            "loan_officer": None,
            "collection_officer": None,
            "recovery_category": None,
            "causes_of_default": "[]",
            "investigation": None,
            "recovery_plan": None,
            "officer_history": "[]",
            "collection_actions": "[]",
            "repayments": "[]",
            "inspections": "[]",
            "repaid": "0",
            "recovered": "0",
            "outstanding": str(e.principal),
            "opened_at": iso_utc(e.timestamp),
            **_touch(e, position),
        },
    )


@handlers.on("LoanFile.StatusChanged")
def _status_changed(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_loan(tx, t, position, e, status=e.new_status)


@handlers.on("LoanFile.Classified")
def _classified(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_loan(tx, t, position, e, classification=e.new_classification)


OFFICER_COLUMNS = {"loan": "loan_officer", "collection": "collection_officer"}


@handlers.on("LoanFile.OfficerAssigned")
def _officer_assigned(tx: Tx, t: Tables, position: int, e: Any) -> None:
    row = _loan(tx, t, e)
    entry = {
        "duty": e.duty,
        "officer": e.officer,
        "previous_officer": e.previous_officer,
        "assigned_at": e.timestamp,
        "assigned_by": e.actor_id,
    }
    _update_loan(
        tx,
        t,
        position,
        e,
        **{OFFICER_COLUMNS[e.duty]: e.officer},
        officer_history=_append(row, "officer_history", entry),
    )


@handlers.on("LoanFile.InvestigationRecorded")
def _investigation(tx: Tx, t: Tables, position: int, e: Any) -> None:
    investigation = {
        "checklist": e.checklist,
        "notes": e.notes,
        "investigated_on": e.investigated_on,
        "investigated_by": e.actor_id,
    }
    _update_loan(tx, t, position, e, investigation=dumps(investigation))


@handlers.on("LoanFile.RecoveryCategorised")
def _categorised(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_loan(
        tx,
        t,
        position,
        e,
        recovery_category=e.category,
        causes_of_default=dumps(e.causes_of_default),
    )


@handlers.on("LoanFile.RecoveryPlanSet")
def _plan(tx: Tx, t: Tables, position: int, e: Any) -> None:
    plan = {
        "summary": e.summary,
        "target_date": e.target_date,
        "target_amount": e.target_amount,
        "set_by": e.actor_id,
    }
    _update_loan(tx, t, position, e, recovery_plan=dumps(plan))


def _outstanding(row: Row, repaid: Decimal, recovered: Decimal) -> str:
    return str(Decimal(row["principal"]) - repaid - recovered)


@handlers.on("LoanFile.CollectionActionRecorded")
def _collection_action(tx: Tx, t: Tables, position: int, e: Any) -> None:
    row = _loan(tx, t, e)
    action = {
        "kind": e.kind,
        "action_date": e.action_date,
        "outcome": e.outcome,
        "amount_recovered": e.amount_recovered,
        "officer": e.officer,
    }
    recovered = Decimal(row["recovered"]) + e.amount_recovered
    _update_loan(
        tx,
        t,
        position,
        e,
        collection_actions=_append(row, "collection_actions", action),
        recovered=str(recovered),
        outstanding=_outstanding(row, Decimal(row["repaid"]), recovered),
    )


@handlers.on("LoanFile.RepaymentRecorded")
def _repayment(tx: Tx, t: Tables, position: int, e: Any) -> None:
    row = _loan(tx, t, e)
    repaid = Decimal(row["repaid"]) + e.amount
    _update_loan(
        tx,
        t,
        position,
        e,
        repayments=_append(row, "repayments", {"amount": e.amount, "paid_on": e.paid_on}),
        repaid=str(repaid),
        outstanding=_outstanding(row, repaid, Decimal(row["recovered"])),
    )


@handlers.on("LoanFile.InspectionRecorded")
def _inspection(tx: Tx, t: Tables, position: int, e: Any) -> None:
    row = _loan(tx, t, e)
    inspection = {
        "kind": e.kind,
        "inspected_on": e.inspected_on,
        "inspector": e.inspector,
        "findings": e.findings,
    }
    _update_loan(tx, t, position, e, inspections=_append(row, "inspections", inspection))


@handlers.on("LoanFile.CollateralLinked", "LoanFile.ValuationLinked")
def _linked(tx: Tx, t: Tables, position: int, e: Any) -> None:
    # The collateral and valuation rows carry the loan number themselves.
    _update_loan(tx, t, position, e)


# -- apply: MortgageRegistration -------------------------------------------------------------


def _update_collateral(tx: Tx, t: Tables, e: Any, **changes: Any) -> None:
    changes.update(version=e.originator_version, updated_at=iso_utc(e.timestamp))
    update_row(tx, t[COLLATERAL], "registration_id", str(e.originator_id), changes)


@handlers.on("MortgageRegistration.Filed")
def _filed(tx: Tx, t: Tables, position: int, e: Any) -> None:
    insert_row(
        tx,
        t[COLLATERAL],
        {
            "registration_id": str(e.originator_id),
            "loan_number": e.loan_number,
            "version": e.originator_version,
            "cadastral_reference": e.cadastral_reference,
            "address": e.address,
            "owner": e.owner,
            "registry_office": e.registry_office,
            "registry_entry": None,
            "lien_rank": e.lien_rank,
            "secured_amount": str(e.secured_amount),
            "currency": e.currency,
            "status": "pending",
            "registered_on": None,
            "released_on": None,
            "site_verifications": "[]",
            "repeated_mortgage": None,
            "filed_at": iso_utc(e.timestamp),
            "updated_at": iso_utc(e.timestamp),
        },
    )


@handlers.on("MortgageRegistration.RepeatedMortgageFlagged")
def _repeated(tx: Tx, t: Tables, position: int, e: Any) -> None:
    flag = {"other_liens": e.other_liens, "flagged_at": e.timestamp}
    _update_collateral(tx, t, e, repeated_mortgage=dumps(flag))


@handlers.on("MortgageRegistration.Registered")
def _registered(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_collateral(
        tx,
        t,
        e,
        status="registered",
        registry_entry=e.registry_entry,
        registered_on=e.registered_on.isoformat(),
    )


@handlers.on("MortgageRegistration.SiteVerified")
def _site_verified(tx: Tx, t: Tables, position: int, e: Any) -> None:
    row = fetch_row(tx, t[COLLATERAL], "registration_id", str(e.originator_id))
    assert row is not None
    visit = {
        "officer": e.officer,
        "verified_on": e.verified_on,
        "findings": e.findings,
        "defects": e.defects,
    }
    _update_collateral(tx, t, e, site_verifications=_append(row, "site_verifications", visit))


@handlers.on("MortgageRegistration.Released")
def _released(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_collateral(tx, t, e, status="released", released_on=e.released_on.isoformat())


# -- apply: Valuation ----------------------------------------------------------------------


def _update_valuation(tx: Tx, t: Tables, e: Any, **changes: Any) -> None:
    changes.update(version=e.originator_version, updated_at=iso_utc(e.timestamp))
    update_row(tx, t[VALUATIONS], "valuation_id", str(e.originator_id), changes)


@handlers.on("Valuation.Appraised")
def _appraised(tx: Tx, t: Tables, position: int, e: Any) -> None:
    insert_row(
        tx,
        t[VALUATIONS],
        {
            "valuation_id": str(e.originator_id),
            "loan_number": e.loan_number,
            "version": e.originator_version,
            "collateral_id": opt(e.collateral_id),
            "agency": e.agency,
            "appraiser": e.appraiser,
            "method": e.method,
            "appraised_value": str(e.appraised_value),
            "currency": e.currency,
            "appraisal_date": e.appraisal_date.isoformat(),
            "revaluation_due": e.revaluation_due.isoformat(),
            "reviewer": None,
            "reviewed_value": None,
            "review_notes": None,
            "reviewed_at": None,
            "overvalued": 0,
            "overvaluation": None,
            "superseded_by": None,
            "appraised_at": iso_utc(e.timestamp),
            "updated_at": iso_utc(e.timestamp),
        },
    )


@handlers.on("Valuation.Reviewed")
def _reviewed(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_valuation(
        tx,
        t,
        e,
        reviewer=e.reviewer,
        reviewed_value=str(e.reviewed_value),
        review_notes=e.notes,
        reviewed_at=iso_utc(e.timestamp),
    )


@handlers.on("Valuation.OvervaluationFlagged")
def _overvalued(tx: Tx, t: Tables, position: int, e: Any) -> None:
    flag = {
        "excess_ratio": e.excess_ratio,
        "margin": e.margin,
        "cut": e.appraised_value - e.reviewed_value,
    }
    _update_valuation(tx, t, e, overvalued=1, overvaluation=dumps(flag))


@handlers.on("Valuation.RevaluationScheduled")
def _revaluation(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_valuation(tx, t, e, revaluation_due=e.revaluation_due.isoformat())


@handlers.on("Valuation.Superseded")
def _valuation_superseded(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_valuation(tx, t, e, superseded_by=str(e.superseded_by))


# -- apply: Document -------------------------------------------------------------------------


def _update_document(tx: Tx, t: Tables, e: Any, **changes: Any) -> None:
    changes.update(version=e.originator_version, updated_at=iso_utc(e.timestamp))
    update_row(tx, t[DOCUMENTS], "document_id", str(e.originator_id), changes)


@handlers.on("Document.Registered")
def _document_registered(tx: Tx, t: Tables, position: int, e: Any) -> None:
    insert_row(
        tx,
        t[DOCUMENTS],
        {
            "document_id": str(e.originator_id),
            "loan_number": e.loan_number,
            "version": e.originator_version,
            "collateral_id": opt(e.collateral_id),
            "valuation_id": opt(e.valuation_id),
            "doc_type": e.doc_type,
            "original_filename": e.original_filename,
            "media_type": e.media_type,
            "size": e.size,
            "sha256": e.sha256,
            "object_key": e.object_key,
            "object_version": e.object_version,
            "retain_until": opt(e.retain_until),
            "supersedes": opt(e.supersedes),
            "superseded_by": None,
            "uploaded_by": e.actor_id,
            "uploaded_at": iso_utc(e.timestamp),
            "legal_hold": 0,
            "downloads": 0,
            "last_downloaded_at": None,
            "fixity_status": None,
            "fixity_checked_at": None,
            "extraction_status": None,
            "updated_at": iso_utc(e.timestamp),
        },
    )


@handlers.on("Document.Superseded")
def _document_superseded(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_document(tx, t, e, superseded_by=str(e.superseded_by))


@handlers.on("Document.Downloaded")
def _downloaded(tx: Tx, t: Tables, position: int, e: Any) -> None:
    row = fetch_row(tx, t[DOCUMENTS], "document_id", str(e.originator_id))
    assert row is not None
    _update_document(
        tx, t, e, downloads=int(row["downloads"]) + 1, last_downloaded_at=iso_utc(e.timestamp)
    )


@handlers.on("Document.LegalHoldPlaced")
def _hold_placed(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_document(tx, t, e, legal_hold=1)


@handlers.on("Document.LegalHoldReleased")
def _hold_released(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_document(tx, t, e, legal_hold=0)


@handlers.on("Document.FixityChecked")
def _fixity(tx: Tx, t: Tables, position: int, e: Any) -> None:
    _update_document(tx, t, e, fixity_status=e.outcome, fixity_checked_at=iso_utc(e.timestamp))


# -- reading -----------------------------------------------------------------------------

_JSON = {
    "causes_of_default",
    "investigation",
    "recovery_plan",
    "officer_history",
    "collection_actions",
    "repayments",
    "inspections",
    "site_verifications",
    "repeated_mortgage",
    "overvaluation",
}
_FLAGS = {"legal_hold", "overvalued"}

FILTERS = (
    "status",
    "classification",
    "recovery_category",
    "loan_officer",
    "collection_officer",
    "branch",
    "product",
)


def _out(row: Row) -> dict[str, Any]:
    return {k: loads(v) if k in _JSON else bool(v) if k in _FLAGS else v for k, v in row.items()}


def _children(tx: Tx, t: Tables, loan_numbers: list[str]) -> dict[str, dict[str, list[Any]]]:
    found: dict[str, dict[str, list[Any]]] = {
        n: {"collateral": [], "valuations": [], "documents": []} for n in loan_numbers
    }
    if not loan_numbers:
        return found
    marks = ", ".join("?" for _ in loan_numbers)
    for key, table, order in (
        ("collateral", t[COLLATERAL], "filed_at, registration_id"),
        ("valuations", t[VALUATIONS], "appraised_at, valuation_id"),
        ("documents", t[DOCUMENTS], "uploaded_at, document_id"),
    ):
        rows = tx.execute(
            f"SELECT * FROM {table} WHERE loan_number IN ({marks}) ORDER BY {order}",
            loan_numbers,
        )
        for row in rows:
            found[row["loan_number"]][key].append(_out(row))
    return found


def query(
    store: Store,
    *,
    status: str | None = None,
    classification: str | None = None,
    recovery_category: str | None = None,
    loan_officer: str | None = None,
    collection_officer: str | None = None,
    branch: str | None = None,
    product: str | None = None,
    limit: int = 50,
    offset: int = 0,
    with_children: bool = True,
) -> Page:
    """Loan files matching every given filter (exact match), ordered by loan number."""
    check_page(limit, offset)
    given = {
        "status": status,
        "classification": classification,
        "recovery_category": recovery_category,
        "loan_officer": loan_officer,
        "collection_officer": collection_officer,
        "branch": branch,
        "product": product,
    }
    where = [f"{column} = ?" for column, value in given.items() if value is not None]
    params = [value for value in given.values() if value is not None]
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    with store.read() as tx:
        current = registry.active(tx, LoanFilesView.name)
        if current is None:
            return Page([], 0, limit, offset, 0)
        t = LoanFilesView().tables(current.generation)
        total_row = tx.one(f"SELECT COUNT(*) AS n FROM {t[LOANS]}{clause}", params)
        rows = tx.execute(
            f"SELECT * FROM {t[LOANS]}{clause} ORDER BY loan_number LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        items = [_out(r) for r in rows]
        if with_children:
            children = _children(tx, t, [i["loan_number"] for i in items])
            for item in items:
                item.update(children[item["loan_number"]])
    return Page(items, int(total_row["n"]) if total_row else 0, limit, offset, current.position)


def get(store: Store, loan_number: str) -> dict[str, Any] | None:
    """One loan file with its collateral, valuations and documents, or None."""
    with store.read() as tx:
        current = registry.active(tx, LoanFilesView.name)
        if current is None:
            return None
        t = LoanFilesView().tables(current.generation)
        row = fetch_row(tx, t[LOANS], "loan_number", loan_number)
        if row is None:
            return None
        item = _out(row)
        item.update(_children(tx, t, [loan_number])[loan_number])
        item["view_position"] = current.position
    return item
