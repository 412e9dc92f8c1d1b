"""The application service: one method per command, each one transaction.

Commands load aggregates, check the caller's expected version, let the domain decide,
and save every changed aggregate atomically. Reads rebuild state from events, at the
head or at any past version or moment.
"""

from __future__ import annotations

import getpass
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Any, ClassVar, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    ProcessingEvent,
)
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, JSONTranscoder, Recording, Transcoding
from eventsourcing.utils import get_topic

from archive.blobstore import BlobError, BlobStore, Readable, open_blob_store
from archive.collateral import MortgageRegistration, PropertyLiens, property_id
from archive.documents import (
    ACCEPTED_MEDIA_TYPES,
    SNIFF_BYTES,
    Document,
    DocumentType,
    FixityOutcome,
    LoanDocuments,
    Reconciliation,
    loan_documents_id,
    sniff_media_type,
)
from archive.domain import ArchiveAggregate, CommandContext, Role, choice
from archive.eventlog import (
    creating_tables,
    protect_events_table,
    select_with_positions,
    snapshot_events,
    snapshotted_ids,
)
from archive.exceptions import (
    ArchiveError,
    AuthenticationError,
    ConflictError,
    DomainError,
    NotFoundError,
)
from archive.integrity import (
    Breach,
    ChainReport,
    iter_log,
    verify_aggregate,
    verify_events,
    verify_store,
)
from archive.loans import LoanFile, loan_id
from archive.settings import Settings
from archive.users import AccessToken, User, new_token, token_digest, token_id, user_id
from archive.valuations import Valuation

SNAPSHOT_SKIP = frozenset({"_id", "_version", "_pending_events"})


def replay(aggregate: Any, events: Iterable[Any]) -> Any:
    """Apply stored events in order (the library's projector, minus a per-event
    isinstance assert that costs more than decoding the event)."""
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


def replay_until(aggregate: Any, events: Iterable[Any], as_of: datetime) -> Any:
    """Apply stored events in order, up to the last one at or before ``as_of``."""
    for event in events:
        if event.timestamp > as_of:
            break
        aggregate = event.mutate(aggregate)
    return aggregate


class AggregateCache:
    """The last committed state of recently used aggregates, shared by this process's threads.

    Entries are never changed in place and never handed out (callers get clones), so a
    thread cannot see another's uncommitted change, and a failed command leaves nothing to
    undo. An entry only gives way to a later version of the same aggregate."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[UUID, ArchiveAggregate] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, aggregate_id: UUID) -> ArchiveAggregate | None:
        with self._lock:
            aggregate = self._entries.get(aggregate_id)
            if aggregate is not None:
                self._entries.move_to_end(aggregate_id)
            return aggregate

    def put(self, aggregate: ArchiveAggregate) -> None:
        with self._lock:
            held = self._entries.get(aggregate.id)
            if held is not None and held.version >= aggregate.version:
                return
            self._entries[aggregate.id] = aggregate
            self._entries.move_to_end(aggregate.id)
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


class UnsupportedMediaTypeError(ArchiveError):
    status = 415
    title = "Unsupported media type"


class PrefixedReader:
    """A stream whose first bytes were already read (to sniff them), put back in front.
    Read once, front to back: stores never rewind their source."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self.head = head
        self.rest = rest
        self.offset = 0

    def read(self, size: int = -1, /) -> bytes:
        if self.offset < len(self.head):
            end = len(self.head) if size is None or size < 0 else self.offset + size
            data = self.head[self.offset : end]
            self.offset += len(data)
            return data
        return self.rest.read(size)


@dataclass(frozen=True)
class FixityResult:
    document_id: UUID
    loan_number: str
    outcome: FixityOutcome
    expected_sha256: str
    observed_sha256: str | None


@dataclass(frozen=True)
class ReconcileReport:
    run_id: UUID
    orphans: list[str] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.orphans or self.missing or self.changed or self.temporaries)


class StaleVersionError(ConflictError):
    """The caller's expected version is not the current one."""

    def __init__(self, what: str, current: int, expected: int) -> None:
        super().__init__(f"{what} is at version {current}, not {expected}: reload and retry")
        self.current = current


@dataclass(frozen=True)
class Outcome:
    """What a command returns: the aggregate it changed, its new version, the log position."""

    id: UUID
    version: int
    position: int


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: Role

    def context(
        self, reason: str | None = None, correlation_id: str | None = None
    ) -> CommandContext:
        if correlation_id:
            return CommandContext(self.name, self.role.value, reason, correlation_id)
        return CommandContext(self.name, self.role.value, reason)


def operator_context(reason: str | None = None) -> CommandContext:
    """The local operator running an administrative CLI command on the server itself."""
    return CommandContext(f"operator:{getpass.getuser()}", Role.ADMIN.value, reason)


T = TypeVar("T", bound=ArchiveAggregate)
R = TypeVar("R")


