"""The audit_trail view: one row per event, readable by a person and filterable.

Each row says who did what, when, why, under which request, to which aggregate and
loan, in one human line ("status overdue → non_performing"), with a field-level
diff. The diff is generic: an event's diff is the fields whose value it changes against
the last value of that field in its aggregate's earlier events. Two conventions refine
it: an ``old_x``/``new_x`` pair is the field ``x``, and a few events name the state they
change (``OfficerAssigned`` changes ``<duty>_officer``; a legal hold changes
``legal_hold``). Downloads are rows too: who read which original is part of the audit
trail.

What is stored per event is its metadata (columns, the filters among them: loan, actor,
event type, time) and its own fields: the part of the event store's encoded state after
the metadata, copied as text without decoding or encoding it again (``own_fields``). The summary line and the diff are
derived when rows are read, for the rows asked for, by folding their aggregates' earlier
events (``Narrator``): a rebuild then costs little more per event than copying the log,
and summaries can change without a rebuild. The loan an event concerns is a filter, so
it is resolved when written; ``audit_loans`` keeps, per aggregate, the loan number its
events named last (events that name none, a lien release by its registration, inherit
it).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, ClassVar, NamedTuple

from eventsourcing.persistence import (
    StoredEvent,
)

from archive.domain import ArchiveAggregate
from projections import registry
from projections.encoding import (
    archive_mapper,
    csv_lines,
    dumps,
    event_type,
    id_text,
    inert,
    iso_utc,
    parse_json,
    plain,
    stored_time,
)
from projections.store import Row, Store, Tx
from projections.view import (
    MAX_LIMIT,
    Cache,
    Events,
    Handlers,
    Page,
    Tables,
    View,
    check_page,
    trim,
)

EVENTS = "audit_events"
LOANS = "audit_loans"

#: event attributes that are metadata (columns of the row), never part of the diff
META = frozenset(
    {
        "originator_id",
        "originator_version",
        "originator_topic",
        "timestamp",
        "actor_id",
        "actor_role",
        "reason",
        "correlation_id",
        "prev_hash",
        "event_hash",
    }
)

#: the columns of a row as read (``query``, the exports)
COLUMNS = (
    "position",
    "occurred_at",
    "actor_id",
    "actor_role",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "loan_number",
    "event_type",
    "reason",
    "correlation_id",
    "summary",
    "diff",
    "event_hash",
)


class AuditTrailView(View):
    name: ClassVar[str] = "audit_trail"
    #: 2: audit_fields holds one row per aggregate; 3: summaries of text extraction
    #: events; 4: the event's own fields as stored instead of summary and diff (derived
    #: when read), audit_loans instead of audit_fields, no correlation id index; 5: the
    #: position is the rowid on SQLite
    schema_version: ClassVar[int] = 5
    rebuild_cost: ClassVar[float] = 20.0
    table_names: ClassVar[tuple[str, ...]] = (EVENTS, LOANS)
    handlers: ClassVar[Handlers] = Handlers()
    ddl: ClassVar[tuple[str, ...]] = (
        "CREATE TABLE {audit_events} ("
        " position BIGINT PRIMARY KEY,"
        " occurred_at TEXT NOT NULL,"
        " actor_id TEXT NOT NULL,"
        " actor_role TEXT NOT NULL,"
        " aggregate_id TEXT NOT NULL,"
        " aggregate_version INTEGER NOT NULL,"
        " loan_number TEXT,"
        " event_type TEXT NOT NULL,"
        " reason TEXT,"
        " correlation_id TEXT NOT NULL,"
        " event_hash TEXT NOT NULL,"
        " topic TEXT NOT NULL,"
        " fields TEXT NOT NULL)",
        "CREATE TABLE {audit_loans} (aggregate_id TEXT PRIMARY KEY, loan_number TEXT)",
    )
    indexes: ClassVar[tuple[str, ...]] = (
        "CREATE INDEX {audit_events}_loan ON {audit_events} (loan_number, position)",
        "CREATE INDEX {audit_events}_actor ON {audit_events} (actor_id, position)",
        "CREATE INDEX {audit_events}_type ON {audit_events} (event_type, position)",
        "CREATE INDEX {audit_events}_aggregate ON {audit_events} (aggregate_id, position)",
        "CREATE INDEX {audit_events}_time ON {audit_events} (occurred_at)",
    )

    def create(self, tx: Tx, generation: int) -> None:
        """On SQLite the position is the rowid (``INTEGER PRIMARY KEY``): declared
        ``BIGINT``, it would be an index of its own, written on every insert."""
        tables = self.tables(generation)
        for statement in self.ddl:
            sql = statement.format(**tables)
            if tx.backend == "sqlite":
                sql = sql.replace("position BIGINT PRIMARY KEY", "position INTEGER PRIMARY KEY")
            tx.execute(sql)

    def needs(self, qualname: str) -> bool:
        """None: every row is made from the log's stored form (``apply_batch``)."""
        return False

    def apply(self, tx: Tx, tables: Tables, position: int, event: Any) -> None:
        self.apply_batch(tx, tables, [(position, event)], {})

    def apply_batch(self, tx: Tx, tables: Tables, events: Events, cache: Cache) -> None:
        """Every event gets a row, known type or not: the trail must be complete.

        Rows are made from the events as the log stores them (``events.stored``), not
        from decoded events: the metadata is parsed from the state's JSON, the own
        fields are copied as text, and only events that name a loan have their own
        fields decoded (``Stored``). A rebuild of this view alone decodes nothing.
        Events not from the log (a test, a single event) are encoded first.

        The loan numbers of the batch's aggregates are read in one query (kept across
        batches in a rebuild); the rows and the changed loan numbers are written with
        one statement each."""
        if not events:
            return
        loans: dict[str, Any] = cache.setdefault("loans", {})
        notes = getattr(events, "stored", None)
        if notes is None:
            notes = [archive_mapper().to_stored_event(event) for _, event in events]
        batch = [Stored(note) for note in notes]
        wanted = {s.aggregate_id for s in batch}
        for s in batch:
            if s.kind.liens and s.kind.names_loan and not s.loan_number:
                registration = s.own().get("registration_id")
                if registration is not None:
                    wanted.add(id_text(registration))
        _load_loans(tx, tables, loans, wanted)
        before: dict[str, Any] = {}
        rows = []
        for (position, _), s in zip(events, batch, strict=True):
            kind, aggregate_id = s.kind, s.aggregate_id
            loan_number = s.loan_number
            if not loan_number:
                if kind.liens:
                    registration = s.own().get("registration_id") if kind.names_loan else None
                    loan_number = None if registration is None else loans[id_text(registration)]
                else:
                    loan_number = loans[aggregate_id]
            if kind.loan_field is not None:
                value = s.own().get(kind.loan_field, _ABSENT)
                if value is not _ABSENT:
                    before.setdefault(aggregate_id, loans[aggregate_id])
                    loans[aggregate_id] = plain(value)
            meta = s.meta
            rows.append(
                (
                    position,
                    s.occurred_at,
                    meta.get("actor_id") or "unknown",
                    meta.get("actor_role") or "unknown",
                    aggregate_id,
                    s.note.originator_version,
                    None if loan_number is None or loan_number is _ABSENT else str(loan_number),
                    kind.qualname,
                    meta.get("reason"),
                    meta.get("correlation_id") or "",
                    meta.get("event_hash") or "",
                    s.note.topic,
                    s.fields,
                )
            )
        tx.insert_values(tables[EVENTS], _ROW, rows)
        tx.upsert_rows(
            tables[LOANS],
            "aggregate_id",
            [
                {"aggregate_id": a, "loan_number": loans[a]}
                for a, was in before.items()
                if was is _ABSENT or loans[a] != was
            ],
        )
        trim(loans, CACHE_AGGREGATES)


