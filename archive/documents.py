"""Documents: the originals attached to a loan file, and what happens to them.

An original is never edited: a corrected document is a new Document that supersedes
the old one, and both stay. Every download, legal hold and fixity check is an event.
``LoanDocuments`` indexes a loan's documents by SHA-256 (deterministic id per loan),
so a re-import skips what is already archived and the index never contends with the
loan file's own version.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from enum import StrEnum
from typing import Any, Self
from uuid import UUID

from archive.domain import CONTROL, ArchiveAggregate, CommandContext, choice, stable_id
from archive.exceptions import DomainError


class DocumentType(StrEnum):
    CONTRACT = "contract"
    MORTGAGE_DEED = "mortgage_deed"
    REGISTRY_CERTIFICATE = "registry_certificate"
    VALUATION_REPORT = "valuation_report"
    IDENTITY_DOCUMENT = "identity_document"
    COLLECTION_NOTICE = "collection_notice"
    COURT_FILING = "court_filing"
    INSPECTION_REPORT = "inspection_report"
    OTHER = "other"


class ExtractionStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class FixityOutcome(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    MISSING = "missing"


ACCEPTED_MEDIA_TYPES = ("application/pdf", "image/tiff", "image/png", "image/jpeg")

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "application/pdf"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"PK\x03\x04", "application/zip"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\xd0\xcf\x11\xe0", "application/x-ole-storage (old Microsoft Office)"),
    (b"{\\rtf", "application/rtf"),
    (b"BM", "image/bmp"),
    (b"\x1f\x8b", "application/gzip"),
)
SNIFF_BYTES = 1024


def sniff_media_type(head: bytes) -> str:
    """The media type the first bytes reveal; the client's claim is never trusted."""
    # PDF readers accept a header anywhere in the first 1024 bytes; so do we.
    if b"%PDF-" in head[:SNIFF_BYTES]:
        return "application/pdf"
    for signature, media_type in _SIGNATURES:
        if head.startswith(signature):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    stripped = text.lstrip().lower()
    if stripped.startswith(("<!doctype html", "<html")):
        return "text/html"
    if stripped.startswith("<?xml") or stripped.startswith("<svg"):
        return "application/xml"
    return "text/plain"


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")


