"""Loan files: open, change through their commands, read now or as of the past, replay."""

from datetime import date
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, StrictBool

from api.bodies import AsOf, Body, QueryText
from api.deps import (
    Archive,
    AuditTrailViews,
    AuthFirstRoute,
    IfMatch,
    LoanFilesViews,
    context,
    require,
    run_command,
    state_response,
)
from api.encoding import jsonable
from api.shapes import LoanFileOut, LoanFilePage, loan_shape
from archive.application import Principal
from archive.domain import Role
from archive.loans import (
    MAX_TERM_MONTHS,
    Classification,
    LoanFile,
    LoanStatus,
    Product,
    RecoveryCategory,
)
from projections import audit_trail, loan_files
from projections.encoding import plain

router = APIRouter(prefix="/api/v1/loans", tags=["loans"], route_class=AuthFirstRoute)

Writer = Annotated[Principal, Depends(require(Role.CREDIT_OFFICER))]
Reader = Annotated[Principal, Depends(require(*Role))]
Replayer = Annotated[
    Principal, Depends(require(Role.AUDITOR, Role.CREDIT_OFFICER, Role.COMPLIANCE, Role.ADMIN))
]


MAX_OFFSET = 10**12
"""Far beyond any portfolio, and far below what a database integer holds."""


class Command(Body):
    reason: str | None = Field(None, max_length=2000, description="Why: lands in the event.")
    expected_version: int | None = Field(
        None, ge=1, description="Refuse with 409 unless the loan is at this version."
    )


class OpenLoan(Body):
    loan_number: str = Field(min_length=1, max_length=64, examples=["CR-2024-000123"])
    borrower_name: str = Field(min_length=1, max_length=500)
    borrower_national_id: str = Field(min_length=1, max_length=64)
    product: str = Field(
        examples=["mortgage"],
        description="personal, mortgage, business, village_group or cooperative",
    )
    village_group: str | None = Field(None, max_length=500)
    principal: Decimal = Field(examples=["120000.00"])
    currency: str = Field("EUR", examples=["EUR"])
    interest_rate: Decimal = Field(description="Yearly percentage.", examples=["3.75"])
    term_months: int = Field(
        ge=1,
        le=MAX_TERM_MONTHS,
        description="1 to 1200 (a hundred years): events are forever, so no view may overflow.",
    )
    disbursement_date: date
    maturity_date: date
    branch: str = Field(min_length=1, max_length=120)
    reason: str | None = Field(None, max_length=2000)


class ChangeStatus(Command):
    status: str = Field(examples=["overdue"])


class Classify(Command):
    classification: str = Field(examples=["substandard"])


class AssignOfficer(Command):
    duty: str = Field(examples=["collection"], description="loan or collection")
    officer: str = Field(min_length=1, max_length=120)


class RecordInvestigation(Command):
    # Strict: an answer is true or false, not 1 or "yes" read as one.
    checklist: dict[str, StrictBool]
    investigated_on: date
    notes: str | None = Field(None, max_length=4000)


class CategoriseRecovery(Command):
    category: str = Field(examples=["recoverable_with_effort"])
    causes_of_default: list[str] = Field(min_length=1)


class SetRecoveryPlan(Command):
    summary: str = Field(min_length=1, max_length=4000)
    target_date: date
    target_amount: Decimal


class RecordCollectionAction(Command):
    kind: str = Field(examples=["visit"])
    action_date: date
    outcome: str = Field(min_length=1, max_length=4000)
    amount_recovered: Decimal = Decimal("0")
    officer: str = Field(min_length=1, max_length=120)


class RecordRepayment(Command):
    amount: Decimal
    paid_on: date


class RecordInspection(Command):
    kind: str = Field(examples=["monthly"])
    inspected_on: date
    inspector: str = Field(min_length=1, max_length=120)
    findings: str = Field(min_length=1, max_length=4000)


@router.post("", status_code=201, summary="Open a loan file")
def open_loan(body: OpenLoan, archive: Archive, who: Writer, request: Request) -> JSONResponse:
    ctx = context(who, request, body.reason)
    terms = body.model_dump(exclude={"reason", "currency"})
    return run_command(
        lambda _: archive.open_loan(ctx, currency_code=body.currency, **terms),
        None,
        None,
        status_code=201,
        location=f"/api/v1/loans/{quote(body.loan_number.strip(), safe='')}",
    )


