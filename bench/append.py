"""Append throughput: ArchiveApp commands against the raw eventsourcing library (issue 2).

(a) ``ArchiveApp``: a credit department's command mix (open loans, officer assignments,
    repayments, inspections, status changes, classifications, collection actions,
    collateral filings, appraisals and reviews), each command going through validation,
    the hash chain and ``save``. Events are counted in the store itself
    (``recorder.max_notification_id`` before and after). The clock runs during the
    calls into the application (context, validation, events, hash chain, save), not
    while the workload draws its random choices.
(b) Baseline: a plain ``eventsourcing.application.Application`` with a trivial
    ``@event`` aggregate, one event per ``save``, its events padded to the average
    stored ``state`` size measured in (a), on the same backend in the same process.

Each backend gets fresh stores (SQLite: files in a temp dir; PostgreSQL: a throwaway
cluster from tests/postgres_cluster.py, or the server named by
ARCHIVE_TEST_POSTGRES_URL). (a) and (b) run interleaved in short rounds (a b, b a,
a b, ...) and the best round of each is compared; target: (a)/(b) >= 0.8. The
per-round ratios (a and b run back to back) are printed too, as a check on noise.

    .venv/bin/python bench/append.py [--events N] [--backend sqlite|postgres|both]
                                     [--rounds R] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(ROOT))

from eventsourcing.application import Application  # noqa: E402
from eventsourcing.domain import Aggregate, event  # noqa: E402
from factories import appraisal_fields, loan_terms, mortgage_fields  # noqa: E402
from postgres_cluster import PostgresCluster  # noqa: E402
from rebuild import (  # noqa: E402 (the same credit department as bench/rebuild.py)
    BRANCHES,
    COLLECTORS,
    FINDINGS,
    INSPECTORS,
    OFFICERS,
    OUTCOMES,
    PRODUCTS,
    REVIEWERS,
    SURNAMES,
)

from archive.application import ArchiveApp, Outcome  # noqa: E402
from archive.domain import CommandContext, Role  # noqa: E402
from archive.settings import Settings  # noqa: E402

TARGET_RATIO = 0.8
DEFAULT_EVENTS = {"sqlite": 20_000, "postgres": 10_000}
WINDOW = 25  # loan files in progress at once; their commands arrive interleaved
CENT = Decimal("0.01")

# -- (a) the credit department's workload ----------------------------------------------------

# The names and texts of the workload are bench/rebuild.py's (imported above).


def pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    return date(day.year + month // 12, month % 12 + 1, min(day.day, 28))


def officer_ctx(actor: str, reason: str | None = None) -> CommandContext:
    """One request's context: who, why, and a fresh correlation id (as the API builds it)."""
    return CommandContext(actor, Role.CREDIT_OFFICER.value, reason)


# One command of the workload: its kind and the call into the application. The workload's
# own random choices are made before the call, so only the call is timed; the call's
# outcome is sent back into the generator (a collateral's id is needed later).
Step = tuple[str, Callable[[], Outcome]]
LoanFileSteps = Generator[Step, Outcome, None]


