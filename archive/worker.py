"""The OCR worker: glue between the archive (events, originals) and ``ocr`` (bytes in,
pages out).

It follows the log for ``Document.Registered`` and ``Document.ReindexRequested`` from
its own tracking position (kept in the views database), and for each document:

1. claims the extraction with ``ExtractionStarted`` at the version it just read: of
   several workers (on one machine or many, sharing the database and storage) exactly
   one claim per attempt succeeds, the others get a version conflict and move on;
2. fetches the original from blob storage into a temporary file (never into memory) and
   extracts its text;
3. records ``TextExtracted`` or ``ExtractionFailed`` for that attempt, and only then
   advances its tracking position.

A worker killed mid-document finds, after restart, the document still "running" under
its own name and claims it again (a new attempt); another worker takes over a claim
whose lease has expired: a worker that passes a document under another's live claim,
or finds it running when it starts, watches it and claims it once the lease is over (a
worker that never comes back under its name -- a recreated container gets a new
hostname -- would otherwise leave it "running" for good, every other worker's tracking
being past it). A result is recorded only for the current attempt, so each document
ends with one result per request, never two.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.utils import get_topic

from archive.application import ArchiveApp
from archive.documents import Document, ExtractionStatus
from archive.domain import CommandContext, Role
from archive.exceptions import ConflictError, DomainError, NotFoundError
from projections.store import Store

log = logging.getLogger("archive.worker")

TOPICS = [get_topic(Document.Registered), get_topic(Document.ReindexRequested)]
TRACKING_TABLE = "worker_positions"


def default_worker_name() -> str:
    """One identity per machine (per container in docker-compose): a restarted worker
    takes up its own tracking position and its own unfinished claims. Run several on
    one machine with distinct ``--name``s."""
    return f"ocr@{socket.gethostname()}"


def run_extraction(data: bytes, media_type: str, languages: str) -> Any:
    """The real extraction (imported late: the API process never loads Tesseract)."""
    from ocr.pipeline import extract

    return extract(data, media_type=media_type, languages=languages)


class ExtractionWorker:
    def __init__(
        self,
        archive: ArchiveApp,
        store: Store,
        *,
        name: str,
        languages: str = "spa+eng",
        lease: timedelta = timedelta(minutes=30),
        batch_size: int = 20,
        extract: Callable[[Any, str, str], Any] = run_extraction,
    ) -> None:
        self.archive = archive
        self.store = store
        self.name = name
        self.tracking = name
        self.languages = languages
        self.lease = lease
        self.batch_size = batch_size
        self.extract = extract
        # Documents under another worker's live claim, and when that claim's lease ends.
        self.watched: dict[UUID, datetime] = {}
        self.ctx = CommandContext(name, Role.ARCHIVIST.value, "text extraction")
        with store.transaction() as tx:
            # Workers start together: PostgreSQL's IF NOT EXISTS is no guard against a
            # concurrent CREATE (a unique violation on pg_type), the lock is.
            tx.lock(TRACKING_TABLE)
            tx.execute(
                f"CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} "
                "(name TEXT PRIMARY KEY, position BIGINT NOT NULL)"
            )
        self._watch_left_running()

    def _watch_left_running(self) -> None:
        """Watch the documents another worker's claim still holds "running". The watch
        list is in memory: if every worker that passed such a claim restarts (under a
        new name, as a recreated container does), nobody would look at the document
        again, its request being behind every tracking position. The loan_files view
        lists documents by extraction status (a view a moment behind the log misses
        only claims made in that moment, by workers still alive). Without the view (no
        server has run on this database yet) there is nothing to recover."""
        from projections import registry
        from projections.loan_files import DOCUMENTS, LoanFilesView

        view = LoanFilesView()
        with self.store.read() as tx:
            try:
                active = registry.active(tx, view.name)
            except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
                return  # no registry yet: no server has followed this log
            if active is None:
                return
            table = view.tables(active.generation)[DOCUMENTS]
            rows = tx.execute(
                f"SELECT document_id FROM {table} WHERE extraction_status = ?",
                (ExtractionStatus.RUNNING.value,),
            )
        for row in rows:
            try:
                self._watch(self.archive.get_document(UUID(row["document_id"])))
            except NotFoundError:
                continue

    # -- tracking ---------------------------------------------------------------------------

    def position(self) -> int:
        with self.store.read() as tx:
            row = tx.one(f"SELECT position FROM {TRACKING_TABLE} WHERE name = ?", (self.tracking,))
        return 0 if row is None else int(row["position"])

    def _advance(self, position: int) -> None:
        with self.store.transaction() as tx:
            tx.lock(f"{TRACKING_TABLE}:{self.tracking}")
            row = tx.one(f"SELECT position FROM {TRACKING_TABLE} WHERE name = ?", (self.tracking,))
            if row is None:
                tx.execute(
                    f"INSERT INTO {TRACKING_TABLE} (name, position) VALUES (?, ?)",
                    (self.tracking, position),
                )
            elif int(row["position"]) < position:
                tx.execute(
                    f"UPDATE {TRACKING_TABLE} SET position = ? WHERE name = ?",
                    (position, self.tracking),
                )

    # -- the loop ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Process the next batch of requests; returns how many notifications were read."""
        start = self.position()
        notes = self.archive.recorder.select_notifications(
            start, self.batch_size, topics=TOPICS, inclusive_of_start=False
        )
        for note in notes:
            self.process(note.originator_id)
            self._advance(note.id)
        now = datetime.now(UTC)
        for document_id, lease_ends in list(self.watched.items()):
            if lease_ends < now:
                del self.watched[document_id]
                self.process(document_id)
        return len(notes)

    def run_forever(self, stop: threading.Event, poll_interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                if self.run_once() == 0:
                    stop.wait(poll_interval)
            except Exception:  # a broken batch must not end the worker; it is retried
                log.exception("worker %s: batch failed; retrying", self.name)
                stop.wait(poll_interval * 5)

    # -- one document -------------------------------------------------------------------------

    def _claimable(self, document: Document) -> bool:
        state = document.extraction
        if state["status"] == ExtractionStatus.PENDING:
            return True
        if state["status"] != ExtractionStatus.RUNNING:
            return False  # done or failed: nothing to do for this request
        if state.get("worker") == self.name:
            return True  # our own claim, from before a crash
        started: datetime = state["started_at"]
        return datetime.now(UTC) - started > self.lease

    def _watch(self, document: Document) -> None:
        """Watch a document under another worker's claim until its lease ends."""
        state = document.extraction
        if state["status"] == ExtractionStatus.RUNNING and state.get("worker") != self.name:
            self.watched[document.id] = state["started_at"] + self.lease

    def process(self, document_id: UUID) -> str:
        """Extract one document if it still needs it; returns what happened."""
        try:
            document = self.archive.get_document(document_id)
        except NotFoundError:
            return "missing"
        if not self._claimable(document):
            self._watch(document)
            return "skipped"
        try:
            attempt = self.archive.claim_extraction(self.ctx, document, self.name)
        except DomainError:
            return "skipped"
        except ConflictError:  # another worker claimed it first (or a custody event landed)
            self._watch(self.archive.get_document(document_id))
            return "lost claim"
        try:
            result = self._extract(document)
        except Exception as exc:  # storage trouble: record it, a reindex can retry
            log.exception("worker %s: document %s failed", self.name, document_id)
            self._record(document_id, attempt, failure=f"internal: {type(exc).__name__}: {exc}")
            return "failed"
        if result.failure is not None:
            self._record(document_id, attempt, failure=result.failure)
            return "failed"
        self._record(document_id, attempt, result=result)
        return "done"

    def _extract(self, document: Document) -> Any:
        """Fetch the original (streamed to a temporary file) and extract its text.

        PDF and TIFF readers need random access, so the bytes are handed to ``ocr`` whole;
        the OCR itself runs page by page in the worker pool."""
        with tempfile.TemporaryFile(prefix="ocr-") as spool:
            for chunk in self.archive.original_bytes(document):
                spool.write(chunk)
            spool.seek(0)
            return self.extract(spool.read(), document.media_type, self.languages)

    def _record(
        self, document_id: UUID, attempt: int, result: Any = None, failure: str | None = None
    ) -> None:
        ctx = self.ctx

        def record(document: Document) -> None:
            if failure is not None:
                document.record_extraction_failure(ctx, attempt, failure)
            else:
                document.record_text(
                    ctx,
                    attempt,
                    pages=[page_record(p) for p in result.pages],
                    engine=result.engine,
                    engine_version=result.engine_version or "unknown",
                    languages=result.languages,
                    settings=plain(dict(result.settings)),
                )

        try:
            self.archive.change_document(ctx, document_id, record)
        except DomainError:
            log.warning(
                "worker %s: attempt %d of %s was superseded", self.name, attempt, document_id
            )


def page_record(page: Any) -> dict[str, Any]:
    """One page as it goes into the event: plain JSON values only."""
    return {
        "number": page.number,
        "text": page.text,
        "method": str(page.method),
        "confidence": None if page.confidence is None else Decimal(f"{page.confidence:.2f}"),
        "duration_ms": round(page.duration_s * 1000),
        "error": page.error,
    }


def plain(value: Any) -> Any:
    """Event fields take no floats (the hash chain's canonical form refuses them)."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
