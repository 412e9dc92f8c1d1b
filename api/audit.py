"""The audit trail: one row per event, filterable, exportable as CSV or JSON Lines."""

from datetime import UTC
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from api.bodies import QueryMoment, QueryText
from api.deps import AuditTrailViews, AuthFirstRoute, require
from api.encoding import jsonable
from archive.application import Principal
from archive.domain import Role
from archive.exceptions import DomainError
from projections import audit_trail

router = APIRouter(prefix="/api/v1/audit-trail", tags=["audit"], route_class=AuthFirstRoute)

MAX_OFFSET = 10**12
"""Far beyond any trail, and far below what a database integer holds."""

Auditor = Annotated[Principal, Depends(require(Role.AUDITOR, Role.COMPLIANCE, Role.ADMIN))]


def filters(
    loan_number: QueryText = None,
    actor: QueryText = None,
    event_type: Annotated[str | None, Query(examples=["LoanFile.StatusChanged"])] = None,
    since: Annotated[QueryMoment, Query(description="Inclusive; ISO 8601 with zone.")] = None,
    until: Annotated[QueryMoment, Query(description="Exclusive; ISO 8601 with zone.")] = None,
) -> dict[str, object]:
    if event_type is not None:
        known = audit_trail.known_event_types()
        if event_type not in known:
            # A typo would otherwise read as "no such events": an empty 200.
            raise RequestValidationError(
                [
                    {
                        "loc": ("query", "event_type"),
                        "msg": f"unknown event type {event_type!r}; the known types are "
                        + ", ".join(known),
                        "type": "value_error",
                        "input": event_type,
                    }
                ]
            )
    for name, moment in (("since", since), ("until", until)):
        if moment is None:
            continue
        if moment.tzinfo is None:
            raise DomainError(f"{name} needs a time zone, e.g. 2026-01-31T00:00:00Z")
        try:
            moment.astimezone(UTC)
        except OverflowError:
            raise DomainError(f"{name} falls outside the calendar in UTC: {moment}") from None
    if since is not None and until is not None and since > until:
        # Reversed bounds match nothing: an empty 200 would read as "no such events".
        raise DomainError(
            f"since {since.isoformat()} is after until {until.isoformat()}: the range is reversed"
        )
    return {
        "loan_number": loan_number,
        "actor_id": actor,
        "event_type": event_type,
        "since": since,
        "until": until,
    }


Filters = Annotated[dict[str, object], Depends(filters)]


@router.get("", summary="Audit rows (who, when, why, what changed), by position")
def trail(
    views: AuditTrailViews,
    who: Auditor,
    where: Filters,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JSONResponse:
    page = audit_trail.query(views.store, limit=limit, offset=offset, **where)  # type: ignore[arg-type]
    return JSONResponse(jsonable(page.as_dict()))


@router.get(
    "/export",
    summary="The matching rows as CSV or JSON Lines (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}},
)
def export(
    views: AuditTrailViews,
    who: Auditor,
    where: Filters,
    format: Annotated[Literal["csv", "jsonl"], Query()] = "csv",
) -> StreamingResponse:
    if format == "csv":
        lines = audit_trail.export_csv(views.store, **where)  # type: ignore[arg-type]
        media, suffix = "text/csv; charset=utf-8", "csv"
    else:
        lines = audit_trail.export_jsonl(views.store, **where)  # type: ignore[arg-type]
        media, suffix = "application/x-ndjson", "jsonl"
    return StreamingResponse(
        lines,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="audit-trail.{suffix}"'},
    )