def loan_file(app: ArchiveApp, rng: random.Random, number: str, seq: int) -> LoanFileSteps:
    """One loan's life as commands, in order."""
    product = pick(rng, PRODUCTS)
    principal = Decimal(rng.randrange(500_000, 25_000_000)) * CENT
    term = rng.choice([24, 36, 60, 120, 180, 240, 300])
    disbursed = date(2019, 1, 1) + timedelta(days=rng.randrange(5 * 365))
    borrower = f"{rng.choice(['Ana', 'Luis', 'Pilar', 'Javier', 'Rosa'])} {rng.choice(SURNAMES)}"
    group = (
        f"Grupo {rng.choice(SURNAMES)} {seq % 97}"
        if product in ("village_group", "cooperative")
        else None
    )

    def change(
        kind: str, command: Callable[[Any, CommandContext], None], reason: str | None = None
    ) -> Step:
        actor = rng.choice(OFFICERS)

        def run() -> Outcome:
            c = officer_ctx(actor, reason)
            return app.change_loan(c, number, None, lambda loan: command(loan, c))

        return kind, run

    terms = loan_terms(
        number,
        borrower_name=borrower,
        borrower_national_id=f"{seq:08d}{'TRWAGMYFPDXBNJZSQVHLCKE'[seq % 23]}",
        product=product,
        principal=str(principal),
        interest_rate=str(Decimal(rng.randrange(200, 1200)) * CENT),
        term_months=term,
        disbursement_date=disbursed.isoformat(),
        maturity_date=add_months(disbursed, term).isoformat(),
        branch=rng.choice(BRANCHES),
        village_group=group,
    )
    opener = rng.choice(OFFICERS)
    yield "open_loan", lambda: app.open_loan(officer_ctx(opener), **terms)
    officer = rng.choice(OFFICERS)
    yield change("assign_officer", lambda loan, c: loan.assign_officer(c, "loan", officer))

    collateral_id = None
    if product == "mortgage":
        filing = mortgage_fields(
            number,
            cadastral_reference=f"{seq:07d}VH{rng.randrange(10_000):04d}S0001WX",
            address=f"Calle {rng.choice(SURNAMES)} {rng.randrange(1, 200)}, Teruel",
            owner=borrower,
            secured_amount=str((principal * Decimal("1.2")).quantize(CENT)),
        )
        filer = rng.choice(OFFICERS)
        registered = yield (
            "register_collateral",
            lambda: app.register_collateral(officer_ctx(filer), **filing),
        )
        collateral_id = registered.id
    if product == "mortgage" or (product == "business" and rng.random() < 0.4):
        appraised = (principal * Decimal(rng.choice(["1.25", "1.4", "1.6"]))).quantize(CENT)
        appraisal = appraisal_fields(
            number,
            collateral_id=collateral_id,
            appraised_value=str(appraised),
            appraisal_date=(disbursed - timedelta(days=20)).isoformat(),
        )
        appraiser = rng.choice(OFFICERS)
        valuation = yield "appraise", lambda: app.appraise(officer_ctx(appraiser), **appraisal)
        cut = Decimal(rng.choice(["1.00", "0.97", "0.95", "0.85"]))  # 0.85: overvaluation flag
        review = (
            rng.choice(REVIEWERS),
            str((appraised * cut).quantize(CENT)),
            rng.choice([None, "Comparables in the same street are lower."]),
        )
        reviewer = rng.choice(OFFICERS)
        yield (
            "review_valuation",
            lambda: app.review_valuation(officer_ctx(reviewer), valuation.id, None, *review),
        )

    instalment = (principal / term * Decimal("1.05")).quantize(CENT)
    months = rng.randint(6, 14)
    inspections = set(rng.sample(range(months), rng.randint(1, 3)))
    trouble = rng.random() < 0.25
    trouble_at = rng.randrange(2, months) if trouble else -1
    for month in range(months):
        day = add_months(disbursed, month + 1)
        if month == trouble_at:
            non_performing = yield from delinquency(rng, instalment, day, change)
            if non_performing:
                return  # the file stays with collections
        yield change(
            "record_repayment", lambda loan, c, d=day: loan.record_repayment(c, instalment, d)
        )
        if month in inspections:
            visit = (
                rng.choice(["monthly", "quarterly"]),
                day + timedelta(days=3),
                rng.choice(INSPECTORS),
                rng.choice(FINDINGS),
            )
            yield change(
                "record_inspection", lambda loan, c, v=visit: loan.record_inspection(c, *v)
            )
    if rng.random() < 0.05:
        yield change(
            "change_status", lambda loan, c: loan.change_status(c, "settled"), "early repayment"
        )


