"""Optimistic concurrency under contention: one winner per version, nothing lost."""

from __future__ import annotations

import threading
from collections import Counter

from factories import mortgage_fields, open_loan

from archive.application import ArchiveApp
from archive.domain import CommandContext
from archive.exceptions import ConflictError
from archive.settings import Settings

THREADS = 32
ROUNDS = 4


def test_32_writers_one_winner_per_version(settings: Settings, officer: CommandContext) -> None:
    setup = ArchiveApp(settings)
    open_loan(setup, officer)
    setup.close()
    # Each writer has its own application (its own connections), as separate
    # API processes would; they share only the database.
    small = settings.model_copy(update={"db_pool_size": 1})
    apps = [ArchiveApp(small) for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)
    wins: list[tuple[int, int]] = []  # (expected version, writer)
    conflicts: Counter[int] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(index: int) -> None:
        app = apps[index]
        ctx = CommandContext(f"writer-{index}", "credit_officer")
        try:
            for _ in range(ROUNDS):
                barrier.wait(timeout=60)
                version = app.get_loan("CR-1").version
                barrier.wait(timeout=60)  # everyone read the same version before anyone writes
                try:
                    app.change_loan(
                        ctx,
                        "CR-1",
                        version,
                        lambda loan: loan.record_inspection(
                            ctx, "monthly", "2024-05-01", f"w{index}", "ok"
                        ),
                    )
                except ConflictError:
                    with lock:
                        conflicts[version] += 1
                else:
                    with lock:
                        wins.append((version, index))
        except BaseException as exc:  # surfaced below; a thread must not die silently
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for app in apps:
        app.close()
    assert not errors, errors

    check = ArchiveApp(settings)
    try:
        loan = check.get_loan("CR-1")
        won_versions = sorted(v for v, _ in wins)
        # Each round everyone expected the same version: exactly one winner per round.
        assert won_versions == list(range(1, ROUNDS + 1))
        assert all(conflicts[v] == THREADS - 1 for v in won_versions)
        # Versions are contiguous, every win is in the log, no lost update.
        assert loan.version == 1 + ROUNDS
        inspectors = [i["inspector"] for i in loan.inspections]
        assert inspectors == [f"w{index}" for _, index in sorted(wins)]
        versions = [e.originator_version for _, e in check.loan_events("CR-1")]
        assert versions == list(range(1, ROUNDS + 2))
        assert check.verify_chain().ok
    finally:
        check.close()


def test_racing_first_liens_on_one_property(settings: Settings, officer: CommandContext) -> None:
    """Two loans racing for a first-rank lien on the same property: one wins, one conflicts."""
    setup = ArchiveApp(settings)
    for number in ("R-1", "R-2"):
        open_loan(setup, officer, number)
    setup.close()
    apps = [ArchiveApp(settings) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list[str] = []

    def register(index: int) -> None:
        barrier.wait(timeout=30)
        try:
            apps[index].register_collateral(officer, **mortgage_fields(f"R-{index + 1}"))
            results.append("won")
        except ConflictError:
            results.append("conflict")
        except Exception as exc:  # e.g. the loser saw the winner's lien: a domain refusal
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for app in apps:
        app.close()
    assert sorted(results) in (["conflict", "won"], ["DomainError", "won"])
    check = ArchiveApp(settings)
    try:
        linked = [len(check.get_loan(n).collateral_ids) for n in ("R-1", "R-2")]
        assert sorted(linked) == [0, 1]
    finally:
        check.close()