SNAPSHOT_EVERY = 100
AGGREGATE_CACHE_SIZE = 2000
MAX_VERSION = 2**63 - 1  # the largest integer either database stores
AS_OF_SKEW = timedelta(minutes=5)
"""How far ahead of this server's clock an ``as_of`` may be (the caller's clock may run
fast): a later moment has not happened, and answering the head labelled with it would
claim a state nobody can know yet."""
FILING_ATTEMPTS = 20  # see register_document


def check_past(version: int | None, as_of: datetime | None) -> None:
    """Refuse a past that cannot be read: both a version and a moment, a moment without a
    time zone, one with no UTC form, or one in the future (beyond ``AS_OF_SKEW``)."""
    if as_of is None:
        return
    if version is not None:
        raise DomainError("give either a version or a moment, not both")
    if as_of.tzinfo is None:
        raise DomainError("a moment in the past needs a time zone, e.g. 2026-01-31T12:00:00Z")
    try:  # compared with UTC event times and echoed in UTC: it must have a UTC form
        as_of.astimezone(UTC)
    except OverflowError:
        raise DomainError(f"as_of falls outside the calendar in UTC: {as_of}") from None
    now = datetime.now(UTC)
    if as_of > now + AS_OF_SKEW:
        raise DomainError(
            f"as_of {as_of.isoformat()} is in the future (now is "
            f"{now.isoformat(timespec='seconds')}); leave it out for the current state"
        )