#: the columns ``apply_batch`` writes, in its rows' order: those read (``COLUMNS``) but the
#: three worked out when read, then the event's topic and its own fields as stored
_ROW = (
    *(c for c in COLUMNS if c not in ("aggregate_type", "summary", "diff")),
    "topic",
    "fields",
)


# -- what an event changes ---------------------------------------------------------------

_UNSEEN = object()
Change = tuple[Any, Any]  # (before, or _UNSEEN to use the last value seen; after)

_STATE_CHANGES: dict[str, Callable[[Any], dict[str, Change]]] = {
    "LoanFile.OfficerAssigned": lambda e: {f"{e.duty}_officer": (e.previous_officer, e.officer)},
    # A download changes nothing: it is recorded for the trail, not as state.
    "Document.Downloaded": lambda e: {},
    "Document.LegalHoldPlaced": lambda e: {"legal_hold": (_UNSEEN, True)},
    "Document.LegalHoldReleased": lambda e: {"legal_hold": (_UNSEEN, False)},
    "User.Deactivated": lambda e: {"active": (_UNSEEN, False)},
    "AccessToken.Revoked": lambda e: {"revoked": (_UNSEEN, True)},
    # The release ends one lien of the property; its id is the summary's, not a new value.
    "PropertyLiens.LienReleased": lambda e: {"live": (True, False)},
}

