"""Replay: a loan file as it was, from snapshots, and the hash chain verified per million events (issue 4).

The store: about N background events (default 200,000), made as in bench/rebuild.py. These
are genuine domain events of many loan files, saved in bulk. Then one long-lived loan file
with 1,000 events of its own: a business loan with its mortgage, valuation and documents,
then repayments, inspections, officer changes and arrears episodes. It is saved every 20
events, so ``ArchiveApp`` takes its snapshots (every 100 events) as it always does.

(a) Reconstruction of that loan at ~30 random moments and ~30 random versions:
    ``archive.loan_file(n, as_of=moment)`` and ``archive.loan_file(n, version=v)``. This is
    the whole file: loan, collateral, valuation and documents. Each call is timed against
    the same call on an ``ArchiveApp`` without snapshots (same store, same code, no
    snapshot store), which replays all the events up to the moment. The order alternates
    per sample. Also timed: ``state_at`` of the loan alone, and a full replay of its 1,000
    events (``archive.repository.event_store.get(id)`` + ``replay``). Both variants must
    give the same file. Target: median and p95 of ``loan_file(as_of=...)`` under 50 ms.
(b) Hash-chain verification of the whole store: ``verify_store`` (every event decoded,
    re-encoded, hashed and linked) and ``verify_chain()`` (the same, plus every snapshot
    checked against the events it summarises). Both are extrapolated per million events
    and compared with reading and decoding the log (bench/rebuild.py's baseline). The
    passes are interleaved; the best counts.

    .venv/bin/python bench/replay.py [--events N] [--backend sqlite|postgres|both]
                                     [--samples S] [--rounds R] [--seed S]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/rebuild.py: the workload generator

from rebuild import (  # noqa: E402 (rebuild.py puts tests/ and the root on sys.path)
    COLLECTORS,
    FINDINGS,
    INSPECTORS,
    OFFICERS,
    OUTCOMES,
    bench_settings,
    generate,
    read_raw,
)

from archive.application import ArchiveApp, replay  # noqa: E402
from archive.blobstore import content_key  # noqa: E402
from archive.collateral import MortgageRegistration, PropertyLiens  # noqa: E402
from archive.documents import Document, LoanDocuments  # noqa: E402
from archive.domain import CommandContext, Role  # noqa: E402
from archive.integrity import verify_store  # noqa: E402
from archive.loans import LoanFile, loan_id  # noqa: E402
from archive.settings import Settings  # noqa: E402
from archive.valuations import Valuation  # noqa: E402

TARGET_MS = 50.0
DEFAULT_EVENTS = {"sqlite": 200_000, "postgres": 200_000}
LONG_EVENTS = 1000  # events of the long-lived loan file
SAVE_EVERY = 20  # its events per save (snapshots are taken by save, every 100)


class ArchiveWithoutSnapshots(ArchiveApp):
    """The same application on the same store, with no snapshot store: every past state
    is replayed from the first event."""

    name = "Archive"  # the same tables
    snapshotting_intervals: ClassVar[dict[type, int]] = {}
    snapshotting_projectors: ClassVar[dict[type, Any]] = {}


# -- the long-lived loan file --------------------------------------------------------------------


def long_loan(archive: ArchiveApp, number: str, seed: int, events: int = LONG_EVENTS) -> LoanFile:
    """A 25-year business loan with ``events`` events of its own, saved every 20 events."""
    rng = random.Random(seed)

    def ctx(who: list[str] = OFFICERS, reason: str | None = None) -> CommandContext:
        return CommandContext(rng.choice(who), Role.CREDIT_OFFICER.value, reason)

    disbursed = date(2001, 3, 12)
    loan = LoanFile.open(
        ctx(),
        loan_number=number,
        borrower_name="Cooperativa Agraria del Jiloca",
        borrower_national_id="F44012345",
        product="business",
        principal="4800000.00",
        currency_code="EUR",
        interest_rate="4.25",
        term_months=300,
        disbursement_date=disbursed,
        maturity_date=date(2026, 3, 12),
        branch="Calamocha",
    )
    loan.assign_officer(ctx(), "loan", OFFICERS[0])
    c = ctx()
    registration = MortgageRegistration.file(
        c,
        uuid.uuid4(),
        loan_number=number,
        cadastral_reference="44050A012000340000QZ",
        address="Polígono 12, parcela 34, Calamocha",
        owner="Cooperativa Agraria del Jiloca",
        registry_office="Registro de la Propiedad de Calamocha",
        lien_rank=1,
        secured_amount="5760000.00",
        currency_code="EUR",
    )
    prop = PropertyLiens.index(c, registration.cadastral_reference)
    prop.add_lien(c, registration.id, number, 1)
    loan.link_collateral(c, registration.id)
    registration.mark_registered(ctx(), "Tomo 1201, Libro 88, Folio 14, Finca 9931", disbursed)
    valuation = Valuation.appraise(
        ctx(),
        uuid.uuid4(),
        loan_number=number,
        collateral_id=registration.id,
        agency="Tasaciones Aragón SA",
        appraiser="Luis Gómez",
        method="income",
        appraised_value="7200000.00",
        currency_code="EUR",
        appraisal_date=disbursed - timedelta(days=30),
    )
    loan.link_valuation(ctx(), valuation.id)
    valuation.review_value(ctx(), "Carmen Ruiz", "6900000.00", Decimal("0.10"))
    archivist = CommandContext("archivist.1", Role.ARCHIVIST.value, None)
    index = LoanDocuments.start(archivist, number)
    documents = []
    for doc_type, name in (
        ("contract", "poliza-credito.pdf"),
        ("mortgage_deed", "escritura-hipoteca.pdf"),
        ("valuation_report", "tasacion.pdf"),
    ):
        digest = rng.randbytes(32).hex()
        doc = Document.register(
            archivist,
            uuid.uuid4(),
            loan_number=number,
            collateral_id=registration.id if doc_type == "mortgage_deed" else None,
            valuation_id=valuation.id if doc_type == "valuation_report" else None,
            doc_type=doc_type,
            original_filename=name,
            media_type="application/pdf",
            size=rng.randrange(200_000, 4_000_000),
            sha256=digest,
            object_key=content_key(digest),
            object_version=None,
            retain_until=None,
            supersedes=None,
        )
        index.file(archivist, doc.id, digest, doc_type)
        documents.append(doc)
    archive.save(loan, registration, prop, valuation, index, *documents)

    instalment = Decimal("3100.00")
    month = 0
    episode: list[Callable[[], None]] = []
    while loan.version < events:
        # Instalments every nine days: a thousand events fit the 25-year term, so no date is
        # after maturity or in the future (the domain refuses those).
        day = disbursed + timedelta(days=9 * month)
        if episode:
            episode.pop(0)()
        elif rng.random() < 0.06 and loan.status == "performing":  # arrears, then cured
            episode = [
                lambda: loan.change_status(ctx(reason="31 days past due"), "overdue"),
                lambda: loan.classify(ctx(reason="arrears over 30 days"), "special_mention"),
                lambda d=day: loan.record_collection_action(
                    ctx(COLLECTORS), "call", d, OUTCOMES["call"], Decimal("0"), COLLECTORS[0]
                ),
                lambda d=day: loan.record_collection_action(
                    ctx(COLLECTORS), "visit", d, OUTCOMES["visit"], instalment, COLLECTORS[1]
                ),
                lambda: loan.change_status(ctx(reason="arrears cleared"), "performing"),
                lambda: loan.classify(ctx(reason="arrears cleared"), "pass"),
            ]
            continue
        elif rng.random() < 0.12:
            loan.record_inspection(
                ctx(), "quarterly", day, rng.choice(INSPECTORS), rng.choice(FINDINGS)
            )
        elif rng.random() < 0.03:
            current = loan.loan_officer
            loan.assign_officer(ctx(), "loan", rng.choice([o for o in OFFICERS if o != current]))
        else:
            month += 1
            loan.record_repayment(ctx(), min(instalment, loan.outstanding), day)
        if loan.version % SAVE_EVERY == 0:
            archive.save(loan)
    archive.save(loan)
    return loan


# -- (a) reconstruction -------------------------------------------------------------------------


@dataclass
class Timings:
    label: str
    with_snapshots: list[float] = field(default_factory=list)
    without: list[float] = field(default_factory=list)


def ms(values: list[float]) -> tuple[float, float]:
    """Median and p95 (nearest rank) in milliseconds."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return 1e3 * statistics.median(ordered), 1e3 * p95


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


