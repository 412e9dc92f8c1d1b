"""Date sanity shared by the aggregates: a bank archive refuses dates no record can carry.

A repayment before the money was lent, an inspection dated next month or a release before
the mortgage was registered is a typing error (or worse) that would otherwise sit in an
immutable log forever and skew every report built on it. Commands check; replaying old
events does not, so nothing already recorded stops loading.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from archive.exceptions import DomainError

FUTURE_TOLERANCE = timedelta(days=1)
"""The archive's clock is UTC; a branch east of Greenwich is already a day ahead near
midnight, so "today" as its officer writes it may be tomorrow in UTC."""


def today() -> date:
    """The archive's clock: the UTC date of now, the clock that stamps every event."""
    return datetime.now(UTC).date()


def not_in_future(day: date, what: str) -> date:
    """``day`` unless it lies after today (plus the tolerance): what happened cannot be later."""
    now = today()
    if day > now + FUTURE_TOLERANCE:
        raise DomainError(f"{what} {day.isoformat()} is in the future (today is {now.isoformat()})")
    return day


def not_before(day: date, floor: date, what: str, floor_what: str) -> date:
    """``day`` unless it lies before ``floor`` (e.g. a repayment before the disbursement)."""
    if day < floor:
        raise DomainError(
            f"{what} {day.isoformat()} is before the {floor_what} {floor.isoformat()}"
        )
    return day
