"""Collateral valuations: an external appraisal, an independent internal review, and the
overvaluation flag that keeps appraisal agencies honest."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Any, Self
from uuid import UUID

from archive.dates import not_in_future
from archive.domain import (
    ArchiveAggregate,
    CommandContext,
    a_date,
    choice,
    currency,
    money,
    text,
)
from archive.exceptions import DomainError


class ValuationMethod(StrEnum):
    MARKET_COMPARISON = "market_comparison"
    INCOME = "income"
    COST = "cost"
    RESIDUAL = "residual"


def add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    year = day.year + month // 12
    month = month % 12 + 1
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    last = [31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1]
    return date(year, month, min(day.day, last))


class Valuation(ArchiveAggregate):
    """One appraisal of a collateral's value and its review."""

    class Appraised(ArchiveAggregate.Created):
        loan_number: str
        collateral_id: UUID | None
        agency: str
        appraiser: str
        method: str
        appraised_value: Decimal
        currency: str
        appraisal_date: date
        revaluation_due: date

        def apply(self, val: Valuation) -> None:
            val.loan_number = self.loan_number
            val.collateral_id = self.collateral_id
            val.agency = self.agency
            val.appraiser = self.appraiser
            val.method = self.method
            val.appraised_value = self.appraised_value
            val.currency = self.currency
            val.appraisal_date = self.appraisal_date
            val.revaluation_due = self.revaluation_due
            val.review = None
            val.overvaluation = None
            val.superseded_by = None

    class Reviewed(ArchiveAggregate.Event):
        reviewer: str
        reviewed_value: Decimal
        notes: str | None

        def apply(self, val: Valuation) -> None:
            val.review = {
                "reviewer": self.reviewer,
                "reviewed_value": self.reviewed_value,
                "notes": self.notes,
                "reviewed_at": self.timestamp,
            }

    class OvervaluationFlagged(ArchiveAggregate.Event):
        appraised_value: Decimal
        reviewed_value: Decimal
        excess_ratio: Decimal
        margin: Decimal

        def apply(self, val: Valuation) -> None:
            val.overvaluation = {
                "excess_ratio": self.excess_ratio,
                "margin": self.margin,
                "cut": self.appraised_value - self.reviewed_value,
            }

    class RevaluationScheduled(ArchiveAggregate.Event):
        revaluation_due: date

        def apply(self, val: Valuation) -> None:
            val.revaluation_due = self.revaluation_due

    class Superseded(ArchiveAggregate.Event):
        superseded_by: UUID

        def apply(self, val: Valuation) -> None:
            val.superseded_by = self.superseded_by

    @classmethod
    def appraise(
        cls,
        ctx: CommandContext,
        valuation_id: UUID,
        *,
        loan_number: str,
        collateral_id: UUID | None,
        agency: str,
        appraiser: str,
        method: str,
        appraised_value: Decimal | str,
        currency_code: str,
        appraisal_date: date | str,
        revaluation_due: date | str | None = None,
    ) -> Self:
        # An appraisal reports a visit that took place: its date cannot lie ahead.
        appraised_on = not_in_future(a_date(appraisal_date, "appraisal date"), "appraisal date")
        if revaluation_due:
            due = a_date(revaluation_due, "revaluation due date")
        else:  # a year on: never past the calendar's end, the appraisal is not in the future
            due = add_months(appraised_on, 12)
        if due <= appraised_on:
            raise DomainError("the revaluation due date must be after the appraisal date")
        return cls._start(
            cls.Appraised,
            ctx,
            valuation_id,
            loan_number=loan_number,
            collateral_id=collateral_id,
            agency=text(agency, "appraisal agency", max_length=200),
            appraiser=text(appraiser, "appraiser", max_length=120),
            method=choice(ValuationMethod, method, "valuation method").value,
            appraised_value=money(appraised_value, "appraised value"),
            currency=currency(currency_code),
            appraisal_date=appraised_on,
            revaluation_due=due,
        )

    def review_value(
        self,
        ctx: CommandContext,
        reviewer: str,
        reviewed_value: Decimal | str,
        margin: Decimal,
        notes: str | None = None,
    ) -> None:
        """Record the independent review; flag overvaluation beyond ``margin``."""
        name = text(reviewer, "reviewer", max_length=120)
        if name.casefold() == self.appraiser.casefold():
            raise DomainError("the reviewer must not be the appraiser: the review is independent")
        if self.review is not None:
            raise DomainError("this valuation is already reviewed; appraise anew to supersede it")
        if self.superseded_by is not None:
            raise DomainError("this valuation is superseded")
        value = money(reviewed_value, "reviewed value")
        self._trigger(
            self.Reviewed,
            ctx,
            reviewer=name,
            reviewed_value=value,
            notes=(notes or "").strip() or None,
        )
        excess = (self.appraised_value - value) / value
        if excess > margin:
            self._trigger(
                self.OvervaluationFlagged,
                ctx,
                appraised_value=self.appraised_value,
                reviewed_value=value,
                excess_ratio=excess.quantize(Decimal("0.0001")),
                margin=margin,
            )

    def schedule_revaluation(self, ctx: CommandContext, due: date | str) -> None:
        when = a_date(due, "revaluation due date")
        if when <= self.appraisal_date:
            raise DomainError("the revaluation due date must be after the appraisal date")
        self._trigger(self.RevaluationScheduled, ctx, revaluation_due=when)

    def supersede(self, ctx: CommandContext, newer: UUID) -> None:
        if self.superseded_by is not None:
            raise DomainError(f"valuation {self.id} is already superseded by {self.superseded_by}")
        self._trigger(self.Superseded, ctx, superseded_by=newer)

    @property
    def reviewed_value(self) -> Decimal | None:
        return None if self.review is None else self.review["reviewed_value"]

    def state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "loan_number": self.loan_number,
            "collateral_id": self.collateral_id,
            "agency": self.agency,
            "appraiser": self.appraiser,
            "method": self.method,
            "appraised_value": self.appraised_value,
            "currency": self.currency,
            "appraisal_date": self.appraisal_date,
            "revaluation_due": self.revaluation_due,
            "review": self.review,
            "overvaluation": self.overvaluation,
            "superseded_by": self.superseded_by,
            "created_on": self.created_on,
            "modified_on": self.modified_on,
        }