def delinquency(
    rng: random.Random, instalment: Decimal, day: date, change: Callable[..., Step]
) -> Generator[Step, Outcome, bool]:
    """Arrears: overdue, downgrade, collector, collection actions; then cured or NPL."""
    yield change(
        "change_status", lambda loan, c: loan.change_status(c, "overdue"), "31 days past due"
    )
    yield change(
        "classify", lambda loan, c: loan.classify(c, "special_mention"), "arrears over 30 days"
    )
    collector = rng.choice(COLLECTORS)
    yield change("assign_officer", lambda loan, c: loan.assign_officer(c, "collection", collector))
    for n in range(rng.randint(1, 3)):
        kind = ["call", "notice", "visit"][n]
        paid = instalment if kind == "visit" else Decimal("0")
        yield change(
            "record_collection_action",
            lambda loan, c, k=kind, p=paid, n=n: loan.record_collection_action(
                c, k, day + timedelta(days=7 * (n + 1)), OUTCOMES[k], p, loan.collection_officer
            ),
        )
    if rng.random() < 0.6:
        yield change(
            "change_status", lambda loan, c: loan.change_status(c, "performing"), "arrears cleared"
        )
        yield change("classify", lambda loan, c: loan.classify(c, "pass"), "arrears cleared")
        return False
    yield change(
        "change_status",
        lambda loan, c: loan.change_status(c, "non_performing"),
        "90 days past due",
    )
    yield change("classify", lambda loan, c: loan.classify(c, "substandard"), "non-performing")
    yield change(
        "record_collection_action",
        lambda loan, c: loan.record_collection_action(
            c,
            "legal_action",
            day + timedelta(days=95),
            OUTCOMES["legal_action"],
            0,
            loan.collection_officer,
        ),
    )
    return True


@dataclass
class Round:
    label: str
    events: int
    seconds: float
    state_bytes: float  # average len(state) of the round's stored events
    aggregates: int = 0
    commands: Counter[str] = field(default_factory=Counter)
    events_by_kind: Counter[str] = field(default_factory=Counter)
    seconds_by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def head(app: Application[Any]) -> int:
    return app.recorder.max_notification_id() or 0


def average_state_bytes(app: Application[Any], after: int, upto: int) -> float:
    total = count = 0
    start = after
    while start < upto:
        notes = app.recorder.select_notifications(start, 1000, stop=upto, inclusive_of_start=False)
        if not notes:
            break
        total += sum(len(n.state) for n in notes)
        count += len(notes)
        start = notes[-1].id
    return total / count if count else 0.0


def run_archive_round(app: ArchiveApp, target: int, rnd: int, seed: int) -> Round:
    """Run the command mix until ``target`` events are stored; stop mid-file if need be.

    The clock runs during the application's calls only, not while the workload draws
    its random choices."""
    rng = random.Random(seed)
    start = head(app)
    seq = rnd * 1_000_000
    files: list[LoanFileSteps] = []
    outcomes: list[Any] = []  # each file's last outcome (None at first), sent into it
    result = Round("archive", 0, 0.0, 0.0)
    last = start
    perf = time.perf_counter
    while last - start < target:
        while len(files) < WINDOW:
            seq += 1
            files.append(loan_file(app, rng, f"B{rnd}-{seq:07d}", seq))
            outcomes.append(None)
        i = rng.randrange(len(files))
        try:
            kind, call = files[i].send(outcomes[i])
        except StopIteration:
            files.pop(i)
            outcomes.pop(i)
            continue
        t0 = perf()
        outcome = call()
        spent = perf() - t0
        outcomes[i] = outcome
        result.seconds += spent
        result.commands[kind] += 1
        result.events_by_kind[kind] += outcome.position - last
        result.seconds_by_kind[kind] += spent
        last = outcome.position
    end = head(app)
    result.events = end - start
    result.state_bytes = average_state_bytes(app, start, end)
    result.aggregates = (
        result.commands["open_loan"]
        + 2 * result.commands["register_collateral"]
        + result.commands["appraise"]
    )
    return result


