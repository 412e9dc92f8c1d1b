"""Property tests of the event log: replay, time travel and tamper detection, per backend."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.domain import Aggregate, Snapshot
from eventsourcing.domain import event as triggers
from factories import appraisal_fields, mortgage_fields, open_loan
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from archive.application import ArchiveApp, replay
from archive.collateral import PropertyLiens, property_id
from archive.domain import CommandContext
from archive.exceptions import DomainError
from archive.integrity import canonical_bytes, digest_of
from archive.loans import (
    ChecklistItem,
    Classification,
    CollectionKind,
    InspectionKind,
    LoanStatus,
    RecoveryCategory,
    loan_id,
)

officers = st.sampled_from(["Pedro Sanz", "Elena Martín", "Rosa Gil"])
# Mostly dates a loan disbursed on 2024-01-15 can carry; the earlier ones are refused.
dates = st.dates(date(2023, 7, 1), date(2026, 1, 1)).map(lambda d: d.isoformat())
amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("30000"), places=2)

commands = st.one_of(
    st.tuples(st.just("change_status"), st.sampled_from([s.value for s in LoanStatus])),
    st.tuples(st.just("classify"), st.sampled_from([c.value for c in Classification])),
    st.tuples(st.just("assign_officer"), st.sampled_from(["loan", "collection"]), officers),
    st.tuples(st.just("record_repayment"), amounts, dates),
    st.tuples(
        st.just("record_inspection"),
        st.sampled_from([k.value for k in InspectionKind]),
        dates,
        officers,
        st.text(min_size=1, max_size=40),
    ),
    st.tuples(
        st.just("record_collection_action"),
        st.sampled_from([k.value for k in CollectionKind]),
        dates,
        st.text(min_size=1, max_size=40),
        amounts,
        officers,
    ),
    st.tuples(
        st.just("record_investigation"),
        st.fixed_dictionaries({i.value: st.booleans() for i in ChecklistItem}),
        dates,
    ),
    st.tuples(
        st.just("categorise_recovery"),
        st.sampled_from([c.value for c in RecoveryCategory]),
        st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=3),
    ),
)

counter = itertools.count()
PROPERTY_SETTINGS = hypothesis_settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# Any reason a command accepts: every character but the controls CommandContext refuses.
REASON_TEXT = st.text(
    st.characters(exclude_categories=["Cc", "Cs"]) | st.sampled_from("\t\n\r"), max_size=30
)


@PROPERTY_SETTINGS
@given(script=st.lists(commands, max_size=25), reasons=st.lists(st.none() | REASON_TEXT))
def test_replay_reproduces_every_version(
    archive: ArchiveApp,
    officer: CommandContext,
    script: list[tuple[Any, ...]],
    reasons: list[str | None],
) -> None:
    number = f"P-{next(counter)}"
    open_loan(archive, officer, number, principal="50000.00")
    expected = {1: archive.get_loan(number).state()}
    for step, (name, *args) in enumerate(script):
        reason = reasons[step] if step < len(reasons) else None
        ctx = CommandContext("prop.tester", "credit_officer", reason)
        loan = archive.get_loan(number)
        before = loan.state()
        try:
            getattr(loan, name)(ctx, *args)
        except DomainError:
            assert loan.state() == before, "a refused command must not change the state"
            assert loan.pending_events == []
            continue
        archive.save(loan)
        expected[loan.version] = loan.state()

    head = archive.get_loan(number)
    assert head.state() == expected[head.version]
    for version, state in expected.items():
        assert archive.get_loan(number, version=version).state() == state
    report = archive.verify_aggregate_chain(loan_id(number))
    assert report.ok, report.breach
    assert report.events_checked == head.version
    for _, event in archive.loan_events(number):
        assert digest_of(event) == event.event_hash


# -- tampering -------------------------------------------------------------------------------


def populate(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer, "T-1")
    open_loan(archive, officer, "T-2", product="village_group", village_group="Regantes del Jiloca")
    reg = archive.register_collateral(officer, **mortgage_fields("T-1"))
    val = archive.appraise(officer, **appraisal_fields("T-1", collateral_id=reg.id))
    archive.review_valuation(officer, val.id, None, "Carmen Ruiz", "120000.00", "comparables ñ")
    archive.change_loan(officer, "T-2", None, lambda loan: loan.change_status(officer, "overdue"))
    archive.change_loan(
        officer, "T-2", None, lambda loan: loan.record_repayment(officer, "12.34", "2024-03-01")
    )


class RawEvents:
    """Direct access to the events table, bypassing the append-only guard, as an attacker would."""

    def __init__(self, archive: ArchiveApp, backend: str) -> None:
        self.recorder: Any = archive.recorder
        self.backend = backend
        self.table = self.recorder.events_table_name
        self.position = "rowid" if backend == "sqlite" else "notification_id"
        with self.recorder.datastore.transaction(commit=True) as c:
            if backend == "sqlite":
                c.execute(f"DROP TRIGGER IF EXISTS {self.table}_no_update")
            else:
                c.execute(f"ALTER TABLE {self.table} DISABLE TRIGGER USER")

    def rows(self) -> list[dict[str, Any]]:
        with self.recorder.datastore.transaction(commit=False) as c:
            c.execute(
                f"SELECT {self.position} AS position, originator_id, originator_version, topic, state "
                f"FROM {self.table} ORDER BY {self.position}"
            )
            return [dict(r) for r in c.fetchall()]

    def write(self, position: int, column: str, value: Any) -> None:
        mark = "?" if self.backend == "sqlite" else "%s"
        with self.recorder.datastore.transaction(commit=True) as c:
            c.execute(
                f"UPDATE {self.table} SET {column} = {mark} WHERE {self.position} = {mark}",
                (value, position),
            )


@pytest.fixture
def tampered_store(
    archive: ArchiveApp, officer: CommandContext, backend: str
) -> tuple[ArchiveApp, RawEvents]:
    populate(archive, officer)
    assert archive.verify_chain().ok
    return archive, RawEvents(archive, backend)


@hypothesis_settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_flipping_any_byte_names_that_event(
    tampered_store: tuple[ArchiveApp, RawEvents], data: st.DataObject
) -> None:
    archive, raw = tampered_store
    rows = raw.rows()
    row = data.draw(st.sampled_from(rows), label="event")
    column = data.draw(st.sampled_from(["state", "state", "state", "topic"]), label="column")
    original = row[column]
    blob = bytearray(original if isinstance(original, bytes) else str(original).encode())
    index = data.draw(st.integers(0, len(blob) - 1), label="byte")
    blob[index] ^= data.draw(st.integers(1, 255), label="xor")
    tampered: Any = bytes(blob) if column == "state" else blob.decode("utf-8", "replace")
    if tampered == original:  # a replacement character can map back; nothing was changed
        return
    # PostgreSQL text columns cannot hold NUL at all: no attacker can store that topic.
    assume(not (raw.backend == "postgres" and column == "topic" and "\x00" in tampered))
    raw.write(row["position"], column, tampered)
    try:
        report = archive.verify_chain()
        assert report.breach is not None, "tampering went unnoticed"
        assert report.breach.position == row["position"]
        assert str(report.breach.originator_id).replace("-", "") == str(
            row["originator_id"]
        ).replace("-", "")
        assert report.breach.originator_version == row["originator_version"]
    finally:
        raw.write(row["position"], column, original)
    assert archive.verify_chain().ok


def test_recomputed_hash_breaks_the_next_link(tampered_store: tuple[ArchiveApp, RawEvents]) -> None:
    """A forger who rewrites an event and its own hash is caught by the next event's link."""
    archive, raw = tampered_store
    rows = raw.rows()
    loan_rows = [r for r in rows if r["topic"].endswith("LoanFile.Opened")]
    target = loan_rows[1]
    event = archive.mapper.to_domain_event(
        archive.recorder.select_events(loan_id("T-2"), lte=1)[0]  # type: ignore[attr-defined]
    )
    forged_fields = {**vars(event), "borrower_name": "Someone Else"}
    forged = type(event)(**forged_fields)
    object.__setattr__(forged, "event_hash", digest_of(forged))
    raw.write(target["position"], "state", archive.mapper.to_stored_event(forged).state)
    report = archive.verify_chain()
    assert report.breach is not None
    assert report.breach.originator_id == loan_id("T-2")
    assert report.breach.originator_version == 2
    assert "link" in report.breach.problem


