"""Who a bearer token belongs to, checked against the log on every request in one read.

``ArchiveApp.authenticate`` rebuilds the token's and its user's aggregates: two reads of
the event store per request (0.6 ms on PostgreSQL), and the read barrier then asks for
the log head, a third. A process here remembers, per token, the principal and the
versions of the two aggregates it was derived from, and each request runs one statement
that returns those aggregates' current versions and the log head. The log is
append-only and every revocation, deactivation or role change is an event that raises
a version, so equal versions mean the principal still stands; any difference derives it
afresh from the aggregates. A change committed by any process before a request reads
the log is therefore seen by that request, exactly as without the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple
from uuid import UUID

from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from psycopg.sql import SQL, Identifier

from archive.application import ArchiveApp, Principal
from archive.eventlog import reading
from archive.users import token_digest, token_id, user_id

#: tokens remembered per process (least recently used go first)
CACHE_SIZE = 1024


class Versions(NamedTuple):
    head: int  # the log head, read in the same statement as the versions
    token: int | None  # None: no such aggregate
    user: int | None


class _Entry(NamedTuple):
    principal: Principal
    user_id: UUID
    token_version: int
    user_version: int


class Principals:
    """A per-process cache of principals, each use checked against the log (see above)."""

    def __init__(self, archive: ArchiveApp, size: int = CACHE_SIZE) -> None:
        self.archive = archive
        self.size = size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._statement = _versions_statement(archive)

    def authenticate(self, token: str) -> tuple[Principal, int]:
        """The token's principal and the log head, both as of one read made now; raises
        AuthenticationError like ``ArchiveApp.authenticate``."""
        digest = token_digest(token)
        tid = token_id(digest)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
        if entry is not None:
            now = self.versions(tid, entry.user_id)
            if (now.token, now.user) == (entry.token_version, entry.user_version):
                return entry.principal, now.head
            uid = entry.user_id  # a token never changes owner
        else:
            uid = user_id(self._derive(token, digest).name)  # first sight: learn the owner
        # Versions first, then the aggregates: these are at least as new as those, so a
        # change landing in between only makes the next request derive again.
        now = self.versions(tid, uid)
        principal = self._derive(token, digest)
        if now.token is not None and now.user is not None:
            with self._lock:
                self._entries[digest] = _Entry(principal, uid, now.token, now.user)
                self._entries.move_to_end(digest)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return principal, now.head

    def _derive(self, token: str, digest: str) -> Principal:
        try:
            return self.archive.authenticate(token)
        except Exception:
            with self._lock:
                self._entries.pop(digest, None)
            raise

    def versions(self, token: UUID, user: UUID) -> Versions:
        """The log head and the two aggregates' versions, in one statement (one snapshot)."""
        recorder = self.archive.recorder
        if isinstance(recorder, SQLiteApplicationRecorder):
            params: tuple[object, ...] = (token.hex, user.hex)
        else:
            params = (token, user)
        with reading(recorder) as c:
            c.execute(self._statement, params)
            row = c.fetchone()
        head, token_version, user_version = (row[k] for k in ("head", "t", "u"))
        return Versions(head or 0, token_version, user_version)


def _versions_statement(archive: ArchiveApp) -> object:
    recorder = archive.recorder
    if isinstance(recorder, SQLiteApplicationRecorder):
        table = recorder.events_table_name
        return (
            f"SELECT (SELECT MAX(rowid) FROM {table}) AS head,"
            f" (SELECT MAX(originator_version) FROM {table} WHERE originator_id = ?) AS t,"
            f" (SELECT MAX(originator_version) FROM {table} WHERE originator_id = ?) AS u"
        )
    if isinstance(recorder, PostgresApplicationRecorder):
        return SQL(
            "SELECT (SELECT MAX(notification_id) FROM {t}) AS head,"
            " (SELECT MAX(originator_version) FROM {t} WHERE originator_id = %s) AS t,"
            " (SELECT MAX(originator_version) FROM {t} WHERE originator_id = %s) AS u"
        ).format(
            t=Identifier(recorder.datastore.schema, recorder.events_table_name),
        )
    raise TypeError(f"unsupported recorder {type(recorder).__name__}")  # pragma: no cover
