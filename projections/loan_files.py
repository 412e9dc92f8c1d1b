"""The loan_files view: every loan file as it stands now, with what is filed under it.

Four tables per generation: the loan files, their collateral (mortgage registrations),
valuations and documents. Listing and filtering is one indexed query instead of
replaying each loan's events; the archive's ``loan_file()`` stays the authority for
history (past versions, as-of reads). Money is kept as decimal text, dates and times
as ISO text, lists and objects as JSON text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, ClassVar
from uuid import UUID

from archive.documents import ExtractionStatus
from projections import registry
from projections.encoding import (
    archive_mapper,
    dumps,
    event_type,
    id_text,
    iso_utc,
    loads,
    opt,
    stored_time,
)
from projections.store import Row, Store, Tx
from projections.view import (
    Cache,
    Events,
    Handlers,
    Page,
    Tables,
    View,
    check_page,
    fetch_row,
    trim,
)

LOANS = "loan_files"
COLLATERAL = "loan_collateral"
VALUATIONS = "loan_valuations"
DOCUMENTS = "loan_documents"

handlers: Handlers[RowHandler] = Handlers()


#: the columns the list endpoint filters on (each indexed)
FILTERS = (
    "status",
    "classification",
    "recovery_category",
    "loan_officer",
    "collection_officer",
    "branch",
    "product",
)


class LoanFilesView(View):
    name: ClassVar[str] = "loan_files"
    #: 2: documents' extraction_status (pending, running, done, failed)
    schema_version: ClassVar[int] = 2
    rebuild_cost: ClassVar[float] = 17.0
    table_names: ClassVar[tuple[str, ...]] = (LOANS, COLLATERAL, VALUATIONS, DOCUMENTS)
    handlers: ClassVar[Handlers[RowHandler]] = handlers  # type: ignore[assignment]
    ddl: ClassVar[tuple[str, ...]] = (
        "CREATE TABLE {loan_files} ("
        " loan_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL UNIQUE,"
        " version INTEGER NOT NULL,"
        " borrower_name TEXT NOT NULL,"
        " borrower_national_id TEXT NOT NULL,"
        " product TEXT NOT NULL,"
        " village_group TEXT,"
        " principal TEXT NOT NULL,"
        " currency TEXT NOT NULL,"
        " interest_rate TEXT NOT NULL,"
        " term_months INTEGER NOT NULL,"
        " disbursement_date TEXT NOT NULL,"
        " maturity_date TEXT NOT NULL,"
        " branch TEXT NOT NULL,"
        " status TEXT NOT NULL,"
        " classification TEXT NOT NULL,"
        " loan_officer TEXT,"
        " collection_officer TEXT,"
        " recovery_category TEXT,"
        " causes_of_default TEXT NOT NULL,"
        " investigation TEXT,"
        " recovery_plan TEXT,"
        " officer_history TEXT NOT NULL,"
        " collection_actions TEXT NOT NULL,"
        " repayments TEXT NOT NULL,"
        " inspections TEXT NOT NULL,"
        " repaid TEXT NOT NULL,"
        " recovered TEXT NOT NULL,"
        " outstanding TEXT NOT NULL,"
        " opened_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL,"
        " position BIGINT NOT NULL)",
        "CREATE TABLE {loan_collateral} ("
        " registration_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL,"
        " version INTEGER NOT NULL,"
        " cadastral_reference TEXT NOT NULL,"
        " address TEXT NOT NULL,"
        " owner TEXT NOT NULL,"
        " registry_office TEXT NOT NULL,"
        " registry_entry TEXT,"
        " lien_rank INTEGER NOT NULL,"
        " secured_amount TEXT NOT NULL,"
        " currency TEXT NOT NULL,"
        " status TEXT NOT NULL,"
        " registered_on TEXT,"
        " released_on TEXT,"
        " site_verifications TEXT NOT NULL,"
        " repeated_mortgage TEXT,"
        " filed_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)",
        "CREATE TABLE {loan_valuations} ("
        " valuation_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL,"
        " version INTEGER NOT NULL,"
        " collateral_id TEXT,"
        " agency TEXT NOT NULL,"
        " appraiser TEXT NOT NULL,"
        " method TEXT NOT NULL,"
        " appraised_value TEXT NOT NULL,"
        " currency TEXT NOT NULL,"
        " appraisal_date TEXT NOT NULL,"
        " revaluation_due TEXT NOT NULL,"
        " reviewer TEXT,"
        " reviewed_value TEXT,"
        " review_notes TEXT,"
        " reviewed_at TEXT,"
        " overvalued INTEGER NOT NULL,"
        " overvaluation TEXT,"
        " superseded_by TEXT,"
        " appraised_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)",
        "CREATE TABLE {loan_documents} ("
        " document_id TEXT PRIMARY KEY,"
        " loan_number TEXT NOT NULL,"
        " version INTEGER NOT NULL,"
        " collateral_id TEXT,"
        " valuation_id TEXT,"
        " doc_type TEXT NOT NULL,"
        " original_filename TEXT NOT NULL,"
        " media_type TEXT NOT NULL,"
        " size BIGINT NOT NULL,"
        " sha256 TEXT NOT NULL,"
        " object_key TEXT NOT NULL,"
        " object_version TEXT,"
        " retain_until TEXT,"
        " supersedes TEXT,"
        " superseded_by TEXT,"
        " uploaded_by TEXT NOT NULL,"
        " uploaded_at TEXT NOT NULL,"
        " legal_hold INTEGER NOT NULL,"
        " downloads INTEGER NOT NULL,"
        " last_downloaded_at TEXT,"
        " fixity_status TEXT,"
        " fixity_checked_at TEXT,"
        " extraction_status TEXT,"
        " updated_at TEXT NOT NULL)",
    )
    indexes: ClassVar[tuple[str, ...]] = (
        *(
            f"CREATE INDEX {{loan_files}}_{column} ON {{loan_files}} ({column}, loan_number)"
            for column in FILTERS
        ),
        "CREATE INDEX {loan_collateral}_loan ON {loan_collateral} (loan_number)",
        "CREATE INDEX {loan_valuations}_loan ON {loan_valuations} (loan_number)",
        "CREATE INDEX {loan_documents}_loan ON {loan_documents} (loan_number)",
    )

    def needs(self, qualname: str) -> bool:
        """A repayment is read from its stored form (``StoredRepayment``), not decoded."""
        return qualname in self.handlers and qualname != StoredRepayment.event_type

    def apply(self, tx: Tx, tables: Tables, position: int, event: Any) -> None:
        self.apply_batch(tx, tables, [(position, event)], {})

    def apply_batch(self, tx: Tx, tables: Tables, events: Events, cache: Cache) -> None:
        """Read the rows the batch changes (one query per table), apply the events to
        them in memory, write each changed row once."""
        rows = Rows(tx, tables, cache)
        self._apply(rows, events)
        rows.flush()

    def load_batch(self, tx: Tx, tables: Tables, events: Events, cache: Cache) -> None:
        """A rebuild writes each row once, when the cache lets it go or at
        ``finish_load``, instead of once per batch that changes it: a loan's row
        (its repayments' JSON grows with each) was rewritten in most batches."""
        rows = Rows(tx, tables, cache, hold=True)
        self._apply(rows, events)
        rows.release()

    def finish_load(self, tx: Tx, tables: Tables, cache: Cache) -> None:
        Rows(tx, tables, cache, hold=True).flush()

    def _apply(self, rows: Rows, events: Events) -> None:
        stored = getattr(events, "stored", None)
        if stored is not None:  # from the log: repayments were left undecoded
            events = [
                (position, _stored_repayment(note))
                if event is None and event_type(note.topic) == StoredRepayment.event_type
                else (position, event)
                for (position, event), note in zip(events, stored, strict=True)
            ]
        wanted: dict[str, set[str]] = {table: set() for table in KEYS}
        known = _ROUTES.setdefault(type(self), {})
        routes = [known.get(type(e)) or _route(self.handlers, known, e) for _, e in events]
        for (_, event), (_, reads) in zip(events, routes, strict=True):
            if reads is not None:
                wanted[reads].add(id_text(event.originator_id))
        for table, keys in wanted.items():
            rows.load(table, keys)
        for (position, event), (handler, _) in zip(events, routes, strict=True):
            if handler is not None:
                handler(rows, position, event)


# -- the rows a batch touches ----------------------------------------------------------------

KEYS = {
    LOANS: "loan_id",
    COLLATERAL: "registration_id",
    VALUATIONS: "valuation_id",
    DOCUMENTS: "document_id",
}
#: which table an aggregate's events change
TABLE_OF = {
    "LoanFile": LOANS,
    "MortgageRegistration": COLLATERAL,
    "Valuation": VALUATIONS,
    "Document": DOCUMENTS,
}
#: the events that insert their aggregate's row (nothing to read first)
CREATES = frozenset(
    {"LoanFile.Opened", "MortgageRegistration.Filed", "Valuation.Appraised", "Document.Registered"}
)
#: per view class and event class: the apply function, and the table whose row it
#: changes (to read first), each None if there is none
Route = tuple["RowHandler | None", str | None]
_ROUTES: dict[type, dict[type, Route]] = {}


def _route(handlers: Handlers[RowHandler], known: dict[type, Route], event: Any) -> Route:
    qualname = getattr(type(event), "event_type", None) or type(event).__qualname__
    handler = handlers.get(qualname)
    table = TABLE_OF.get(qualname.split(".")[0])
    reads = table if handler is not None and qualname not in CREATES else None
    known[type(event)] = route = (handler, reads)
    return route


#: rows of one table a rebuild keeps in memory (see ``view.trim``)
CACHE_ROWS = 100_000
#: ids per ``IN (...)`` when reading rows
READ_CHUNK = 500


class Rows:
    """The rows one batch changes, held in memory: each read at most once (one query per
    table for the whole batch) and written once when the batch ends, however many of
    the batch's events change it. With a cache kept across batches (a rebuild, the only
    writer of its generation), rows are read back from the database only after an
    eviction; ``hold`` (a rebuild's ``load_batch``) keeps the changed rows unwritten in
    the cache too, until it lets them go (``release``) or the load ends (``flush``)."""

    def __init__(self, tx: Tx, tables: Tables, cache: Cache, *, hold: bool = False) -> None:
        self.tx = tx
        self.t = tables
        self.rows: dict[str, dict[str, Row]] = cache.setdefault("rows", {n: {} for n in KEYS})
        # insertion-ordered sets of keys: rows never written, rows changed since written
        self.new: dict[str, dict[str, None]]
        self.dirty: dict[str, dict[str, None]]
        if hold:
            self.new = cache.setdefault("new", {n: {} for n in KEYS})
            self.dirty = cache.setdefault("dirty", {n: {} for n in KEYS})
        else:
            self.new = {n: {} for n in KEYS}
            self.dirty = {n: {} for n in KEYS}

    def load(self, table: str, keys: set[str]) -> None:
        cached = self.rows[table]
        missing = [k for k in keys if k not in cached]
        for n in range(0, len(missing), READ_CHUNK):
            chunk = missing[n : n + READ_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            for row in self.tx.execute(
                f"SELECT * FROM {self.t[table]} WHERE {KEYS[table]} IN ({marks})", chunk
            ):
                cached[row[KEYS[table]]] = row

    def get(self, table: str, key: str) -> Row:
        row = self.rows[table].get(key)
        if row is None:  # pragma: no cover - an aggregate's events all follow its creation
            raise LookupError(f"{table} has no row {key}")
        return row

    def insert(self, table: str, row: Row) -> None:
        key = row[KEYS[table]]
        self.rows[table][key] = row
        self.new[table][key] = None

    def update(self, table: str, key: str, changes: dict[str, Any]) -> None:
        self.get(table, key).update(changes)
        self.changed(table, key)

    def changed(self, table: str, key: str) -> None:
        """The row ``key`` was changed in place: write it when the batch ends."""
        if key not in self.new[table]:
            self.dirty[table][key] = None

    def flush(self) -> None:
        """Write every new and changed row."""
        for table in KEYS:
            self._write(table, self.new[table], self.dirty[table])
        for cached in self.rows.values():
            trim(cached, CACHE_ROWS)

    def release(self) -> None:
        """Holding: write the rows the cache is about to forget (see ``trim``), forget
        them, and keep holding the others."""
        for table in KEYS:
            cached = self.rows[table]
            if len(cached) <= CACHE_ROWS:
                continue
            going = list(itertools.islice(cached, len(cached) // 2))
            new, dirty = self.new[table], self.dirty[table]
            self._write(
                table,
                {k: None for k in going if k in new},
                {k: None for k in going if k in dirty},
            )
            for k in going:
                del cached[k]
                new.pop(k, None)
                dirty.pop(k, None)

    def _write(self, table: str, new: dict[str, None], dirty: dict[str, None]) -> None:
        rows = self.rows[table]
        self.tx.insert_rows(self.t[table], [rows[k] for k in new])
        # Every changed row exists: the upsert overwrites it whole.
        self.tx.upsert_rows(self.t[table], KEYS[table], [rows[k] for k in dirty])
        new.clear()
        dirty.clear()


RowHandler = Callable[[Rows, int, Any], None]


def _append(row: Row, column: str, item: dict[str, Any]) -> str:
    """The column's JSON list with ``item`` appended, without re-encoding the old items:
    the same text as ``dumps`` of the whole list, since canonical JSON has no spaces."""
    text, entry = row[column], dumps(item)
    return f"[{entry}]" if text == "[]" else f"{text[:-1]},{entry}]"


# -- apply: LoanFile ----------------------------------------------------------------------


def _touch(event: Any, position: int) -> dict[str, Any]:
    return {
        "version": event.originator_version,
        "updated_at": iso_utc(event.timestamp),
        "position": position,
    }


def _update_loan(rows: Rows, position: int, event: Any, **changes: Any) -> None:
    key = id_text(event.originator_id)
    row = rows.get(LOANS, key)
    row.update(changes)
    row["version"] = event.originator_version
    row["updated_at"] = iso_utc(event.timestamp)
    row["position"] = position
    rows.changed(LOANS, key)


def _loan(rows: Rows, event: Any) -> Row:
    return rows.get(LOANS, id_text(event.originator_id))


@handlers.on("LoanFile.Opened")
def _opened(rows: Rows, position: int, e: Any) -> None:
    rows.insert(
        LOANS,
        {
            "loan_id": id_text(e.originator_id),
            "loan_number": e.loan_number,
            "borrower_name": e.borrower_name,
            "borrower_national_id": e.borrower_national_id,
            "product": e.product,
            "village_group": e.village_group,
            "principal": str(e.principal),
            "currency": e.currency,
            "interest_rate": str(e.interest_rate),
            "term_months": e.term_months,
            "disbursement_date": e.disbursement_date.isoformat(),
            "maturity_date": e.maturity_date.isoformat(),
            "branch": e.branch,
            "status": "performing",
            "classification": "pass",
            "loan_officer": None,
            "collection_officer": None,
            "recovery_category": None,
            "causes_of_default": "[]",
            "investigation": None,
            "recovery_plan": None,
            "officer_history": "[]",
            "collection_actions": "[]",
            "repayments": "[]",
            "inspections": "[]",
            "repaid": "0",
            "recovered": "0",
            "outstanding": str(e.principal),
            "opened_at": iso_utc(e.timestamp),
            **_touch(e, position),
        },
    )


@handlers.on("LoanFile.StatusChanged")
def _status_changed(rows: Rows, position: int, e: Any) -> None:
    _update_loan(rows, position, e, status=e.new_status)


@handlers.on("LoanFile.Classified")
def _classified(rows: Rows, position: int, e: Any) -> None:
    _update_loan(rows, position, e, classification=e.new_classification)


OFFICER_COLUMNS = {"loan": "loan_officer", "collection": "collection_officer"}


@handlers.on("LoanFile.OfficerAssigned")
def _officer_assigned(rows: Rows, position: int, e: Any) -> None:
    entry = {
        "duty": e.duty,
        "officer": e.officer,
        "previous_officer": e.previous_officer,
        "assigned_at": e.timestamp,
        "assigned_by": e.actor_id,
    }
    _update_loan(
        rows,
        position,
        e,
        **{OFFICER_COLUMNS[e.duty]: e.officer},
        officer_history=_append(_loan(rows, e), "officer_history", entry),
    )


@handlers.on("LoanFile.InvestigationRecorded")
def _investigation(rows: Rows, position: int, e: Any) -> None:
    investigation = {
        "checklist": e.checklist,
        "notes": e.notes,
        "investigated_on": e.investigated_on,
        "investigated_by": e.actor_id,
    }
    _update_loan(rows, position, e, investigation=dumps(investigation))


@handlers.on("LoanFile.RecoveryCategorised")
def _categorised(rows: Rows, position: int, e: Any) -> None:
    _update_loan(
        rows,
        position,
        e,
        recovery_category=e.category,
        causes_of_default=dumps(e.causes_of_default),
    )


@handlers.on("LoanFile.RecoveryPlanSet")
def _plan(rows: Rows, position: int, e: Any) -> None:
    plan = {
        "summary": e.summary,
        "target_date": e.target_date,
        "target_amount": e.target_amount,
        "set_by": e.actor_id,
    }
    _update_loan(rows, position, e, recovery_plan=dumps(plan))


def _outstanding(row: Row, repaid: Decimal, recovered: Decimal) -> str:
    return str(Decimal(row["principal"]) - repaid - recovered)


@handlers.on("LoanFile.CollectionActionRecorded")
def _collection_action(rows: Rows, position: int, e: Any) -> None:
    row = _loan(rows, e)
    action = {
        "kind": e.kind,
        "action_date": e.action_date,
        "outcome": e.outcome,
        "amount_recovered": e.amount_recovered,
        "officer": e.officer,
    }
    recovered = Decimal(row["recovered"]) + e.amount_recovered
    _update_loan(
        rows,
        position,
        e,
        collection_actions=_append(row, "collection_actions", action),
        recovered=str(recovered),
        outstanding=_outstanding(row, Decimal(row["repaid"]), recovered),
    )


@dataclass(slots=True)
class StoredRepayment:
    """What a loan row needs of a ``LoanFile.RepaymentRecorded``, read from the log's
    stored JSON instead of decoding the event: half of all events are repayments, and
    decoding is most of what they cost."""

    originator_id: UUID | str  # as the log's note carries it (``LogNote``)
    originator_version: int
    #: the event's time as ``iso_utc`` writes it (a time is only ever written here)
    occurred_at: str
    amount: Decimal
    paid_on: date
    #: the event type this stands for (routes it as one: see ``_route``)
    event_type: ClassVar[str] = "LoanFile.RepaymentRecorded"


#: a repayment's stored state as the archive's transcoder writes it: the time first, the
#: amount and the day last. A JSON string cannot hold ``,"`` unescaped, so the end that
#: matches is the object's own fields, whatever the reason text says.
_STORED_REPAYMENT = re.compile(
    rb'\{"timestamp":\{"_type_":"datetime_iso","_data_":"([0-9T:.+-]+)"\},'
    rb'.*,"amount":\{"_type_":"decimal_str","_data_":"(-?[0-9.]+)"\},'
    rb'"paid_on":\{"_type_":"date_iso","_data_":"([0-9-]+)"\}\}',
    re.DOTALL,
)


def _stored_repayment(note: Any) -> Any:
    """A repayment the follower left undecoded (see ``needs``), read from its stored
    form: three values matched in place (a quarter of parsing the JSON); one stored
    otherwise is decoded whole."""
    found = _STORED_REPAYMENT.fullmatch(note.state)
    if found is not None:
        try:
            return StoredRepayment(
                note.originator_id,
                note.originator_version,
                stored_time(found[1].decode()),
                Decimal(found[2].decode()),
                date.fromisoformat(found[3].decode()),
            )
        except ValueError:
            pass  # not what the archive writes: decoded below, which says what is wrong
    return archive_mapper().to_domain_event(note)


@handlers.on(StoredRepayment.event_type)
def _repayment(rows: Rows, position: int, e: Any) -> None:
    """Half of all events: the entry's JSON is written directly when its values are a
    Decimal and a date (the text ``dumps`` gives: neither needs escaping)."""
    key = id_text(e.originator_id)
    row = rows.get(LOANS, key)
    amount, paid_on = e.amount, e.paid_on
    repaid = Decimal(row["repaid"]) + amount
    if type(amount) is Decimal and type(paid_on) is date:
        text = row["repayments"]
        entry = f'{{"amount":"{amount}","paid_on":"{paid_on.isoformat()}"}}'
        row["repayments"] = f"[{entry}]" if text == "[]" else f"{text[:-1]},{entry}]"
    else:
        row["repayments"] = _append(row, "repayments", {"amount": amount, "paid_on": paid_on})
    row["outstanding"] = _outstanding(row, repaid, Decimal(row["recovered"]))
    row["repaid"] = str(repaid)
    row["version"] = e.originator_version
    row["updated_at"] = e.occurred_at if type(e) is StoredRepayment else iso_utc(e.timestamp)
    row["position"] = position
    rows.changed(LOANS, key)


@handlers.on("LoanFile.InspectionRecorded")
def _inspection(rows: Rows, position: int, e: Any) -> None:
    inspection = {
        "kind": e.kind,
        "inspected_on": e.inspected_on,
        "inspector": e.inspector,
        "findings": e.findings,
    }
    _update_loan(rows, position, e, inspections=_append(_loan(rows, e), "inspections", inspection))


@handlers.on("LoanFile.CollateralLinked", "LoanFile.ValuationLinked")
def _linked(rows: Rows, position: int, e: Any) -> None:
    # The collateral and valuation rows carry the loan number themselves.
    _update_loan(rows, position, e)


# -- apply: MortgageRegistration -------------------------------------------------------------


def _stamp(e: Any, changes: dict[str, Any]) -> dict[str, Any]:
    return {**changes, "version": e.originator_version, "updated_at": iso_utc(e.timestamp)}


def _update_collateral(rows: Rows, e: Any, **changes: Any) -> None:
    rows.update(COLLATERAL, id_text(e.originator_id), _stamp(e, changes))


@handlers.on("MortgageRegistration.Filed")
def _filed(rows: Rows, position: int, e: Any) -> None:
    rows.insert(
        COLLATERAL,
        {
            "registration_id": id_text(e.originator_id),
            "loan_number": e.loan_number,
            "version": e.originator_version,
            "cadastral_reference": e.cadastral_reference,
            "address": e.address,
            "owner": e.owner,
            "registry_office": e.registry_office,
            "registry_entry": None,
            "lien_rank": e.lien_rank,
            "secured_amount": str(e.secured_amount),
            "currency": e.currency,
            "status": "pending",
            "registered_on": None,
            "released_on": None,
            "site_verifications": "[]",
            "repeated_mortgage": None,
            "filed_at": iso_utc(e.timestamp),
            "updated_at": iso_utc(e.timestamp),
        },
    )


@handlers.on("MortgageRegistration.RepeatedMortgageFlagged")
def _repeated(rows: Rows, position: int, e: Any) -> None:
    flag = {"other_liens": e.other_liens, "flagged_at": e.timestamp}
    _update_collateral(rows, e, repeated_mortgage=dumps(flag))


@handlers.on("MortgageRegistration.Registered")
def _registered(rows: Rows, position: int, e: Any) -> None:
    _update_collateral(
        rows,
        e,
        status="registered",
        registry_entry=e.registry_entry,
        registered_on=e.registered_on.isoformat(),
    )


@handlers.on("MortgageRegistration.SiteVerified")
def _site_verified(rows: Rows, position: int, e: Any) -> None:
    row = rows.get(COLLATERAL, id_text(e.originator_id))
    visit = {
        "officer": e.officer,
        "verified_on": e.verified_on,
        "findings": e.findings,
        "defects": e.defects,
    }
    _update_collateral(rows, e, site_verifications=_append(row, "site_verifications", visit))


@handlers.on("MortgageRegistration.Released")
def _released(rows: Rows, position: int, e: Any) -> None:
    _update_collateral(rows, e, status="released", released_on=e.released_on.isoformat())


# -- apply: Valuation ----------------------------------------------------------------------


def _update_valuation(rows: Rows, e: Any, **changes: Any) -> None:
    rows.update(VALUATIONS, id_text(e.originator_id), _stamp(e, changes))


@handlers.on("Valuation.Appraised")
def _appraised(rows: Rows, position: int, e: Any) -> None:
    rows.insert(
        VALUATIONS,
        {
            "valuation_id": id_text(e.originator_id),
            "loan_number": e.loan_number,
            "version": e.originator_version,
            "collateral_id": opt(e.collateral_id),
            "agency": e.agency,
            "appraiser": e.appraiser,
            "method": e.method,
            "appraised_value": str(e.appraised_value),
            "currency": e.currency,
            "appraisal_date": e.appraisal_date.isoformat(),
            "revaluation_due": e.revaluation_due.isoformat(),
            "reviewer": None,
            "reviewed_value": None,
            "review_notes": None,
            "reviewed_at": None,
            "overvalued": 0,
            "overvaluation": None,
            "superseded_by": None,
            "appraised_at": iso_utc(e.timestamp),
            "updated_at": iso_utc(e.timestamp),
        },
    )


@handlers.on("Valuation.Reviewed")
def _reviewed(rows: Rows, position: int, e: Any) -> None:
    _update_valuation(
        rows,
        e,
        reviewer=e.reviewer,
        reviewed_value=str(e.reviewed_value),
        review_notes=e.notes,
        reviewed_at=iso_utc(e.timestamp),
    )


@handlers.on("Valuation.OvervaluationFlagged")
def _overvalued(rows: Rows, position: int, e: Any) -> None:
    flag = {
        "excess_ratio": e.excess_ratio,
        "margin": e.margin,
        "cut": e.appraised_value - e.reviewed_value,
    }
    _update_valuation(rows, e, overvalued=1, overvaluation=dumps(flag))


@handlers.on("Valuation.RevaluationScheduled")
def _revaluation(rows: Rows, position: int, e: Any) -> None:
    _update_valuation(rows, e, revaluation_due=e.revaluation_due.isoformat())


@handlers.on("Valuation.Superseded")
def _valuation_superseded(rows: Rows, position: int, e: Any) -> None:
    _update_valuation(rows, e, superseded_by=str(e.superseded_by))


# -- apply: Document -------------------------------------------------------------------------


def _update_document(rows: Rows, e: Any, **changes: Any) -> None:
    rows.update(DOCUMENTS, id_text(e.originator_id), _stamp(e, changes))


@handlers.on("Document.Registered")
def _document_registered(rows: Rows, position: int, e: Any) -> None:
    rows.insert(
        DOCUMENTS,
        {
            "document_id": id_text(e.originator_id),
            "loan_number": e.loan_number,
            "version": e.originator_version,
            "collateral_id": opt(e.collateral_id),
            "valuation_id": opt(e.valuation_id),
            "doc_type": e.doc_type,
            "original_filename": e.original_filename,
            "media_type": e.media_type,
            "size": e.size,
            "sha256": e.sha256,
            "object_key": e.object_key,
            "object_version": e.object_version,
            "retain_until": opt(e.retain_until),
            "supersedes": opt(e.supersedes),
            "superseded_by": None,
            "uploaded_by": e.actor_id,
            "uploaded_at": iso_utc(e.timestamp),
            "legal_hold": 0,
            "downloads": 0,
            "last_downloaded_at": None,
            "fixity_status": None,
            "fixity_checked_at": None,
            "extraction_status": ExtractionStatus.PENDING.value,
            "updated_at": iso_utc(e.timestamp),
        },
    )


@handlers.on("Document.Superseded")
def _document_superseded(rows: Rows, position: int, e: Any) -> None:
    _update_document(rows, e, superseded_by=str(e.superseded_by))


@handlers.on("Document.Downloaded")
def _downloaded(rows: Rows, position: int, e: Any) -> None:
    row = rows.get(DOCUMENTS, id_text(e.originator_id))
    _update_document(
        rows, e, downloads=int(row["downloads"]) + 1, last_downloaded_at=iso_utc(e.timestamp)
    )


@handlers.on("Document.LegalHoldPlaced")
def _hold_placed(rows: Rows, position: int, e: Any) -> None:
    _update_document(rows, e, legal_hold=1)


@handlers.on("Document.LegalHoldReleased")
def _hold_released(rows: Rows, position: int, e: Any) -> None:
    _update_document(rows, e, legal_hold=0)


@handlers.on("Document.FixityChecked")
def _fixity(rows: Rows, position: int, e: Any) -> None:
    _update_document(rows, e, fixity_status=e.outcome, fixity_checked_at=iso_utc(e.timestamp))


#: the extraction status each event leaves, named as ``Document.extraction["status"]``
#: (what ``GET /api/v1/documents/{id}`` shows)
EXTRACTION = {
    "Document.ExtractionStarted": ExtractionStatus.RUNNING.value,
    "Document.TextExtracted": ExtractionStatus.DONE.value,
    "Document.ExtractionFailed": ExtractionStatus.FAILED.value,
    "Document.ReindexRequested": ExtractionStatus.PENDING.value,
}


@handlers.on(*EXTRACTION)
def _extraction(rows: Rows, position: int, e: Any) -> None:
    _update_document(rows, e, extraction_status=EXTRACTION[type(e).__qualname__])


# -- reading -----------------------------------------------------------------------------

_JSON = {
    "causes_of_default",
    "investigation",
    "recovery_plan",
    "officer_history",
    "collection_actions",
    "repayments",
    "inspections",
    "site_verifications",
    "repeated_mortgage",
    "overvaluation",
}
_FLAGS = {"legal_hold", "overvalued"}


def _out(row: Row) -> dict[str, Any]:
    return {k: loads(v) if k in _JSON else bool(v) if k in _FLAGS else v for k, v in row.items()}


def _children(tx: Tx, t: Tables, loan_numbers: list[str]) -> dict[str, dict[str, list[Any]]]:
    found: dict[str, dict[str, list[Any]]] = {
        n: {"collateral": [], "valuations": [], "documents": []} for n in loan_numbers
    }
    if not loan_numbers:
        return found
    marks = ", ".join("?" for _ in loan_numbers)
    for key, table, order in (
        ("collateral", t[COLLATERAL], "filed_at, registration_id"),
        ("valuations", t[VALUATIONS], "appraised_at, valuation_id"),
        ("documents", t[DOCUMENTS], "uploaded_at, document_id"),
    ):
        rows = tx.execute(
            f"SELECT * FROM {table} WHERE loan_number IN ({marks}) ORDER BY {order}",
            loan_numbers,
        )
        for row in rows:
            found[row["loan_number"]][key].append(_out(row))
    return found


def query(
    store: Store,
    *,
    status: str | None = None,
    classification: str | None = None,
    recovery_category: str | None = None,
    loan_officer: str | None = None,
    collection_officer: str | None = None,
    branch: str | None = None,
    product: str | None = None,
    limit: int = 50,
    offset: int = 0,
    with_children: bool = True,
) -> Page:
    """Loan files matching every given filter (exact match), ordered by loan number."""
    check_page(limit, offset)
    given = {
        "status": status,
        "classification": classification,
        "recovery_category": recovery_category,
        "loan_officer": loan_officer,
        "collection_officer": collection_officer,
        "branch": branch,
        "product": product,
    }
    where = [f"{column} = ?" for column, value in given.items() if value is not None]
    params = [value for value in given.values() if value is not None]
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    with store.read() as tx:
        current = registry.active(tx, LoanFilesView.name)
        if current is None:
            return Page([], 0, limit, offset, 0)
        t = LoanFilesView().tables(current.generation)
        total_row = tx.one(f"SELECT COUNT(*) AS n FROM {t[LOANS]}{clause}", params)
        rows = tx.execute(
            f"SELECT * FROM {t[LOANS]}{clause} ORDER BY loan_number LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        items = [_out(r) for r in rows]
        if with_children:
            children = _children(tx, t, [i["loan_number"] for i in items])
            for item in items:
                item.update(children[item["loan_number"]])
    return Page(items, int(total_row["n"]) if total_row else 0, limit, offset, current.position)


def get(store: Store, loan_number: str) -> dict[str, Any] | None:
    """One loan file with its collateral, valuations and documents, or None."""
    with store.read() as tx:
        current = registry.active(tx, LoanFilesView.name)
        if current is None:
            return None
        t = LoanFilesView().tables(current.generation)
        row = fetch_row(tx, t[LOANS], "loan_number", loan_number)
        if row is None:
            return None
        item = _out(row)
        item.update(_children(tx, t, [loan_number])[loan_number])
        item["view_position"] = current.position
    return item
