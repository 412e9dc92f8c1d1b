"""The domain rules, through the application service, on every backend."""

from __future__ import annotations

from collections import deque
from copy import deepcopy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import uuid4

import pytest
from factories import appraisal_fields, loan_terms, mortgage_fields, open_loan

from archive.application import ArchiveApp, StaleVersionError
from archive.collateral import MortgageRegistration, PropertyLiens
from archive.documents import Document, FixityOutcome, LoanDocuments, Reconciliation
from archive.domain import ArchiveAggregate, CommandContext
from archive.exceptions import ConflictError, DomainError, NotFoundError
from archive.loans import ALLOWED_TRANSITIONS, ChecklistItem, LoanFile, LoanStatus
from archive.settings import Settings
from archive.users import AccessToken, User
from archive.valuations import Valuation


def path_to(status: LoanStatus) -> list[LoanStatus]:
    """Shortest sequence of allowed transitions from performing to ``status``."""
    queue: deque[list[LoanStatus]] = deque([[LoanStatus.PERFORMING]])
    while queue:
        path = queue.popleft()
        if path[-1] is status:
            return path[1:]
        queue.extend([*path, n] for n in ALLOWED_TRANSITIONS[path[-1]] if n not in path)
    raise AssertionError(f"{status} unreachable")


@pytest.mark.parametrize("start", list(LoanStatus))
@pytest.mark.parametrize("target", list(LoanStatus))
def test_every_status_transition_follows_the_table(
    start: LoanStatus, target: LoanStatus, officer: CommandContext
) -> None:
    loan = LoanFile.open(officer, **loan_terms())
    for step in path_to(start):
        loan.change_status(officer, step.value)
    assert loan.status == start
    if target in ALLOWED_TRANSITIONS[start]:
        loan.change_status(officer, target.value)
        assert loan.status == target
    else:
        with pytest.raises(DomainError, match=f"cannot become {target.value}"):
            loan.change_status(officer, target.value)
        assert loan.status == start


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("principal", "-5", "principal must be positive"),
        ("principal", "0", "principal must be positive"),
        ("principal", "12.345", "more than two decimal places"),
        ("principal", "NaN", "finite"),
        ("product", "crypto", "unknown product"),
        ("currency_code", "euro", "ISO 4217"),
        ("maturity_date", "2020-01-01", "maturity date must be after"),
        ("disbursement_date", "15/01/2024", "ISO date"),
        ("term_months", 0, "from 1 to 1200"),
        ("term_months", 10**20, "from 1 to 1200"),  # would overflow a view's integer column
        ("borrower_name", "Ana\x00Pérez", "control characters"),  # PostgreSQL text refuses NUL
        ("branch", "Teruel\x1b[31m", "control characters"),
        ("interest_rate", "120", "from 0 to 100"),
        ("interest_rate", "-1", "from 0 to 100"),
        ("interest_rate", "3.12345", "more than four decimal places"),
        ("borrower_name", "  ", "borrower name must not be empty"),
    ],
)
def test_opening_refuses_bad_terms(
    field: str, value: object, message: str, officer: CommandContext
) -> None:
    with pytest.raises(DomainError, match=message):
        LoanFile.open(officer, **loan_terms(**{field: value}))