# -- (b) the raw library ------------------------------------------------------------------------


class Ledger(Aggregate):
    """The trivial aggregate of the baseline: one padded string per event."""

    @event("Opened")
    def __init__(self, payload: str) -> None:
        self.notes = 0

    @event("Noted")
    def note(self, payload: str) -> None:
        self.notes += 1


@dataclass
class Padding:
    created: str
    noted: str

    @classmethod
    def matching(cls, app: Application[Any], target_bytes: float) -> Padding:
        """Payloads that make the baseline's stored state as large as (a)'s on average."""
        probe = Ledger("")
        probe.note("")
        opened, noted = (len(app.mapper.to_stored_event(e).state) for e in probe.collect_events())
        target = round(target_bytes)
        return cls("x" * max(0, target - opened), "x" * max(0, target - noted))


def run_raw_round(app: Application[Any], target: int, per_aggregate: int, pad: Padding) -> Round:
    start = head(app)
    perf = time.perf_counter
    made = 0
    began = perf()
    ledger = None
    for n in range(target):
        if n % per_aggregate == 0:
            ledger = Ledger(pad.created)
            made += 1
        else:
            ledger.note(pad.noted)
        app.save(ledger)
    seconds = perf() - began
    end = head(app)
    return Round("raw", end - start, seconds, average_state_bytes(app, start, end), made)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    archive: list[Round]
    raw: list[Round]

    @property
    def best_archive(self) -> Round:
        return max(self.archive, key=lambda r: r.rate)

    @property
    def best_raw(self) -> Round:
        return max(self.raw, key=lambda r: r.rate)

    @property
    def ratio(self) -> float:
        return self.best_archive.rate / self.best_raw.rate


