"""Operator view of the read models: positions, lag, rebuilds."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api.bodies import Body
from api.deps import AuthFirstRoute, require
from api.encoding import jsonable
from archive.application import Principal
from archive.domain import Role
from archive.exceptions import NotFoundError
from projections.runner import Projections

router = APIRouter(prefix="/api/v1/projections", tags=["projections"], route_class=AuthFirstRoute)

Operator = Annotated[Principal, Depends(require(Role.AUDITOR, Role.ADMIN))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


def projections_of(request: Request) -> Projections:
    return request.app.state.projections


@router.get("", summary="Each view's position, the log head and the lag")
def status(request: Request, who: Operator) -> JSONResponse:
    return JSONResponse(jsonable([s.as_dict() for s in projections_of(request).status()]))


class Rebuild(Body):
    reason: str | None = Field(None, max_length=2000)


@router.post("/{name}/rebuild", summary="Replay the log into a new generation of a view")
def rebuild(name: str, request: Request, who: Admin, body: Rebuild | None = None) -> JSONResponse:
    views = projections_of(request)
    if name not in views.views:
        raise NotFoundError(f"no view named {name}; views: {', '.join(views.views)}")
    generation = views.rebuild(name)
    return JSONResponse({"view": name, "generation": generation})