@dataclass
class Reconstruction:
    timings: list[Timings]
    full_replay: list[float]
    mismatches: int
    snapshots: int
    samples: int
    decoded: float  # snapshots state_at decodes per call, on average
    snapshot_bytes: float  # average stored size of the loan's snapshots


def pick_snapshot(app: ArchiveApp, aggregate_id: uuid.UUID, moment: datetime) -> int:
    """``state_at``'s first step on its own: pick the snapshot (``snapshots_around``) and
    decode it. Returns how many snapshots were decoded."""
    base, _ = app.snapshots_around([aggregate_id], moment).get(aggregate_id, (None, None))
    if base is None or app.snapshots is None:
        return 0
    return len(list(app.snapshots.get(aggregate_id, gt=base - 1, lte=base)))


def reconstruct(
    archive: ArchiveApp, plain: ArchiveWithoutSnapshots, loan: LoanFile, samples: int, seed: int
) -> Reconstruction:
    rng = random.Random(seed)
    number, lid = loan.loan_number, loan_id(loan.loan_number)
    first, last = loan.created_on, loan.modified_on
    span = (last - first).total_seconds()
    as_of = Timings("loan_file(as_of=moment)")
    by_version = Timings("loan_file(version=v)")
    state_at = Timings("state_at(loan id, moment)")
    picking = Timings("  of which picking the snapshot")
    get_version = Timings("repository.get(loan id, version=v)")
    mismatches = 0
    decoded: list[int] = []
    full: list[float] = []
    # One warm-up call each: connections, the aggregate cache, the OS file cache.
    archive.loan_file(number, as_of=last)
    plain.loan_file(number, as_of=last)
    for i in range(samples):
        moment = first + timedelta(seconds=rng.uniform(0, span))
        version = rng.randint(1, LONG_EVENTS)
        apps = [(archive, True), (plain, False)]
        if i % 2:
            apps.reverse()
        files: dict[bool, list[Any]] = {True: [], False: []}
        for app, snap in apps:
            for timing, call in (
                (as_of, lambda a=app, m=moment: a.loan_file(number, as_of=m)),
                (by_version, lambda a=app, v=version: a.loan_file(number, version=v)),
                (state_at, lambda a=app, m=moment: a.state_at(lid, m)),
                (
                    get_version,
                    lambda a=app, v=version: a.repository.get(
                        lid, version=v, projector_func=replay
                    ),
                ),
            ):
                seconds, result = timed(call)
                (timing.with_snapshots if snap else timing.without).append(seconds)
                if isinstance(result, dict):
                    files[snap].append(result)
            seconds, n = timed(lambda a=app, m=moment: pick_snapshot(a, lid, m))
            (picking.with_snapshots if snap else picking.without).append(seconds)
            if snap:
                decoded.append(n)
        mismatches += sum(1 for a, b in zip(files[True], files[False], strict=True) if a != b)
        seconds, _ = timed(lambda: replay(None, archive.repository.event_store.get(lid)))
        full.append(seconds)
    assert archive.snapshots is not None
    stored = archive.snapshots.recorder.select_events(lid)
    return Reconstruction(
        [as_of, by_version, state_at, picking, get_version],
        full,
        mismatches,
        len(stored),
        samples,
        statistics.mean(decoded),
        statistics.mean(len(s.state) for s in stored) if stored else 0.0,
    )


