"""The base every aggregate stands on: who/when/why on every event, and the hash chain.

Aggregates never call ``trigger_event`` directly: they call ``_trigger`` (or the class
method ``_start`` for the first event) with a ``CommandContext``, which stamps the
actor, reason and correlation id, links the event to the previous one and seals it
with its own digest before the library applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import lru_cache
from typing import Any, Self, TypeVar
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from archive.exceptions import DomainError
from archive.integrity import GENESIS, event_digest

NAMESPACE = uuid5(NAMESPACE_URL, "https://loan-archive.invalid/ids")


@lru_cache(maxsize=65536)
def stable_id(kind: str, key: str) -> UUID:
    """Deterministic id for a unique business key: a second create of the same key collides.

    Cached: every command on a loan file derives its id again, and uuid5 costs more than
    the lookup."""
    return uuid5(NAMESPACE, f"{kind}:{key}")


class Role(StrEnum):
    ARCHIVIST = "archivist"
    CREDIT_OFFICER = "credit_officer"
    AUDITOR = "auditor"
    COMPLIANCE = "compliance"
    ADMIN = "admin"


@dataclass(frozen=True)
class CommandContext:
    """Who issues a command, why, and under which request.

    Checked here because every event stores these fields forever: a value no view can
    hold (a NUL character, a megabyte header) would be refused by every write path."""

    actor_id: str
    actor_role: str
    reason: str | None = None
    correlation_id: str = field(default_factory=lambda: str(uuid4()))

    def __post_init__(self) -> None:
        if self.reason is not None:
            printable(self.reason, "reason", max_length=2000)
        printable(self.correlation_id, "correlation id", max_length=200)


A = TypeVar("A", bound="ArchiveAggregate")


class ArchiveAggregate(Aggregate):
    """An aggregate whose events form a hash chain and name their actor.

    Rule for every event's ``apply``: replace or add entries of the aggregate's lists and
    dicts, never change an entry in place. That is what makes ``clone`` a safe copy.
    """

    class Event(Aggregate.Event):
        actor_id: str
        actor_role: str
        reason: str | None
        correlation_id: str
        prev_hash: str
        event_hash: str

        def mutate(self, aggregate: Any) -> Any:
            aggregate = super().mutate(aggregate)
            aggregate.chain_head = self.event_hash
            return aggregate

    class Created(Event, Aggregate.Created):
        pass

    def clone(self) -> Self:
        """A private copy for one command or reader, so the cached original is never changed.

        Copies the attribute dict and each list, dict and set in it, but shares their
        entries: a few microseconds where ``deepcopy`` of a loan file takes hundreds, and
        enough because events never change an entry in place (see the class docstring)."""
        attributes = vars(self).copy()
        for name, value in attributes.items():
            if type(value) in (list, dict, set):
                attributes[name] = value.copy()
        twin = object.__new__(type(self))
        twin.__dict__ = attributes
        return twin

    @staticmethod
    def _meta(ctx: CommandContext, prev_hash: str) -> dict[str, Any]:
        return {
            "actor_id": ctx.actor_id,
            "actor_role": ctx.actor_role,
            "reason": ctx.reason,
            "correlation_id": ctx.correlation_id,
            "prev_hash": prev_hash,
        }

    @classmethod
    def _start(cls, event_class: type, ctx: CommandContext, id: UUID, **fields: Any) -> Self:
        timestamp = event_class.create_timestamp()
        sealed = {
            "originator_id": id,
            "originator_version": cls.INITIAL_VERSION,
            "timestamp": timestamp,
            "originator_topic": get_topic(cls),
            **cls._meta(ctx, GENESIS),
            **fields,
        }
        digest = event_digest(get_topic(event_class), sealed)
        kwargs = {
            k: v
            for k, v in sealed.items()
            if k not in ("originator_id", "originator_version", "originator_topic")
        }
        return cls._create(event_class, id=id, event_hash=digest, **kwargs)

    def _trigger(self, event_class: type, ctx: CommandContext, **fields: Any) -> None:
        timestamp = event_class.create_timestamp()
        sealed = {
            "originator_id": self.id,
            "originator_version": self.version + 1,
            "timestamp": timestamp,
            **self._meta(ctx, self.chain_head),
            **fields,
        }
        digest = event_digest(get_topic(event_class), sealed)
        kwargs = {
            k: v for k, v in sealed.items() if k not in ("originator_id", "originator_version")
        }
        self.trigger_event(event_class, event_hash=digest, **kwargs)


# Validation helpers shared by the aggregates: each raises DomainError with a clear message.

CURRENCY = re.compile(r"^[A-Z]{3}$")
# Amounts stay far inside Decimal's default 28-digit context, so sums never round.
MAX_AMOUNT = Decimal("1000000000000000")
CENT = Decimal("0.01")
E = TypeVar("E", bound=StrEnum)


def choice(enum: type[E], value: str, what: str) -> E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise DomainError(f"unknown {what} {value!r}; expected one of: {allowed}") from None


def money(value: Decimal | int | str, what: str, *, allow_zero: bool = False) -> Decimal:
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise DomainError(f"{what} must be a decimal amount, got {value!r}") from None
    if not amount.is_finite():
        raise DomainError(f"{what} must be a finite amount")
    if amount < 0 or (amount == 0 and not allow_zero):
        raise DomainError(
            f"{what} must be {'zero or ' if allow_zero else ''}positive, got {amount}"
        )
    if amount.as_tuple().exponent < -2:  # type: ignore[operator]
        raise DomainError(f"{what} has more than two decimal places: {amount}")
    if amount >= MAX_AMOUNT:
        raise DomainError(f"{what} must be below {MAX_AMOUNT:,}")
    return amount.quantize(CENT)


RATE_STEP = Decimal("0.0001")


def percentage(value: Decimal | int | str, what: str) -> Decimal:
    """A yearly rate in percent, 0 to 100, to four decimals: Euribor + 0.125 is 3.125."""
    try:
        rate = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise DomainError(f"{what} must be a decimal percentage, got {value!r}") from None
    if not rate.is_finite() or not 0 <= rate <= 100:
        raise DomainError(f"{what} is a yearly percentage from 0 to 100, got {value}")
    if rate.as_tuple().exponent < -4:  # type: ignore[operator]
        raise DomainError(f"{what} has more than four decimal places: {rate}")
    return rate.quantize(CENT) if rate.as_tuple().exponent > -2 else rate  # type: ignore[operator]


LOAN_NUMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def loan_number(value: str) -> str:
    """Loan numbers appear in URLs and file names: letters, digits, '.', '_' and '-' only."""
    cleaned = (value or "").strip()
    if not LOAN_NUMBER.match(cleaned):
        raise DomainError(
            f"loan number {value!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return cleaned


def currency(value: str) -> str:
    if not CURRENCY.match(value or ""):
        raise DomainError(f"currency must be an ISO 4217 code like EUR, got {value!r}")
    return value


# C0 controls but tab, line feed and carriage return, and DEL: PostgreSQL text cannot hold
# NUL, and none of them belongs in a name, a finding or a reason.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def printable(value: str, what: str, *, max_length: int) -> str:
    """``value`` unchanged if it has no control characters and fits ``max_length``."""
    if CONTROL.search(value):
        raise DomainError(f"{what} contains control characters")
    if len(value) > max_length:
        raise DomainError(f"{what} is longer than {max_length} characters")
    return value


def text(value: str | None, what: str, *, max_length: int = 500) -> str:
    cleaned = (value or "").strip()
    if not cleaned:
        raise DomainError(f"{what} must not be empty")
    return printable(cleaned, what, max_length=max_length)


def bounded_int(value: int, what: str, low: int, high: int) -> int:
    """Whole numbers in a business range (a view column is a 32-bit integer at most)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DomainError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    return value


def a_date(value: date | str, what: str) -> date:
    if isinstance(value, datetime):
        raise DomainError(f"{what} must be a date, not a date and time")
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise DomainError(f"{what} must be an ISO date (YYYY-MM-DD), got {value!r}") from None
