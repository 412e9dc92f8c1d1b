"""Users, roles and bearer tokens, event-sourced like everything else.

A token is 32 random bytes shown once; the archive keeps only its SHA-256. The
``AccessToken`` aggregate's id derives from that digest, so authenticating a request
is one keyed read, and revoking a token is an event in the audit trail.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any, Self
from uuid import UUID

from archive.domain import ArchiveAggregate, CommandContext, Role, choice, stable_id
from archive.exceptions import DomainError

USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{1,63}$")


def user_id(name: str) -> UUID:
    return stable_id("user", name)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(digest: str) -> UUID:
    return stable_id("token", digest)


def new_token() -> str:
    return "la_" + secrets.token_urlsafe(32)


class User(ArchiveAggregate):
    class Registered(ArchiveAggregate.Created):
        name: str
        role: str

        def apply(self, user: User) -> None:
            user.name = self.name
            user.role = self.role
            user.active = True

    class RoleChanged(ArchiveAggregate.Event):
        role: str

        def apply(self, user: User) -> None:
            user.role = self.role

    class Deactivated(ArchiveAggregate.Event):
        def apply(self, user: User) -> None:
            user.active = False

    @classmethod
    def register(cls, ctx: CommandContext, name: str, role: str) -> Self:
        if not USER_NAME.match(name or ""):
            raise DomainError(
                f"user name {name!r} must be 2-64 lower-case letters, digits, '.', '_', '@' or '-'"
            )
        chosen = choice(Role, role, "role")
        return cls._start(cls.Registered, ctx, user_id(name), name=name, role=chosen.value)

    def change_role(self, ctx: CommandContext, role: str) -> None:
        chosen = choice(Role, role, "role")
        if not self.active:
            # Deactivation is final (no command reactivates), so the new role would grant
            # nothing; recording it would only make the user look restored in the trail.
            raise DomainError(f"{self.name} is deactivated; their role no longer changes")
        if chosen.value == self.role:
            raise DomainError(f"{self.name} already has role {self.role}")
        self._trigger(self.RoleChanged, ctx, role=chosen.value)

    def deactivate(self, ctx: CommandContext) -> None:
        if not self.active:
            raise DomainError(f"{self.name} is already deactivated")
        self._trigger(self.Deactivated, ctx)

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "active": self.active,
            "version": self.version,
        }


class AccessToken(ArchiveAggregate):
    class Issued(ArchiveAggregate.Created):
        user_name: str
        token_sha256: str

        def apply(self, token: AccessToken) -> None:
            token.user_name = self.user_name
            token.token_sha256 = self.token_sha256
            token.revoked = False

    class Revoked(ArchiveAggregate.Event):
        def apply(self, token: AccessToken) -> None:
            token.revoked = True

    @classmethod
    def issue(cls, ctx: CommandContext, user_name: str, digest: str) -> Self:
        return cls._start(
            cls.Issued, ctx, token_id(digest), user_name=user_name, token_sha256=digest
        )

    def revoke(self, ctx: CommandContext) -> None:
        if self.revoked:
            raise DomainError("this token is already revoked")
        self._trigger(self.Revoked, ctx)
