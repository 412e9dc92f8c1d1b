"""Users and bearer tokens (admin), and who-am-I for everyone."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from api.bodies import Body
from api.deps import Archive, AuthFirstRoute, context, require
from archive.application import Principal
from archive.domain import Role
from archive.exceptions import DomainError

router = APIRouter(prefix="/api/v1/users", tags=["users"], route_class=AuthFirstRoute)

Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Anyone = Annotated[Principal, Depends(require(*Role))]


class AddUser(Body):
    name: str = Field(examples=["ana.perez"])
    role: Role
    reason: str | None = Field(None, max_length=2000)


class ChangeRole(Body):
    role: Role
    reason: str | None = Field(None, max_length=2000)


class Reason(Body):
    reason: str | None = Field(None, max_length=2000)


class RevokeToken(Body):
    #: in the body, never in the URL (URLs end up in logs)
    token: str = Field(max_length=200)
    reason: str | None = Field(None, max_length=2000)


@router.get("/me", summary="The authenticated caller")
def me(who: Anyone) -> dict[str, str]:
    return {"name": who.name, "role": who.role.value}


@router.post("", status_code=201, summary="Add a user; the token is shown only in this answer")
def add_user(body: AddUser, archive: Archive, who: Admin, request: Request) -> JSONResponse:
    token = archive.add_user(context(who, request, body.reason), body.name, body.role.value)
    return JSONResponse(
        {"name": body.name, "role": body.role.value, "token": token}, status_code=201
    )


@router.post("/{name}/tokens", status_code=201, summary="Issue another token for a user")
def issue_token(
    name: str, archive: Archive, who: Admin, request: Request, body: Reason | None = None
) -> JSONResponse:
    """The body (a reason) is optional."""
    reason = body.reason if body is not None else None
    token = archive.issue_token(context(who, request, reason), name)
    return JSONResponse({"name": name, "token": token}, status_code=201)


@router.post("/{name}/tokens/revoke", summary="Revoke one of a user's tokens (a leaked one)")
def revoke_token(
    name: str, body: RevokeToken, archive: Archive, who: Admin, request: Request
) -> dict[str, str]:
    """The token stops working at once; the user and their other tokens keep working
    (deactivating the user stops them all, for good)."""
    archive.revoke_token(context(who, request, body.reason), body.token, user=name)
    return {"name": name, "status": "token revoked"}


@router.post("/{name}/role", summary="Change a user's role")
def change_role(
    name: str, body: ChangeRole, archive: Archive, who: Admin, request: Request
) -> dict[str, str]:
    """An admin cannot change their own role, for the reason they cannot deactivate
    themselves: the last admin would lock every admin out of the API."""
    if name == who.name:
        raise DomainError("you cannot change your own role; ask another admin")
    ctx = context(who, request, body.reason)
    archive.change_user(ctx, name, lambda u: u.change_role(ctx, body.role.value))
    return {"name": name, "role": body.role.value}


@router.post("/{name}/deactivate", summary="Deactivate a user: all their tokens stop working")
def deactivate(
    name: str, archive: Archive, who: Admin, request: Request, body: Reason | None = None
) -> dict[str, str]:
    """The body (a reason) is optional. An admin cannot deactivate themselves: the last
    one would lock every admin out of the API."""
    if name == who.name:
        raise DomainError("you cannot deactivate your own account; ask another admin")
    ctx = context(who, request, body.reason if body is not None else None)
    archive.change_user(ctx, name, lambda u: u.deactivate(ctx))
    return {"name": name, "status": "deactivated"}