RECORDS = frozenset(
    {
        "LoanFile.RepaymentRecorded",
        "LoanFile.CollectionActionRecorded",
        "LoanFile.InspectionRecorded",
        "LoanFile.CollateralLinked",
        "LoanFile.ValuationLinked",
        "MortgageRegistration.SiteVerified",
        "PropertyLiens.LienAdded",
        "LoanDocuments.DocumentFiled",
    }
)
"""Events that add an entry to a list (a repayment, a site visit, a lien) rather than set
a field: each field is new, so its before is null. Compared with the previous entry, a
second repayment read as an amendment of the first (amount 10.00 → 5.00), an equal one
as no change at all, and a second loan's lien as the first lien's loan being changed."""


def payload(event: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(event).items() if k not in META}


#: how an event's attributes become fields: (field, attribute, attribute of its old value)
Plan = tuple[tuple[str, str, str | None], ...]


@functools.cache
def _plan(attributes: tuple[str, ...]) -> Plan:
    """The fields of events with these attributes: an ``old_x``/``new_x`` pair is ``x``.
    Cached: it depends on the attribute names only, which an event type keeps."""
    names = [a for a in attributes if a not in META]
    plan: list[tuple[str, str, str | None]] = []
    for name in names:
        if name.startswith("new_") and f"old_{name[4:]}" in names:
            plan.append((name[4:], name, f"old_{name[4:]}"))
        elif not (name.startswith("old_") and f"new_{name[4:]}" in names):
            plan.append((name, name, None))
    return tuple(plan)


def state_changes(event: Any) -> dict[str, Change]:
    """The fields an event sets, as plain JSON values."""
    special = _STATE_CHANGES.get(type(event).__qualname__)
    if special is not None:
        return {
            k: (b if b is _UNSEEN else plain(b), plain(a)) for k, (b, a) in special(event).items()
        }
    fields = vars(event)
    if type(event).__qualname__ in RECORDS:
        return {
            name: (None, plain(fields[attribute])) for name, attribute, _ in _plan(tuple(fields))
        }
    return {
        name: (_UNSEEN if old is None else plain(fields[old]), plain(fields[attribute]))
        for name, attribute, old in _plan(tuple(fields))
    }


# -- one human line per event type ---------------------------------------------------------

Summary = Callable[[Any, dict[str, Any]], str]
_SUMMARIES: dict[str, Summary] = {}


def _says(*qualnames: str) -> Callable[[Summary], Summary]:
    def register(fn: Summary) -> Summary:
        for name in qualnames:
            _SUMMARIES[name] = fn
        return fn

    return register


