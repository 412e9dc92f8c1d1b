"""Portfolio reports and the per-loan analysis report, read from the views.

Every answer names the reporting date (``as_of``) and the view ``position`` its figures
are consistent with; compare that with the position a command returned to know whether
the report includes your write. Money is decimal text; shares are percentages.

The portfolio reports answer ``format=csv`` too, as the audit trail export does: one row
per loan, lien, agency or borrower (``projections.reports.CSV_LAYOUTS``), to file in a
spreadsheet; the reporting date is in the file name.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from api.bodies import refuse_nul
from api.deps import Archive, AuthFirstRoute, fresh_views, require
from api.encoding import jsonable
from archive.application import Principal
from archive.domain import Role
from archive.exceptions import ArchiveError
from projections import reports
from projections.analysis import analysis_pdf, loan_analysis
from projections.loan_files import LoanFilesView
from projections.store import Store

router = APIRouter(prefix="/api/v1/reports", tags=["reports"], route_class=AuthFirstRoute)

READERS = (Role.AUDITOR, Role.CREDIT_OFFICER, Role.COMPLIANCE, Role.ADMIN)
Reader = Annotated[Principal, Depends(require(*READERS))]

LATEST_AS_OF = date(9899, 12, 31)
"""The last reporting date: a report looks up to ten years past it (revaluations, next
inspections), and the calendar ends in 9999."""
EARLIEST_AS_OF = date(2, 1, 1)
"""The first reporting date: a report looks up to a quarter before it (inspections
overdue), and the calendar starts in year 1."""

AsOf = Annotated[
    date | None,
    Query(
        ge=EARLIEST_AS_OF,
        le=LATEST_AS_OF,
        description="Reporting date (YYYY-MM-DD); default today.",
    ),
]
Currency = Annotated[
    str | None,
    Query(
        min_length=3,
        max_length=3,
        description="Only amounts in this currency; required when the selection mixes currencies.",
        examples=["EUR"],
    ),
]


def _nul_free(value: str) -> str:
    refuse_nul(value)
    return value


LoanNumber = Annotated[str, Path(description="The loan number."), AfterValidator(_nul_free)]
"""A NUL cannot be in a loan number, and PostgreSQL refuses it in a query (a 500)."""


class ViewsUnavailableError(ArchiveError):
    status = 503
    title = "Views unavailable"


def get_store(request: Request) -> Store:
    """The loan_files view (what every report reads), up to this request's log head."""
    if getattr(request.app.state, "projections", None) is None:
        raise ViewsUnavailableError("the read views are not running on this server")
    return fresh_views(request, (LoanFilesView.name,)).store


Views = Annotated[Store, Depends(get_store)]


ReportFormat = Literal["json", "csv"]
Format = Annotated[
    ReportFormat,
    Query(description="json, or csv: one row per line of the report, to file in a spreadsheet."),
]
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
TABULAR: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {
            "content": {"application/json": {}, "text/csv": {}},
            "description": "The report; with format=csv as a CSV attachment.",
        }
    },
}
"""How a portfolio report's route is declared: JSON by default, CSV on request."""


