"""The loan file (expediente de crédito) and the credit-management rules around it."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Any, Self
from uuid import UUID

from archive.dates import not_before, not_in_future
from archive.domain import (
    ArchiveAggregate,
    CommandContext,
    a_date,
    bounded_int,
    choice,
    currency,
    money,
    percentage,
    stable_id,
    text,
)
from archive.domain import loan_number as valid_loan_number
from archive.exceptions import DomainError

MAX_TERM_MONTHS = 1200  # a hundred years


class Product(StrEnum):
    PERSONAL = "personal"
    MORTGAGE = "mortgage"
    BUSINESS = "business"
    VILLAGE_GROUP = "village_group"
    COOPERATIVE = "cooperative"


class LoanStatus(StrEnum):
    PERFORMING = "performing"
    OVERDUE = "overdue"
    NON_PERFORMING = "non_performing"
    RESTRUCTURED = "restructured"
    WRITTEN_OFF = "written_off"
    SETTLED = "settled"


S = LoanStatus
ALLOWED_TRANSITIONS: dict[LoanStatus, frozenset[LoanStatus]] = {
    S.PERFORMING: frozenset({S.OVERDUE, S.RESTRUCTURED, S.SETTLED}),
    S.OVERDUE: frozenset({S.PERFORMING, S.NON_PERFORMING, S.RESTRUCTURED, S.SETTLED}),
    S.NON_PERFORMING: frozenset({S.RESTRUCTURED, S.WRITTEN_OFF, S.SETTLED}),
    S.RESTRUCTURED: frozenset({S.PERFORMING, S.OVERDUE, S.NON_PERFORMING, S.SETTLED}),
    # A written-off loan stays under collection; full recovery closes the file.
    S.WRITTEN_OFF: frozenset({S.SETTLED}),
    S.SETTLED: frozenset(),
}


class Classification(StrEnum):
    """The regulatory five-tier loan classification."""

    PASS = "pass"
    SPECIAL_MENTION = "special_mention"
    SUBSTANDARD = "substandard"
    DOUBTFUL = "doubtful"
    LOSS = "loss"


class OfficerDuty(StrEnum):
    LOAN = "loan"
    COLLECTION = "collection"


class RecoveryCategory(StrEnum):
    RECOVERABLE = "recoverable"
    RECOVERABLE_WITH_EFFORT = "recoverable_with_effort"
    TEMPORARILY_UNRECOVERABLE = "temporarily_unrecoverable"


class ChecklistItem(StrEnum):
    """The NPL investigation checklist of the credit-management practice."""

    CREDITOR_DEBTOR_RELATIONSHIP_CLEAR = "creditor_debtor_relationship_clear"
    WILLINGNESS_TO_PAY = "willingness_to_pay"
    CAPACITY_TO_PAY = "capacity_to_pay"
    VALID_ASSETS = "valid_assets"
    ASSET_DISPOSAL_FEASIBLE = "asset_disposal_feasible"
    LIABILITIES_INVESTIGATED = "liabilities_investigated"


class CollectionKind(StrEnum):
    VISIT = "visit"
    CALL = "call"
    NOTICE = "notice"
    LEGAL_ACTION = "legal_action"
    ASSET_DISPOSAL = "asset_disposal"


class InspectionKind(StrEnum):
    MONTHLY = "monthly"
    QUARTERLY = "quarterly"


CLOSED = frozenset({LoanStatus.SETTLED})


def loan_id(loan_number: str) -> UUID:
    return stable_id("loan", loan_number)


class LoanFile(ArchiveAggregate):
    """One loan's file: terms, status, classification, officers and recovery work."""

    class Opened(ArchiveAggregate.Created):
        loan_number: str
        borrower_name: str
        borrower_national_id: str
        product: str
        village_group: str | None
        principal: Decimal
        currency: str
        interest_rate: Decimal
        term_months: int
        disbursement_date: date
        maturity_date: date
        branch: str

        def apply(self, loan: LoanFile) -> None:
            loan.loan_number = self.loan_number
            loan.borrower_name = self.borrower_name
            loan.borrower_national_id = self.borrower_national_id
            loan.product = self.product
            loan.village_group = self.village_group
            loan.principal = self.principal
            loan.currency = self.currency
            loan.interest_rate = self.interest_rate
            loan.term_months = self.term_months
            loan.disbursement_date = self.disbursement_date
            loan.maturity_date = self.maturity_date
            loan.branch = self.branch
            loan.status = LoanStatus.PERFORMING.value
            loan.classification = Classification.PASS.value
            loan.loan_officer = None
            loan.collection_officer = None
            loan.officer_history = []
            loan.investigation = None
            loan.recovery_category = None
            loan.causes_of_default = []
            loan.recovery_plan = None
            loan.collection_actions = []
            loan.repayments = []
            loan.inspections = []
            loan.repaid = Decimal("0")
            loan.recovered = Decimal("0")
            loan.collateral_ids = []
            loan.valuation_ids = []

    class StatusChanged(ArchiveAggregate.Event):
        old_status: str
        new_status: str

        def apply(self, loan: LoanFile) -> None:
            loan.status = self.new_status

    class Classified(ArchiveAggregate.Event):
        old_classification: str
        new_classification: str

        def apply(self, loan: LoanFile) -> None:
            loan.classification = self.new_classification

    class OfficerAssigned(ArchiveAggregate.Event):
        duty: str
        officer: str
        previous_officer: str | None

        def apply(self, loan: LoanFile) -> None:
            if self.duty == OfficerDuty.LOAN:
                loan.loan_officer = self.officer
            else:
                loan.collection_officer = self.officer
            loan.officer_history.append(
                {
                    "duty": self.duty,
                    "officer": self.officer,
                    "previous_officer": self.previous_officer,
                    "assigned_at": self.timestamp,
                    "assigned_by": self.actor_id,
                }
            )

    class InvestigationRecorded(ArchiveAggregate.Event):
        checklist: dict[str, bool]
        notes: str | None
        investigated_on: date

        def apply(self, loan: LoanFile) -> None:
            loan.investigation = {
                "checklist": dict(self.checklist),
                "notes": self.notes,
                "investigated_on": self.investigated_on,
                "investigated_by": self.actor_id,
            }

    class RecoveryCategorised(ArchiveAggregate.Event):
        category: str
        causes_of_default: list[str]

        def apply(self, loan: LoanFile) -> None:
            loan.recovery_category = self.category
            loan.causes_of_default = list(self.causes_of_default)

    class RecoveryPlanSet(ArchiveAggregate.Event):
        summary: str
        target_date: date
        target_amount: Decimal

        def apply(self, loan: LoanFile) -> None:
            loan.recovery_plan = {
                "summary": self.summary,
                "target_date": self.target_date,
                "target_amount": self.target_amount,
                "set_by": self.actor_id,
            }

    class CollectionActionRecorded(ArchiveAggregate.Event):
        kind: str
        action_date: date
        outcome: str
        amount_recovered: Decimal
        officer: str

        def apply(self, loan: LoanFile) -> None:
            loan.collection_actions.append(
                {
                    "kind": self.kind,
                    "action_date": self.action_date,
                    "outcome": self.outcome,
                    "amount_recovered": self.amount_recovered,
                    "officer": self.officer,
                }
            )
            loan.recovered += self.amount_recovered

    class RepaymentRecorded(ArchiveAggregate.Event):
        amount: Decimal
        paid_on: date

        def apply(self, loan: LoanFile) -> None:
            loan.repayments.append({"amount": self.amount, "paid_on": self.paid_on})
            loan.repaid += self.amount

    class InspectionRecorded(ArchiveAggregate.Event):
        kind: str
        inspected_on: date
        inspector: str
        findings: str

        def apply(self, loan: LoanFile) -> None:
            loan.inspections.append(
                {
                    "kind": self.kind,
                    "inspected_on": self.inspected_on,
                    "inspector": self.inspector,
                    "findings": self.findings,
                }
            )

    class CollateralLinked(ArchiveAggregate.Event):
        registration_id: UUID

        def apply(self, loan: LoanFile) -> None:
            loan.collateral_ids.append(self.registration_id)

    class ValuationLinked(ArchiveAggregate.Event):
        valuation_id: UUID

        def apply(self, loan: LoanFile) -> None:
            loan.valuation_ids.append(self.valuation_id)

    # No class-level annotations here: the library would turn them into __init__ fields.

    @classmethod
    def open(
        cls,
        ctx: CommandContext,
        *,
        loan_number: str,
        borrower_name: str,
        borrower_national_id: str,
        product: str,
        principal: Decimal | str,
        currency_code: str,
        interest_rate: Decimal | str,
        term_months: int,
        disbursement_date: date | str,
        maturity_date: date | str,
        branch: str,
        village_group: str | None = None,
    ) -> Self:
        number = valid_loan_number(loan_number)
        kind = choice(Product, product, "product")
        group = (village_group or "").strip() or None
        if kind in (Product.VILLAGE_GROUP, Product.COOPERATIVE) and group is None:
            raise DomainError(f"a {kind.value} loan must name its village group or cooperative")
        rate = percentage(interest_rate, "interest rate")
        bounded_int(term_months, "term in months", 1, MAX_TERM_MONTHS)
        disbursed = a_date(disbursement_date, "disbursement date")
        matures = a_date(maturity_date, "maturity date")
        if matures <= disbursed:
            raise DomainError("maturity date must be after the disbursement date")
        return cls._start(
            cls.Opened,
            ctx,
            loan_id(number),
            loan_number=number,
            borrower_name=text(borrower_name, "borrower name"),
            borrower_national_id=text(borrower_national_id, "borrower national id", max_length=64),
            product=kind.value,
            village_group=group,
            principal=money(principal, "principal"),
            currency=currency(currency_code),
            interest_rate=rate,
            term_months=term_months,
            disbursement_date=disbursed,
            maturity_date=matures,
            branch=text(branch, "branch", max_length=120),
        )

    # -- derived state ------------------------------------------------------------------

    @property
    def outstanding(self) -> Decimal:
        return self.principal - self.repaid - self.recovered

    @property
    def is_npl(self) -> bool:
        return self.status == LoanStatus.NON_PERFORMING

    def _require_open(self) -> None:
        if self.status in CLOSED:
            raise DomainError(f"loan {self.loan_number} is {self.status}; its file is closed")

    def _since_disbursement(self, value: date | str, what: str) -> date:
        """The date of something done on this loan: not before the money was lent (nothing
        to repay, collect or inspect yet) and not in the future (it has not happened)."""
        day = a_date(value, what)
        not_before(day, self.disbursement_date, what, "disbursement date")
        return not_in_future(day, what)

    # -- commands -----------------------------------------------------------------------

    def change_status(self, ctx: CommandContext, status: str) -> None:
        new = choice(LoanStatus, status, "status")
        old = LoanStatus(self.status)
        if new not in ALLOWED_TRANSITIONS[old]:
            allowed = ", ".join(sorted(s.value for s in ALLOWED_TRANSITIONS[old])) or "none"
            raise DomainError(
                f"a loan that is {old.value} cannot become {new.value};"
                f" allowed from {old.value}: {allowed}"
            )
        self._trigger(self.StatusChanged, ctx, old_status=old.value, new_status=new.value)

    def classify(self, ctx: CommandContext, classification: str) -> None:
        self._require_open()
        tier = choice(Classification, classification, "classification")
        if tier.value == self.classification:
            raise DomainError(f"loan {self.loan_number} is already classified {tier.value}")
        self._trigger(
            self.Classified,
            ctx,
            old_classification=self.classification,
            new_classification=tier.value,
        )

    def assign_officer(self, ctx: CommandContext, duty: str, officer: str) -> None:
        self._require_open()
        which = choice(OfficerDuty, duty, "officer duty")
        name = text(officer, "officer", max_length=120)
        previous = self.loan_officer if which is OfficerDuty.LOAN else self.collection_officer
        if previous == name:
            raise DomainError(f"{name} is already the {which.value} officer of this loan")
        self._trigger(
            self.OfficerAssigned, ctx, duty=which.value, officer=name, previous_officer=previous
        )

    def record_investigation(
        self,
        ctx: CommandContext,
        checklist: dict[str, bool],
        investigated_on: date | str,
        notes: str | None = None,
    ) -> None:
        self._require_open()
        answers: dict[str, bool] = {}
        for key, value in checklist.items():
            item = choice(ChecklistItem, key, "checklist item")
            if not isinstance(value, bool):
                raise DomainError(f"checklist item {key} must be true or false")
            answers[item.value] = value
        missing = [i.value for i in ChecklistItem if i.value not in answers]
        if missing:
            raise DomainError("the investigation checklist is incomplete: " + ", ".join(missing))
        self._trigger(
            self.InvestigationRecorded,
            ctx,
            checklist=answers,
            notes=(notes or "").strip() or None,
            investigated_on=self._since_disbursement(investigated_on, "investigation date"),
        )

    def categorise_recovery(
        self, ctx: CommandContext, category: str, causes_of_default: list[str]
    ) -> None:
        self._require_open()
        chosen = choice(RecoveryCategory, category, "recovery category")
        if self.status not in (LoanStatus.NON_PERFORMING, LoanStatus.WRITTEN_OFF):
            raise DomainError(
                f"only non-performing loans are categorised for recovery; this loan is {self.status}"
            )
        missing = [
            duty
            for duty, who in (("loan", self.loan_officer), ("collection", self.collection_officer))
            if who is None
        ]
        if missing:
            raise DomainError(
                "a non-performing loan needs both a loan officer and a collection officer "
                "before recovery categorisation; missing: "
                + ", ".join(f"{duty} officer" for duty in missing)
            )
        causes = [text(c, "cause of default") for c in causes_of_default]
        if not causes:
            raise DomainError("name at least one cause of default")
        self._trigger(
            self.RecoveryCategorised, ctx, category=chosen.value, causes_of_default=causes
        )

    def set_recovery_plan(
        self,
        ctx: CommandContext,
        summary: str,
        target_date: date | str,
        target_amount: Decimal | str,
    ) -> None:
        self._require_open()
        if self.recovery_category is None:
            raise DomainError("categorise the loan for recovery before setting a recovery plan")
        self._trigger(
            self.RecoveryPlanSet,
            ctx,
            summary=text(summary, "plan summary", max_length=4000),
            target_date=self._target_date(target_date),
            target_amount=money(target_amount, "target amount"),
        )

    def _target_date(self, value: date | str) -> date:
        """A recovery target lies ahead, so it may be in the future, but never before the
        loan existed."""
        day = a_date(value, "target date")
        return not_before(day, self.disbursement_date, "target date", "disbursement date")

    def record_collection_action(
        self,
        ctx: CommandContext,
        kind: str,
        action_date: date | str,
        outcome: str,
        amount_recovered: Decimal | str,
        officer: str,
    ) -> None:
        self._require_open()
        amount = money(amount_recovered, "amount recovered", allow_zero=True)
        if amount > self.outstanding:
            raise DomainError(
                f"amount recovered {amount} exceeds the outstanding {self.outstanding}"
            )
        self._trigger(
            self.CollectionActionRecorded,
            ctx,
            kind=choice(CollectionKind, kind, "collection action").value,
            action_date=self._since_disbursement(action_date, "action date"),
            outcome=text(outcome, "outcome", max_length=4000),
            amount_recovered=amount,
            officer=text(officer, "officer", max_length=120),
        )

    def record_repayment(
        self, ctx: CommandContext, amount: Decimal | str, paid_on: date | str
    ) -> None:
        self._require_open()
        paid = money(amount, "repayment amount")
        if paid > self.outstanding:
            raise DomainError(f"repayment {paid} exceeds the outstanding {self.outstanding}")
        day = self._since_disbursement(paid_on, "payment date")
        self._trigger(self.RepaymentRecorded, ctx, amount=paid, paid_on=day)

    def record_inspection(
        self,
        ctx: CommandContext,
        kind: str,
        inspected_on: date | str,
        inspector: str,
        findings: str,
    ) -> None:
        self._require_open()
        self._trigger(
            self.InspectionRecorded,
            ctx,
            kind=choice(InspectionKind, kind, "inspection kind").value,
            inspected_on=self._since_disbursement(inspected_on, "inspection date"),
            inspector=text(inspector, "inspector", max_length=120),
            findings=text(findings, "findings", max_length=4000),
        )

    def link_collateral(self, ctx: CommandContext, registration_id: UUID) -> None:
        self._require_open()
        self._trigger(self.CollateralLinked, ctx, registration_id=registration_id)

    def link_valuation(self, ctx: CommandContext, valuation_id: UUID) -> None:
        self._require_open()
        self._trigger(self.ValuationLinked, ctx, valuation_id=valuation_id)

    def state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "loan_number": self.loan_number,
            "borrower": {"name": self.borrower_name, "national_id": self.borrower_national_id},
            "product": self.product,
            "village_group": self.village_group,
            "principal": self.principal,
            "currency": self.currency,
            "interest_rate": self.interest_rate,
            "term_months": self.term_months,
            "disbursement_date": self.disbursement_date,
            "maturity_date": self.maturity_date,
            "branch": self.branch,
            "status": self.status,
            "classification": self.classification,
            "loan_officer": self.loan_officer,
            "collection_officer": self.collection_officer,
            "officer_history": self.officer_history,
            "investigation": self.investigation,
            "recovery_category": self.recovery_category,
            "causes_of_default": self.causes_of_default,
            "recovery_plan": self.recovery_plan,
            "collection_actions": self.collection_actions,
            "repayments": self.repayments,
            "inspections": self.inspections,
            "repaid": self.repaid,
            "recovered": self.recovered,
            "outstanding": self.outstanding,
            "created_on": self.created_on,
            "modified_on": self.modified_on,
            "chain_head": self.chain_head,
        }