def human_size(size: int) -> str:
    """Decimal units, one decimal place: 2_100_000 -> '2.1 MB'."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _short(value: Any) -> str:
    return "none" if value is None else str(value)


def _id(value: Any) -> str:
    return str(value)[:8]


@_says("LoanFile.Opened")
def _(e: Any, s: dict[str, Any]) -> str:
    return (
        f"loan {e.loan_number} opened: {e.product} {e.principal} {e.currency} "
        f"for {e.borrower_name} ({e.branch})"
    )


@_says("LoanFile.StatusChanged")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"status {e.old_status} → {e.new_status}"


@_says("LoanFile.Classified")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"classification {e.old_classification} → {e.new_classification}"


@_says("LoanFile.OfficerAssigned")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"{e.duty} officer {_short(e.previous_officer)} → {e.officer}"


@_says("LoanFile.InvestigationRecorded")
def _(e: Any, s: dict[str, Any]) -> str:
    yes = sum(1 for v in e.checklist.values() if v)
    return f"investigation of {e.investigated_on}: {yes}/{len(e.checklist)} checks positive"


@_says("LoanFile.RecoveryCategorised")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"recovery category {e.category} (causes: {'; '.join(e.causes_of_default)})"


@_says("LoanFile.RecoveryPlanSet")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"recovery plan: {e.target_amount} {_short(s.get('currency'))} by {e.target_date}"


@_says("LoanFile.CollectionActionRecorded")
def _(e: Any, s: dict[str, Any]) -> str:
    return (
        f"collection {e.kind} on {e.action_date} by {e.officer}: "
        f"recovered {e.amount_recovered} {_short(s.get('currency'))}"
    )


@_says("LoanFile.RepaymentRecorded")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"repayment {e.amount} {_short(s.get('currency'))} on {e.paid_on}"


@_says("LoanFile.InspectionRecorded")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"{e.kind} inspection on {e.inspected_on} by {e.inspector}"


@_says("LoanFile.CollateralLinked")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"collateral {_id(e.registration_id)} linked"


@_says("LoanFile.ValuationLinked")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"valuation {_id(e.valuation_id)} linked"


@_says("MortgageRegistration.Filed")
def _(e: Any, s: dict[str, Any]) -> str:
    return (
        f"mortgage filed on {e.cadastral_reference}, rank {e.lien_rank}, "
        f"securing {e.secured_amount} {e.currency}"
    )


@_says("MortgageRegistration.RepeatedMortgageFlagged")
def _(e: Any, s: dict[str, Any]) -> str:
    loans = ", ".join(sorted({str(lien.get("loan_number")) for lien in e.other_liens}))
    return f"repeated mortgage flagged: property also secures {loans}"


@_says("MortgageRegistration.Registered")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"mortgage registered: entry {e.registry_entry} on {e.registered_on}"


@_says("MortgageRegistration.SiteVerified")
def _(e: Any, s: dict[str, Any]) -> str:
    found = len(e.defects)
    return f"site verified by {e.officer} on {e.verified_on} ({found} defect{'s' * (found != 1)})"


@_says("MortgageRegistration.Released")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"mortgage released on {e.released_on}"


@_says("PropertyLiens.Indexed")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"property {e.cadastral_reference} indexed"


@_says("PropertyLiens.LienAdded")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"lien rank {e.lien_rank} for loan {e.loan_number} added"


@_says("PropertyLiens.LienReleased")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"lien of collateral {_id(e.registration_id)} released"


@_says("Valuation.Appraised")
def _(e: Any, s: dict[str, Any]) -> str:
    return (
        f"appraised at {e.appraised_value} {e.currency} by {e.agency} "
        f"({e.appraiser}, {e.method}) on {e.appraisal_date}"
    )


@_says("Valuation.Reviewed")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"reviewed by {e.reviewer}: {e.reviewed_value} {_short(s.get('currency'))}"


@_says("Valuation.OvervaluationFlagged")
def _(e: Any, s: dict[str, Any]) -> str:
    return (
        f"overvaluation flagged: appraised {e.appraised_value} vs reviewed {e.reviewed_value} "
        f"(excess {e.excess_ratio:.2%}, margin {e.margin:.2%})"
    )


@_says("Valuation.RevaluationScheduled")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"revaluation due {_short(s.get('revaluation_due'))} → {e.revaluation_due}"


@_says("Valuation.Superseded", "Document.Superseded")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"superseded by {_id(e.superseded_by)}"


@_says("Document.Registered")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"document {e.doc_type} uploaded ({human_size(e.size)}): {e.original_filename}"


@_says("Document.Downloaded")
def _(e: Any, s: dict[str, Any]) -> str:
    part = f" (bytes {e.range})" if e.range else ""
    return f"document {_short(s.get('doc_type'))} downloaded by {e.actor_id}{part}"


@_says("Document.LegalHoldPlaced")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"legal hold placed on document {_short(s.get('doc_type'))}"


@_says("Document.LegalHoldReleased")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"legal hold released on document {_short(s.get('doc_type'))}"


@_says("Document.FixityChecked")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"fixity of document {_short(s.get('doc_type'))}: {e.outcome}"


@_says("Document.ExtractionStarted")
def _(e: Any, s: dict[str, Any]) -> str:
    return (
        f"text extraction {e.attempt} of document {_short(s.get('doc_type'))} started by {e.worker}"
    )


@_says("Document.TextExtracted")
def _(e: Any, s: dict[str, Any]) -> str:
    failed = sum(1 for p in e.pages if p.get("error"))
    tail = f", {failed} failed" if failed else ""
    return f"text extracted from document {_short(s.get('doc_type'))}: {len(e.pages)} pages{tail}"


@_says("Document.ExtractionFailed")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"text extraction of document {_short(s.get('doc_type'))} failed: {e.reason[:200]}"


@_says("Document.ReindexRequested")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"text extraction of document {_short(s.get('doc_type'))} requested again"


@_says("LoanDocuments.Started")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"document index of loan {e.loan_number} started"


@_says("LoanDocuments.DocumentFiled")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"document {e.doc_type} {_id(e.document_id)} filed"


@_says("Reconciliation.Completed")
def _(e: Any, s: dict[str, Any]) -> str:
    return (
        f"storage reconciled: {e.objects_checked} objects, {e.documents_checked} documents; "
        f"{len(e.orphans)} orphans, {len(e.missing)} missing, {len(e.changed)} changed"
    )


@_says("User.Registered")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"user {e.name} registered as {e.role}"


@_says("User.RoleChanged")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"user {_short(s.get('name'))} role {_short(s.get('role'))} → {e.role}"


@_says("User.Deactivated")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"user {_short(s.get('name'))} deactivated"


@_says("AccessToken.Issued")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"token issued to {e.user_name}"


@_says("AccessToken.Revoked")
def _(e: Any, s: dict[str, Any]) -> str:
    return f"token of {_short(s.get('user_name'))} revoked"


def summarise(event: Any, seen: dict[str, Any]) -> str:
    """One line for a person; an event type without its own line gets its name."""
    fn = _SUMMARIES.get(type(event).__qualname__)
    if fn is not None:
        return fn(event, seen)
    words = "".join(f" {c.lower()}" if c.isupper() else c for c in type(event).__name__)
    return words.strip()


# -- apply -------------------------------------------------------------------------------------

#: aggregates whose loan number a rebuild keeps in memory (see ``view.trim``)
CACHE_AGGREGATES = 200_000
#: ids per ``IN (...)`` when reading loan numbers or histories
READ_CHUNK = 500
#: an aggregate none of whose events named a loan number (yet)
_ABSENT: Any = object()


class Kind(NamedTuple):
    """What the view needs to know of an event type, worked out once per topic."""

    qualname: str
    aggregate_type: str
    #: a property's lien events name the registration whose loan they concern
    liens: bool
    #: the attribute whose value is the field ``loan_number`` (see ``state_changes``)
    loan_field: str | None
    #: whether the event has an attribute ``loan_number``
    has_loan_number: bool
    #: whether its own fields must be decoded to find the loan it concerns
    names_loan: bool


_KINDS: dict[str, Kind] = {}


def _kind(topic: str, names: Sequence[str]) -> Kind:
    """The kind of the events of ``topic``, whose own fields are ``names``."""
    qualname = event_type(topic)
    aggregate_type = qualname.split(".")[0]
    loan_field = None
    if qualname not in _STATE_CHANGES:
        for name, attribute, _ in _plan(tuple(names)):
            if name == "loan_number":
                loan_field = attribute
    liens = aggregate_type == "PropertyLiens"
    has_loan_number = "loan_number" in names
    names_loan = has_loan_number or loan_field is not None or (liens and "registration_id" in names)
    kind = Kind(qualname, aggregate_type, liens, loan_field, has_loan_number, names_loan)
    _KINDS[topic] = kind
    return kind


#: what ends an archive event's metadata in its stored state: every event class lists its
#: own fields after those of ``ArchiveAggregate.Event``, whose last is the hash
_HASH = b',"event_hash":"'
_HASH_END = len(_HASH) + 64  # the hash's closing quote
#: the metadata as the archive's transcoder writes it when no value needs escaping (a
#: backslash or quote in a value fails the match): matched in place, a third of what
#: parsing it costs. Anything else is parsed as JSON, as before.
_PLAIN_META = re.compile(
    rb'\{"timestamp":\{"_type_":"datetime_iso","_data_":"([^"\\]*)"\},'
    rb'(?:"originator_topic":"[^"\\]*",)?'
    rb'"actor_id":"([^"\\]*)","actor_role":"([^"\\]*)",'
    rb'"reason":(?:null|"([^"\\]*)"),"correlation_id":"([^"\\]*)",'
    rb'"prev_hash":"[0-9a-f]{64}","event_hash":"([0-9a-f]{64})"'
)


class Stored:
    """One event as the log stores it, read only as far as its audit row needs.

    The stored state is UTF-8 JSON with the metadata first, up to the 64-hex-digit hash:
    that prefix is parsed as plain JSON (``meta``: values as stored), the rest is the
    event's own fields, copied as text (``fields``) and decoded only when asked
    (``own``). An event stored otherwise is decoded whole instead."""

    __slots__ = ("_own", "aggregate_id", "fields", "kind", "meta", "note", "occurred_at")

    def __init__(self, note: Any) -> None:
        self.note = note
        self.aggregate_id = id_text(note.originator_id)
        self._own: dict[str, Any] | None = None
        state: bytes = note.state
        found = _PLAIN_META.match(state)
        if found is not None and state[found.end() : found.end() + 1] in (b"}", b","):
            moment, actor, role, reason, correlation, digest = found.groups()
            rest = state[found.end() :]
            meta: dict[str, Any] = {
                "timestamp": moment.decode(),
                "actor_id": actor.decode(),
                "actor_role": role.decode(),
                "reason": None if reason is None else reason.decode(),
                "correlation_id": correlation.decode(),
                "event_hash": digest.decode(),
            }
        else:
            start = state.find(_HASH)
            end = start + _HASH_END
            rest = state[end + 1 :]
            meta = {}
            if (
                start > 0
                and state[end : end + 1] == b'"'
                and b'"' not in state[start + len(_HASH) : end]
                and (rest == b"}" or rest[:1] == b",")
            ):
                meta = parse_json((state[: end + 1] + b"}").decode())
        if "timestamp" in meta and meta.keys() <= _STORED_META:
            self.meta = meta
            self.fields = "{}" if rest == b"}" else "{" + rest[1:].decode()
            self.occurred_at = stored_time(meta["timestamp"])
        else:
            event = archive_mapper().to_domain_event(note)
            self.meta = {k: getattr(event, k, None) for k in _ROW_META}
            self._own = payload(event)
            self.fields = archive_mapper().transcoder.encode(self._own).decode()
            self.occurred_at = iso_utc(event.timestamp)
        kind = _KINDS.get(note.topic)
        if kind is None:
            kind = _kind(note.topic, list(self.own()))
        self.kind = kind

    def own(self) -> dict[str, Any]:
        """The event's own fields, decoded as the archive's mapper decodes them."""
        if self._own is None:
            self._own = archive_mapper().transcoder.decode(self.fields.encode())
        return self._own

    @property
    def loan_number(self) -> Any:
        """The event's own ``loan_number``: a loan number is stored as plain text, so it
        is read from the plain JSON, unless the own fields are decoded anyway (an event
        that changes the loan number, ``Kind.loan_field``)."""
        if not self.kind.has_loan_number:
            return None
        if self._own is None and self.kind.loan_field is None:
            value = parse_json(self.fields).get("loan_number")
            if value is None or type(value) is str:
                return value
        return self.own().get("loan_number")


#: the metadata a row copies
_ROW_META = ("actor_id", "actor_role", "reason", "correlation_id", "event_hash")
#: what may come before the hash in an archive event's stored state
_STORED_META = frozenset({"timestamp", "originator_topic", "prev_hash", *_ROW_META})


def _load_loans(tx: Tx, t: Tables, loans: dict[str, Any], ids: set[str]) -> None:
    """Read the loan numbers of the aggregates not in ``loans`` (one query per
    ``READ_CHUNK``); an aggregate without a row gets ``_ABSENT``."""
    missing = [i for i in ids if i not in loans]
    for aggregate_id in missing:
        loans[aggregate_id] = _ABSENT
    for n in range(0, len(missing), READ_CHUNK):
        chunk = missing[n : n + READ_CHUNK]
        marks = ", ".join("?" for _ in chunk)
        for row in tx.execute(
            f"SELECT aggregate_id, loan_number FROM {t[LOANS]} WHERE aggregate_id IN ({marks})",
            chunk,
        ):
            loans[row["aggregate_id"]] = row["loan_number"]


def known_event_types() -> list[str]:
    """Every event type the archive's aggregates record, e.g. "LoanFile.StatusChanged"."""
    import archive.application  # noqa: F401  (imports every aggregate)

    leaves: dict[str, type] = {}
    pending: list[type] = [ArchiveAggregate.Event]
    while pending:
        cls = pending.pop()
        below = cls.__subclasses__()
        pending.extend(below)
        if not below:  # the bases (``LoanFile.Event``) are never recorded themselves
            leaves[cls.__qualname__] = cls
    # The library makes an ``X.Created`` for every aggregate; one that declares its own
    # creation event (``LoanFile.Opened``) never records it.
    declares = {
        name.split(".")[0]
        for name, cls in leaves.items()
        if issubclass(cls, ArchiveAggregate.Created) and not name.endswith(".Created")
    }
    return sorted(
        name
        for name in leaves
        if not (name.endswith(".Created") and name.split(".")[0] in declares)
    )


