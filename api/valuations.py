"""Valuations: appraisal, independent review with the overvaluation flag, revaluation."""

import json
from datetime import date
from decimal import Decimal
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api.bodies import AsOf, Body
from api.deps import Archive, AuthFirstRoute, IfMatch, context, require, run_command, state_response
from api.loans import Command
from api.shapes import ValuationOut, valuation_shape
from archive.application import Principal
from archive.domain import Role

router = APIRouter(prefix="/api/v1/valuations", tags=["valuations"], route_class=AuthFirstRoute)

Writer = Annotated[Principal, Depends(require(Role.CREDIT_OFFICER))]
Reader = Annotated[Principal, Depends(require(*Role))]


class Appraise(Body):
    loan_number: str = Field(min_length=1, max_length=64)
    collateral_id: UUID | None = None
    agency: str = Field(min_length=1, max_length=200)
    appraiser: str = Field(min_length=1, max_length=120)
    method: str = Field(examples=["market_comparison"])
    appraised_value: Decimal
    currency: str = "EUR"
    appraisal_date: date
    revaluation_due: date | None = None
    supersedes: UUID | None = Field(None, description="The valuation this one replaces.")
    reason: str | None = Field(None, max_length=2000)


class Review(Command):
    reviewer: str = Field(min_length=1, max_length=120)
    reviewed_value: Decimal
    notes: str | None = Field(None, max_length=4000)


class ScheduleRevaluation(Command):
    revaluation_due: date


@router.post("", status_code=201, summary="Record an appraisal")
def appraise(body: Appraise, archive: Archive, who: Writer, request: Request) -> JSONResponse:
    ctx = context(who, request, body.reason)
    fields = body.model_dump(exclude={"reason", "currency", "supersedes"})
    answer = run_command(
        lambda _: archive.appraise(
            ctx, supersedes=body.supersedes, currency_code=body.currency, **fields
        ),
        None,
        None,
        status_code=201,
    )
    answer.headers["Location"] = f"/api/v1/valuations/{json.loads(answer.body)['id']}"
    return answer


@router.get("/{valuation_id}", summary="A valuation", responses={200: {"model": ValuationOut}})
def get_valuation(
    valuation_id: UUID,
    archive: Archive,
    who: Reader,
    version: Annotated[int | None, Query(ge=1)] = None,
    as_of: AsOf = None,
) -> JSONResponse:
    """Now, at a past ``version``, or as it was at ``as_of`` (rebuilt from its events)."""
    val = archive.get_valuation(valuation_id, version=version, as_of=as_of)
    return state_response(valuation_shape(val.state()))


@router.post("/{valuation_id}/review", summary="Record the independent internal review")
def review(
    valuation_id: UUID,
    body: Review,
    archive: Archive,
    who: Writer,
    request: Request,
    if_match: IfMatch = None,
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    return run_command(
        lambda v: archive.review_valuation(
            ctx, valuation_id, v, body.reviewer, body.reviewed_value, body.notes
        ),
        if_match,
        body.expected_version,
    )


@router.post("/{valuation_id}/revaluation", summary="Schedule the next revaluation")
def schedule_revaluation(
    valuation_id: UUID,
    body: ScheduleRevaluation,
    archive: Archive,
    who: Writer,
    request: Request,
    if_match: IfMatch = None,
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    return run_command(
        lambda v: archive.change_valuation(
            ctx, valuation_id, v, lambda val: val.schedule_revaluation(ctx, body.revaluation_due)
        ),
        if_match,
        body.expected_version,
    )
