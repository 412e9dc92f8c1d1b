"""The read side on both backends: exactly-once following, resumption, status, rebuilds
under readers, read-your-writes, the loan_files and audit_trail views, and the property
that a view maintained event by event equals the same view rebuilt from scratch."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, ClassVar
from uuid import UUID

import psycopg
import pytest
from factories import appraisal_fields, loan_terms, mortgage_fields, open_loan
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from archive.application import ArchiveApp
from archive.domain import ArchiveAggregate, CommandContext, Role
from archive.eventlog import select_notes
from archive.exceptions import ArchiveError
from archive.loans import ALLOWED_TRANSITIONS, LoanStatus
from archive.settings import Settings
from projections import audit_trail, follower, loan_files
from projections.audit_trail import AuditTrailView, human_size
from projections.encoding import id_text, iso_utc
from projections.follower import Follower, Reopen, rebuild, rebuild_views, status, wait_for
from projections.loan_files import LoanFilesView
from projections.runner import Projections
from projections.search import SearchView
from projections.store import Store, Tx, WriteBuffer, open_store, views_path
from projections.view import Cache, Events, Handlers, Tables

ARCHIVIST = CommandContext("arch.ivist", Role.ARCHIVIST.value, "scan of the signed contract")
AUDITOR = CommandContext("eva.auditor", Role.AUDITOR.value, "annual audit")
ADMIN = CommandContext("root.admin", Role.ADMIN.value)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    views = open_store(settings)
    yield views
    views.close()


def pdf(size: int = 1200) -> io.BytesIO:
    head = b"%PDF-1.4 test original\n"
    return io.BytesIO(head + b"x" * (size - len(head)))


def change(archive: ArchiveApp, ctx: CommandContext, loan: str, method: str, *args: Any) -> int:
    return archive.change_loan(ctx, loan, None, lambda lf: getattr(lf, method)(ctx, *args)).position


def rebuilt_equals_incremental(view: Any, archive: ArchiveApp, store: Store) -> None:
    incremental = view.dump(store)
    rebuild(view, archive, store, batch_size=7)
    assert view.dump(store) == incremental


# -- where views live ---------------------------------------------------------------------


def test_views_live_outside_the_event_tables(
    settings: Settings, archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    open_loan(archive, officer)
    Follower(LoanFilesView(), archive, store).catch_up()
    if settings.backend == "sqlite":
        assert views_path(settings).is_file()
        with sqlite3.connect(settings.sqlite_path) as events_db:
            names = {r[0] for r in events_db.execute("SELECT name FROM sqlite_master")}
        assert not any(n.startswith(("loan_files", "projection_")) for n in names)
    else:
        assert settings.database_url is not None
        with psycopg.connect(settings.database_url) as conn:
            rows = conn.execute(
                "SELECT table_schema FROM information_schema.tables"
                " WHERE table_name IN ('loan_files_g1', 'projection_registry')"
            ).fetchall()
        assert sorted(r[0] for r in rows) == ["views", "views"]
    assert loan_files.get(store, "CR-1") is not None


# -- exactly once, resumable, status ----------------------------------------------------------


class Crash(Exception):
    pass


class CrashingAudit(AuditTrailView):
    """Raises at the event at one position, after writing the batch's events before it:
    a crash in the middle of a batch."""

    crash_at: ClassVar[int] = 0

    def apply_batch(self, tx: Tx, tables: Tables, events: Events, cache: Cache) -> None:
        positions = [position for position, _ in events]
        if self.crash_at in positions:
            super().apply_batch(tx, tables, events[: positions.index(self.crash_at)], cache)
            raise Crash(self.crash_at)
        super().apply_batch(tx, tables, events, cache)


def audit_positions(store: Store) -> list[int]:
    return sorted(r["position"] for r in AuditTrailView().dump(store)["audit_events"])


def test_a_crash_mid_batch_commits_nothing_of_that_batch(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    for n in range(4):
        open_loan(archive, officer, f"CR-{n}")
    change(archive, officer, "CR-1", "change_status", "overdue")
    head = archive.head_position()

    first = Follower(AuditTrailView(), archive, store, batch_size=3)
    assert first.run_once() == 3
    CrashingAudit.crash_at = 5  # the second event of the next batch (4, 5)
    crashing = Follower(CrashingAudit(), archive, store, batch_size=3)
    with pytest.raises(Crash):
        crashing.run_once()
    assert crashing.position() == 3  # tracking unchanged
    assert audit_positions(store) == [1, 2, 3]  # event 4 was applied, then rolled back

    again = Follower(AuditTrailView(), archive, store, batch_size=3)
    assert again.catch_up() == head - 3
    assert audit_positions(store) == list(range(1, head + 1))
    rebuilt_equals_incremental(AuditTrailView(), archive, store)


def test_a_restarted_follower_resumes_where_the_last_commit_left_it(
    settings: Settings, archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    for n in range(3):
        open_loan(archive, officer, f"CR-{n}")
        change(archive, officer, f"CR-{n}", "change_status", "overdue")
    view = LoanFilesView()
    assert Follower(view, archive, store, batch_size=2).run_once() == 2
    store.close()  # the process dies; a new one opens the views database
    reopened = open_store(settings)
    try:
        follower = Follower(view, archive, reopened, batch_size=2)
        assert follower.position() == 2
        assert follower.catch_up() == archive.head_position() - 2
        assert [r["status"] for r in loan_files.query(reopened).items] == ["overdue"] * 3
        rebuilt_equals_incremental(view, archive, reopened)
    finally:
        reopened.close()


def test_two_followers_of_one_view_never_apply_an_event_twice(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    for n in range(12):
        open_loan(archive, officer, f"CR-{n}")
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            Follower(AuditTrailView(), archive, store, batch_size=2).catch_up()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=follow) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert audit_positions(store) == list(range(1, archive.head_position() + 1))


def test_status_reports_position_head_and_lag(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    follower = Follower(LoanFilesView(), archive, store, batch_size=2)
    empty = follower.status()
    assert (empty.generation, empty.position, empty.head, empty.lag) == (1, 0, 0, 0)
    for n in range(3):
        open_loan(archive, officer, f"CR-{n}")
    before = follower.status()
    assert (before.position, before.head, before.lag) == (0, 3, 3)
    follower.run_once()
    assert follower.status().lag == 1
    follower.catch_up()
    after = follower.status()
    assert (after.position, after.lag, after.stale, after.rebuilding) == (3, 0, False, None)
    assert after.as_dict()["view"] == "loan_files"


def test_wait_for_lets_a_client_read_its_own_write(
    settings: Settings, archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    # On PostgreSQL the follower sleeps for a minute but wakes on the event store's NOTIFY.
    poll = 60.0 if settings.backend == "postgres" else 0.05
    with Projections(archive, store, poll_interval=poll) as views:
        views.start()
        time.sleep(0.1)  # the followers have caught up and are waiting
        written = open_loan(archive, officer, "CR-9")
        assert views.wait_for(written.position, timeout=10)
        assert loan_files.get(store, "CR-9") is not None
        assert audit_trail.query(store, loan_number="CR-9").total == 1
        assert not views.wait_for(written.position + 100, timeout=0.2)
        assert not wait_for(store, "audit_trail", written.position + 100, timeout=0.05)
        assert all(s.lag == 0 for s in views.status())
        started = time.monotonic()
    assert time.monotonic() - started < 5  # stopping does not wait for the poll interval


# -- rebuild while readers read ------------------------------------------------------------------


def _upper_branch_opened(rows: loan_files.Rows, position: int, e: Any) -> None:
    LoanFilesView.handlers["LoanFile.Opened"](rows, position, e)
    loan_id = str(e.originator_id)
    rows.update(
        "loan_files", loan_id, {"branch": rows.get("loan_files", loan_id)["branch"].upper()}
    )


class UpperBranchView(LoanFilesView):
    """A new version of the view (branches upper-cased): what a rebuild is for."""

    schema_version: ClassVar[int] = LoanFilesView.schema_version + 1
    handlers: ClassVar[Handlers] = Handlers(
        {**LoanFilesView.handlers, "LoanFile.Opened": _upper_branch_opened}
    )


def test_rebuild_serves_the_old_generation_until_the_switch(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    for n in range(5):
        open_loan(archive, officer, f"CR-{n}")
    Follower(LoanFilesView(), archive, store).catch_up()
    seen: list[tuple[str, ...]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                page = loan_files.query(store, limit=100)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            seen.append(tuple(sorted({i["branch"] for i in page.items})))

    thread = threading.Thread(target=reader)
    thread.start()

    def before_switch(generation: int) -> None:
        assert generation == 2
        current = status(store, archive.recorder, UpperBranchView())
        assert current.generation == 1 and current.stale
        assert current.rebuilding is not None and current.rebuilding.position == 5
        late = open_loan(archive, officer, "CR-LATE")  # written during the rebuild
        assert late.position == 6
        page = loan_files.query(store, limit=100)
        assert {i["branch"] for i in page.items} == {"Teruel"}
        assert page.total == 5  # the old generation has no live follower in this test

    assert rebuild(UpperBranchView(), archive, store, before_switch=before_switch) == 2
    page = loan_files.query(store, limit=100)
    done.set()
    thread.join(10)
    assert errors == []
    assert {i["branch"] for i in page.items} == {"TERUEL"}
    assert page.total == 6 and page.position == 6  # the switch applied the late write
    # Every read saw one generation whole: the old one, then (after the switch) the new.
    old, new = ("Teruel",), ("TERUEL",)
    assert seen and seen[0] == old
    switched = seen.index(new) if new in seen else len(seen)
    assert set(seen[:switched]) == {old} and set(seen[switched:]) <= {new}
    after = status(store, archive.recorder, UpperBranchView())
    assert (after.generation, after.stale, after.rebuilding, after.lag) == (2, False, None, 0)
    # The next rebuild drops the retired generation 1 and builds generation 3.
    assert rebuild(UpperBranchView(), archive, store) == 3
    with store.read() as tx:
        gens = [
            r["generation"] for r in tx.execute("SELECT generation FROM projection_generations")
        ]
    assert sorted(gens) == [2, 3]


def test_the_log_read_as_notes_is_what_select_notifications_returns(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    """``select_notes`` (how followers read) returns what the library's reading does,
    position, aggregate, version, topic and stored bytes, for every window."""
    scripted_history(archive, officer)
    head = archive.head_position()
    recorder = archive.recorder
    for start, limit, stop in [
        (0, 1000, None),
        (0, 3, None),
        (2, 4, None),
        (1, 100, 5),
        (head, 10, None),
    ]:
        library = recorder.select_notifications(start, limit, stop=stop, inclusive_of_start=False)
        notes = select_notes(recorder, start, limit, stop)
        assert [
            (n.id, id_text(n.originator_id), n.originator_version, n.topic, bytes(n.state))
            for n in notes
        ] == [
            (n.id, id_text(n.originator_id), n.originator_version, n.topic, n.state)
            for n in library
        ]
        assert all(type(n.state) is bytes for n in notes)
    assert len(select_notes(recorder, 0, 1000)) == head > 5
    # The mapper decodes a note as it decodes the library's notification.
    first = select_notes(recorder, 0, 1)[0]
    event = archive.mapper.to_domain_event(first)
    assert event == archive.mapper.to_domain_event(
        recorder.select_notifications(0, 1, inclusive_of_start=False)[0]
    )
    assert isinstance(event.originator_id, UUID)


def test_reading_ahead_and_reading_in_turn_give_the_same_batches(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    """A rebuild reads the log in turn on SQLite and a batch ahead on PostgreSQL: the
    same batches either way, decoded only where needed."""
    scripted_history(archive, officer)
    needs = follower.needs_of([LoanFilesView()])

    def batches(read: Any) -> list[list[tuple[int, str, Any]]]:
        return [
            [
                (p, n.topic, None if e is None else (type(e).__qualname__, e.originator_version))
                for (p, e), n in zip(batch, batch.stored, strict=True)
            ]
            for batch in read(archive, 3, needs)
        ]

    in_turn = batches(follower.read_in_turn)
    assert in_turn == batches(follower.read_ahead)
    rows = [row for batch in in_turn for row in batch]
    assert [p for p, _, _ in rows] == list(range(1, archive.head_position() + 1))
    assert {len(b) for b in in_turn[:-1]} == {3}
    assert any(e is None for _, _, e in rows) and any(e is not None for _, _, e in rows)


@contextlib.contextmanager
def reads_counted(archive: ArchiveApp) -> Iterator[list[int]]:
    """The number of notifications each read of the log in this process returned (the
    followers read with ``archive.eventlog.select_notes``)."""
    reads: list[int] = []

    def counted(recorder: Any, *args: Any, **kwargs: Any) -> Any:
        notes = select_notes(recorder, *args, **kwargs)
        if recorder is archive.recorder:
            reads.append(len(notes))
        return notes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(follower, "select_notes", counted)
        yield reads


def test_views_rebuilt_together_read_the_log_once(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    scripted_history(archive, officer)
    views = Projections(archive, store)
    views.catch_up()
    incremental = {name: view.dump(store) for name, view in views.views.items()}
    with reads_counted(archive) as reads:
        generations = views.rebuild_views(batch_size=4)
    head = archive.head_position()
    assert generations == {"loan_files": 2, "audit_trail": 2, "search": 2}
    # One pass for all views: every event is read once, in batches of 4, then the empty
    # read that ends the pass (the switches find nothing left to read).
    assert sum(reads) == head and len(reads) == -(-head // 4) + 1
    assert {name: view.dump(store) for name, view in views.views.items()} == incremental
    assert [(s.generation, s.lag, s.stale) for s in views.status()] == [(2, 0, False)] * 3
    with pytest.raises(KeyError):
        views.rebuild_views(["nope"])


@pytest.mark.parametrize("join", [False, True], ids=["children", "joined"])
def test_views_rebuilt_in_processes_equal_the_views_followed_event_by_event(
    settings: Settings, archive: ArchiveApp, officer: CommandContext, join: bool
) -> None:
    scripted_history(archive, officer)
    for n in range(6):
        change(archive, officer, "CR-2", "record_repayment", f"{n + 1}0.00", "2024-06-01")
    with Projections.open(settings, archive) as views:
        views.catch_up()
        incremental = {name: view.dump(views.store) for name, view in views.views.items()}
        with reads_counted(archive) as reads:
            generations = views.rebuild_views(processes=2, batch_size=4, join=join)
        assert generations == {"loan_files": 2, "audit_trail": 2, "search": 2}
        head = archive.head_position()
        # The children read the log; this process read it once for its own share if it
        # joined, else none of it (the switches found the new generations at the head).
        assert reads == ([4] * (head // 4) + [head % 4] * bool(head % 4) + [0] if join else [])
        assert {name: view.dump(views.store) for name, view in views.views.items()} == incremental
        assert [(s.generation, s.lag, s.stale) for s in views.status()] == [(2, 0, False)] * 3


class FailsInAChildProcess(AuditTrailView):
    """The audit trail, except that it cannot be applied in a rebuild's child process
    (and cheap: a joining parent leaves it to a child)."""

    rebuild_cost = 1.0

    def apply_batch(self, tx: Tx, tables: Tables, events: Events, cache: Cache) -> None:
        if multiprocessing.parent_process() is not None:
            raise Crash("the disk of the views is full")
        super().apply_batch(tx, tables, events, cache)


@pytest.mark.parametrize("join", [False, True], ids=["children", "joined"])
def test_a_failure_in_a_child_process_fails_the_rebuild_and_loses_nothing(
    settings: Settings, archive: ArchiveApp, officer: CommandContext, join: bool
) -> None:
    scripted_history(archive, officer)
    reopen = Reopen(partial(ArchiveApp, settings), partial(open_store, settings))
    with Projections(
        archive,
        open_store(settings),
        views=[LoanFilesView(), FailsInAChildProcess()],
        reopen=reopen,
        owns_store=True,
    ) as views:
        views.catch_up()
        before = {name: view.dump(views.store) for name, view in views.views.items()}
        with pytest.raises(Crash, match="disk of the views is full"):
            views.rebuild_views(processes=2, batch_size=4, join=join)
        # Readers still read the first generations, whole; the failed ones are building.
        assert [(s.generation, s.lag) for s in views.status()] == [(1, 0), (1, 0)]
        assert {name: view.dump(views.store) for name, view in views.views.items()} == before
        # The next rebuild (in this process, where the view applies) drops them and works.
        assert views.rebuild_views(processes=1) == {"loan_files": 3, "audit_trail": 3}
        assert {name: view.dump(views.store) for name, view in views.views.items()} == before


def test_a_rebuild_in_processes_needs_to_know_how_to_reopen(
    archive: ArchiveApp, store: Store
) -> None:
    with pytest.raises(ValueError, match="reopen"):
        rebuild_views([LoanFilesView(), AuditTrailView()], archive, store, processes=2)


def test_views_are_shared_out_among_processes_by_their_cost() -> None:
    class Cheap(LoanFilesView):
        name = "cheap"
        rebuild_cost = 2.0

    views = [Cheap(), LoanFilesView(), AuditTrailView(), SearchView()]
    costs = {v.name: v.rebuild_cost for v in views}
    groups = [[v.name for v in group] for group in follower._groups(views, 2)]
    assert sorted(n for g in groups for n in g) == sorted(costs)
    loads = [sum(costs[n] for n in g) for g in groups]
    assert max(loads) - min(loads) <= max(costs.values()) / 2
    assert len(follower._groups(views, 8)) == 4  # never more processes than views
    assert [len(g) for g in follower._groups(views, 1)] == [4]
    # By default, one process per core once the log is long enough to repay starting them.
    assert follower.default_processes(follower.PARALLEL_FROM - 1) == 1
    assert follower.default_processes(follower.PARALLEL_FROM) == (os.cpu_count() or 1)


def test_a_rebuild_that_forgets_cached_rows_reads_them_back(
    archive: ArchiveApp, officer: CommandContext, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = scripted_history(archive, officer)
    for n in range(3):
        change(archive, officer, "CR-1", "record_repayment", f"{n + 1}00.00", "2024-06-01")
    archive.set_legal_hold(AUDITOR, ids["document"], True)
    views = [LoanFilesView(), AuditTrailView()]
    for view in views:
        Follower(view, archive, store).catch_up()
    incremental = [view.dump(store) for view in views]
    # Tiny caches: the rebuild keeps forgetting rows and field values between batches.
    monkeypatch.setattr(loan_files, "CACHE_ROWS", 1)
    monkeypatch.setattr(audit_trail, "CACHE_AGGREGATES", 2)
    rebuild_views(views, archive, store, batch_size=3)
    assert [view.dump(store) for view in views] == incremental


def test_a_rebuild_writes_each_loan_row_once_however_many_batches_change_it(
    archive: ArchiveApp, officer: CommandContext, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_history(archive, officer)
    for n in range(6):
        change(archive, officer, "CR-1", "record_repayment", f"{n + 1}0.00", "2024-06-01")
    view = LoanFilesView()
    Follower(view, archive, store).catch_up()
    incremental = view.dump(store)
    written: list[tuple[str, str, Any]] = []
    insert_values, upsert_rows = WriteBuffer.insert_values, WriteBuffer.upsert_rows

    def inserting(buffer: WriteBuffer, table: str, columns: Any, rows: Any) -> None:
        written.extend(("insert", table, row[0]) for row in rows)
        insert_values(buffer, table, columns, rows)

    def upserting(buffer: WriteBuffer, table: str, key: str, rows: Any) -> None:
        written.extend(("upsert", table, row[key]) for row in rows)
        upsert_rows(buffer, table, key, rows)

    # Spies: the rebuild's writes all go through its WriteBuffers, and still run.
    monkeypatch.setattr(WriteBuffer, "insert_values", inserting)
    monkeypatch.setattr(WriteBuffer, "upsert_rows", upserting)
    generation = rebuild(view, archive, store, batch_size=2)
    assert view.dump(store) == incremental
    for logical, rows in incremental.items():
        # Each row of the new generation inserted once, none upserted, although the
        # CR-1 row changes in most of the batches of two events.
        table = view.tables(generation)[logical]
        keys = sorted(key for how, t, key in written if t == table and how == "insert")
        assert keys == sorted(row[loan_files.KEYS[logical]] for row in rows)
        assert not [w for w in written if w[1] == table and w[0] == "upsert"]


def test_a_rebuild_runs_the_gc_less_often_only_while_it_runs(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    import gc

    open_loan(archive, officer)
    before = gc.get_threshold()
    during: list[tuple[int, ...]] = []
    rebuild(LoanFilesView(), archive, store, progress=lambda *_: during.append(gc.get_threshold()))
    assert during == [(follower.REBUILD_GC_THRESHOLD, *before[1:])]
    assert gc.get_threshold() == before
    with pytest.raises(Crash):
        rebuild(LoanFilesView(), archive, store, progress=lambda *_: _raise(Crash()))
    assert gc.get_threshold() == before


def _raise(exc: BaseException) -> None:
    raise exc


def test_the_live_follower_moves_to_the_new_generation(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    open_loan(archive, officer, "CR-1")
    live = Follower(AuditTrailView(), archive, store, batch_size=1)
    live.catch_up()
    rebuild(AuditTrailView(), archive, store)
    open_loan(archive, officer, "CR-2")
    assert live.catch_up() == 1
    assert live.status().generation == 2
    assert audit_positions(store) == [1, 2]


def test_a_stale_view_is_rebuilt_when_the_projections_start(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    open_loan(archive, officer)
    Follower(LoanFilesView(), archive, store).catch_up()
    assert status(store, archive.recorder, UpperBranchView()).stale
    with Projections(archive, store, views=[UpperBranchView()], poll_interval=0.05) as views:
        views.start()
        deadline = time.monotonic() + 10
        while views.status()[0].generation != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        [now] = views.status()
    assert (now.generation, now.stale, now.lag) == (2, False, 0)
    assert loan_files.get(store, "CR-1")["branch"] == "TERUEL"  # type: ignore[index]


# -- loan_files ----------------------------------------------------------------------------------


def test_loan_files_filters_and_pagination(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    branches = ["Teruel", "Huesca", "Teruel", "Zaragoza", "Teruel"]
    products = ["mortgage", "personal", "mortgage", "business", "personal"]
    for n, (branch, product) in enumerate(zip(branches, products, strict=True)):
        open_loan(archive, officer, f"CR-{n}", branch=branch, product=product)
    for n in (1, 3):
        change(archive, officer, f"CR-{n}", "change_status", "overdue")
        change(archive, officer, f"CR-{n}", "change_status", "non_performing")
        change(archive, officer, f"CR-{n}", "assign_officer", "loan", "maria.lopez")
        change(archive, officer, f"CR-{n}", "assign_officer", "collection", f"col-{n}")
        change(archive, officer, f"CR-{n}", "classify", "doubtful")
    change(archive, officer, "CR-3", "categorise_recovery", "recoverable", ["job loss"])
    change(archive, officer, "CR-3", "record_repayment", "250.00", "2024-06-01")
    reg = archive.register_collateral(officer, **mortgage_fields("CR-0"))
    val = archive.appraise(officer, **appraisal_fields("CR-0", collateral_id=reg.id))
    archive.review_valuation(officer, val.id, None, reviewer="Eva Ruiz", reviewed_value="120000.00")
    doc = archive.register_document(
        ARCHIVIST, pdf(), loan_number="CR-0", doc_type="contract", original_filename="c.pdf"
    )
    archive.check_fixity(AUDITOR)
    archive.set_legal_hold(AUDITOR, doc.id, True)
    Projections(archive, store).catch_up()

    everything = loan_files.query(store, limit=2)
    assert everything.total == 5 and [i["loan_number"] for i in everything.items] == [
        "CR-0",
        "CR-1",
    ]
    assert [i["loan_number"] for i in loan_files.query(store, limit=2, offset=4).items] == ["CR-4"]
    assert loan_files.query(store, limit=2, offset=9).items == []

    def numbers(**filters: Any) -> list[str]:
        page = loan_files.query(store, **filters)
        assert page.total == len(page.items)
        return [i["loan_number"] for i in page.items]

    assert numbers(branch="Teruel") == ["CR-0", "CR-2", "CR-4"]
    assert numbers(branch="Teruel", product="personal") == ["CR-4"]
    assert numbers(status="non_performing") == ["CR-1", "CR-3"]
    assert numbers(classification="doubtful") == ["CR-1", "CR-3"]
    assert numbers(classification="pass") == ["CR-0", "CR-2", "CR-4"]
    assert numbers(recovery_category="recoverable") == ["CR-3"]
    assert numbers(loan_officer="maria.lopez") == ["CR-1", "CR-3"]
    assert numbers(collection_officer="col-3") == ["CR-3"]
    assert numbers(status="settled") == []
    with pytest.raises(ValueError):
        loan_files.query(store, limit=0)

    cr3 = loan_files.get(store, "CR-3")
    assert cr3 is not None
    assert (cr3["repaid"], cr3["outstanding"]) == ("250.00", "99750.00")
    assert cr3["causes_of_default"] == ["job loss"]
    assert [h["duty"] for h in cr3["officer_history"]] == ["loan", "collection"]
    cr0 = loan_files.get(store, "CR-0")
    assert cr0 is not None and cr0["principal"] == "100000.00"
    [collateral] = cr0["collateral"]
    assert (collateral["registration_id"], collateral["status"]) == (str(reg.id), "pending")
    assert collateral["secured_amount"] == "120000.00"
    [valuation] = cr0["valuations"]
    assert valuation["overvalued"] is True and valuation["reviewed_value"] == "120000.00"
    assert valuation["overvaluation"]["cut"] == "30000.00"
    [document] = cr0["documents"]
    assert document["document_id"] == str(doc.id)
    assert (document["fixity_status"], document["legal_hold"]) == ("ok", True)
    assert document["extraction_status"] == "pending" and document["size"] == 1200
    # The view agrees with the archive's own reconstruction.
    truth = archive.loan_file("CR-3")
    assert cr3["version"] == truth["version"] and cr3["status"] == truth["status"]
    assert cr3["outstanding"] == str(truth["outstanding"])


OCR = CommandContext("ocr.worker", Role.ADMIN.value, "text extraction")


def extraction_step(archive: ArchiveApp, document_id: Any, succeed: bool = True) -> str:
    """Move a document's extraction one step as the OCR worker does: claim a pending
    one, finish a running one (text or failure), ask a finished one to be redone.
    Returns the status the domain reports afterwards."""
    status = archive.get_document(document_id).extraction["status"]

    def step(d: Any) -> None:
        if status == "pending":
            d.start_extraction(OCR, "worker-1")
        elif status == "running" and succeed:
            d.record_text(
                OCR,
                d.extraction["attempt"],
                pages=[{"number": 1, "text": "escritura", "method": "ocr", "confidence": None}],
                engine="tesseract",
                engine_version="5.3.0",
                languages="spa",
                settings={"psm": 3},
            )
        elif status == "running":
            d.record_extraction_failure(OCR, d.extraction["attempt"], "unreadable scan")
        else:
            d.request_reindex(OCR)

    archive.change_document(OCR, document_id, step)
    return str(archive.get_document(document_id).extraction["status"])


def test_documents_show_their_extraction_status(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    open_loan(archive, officer)
    doc = archive.register_document(
        ARCHIVIST, pdf(), loan_number="CR-1", doc_type="contract", original_filename="c.pdf"
    )
    follower = Follower(LoanFilesView(), archive, store, batch_size=3)

    def shown() -> str:
        follower.catch_up()
        [document] = loan_files.get(store, "CR-1")["documents"]  # type: ignore[index]
        return str(document["extraction_status"])

    # The view says what the document itself says (and GET /api/v1/documents/{id} shows).
    assert shown() == archive.get_document(doc.id).extraction["status"] == "pending"
    walk = [
        extraction_step(archive, doc.id),  # claimed
        extraction_step(archive, doc.id, succeed=False),  # failed
        extraction_step(archive, doc.id),  # reindex requested
        extraction_step(archive, doc.id),  # claimed again
    ]
    assert walk == ["running", "failed", "pending", "running"]
    assert shown() == "running"
    assert extraction_step(archive, doc.id) == shown() == "done"
    rebuilt_equals_incremental(LoanFilesView(), archive, store)
    assert shown() == "done"
    # The audit trail says the same in words, the failure's reason included.
    Follower(AuditTrailView(), archive, store).catch_up()
    trail = audit_trail.query(store, loan_number="CR-1", limit=100).items
    kinds = ("ExtractionStarted", "ExtractionFailed", "ReindexRequested", "TextExtracted")
    assert [r["summary"] for r in trail if r["event_type"].endswith(kinds)] == [
        "text extraction 1 of document contract started by worker-1",
        "text extraction of document contract failed: unreadable scan",
        "text extraction of document contract requested again",
        "text extraction 2 of document contract started by worker-1",
        "text extracted from document contract: 1 pages",
    ]


# -- audit_trail ---------------------------------------------------------------------------------


def scripted_history(archive: ArchiveApp, officer: CommandContext) -> dict[str, Any]:
    open_loan(archive, officer, "CR-1")
    change(archive, officer, "CR-1", "change_status", "overdue")
    npl = change(archive, officer, "CR-1", "change_status", "non_performing")
    change(archive, officer, "CR-1", "assign_officer", "loan", "maria.lopez")
    change(archive, officer, "CR-1", "assign_officer", "loan", "jose.ruiz")
    reg = archive.register_collateral(officer, **mortgage_fields("CR-1"))
    val = archive.appraise(officer, **appraisal_fields("CR-1", collateral_id=reg.id))
    archive.review_valuation(officer, val.id, None, reviewer="Eva Ruiz", reviewed_value="120000.00")
    doc = archive.register_document(
        ARCHIVIST, pdf(), loan_number="CR-1", doc_type="contract", original_filename="contrato.pdf"
    )
    body = archive.open_original(AUDITOR, archive.stored_document(doc.id))
    assert b"".join(body).startswith(b"%PDF-1.4")
    archive.release_collateral(officer, reg.id, None, "2025-01-31")
    archive.add_user(ADMIN, "eva.auditor", "auditor")
    open_loan(archive, officer, "CR-2")
    return {"npl": npl, "registration": reg.id, "valuation": val.id, "document": doc.id}


def test_audit_rows_for_a_loan_history(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    ids = scripted_history(archive, officer)
    Follower(AuditTrailView(), archive, store, batch_size=4).catch_up()
    head = archive.head_position()
    everything = audit_trail.query(store, limit=1000)
    assert everything.total == head and everything.position == head
    assert [r["position"] for r in everything.items] == list(range(1, head + 1))
    by_position = {r["position"]: r for r in everything.items}

    npl = by_position[ids["npl"]]
    assert npl["event_type"] == "LoanFile.StatusChanged"
    assert npl["summary"] == "status overdue → non_performing"
    assert npl["diff"] == {"status": {"before": "overdue", "after": "non_performing"}}
    assert (npl["actor_id"], npl["actor_role"], npl["reason"]) == (
        "officer.one",
        "credit_officer",
        "test",
    )
    assert (npl["aggregate_type"], npl["loan_number"]) == ("LoanFile", "CR-1")
    assert npl["occurred_at"].endswith("Z") and npl["correlation_id"]

    trail = audit_trail.query(store, loan_number="CR-1", limit=1000).items
    types = [r["event_type"] for r in trail]
    officers = [r for r in trail if r["event_type"] == "LoanFile.OfficerAssigned"]
    assert [r["diff"] for r in officers] == [
        {"loan_officer": {"before": None, "after": "maria.lopez"}},
        {"loan_officer": {"before": "maria.lopez", "after": "jose.ruiz"}},
    ]
    assert officers[1]["summary"] == "loan officer maria.lopez → jose.ruiz"
    # Every aggregate filed under the loan resolves to it, the property's lien release too.
    for expected in (
        "MortgageRegistration.Filed",
        "PropertyLiens.LienAdded",
        "PropertyLiens.LienReleased",
        "MortgageRegistration.Released",
        "Valuation.Appraised",
        "Valuation.Reviewed",
        "Valuation.OvervaluationFlagged",
        "Document.Registered",
        "LoanDocuments.Started",
        "LoanDocuments.DocumentFiled",
        "Document.Downloaded",
    ):
        assert expected in types
    assert "User.Registered" not in types and "LoanFile.Opened" in types
    assert all(r["loan_number"] == "CR-1" for r in trail)

    [upload] = [r for r in trail if r["event_type"] == "Document.Registered"]
    assert upload["summary"] == "document contract uploaded (1.2 kB): contrato.pdf"
    assert upload["actor_role"] == "archivist"
    assert upload["diff"]["sha256"]["before"] is None
    [download] = [r for r in trail if r["event_type"] == "Document.Downloaded"]
    assert download["summary"] == "document contract downloaded by eva.auditor"
    assert (download["actor_id"], download["reason"], download["diff"]) == (
        "eva.auditor",
        "annual audit",
        {},
    )
    assert download["aggregate_id"] == str(ids["document"])
    [released] = [r for r in trail if r["event_type"] == "MortgageRegistration.Released"]
    assert released["diff"] == {"released_on": {"before": None, "after": "2025-01-31"}}

    users = [r for r in everything.items if r["aggregate_type"] in ("User", "AccessToken")]
    assert [r["summary"] for r in users] == [
        "user eva.auditor registered as auditor",
        "token issued to eva.auditor",
    ]
    assert all(r["loan_number"] is None for r in users)

    # Filters, alone and together, and pagination.
    downloads = audit_trail.query(store, actor_id="eva.auditor")
    assert [r["event_type"] for r in downloads.items] == ["Document.Downloaded"]
    statuses = audit_trail.query(store, event_type="LoanFile.StatusChanged", loan_number="CR-1")
    assert statuses.total == 2
    page = audit_trail.query(store, loan_number="CR-1", limit=3, offset=3)
    assert [r["position"] for r in page.items] == [r["position"] for r in trail[3:6]]
    assert page.total == len(trail)
    newest = audit_trail.query(store, limit=1, descending=True).items[0]
    assert newest["position"] == head and newest["loan_number"] == "CR-2"
    moment = npl["occurred_at"]
    since = audit_trail.query(store, since=moment, limit=1000)
    assert [r["position"] for r in since.items] == list(range(ids["npl"], head + 1))
    until = audit_trail.query(store, until=moment, limit=1000)
    assert until.total == ids["npl"] - 1
    assert audit_trail.query(store, since=moment, until=moment).total == 0
    with pytest.raises(ValueError):
        audit_trail.query(store, since="2026-01-01T00:00:00")  # no time zone


def test_an_entry_added_to_a_list_is_new_in_the_diff_not_a_change_of_the_last_one(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    """A second repayment is not an amendment of the first, an equal one is still a
    repayment, and a second loan's lien on the property does not change the first's."""
    open_loan(archive, officer, "CR-1")
    open_loan(archive, officer, "CR-2")
    for amount in ("10.00", "5.00", "5.00"):
        change(archive, officer, "CR-1", "record_repayment", amount, "2024-06-01")
    first = archive.register_collateral(officer, **mortgage_fields("CR-1")).id
    archive.register_collateral(officer, **mortgage_fields("CR-2", lien_rank=2))
    archive.release_collateral(officer, first, None, "2024-06-01")
    Follower(AuditTrailView(), archive, store).catch_up()

    def diffs(event_type: str) -> list[dict[str, Any]]:
        return [r["diff"] for r in audit_trail.query(store, event_type=event_type).items]

    assert diffs("LoanFile.RepaymentRecorded") == [
        {"amount": {"before": None, "after": a}, "paid_on": {"before": None, "after": "2024-06-01"}}
        for a in ("10.00", "5.00", "5.00")
    ]
    added = diffs("PropertyLiens.LienAdded")
    assert [(d["loan_number"], d["lien_rank"]) for d in added] == [
        ({"before": None, "after": "CR-1"}, {"before": None, "after": 1}),
        ({"before": None, "after": "CR-2"}, {"before": None, "after": 2}),
    ]
    assert diffs("PropertyLiens.LienReleased") == [{"live": {"before": True, "after": False}}]
    linked = diffs("LoanFile.CollateralLinked")
    assert [d["registration_id"]["before"] for d in linked] == [None, None]


def test_audit_trail_exports_csv_and_json_lines(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    scripted_history(archive, officer)
    Follower(AuditTrailView(), archive, store).catch_up()
    expected = audit_trail.query(store, loan_number="CR-1", limit=1000).items

    chunks = audit_trail.export_jsonl(store, loan_number="CR-1", chunk=4)
    assert isinstance(chunks, Iterator)
    lines = list(chunks)
    assert all(line.endswith("\n") for line in lines)
    assert [json.loads(line) for line in lines] == expected

    text = "".join(audit_trail.export_csv(store, loan_number="CR-1", chunk=5))
    parsed = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(parsed) == len(expected)
    assert list(parsed[0]) == list(audit_trail.COLUMNS)
    for row, item in zip(parsed, expected, strict=True):
        assert int(row["position"]) == item["position"]
        assert row["summary"] == item["summary"]
        assert json.loads(row["diff"]) == item["diff"]
        assert row["reason"] == (item["reason"] or "")
    everyone = list(audit_trail.export_jsonl(store))
    assert len(everyone) == archive.head_position()
    since = expected[-1]["occurred_at"]
    later = [json.loads(x) for x in audit_trail.export_jsonl(store, since=since)]
    assert later and all(r["occurred_at"] >= since for r in later)
    with pytest.raises(TypeError):
        list(audit_trail.export_jsonl(store, colour="red"))


def test_the_csv_export_never_hands_a_spreadsheet_a_formula(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    formula = '=HYPERLINK("http://evil.example","x")'
    open_loan(archive, officer, "CR-1")
    ctx = CommandContext(officer.actor_id, officer.actor_role, formula)
    archive.change_loan(ctx, "CR-1", None, lambda loan: loan.classify(ctx, "special_mention"))
    Follower(AuditTrailView(), archive, store).catch_up()

    text = "".join(audit_trail.export_csv(store, loan_number="CR-1"))
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["reason"] for r in rows][-1] == "'" + formula
    assert not any(v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values())
    exact = [json.loads(x) for x in audit_trail.export_jsonl(store, loan_number="CR-1")]
    assert exact[-1]["reason"] == formula


class Memo(ArchiveAggregate):
    """An aggregate the views have never heard of."""

    class Written(ArchiveAggregate.Created):
        note: str


def test_unknown_event_types_are_skipped_by_views_and_kept_by_the_trail(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    from uuid import uuid4

    open_loan(archive, officer)
    archive.save(Memo._start(Memo.Written, officer, uuid4(), note="hello"))
    views = Projections(archive, store)
    views.catch_up()
    assert all(s.lag == 0 for s in views.status())
    assert loan_files.query(store).total == 1
    [memo] = audit_trail.query(store, event_type="Memo.Written").items
    assert memo["summary"] == "written" and memo["diff"] == {
        "note": {"before": None, "after": "hello"}
    }


def test_a_bulk_load_on_sqlite_checkpoints_when_told_with_a_larger_page_cache_then_not(
    tmp_path: Any,
) -> None:
    from projections import store as views_store

    store = views_store.SQLiteStore(tmp_path / "views.sqlite3")
    try:
        conn = store._conn()

        def pragmas() -> tuple[int, int]:
            return (
                conn.execute("PRAGMA cache_size").fetchone()[0],
                conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
            )

        database = tmp_path / "views.sqlite3"
        before = pragmas()
        with store.transaction() as tx:
            tx.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, x TEXT)")
        with store.bulk():
            assert pragmas() == (views_store.BULK_CACHE_KIB, 0)
            sizes = []
            for n in range(views_store.BULK_CHECKPOINT_EVERY):
                rows = [(n * 1000 + i, "x" * 1000) for i in range(1000)]  # 1 MB a commit
                with store.transaction() as tx:
                    tx.insert_values("t", ("n", "x"), rows)
                sizes.append(database.stat().st_size)
                store.checkpoint()
            # Past SQLite's 1,000 pages, yet no commit copied the WAL into the database:
            # only the loader's own checkpoint, after the last transaction, did.
            assert max(sizes) < 100_000 < 5_000_000 < database.stat().st_size
        assert pragmas() == before == (-2000, 1000)
        store.checkpoint()  # outside a bulk load: nothing
    finally:
        store.close()


def test_on_sqlite_an_audit_rows_position_is_its_rowid(
    settings: Settings, archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    """No second index to write on every insert (``AuditTrailView.create``)."""
    open_loan(archive, officer)
    Follower(AuditTrailView(), archive, store).catch_up()
    rebuild(AuditTrailView(), archive, store)
    with store.read() as tx:
        if settings.backend == "sqlite":
            found = tx.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'audit_events_g2'")
            names = {row["name"] for row in found}
            assert names == {"audit_events_g2"} | {
                f"audit_events_g2_{n}" for n in ("loan", "actor", "type", "aggregate", "time")
            }
            row = tx.one("SELECT rowid AS r, position FROM audit_events_g2")
            assert row == {"r": 1, "position": 1}
        else:
            column = tx.one(
                "SELECT data_type FROM information_schema.columns"
                " WHERE table_name = 'audit_events_g2' AND column_name = 'position'"
            )
            assert column == {"data_type": "bigint"}


def test_audit_rows_are_made_from_each_event_as_stored(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    """A row holds the stored state's own fields, sliced from the log's text, and its
    metadata parsed from the text before them: both agree with the decoded event. A state
    laid out otherwise (own fields first) is decoded whole, to the same row. Reasons with
    accents, quotes, backslashes or text that looks like the metadata read the same."""
    scripted_history(archive, officer)
    hashes = '","prev_hash":"' + "0" * 64 + '","event_hash":"' + "1" * 64
    for n, reason in enumerate(
        ("tasación revisada", 'dijo "no" \\ fin', f"x{hashes}", "línea\nsegunda", "")
    ):
        why = replace(officer, reason=reason or None)
        change(archive, why, "CR-1", "record_repayment", f"1.0{n}", f"2024-06-0{n + 2}")
    notes = archive.recorder.select_notifications(0, 1000, inclusive_of_start=False)
    assert notes
    assert sum(b"tasaci" in n.state for n in notes) == 1
    matched = [audit_trail._PLAIN_META.match(n.state) is not None for n in notes]
    assert any(matched) and not all(matched)  # both ways of reading the metadata are met
    transcoder = archive.mapper.transcoder
    for note in notes:
        event = archive.mapper.to_domain_event(note)
        own = {k: v for k, v in vars(event).items() if k not in audit_trail.META}
        stored = audit_trail.Stored(note)
        assert note.state.endswith(stored.fields[1:].encode())  # a slice, not re-encoded
        assert json.loads(stored.fields) == json.loads(transcoder.encode(own))
        assert stored.own() == own
        assert stored.occurred_at == iso_utc(event.timestamp)
        assert stored.aggregate_id == str(event.originator_id)
        assert stored.kind.qualname == type(event).__qualname__
        for name in ("actor_id", "actor_role", "reason", "correlation_id", "event_hash"):
            assert stored.meta[name] == getattr(event, name)
        assert stored.loan_number == getattr(event, "loan_number", None)

        metadata = {k: v for k, v in vars(event).items() if k in audit_trail.META}
        metadata = {k: v for k, v in metadata.items() if not k.startswith("originator_")}
        reordered = replace(note, state=transcoder.encode({**own, **metadata}))
        other = audit_trail.Stored(reordered)
        assert (other.meta, other.own(), other.occurred_at) == (
            {
                k: getattr(event, k)
                for k in ("actor_id", "actor_role", "reason", "correlation_id", "event_hash")
            },
            own,
            stored.occurred_at,
        )
        assert json.loads(other.fields) == json.loads(stored.fields)


def test_loan_files_read_a_repayment_from_its_stored_form_as_the_event_says(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    """Repayments are not decoded for the loan_files view: what it reads of their stored
    JSON equals the decoded event; a repayment stored otherwise is decoded whole."""
    open_loan(archive, officer)
    for n, day in enumerate(("2024-06-01", "2024-07-01", "2024-08-01")):
        change(archive, officer, "CR-1", "record_repayment", f"{n + 1}00.0{n}", day)
    notes = archive.recorder.select_notifications(0, 100, inclusive_of_start=False)
    repayments = [n for n in notes if n.topic.endswith("LoanFile.RepaymentRecorded")]
    assert len(repayments) == 3
    assert not LoanFilesView().needs("LoanFile.RepaymentRecorded")
    for note in repayments:
        event = archive.mapper.to_domain_event(note)
        read = loan_files._stored_repayment(note)
        assert isinstance(read, loan_files.StoredRepayment)
        assert (id_text(read.originator_id), read.originator_version, read.occurred_at) == (
            id_text(event.originator_id),
            event.originator_version,
            iso_utc(event.timestamp),
        )
        assert (read.amount, read.paid_on) == (event.amount, event.paid_on)
        other = archive.mapper.transcoder.encode({**vars(event), "amount": str(event.amount)})
        decoded = loan_files._stored_repayment(replace(note, state=other))
        assert type(decoded) is type(event) and decoded.amount == str(event.amount)
    # A reason that quotes another repayment's fields does not change what is read.
    quoted = ',"amount":{"_type_":"decimal_str","_data_":"9.99"},"paid_on":{"_type_":"date_iso"'
    change(
        archive, replace(officer, reason=quoted), "CR-1", "record_repayment", "400.04", "2024-09-01"
    )
    note = archive.recorder.select_notifications(0, 100, inclusive_of_start=False)[-1]
    assert quoted.encode() not in note.state  # stored escaped
    read = loan_files._stored_repayment(note)
    assert isinstance(read, loan_files.StoredRepayment)
    assert (read.amount, read.paid_on) == (Decimal("400.04"), date(2024, 9, 1))


def test_audit_summaries_and_diffs_do_not_depend_on_how_rows_are_read(
    archive: ArchiveApp, officer: CommandContext, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages, descending pages, filtered and unfiltered exports give each row the same
    summary and diff, also when the export keeps forgetting aggregates (tiny cache)."""
    scripted_history(archive, officer)
    change(archive, officer, "CR-1", "record_repayment", "100.00", "2024-06-01")
    change(archive, officer, "CR-1", "change_status", "restructured")
    Follower(AuditTrailView(), archive, store, batch_size=5).catch_up()
    expected = audit_trail.query(store, limit=1000).items
    by_position = {r["position"]: r for r in expected}
    assert [r for r in expected if r["event_type"] == "LoanFile.StatusChanged"][-1]["diff"] == {
        "status": {"before": "non_performing", "after": "restructured"}
    }
    for descending in (False, True):
        for offset in range(0, len(expected), 4):
            page = audit_trail.query(store, limit=4, offset=offset, descending=descending)
            assert all(by_position[r["position"]] == r for r in page.items)
    monkeypatch.setattr(audit_trail, "CACHE_AGGREGATES", 1)
    assert list(audit_trail.rows(store, chunk=3)) == expected
    assert list(audit_trail.rows(store, chunk=2, loan_number="CR-1")) == [
        r for r in expected if r["loan_number"] == "CR-1"
    ]