def answer(body: dict[str, Any], format: ReportFormat = "json") -> Response:
    """The report as JSON, or with ``format=csv`` as a CSV file named after the report
    and its reporting date (``npl-portfolio-2025-06-30.csv``)."""
    if format == "csv":
        name = f"{body['report'].replace('_', '-')}-{body['as_of']}.csv"
        return Response(
            reports.report_csv(body),
            media_type=CSV_MEDIA_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return JSONResponse(jsonable(body))


@router.get(
    "/npl-portfolio", summary="NPLs and write-offs by recovery category and class", **TABULAR
)
def npl_portfolio(
    store: Views,
    who: Reader,
    as_of: AsOf = None,
    currency: Currency = None,
    format: Format = "json",
) -> Response:
    return answer(reports.npl_portfolio(store, as_of, currency), format)


@router.get(
    "/officer-ledgers", summary="NPL ledgers per loan officer and collection officer", **TABULAR
)
def officer_ledgers(
    store: Views,
    who: Reader,
    as_of: AsOf = None,
    currency: Currency = None,
    format: Format = "json",
) -> Response:
    return answer(reports.officer_ledgers(store, as_of, currency), format)


@router.get(
    "/npl-gaps", summary="NPLs missing an officer or the investigation checklist", **TABULAR
)
def npl_gaps(store: Views, who: Reader, as_of: AsOf = None, format: Format = "json") -> Response:
    return answer(reports.npl_gaps(store, as_of), format)


@router.get("/repeated-mortgages", summary="Properties securing more than one live loan", **TABULAR)
def repeated_mortgages(
    store: Views, who: Reader, as_of: AsOf = None, format: Format = "json"
) -> Response:
    return answer(reports.repeated_mortgages(store, as_of), format)


@router.get(
    "/overvaluation-by-agency",
    summary="Appraisal agencies: overvaluation flags and cuts",
    **TABULAR,
)
def overvaluation_by_agency(
    store: Views,
    who: Reader,
    as_of: AsOf = None,
    currency: Currency = None,
    format: Format = "json",
) -> Response:
    return answer(reports.overvaluation_by_agency(store, as_of, currency), format)


@router.get("/revaluations-due", summary="Valuations due for revaluation, overdue first", **TABULAR)
def revaluations_due(
    store: Views,
    who: Reader,
    as_of: AsOf = None,
    days: Annotated[
        int, Query(ge=0, le=reports.MAX_DAYS, description="Look this many days ahead.")
    ] = 30,
    format: Format = "json",
) -> Response:
    return answer(reports.revaluations_due(store, as_of, days), format)


@router.get(
    "/inspections-overdue", summary="NPLs with a monthly or quarterly inspection overdue", **TABULAR
)
def inspections_overdue(
    store: Views, who: Reader, as_of: AsOf = None, format: Format = "json"
) -> Response:
    return answer(reports.inspections_overdue(store, as_of), format)


@router.get("/concentration", summary="Top borrowers by outstanding and their shares", **TABULAR)
def concentration(
    store: Views,
    who: Reader,
    as_of: AsOf = None,
    top: Annotated[int, Query(ge=1, le=reports.MAX_TOP)] = 10,
    currency: Currency = None,
    format: Format = "json",
) -> Response:
    return answer(reports.concentration(store, as_of, top, currency), format)


@router.get(
    "/village-group-loans", summary="Village-group and cooperative loans by group", **TABULAR
)
def village_group_loans(
    store: Views,
    who: Reader,
    as_of: AsOf = None,
    currency: Currency = None,
    format: Format = "json",
) -> Response:
    return answer(reports.village_group_loans(store, as_of, currency), format)


@router.get("/loans/{loan_number}/analysis", summary="The analysis report of one loan (JSON)")
def loan_analysis_json(
    loan_number: LoanNumber, archive: Archive, store: Views, who: Reader, as_of: AsOf = None
) -> JSONResponse:
    return answer(loan_analysis(archive, store, loan_number, as_of))


@router.get(
    "/loans/{loan_number}/analysis.pdf",
    summary="The analysis report of one loan, as a PDF to file",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}, "description": "The PDF report."}},
)
async def loan_analysis_pdf(
    loan_number: LoanNumber, archive: Archive, store: Views, who: Reader, as_of: AsOf = None
) -> Response:
    report = await run_in_threadpool(loan_analysis, archive, store, loan_number, as_of)
    content = await run_in_threadpool(analysis_pdf, report)
    number = report["loan"]["loan_number"]  # letters, digits, '.', '_', '-' only
    return Response(
        content,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="loan-analysis-{number}.pdf"',
            "Cache-Control": "no-store",
        },
    )