def measure(
    backend: str,
    archive_settings: Settings,
    raw_settings: Settings,
    total: int,
    rounds: int,
    profiler: cProfile.Profile | None,
) -> Result:
    archive = ArchiveApp(archive_settings)
    # The raw side is the library as shipped: its own recorder, not the archive's
    # PostgreSQL recorder (archive.eventlog.PostgresEventsRecorder).
    raw_env = raw_settings.eventsourcing_env()
    raw_env.pop("APPLICATION_RECORDER_TOPIC", None)
    raw = Application[uuid.UUID](env=raw_env)
    try:
        per_round = max(1, total // rounds)
        archive_rounds: list[Round] = []
        raw_rounds: list[Round] = []
        pad: Padding | None = None
        per_aggregate = 20
        for rnd in range(rounds):
            order = ("archive", "raw") if rnd % 2 == 0 else ("raw", "archive")
            for which in order:
                if which == "archive":
                    if profiler:
                        profiler.enable()
                    r = run_archive_round(archive, per_round, rnd, seed=1000 + rnd)
                    if profiler:
                        profiler.disable()
                    archive_rounds.append(r)
                    if pad is None:  # padding and aggregate size from (a)'s first round
                        pad = Padding.matching(raw, r.state_bytes)
                        per_aggregate = max(1, round(r.events / max(1, r.aggregates)))
                else:
                    assert pad is not None
                    raw_rounds.append(run_raw_round(raw, per_round, per_aggregate, pad))
                done = archive_rounds[-1] if which == "archive" else raw_rounds[-1]
                print(
                    f"  {backend:8} round {rnd + 1} {which:7} {done.events:6d} events "
                    f"in {done.seconds:6.2f} s = {done.rate:8.0f} ev/s "
                    f"(avg state {done.state_bytes:.0f} B)",
                    flush=True,
                )
        return Result(backend, archive_rounds, raw_rounds)
    finally:
        archive.close()
        raw.close()


def run_sqlite(total: int, rounds: int, profiler: cProfile.Profile | None) -> Result:
    with tempfile.TemporaryDirectory(prefix="bench-append-") as tmp:
        base = Path(tmp)
        return measure(
            "sqlite",
            Settings(data_dir=base / "archive", database_url=None, demo_data=False),
            Settings(data_dir=base / "raw", database_url=None, demo_data=False),
            total,
            rounds,
            profiler,
        )


def run_postgres(total: int, rounds: int, profiler: cProfile.Profile | None) -> Result:
    cluster = PostgresCluster()  # honours ARCHIVE_TEST_POSTGRES_URL
    try:
        cluster.start()
        tag = uuid.uuid4().hex[:8]
        archive_url = cluster.create_database(f"bench_archive_{tag}")
        raw_url = cluster.create_database(f"bench_raw_{tag}")
        return measure(
            "postgres",
            Settings(database_url=archive_url, demo_data=False),
            Settings(database_url=raw_url, demo_data=False),
            total,
            rounds,
            profiler,
        )
    finally:
        cluster.stop()


def report(results: list[Result]) -> None:
    print()
    print(
        f"{'backend':9} {'(a) ArchiveApp ev/s':>20} {'(b) raw ev/s':>14} {'ratio a/b':>10} "
        f"{'target':>7}  {'events a/b':>13}  {'avg state a/b':>14}"
    )
    for res in results:
        a, b = res.best_archive, res.best_raw
        verdict = "ok" if res.ratio >= TARGET_RATIO else "BELOW"
        events = f"{sum(r.events for r in res.archive)}/{sum(r.events for r in res.raw)}"
        states = f"{statistics.mean(r.state_bytes for r in res.archive):.0f}/{statistics.mean(r.state_bytes for r in res.raw):.0f} B"
        print(
            f"{res.backend:9} {a.rate:20.0f} {b.rate:14.0f} {res.ratio:10.2f} "
            f"{'>=' + str(TARGET_RATIO):>7}  {events:>13}  {states:>14}  {verdict}"
        )
        paired = [a.rate / b.rate for a, b in zip(res.archive, res.raw, strict=True)]
        print(
            f"{'':9} best of {len(res.archive)} rounds each; per-round ratios "
            f"{' '.join(f'{p:.2f}' for p in paired)} (median {statistics.median(paired):.2f})"
        )
    print()
    print("(a) command mix, all rounds (µs per command, events per command):")
    for res in results:
        commands: Counter[str] = Counter()
        events: Counter[str] = Counter()
        seconds: dict[str, float] = defaultdict(float)
        for r in res.archive:
            commands.update(r.commands)
            events.update(r.events_by_kind)
            for k, s in r.seconds_by_kind.items():
                seconds[k] += s
        total_events = sum(events.values())
        print(f"  {res.backend}:")
        for kind, n in commands.most_common():
            print(
                f"    {kind:26} {n:6d} cmds {events[kind] / n:5.2f} ev/cmd "
                f"{100 * events[kind] / total_events:5.1f}% of events "
                f"{1e6 * seconds[kind] / n:8.0f} µs/cmd"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events",
        type=int,
        help="events per side and backend (default 20000 sqlite, 10000 postgres)",
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds per side (default 5)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the ArchiveApp rounds")
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]

    results: list[Result] = []
    profiles: dict[str, cProfile.Profile] = {}
    for backend in backends:
        total = args.events or DEFAULT_EVENTS[backend]
        profiler = cProfile.Profile() if args.profile else None
        print(f"{backend}: {total} events per side in {args.rounds} rounds", flush=True)
        runner = run_sqlite if backend == "sqlite" else run_postgres
        results.append(runner(total, args.rounds, profiler))
        if profiler:
            profiles[backend] = profiler
    report(results)
    for backend, profiler in profiles.items():
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(40)
        print(f"\ncProfile of (a) on {backend} (profiling slows it down; use for shares only):")
        print(out.getvalue())
    return 0  # a benchmark reports; it does not fail `make bench` on a noisy machine


if __name__ == "__main__":
    sys.exit(main())
