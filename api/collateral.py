"""Mortgage registrations: file, register at the registry, verify on site, release."""

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
from api.shapes import CollateralOut, collateral_shape
from archive.application import Principal
from archive.collateral import MAX_LIEN_RANK
from archive.domain import Role

router = APIRouter(prefix="/api/v1/collateral", tags=["collateral"], route_class=AuthFirstRoute)

Writer = Annotated[Principal, Depends(require(Role.CREDIT_OFFICER))]
Reader = Annotated[Principal, Depends(require(*Role))]


class FileMortgage(Body):
    loan_number: str = Field(min_length=1, max_length=64)
    cadastral_reference: str = Field(examples=["9872023VH5797S0001WX"])
    address: str = Field(min_length=1, max_length=500)
    owner: str = Field(min_length=1, max_length=500)
    registry_office: str = Field(min_length=1, max_length=500)
    lien_rank: int = Field(
        1,
        ge=1,
        le=MAX_LIEN_RANK,
        description="1 for a first mortgage; repeated mortgages need more (at most 99).",
    )
    secured_amount: Decimal
    currency: str = "EUR"
    reason: str | None = Field(None, max_length=2000)


class MarkRegistered(Command):
    registry_entry: str = Field(min_length=1, max_length=120)
    registered_on: date


class VerifyOnSite(Command):
    officer: str = Field(min_length=1, max_length=120)
    verified_on: date
    findings: str = Field(min_length=1, max_length=4000)
    defects: list[str] = Field(default_factory=list)


class Release(Command):
    released_on: date


@router.post("", status_code=201, summary="File a mortgage registration for a loan")
def file_mortgage(
    body: FileMortgage, archive: Archive, who: Writer, request: Request
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    fields = body.model_dump(exclude={"reason", "currency"})
    answer = run_command(
        lambda _: archive.register_collateral(ctx, currency_code=body.currency, **fields),
        None,
        None,
        status_code=201,
    )
    answer.headers["Location"] = f"/api/v1/collateral/{json.loads(answer.body)['id']}"
    return answer


@router.get(
    "/{registration_id}",
    summary="A mortgage registration",
    responses={200: {"model": CollateralOut}},
)
def get_collateral(
    registration_id: UUID,
    archive: Archive,
    who: Reader,
    version: Annotated[int | None, Query(ge=1)] = None,
    as_of: AsOf = None,
) -> JSONResponse:
    """Now, at a past ``version``, or as it was at ``as_of`` (rebuilt from its events)."""
    reg = archive.get_collateral(registration_id, version=version, as_of=as_of)
    return state_response(collateral_shape(reg.state()))


@router.post("/{registration_id}/registration", summary="Record the registry entry")
def mark_registered(
    registration_id: UUID,
    body: MarkRegistered,
    archive: Archive,
    who: Writer,
    request: Request,
    if_match: IfMatch = None,
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    return run_command(
        lambda v: archive.change_collateral(
            ctx,
            registration_id,
            v,
            lambda reg: reg.mark_registered(ctx, body.registry_entry, body.registered_on),
        ),
        if_match,
        body.expected_version,
    )


@router.post("/{registration_id}/site-verifications", summary="Record an on-site verification")
def verify_on_site(
    registration_id: UUID,
    body: VerifyOnSite,
    archive: Archive,
    who: Writer,
    request: Request,
    if_match: IfMatch = None,
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    return run_command(
        lambda v: archive.change_collateral(
            ctx,
            registration_id,
            v,
            lambda reg: reg.verify_on_site(
                ctx, body.officer, body.verified_on, body.findings, body.defects
            ),
        ),
        if_match,
        body.expected_version,
    )


@router.post("/{registration_id}/release", summary="Release the mortgage")
def release(
    registration_id: UUID,
    body: Release,
    archive: Archive,
    who: Writer,
    request: Request,
    if_match: IfMatch = None,
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    return run_command(
        lambda v: archive.release_collateral(ctx, registration_id, v, body.released_on),
        if_match,
        body.expected_version,
    )