def test_what_every_event_stores_is_checked_at_the_command(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    """Events are forever: a value no read model can hold must never be appended."""
    with pytest.raises(DomainError, match="reason contains control characters"):
        CommandContext("ana", "credit_officer", "typo\x00")
    with pytest.raises(DomainError, match="correlation id is longer than 200"):
        CommandContext("ana", "credit_officer", None, "x" * 201)
    assert CommandContext("ana", "credit_officer", "line one\nline two\tend").reason
    open_loan(archive, officer, "CR-1")
    with pytest.raises(DomainError, match="lien rank must be a whole number from 1 to 99"):
        archive.register_collateral(officer, **mortgage_fields("CR-1", lien_rank=100))
    assert archive.loan_events("CR-1")[-1][1].__class__.__name__ == "Opened"


@pytest.mark.parametrize(("given", "kept"), [("3.125", "3.125"), ("3.5", "3.50"), ("0", "0.00")])
def test_interest_rates_keep_up_to_four_decimals(
    given: str, kept: str, officer: CommandContext
) -> None:
    loan = LoanFile.open(officer, **loan_terms(interest_rate=given))
    assert str(loan.interest_rate) == kept


def test_village_group_loans_name_their_group(officer: CommandContext) -> None:
    with pytest.raises(DomainError, match="village group"):
        LoanFile.open(officer, **loan_terms(product="village_group"))
    loan = LoanFile.open(officer, **loan_terms(product="village_group", village_group="Regantes"))
    assert loan.village_group == "Regantes"


def test_events_carry_actor_reason_and_chain(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)
    ctx = CommandContext("maria", "credit_officer", "impago de tres cuotas", "req-42")
    archive.change_loan(ctx, "CR-1", 1, lambda loan: loan.change_status(ctx, "overdue"))
    (_, opened), (_, changed) = archive.loan_events("CR-1")
    assert (changed.actor_id, changed.actor_role, changed.reason, changed.correlation_id) == (
        "maria",
        "credit_officer",
        "impago de tres cuotas",
        "req-42",
    )
    assert changed.timestamp.tzinfo is not None and changed.timestamp.utcoffset() == timedelta(0)
    assert changed.prev_hash == opened.event_hash
    assert opened.prev_hash == "0" * 64


def test_loan_numbers_are_unique(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)
    with pytest.raises(ConflictError, match="CR-1 already exists"):
        open_loan(archive, officer, borrower_name="Someone Else")
    assert archive.get_loan("CR-1").borrower_name == "Ana Pérez Núñez"


def test_unknown_loan_is_not_found(archive: ArchiveApp) -> None:
    with pytest.raises(NotFoundError):
        archive.get_loan("NOPE")


def test_stale_expected_version_is_a_conflict(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)
    archive.change_loan(officer, "CR-1", 1, lambda loan: loan.classify(officer, "special_mention"))
    with pytest.raises(StaleVersionError, match="at version 2, not 1"):
        archive.change_loan(officer, "CR-1", 1, lambda loan: loan.classify(officer, "substandard"))
    assert archive.get_loan("CR-1").classification == "special_mention"


def test_recovery_needs_npl_and_both_officers(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)

    def change(command):  # type: ignore[no-untyped-def]
        return archive.change_loan(officer, "CR-1", None, command)

    categorise = lambda loan: loan.categorise_recovery(officer, "recoverable", ["paro"])  # noqa: E731
    with pytest.raises(DomainError, match="only non-performing"):
        change(categorise)
    change(lambda loan: loan.change_status(officer, "overdue"))
    change(lambda loan: loan.change_status(officer, "non_performing"))
    with pytest.raises(DomainError, match="missing: loan officer, collection officer"):
        change(categorise)
    change(lambda loan: loan.assign_officer(officer, "loan", "Pedro"))
    with pytest.raises(DomainError, match="missing: collection officer"):
        change(categorise)
    change(lambda loan: loan.assign_officer(officer, "collection", "Elena"))
    change(lambda loan: loan.assign_officer(officer, "collection", "Rosa"))
    change(categorise)
    loan = archive.get_loan("CR-1")
    assert loan.recovery_category == "recoverable"
    assert loan.collection_officer == "Rosa"
    assert [(h["duty"], h["officer"], h["previous_officer"]) for h in loan.officer_history] == [
        ("loan", "Pedro", None),
        ("collection", "Elena", None),
        ("collection", "Rosa", "Elena"),
    ]


def test_investigation_checklist_must_be_complete(officer: CommandContext) -> None:
    loan = LoanFile.open(officer, **loan_terms())
    with pytest.raises(DomainError, match=r"incomplete: .*liabilities_investigated"):
        loan.record_investigation(officer, {"willingness_to_pay": True}, "2024-05-01")
    with pytest.raises(DomainError, match="unknown checklist item"):
        loan.record_investigation(officer, {"mood": True}, "2024-05-01")


def test_money_moves_keep_outstanding_right(officer: CommandContext) -> None:
    loan = LoanFile.open(officer, **loan_terms(principal="1000.00"))
    loan.record_repayment(officer, "250.00", "2024-02-01")
    loan.record_collection_action(officer, "visit", "2024-03-01", "pagó", "100.50", "Elena")
    assert loan.outstanding == Decimal("649.50")
    with pytest.raises(DomainError, match=r"exceeds the outstanding 649\.50"):
        loan.record_repayment(officer, "700", "2024-04-01")
    with pytest.raises(DomainError, match="unknown collection action"):
        loan.record_collection_action(officer, "threat", "2024-03-01", "x", "0", "Elena")


def test_settled_files_are_closed(officer: CommandContext) -> None:
    loan = LoanFile.open(officer, **loan_terms())
    loan.change_status(officer, "settled")
    with pytest.raises(DomainError, match="closed"):
        loan.record_inspection(officer, "monthly", "2024-05-01", "Pedro", "ok")


def days_from_today(days: int) -> str:
    """A date relative to the archive's clock (UTC), as the commands take it."""
    return (datetime.now(UTC).date() + timedelta(days=days)).isoformat()


LOAN_DATED_COMMANDS = {
    "repayment": lambda loan, ctx, day: loan.record_repayment(ctx, "10.00", day),
    "collection action": lambda loan, ctx, day: loan.record_collection_action(
        ctx, "call", day, "no answer", "0", "Elena"
    ),
    "inspection": lambda loan, ctx, day: loan.record_inspection(ctx, "monthly", day, "Pedro", "ok"),
    "investigation": lambda loan, ctx, day: loan.record_investigation(
        ctx, {item.value: True for item in ChecklistItem}, day
    ),
}


@pytest.mark.parametrize("command", sorted(LOAN_DATED_COMMANDS))
def test_loan_events_are_dated_between_disbursement_and_today(
    command: str, officer: CommandContext
) -> None:
    """Nothing is repaid, collected or inspected before the money was lent, nor after today
    (one day of grace: the clock is UTC, a branch east of it is already in tomorrow)."""
    run = LOAN_DATED_COMMANDS[command]
    loan = LoanFile.open(officer, **loan_terms(disbursement_date="2024-01-15"))
    with pytest.raises(DomainError, match="2024-01-14 is before the disbursement date 2024-01-15"):
        run(loan, officer, "2024-01-14")
    with pytest.raises(DomainError, match="is in the future"):
        run(loan, officer, days_from_today(2))
    with pytest.raises(DomainError, match="is in the future"):
        run(loan, officer, "9999-12-31")
    assert loan.version == 1
    for day in ("2024-01-15", days_from_today(0), days_from_today(1)):
        run(loan, officer, day)
    assert loan.version == 4


def test_a_recovery_target_may_lie_ahead_but_not_before_the_loan(officer: CommandContext) -> None:
    loan = LoanFile.open(officer, **loan_terms())
    loan.assign_officer(officer, "loan", "Pedro")
    loan.assign_officer(officer, "collection", "Elena")
    loan.change_status(officer, "overdue")
    loan.change_status(officer, "non_performing")
    loan.categorise_recovery(officer, "recoverable", ["job loss"])
    with pytest.raises(DomainError, match="target date 2023-12-31 is before the disbursement"):
        loan.set_recovery_plan(officer, "sell the van", "2023-12-31", "5000")
    loan.set_recovery_plan(officer, "sell the van", days_from_today(400), "5000")


def test_maturity_must_follow_disbursement(officer: CommandContext) -> None:
    for maturity in ("2024-01-15", "2024-01-14"):
        with pytest.raises(DomainError, match="maturity date must be after the disbursement"):
            LoanFile.open(
                officer, **loan_terms(disbursement_date="2024-01-15", maturity_date=maturity)
            )


def test_collateral_dates_are_not_in_the_future_and_release_follows_registration(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    open_loan(archive, officer)
    reg = archive.register_collateral(officer, **mortgage_fields())
    future = days_from_today(2)
    with pytest.raises(DomainError, match=r"registration date .* is in the future"):
        archive.change_collateral(
            officer, reg.id, None, lambda r: r.mark_registered(officer, "T1", future)
        )
    with pytest.raises(DomainError, match=r"verification date .* is in the future"):
        archive.change_collateral(
            officer, reg.id, None, lambda r: r.verify_on_site(officer, "Pedro", future, "ok", [])
        )
    # An on-site visit before the loan is disbursed is ordinary due diligence.
    archive.change_collateral(
        officer, reg.id, None, lambda r: r.verify_on_site(officer, "Pedro", "2024-01-05", "ok", [])
    )
    archive.change_collateral(
        officer, reg.id, None, lambda r: r.mark_registered(officer, "T1", "2024-01-20")
    )
    with pytest.raises(DomainError, match="2024-01-19 is before the registration date 2024-01-20"):
        archive.release_collateral(officer, reg.id, None, "2024-01-19")
    with pytest.raises(DomainError, match=r"release date .* is in the future"):
        archive.release_collateral(officer, reg.id, None, future)
    assert archive.get_collateral(reg.id).version == 3
    assert archive.release_collateral(officer, reg.id, None, "2024-01-20").version == 4
    assert archive.get_collateral(reg.id).status == "released"


def test_an_appraisal_is_not_dated_in_the_future(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    open_loan(archive, officer)
    for day in (days_from_today(2), "9999-06-01"):
        with pytest.raises(DomainError, match=r"appraisal date .* is in the future"):
            archive.appraise(officer, **appraisal_fields(appraisal_date=day))
    assert archive.get_loan("CR-1").valuation_ids == []
    today = archive.appraise(officer, **appraisal_fields(appraisal_date=days_from_today(0)))
    with pytest.raises(DomainError, match="revaluation due date must be after the appraisal"):
        archive.change_valuation(
            officer,
            today.id,
            None,
            lambda v: v.schedule_revaluation(officer, days_from_today(0)),
        )


def test_a_deactivated_users_role_does_not_change(officer: CommandContext) -> None:
    """Like a token, a role is refused to a deactivated user: it would grant nothing, and
    the trail would show them given a new role as if restored."""
    user = User.register(officer, "ana", "credit_officer")
    user.deactivate(officer)
    with pytest.raises(DomainError, match="ana is deactivated"):
        user.change_role(officer, "auditor")
    assert (user.role, user.active, user.version) == ("credit_officer", False, 2)


def test_repeated_mortgage_needs_higher_rank_and_is_flagged(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    open_loan(archive, officer, "CR-1")
    open_loan(archive, officer, "CR-2")
    open_loan(archive, officer, "CR-3")
    first = archive.register_collateral(officer, **mortgage_fields("CR-1"))
    assert archive.get_collateral(first.id).repeated_mortgage is None
    # The same property, written differently, for another live loan at the same rank.
    with pytest.raises(DomainError, match="at least 2"):
        archive.register_collateral(
            officer, **mortgage_fields("CR-2", cadastral_reference="9872023 vh5797s 0001-wx")
        )
    with pytest.raises(DomainError, match="already secures loan CR-1"):
        archive.register_collateral(officer, **mortgage_fields("CR-1", lien_rank=2))
    second = archive.register_collateral(officer, **mortgage_fields("CR-2", lien_rank=2))
    flag = archive.get_collateral(second.id).repeated_mortgage
    assert flag is not None
    assert [(o["loan_number"], o["lien_rank"]) for o in flag["other_liens"]] == [("CR-1", 1)]
    types = [type(e).__name__ for _, e in archive.loan_events("CR-2")]
    assert "RepeatedMortgageFlagged" in types
    assert archive.get_loan("CR-2").collateral_ids == [second.id]
    # Releasing both liens frees the property for a first-rank mortgage again.
    archive.release_collateral(officer, first.id, None, "2025-01-01")
    archive.release_collateral(officer, second.id, None, "2025-01-01")
    third = archive.register_collateral(officer, **mortgage_fields("CR-3"))
    assert archive.get_collateral(third.id).repeated_mortgage is None
    # Each loan's history has the liens of its own registrations on the shared property:
    # not the property's indexing, nor the other loans' liens.
    for number, mine, released in (
        ("CR-1", first.id, True),
        ("CR-2", second.id, True),
        ("CR-3", third.id, False),
    ):
        events = archive.loan_events(number)
        assert [p for p, _ in events] == sorted({p for p, _ in events})
        liens = [
            (type(e).__name__, e.registration_id)
            for _, e in events
            if type(e).__qualname__.startswith("PropertyLiens.")
        ]
        assert liens == [("LienAdded", mine), ("LienReleased", mine)][: 2 if released else 1]


def test_collateral_lifecycle(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)
    reg = archive.register_collateral(officer, **mortgage_fields())
    archive.change_collateral(
        officer,
        reg.id,
        1,
        lambda r: r.verify_on_site(officer, "Pedro", "2024-01-05", "ok", ["humedad"]),
    )
    archive.change_collateral(
        officer, reg.id, 2, lambda r: r.mark_registered(officer, "T1 F2", "2024-01-20")
    )
    with pytest.raises(DomainError, match="only a pending"):
        archive.change_collateral(
            officer, reg.id, 3, lambda r: r.mark_registered(officer, "x", "2024-01-21")
        )
    state = archive.get_collateral(reg.id).state()
    assert state["status"] == "registered"
    assert state["site_verifications"][0]["defects"] == ["humedad"]


def test_reviewer_must_differ_from_appraiser(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)
    val = archive.appraise(officer, **appraisal_fields())
    with pytest.raises(DomainError, match="must not be the appraiser"):
        archive.review_valuation(officer, val.id, None, "luis gómez", "150000")
    assert archive.get_valuation(val.id).review is None


@pytest.mark.parametrize(
    ("reviewed", "flagged"),
    [("150000", False), ("136364", False), ("136363", True), ("100000", True)],
)
def test_overvaluation_flag_uses_the_margin(
    archive: ArchiveApp, officer: CommandContext, reviewed: str, flagged: bool
) -> None:
    """150000 over 136364 is 9.99 % above; over 136363 it is 10.0003 % above."""
    open_loan(archive, officer)
    val = archive.appraise(officer, **appraisal_fields())
    archive.review_valuation(officer, val.id, 1, "Carmen Ruiz", reviewed)
    valuation = archive.get_valuation(val.id)
    assert (valuation.overvaluation is not None) is flagged
    assert valuation.reviewed_value == Decimal(reviewed)


def test_overvaluation_margin_comes_from_settings(tmp_path, officer: CommandContext) -> None:  # type: ignore[no-untyped-def]
    archive = ArchiveApp(Settings(data_dir=tmp_path, overvaluation_margin=Decimal("0.50")))
    try:
        open_loan(archive, officer)
        val = archive.appraise(officer, **appraisal_fields())
        archive.review_valuation(officer, val.id, 1, "Carmen Ruiz", "110000")
        assert archive.get_valuation(val.id).overvaluation is None
    finally:
        archive.close()


def test_new_valuation_supersedes_the_old(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)
    reg = archive.register_collateral(officer, **mortgage_fields())
    old = archive.appraise(officer, **appraisal_fields(collateral_id=reg.id))
    new = archive.appraise(officer, supersedes=old.id, **appraisal_fields(collateral_id=reg.id))
    assert archive.get_valuation(old.id).superseded_by == new.id
    assert archive.get_loan("CR-1").valuation_ids == [old.id, new.id]
    with pytest.raises(DomainError, match="already superseded"):
        archive.appraise(officer, supersedes=old.id, **appraisal_fields())
    assert archive.get_valuation(new.id).revaluation_due.isoformat() == "2025-01-10"


def test_valuation_collateral_must_belong_to_the_loan(
    archive: ArchiveApp, officer: CommandContext
) -> None:
    open_loan(archive, officer, "CR-1")
    open_loan(archive, officer, "CR-2")
    reg = archive.register_collateral(officer, **mortgage_fields("CR-1"))
    with pytest.raises(DomainError, match="secures another loan"):
        archive.appraise(officer, **appraisal_fields("CR-2", collateral_id=reg.id))


def test_time_travel_by_version_and_moment(archive: ArchiveApp, officer: CommandContext) -> None:
    open_loan(archive, officer)
    before_collateral = datetime.now(UTC)
    reg = archive.register_collateral(officer, **mortgage_fields())
    archive.change_loan(officer, "CR-1", None, lambda loan: loan.change_status(officer, "overdue"))
    now = archive.loan_file("CR-1")
    assert now["status"] == "overdue" and len(now["collateral"]) == 1
    v1 = archive.loan_file("CR-1", version=1)
    assert v1["version"] == 1 and v1["status"] == "performing" and v1["collateral"] == []
    past = archive.loan_file("CR-1", as_of=before_collateral)
    assert past["status"] == "performing" and past["collateral"] == []
    v2 = archive.loan_file("CR-1", version=2)
    assert [c["id"] for c in v2["collateral"]] == [reg.id]
    with pytest.raises(NotFoundError, match="did not exist"):
        archive.loan_file("CR-1", as_of=datetime(2000, 1, 1, tzinfo=UTC))
    with pytest.raises(NotFoundError, match="no version 9"):
        archive.loan_file("CR-1", version=9)
    with pytest.raises(DomainError, match="time zone"):
        archive.loan_file("CR-1", as_of=datetime(2030, 1, 1))
    # The future is refused, beyond a few minutes of clock skew.
    with pytest.raises(DomainError, match=r"as_of .* is in the future"):
        archive.loan_file("CR-1", as_of=datetime.now(UTC) + timedelta(days=1))
    ahead = archive.loan_file("CR-1", as_of=datetime.now(UTC) + timedelta(minutes=1))
    assert ahead["version"] == now["version"]


def test_events_table_is_append_only(
    archive: ArchiveApp, officer: CommandContext, backend: str
) -> None:
    open_loan(archive, officer)
    recorder = archive.recorder
    table = recorder.events_table_name  # type: ignore[attr-defined]
    for statement in (f"UPDATE {table} SET topic = topic", f"DELETE FROM {table}"):
        with (
            pytest.raises(Exception, match="append-only"),  # the driver's own error class
            recorder.datastore.transaction(commit=True) as c,  # type: ignore[attr-defined]
        ):
            c.execute(statement)
    if backend == "postgres":
        with (
            pytest.raises(Exception, match="append-only"),
            recorder.datastore.transaction(commit=True) as c,  # type: ignore[attr-defined]
        ):
            c.execute(f"TRUNCATE {table}")
    assert archive.get_loan("CR-1").version == 1


def test_a_second_app_on_the_same_store_sees_everything(
    archive: ArchiveApp, settings: Settings, officer: CommandContext
) -> None:
    open_loan(archive, officer)
    other = ArchiveApp(settings)
    try:
        assert other.get_loan("CR-1").loan_number == "CR-1"
        assert other.verify_chain().ok
    finally:
        other.close()


def every_kind_of_event(ctx: CommandContext) -> list[ArchiveAggregate]:
    """Aggregates of every type that, between them, raise every event class there is."""
    loan = LoanFile.open(ctx, **loan_terms())
    loan.assign_officer(ctx, "loan", "officer.two")
    loan.record_repayment(ctx, "500", "2024-02-15")
    loan.record_inspection(ctx, "monthly", "2024-02-20", "Marta Gil", "All as declared.")
    loan.link_collateral(ctx, uuid4())
    loan.link_valuation(ctx, uuid4())
    loan.change_status(ctx, "overdue")
    loan.classify(ctx, "special_mention")
    loan.assign_officer(ctx, "collection", "collector.one")
    loan.record_collection_action(ctx, "call", "2024-03-20", "Promised to pay.", "100", "c1")
    loan.change_status(ctx, "non_performing")
    loan.record_investigation(ctx, {item.value: True for item in ChecklistItem}, "2024-04-01")
    loan.categorise_recovery(ctx, "recoverable", ["job loss"])
    loan.set_recovery_plan(ctx, "Sell the van.", "2024-12-31", "5000")
    prop = PropertyLiens.index(ctx, mortgage_fields()["cadastral_reference"])
    reg = MortgageRegistration.file(ctx, uuid4(), **mortgage_fields())
    prop.add_lien(ctx, reg.id, "CR-1", 1)
    prop.add_lien(ctx, uuid4(), "CR-2", 2)
    prop.release_lien(ctx, reg.id)
    reg.flag_repeated_mortgage(ctx, [{"loan_number": "CR-2", "lien_rank": 2}])
    reg.mark_registered(ctx, "Tomo 1, folio 2", "2024-01-20")
    reg.verify_on_site(ctx, "officer.two", "2024-02-01", "In good repair.", ["damp"])
    reg.release(ctx, "2024-06-01")
    valuation = Valuation.appraise(ctx, uuid4(), **appraisal_fields())
    valuation.review_value(ctx, "Carmen Ruiz", "100000", Decimal("0.10"))
    valuation.schedule_revaluation(ctx, "2025-01-10")
    valuation.supersede(ctx, uuid4())
    user = User.register(ctx, "ana", "credit_officer")
    user.change_role(ctx, "auditor")
    user.deactivate(ctx)
    token = AccessToken.issue(ctx, "ana", "0" * 64)
    token.revoke(ctx)
    doc = Document.register(
        ctx,
        uuid4(),
        loan_number="CR-1",
        collateral_id=None,
        valuation_id=None,
        doc_type="contract",
        original_filename="contract.pdf",
        media_type="application/pdf",
        size=3,
        sha256="a" * 64,
        object_key="sha256/aa",
        object_version=None,
        retain_until=None,
        supersedes=None,
    )
    doc.record_download(ctx, None)
    doc.place_legal_hold(ctx)
    doc.release_legal_hold(ctx)
    doc.record_fixity(ctx, FixityOutcome.OK, "a" * 64, 3)
    attempt = doc.start_extraction(ctx, "w1")
    doc.record_text(
        ctx,
        attempt,
        pages=[{"text": "x"}],
        engine="t",
        engine_version="5",
        languages="spa",
        settings={"psm": 1},
    )
    doc.request_reindex(ctx)
    doc.record_extraction_failure(ctx, doc.start_extraction(ctx, "w1"), "unreadable")
    doc.supersede(ctx, uuid4())
    index = LoanDocuments.start(ctx, "CR-1")
    index.file(ctx, doc.id, doc.sha256, "contract")
    run = Reconciliation.complete(
        ctx,
        uuid4(),
        orphans=[],
        missing=[],
        changed=[],
        temporaries=[],
        objects_checked=0,
        documents_checked=0,
    )
    return [loan, prop, reg, valuation, user, token, doc, index, run]


def test_no_event_changes_the_original_of_a_clone(officer: CommandContext) -> None:
    """``clone`` shares the entries of lists and dicts, which is safe only because every
    event replaces or adds entries and never changes one in place: checked here for
    every event class, each applied to a clone of the state before it."""
    seen: set[type] = set()
    for aggregate in every_kind_of_event(officer):
        events = aggregate.collect_events()
        state = events[0].mutate(None)
        seen.add(type(events[0]))
        for event in events[1:]:
            before = deepcopy(vars(state))
            after = event.mutate(state.clone())
            assert vars(state) == before, f"{type(event).__qualname__} changed the original"
            assert after is not state
            seen.add(type(event))
            state = after
        assert vars(state) == vars(aggregate) | {"_pending_events": []}
    defined = {
        member
        for cls in (
            LoanFile,
            PropertyLiens,
            MortgageRegistration,
            Valuation,
            User,
            AccessToken,
            Document,
            LoanDocuments,
            Reconciliation,
        )
        for member in vars(cls).values()
        if isinstance(member, type) and "apply" in vars(member)
    }
    assert defined - seen == set(), "cover every event class with an apply here"