def test_deleted_event_is_a_version_gap(
    tampered_store: tuple[ArchiveApp, RawEvents], backend: str
) -> None:
    archive, raw = tampered_store
    rows = [r for r in raw.rows() if str(r["originator_id"]).replace("-", "") == loan_id("T-2").hex]
    with archive.recorder.datastore.transaction(commit=True) as c:  # type: ignore[attr-defined]
        if backend == "sqlite":
            c.execute(f"DROP TRIGGER IF EXISTS {raw.table}_no_delete")
        mark = "?" if backend == "sqlite" else "%s"
        c.execute(f"DELETE FROM {raw.table} WHERE {raw.position} = {mark}", (rows[1]["position"],))
    report = archive.verify_loan_chain("T-2")
    assert report.breach is not None
    assert report.breach.originator_version == 3
    assert "follows" in report.breach.problem


def test_a_loans_verification_covers_the_liens_its_history_shows(
    tampered_store: tuple[ArchiveApp, RawEvents],
) -> None:
    """The loan's history lists the lien added for its registration, from the property's
    lien index: verifying the loan alone verifies that index's chain too (a lien rank
    rewritten from 1 to 3 was shown in the history while the loan verified ok)."""
    archive, raw = tampered_store
    index = property_id(mortgage_fields("T-1")["cadastral_reference"]).hex
    lien = next(
        r
        for r in raw.rows()
        if str(r["originator_id"]).replace("-", "") == index
        and r["topic"].endswith("PropertyLiens.LienAdded")
    )
    assert any(p == lien["position"] for p, _ in archive.loan_events("T-1"))
    state = bytes(lien["state"])
    assert b'"lien_rank":1' in state
    raw.write(lien["position"], "state", state.replace(b'"lien_rank":1', b'"lien_rank":3'))
    report = archive.verify_loan_chain("T-1")
    assert report.breach is not None, "a tampered lien of the loan went unnoticed"
    assert report.breach.originator_id.hex == index
    assert report.breach.position == lien["position"]
    assert "hash" in report.breach.problem
    assert archive.verify_loan_chain("T-2").ok  # another loan's file is not blamed


