"""Hash-chain verification for auditors."""

from typing import Annotated

from fastapi import APIRouter, Depends

from api.deps import Archive, AuthFirstRoute, require
from api.encoding import jsonable
from archive.application import Principal
from archive.domain import Role
from archive.integrity import ChainReport

router = APIRouter(prefix="/api/v1/integrity", tags=["integrity"], route_class=AuthFirstRoute)

Auditor = Annotated[Principal, Depends(require(Role.AUDITOR, Role.ADMIN))]


def report(result: ChainReport) -> dict[str, object]:
    breach = result.breach
    return {
        "ok": result.ok,
        "events_checked": result.events_checked,
        "aggregates_checked": result.aggregates_checked,
        "first_breach": None
        if breach is None
        else jsonable(
            {
                "aggregate_id": breach.originator_id,
                "version": breach.originator_version,
                "position": breach.position,
                "problem": breach.problem,
            }
        ),
    }


@router.get("", summary="Verify the hash chain of the whole event store")
def verify_store(archive: Archive, who: Auditor) -> dict[str, object]:
    return report(archive.verify_chain())


@router.get("/loans/{loan_number}", summary="Verify the chains of one loan file")
def verify_loan(loan_number: str, archive: Archive, who: Auditor) -> dict[str, object]:
    return report(archive.verify_loan_chain(loan_number))