def test_an_unknown_event_type_filter_is_a_problem_naming_the_known_types(
    settings: Settings, archive: ArchiveApp, officer: CommandContext
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from archive.application import operator_context

    open_loan(archive, officer)
    token = archive.add_user(operator_context(), "ines.auditor", "auditor")
    client = TestClient(create_app(settings, archive), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {token}"}
    for path in ("/api/v1/audit-trail", "/api/v1/audit-trail/export"):
        answer = client.get(path, headers=auth, params={"event_type": "LoanFile.Opend"})
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        detail = answer.json()["detail"]
        assert "'LoanFile.Opend'" in detail
        assert "LoanFile.Opened" in detail and "Document.Downloaded" in detail
    known = client.get(
        "/api/v1/audit-trail", headers=auth, params={"event_type": "LoanFile.Opened"}
    )
    assert known.status_code == 200 and known.json()["total"] == 1


def test_human_sizes() -> None:
    assert human_size(999) == "999 B"
    assert human_size(2_100_000) == "2.1 MB"
    assert human_size(3 * 10**12) == "3.0 TB"


# -- property: incremental == rebuilt -------------------------------------------------------------

KINDS = (
    "status",
    "classify",
    "officer",
    "categorise",
    "repay",
    "collect",
    "investigate",
    "collateral",
    "register",
    "release",
    "appraise",
    "review",
    "revalue",
    "document",
    "download",
    "hold",
    "extract",
)
TIERS = ("special_mention", "substandard", "doubtful", "loss", "pass")
CHECKLIST = (
    "creditor_debtor_relationship_clear",
    "willingness_to_pay",
    "capacity_to_pay",
    "valid_assets",
    "asset_disposal_feasible",
    "liabilities_investigated",
)
examples = itertools.count()


def perform(
    archive: ArchiveApp,
    ctx: CommandContext,
    kind: str,
    loan: str,
    k: int,
    made: dict[str, list[Any]],
    tag: int,
) -> None:
    def pick(what: str) -> Any:
        found = [i for ln, i in made[what] if ln == loan] or [i for _, i in made[what]]
        if not found:
            raise LookupError(what)
        return found[k % len(found)]

    if kind == "status":  # a transition the rules allow, settling rarely
        now = LoanStatus(archive.get_loan(loan).status)
        allowed = sorted(s.value for s in ALLOWED_TRANSITIONS[now] if k == 7 or s != "settled")
        change(archive, ctx, loan, "change_status", allowed[k % len(allowed)] if allowed else "x")
    elif kind == "classify":
        change(archive, ctx, loan, "classify", TIERS[k % len(TIERS)])
    elif kind == "officer":
        change(archive, ctx, loan, "assign_officer", ("loan", "collection")[k % 2], f"off-{k % 3}")
    elif kind == "categorise":  # walk the loan into recovery: NPL, officers, category, plan
        current = archive.get_loan(loan)
        for step in ("overdue", "non_performing"):
            if step in ALLOWED_TRANSITIONS[LoanStatus(current.status)]:
                change(archive, ctx, loan, "change_status", step)
                current = archive.get_loan(loan)
        for duty in ("loan", "collection"):
            if getattr(current, f"{duty}_officer") is None:
                change(archive, ctx, loan, "assign_officer", duty, f"{duty}-{k % 2}")
        category = ("recoverable", "recoverable_with_effort", "temporarily_unrecoverable")[k % 3]
        change(archive, ctx, loan, "categorise_recovery", category, ["job loss"])
        change(archive, ctx, loan, "set_recovery_plan", "sell the flat", "2026-01-01", "5000.00")
    elif kind == "repay":
        change(archive, ctx, loan, "record_repayment", f"{(k + 1) * 100}.50", "2024-06-01")
    elif kind == "collect":
        change(
            archive,
            ctx,
            loan,
            "record_collection_action",
            "visit",
            "2024-07-01",
            "met",
            f"{k * 10}.00",
            "col",
        )
    elif kind == "investigate":
        checklist = {item: bool((k >> i) & 1) for i, item in enumerate(CHECKLIST)}
        change(archive, ctx, loan, "record_investigation", checklist, "2024-05-01")
    elif kind == "collateral":
        fields = mortgage_fields(
            loan, cadastral_reference=f"REF{tag:05d}X{k % 2}", lien_rank=k % 3 + 1
        )
        made["collateral"].append((loan, archive.register_collateral(ctx, **fields).id))
    elif kind == "register":
        cid = pick("collateral")
        archive.change_collateral(
            ctx, cid, None, lambda c: c.mark_registered(ctx, f"E-{k}", "2024-02-01")
        )
    elif kind == "release":
        archive.release_collateral(ctx, pick("collateral"), None, "2025-01-01")
    elif kind == "appraise":
        collateral = [i for ln, i in made["collateral"] if ln == loan]
        previous = [i for ln, i in made["valuation"] if ln == loan]
        outcome = archive.appraise(
            ctx,
            supersedes=previous[-1] if previous and k % 2 else None,
            **appraisal_fields(loan, collateral_id=collateral[-1] if collateral else None),
        )
        made["valuation"].append((loan, outcome.id))
    elif kind == "review":
        value = f"{100000 + k * 10000}.00"
        archive.review_valuation(
            ctx, pick("valuation"), None, reviewer="Eva Ruiz", reviewed_value=value
        )
    elif kind == "revalue":
        archive.change_valuation(
            ctx,
            pick("valuation"),
            None,
            lambda v: v.schedule_revaluation(ctx, f"202{5 + k % 3}-03-01"),
        )
    elif kind == "document":
        outcome = archive.register_document(
            ARCHIVIST,
            pdf(1000 + k),
            loan_number=loan,
            doc_type="contract",
            original_filename=f"d{k}.pdf",
        )
        made["document"].append((loan, outcome.id))
    elif kind == "download":
        document = archive.stored_document(pick("document"))
        body = archive.open_original(AUDITOR, document, 0, None if k % 2 else 99)
        b"".join(body)
    elif kind == "hold":
        archive.set_legal_hold(AUDITOR, pick("document"), bool(k % 2))
    elif kind == "extract":
        extraction_step(archive, pick("document"), succeed=k % 3 != 0)


@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    commands=st.lists(
        st.tuples(st.sampled_from(KINDS), st.integers(0, 1), st.integers(0, 7)),
        min_size=1,
        max_size=14,
    ),
    batch_size=st.integers(1, 6),
    follow_every=st.integers(1, 4),
)
def test_incremental_views_equal_views_rebuilt_from_scratch(
    archive: ArchiveApp,
    officer: CommandContext,
    store: Store,
    commands: list[tuple[str, int, int]],
    batch_size: int,
    follow_every: int,
) -> None:
    tag = next(examples)
    loans = [f"P{tag}-A", f"P{tag}-B"]
    for loan in loans:
        archive.open_loan(officer, **loan_terms(loan))
    views = [LoanFilesView(), AuditTrailView()]
    live = [Follower(v, archive, store, batch_size=batch_size) for v in views]
    made: dict[str, list[Any]] = {"collateral": [], "valuation": [], "document": []}
    for n, (kind, which, k) in enumerate(commands):
        # A command the domain refuses records no events: nothing to project.
        with contextlib.suppress(ArchiveError, LookupError):
            perform(archive, officer, kind, loans[which], k, made, tag)
        if n % follow_every == 0:
            for follower in live:
                follower.run_once()
    for follower in live:
        follower.catch_up()
        assert follower.status().lag == 0
    for view in views:
        rebuilt_equals_incremental(view, archive, store)
    # And the incremental loan view agrees with the archive's own reconstruction.
    for loan in loans:
        row, truth = loan_files.get(store, loan), archive.loan_file(loan)
        assert row is not None
        assert (row["version"], row["status"], row["outstanding"]) == (
            truth["version"],
            truth["status"],
            str(truth["outstanding"]),
        )
        assert len(row["documents"]) == len(truth["documents"])
        assert [d["downloads"] for d in row["documents"]] == [
            d["downloads"] for d in truth["documents"]
        ]
        assert [d["extraction_status"] for d in row["documents"]] == [
            d["extraction"]["status"] for d in truth["documents"]
        ]
        assert len(row["collateral"]) == len(truth["collateral"])
        assert {v["valuation_id"] for v in row["valuations"]} == {
            str(v["id"]) for v in truth["valuations"]
        }


def test_since_and_until_accept_datetimes(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    open_loan(archive, officer)
    Follower(AuditTrailView(), archive, store).catch_up()
    when = archive.get_loan("CR-1").created_on
    assert audit_trail.query(store, since=when).total == 1
    assert audit_trail.query(store, since=when + timedelta(microseconds=1)).total == 0
    assert audit_trail.query(store, until=when + timedelta(seconds=1)).total == 1


def test_reads_are_snapshots_and_leave_writes_as_they_were(postgres_url: str) -> None:
    """read() declares REPEATABLE READ, READ ONLY in its BEGIN; the pooled connection it
    used then writes as before (READ COMMITTED, read-write), also after a failed read."""
    store = open_store(Settings(database_url=postgres_url, db_pool_size=1))
    try:
        with store.transaction() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS t_rw (n INTEGER)")
        for _ in range(2):
            with store.read() as tx:
                shown = tx.one(
                    "SELECT current_setting('transaction_isolation') AS iso,"
                    " current_setting('transaction_read_only') AS ro"
                )
                assert shown == {"iso": "repeatable read", "ro": "on"}
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    tx.execute("INSERT INTO t_rw VALUES (1)")
        with store.transaction() as tx:  # the same (only) pooled connection
            shown = tx.one(
                "SELECT current_setting('transaction_isolation') AS iso,"
                " current_setting('transaction_read_only') AS ro"
            )
            assert shown == {"iso": "read committed", "ro": "off"}
            tx.execute("INSERT INTO t_rw VALUES (1)")
        with store.read() as tx:
            assert tx.one("SELECT COUNT(*) AS n FROM t_rw") == {"n": 1}
    finally:
        store.close()