@router.get(
    "/{loan_number}",
    summary="A loan file now, at a version, or as of a moment",
    responses={200: {"model": LoanFileOut, "description": "The file, named as list items are"}},
)
def get_loan(
    loan_number: str,
    archive: Archive,
    who: Reader,
    as_of: AsOf = None,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> JSONResponse:
    """Rebuilt from the events (never from a view), then named as the list's items."""
    state = archive.loan_file(loan_number, version=version, as_of=as_of)
    return state_response(loan_shape(state))


HEADER_FIELDS = {
    "originator_id",
    "originator_version",
    "timestamp",
    "actor_id",
    "actor_role",
    "reason",
    "correlation_id",
    "originator_topic",
}


@router.get(
    "/{loan_number}/history",
    summary="Every event of the loan file, its collateral, valuations and documents, and its liens",
)
def history(
    loan_number: str, archive: Archive, views: AuditTrailViews, who: Replayer
) -> JSONResponse:
    """Replayed from the event log (the authority), with the audit trail's one-line
    summary and field-level diff for each event. The liens of its properties are the
    ones added and released for its own registrations, as the audit trail files them."""
    events = archive.loan_events(loan_number)
    annotations = {
        row["position"]: row for row in audit_trail.rows_for_loan(views.store, loan_number)
    }
    rows = []
    for position, event in events:
        audit = annotations.get(position, {})
        rows.append(
            {
                "position": position,
                "aggregate_type": type(event).__qualname__.split(".")[0],
                "aggregate_id": event.originator_id,
                "version": event.originator_version,
                "type": type(event).__qualname__.split(".")[-1],
                "actor": event.actor_id,
                "role": event.actor_role,
                "time": event.timestamp,
                "reason": event.reason,
                "correlation_id": event.correlation_id,
                "summary": audit.get("summary"),
                "diff": audit.get("diff"),
                "fields": {k: v for k, v in vars(event).items() if k not in HEADER_FIELDS},
            }
        )
    # Written as the audit trail and the loan file write them (``plain``: times as
    # fixed-width UTC ``…Z``), so an auditor matches the two event by event as text.
    return JSONResponse(plain(rows))


@router.get(
    "",
    summary="Current loan files (from the loan_files view), filtered and paginated",
    responses={200: {"model": LoanFilePage}},
)
def list_loans(
    views: LoanFilesViews,
    who: Reader,
    status: LoanStatus | None = None,
    classification: Classification | None = None,
    recovery_category: RecoveryCategory | None = None,
    loan_officer: QueryText = None,
    collection_officer: QueryText = None,
    branch: QueryText = None,
    product: Product | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JSONResponse:
    page = loan_files.query(
        views.store,
        status=status,
        classification=classification,
        recovery_category=recovery_category,
        loan_officer=loan_officer,
        collection_officer=collection_officer,
        branch=branch,
        product=product,
        limit=limit,
        offset=offset,
    )
    return JSONResponse(jsonable(page.as_dict()))


LOAN_COMMANDS: dict[str, tuple[type[Command], Any]] = {}
"""Each LoanFile command by name: its request model and how it applies (shared with the CLI)."""


def _command(path: str, model: type[Command], summary: str, apply: Any) -> None:
    """Declare one LoanFile command route: POST /{loan_number}/<path>."""
    LOAN_COMMANDS[path] = (model, apply)

    def endpoint(
        loan_number: str,
        body: model,  # type: ignore[valid-type]
        archive: Archive,
        who: Writer,
        request: Request,
        if_match: IfMatch = None,
    ) -> Response:
        ctx = context(who, request, body.reason)

        def change(loan: LoanFile) -> None:
            apply(loan, ctx, body)

        return run_command(
            lambda version: archive.change_loan(ctx, loan_number, version, change),
            if_match,
            body.expected_version,
        )

    endpoint.__name__ = path.replace("-", "_")
    router.add_api_route(f"/{{loan_number}}/{path}", endpoint, methods=["POST"], summary=summary)


_command(
    "status",
    ChangeStatus,
    "Change the loan's status",
    lambda loan, ctx, b: loan.change_status(ctx, b.status),
)
_command(
    "classification",
    Classify,
    "Classify the loan (five tiers)",
    lambda loan, ctx, b: loan.classify(ctx, b.classification),
)
_command(
    "officers",
    AssignOfficer,
    "Assign the loan or collection officer",
    lambda loan, ctx, b: loan.assign_officer(ctx, b.duty, b.officer),
)
_command(
    "investigation",
    RecordInvestigation,
    "Record the NPL investigation checklist",
    lambda loan, ctx, b: loan.record_investigation(ctx, b.checklist, b.investigated_on, b.notes),
)
_command(
    "recovery-category",
    CategoriseRecovery,
    "Categorise an NPL for recovery",
    lambda loan, ctx, b: loan.categorise_recovery(ctx, b.category, b.causes_of_default),
)
_command(
    "recovery-plan",
    SetRecoveryPlan,
    "Set the recovery plan",
    lambda loan, ctx, b: loan.set_recovery_plan(ctx, b.summary, b.target_date, b.target_amount),
)
_command(
    "collection-actions",
    RecordCollectionAction,
    "Record a collection action",
    lambda loan, ctx, b: loan.record_collection_action(
        ctx, b.kind, b.action_date, b.outcome, b.amount_recovered, b.officer
    ),
)
_command(
    "repayments",
    RecordRepayment,
    "Record a repayment",
    lambda loan, ctx, b: loan.record_repayment(ctx, b.amount, b.paid_on),
)
_command(
    "inspections",
    RecordInspection,
    "Record a monthly or quarterly inspection",
    lambda loan, ctx, b: loan.record_inspection(
        ctx, b.kind, b.inspected_on, b.inspector, b.findings
    ),
)