# -- summaries and diffs, when read ----------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: ``==``, except that true is not 1."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    return bool(a == b)


def narrate(event: Any, seen: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """The summary and the diff of an event whose aggregate's fields were ``seen`` before
    it; ``seen`` is then brought past the event."""
    summary = summarise(event, seen)  # says what the aggregate was before this event
    diff: dict[str, dict[str, Any]] = {}
    latest: dict[str, Any] = {}
    for name, (before, after) in state_changes(event).items():
        last = seen.get(name, _UNSEEN)
        stays = last is not _UNSEEN and same(last, after)
        if before is _UNSEEN:  # the field's last value is its before
            if not stays and (last is not _UNSEEN or after is not None):
                diff[name] = {"before": None if last is _UNSEEN else last, "after": after}
        elif not same(before, after):
            diff[name] = {"before": before, "after": after}
        if not stays:
            latest[name] = after
    seen.update(latest)
    return summary, diff


class Narrator:
    """Summaries and diffs of stored rows, from their aggregates' events in order.

    For each aggregate it keeps the fields seen up to a position, so a reader going
    forward (an export, chunk by chunk) reads each earlier event once. ``complete``
    says that the rows handed in are every event of the trail, in order and from the
    start, as an unfiltered export reads them: no history needs reading then, except
    for aggregates forgotten to bound memory."""

    def __init__(self, table: str, *, complete: bool = False) -> None:
        self.table = table
        self.complete = complete
        #: aggregate id -> (the position folded through, its fields seen up to there)
        self.known: dict[str, tuple[int, dict[str, Any]]] = {}
        self.forgot = False

    def rows(self, tx: Tx, stored: Sequence[Row]) -> list[dict[str, Any]]:
        """The rows as read (``COLUMNS``), in the order given; ``tx`` reads histories."""
        wanted: dict[str, dict[int, Row]] = {}
        for row in stored:
            wanted.setdefault(row["aggregate_id"], {})[int(row["position"])] = row
        start: dict[str, tuple[int, dict[str, Any]]] = {}
        for aggregate_id, rows in wanted.items():
            through, seen = self.known.get(aggregate_id, (0, {}))
            # Asked for an earlier row than folded through: fold again from the start.
            start[aggregate_id] = (through, seen) if through < min(rows) else (0, {})
        histories = self._histories(tx, wanted, start)
        out: dict[int, dict[str, Any]] = {}
        for aggregate_id, rows in wanted.items():
            through, seen = start[aggregate_id]
            need = max(rows)
            for position, row in histories.get(aggregate_id, ()):
                if position <= through:
                    continue
                if position > need:
                    break
                event = _decode(row)
                summary, diff = narrate(event, seen)
                if position in rows:
                    out[position] = _out(rows[position], event, summary, diff)
            self.known.pop(aggregate_id, None)  # re-inserted last: trimmed last
            self.known[aggregate_id] = (need, seen)
        size = len(self.known)
        trim(self.known, CACHE_AGGREGATES)
        self.forgot = self.forgot or len(self.known) < size
        return [out[int(row["position"])] for row in stored]

    def _histories(
        self,
        tx: Tx,
        wanted: dict[str, dict[int, Row]],
        start: dict[str, tuple[int, dict[str, Any]]],
    ) -> dict[str, list[tuple[int, Row]]]:
        """Each aggregate's rows after the position it is folded through, up to the last
        one wanted, in order (from the rows handed in, when they are complete)."""
        histories: dict[str, list[tuple[int, Row]]] = {}
        lookup: list[str] = []
        for aggregate_id, rows in wanted.items():
            if self.complete and (aggregate_id in self.known or not self.forgot):
                histories[aggregate_id] = sorted(rows.items())
            else:
                lookup.append(aggregate_id)
        for n in range(0, len(lookup), READ_CHUNK):
            chunk = lookup[n : n + READ_CHUNK]
            low = min(start[a][0] for a in chunk)
            high = max(max(wanted[a]) for a in chunk)
            marks = ", ".join("?" for _ in chunk)
            found = tx.execute(
                f"SELECT * FROM {self.table} WHERE aggregate_id IN ({marks})"
                " AND position > ? AND position <= ? ORDER BY position",
                [*chunk, low, high],
            )
            for row in found:
                histories.setdefault(row["aggregate_id"], []).append((int(row["position"]), row))
        return histories


def _decode(row: Row) -> Any:
    """The event of a stored row: its own fields decoded as the archive's mapper decodes
    the log (upcasting included), with the metadata summaries may name (not the time or
    the previous hash, which no summary or diff uses)."""
    event = archive_mapper().to_domain_event(
        StoredEvent(
            originator_id=row["aggregate_id"],
            originator_version=int(row["aggregate_version"]),
            topic=row["topic"],
            state=row["fields"].encode(),
        )
    )
    vars(event).update(
        actor_id=row["actor_id"],
        actor_role=row["actor_role"],
        reason=row["reason"],
        correlation_id=row["correlation_id"],
        event_hash=row["event_hash"],
    )
    return event


def _out(row: Row, event: Any, summary: str, diff: dict[str, Any]) -> dict[str, Any]:
    return {
        "position": int(row["position"]),
        "occurred_at": row["occurred_at"],
        "actor_id": row["actor_id"],
        "actor_role": row["actor_role"],
        "aggregate_type": row["event_type"].split(".")[0],
        "aggregate_id": row["aggregate_id"],
        "aggregate_version": row["aggregate_version"],
        "loan_number": row["loan_number"],
        "event_type": row["event_type"],
        "reason": row["reason"],
        "correlation_id": row["correlation_id"],
        "summary": summary,
        "diff": diff,
        "event_hash": row["event_hash"],
    }


# -- reading ---------------------------------------------------------------------------------


def _moment(value: datetime | str | None, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{what} must be an ISO 8601 moment, got {value!r}") from None
    if value.tzinfo is None:
        raise ValueError(f"{what} needs a time zone, e.g. 2026-01-31T12:00:00Z")
    return iso_utc(value)


def _where(
    loan_number: str | None,
    actor_id: str | None,
    event_type: str | None,
    aggregate_id: str | None,
    correlation_id: str | None,
    since: datetime | str | None,
    until: datetime | str | None,
) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("loan_number", loan_number),
        ("actor_id", actor_id),
        ("event_type", event_type),
        ("aggregate_id", aggregate_id),
        ("correlation_id", correlation_id),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(str(value))
    start = _moment(since, "since")
    if start is not None:
        where.append("occurred_at >= ?")
        params.append(start)
    end = _moment(until, "until")
    if end is not None:
        where.append("occurred_at < ?")
        params.append(end)
    return where, params


def query(
    store: Store,
    *,
    loan_number: str | None = None,
    actor_id: str | None = None,
    event_type: str | None = None,
    aggregate_id: str | None = None,
    correlation_id: str | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    limit: int = 100,
    offset: int = 0,
    descending: bool = False,
) -> Page:
    """Audit rows matching every given filter, by position. ``since`` is inclusive,
    ``until`` exclusive; both need a time zone. ``event_type`` is e.g.
    "LoanFile.StatusChanged"."""
    check_page(limit, offset)
    where, params = _where(
        loan_number, actor_id, event_type, aggregate_id, correlation_id, since, until
    )
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    order = "DESC" if descending else "ASC"
    with store.read() as tx:
        current = registry.active(tx, AuditTrailView.name)
        if current is None:
            return Page([], 0, limit, offset, 0)
        table = AuditTrailView().tables(current.generation)[EVENTS]
        total = tx.one(f"SELECT COUNT(*) AS n FROM {table}{clause}", params)
        rows = tx.execute(
            f"SELECT * FROM {table}{clause} ORDER BY position {order} LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        items = Narrator(table).rows(tx, rows)
    return Page(items, int(total["n"]) if total else 0, limit, offset, current.position)


def rows(store: Store, *, chunk: int = 500, **filters: Any) -> Iterator[dict[str, Any]]:
    """Every matching row by position, read in chunks (keyset on position), so an
    export of millions of rows runs in bounded memory. The generation is fixed at the
    start; a switch meanwhile keeps the old one readable until the next rebuild."""
    where, params = _where(
        filters.pop("loan_number", None),
        filters.pop("actor_id", None),
        filters.pop("event_type", None),
        filters.pop("aggregate_id", None),
        filters.pop("correlation_id", None),
        filters.pop("since", None),
        filters.pop("until", None),
    )
    if filters:
        raise TypeError(f"unknown filters: {', '.join(sorted(filters))}")
    with store.read() as tx:
        current = registry.active(tx, AuditTrailView.name)
    if current is None:
        return
    table = AuditTrailView().tables(current.generation)[EVENTS]
    # Unfiltered, the chunks are the whole trail in order: each aggregate's earlier
    # events have gone by already, and the narrator reads no history.
    narrator = Narrator(table, complete=not where)
    after = 0
    while True:
        clause = " WHERE " + " AND ".join([*where, "position > ?"])
        with store.read() as tx:
            batch = tx.execute(
                f"SELECT * FROM {table}{clause} ORDER BY position LIMIT ?",
                [*params, after, chunk],
            )
            items = narrator.rows(tx, batch)
        yield from items
        if len(batch) < chunk:
            return
        after = int(batch[-1]["position"])


def export_jsonl(store: Store, **filters: Any) -> Iterator[str]:
    """JSON Lines: one audit row per line, for streaming responses and files."""
    for row in rows(store, **filters):
        yield json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n"


def export_csv(store: Store, **filters: Any) -> Iterator[str]:
    """CSV with a header line; the diff column holds the diff as JSON text."""
    return csv_lines(
        COLUMNS,
        (
            [
                dumps(row[c]) if c == "diff" else "" if row[c] is None else inert(row[c])
                for c in COLUMNS
            ]
            for row in rows(store, **filters)
        ),
    )


def rows_for_loan(store: Store, loan_number: str) -> Iterator[dict[str, Any]]:
    """Every audit row of one loan, by position."""
    yield from rows(store, loan_number=loan_number, chunk=MAX_LIMIT)