class ArchiveApp(Application[UUID]):
    name = "Archive"
    # Long-lived files (twenty years of monthly repayments) replay from a snapshot.
    snapshotting_intervals: ClassVar[dict[type[Aggregate], int]] = {
        cls: SNAPSHOT_EVERY
        for cls in (LoanFile, MortgageRegistration, Valuation, Document, LoanDocuments)
    }
    snapshotting_projectors: ClassVar[dict[type[Aggregate], Any]] = {
        cls: replay for cls in snapshotting_intervals
    }

    def __init__(self, settings: Settings, *, create_tables: bool = True) -> None:
        """``create_tables=False`` opens a log another process has set up (a rebuild's
        child processes): no DDL, and no turn to wait for (``creating_tables``)."""
        self.settings = settings
        # Replay is paid once per aggregate and process, not per command (see _load).
        self.cache = AggregateCache(AGGREGATE_CACHE_SIZE)
        env = settings.eventsourcing_env()
        if not create_tables:
            super().__init__(env={**env, "CREATE_TABLE": "no"})
            return
        with creating_tables(settings.database_url if settings.backend == "postgres" else None):
            super().__init__(env=env)
            protect_events_table(self.recorder)

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        """The library's ``save``, minus its runtime Protocol checks for our own aggregates.

        ``ProcessingEvent.collect_events`` asks ``isinstance`` of two typing Protocols for
        every object; on Python 3.11 that walks the protocols' attributes on each call,
        about 20 µs of a 300 µs append. An ``ArchiveAggregate`` is known to be an aggregate
        that collects events, so its events are collected directly; the rest (record,
        snapshots, notifications) is the library's own, in its order. Anything else takes
        the library's path unchanged."""
        if not all(isinstance(obj, ArchiveAggregate) for obj in objs):
            return super().save(*objs, **kwargs)
        processing = ProcessingEvent[UUID]()
        for aggregate in objs:
            processing.events.extend(aggregate.collect_events())
            processing.aggregates[aggregate.id] = aggregate
        processing.saved_kwargs.update(kwargs)
        recordings = self._record(processing)
        self._take_snapshots(processing)
        self._notify(recordings)
        self.notify(processing.events)  # the library's deprecated hook, called as it does
        return recordings

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())

    # -- plumbing -----------------------------------------------------------------------

    def _load(
        self,
        cls: type[T],
        aggregate_id: UUID,
        what: str,
        version: int | None = None,
        *,
        fresh: bool = True,
    ) -> T:
        """A private copy of the aggregate at its head, or at ``version`` (404 beyond the
        head, 422 below 1).

        The head comes from the cache, brought up to date with any newer events in the
        store, so reads see other processes' writes. ``fresh=False`` skips that read and
        is only for an aggregate the command saves: if another process wrote it first,
        the insert of the next version conflicts (see ``_attempt``)."""
        if version is not None:
            return self._load_version(cls, aggregate_id, what, version)
        cached = self.cache.get(aggregate_id)
        if cached is None:
            try:
                head = self.repository.get(aggregate_id, projector_func=replay)
            except AggregateNotFoundError:
                raise NotFoundError(f"{what} not found") from None
        elif fresh:
            newer = list(self.repository.event_store.get(aggregate_id, gt=cached.version))
            head = replay(cached.clone(), newer) if newer else cached
        else:
            head = cached
        if not isinstance(head, cls):
            raise NotFoundError(f"{what} not found")
        if head is not cached:
            self.cache.put(head)
        return head.clone()

    def _load_version(self, cls: type[T], aggregate_id: UUID, what: str, version: int) -> T:
        """The aggregate at ``version``: from the snapshot at or below it, then its events."""
        if version < 1:
            raise DomainError("version must be 1 or more")
        upto = min(version, MAX_VERSION)  # a larger number is no version, nor a query parameter
        try:
            aggregate = self.repository.get(aggregate_id, version=upto, projector_func=replay)
        except AggregateNotFoundError:
            raise NotFoundError(f"{what} not found") from None
        if not isinstance(aggregate, cls):
            raise NotFoundError(f"{what} not found")
        if aggregate.version < version:  # the events ran out: that is the head
            raise NotFoundError(f"{what} has no version {version} (head is {aggregate.version})")
        return aggregate

    @staticmethod
    def _attempt(command: Callable[[bool], R]) -> R:
        """Run a command on cached aggregates (``fresh=False``: no read before the write);
        if it fails, run it once more on aggregates read fresh from the store.

        A stale cache can only make the first run fail, never succeed wrongly: its insert
        conflicts with the newer version another process wrote. Its refusals (a stale
        expected version, a transition the old state forbade) are not trusted either: the
        fresh run decides, on the state any command arriving now would see."""
        try:
            return command(False)
        except ArchiveError:
            return command(True)

    @staticmethod
    def _retried(command: Callable[[], R], attempts: int) -> R:
        """Run ``command`` again, on state it reads afresh, while a concurrent write makes
        its append conflict (at most ``attempts`` runs): for commands whose outcome does
        not depend on what the other writer changed."""
        for attempt in range(attempts):
            try:
                return command()
            except ConflictError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _commit(
        self, *aggregates: ArchiveAggregate, duplicate: str | None = None, handover: bool = False
    ) -> int:
        """Save, then cache the saved state as each aggregate's head.

        The cache gets a clone, since callers may go on changing theirs; a caller that
        only reads its aggregate's id and version afterwards hands it over
        (``handover=True``), which saves a copy on the commands' hot path."""
        try:
            recordings = self.save(*aggregates)
        except IntegrityError:
            raise ConflictError(
                duplicate or "a concurrent change was saved first: reload and retry"
            ) from None
        for aggregate in aggregates:
            self.cache.put(aggregate if handover else aggregate.clone())
        return recordings[-1].notification.id

    @staticmethod
    def _expect(aggregate: Aggregate, expected_version: int | None, what: str) -> None:
        if expected_version is not None and aggregate.version != expected_version:
            raise StaleVersionError(what, aggregate.version, expected_version)

    def _update(
        self,
        cls: type[T],
        aggregate_id: UUID,
        what: str,
        expected_version: int | None,
        change: Any,
    ) -> Outcome:
        def attempt(fresh: bool) -> Outcome:
            aggregate = self._load(cls, aggregate_id, what, fresh=fresh)
            self._expect(aggregate, expected_version, what)
            change(aggregate)
            position = self._commit(aggregate, handover=True)
            return Outcome(aggregate.id, aggregate.version, position)

        return self._attempt(attempt)

    # -- loan files ---------------------------------------------------------------------

    def open_loan(self, ctx: CommandContext, **terms: Any) -> Outcome:
        loan = LoanFile.open(ctx, **terms)
        position = self._commit(
            loan, duplicate=f"loan number {loan.loan_number} already exists", handover=True
        )
        return Outcome(loan.id, loan.version, position)

    def get_loan(self, loan_number: str, version: int | None = None) -> LoanFile:
        return self._load(LoanFile, loan_id(loan_number), f"loan {loan_number}", version)

    def has_loan(self, loan_number: str) -> bool:
        return loan_id(loan_number) in self.repository

    def change_loan(
        self, ctx: CommandContext, loan_number: str, expected_version: int | None, change: Any
    ) -> Outcome:
        """Apply one LoanFile command (a callable taking the loan) under optimistic locking."""
        return self._update(
            LoanFile, loan_id(loan_number), f"loan {loan_number}", expected_version, change
        )

    # -- collateral -----------------------------------------------------------------------

    def register_collateral(self, ctx: CommandContext, **fields: Any) -> Outcome:
        number = fields["loan_number"]

        def attempt(fresh: bool) -> Outcome:
            loan = self._load(LoanFile, loan_id(number), f"loan {number}", fresh=fresh)
            registration = MortgageRegistration.file(ctx, uuid4(), **fields)
            ref = registration.cadastral_reference
            try:
                prop = self._load(PropertyLiens, property_id(ref), "property", fresh=fresh)
            except NotFoundError:
                prop = PropertyLiens.index(ctx, ref)
            others = prop.add_lien(ctx, registration.id, loan.loan_number, registration.lien_rank)
            if others:
                registration.flag_repeated_mortgage(ctx, others)
            loan.link_collateral(ctx, registration.id)
            position = self._commit(registration, prop, loan)
            return Outcome(registration.id, registration.version, position)

        return self._attempt(attempt)

    def get_collateral(
        self, registration_id: UUID, version: int | None = None, as_of: datetime | None = None
    ) -> MortgageRegistration:
        return self._load_past(
            MortgageRegistration, registration_id, f"collateral {registration_id}", version, as_of
        )

    def change_collateral(
        self, ctx: CommandContext, registration_id: UUID, expected_version: int | None, change: Any
    ) -> Outcome:
        return self._update(
            MortgageRegistration,
            registration_id,
            f"collateral {registration_id}",
            expected_version,
            change,
        )

    def release_collateral(
        self,
        ctx: CommandContext,
        registration_id: UUID,
        expected_version: int | None,
        released_on: date | str,
    ) -> Outcome:
        what = f"collateral {registration_id}"

        def attempt(fresh: bool) -> Outcome:
            registration = self._load(MortgageRegistration, registration_id, what, fresh=fresh)
            self._expect(registration, expected_version, what)
            registration.release(ctx, released_on)
            ref = registration.cadastral_reference
            prop = self._load(PropertyLiens, property_id(ref), "property", fresh=fresh)
            prop.release_lien(ctx, registration.id)
            position = self._commit(registration, prop)
            return Outcome(registration.id, registration.version, position)

        return self._attempt(attempt)

    # -- valuations -------------------------------------------------------------------------

    def appraise(
        self, ctx: CommandContext, supersedes: UUID | None = None, **fields: Any
    ) -> Outcome:
        number = fields["loan_number"]
        collateral_id = fields.get("collateral_id")

        def attempt(fresh: bool) -> Outcome:
            loan = self._load(LoanFile, loan_id(number), f"loan {number}", fresh=fresh)
            if collateral_id is not None:  # read, not saved: always fresh
                collateral = self.get_collateral(collateral_id)
                if collateral.loan_number != loan.loan_number:
                    raise DomainError(f"collateral {collateral_id} secures another loan")
            valuation = Valuation.appraise(ctx, uuid4(), **fields)
            changed: list[ArchiveAggregate] = [valuation, loan]
            if supersedes is not None:
                what = f"valuation {supersedes}"
                old = self._load(Valuation, supersedes, what, fresh=fresh)
                if old.loan_number != loan.loan_number:
                    raise DomainError(f"valuation {supersedes} belongs to another loan")
                old.supersede(ctx, valuation.id)
                changed.append(old)
            loan.link_valuation(ctx, valuation.id)
            position = self._commit(*changed)
            return Outcome(valuation.id, valuation.version, position)

        return self._attempt(attempt)

    def get_valuation(
        self, valuation_id: UUID, version: int | None = None, as_of: datetime | None = None
    ) -> Valuation:
        return self._load_past(Valuation, valuation_id, f"valuation {valuation_id}", version, as_of)

    def change_valuation(
        self, ctx: CommandContext, valuation_id: UUID, expected_version: int | None, change: Any
    ) -> Outcome:
        return self._update(
            Valuation, valuation_id, f"valuation {valuation_id}", expected_version, change
        )

    def review_valuation(
        self,
        ctx: CommandContext,
        valuation_id: UUID,
        expected_version: int | None,
        reviewer: str,
        reviewed_value: Decimal | str,
        notes: str | None = None,
    ) -> Outcome:
        margin = self.settings.overvaluation_margin
        return self.change_valuation(
            ctx,
            valuation_id,
            expected_version,
            lambda v: v.review_value(ctx, reviewer, reviewed_value, margin, notes),
        )

    # -- documents ----------------------------------------------------------------------------

    @cached_property
    def blobs(self) -> BlobStore:
        return open_blob_store(self.settings)

    def register_document(
        self,
        ctx: CommandContext,
        source: Readable,
        *,
        loan_number: str,
        doc_type: str,
        original_filename: str | None,
        collateral_id: UUID | None = None,
        valuation_id: UUID | None = None,
        supersedes: UUID | None = None,
        expected_sha256: str | None = None,
    ) -> Outcome:
        """Store an original (verified, content-addressed), then append the event naming it.

        Metadata is checked before a byte is stored; the object is written and verified
        before the event is appended, so a crash leaves at worst an orphan object.
        """
        loan = self.get_loan(loan_number)
        kind = choice(DocumentType, doc_type, "document type")
        if (
            collateral_id is not None
            and self.get_collateral(collateral_id).loan_number != loan_number
        ):
            raise DomainError(f"collateral {collateral_id} secures another loan")
        if valuation_id is not None and self.get_valuation(valuation_id).loan_number != loan_number:
            raise DomainError(f"valuation {valuation_id} belongs to another loan")
        if supersedes is not None:
            self._supersedable(supersedes, loan_number)
        head = source.read(SNIFF_BYTES)
        if not head:
            raise DomainError("the file is empty")
        media_type = sniff_media_type(head)
        if media_type not in ACCEPTED_MEDIA_TYPES:
            raise UnsupportedMediaTypeError(
                f"received {media_type}; originals must be PDF, TIFF, PNG or JPEG"
            )
        blob = self.blobs.put(
            PrefixedReader(head, source),
            expected_sha256=expected_sha256,
            limit=self.settings.max_upload_bytes,
        )
        self.blobs.checkpoint("stored")
        document_id = uuid4()

        # The original is stored now; a concurrent upload to the same loan (or a custody
        # event on the superseded document) only moved the index on, so filing is retried
        # on fresh state rather than answered 409, which would make the client send the
        # whole file again and leave this copy an orphan. Each conflict means another
        # filing succeeded, so the attempts bound the uploads racing on one loan.
        def file() -> Outcome:
            old = None if supersedes is None else self._supersedable(supersedes, loan_number)
            document = Document.register(
                ctx,
                document_id,
                loan_number=loan.loan_number,
                collateral_id=collateral_id,
                valuation_id=valuation_id,
                doc_type=kind.value,
                original_filename=original_filename,
                media_type=media_type,
                size=blob.size,
                sha256=blob.sha256,
                object_key=blob.key,
                object_version=blob.version_id,
                retain_until=blob.retain_until,
                supersedes=supersedes,
            )
            index = self.loan_documents(loan_number) or LoanDocuments.start(ctx, loan_number)
            index.file(ctx, document.id, blob.sha256, kind.value)
            changed: list[Aggregate] = [document, index]
            if old is not None:
                old.supersede(ctx, document.id)
                changed.append(old)
            position = self._commit(*changed)
            return Outcome(document.id, document.version, position)

        return self._retried(file, FILING_ATTEMPTS)

    def _supersedable(self, document_id: UUID, loan_number: str) -> Document:
        """The document a new upload supersedes, if it may (same loan, not superseded yet)."""
        old = self.get_document(document_id)
        if old.loan_number != loan_number:
            raise DomainError(f"document {document_id} belongs to another loan")
        if old.superseded_by is not None:
            raise DomainError(
                f"document {document_id} is already superseded by {old.superseded_by}"
            )
        return old

    def loan_documents(self, loan_number: str) -> LoanDocuments | None:
        try:
            return self._load(LoanDocuments, loan_documents_id(loan_number), "documents")
        except NotFoundError:
            return None

    def get_document(
        self, document_id: UUID, version: int | None = None, as_of: datetime | None = None
    ) -> Document:
        return self._load_past(Document, document_id, f"document {document_id}", version, as_of)

    def change_document(
        self, ctx: CommandContext, document_id: UUID, change: Any, attempts: int = 5
    ) -> Outcome:
        """Record a custody event (download, hold, fixity): retried on a concurrent write,
        since these never depend on what the document's other events say."""
        return self._retried(
            lambda: self._update(Document, document_id, f"document {document_id}", None, change),
            attempts,
        )

    def claim_extraction(self, ctx: CommandContext, document: Document, worker: str) -> int:
        """Claim a document's extraction at the version just read; returns the attempt.
        Of racing workers exactly one wins; the others get a ConflictError."""
        attempt = document.start_extraction(ctx, worker)
        self._commit(document)
        return attempt

    def request_reindex(self, ctx: CommandContext, document_id: UUID) -> Outcome:
        return self.change_document(ctx, document_id, lambda d: d.request_reindex(ctx))

    def open_original(
        self, ctx: CommandContext, document: Document, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Record the download (who, when, which bytes), then stream the original of a
        document from ``stored_document`` (whose check of the object stands)."""
        byte_range = (
            None if (start == 0 and end is None) else f"{start}-{'' if end is None else end}"
        )
        self.change_document(ctx, document.id, lambda d: d.record_download(ctx, byte_range))
        return self.original_bytes(document, start, end)

    def stored_document(self, document_id: UUID) -> Document:
        """The document, once its original is known to be in storage (else BlobError)."""
        document = self.get_document(document_id)
        if self.blobs.stat(document.object_key, document.object_version) is None:
            raise BlobError(f"the original of document {document_id} is missing from storage")
        return document

    def original_bytes(
        self, document: Document, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """The original's bytes, unrecorded (fixity, extraction): the object version the
        DocumentRegistered event names, whatever was PUT or deleted over the key since."""
        return self.blobs.open(document.object_key, start, end, document.object_version)

    def set_legal_hold(
        self, ctx: CommandContext, document_id: UUID, on: bool, attempts: int = 5
    ) -> Outcome:
        """Place or release a legal hold: in storage first (a hold recorded but not in
        force would be false), then the event. A custody event saved meanwhile (a
        download of the document) is no reason to refuse: storage already says what the
        event will, so the event is appended again on the fresh document, as
        ``change_document`` does (a 409 here left storage and the record disagreeing)."""

        def hold() -> Outcome:
            document = self.get_document(document_id)
            if on:
                document.place_legal_hold(ctx)
            else:
                document.release_legal_hold(ctx)
            if on or not self._held_elsewhere(document):
                self.blobs.set_legal_hold(document.object_key, on, document.object_version)
            position = self._commit(document)
            return Outcome(document.id, document.version, position)

        return self._retried(hold, attempts)

    def _held_elsewhere(self, document: Document) -> bool:
        """Whether another document over the same stored original (same bytes, uploaded
        again or under another loan: one object version) is still under legal hold; the
        storage hold is theirs together, so releasing one must not lift it. Holds are
        few: the documents that ever had one are read, not every document."""
        where = (document.object_key, document.object_version)
        seen = {document.id}
        for _, stored in iter_log(self.recorder, topics=[get_topic(Document.LegalHoldPlaced)]):
            if stored.originator_id in seen:
                continue
            seen.add(stored.originator_id)
            other = self.get_document(stored.originator_id)
            if other.legal_hold and (other.object_key, other.object_version) == where:
                return True
        return False

    def document_ids(self) -> Iterator[UUID]:
        """Every document ever registered, in order of registration."""
        for _, stored in iter_log(self.recorder, topics=[get_topic(Document.Registered)]):
            yield stored.originator_id

    def check_fixity(self, ctx: CommandContext) -> list[FixityResult]:
        """Re-read every original, recompute its SHA-256, record the outcome per document."""
        results = []
        for document_id in self.document_ids():
            document = self.get_document(document_id)
            try:
                observed, size = self.blobs.digest(document.object_key, document.object_version)
            except BlobError:
                observed, size = None, None
            if observed is None:
                outcome = FixityOutcome.MISSING
            elif observed == document.sha256 and size == document.size:
                outcome = FixityOutcome.OK
            else:
                outcome = FixityOutcome.CHANGED
            self.change_document(
                ctx,
                document_id,
                lambda d, o=outcome, h=observed, n=size: d.record_fixity(ctx, o, h, n),
            )
            results.append(
                FixityResult(document_id, document.loan_number, outcome, document.sha256, observed)
            )
        return results

    def reconcile(self, ctx: CommandContext) -> ReconcileReport:
        """Compare storage with the log; record what was found as an event.

        Each document's bytes are read at the object version its event names (a delete
        marker or a newer version over the key does not hide or replace the original)."""
        referenced: dict[tuple[str, str | None], list[Document]] = {}
        documents = 0
        for document_id in self.document_ids():
            document = self.get_document(document_id)
            where = (document.object_key, document.object_version)
            referenced.setdefault(where, []).append(document)
            documents += 1
        stored = set(self.blobs.keys())
        missing: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        for (key, version), docs in referenced.items():
            expected = docs[0].sha256
            names = [
                {"document_id": d.id, "loan_number": d.loan_number, "object_key": key} for d in docs
            ]
            try:
                observed, _ = self.blobs.digest(key, version)
            except BlobError:
                missing.extend(names)
                continue
            if observed != expected:
                changed.extend({**n, "observed_sha256": observed} for n in names)
        report = ReconcileReport(
            uuid4(),
            orphans=sorted(stored - {key for key, _ in referenced}),
            missing=missing,
            changed=changed,
            temporaries=sorted(self.blobs.temporary_keys()),
        )
        run = Reconciliation.complete(
            ctx,
            report.run_id,
            orphans=report.orphans,
            missing=report.missing,
            changed=report.changed,
            temporaries=report.temporaries,
            objects_checked=len(stored),
            documents_checked=documents,
        )
        self._commit(run)
        return report

    # -- reading the past -------------------------------------------------------------------

    def _filed_under(self, loan: LoanFile) -> list[UUID]:
        ids = [loan.id, *loan.collateral_ids, *loan.valuation_ids]
        index = self.loan_documents(loan.loan_number)
        if index is not None:
            ids += [index.id, *index.document_ids()]
        return ids

    def loan_events(self, loan_number: str) -> list[tuple[int, Any]]:
        """Every event of the loan and of its collateral, valuations and documents, and the
        lien events of its properties that concern its registrations, by position.

        A property's lien index (``PropertyLiens``) is shared by every loan it secures: of
        its events, only the lien added for one of this loan's registrations and that
        lien's release belong to the loan, as the audit trail attributes them (a
        ``LienAdded`` by the loan number it names, a ``LienReleased`` by its registration's
        loan). The property's indexing and other loans' liens are not this loan's."""
        loan = self.get_loan(loan_number)
        ids = self._filed_under(loan)
        registrations = set(loan.collateral_ids)
        properties = self._properties_of(loan)
        events = []
        for n in select_with_positions(self.recorder, [*ids, *properties]):
            event = self.mapper.to_domain_event(n)
            if n.originator_id in properties and not self._lien_of(
                event, loan.loan_number, registrations
            ):
                continue
            events.append((n.id, event))
        return events

    def _properties_of(self, loan: LoanFile, *, strict: bool = True) -> set[UUID]:
        """The lien indexes (``PropertyLiens``) of the properties the loan's registrations
        are on. A registration's property never changes: the cached head names it. Not
        ``strict``, a registration that cannot be read is passed over (verifying its own
        chain names why)."""
        found = set()
        for i in loan.collateral_ids:
            try:
                registration = self._load(MortgageRegistration, i, f"collateral {i}", fresh=False)
            except Exception:
                if strict:
                    raise
                continue
            found.add(property_id(registration.cadastral_reference))
        return found

    @staticmethod
    def _lien_of(event: Any, loan_number: str, registrations: set[UUID]) -> bool:
        """Whether a property's event concerns this loan (as the audit trail decides)."""
        if isinstance(event, PropertyLiens.LienAdded):
            return event.loan_number == loan_number
        if isinstance(event, PropertyLiens.LienReleased):
            return event.registration_id in registrations
        return False

    def snapshots_around(
        self, aggregate_ids: Sequence[UUID], as_of: datetime
    ) -> dict[UUID, tuple[int | None, int | None]]:
        """For each aggregate with snapshots: the version of its latest snapshot taken at
        or before ``as_of`` and of the first one taken after it (either may be None).

        Picked by the timestamps of the events the snapshots were taken at, which are
        small, in one query: no snapshot (each the whole state) is decoded in vain."""
        around: dict[UUID, tuple[int | None, int | None]] = {}
        if self.snapshots is None:
            return around
        for stored in snapshot_events(self.recorder, self.snapshots.recorder, aggregate_ids):
            base, after = around.get(stored.originator_id, (None, None))
            if after is None:
                if self.mapper.to_domain_event(stored).timestamp <= as_of:
                    base = stored.originator_version
                else:
                    after = stored.originator_version
                around[stored.originator_id] = (base, after)
        return around

    def states_at(self, aggregate_ids: Sequence[UUID], as_of: datetime) -> list[Any | None]:
        """Aggregates as they were at ``as_of`` (None for one that did not exist yet).

        Each from its latest snapshot at or before the moment, then its events up to the
        moment, none past its next snapshot. Aggregates without snapshots (under a
        hundred events each) are read together: few round trips for a whole loan file."""
        around = self.snapshots_around(aggregate_ids, as_of)
        states: dict[UUID, Any | None] = {}
        for aggregate_id, (base, after) in around.items():
            aggregate = None
            if base is not None:
                assert self.snapshots is not None
                (snapshot,) = self.snapshots.get(aggregate_id, gt=base - 1, lte=base)
                aggregate = snapshot.mutate(None)
            events = self.repository.event_store.get(aggregate_id, gt=base, lte=after)
            states[aggregate_id] = replay_until(aggregate, events, as_of)
        rest = [i for i in aggregate_ids if i not in around]
        events_of: dict[UUID, list[Any]] = {i: [] for i in rest}
        for stored in select_with_positions(self.recorder, rest):
            events_of[stored.originator_id].append(self.mapper.to_domain_event(stored))
        for aggregate_id, events in events_of.items():
            states[aggregate_id] = replay_until(None, events, as_of)
        return [states[i] for i in aggregate_ids]

    def state_at(self, aggregate_id: UUID, as_of: datetime) -> Any | None:
        """An aggregate as it was at ``as_of`` (None if it did not exist yet)."""
        return self.states_at([aggregate_id], as_of)[0]

    def _load_past(
        self,
        cls: type[T],
        aggregate_id: UUID,
        what: str,
        version: int | None,
        as_of: datetime | None,
    ) -> T:
        """``_load`` now or at ``version``, or the aggregate as it was at ``as_of`` (404
        for one that did not exist yet)."""
        check_past(version, as_of)
        if as_of is None:
            return self._load(cls, aggregate_id, what, version)
        found = self.state_at(aggregate_id, as_of)
        if not isinstance(found, cls):
            self._load(cls, aggregate_id, what)  # 404 for one that never existed
            raise NotFoundError(f"{what} did not exist at {as_of.isoformat()}")
        return found

    def loan_file(
        self, loan_number: str, *, version: int | None = None, as_of: datetime | None = None
    ) -> dict[str, Any]:
        """The loan file with its collateral, valuations and documents, now or in the past.

        Always rebuilt from the event log (and its snapshots), never from a read model:
        this is what an auditor compares the views against.
        """
        check_past(version, as_of)
        if version is None and as_of is None:
            loan: Any = self.get_loan(loan_number)
            index = self.loan_documents(loan_number)

            def heads(ids: Sequence[UUID]) -> list[Any]:
                return [self._load(ArchiveAggregate, i, f"aggregate {i}") for i in ids]

            collateral, valuations = heads(loan.collateral_ids), heads(loan.valuation_ids)
            documents = [] if index is None else heads(index.document_ids())
        else:
            if version is not None:  # the loan at that version; the rest as of its moment
                loan = self.get_loan(loan_number, version=version)
                as_of = loan.modified_on
            else:
                assert as_of is not None
                loan = self.state_at(loan_id(loan_number), as_of)
                if loan is None:
                    self.get_loan(loan_number)  # 404 for a loan that never existed
                    raise NotFoundError(f"loan {loan_number} did not exist at {as_of.isoformat()}")
            index, *linked = self.states_at(
                [loan_documents_id(loan_number), *loan.collateral_ids, *loan.valuation_ids],
                as_of,
            )
            collateral = linked[: len(loan.collateral_ids)]
            valuations = linked[len(loan.collateral_ids) :]
            documents = [] if index is None else self.states_at(index.document_ids(), as_of)
        result = loan.state()
        result["collateral"] = [c.state() for c in collateral]
        result["valuations"] = [v.state() for v in valuations]
        result["documents"] = [d.state() for d in documents]
        result["as_of"] = as_of
        return result

    # -- users and tokens -------------------------------------------------------------------

    def add_user(self, ctx: CommandContext, name: str, role: str) -> str:
        """Register a user and return a new bearer token (shown once, stored hashed)."""
        user = User.register(ctx, name, role)
        if user.id in self.repository:
            raise ConflictError(f"user {name} already exists")
        token = new_token()
        grant = AccessToken.issue(ctx, name, token_digest(token))
        self._commit(user, grant, duplicate=f"user {name} already exists")
        return token

    def get_user(self, name: str) -> User:
        return self._load(User, user_id(name), f"user {name}")

    def issue_token(self, ctx: CommandContext, name: str) -> str:
        user = self.get_user(name)
        if not user.active:
            raise DomainError(f"user {name} is deactivated")
        token = new_token()
        self._commit(AccessToken.issue(ctx, name, token_digest(token)))
        return token

    def revoke_token(self, ctx: CommandContext, token: str, user: str | None = None) -> None:
        """Revoke one bearer token (a leaked one): the user and their other tokens keep
        working. Given ``user``, a token of someone else is not found, as an unknown one."""
        grant = self._load(AccessToken, token_id(token_digest(token)), "token")
        if user is not None and grant.user_name != user:
            raise NotFoundError(f"user {user} has no such token")
        grant.revoke(ctx)
        self._commit(grant)

    def change_user(self, ctx: CommandContext, name: str, change: Any) -> None:
        user = self.get_user(name)
        change(user)
        self._commit(user)

    def authenticate(self, token: str) -> Principal:
        try:
            grant = self._load(AccessToken, token_id(token_digest(token)), "token")
            user = self.get_user(grant.user_name)
        except NotFoundError:
            raise AuthenticationError("unknown bearer token") from None
        if grant.revoked:
            raise AuthenticationError("this bearer token was revoked")
        if not user.active:
            raise AuthenticationError(f"user {user.name} is deactivated")
        return Principal(user.name, Role(user.role))

    # -- integrity --------------------------------------------------------------------------

    def verify_chain(self) -> ChainReport:
        """Verify every event's chain, then every snapshot against the events it summarises."""
        report = verify_store(self.recorder, self.mapper)
        if report.breach is not None or self.snapshots is None:
            return report
        for aggregate_id in snapshotted_ids(self.snapshots.recorder):
            replayed, upto = None, 0  # one pass over the events, checked at each snapshot
            for snapshot in self.snapshots.get(aggregate_id):
                later = self.repository.event_store.get(
                    aggregate_id, gt=upto, lte=snapshot.originator_version
                )
                replayed, upto = replay(replayed, later), snapshot.originator_version
                state = vars(replayed) if replayed is not None else {}
                expected = {k: v for k, v in state.items() if k not in SNAPSHOT_SKIP}
                if snapshot.state != expected:
                    breach = Breach(
                        aggregate_id,
                        snapshot.originator_version,
                        None,
                        "snapshot does not match the events it summarises",
                    )
                    return ChainReport(report.events_checked, report.aggregates_checked, breach)
        return report

    def verify_loan_chain(self, loan_number: str) -> ChainReport:
        try:
            loan = self.get_loan(loan_number)
            # The liens its history shows are in its properties' lien indexes: their
            # whole chains, shared with other loans, are verified too.
            ids = [*self._filed_under(loan), *self._properties_of(loan, strict=False)]
        except NotFoundError:
            raise
        except Exception:  # the loan's own events are unreadable: verify what we can name
            ids = [loan_id(loan_number)]
        return verify_events(
            self.mapper, ((n.id, n) for n in select_with_positions(self.recorder, ids))
        )

    def verify_aggregate_chain(self, aggregate_id: UUID) -> ChainReport:
        return verify_aggregate(self.recorder, self.mapper, aggregate_id)

    def head_position(self) -> int:
        return self.recorder.max_notification_id() or 0