# -- snapshots -------------------------------------------------------------------------------


def test_long_files_replay_from_snapshots_that_verify(
    archive: ArchiveApp, officer: CommandContext, backend: str
) -> None:
    open_loan(archive, officer, "S-1", principal="100000.00")
    moments = {}
    for month in range(1, 250):
        archive.change_loan(
            officer, "S-1", None, lambda loan: loan.record_repayment(officer, "10.00", "2024-02-01")
        )
        if month in (99, 150):
            moments[month + 1] = archive.get_loan("S-1").modified_on
    assert [s.originator_version for s in archive.snapshots.get(loan_id("S-1"))] == [100, 200]
    # Time travel lands between snapshots and agrees with a replay of the events alone.
    for version, moment in moments.items():
        state = archive.loan_file("S-1", as_of=moment)
        assert state["version"] == version
        assert state["repaid"] == Decimal("10.00") * (version - 1)
        assert archive.loan_file("S-1", version=version)["repaid"] == state["repaid"]
    assert archive.verify_chain().ok

    # A forged snapshot is caught even though every event still verifies.
    recorder: Any = archive.snapshots.recorder  # type: ignore[union-attr]
    table = recorder.events_table_name
    with recorder.datastore.transaction(commit=True) as c:
        c.execute(f"SELECT state FROM {table} WHERE originator_version = 200")
        state = bytes(c.fetchone()["state"])
        forged = state.replace(
            b'"repaid":{"_type_":"decimal_str","_data_":"1990.00"}',
            b'"repaid":{"_type_":"decimal_str","_data_":"9990.00"}',
        )
        assert forged != state
        mark = "?" if backend == "sqlite" else "%s"
        c.execute(f"UPDATE {table} SET state = {mark} WHERE originator_version = 200", (forged,))
    report = archive.verify_chain()
    assert report.breach is not None
    assert (report.breach.originator_id, report.breach.originator_version) == (loan_id("S-1"), 200)
    assert "snapshot" in report.breach.problem