# -- (b) verification ----------------------------------------------------------------------------


@dataclass
class Pass:
    what: str
    events: int
    seconds: float

    @property
    def per_million(self) -> float:
        return self.seconds * 1e6 / self.events


def verification(archive: ArchiveApp, rounds: int, backend: str) -> list[Pass]:
    head = archive.head_position()
    passes: list[Pass] = []

    def run(what: str) -> None:
        if what == "raw":
            seconds, _ = timed(lambda: read_raw(archive))
        elif what == "verify_store":
            seconds, report = timed(lambda: verify_store(archive.recorder, archive.mapper))
            assert report.ok and report.events_checked == head, report
        else:
            seconds, report = timed(archive.verify_chain)
            assert report.ok and report.events_checked == head, report
        passes.append(Pass(what, head, seconds))
        print(
            f"  {backend:8} {what:13} {head:8d} events in {seconds:6.1f} s "
            f"= {head / seconds:7.0f} ev/s, {seconds * 1e6 / head:6.1f} s per million",
            flush=True,
        )

    order = ["raw", "verify_store", "verify_chain"]
    for rnd in range(rounds):
        for what in order if rnd % 2 == 0 else order[::-1]:
            run(what)
    return passes


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    events: int
    generated_seconds: float
    reconstruction: Reconstruction
    passes: list[Pass]
    loan_chain_ms: float

    def best(self, what: str) -> Pass:
        return min((p for p in self.passes if p.what == what), key=lambda p: p.seconds)


