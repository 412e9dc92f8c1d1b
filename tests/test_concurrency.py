"""Optimistic concurrency under contention: one winner per version, nothing lost."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from factories import mortgage_fields, open_loan

from archive.application import ArchiveApp, StaleVersionError
from archive.domain import CommandContext
from archive.eventlog import PostgresEventsRecorder
from archive.exceptions import ConflictError, DomainError
from archive.loans import LoanFile
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


def test_a_stale_cache_never_decides_a_command(settings: Settings, officer: CommandContext) -> None:
    """Two processes on one store: after one writes, the other's cached copy is stale.
    Commands there must not lose that write, must not be refused by the stale state, and
    must keep the expected-version rule; reads there see the write."""
    a, b = ArchiveApp(settings), ArchiveApp(settings)
    try:
        open_loan(a, officer)  # a caches version 1

        def classify(app: ArchiveApp, tier: str, expected: int | None = None) -> int:
            return app.change_loan(
                officer, "CR-1", expected, lambda loan: loan.classify(officer, tier)
            ).version

        assert classify(b, "special_mention") == 2
        repaid = a.change_loan(
            officer, "CR-1", None, lambda loan: loan.record_repayment(officer, "100", "2024-02-15")
        )
        assert repaid.version == 3  # built on b's version 2, not on a's cached version 1
        assert classify(b, "pass") == 4
        # a's copy (version 3) still says special_mention: that refusal is not trusted.
        assert classify(a, "special_mention") == 5
        assert classify(b, "pass") == 6
        with pytest.raises(StaleVersionError) as stale:
            classify(a, "doubtful", expected=5)  # a's caller saw 5; b wrote 6
        assert stale.value.current == 6
        assert classify(b, "special_mention") == 7
        assert classify(a, "substandard", expected=7) == 8  # a's cache said 6: not a 409
        b.change_loan(officer, "CR-1", None, lambda loan: loan.change_status(officer, "settled"))
        with pytest.raises(DomainError, match="closed"):  # a's copy says performing
            a.change_loan(
                officer,
                "CR-1",
                None,
                lambda loan: loan.record_repayment(officer, "100", "2024-03-15"),
            )
        assert a.get_loan("CR-1").status == "settled"  # reads see the other's writes
        loan = b.get_loan("CR-1")
        assert [r["paid_on"].isoformat() for r in loan.repayments] == ["2024-02-15"]
        assert [e.originator_version for _, e in b.loan_events("CR-1")] == list(range(1, 10))
        assert a.verify_chain().ok
    finally:
        a.close()
        b.close()


def test_a_failed_command_leaves_the_cache_as_committed(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    open_loan(archive, officer)

    def repay_then_fail(loan: LoanFile) -> None:
        loan.record_repayment(officer, "100", "2024-02-15")
        raise DomainError("refused after the event was raised")

    with pytest.raises(DomainError, match="refused"):
        archive.change_loan(officer, "CR-1", None, repay_then_fail)
    mine = archive.get_loan("CR-1")
    mine.record_repayment(officer, "200", "2024-02-15")  # a reader's copy, never saved
    loan = archive.get_loan("CR-1")
    assert (loan.version, loan.repayments, loan.repaid) == (1, [], Decimal("0"))
    archive.change_loan(
        officer, "CR-1", 1, lambda loan: loan.record_repayment(officer, "300", "2024-02-15")
    )
    assert archive.get_loan("CR-1").repaid == Decimal("300.00")
    assert archive.verify_chain().ok


def test_threads_sharing_one_app_lose_nothing(settings: Settings, officer: CommandContext) -> None:
    """Threads of one process share its cache: each success is in the log, in order, once."""
    app = ArchiveApp(settings)
    open_loan(app, officer)
    threads_n, each = 16, 5
    barrier = threading.Barrier(threads_n)
    won: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            for n in range(each):
                name = f"w{index}-{n}"
                try:
                    app.change_loan(
                        officer,
                        "CR-1",
                        None,
                        lambda loan, name=name: loan.record_inspection(
                            officer, "monthly", "2024-05-01", name, "ok"
                        ),
                    )
                except ConflictError:
                    continue
                with lock:
                    won.append(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        assert won
        check = ArchiveApp(settings)
        try:
            stored = check.get_loan("CR-1")
        finally:
            check.close()
        cached = app.get_loan("CR-1")
        assert cached.version == stored.version == 1 + len(won)
        assert sorted(i["inspector"] for i in stored.inspections) == sorted(won)
        assert cached.inspections == stored.inspections
        assert app.verify_chain().ok
    finally:
        app.close()


def test_a_large_insert_waiting_for_the_table_lock_completes(
    postgres_url: str, tmp_path: Path
) -> None:
    """PostgreSQL: an insert larger than the socket buffers, sent while the server waits
    for the events table lock, completes once the lock is released. The library's
    pipelined insert hung here for ever (server in ClientRead, client in
    ``Pipeline.sync``): a bulk save in bench/search.py once hung 8 minutes."""
    app = ArchiveApp(Settings(data_dir=tmp_path, database_url=postgres_url, demo_data=False))
    recorder = app.recorder
    assert isinstance(recorder, PostgresEventsRecorder)  # what the settings select
    table = f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'
    events = [StoredEvent(uuid4(), 1, "bulk", bytes(150_000)) for _ in range(300)]  # 45 MB
    done: list[Sequence[int] | None] = []
    errors: list[BaseException] = []

    def insert() -> None:
        try:
            done.append(recorder.insert_events(events))
        except BaseException as exc:
            errors.append(exc)

    try:
        with psycopg.connect(postgres_url) as holder:
            holder.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            inserter = threading.Thread(target=insert, daemon=True)
            inserter.start()
            time.sleep(2)  # the client sends what the socket takes, the server is waiting
            holder.rollback()
        inserter.join(timeout=60)
        assert not inserter.is_alive(), "the insert hung after the lock was released"
        assert not errors, errors
        assert done[0] is not None and len(done[0]) == len(events)
        assert app.head_position() == max(done[0])
        with pytest.raises(IntegrityError):  # a conflict is still the library's error
            recorder.insert_events(events[:1])
    finally:
        app.close()


def test_starting_does_not_lock_out_the_log(postgres_url: str, tmp_path: Path) -> None:
    """PostgreSQL: a process starting (CLI, worker, server) while another reads the log
    does not wait for it: the append-only triggers are left alone when they are in
    place (dropping one locks the table ACCESS EXCLUSIVE, and every read and insert of
    every process would queue behind that). Disabled, they are made again."""
    settings = Settings(data_dir=tmp_path, database_url=postgres_url, demo_data=False)
    first = ArchiveApp(settings)
    recorder = first.recorder
    assert isinstance(recorder, PostgresApplicationRecorder)
    table = f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'
    started: list[ArchiveApp] = []
    try:
        with psycopg.connect(postgres_url) as reader:
            reader.execute(f"SELECT count(*) FROM {table}")  # ACCESS SHARE until rollback
            starting = threading.Thread(
                target=lambda: started.append(ArchiveApp(settings)), daemon=True
            )
            starting.start()
            starting.join(timeout=20)
            assert not starting.is_alive(), "a start waited for a reader of the log"
            reader.rollback()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        started.append(ArchiveApp(settings))
        recorder.insert_events([StoredEvent(uuid4(), 1, "event", b"{}")])
        for statement in (f"DELETE FROM {table}", f"TRUNCATE {table}"):
            with psycopg.connect(postgres_url) as db, pytest.raises(psycopg.Error, match="append"):
                db.execute(statement)
    finally:
        for app in started:
            app.close()
        first.close()


def test_processes_starting_together_create_the_tables_once(
    postgres_url: str, tmp_path: Path
) -> None:
    """Workers, the API and a rebuild's processes open the archive at the same moment.
    Creating the tables (the library's CREATE OR REPLACE FUNCTION among them) at once
    made PostgreSQL refuse one of them ("tuple concurrently updated"): they take turns."""
    settings = Settings(data_dir=tmp_path, database_url=postgres_url, demo_data=False)
    context = multiprocessing.get_context("spawn")
    with context.Pool(6) as pool:
        for round_ in range(3):
            results = [pool.apply_async(_open_and_close, (settings,)) for _ in range(6)]
            assert [r.get(timeout=60) for r in results] == [0] * 6, round_
    assert _open_and_close(settings) == 0


def _open_and_close(settings: Settings) -> int:
    app = ArchiveApp(settings)
    try:
        return app.head_position()
    finally:
        app.close()


def test_a_rebuilds_child_opens_the_log_without_making_tables(
    settings: Settings, officer: CommandContext
) -> None:
    """``create_tables=False`` (a rebuild's child processes) runs no DDL: on a database
    nobody set up there is no log to read, and on one set up it reads the same log."""
    with pytest.raises(Exception, match=r"(?i)no such table|does not exist"):
        bare = ArchiveApp(settings, create_tables=False)
        try:
            bare.head_position()
        finally:
            bare.close()
    made = ArchiveApp(settings)
    try:
        open_loan(made, officer)
        opened = ArchiveApp(settings, create_tables=False)
        try:
            assert opened.head_position() == made.head_position() > 0
        finally:
            opened.close()
    finally:
        made.close()
