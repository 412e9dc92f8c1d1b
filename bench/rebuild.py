"""Rebuild throughput: every view replayed from a large log, against reading the log raw (issue 4).

The store: N genuine events. The default is 200,000 on SQLite and 50,000 on PostgreSQL, so that
the default run stays near 5 minutes. The targets are stated for 1,000,000 on SQLite and
200,000 on PostgreSQL: pass --events for those (a 1M SQLite run takes about 8 minutes
here), and note that the rebuild gets slower per event as the views grow. The events are
made by the domain itself, in memory: ``LoanFile.open`` and the loan commands
(``assign_officer``, ``record_repayment``, ``record_inspection``, ``change_status``,
``classify``, ``record_collection_action``, the NPL investigation and recovery plan),
``MortgageRegistration.file`` with its ``PropertyLiens`` index, ``Valuation.appraise`` and
its review, and ``Document.register`` with the ``LoanDocuments`` index. Each command
validates, hashes and chains its events as it does inside ``ArchiveApp``. About 1,000 loan
files are in progress at once and advance in random order, so the log interleaves them as
a live archive does. Every ~5,000 events, ``archive.save(*aggregates)`` stores them in
one transaction. Only the per-command reload and the HTTP round trip are skipped:
bench/append.py measures those.

Then, on that store:
(a) ``Projections.rebuild_views()``: every view that ``Projections`` runs (loan_files,
    audit_trail and search at the time of writing), rebuilt as ``loan-archive projections
    rebuild`` does. It is the operator's rebuild: new generations; from 100,000 events
    one process per core (``follower.PARALLEL_FROM``), the views shared out among them
    by cost, each process reading the log once for its views (--processes N to choose),
    this process loading the costliest share itself (--server: as a start with stale
    views does, every share in a child process, one more process to start); batches of 25,000 events (``follower.REBUILD_BATCH``)
    read as plain tuples (on PostgreSQL by a reader thread, a batch ahead) and decoded
    only for the views that need them,
    one transaction per batch with position tracking, indexes built after the load, and
    the switches. With --per-view each view is also rebuilt alone (``Projections.rebuild``),
    for its own ratio. The workload has no OCR events (``Document.TextExtracted``), so
    the search view indexes loans and document metadata only. bench/search.py measures
    the search view with extracted text.
(b) Baseline: read every notification with
    ``recorder.select_notifications(start, 1000, inclusive_of_start=False)`` and decode
    each with ``archive.mapper.to_domain_event``. No view work is done.

The rounds are interleaved: (b) runs before and after the rebuilds, and with --rounds R
the order alternates. The best time of each counts. Targets: all views >= 0.5 x (b), and on
SQLite 1,000,000 events rebuilt in under 2 minutes. --profile then rebuilds each view twice
more. The first rebuild is instrumented (perf_counter around the log read, decode, the
view's apply_batch, its SQL, tracking, begin/commit). The second runs under cProfile, for
the hot functions.

    .venv/bin/python bench/rebuild.py [--events N] [--backend sqlite|postgres|both]
                                      [--rounds R] [--per-view] [--profile] [--seed S]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import re
import resource
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(ROOT))

from postgres_cluster import PostgresCluster  # noqa: E402

from archive.application import ArchiveApp  # noqa: E402
from archive.blobstore import content_key  # noqa: E402
from archive.collateral import MortgageRegistration, PropertyLiens  # noqa: E402
from archive.documents import Document, LoanDocuments  # noqa: E402
from archive.domain import ArchiveAggregate, CommandContext, Role  # noqa: E402
from archive.loans import ChecklistItem, LoanFile  # noqa: E402
from archive.settings import Settings  # noqa: E402
from archive.valuations import Valuation  # noqa: E402
from projections import registry  # noqa: E402
from projections import store as view_store  # noqa: E402
from projections.follower import default_processes  # noqa: E402
from projections.runner import Projections  # noqa: E402

TARGET_RATIO = 0.5
TARGET_SECONDS_PER_MILLION = 120.0  # SQLite: 1M events rebuilt (all views) in under 2 minutes
DEFAULT_EVENTS = {"sqlite": 200_000, "postgres": 50_000}
BATCH = 1000  # (b)'s read size, as the issue states it (the rebuild reads 25,000 at a time)
WINDOW = 1000  # loan files in progress at once
SAVE_EVENTS = 5000  # events per archive.save
CENT = Decimal("0.01")

# -- the workload: loan files, built by the domain in memory ----------------------------------

OFFICERS = [f"officer.{n:02d}" for n in range(1, 21)]
COLLECTORS = [f"collector.{n:02d}" for n in range(1, 9)]
ARCHIVISTS = [f"archivist.{n}" for n in range(1, 4)]
AUDITORS = ["auditor.1", "auditor.2"]
INSPECTORS = ["Marta Gil", "Jorge Sanz", "Elena Royo", "Pablo Lahoz"]
REVIEWERS = ["Carmen Ruiz", "Alberto Navarro", "Lucía Ferrer"]
BRANCHES = ["Teruel Centro", "Alcañiz", "Calamocha", "Andorra", "Utrillas", "Monreal"]
SURNAMES = ["Pérez", "García", "Martínez", "López", "Sánchez", "Gómez", "Núñez", "Lázaro"]
PRODUCTS = {"mortgage": 40, "personal": 25, "business": 20, "village_group": 10, "cooperative": 5}
FINDINGS = [
    "Business operating normally; stock and premises as declared.",
    "Borrower present, collateral in good repair, no new liabilities found.",
    "Activity lower than planned; officer to follow up next month.",
    "Premises partly let to a third party; no effect on repayment capacity so far.",
]
OUTCOMES = {
    "call": "Borrower reached by phone; promised to pay within the week.",
    "notice": "Formal notice of arrears delivered by registered mail.",
    "visit": "Visited the borrower at home; agreed a partial payment.",
    "legal_action": "File handed to legal for a claim on the mortgage.",
}
MEDIA = {"application/pdf": ".pdf", "image/tiff": ".tif", "image/jpeg": ".jpg"}


def pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    return date(day.year + month // 12, month % 12 + 1, min(day.day, 28))


Touched = tuple[ArchiveAggregate, ...]


class LoanLife:
    """One loan file's life as commands on in-memory aggregates. Each ``next()`` runs one
    command, as ArchiveApp would minus the reload, and yields the aggregates it changed."""

    def __init__(self, rng: random.Random, number: str, seq: int) -> None:
        self.rng = rng
        self.number = number
        self.seq = seq
        self.index: LoanDocuments | None = None
        self.documents: list[Document] = []

    def ctx(
        self,
        who: Sequence[str] = OFFICERS,
        role: Role = Role.CREDIT_OFFICER,
        reason: str | None = None,
    ) -> CommandContext:
        return CommandContext(self.rng.choice(who), role.value, reason)

    def document(self, doc_type: str, name: str, **links: Any) -> Touched:
        """An original filed under the loan: ``Document.register`` and the loan's index,
        as ``register_document`` does. The bytes are not stored; no view reads them."""
        rng = self.rng
        c = self.ctx(ARCHIVISTS, Role.ARCHIVIST)
        media = rng.choice(list(MEDIA))
        digest = rng.randbytes(32).hex()
        doc = Document.register(
            c,
            uuid.uuid4(),
            loan_number=self.number,
            collateral_id=links.get("collateral_id"),
            valuation_id=links.get("valuation_id"),
            doc_type=doc_type,
            original_filename=f"{name}{MEDIA[media]}",
            media_type=media,
            size=rng.randrange(40_000, 8_000_000),
            sha256=digest,
            object_key=content_key(digest),
            object_version=None,
            retain_until=None,
            supersedes=None,
        )
        if self.index is None:
            self.index = LoanDocuments.start(c, self.number)
        self.index.file(c, doc.id, digest, doc_type)
        self.documents.append(doc)
        return doc, self.index

    def __iter__(self) -> Iterator[Touched]:
        rng, number, seq = self.rng, self.number, self.seq
        product = pick(rng, PRODUCTS)
        principal = Decimal(rng.randrange(500_000, 25_000_000)) * CENT
        term = rng.choice([24, 36, 60, 120, 180, 240, 300])
        disbursed = date(2019, 1, 1) + timedelta(days=rng.randrange(5 * 365))
        borrower = (
            f"{rng.choice(['Ana', 'Luis', 'Pilar', 'Javier', 'Rosa'])} {rng.choice(SURNAMES)}"
        )
        group = (
            f"Grupo {rng.choice(SURNAMES)} {seq % 97}"
            if product in ("village_group", "cooperative")
            else None
        )
        loan = LoanFile.open(
            self.ctx(),
            loan_number=number,
            borrower_name=borrower,
            borrower_national_id=f"{seq:08d}{'TRWAGMYFPDXBNJZSQVHLCKE'[seq % 23]}",
            product=product,
            principal=str(principal),
            currency_code="EUR",
            interest_rate=str(Decimal(rng.randrange(200, 1200)) * CENT),
            term_months=term,
            disbursement_date=disbursed,
            maturity_date=add_months(disbursed, term),
            branch=rng.choice(BRANCHES),
            village_group=group,
        )
        yield (loan,)
        loan.assign_officer(self.ctx(), "loan", rng.choice(OFFICERS))
        yield (loan,)
        yield self.document("contract", f"contrato-{number}")
        yield self.document("identity_document", f"dni-{seq:08d}")

        registration = None
        if product == "mortgage":
            c = self.ctx()
            registration = MortgageRegistration.file(
                c,
                uuid.uuid4(),
                loan_number=number,
                cadastral_reference=f"{seq:07d}VH{rng.randrange(10_000):04d}S0001WX",
                address=f"Calle {rng.choice(SURNAMES)} {rng.randrange(1, 200)}, Teruel",
                owner=borrower,
                registry_office="Registro de la Propiedad de Teruel",
                lien_rank=1,
                secured_amount=str((principal * Decimal("1.2")).quantize(CENT)),
                currency_code="EUR",
            )
            prop = PropertyLiens.index(c, registration.cadastral_reference)
            prop.add_lien(c, registration.id, number, 1)
            loan.link_collateral(c, registration.id)
            yield registration, prop, loan
            yield self.document(
                "mortgage_deed", f"escritura-{number}", collateral_id=registration.id
            )
        if product == "mortgage" or (product == "business" and rng.random() < 0.4):
            c = self.ctx()
            appraised = (principal * Decimal(rng.choice(["1.25", "1.4", "1.6"]))).quantize(CENT)
            valuation = Valuation.appraise(
                c,
                uuid.uuid4(),
                loan_number=number,
                collateral_id=registration.id if registration else None,
                agency="Tasaciones Aragón SA",
                appraiser="Luis Gómez",
                method="market_comparison",
                appraised_value=str(appraised),
                currency_code="EUR",
                appraisal_date=disbursed - timedelta(days=20),
            )
            loan.link_valuation(c, valuation.id)
            yield valuation, loan
            cut = Decimal(rng.choice(["1.00", "0.97", "0.95", "0.85"]))  # 0.85: overvalued
            valuation.review_value(
                self.ctx(),
                rng.choice(REVIEWERS),
                str((appraised * cut).quantize(CENT)),
                Decimal("0.10"),
                rng.choice([None, "Comparables in the same street are lower."]),
            )
            yield (valuation,)
            yield self.document("valuation_report", f"tasacion-{number}", valuation_id=valuation.id)
        if registration is not None:
            registration.mark_registered(
                self.ctx(),
                f"Tomo {rng.randrange(1000, 3000)}, Libro {rng.randrange(10, 300)}, "
                f"Folio {rng.randrange(1, 200)}, Finca {rng.randrange(1000, 30000)}",
                disbursed + timedelta(days=rng.randrange(20, 60)),
            )
            yield (registration,)

        instalment = (principal / term * Decimal("1.05")).quantize(CENT)
        months = rng.randint(10, 30)
        inspections = set(rng.sample(range(months), rng.randint(1, 3)))
        trouble_at = rng.randrange(2, months) if rng.random() < 0.25 else -1
        for month in range(months):
            day = add_months(disbursed, month + 1)
            if month == trouble_at:
                non_performing = yield from self.delinquency(loan, instalment, day)
                if non_performing:
                    return  # the file stays with collections
            amount = min(instalment, loan.outstanding)
            if amount <= 0:
                break
            loan.record_repayment(self.ctx(), amount, day)
            yield (loan,)
            if month in inspections:
                loan.record_inspection(
                    self.ctx(),
                    rng.choice(["monthly", "quarterly"]),
                    day + timedelta(days=3),
                    rng.choice(INSPECTORS),
                    rng.choice(FINDINGS),
                )
                yield (loan,)
            if rng.random() < 0.04:  # someone reads an original: a custody event
                doc = rng.choice(self.documents)
                doc.record_download(self.ctx(AUDITORS, Role.AUDITOR), None)
                yield (doc,)
        if rng.random() < 0.05 or loan.outstanding <= 0:
            loan.change_status(self.ctx(reason="early repayment"), "settled")
            yield (loan,)

    def delinquency(
        self, loan: LoanFile, instalment: Decimal, day: date
    ) -> Generator[Touched, None, bool]:
        """Arrears: overdue, downgrade, collector, collection actions; then cured, or NPL
        with investigation, recovery category and plan, and legal action."""
        rng = self.rng
        if loan.outstanding <= instalment:  # (almost) repaid: no arrears worth the name
            return False
        loan.change_status(self.ctx(reason="31 days past due"), "overdue")
        yield (loan,)
        loan.classify(self.ctx(reason="arrears over 30 days"), "special_mention")
        yield (loan,)
        loan.assign_officer(self.ctx(), "collection", rng.choice(COLLECTORS))
        yield (loan,)
        for n in range(rng.randint(1, 3)):
            kind = ["call", "notice", "visit"][n]
            paid = min(instalment, loan.outstanding) if kind == "visit" else Decimal("0")
            loan.record_collection_action(
                self.ctx(COLLECTORS),
                kind,
                day + timedelta(days=7 * (n + 1)),
                OUTCOMES[kind],
                paid,
                loan.collection_officer,
            )
            yield (loan,)
            if kind == "notice":
                yield self.document("collection_notice", f"requerimiento-{self.number}")
        if rng.random() < 0.6:
            loan.change_status(self.ctx(reason="arrears cleared"), "performing")
            yield (loan,)
            loan.classify(self.ctx(reason="arrears cleared"), "pass")
            yield (loan,)
            return False
        loan.change_status(self.ctx(reason="90 days past due"), "non_performing")
        yield (loan,)
        loan.classify(self.ctx(reason="non-performing"), "substandard")
        yield (loan,)
        loan.record_investigation(
            self.ctx(COLLECTORS),
            {item.value: rng.random() < 0.6 for item in ChecklistItem},
            day + timedelta(days=60),
            "Borrower's business closed; guarantor located.",
        )
        yield (loan,)
        loan.categorise_recovery(
            self.ctx(COLLECTORS),
            rng.choice(["recoverable", "recoverable_with_effort", "temporarily_unrecoverable"]),
            ["loss of main customer", "illness in the family"][: rng.randint(1, 2)],
        )
        yield (loan,)
        loan.set_recovery_plan(
            self.ctx(COLLECTORS),
            "Claim on the collateral; negotiate a payment plan with the guarantor.",
            day + timedelta(days=365),
            str(loan.outstanding),
        )
        yield (loan,)
        loan.record_collection_action(
            self.ctx(COLLECTORS),
            "legal_action",
            day + timedelta(days=95),
            OUTCOMES["legal_action"],
            Decimal("0"),
            loan.collection_officer,
        )
        yield (loan,)
        yield self.document("court_filing", f"demanda-{self.number}")
        return True


@dataclass
class Generated:
    events: int
    loans: int
    saves: int
    seconds: float
    state_bytes: float  # average len(state) of the stored events
    by_type: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


class Saver:
    """Collects the aggregates that have pending events and saves them in bulk."""

    def __init__(self, archive: ArchiveApp) -> None:
        self.archive = archive
        self.batch: dict[uuid.UUID, ArchiveAggregate] = {}
        self.counted: dict[uuid.UUID, int] = {}
        self.pending = 0
        self.saved = 0
        self.saves = 0
        self.state_bytes = 0
        self.by_type: Counter[str] = Counter()

    def touch(self, aggregates: Touched) -> None:
        for agg in aggregates:
            n = len(agg.pending_events)
            self.pending += n - self.counted.get(agg.id, 0)
            self.counted[agg.id] = n
            self.batch[agg.id] = agg

    def flush(self) -> None:
        if not self.batch:
            return
        recordings = self.archive.save(*self.batch.values())
        for r in recordings:
            self.by_type[type(r.domain_event).__qualname__] += 1
            self.state_bytes += len(r.notification.state)
        self.saved += len(recordings)
        self.saves += 1
        self.batch.clear()
        self.counted.clear()
        self.pending = 0


def generate(archive: ArchiveApp, total: int, seed: int, label: str = "") -> Generated:
    """Store about ``total`` events (it stops within one command of it) of many loan files."""
    rng = random.Random(seed)
    saver = Saver(archive)
    lives: list[Iterator[Touched]] = []
    seq = 0
    perf = time.perf_counter
    began = last_report = perf()
    while saver.saved + saver.pending < total:
        while len(lives) < WINDOW:
            seq += 1
            lives.append(iter(LoanLife(rng, f"{label}R{seed}-{seq:07d}", seq)))
        i = rng.randrange(len(lives))
        try:
            saver.touch(next(lives[i]))
        except StopIteration:
            lives[i] = lives[-1]
            lives.pop()
            continue
        if saver.pending >= SAVE_EVENTS:
            saver.flush()
            if perf() - last_report > 20:
                last_report = perf()
                print(
                    f"    generated {saver.saved:9d} / {total} events "
                    f"({saver.saved / (last_report - began):6.0f} ev/s)",
                    flush=True,
                )
    saver.flush()
    seconds = perf() - began
    return Generated(
        saver.saved,
        saver.by_type["LoanFile.Opened"],
        saver.saves,
        seconds,
        saver.state_bytes / max(1, saver.saved),
        saver.by_type,
    )


# -- (b) the baseline: read and decode ------------------------------------------------------


def read_raw(archive: ArchiveApp, batch: int = BATCH) -> int:
    """Every notification, read in batches as the follower reads them, and decoded."""
    recorder, decode = archive.recorder, archive.mapper.to_domain_event
    start = count = 0
    while True:
        notes = recorder.select_notifications(start, batch, inclusive_of_start=False)
        if not notes:
            return count
        for note in notes:
            decode(note)
        count += len(notes)
        start = notes[-1].id


# -- (a) the rebuild --------------------------------------------------------------------------


@dataclass
class Pass:
    what: str  # "raw" or a view name
    events: int
    seconds: float
    #: CPU seconds of this process and of the rebuild's child processes (steadier than
    #: the wall time on a shared machine, and it shows what the processes cost in all)
    cpu: float = 0.0
    child_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def progress_printer(name: str) -> Callable[[int, int], None]:
    began = last = time.perf_counter()

    def progress(position: int, head: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last > 30:
            last = now
            print(
                f"    {name}: {position:9d} / {head} ({position / (now - began):6.0f} ev/s)",
                flush=True,
            )

    return progress


ALL = "all views"


def rebuild_pass(
    projections: Projections,
    what: str,
    head: int,
    processes: int | None = None,
    join: bool = True,
) -> Pass:
    """One rebuild: of every view (``ALL``; in ``processes``, by default as the operator's
    rebuild chooses, this process loading a share too unless ``join`` is False), or of
    one view alone."""
    cpu0, children0, t0 = cpu_seconds(), cpu_seconds(children=True), time.perf_counter()
    if what == ALL:
        projections.rebuild_views(progress=progress_printer(what), processes=processes, join=join)
    else:
        projections.rebuild(what, progress=progress_printer(what))
    seconds = time.perf_counter() - t0
    cpu, children = cpu_seconds() - cpu0, cpu_seconds(children=True) - children0
    return Pass(what, head, seconds, cpu, children)


def raw_pass(archive: ArchiveApp) -> Pass:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    n = read_raw(archive)
    return Pass("raw", n, time.perf_counter() - t0, cpu_seconds() - cpu0)


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU time of this process, or of its children that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def check_views(projections: Projections, generated: Generated, head: int) -> list[str]:
    """The rebuilt views are complete: no lag, one audit row per event, one row per loan."""
    problems = [f"{s.view} lags {s.lag}" for s in projections.status() if s.lag]
    with projections.store.read() as tx:
        for name, table, expected in (
            ("loan_files", "loan_files", generated.loans),
            ("audit_trail", "audit_events", head),
        ):
            if name not in projections.views:
                continue
            active = registry.active(tx, name)
            assert active is not None
            physical = projections.views[name].tables(active.generation)[table]
            row = tx.one(f"SELECT COUNT(*) AS n FROM {physical}")
            found = int(row["n"]) if row else 0
            if found != expected:
                problems.append(f"{physical} has {found} rows, expected {expected}")
    return problems


# -- --profile: where the time goes -------------------------------------------------------------


TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+(\w+?)(?:_g\d+)?\b")


class Clock:
    """Wall time per label, for an instrumented rebuild (perf_counter around the calls)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.in_apply = False

    def add(self, key: str, seconds: float, calls: int = 1) -> None:
        self.seconds[key] += seconds
        self.calls[key] += calls