def test_time_travel_around_every_snapshot_agrees_with_a_replay_from_scratch(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    """Moments at, just after and just before each snapshot's event, and past the last."""
    open_loan(archive, officer, "S-2")
    for day in range(1, 230):
        archive.change_loan(
            officer,
            "S-2",
            None,
            lambda loan, d=day: loan.record_repayment(officer, "1.00", f"2024-{1 + d % 12:02d}-20"),
        )
    lid = loan_id("S-2")
    assert archive.snapshots is not None
    assert [s.originator_version for s in archive.snapshots.get(lid)] == [100, 200]
    events = list(archive.repository.event_store.get(lid))
    tick = timedelta(microseconds=1)
    assert archive.state_at(lid, events[0].timestamp - tick) is None
    for version in (1, 2, 99, 100, 101, 150, 199, 200, 201, 229, 230):
        expected = replay(None, events[:version]).state()
        moment = events[version - 1].timestamp
        later = events[version].timestamp - tick if version < len(events) else moment + tick
        for when in (moment, later):
            assert archive.state_at(lid, when).state() == expected, (version, when)
        by_moment = archive.loan_file("S-2", as_of=moment)
        assert {k: by_moment[k] for k in expected} == expected
        assert archive.loan_file("S-2", version=version) == by_moment


def test_a_planted_snapshot_of_any_aggregate_is_caught(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    """The library rebuilds any aggregate from a snapshot it finds, including types that
    never take one: verification checks every snapshot in the store."""
    open_loan(archive, officer)
    archive.register_collateral(officer, **mortgage_fields())
    prop_id = property_id(mortgage_fields()["cadastral_reference"])
    honest = Snapshot.take(archive.repository.get(prop_id))
    assert PropertyLiens not in archive.snapshotting_intervals
    assert archive.snapshots is not None
    archive.snapshots.put([replace(honest, state={**honest.state, "liens": {}})])
    assert archive.repository.get(prop_id).liens == {}  # reads would now see the forgery
    report = archive.verify_chain()
    assert report.breach is not None
    assert (report.breach.originator_id, report.breach.originator_version) == (prop_id, 2)
    assert "snapshot" in report.breach.problem


# -- the canonical form: the bytes every stored hash was computed over ---------------------


def test_canonical_bytes_are_sorted_spaceless_json_with_tagged_types() -> None:
    fields = {
        "b_id": UUID("12345678-1234-5678-1234-567812345678"),
        "a_amount": Decimal("1200.50"),
        "moment": datetime(2024, 3, 1, 13, 30, tzinfo=timezone(timedelta(hours=1))),
        "day": date(2024, 2, 29),
        "flag": True,
        "none": None,
        "name": "Peña",
        "rows": [{"z": 1, "y": (Decimal("2"), "x")}],
        "view": MappingProxyType({"k": date(2020, 1, 2)}),
    }
    assert (
        canonical_bytes("t:E", fields)
        == (
            '{"fields":{"a_amount":{"$decimal":"1200.50"},"b_id":{"$uuid":'
            '"12345678-1234-5678-1234-567812345678"},"day":{"$date":"2024-02-29"},"flag":true,'
            '"moment":{"$datetime":"2024-03-01T12:30:00+00:00"},"name":"Peña","none":null,'
            '"rows":[{"y":[{"$decimal":"2"},"x"],"z":1}],"view":{"k":{"$date":"2020-01-02"}}},'
            '"topic":"t:E"}'
        ).encode()
    )


@pytest.mark.parametrize(
    "value", [1.5, [1, 2.0], {"a": {"b": [0.1]}}, ("x", float("nan"))], ids=repr
)
def test_canonical_bytes_refuse_floats_anywhere(value: Any) -> None:
    with pytest.raises(ValueError, match="floats"):
        canonical_bytes("t:E", {"field": value})


@pytest.mark.parametrize(
    ("value", "error"),
    [(datetime(2024, 1, 1), ValueError), ({1, 2}, TypeError), (b"bytes", TypeError)],
    ids=["naive datetime", "set", "bytes"],
)
def test_canonical_bytes_refuse_what_has_no_canonical_form(value: Any, error: type) -> None:
    with pytest.raises(error):
        canonical_bytes("t:E", {"field": value})


# -- saving: ArchiveApp.save collects our aggregates' events without the Protocol checks ----


class Plain(Aggregate):
    """Not an ArchiveAggregate: saved through the library's own path."""

    @triggers("Made")
    def __init__(self, note: str) -> None:
        self.note = note


def test_save_records_several_aggregates_in_order_in_one_transaction(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    open_loan(archive, officer, "SV-1")
    loan = archive.get_loan("SV-1")
    loan.record_repayment(officer, "10.00", "2024-02-01")
    loan.record_repayment(officer, "20.00", "2024-03-01")
    other = Plain("kept")
    recordings = archive.save(loan, other)  # one of ours, one plain: the library's path
    assert [r.domain_event.originator_version for r in recordings] == [2, 3, 1]
    ours = archive.save(archive.get_loan("SV-1"))  # nothing pending: nothing recorded
    assert ours == []
    again = archive.get_loan("SV-1")
    again.record_repayment(officer, "5.00", "2024-04-01")
    (recording,) = archive.save(again)
    positions = [r.notification.id for r in recordings] + [recording.notification.id]
    assert positions == list(range(positions[0], positions[0] + 4))
    assert archive.get_loan("SV-1").repaid == Decimal("35.00")
    assert archive.repository.get(other.id).note == "kept"
    # The loan's chain holds; the plain aggregate's event, outside any chain, is flagged.
    breach = archive.verify_chain().breach
    assert breach is not None and breach.originator_id == other.id
    assert breach.problem == "event carries no hash"
