"""Errors the domain and the application raise; the API maps each to one HTTP status."""


class ArchiveError(Exception):
    """Base class: every expected failure has a clear, user-facing message."""

    status = 400
    title = "Bad request"


class DomainError(ArchiveError):
    """A command that the rules of the domain refuse (bad value, forbidden transition)."""

    status = 422
    title = "Unprocessable command"


class NotFoundError(ArchiveError):
    status = 404
    title = "Not found"


class ConflictError(ArchiveError):
    """A stale expected version, a concurrent write, or a duplicate business key."""

    status = 409
    title = "Conflict"


class PreconditionFailedError(ArchiveError):
    """An If-Match header that does not match the current version."""

    status = 412
    title = "Precondition failed"


class AuthenticationError(ArchiveError):
    status = 401
    title = "Unauthorized"


class PermissionDeniedError(ArchiveError):
    status = 403
    title = "Forbidden"