@contextmanager
def instrumented(archive: ArchiveApp, projections: Projections, name: str) -> Iterator[Clock]:
    """Wrap the log read, the decode, the view's apply, the SQL and the transaction of one
    view's rebuild with timers. Only this process's objects are patched, and restored after."""
    clock = Clock()
    perf = time.perf_counter
    view = projections.views[name]
    recorder, mapper, store = archive.recorder, archive.mapper, projections.store
    originals = {
        "select": recorder.select_notifications,
        "decode": mapper.to_domain_event,
        "transaction": store.transaction,
    }
    tx_classes = (view_store._SQLiteTx, view_store._PostgresTx)
    tx_methods = {
        (cls, m): getattr(cls, m)
        for cls in tx_classes
        for m in ("execute", "executemany", "insert_rows", "upsert_rows")
    }

    def select(*args: Any, **kwargs: Any) -> Any:
        t0 = perf()
        try:
            return originals["select"](*args, **kwargs)
        finally:
            clock.add("read log (select_notifications)", perf() - t0)

    def decode(note: Any) -> Any:
        t0 = perf()
        try:
            return originals["decode"](note)
        finally:
            clock.add("decode (to_domain_event)", perf() - t0)

    def apply_batch(tx: Any, tables: Any, events: Any, cache: Any) -> None:
        clock.in_apply = True
        t0 = perf()
        try:
            type(view).apply_batch(view, tx, tables, events, cache)
        finally:
            clock.in_apply = False
            clock.add("apply_batch", perf() - t0, len(events))

    def sql_timer(method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(self: Any, sql: str, *args: Any) -> Any:
            t0 = perf()
            try:
                return method(self, sql, *args)
            finally:
                spent = perf() - t0
                if method.__name__.endswith("_rows"):  # insert_rows/upsert_rows: sql is a table
                    verb = method.__name__.split("_")[0].upper()
                    what = f"{verb} ROWS {re.sub(r'_g[0-9]+$', '', sql)}"
                else:
                    m = TABLE.search(sql)
                    what = f"{sql.split(None, 1)[0]} {m.group(1) if m else '?'}"
                if clock.in_apply:
                    clock.add(f"sql {what}", spent)
                    clock.add("sql (in apply)", spent)
                else:
                    clock.add("tracking sql (registry)", spent)

        return timed

    @contextmanager
    def transaction() -> Iterator[Any]:
        cm = originals["transaction"]()
        t0 = perf()
        tx = cm.__enter__()
        clock.add("begin/commit", perf() - t0, 0)
        try:
            yield tx
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            t0 = perf()
            cm.__exit__(None, None, None)
            clock.add("begin/commit", perf() - t0)

    recorder.select_notifications = select  # type: ignore[method-assign]
    mapper.to_domain_event = decode  # type: ignore[method-assign]
    store.transaction = transaction  # type: ignore[method-assign]
    view.apply_batch = apply_batch  # type: ignore[method-assign]
    for (cls, m), method in tx_methods.items():
        setattr(cls, m, sql_timer(method))
    try:
        yield clock
    finally:
        for attr, obj in (
            ("select_notifications", recorder),
            ("to_domain_event", mapper),
            ("transaction", store),
            ("apply_batch", view),
        ):
            obj.__dict__.pop(attr, None)
        for (cls, m), method in tx_methods.items():
            setattr(cls, m, method)


def breakdown(name: str, clock: Clock, total: float, events: int) -> str:
    us = 1e6 / events
    s = clock.seconds
    apply_total = s["apply_batch"]
    sql_apply = s["sql (in apply)"]
    rows = [
        ("total (instrumented)", total),
        ("read log (select_notifications)", s["read log (select_notifications)"]),
        ("decode (to_domain_event)", s["decode (to_domain_event)"]),
        ("view apply_batch", apply_total),
        ("  of which SQL", sql_apply),
        ("  of which Python", apply_total - sql_apply),
        ("tracking sql (registry)", s["tracking sql (registry)"]),
        ("begin/commit", s["begin/commit"]),
    ]
    accounted = sum(v for k, v in rows[1:] if not k.startswith("  "))
    rows.append(("the rest (batch loop, progress)", total - accounted))
    out = [f"  {name}: where the time goes, µs per event ({events} events)"]
    out += [f"    {k:34} {v * us:8.1f} µs {100 * v / total:5.1f} %" for k, v in rows]
    out.append("    SQL statements in apply (µs per event, calls per event):")
    for k, v in sorted(s.items(), key=lambda kv: -kv[1]):
        if k.startswith("sql ") and k != "sql (in apply)":
            out.append(f"      {k[4:]:32} {v * us:8.1f} µs {clock.calls[k] / events:5.2f} calls")
    return "\n".join(out)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    generated: Generated
    views: list[str]
    passes: list[Pass]
    problems: list[str]
    profile: list[str] = field(default_factory=list)
    #: processes the rebuild of all views ran in
    processes: int = 1

    def best(self, what: str) -> Pass:
        return min((p for p in self.passes if p.what == what), key=lambda p: p.seconds)

    @property
    def events(self) -> int:
        return self.generated.events

    @property
    def all_views_seconds(self) -> float:
        return self.best(ALL).seconds

    @property
    def all_views_rate(self) -> float:
        return self.events / self.all_views_seconds

    @property
    def ratio(self) -> float:
        return self.all_views_rate / self.best("raw").rate


def measure(
    backend: str,
    settings: Settings,
    total: int,
    rounds: int,
    seed: int,
    per_view: bool,
    profile: bool,
    processes: int | None = None,
    join: bool = True,
) -> Result:
    archive = ArchiveApp(settings)
    try:
        print(f"  {backend}: generating {total} events ...", flush=True)
        gen = generate(archive, total, seed)
        print(
            f"  {backend}: {gen.events} events of {gen.loans} loan files in {gen.seconds:.1f} s "
            f"= {gen.rate:.0f} ev/s ({gen.saves} saves, avg state {gen.state_bytes:.0f} B)",
            flush=True,
        )
        head = archive.head_position()
        passes: list[Pass] = []
        with Projections.open(settings, archive) as projections:
            views = list(projections.views)  # every view the archive runs
            rebuilds = [ALL, *(views if per_view else [])]

            def run(what: str) -> None:
                p = (
                    raw_pass(archive)
                    if what == "raw"
                    else rebuild_pass(projections, what, head, processes, join)
                )
                passes.append(p)
                print(
                    f"  {backend:8} {what:12} {p.events:8d} events in {p.seconds:7.1f} s "
                    f"= {p.rate:8.0f} ev/s; CPU {p.cpu:6.1f} s here"
                    + (f" + {p.child_cpu:.1f} s in child processes" if p.child_cpu else ""),
                    flush=True,
                )

            run("raw")
            for rnd in range(rounds):
                for what in rebuilds if rnd % 2 == 0 else rebuilds[::-1]:
                    run(what)
                run("raw")
            problems = check_views(projections, gen, head)
            result = Result(backend, gen, views if per_view else [], passes, problems)
            used = processes if processes is not None else default_processes(head)
            result.processes = min(used, len(views))
            if profile:
                result.profile = profile_views(archive, projections, head, gen)
        return result
    finally:
        archive.close()


def round_trip(projections: Projections, n: int = 2000) -> float:
    """Seconds per ``SELECT 1`` through the views store: the floor under every statement."""
    with projections.store.transaction() as tx:
        t0 = time.perf_counter()
        for _ in range(n):
            tx.execute("SELECT 1")
        return (time.perf_counter() - t0) / n


def profile_views(
    archive: ArchiveApp, projections: Projections, head: int, gen: Generated
) -> list[str]:
    floor = round_trip(projections)
    out = [
        f"  one statement's floor: SELECT 1 through the views store = {1e6 * floor:.1f} µs "
        f"({projections.store.backend})"
    ]
    for name in projections.views:
        print(f"  profiling {name}: instrumented rebuild ...", flush=True)
        with instrumented(archive, projections, name) as clock:
            t0 = time.perf_counter()
            projections.rebuild(name)
            total = time.perf_counter() - t0
        out.append(breakdown(name, clock, total, head))
        print(f"  profiling {name}: cProfile rebuild ...", flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        projections.rebuild(name)
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        out.append(
            f"  cProfile of the {name} rebuild, by own time (profiling slows Python down "
            f"more than SQL: use the instrumented table for shares):\n{text.getvalue()}"
        )
    return out


@contextmanager
def bench_settings(backend: str, name: str) -> Iterator[Settings]:
    """Fresh stores for one benchmark: SQLite in a temporary directory, or a new database
    on a throwaway PostgreSQL cluster (or on ARCHIVE_TEST_POSTGRES_URL's server)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if backend == "sqlite":
            yield Settings(data_dir=Path(tmp), database_url=None, demo_data=False)
            return
        cluster = PostgresCluster()
        try:
            cluster.start()
            url = cluster.create_database(f"bench_{name}_{uuid.uuid4().hex[:8]}")
            yield Settings(data_dir=Path(tmp), database_url=url, demo_data=False)
        finally:
            cluster.stop()


def report(results: list[Result]) -> None:
    print()
    print("All views: N / time of one rebuild of every view in one pass; each view (with")
    print("--per-view): ev/s of its rebuild alone (its ratio to (b)).")
    for res in results:
        raw = res.best("raw")
        per_million = res.all_views_seconds * 1e6 / res.events
        verdict = "ok" if res.ratio >= TARGET_RATIO else "BELOW"
        print(
            f"{'backend':9} {'events':>9} {'(b) raw ev/s':>13} "
            + " ".join(f"{v + ' ev/s':>20}" for v in res.views)
            + f" {'all views ev/s':>15} {'ratio':>6} {'target':>7} {'all views s':>12}"
            f" {'per 1M events':>14}"
        )
        cells = []
        for v in res.views:
            best = res.best(v)
            cells.append(f"{best.rate:13.0f} ({best.rate / raw.rate:.2f})")
        print(
            f"{res.backend:9} {res.events:9d} {raw.rate:13.0f} "
            + " ".join(f"{c:>20}" for c in cells)
            + f" {res.all_views_rate:15.0f} {res.ratio:6.2f} {'>=' + str(TARGET_RATIO):>7}"
            f" {res.all_views_seconds:11.1f}s {per_million:13.0f}s  {verdict}"
        )
        if res.backend == "sqlite":
            ok = per_million < TARGET_SECONDS_PER_MILLION
            print(
                f"{'':9} 1M events, all views: {per_million:.0f} s "
                f"(target < {TARGET_SECONDS_PER_MILLION:.0f} s) {'ok' if ok else 'MISSED'}"
                + ("" if res.events >= 1_000_000 else " (extrapolated linearly)")
            )
        print(f"{'':9} all views rebuilt in {res.processes} process(es)")
        raws = [p.rate for p in res.passes if p.what == "raw"]
        print(
            f"{'':9} best pass of each; raw passes {' '.join(f'{r:.0f}' for r in raws)} ev/s "
            f"(spread {100 * (max(raws) - min(raws)) / max(raws):.0f} %); generated at "
            f"{res.generated.rate:.0f} ev/s"
        )
        for problem in res.problems:
            print(f"{'':9} VIEW CHECK FAILED: {problem}")
        if not res.problems:
            print(f"{'':9} views checked: no lag, one audit row per event, one row per loan")
    print()
    print("The log (events by type, share):")
    for res in results:
        total = res.generated.events
        mix = ", ".join(
            f"{k} {100 * n / total:.1f}%" for k, n in res.generated.by_type.most_common()
        )
        print(
            f"  {res.backend}: {res.generated.loans} loan files, {total / res.generated.loans:.1f} "
            f"events per file, avg state {res.generated.state_bytes:.0f} B: {mix}"
        )
    for res in results:
        for block in res.profile:
            print(f"\n[{res.backend}]\n{block}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, help="events in the store (default 200000 sqlite, 50000 postgres)"
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rebuilds of each kind, interleaved (default 1)"
    )
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument(
        "--per-view", action="store_true", help="also rebuild each view alone, for its ratio"
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="processes for the rebuild of all views (default: as the operator's rebuild,"
        " one per core from 100,000 events)",
    )
    parser.add_argument(
        "--server",
        action="store_true",
        help="rebuild all views as a server's start does: every share in a child process"
        " (default: as the command line does, this process loading one share)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then rebuild each view instrumented and under cProfile",
    )
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]

    results: list[Result] = []
    began = time.perf_counter()
    for backend in backends:
        total = args.events or DEFAULT_EVENTS[backend]
        print(f"{backend}: {total} events, {args.rounds} round(s)", flush=True)
        with bench_settings(backend, "rebuild") as settings:
            results.append(
                measure(
                    backend,
                    settings,
                    total,
                    args.rounds,
                    args.seed,
                    args.per_view,
                    args.profile,
                    args.processes,
                    not args.server,
                )
            )
    report(results)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(f"\n(whole run {time.perf_counter() - began:.0f} s, peak RSS {peak:.0f} MiB)")
    return 0  # a benchmark reports; it does not fail `make bench` on a noisy machine


if __name__ == "__main__":
    sys.exit(main())