def sanitise_filename(name: str | None) -> str:
    """Keep a filename as metadata only: no path, no control or reserved characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFC", base)
    base = _UNSAFE.sub("_", base).strip(" .")
    if len(base) > 200:
        stem, dot, ext = base.rpartition(".")
        base = (stem[:190] + dot + ext[:9]) if dot and len(ext) <= 9 else base[:200]
    return base or "original"


def loan_documents_id(loan_number: str) -> UUID:
    return stable_id("loan-documents", loan_number)


class Document(ArchiveAggregate):
    """One original, as received: its identity, links, custody and checks."""

    class Registered(ArchiveAggregate.Created):
        loan_number: str
        collateral_id: UUID | None
        valuation_id: UUID | None
        doc_type: str
        original_filename: str
        media_type: str
        size: int
        sha256: str
        object_key: str
        object_version: str | None
        retain_until: datetime | None
        supersedes: UUID | None

        def apply(self, doc: Document) -> None:
            doc.loan_number = self.loan_number
            doc.collateral_id = self.collateral_id
            doc.valuation_id = self.valuation_id
            doc.doc_type = self.doc_type
            doc.original_filename = self.original_filename
            doc.media_type = self.media_type
            doc.size = self.size
            doc.sha256 = self.sha256
            doc.object_key = self.object_key
            doc.object_version = self.object_version
            doc.retain_until = self.retain_until
            doc.supersedes = self.supersedes
            doc.superseded_by = None
            doc.uploaded_by = self.actor_id
            doc.uploaded_at = self.timestamp
            doc.legal_hold = False
            doc.downloads = 0
            doc.last_fixity = None
            doc.extraction = {"status": ExtractionStatus.PENDING.value, "attempt": 0}
            doc.extracted_pages = None

    class Superseded(ArchiveAggregate.Event):
        superseded_by: UUID

        def apply(self, doc: Document) -> None:
            doc.superseded_by = self.superseded_by

    class Downloaded(ArchiveAggregate.Event):
        range: str | None

        def apply(self, doc: Document) -> None:
            doc.downloads += 1

    class LegalHoldPlaced(ArchiveAggregate.Event):
        def apply(self, doc: Document) -> None:
            doc.legal_hold = True

    class LegalHoldReleased(ArchiveAggregate.Event):
        def apply(self, doc: Document) -> None:
            doc.legal_hold = False

    class FixityChecked(ArchiveAggregate.Event):
        outcome: str
        observed_sha256: str | None
        observed_size: int | None

        def apply(self, doc: Document) -> None:
            doc.last_fixity = {
                "outcome": self.outcome,
                "checked_at": self.timestamp,
                "observed_sha256": self.observed_sha256,
            }

    class ExtractionStarted(ArchiveAggregate.Event):
        """A worker claims the extraction: one claim per attempt wins (optimistic lock)."""

        worker: str
        attempt: int

        def apply(self, doc: Document) -> None:
            doc.extraction = {
                "status": ExtractionStatus.RUNNING.value,
                "attempt": self.attempt,
                "worker": self.worker,
                "started_at": self.timestamp,
            }

    class TextExtracted(ArchiveAggregate.Event):
        attempt: int
        pages: list[dict[str, Any]]
        engine: str
        engine_version: str
        languages: str
        settings: dict[str, Any]

        def apply(self, doc: Document) -> None:
            doc.extraction = {
                "status": ExtractionStatus.DONE.value,
                "attempt": self.attempt,
                "finished_at": self.timestamp,
                "engine": self.engine,
                "engine_version": self.engine_version,
                "languages": self.languages,
                "pages": len(self.pages),
                "failed_pages": sum(1 for p in self.pages if p.get("error")),
            }
            doc.extracted_pages = len(self.pages)

    class ExtractionFailed(ArchiveAggregate.Event):
        attempt: int
        reason: str

        def apply(self, doc: Document) -> None:
            doc.extraction = {
                "status": ExtractionStatus.FAILED.value,
                "attempt": self.attempt,
                "finished_at": self.timestamp,
                "reason": self.reason,
            }

    class ReindexRequested(ArchiveAggregate.Event):
        def apply(self, doc: Document) -> None:
            doc.extraction = {
                "status": ExtractionStatus.PENDING.value,
                "attempt": doc.extraction["attempt"],
                "requested_at": self.timestamp,
            }

    @classmethod
    def register(cls, ctx: CommandContext, document_id: UUID, **fields: Any) -> Self:
        fields["doc_type"] = choice(DocumentType, fields["doc_type"], "document type").value
        fields["original_filename"] = sanitise_filename(fields["original_filename"])
        if fields["media_type"] not in ACCEPTED_MEDIA_TYPES:
            raise DomainError(f"media type {fields['media_type']} is not accepted")
        return cls._start(cls.Registered, ctx, document_id, **fields)

    def supersede(self, ctx: CommandContext, newer: UUID) -> None:
        if self.superseded_by is not None:
            raise DomainError(f"document {self.id} is already superseded by {self.superseded_by}")
        self._trigger(self.Superseded, ctx, superseded_by=newer)

    def record_download(self, ctx: CommandContext, byte_range: str | None) -> None:
        self._trigger(self.Downloaded, ctx, range=byte_range)

    def place_legal_hold(self, ctx: CommandContext) -> None:
        if self.legal_hold:
            raise DomainError("this document is already under legal hold")
        self._trigger(self.LegalHoldPlaced, ctx)

    def release_legal_hold(self, ctx: CommandContext) -> None:
        if not self.legal_hold:
            raise DomainError("this document is not under legal hold")
        self._trigger(self.LegalHoldReleased, ctx)

    def record_fixity(
        self, ctx: CommandContext, outcome: FixityOutcome, sha256: str | None, size: int | None
    ) -> None:
        self._trigger(
            self.FixityChecked,
            ctx,
            outcome=outcome.value,
            observed_sha256=sha256,
            observed_size=size,
        )

    def start_extraction(self, ctx: CommandContext, worker: str) -> int:
        """Claim the extraction (pending, or running but abandoned); returns the attempt."""
        if self.extraction["status"] in (ExtractionStatus.DONE, ExtractionStatus.FAILED):
            raise DomainError("this document's text is already extracted; request a reindex")
        attempt = self.extraction["attempt"] + 1
        self._trigger(self.ExtractionStarted, ctx, worker=worker, attempt=attempt)
        return attempt

    def _check_claim(self, attempt: int) -> None:
        current = self.extraction
        if current["status"] != ExtractionStatus.RUNNING or current["attempt"] != attempt:
            raise DomainError(f"extraction attempt {attempt} of {self.id} is no longer current")

    def record_text(self, ctx: CommandContext, attempt: int, **result: Any) -> None:
        self._check_claim(attempt)
        self._trigger(self.TextExtracted, ctx, attempt=attempt, **result)

    def record_extraction_failure(self, ctx: CommandContext, attempt: int, reason: str) -> None:
        self._check_claim(attempt)
        # The reason comes from a parser's error message about untrusted bytes.
        reason = CONTROL.sub("", reason)[:2000]
        self._trigger(self.ExtractionFailed, ctx, attempt=attempt, reason=reason)

    def request_reindex(self, ctx: CommandContext) -> None:
        if self.extraction["status"] in (ExtractionStatus.PENDING, ExtractionStatus.RUNNING):
            raise DomainError(f"extraction of {self.id} is already {self.extraction['status']}")
        self._trigger(self.ReindexRequested, ctx)

    def state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "extraction": self.extraction,
            "loan_number": self.loan_number,
            "collateral_id": self.collateral_id,
            "valuation_id": self.valuation_id,
            "doc_type": self.doc_type,
            "original_filename": self.original_filename,
            "media_type": self.media_type,
            "size": self.size,
            "sha256": self.sha256,
            "object_key": self.object_key,
            "object_version": self.object_version,
            "retain_until": self.retain_until,
            "legal_hold": self.legal_hold,
            "supersedes": self.supersedes,
            "superseded_by": self.superseded_by,
            "uploaded_by": self.uploaded_by,
            "uploaded_at": self.uploaded_at,
            "downloads": self.downloads,
            "last_fixity": self.last_fixity,
        }


class LoanDocuments(ArchiveAggregate):
    """The documents filed under one loan number, by SHA-256."""

    class Started(ArchiveAggregate.Created):
        loan_number: str

        def apply(self, index: LoanDocuments) -> None:
            index.loan_number = self.loan_number
            index.documents = {}

    class DocumentFiled(ArchiveAggregate.Event):
        document_id: UUID
        sha256: str
        doc_type: str

        def apply(self, index: LoanDocuments) -> None:
            index.documents[str(self.document_id)] = self.sha256

    @classmethod
    def start(cls, ctx: CommandContext, loan_number: str) -> Self:
        return cls._start(cls.Started, ctx, loan_documents_id(loan_number), loan_number=loan_number)

    def file(self, ctx: CommandContext, document_id: UUID, sha256: str, doc_type: str) -> None:
        self._trigger(
            self.DocumentFiled, ctx, document_id=document_id, sha256=sha256, doc_type=doc_type
        )

    def find(self, sha256: str) -> list[UUID]:
        return [UUID(doc) for doc, digest in self.documents.items() if digest == sha256]

    def document_ids(self) -> list[UUID]:
        return [UUID(doc) for doc in self.documents]


class Reconciliation(ArchiveAggregate):
    """One comparison of storage with the log: what is stored but unreferenced, and the reverse."""

    class Completed(ArchiveAggregate.Created):
        orphans: list[str]
        missing: list[dict[str, Any]]
        changed: list[dict[str, Any]]
        temporaries: list[str]
        objects_checked: int
        documents_checked: int

        def apply(self, run: Reconciliation) -> None:
            run.orphans = list(self.orphans)
            run.missing = list(self.missing)
            run.changed = list(self.changed)
            run.temporaries = list(self.temporaries)
            run.objects_checked = self.objects_checked
            run.documents_checked = self.documents_checked

    @classmethod
    def complete(cls, ctx: CommandContext, run_id: UUID, **findings: Any) -> Self:
        return cls._start(cls.Completed, ctx, run_id, **findings)

    @property
    def clean(self) -> bool:
        return not (self.orphans or self.missing or self.changed or self.temporaries)