def measure(
    backend: str, settings: Settings, total: int, samples: int, rounds: int, seed: int
) -> Result:
    archive = ArchiveApp(settings)
    plain = ArchiveWithoutSnapshots(settings)
    try:
        assert plain.snapshots is None
        print(f"  {backend}: generating {total} background events ...", flush=True)
        gen = generate(archive, total, seed)
        number = f"LONG-{seed}"
        seconds, loan = timed(lambda: long_loan(archive, number, seed))
        events = archive.head_position()
        print(
            f"  {backend}: {gen.events} background events in {gen.seconds:.1f} s; loan {number} "
            f"with {loan.version} events in {seconds:.2f} s; {events} events in the store",
            flush=True,
        )
        gc.collect()
        gc.freeze()  # what `serve` and `worker` do after start-up (see archive/cli.py)
        rec = reconstruct(archive, plain, loan, samples, seed)
        gc.unfreeze()
        for t in rec.timings:
            (a_med, a_p95), (b_med, b_p95) = ms(t.with_snapshots), ms(t.without)
            print(
                f"  {backend:8} {t.label:42} snapshots {a_med:6.1f} / {a_p95:6.1f} ms, "
                f"none {b_med:6.1f} / {b_p95:6.1f} ms (median / p95)",
                flush=True,
            )
        chain_seconds, report = timed(lambda: archive.verify_loan_chain(number))
        assert report.ok, report
        passes = verification(archive, rounds, backend)
        return Result(backend, events, gen.seconds, rec, passes, 1e3 * chain_seconds)
    finally:
        plain.close()
        archive.close()


def report(results: list[Result]) -> None:
    print()
    print(
        f"(a) the {LONG_EVENTS}-event loan file, rebuilt at random moments/versions "
        f"(median / p95 ms; target < {TARGET_MS:.0f} ms for loan_file(as_of=...)):"
    )
    print(
        f"{'backend':9} {'call':42} {'with snapshots':>16} {'without':>16} {'gain':>6} {'target':>7}"
    )
    for res in results:
        rec = res.reconstruction
        for t in rec.timings:
            (a_med, a_p95), (b_med, b_p95) = ms(t.with_snapshots), ms(t.without)
            verdict = ""
            if t.label.startswith("loan_file(as_of"):
                verdict = "ok" if a_p95 < TARGET_MS else "MISSED"
            if t.label.startswith("  of which"):  # no such step without snapshots
                print(f"{res.backend:9} {t.label:42} {a_med:7.1f} / {a_p95:6.1f}")
                continue
            print(
                f"{res.backend:9} {t.label:42} {a_med:7.1f} / {a_p95:6.1f} {b_med:7.1f} / {b_p95:6.1f} "
                f"{b_med / a_med:5.1f}x {verdict:>7}"
            )
        f_med, f_p95 = ms(rec.full_replay)
        print(
            f"{res.backend:9} {'full replay: event_store.get + replay':42} {'':>16} "
            f"{f_med:7.1f} / {f_p95:6.1f}"
        )
        print(
            f"{'':9} state_at decodes {rec.decoded:.1f} of the loan's {rec.snapshots} snapshots "
            f"per call (avg {rec.snapshot_bytes / 1024:.0f} KiB stored each)"
        )
        print(
            f"{'':9} {rec.samples} samples per call; "
            f"files with and without snapshots "
            + ("identical" if rec.mismatches == 0 else f"DIFFER in {rec.mismatches} samples")
            + f"; verify_loan_chain of it: {res.loan_chain_ms:.1f} ms"
        )
    print()
    print("(b) hash-chain verification of the whole store (best pass; seconds per million events):")
    print(
        f"{'backend':9} {'events':>8} {'raw read+decode':>16} {'verify_store':>13} "
        f"{'verify_chain()':>15} {'verify_store / raw':>18}"
    )
    for res in results:
        raw, store, chain = res.best("raw"), res.best("verify_store"), res.best("verify_chain")
        print(
            f"{res.backend:9} {res.events:8d} {raw.per_million:15.1f}s {store.per_million:12.1f}s "
            f"{chain.per_million:14.1f}s {store.seconds / raw.seconds:17.1f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, help="background events in the store (default 200000)"
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--samples", type=int, default=30, help="moments and versions (default 30)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="verification passes of each kind (default 2)"
    )
    parser.add_argument("--seed", type=int, default=4)
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]

    results: list[Result] = []
    began = time.perf_counter()
    for backend in backends:
        total = args.events or DEFAULT_EVENTS[backend]
        print(f"{backend}: {total} background events + a {LONG_EVENTS}-event loan", flush=True)
        with bench_settings(backend, "replay") as settings:
            results.append(measure(backend, settings, total, args.samples, args.rounds, args.seed))
    report(results)
    print(f"\n(whole run {time.perf_counter() - began:.0f} s)")
    return 0  # a benchmark reports; it does not fail `make bench` on a noisy machine


if __name__ == "__main__":
    sys.exit(main())
