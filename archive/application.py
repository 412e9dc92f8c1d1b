"""The application service: one method per command, each one transaction.

Commands load aggregates, check the caller's expected version, let the domain decide,
and save every changed aggregate atomically. Reads rebuild state from events, at the
head or at any past version or moment.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, JSONTranscoder, Transcoding

from archive.collateral import MortgageRegistration, PropertyLiens, property_id
from archive.domain import CommandContext, Role
from archive.eventlog import protect_events_table, select_with_positions
from archive.exceptions import (
    AuthenticationError,
    ConflictError,
    DomainError,
    NotFoundError,
)
from archive.integrity import ChainReport, verify_aggregate, verify_events, verify_store
from archive.loans import LoanFile, loan_id
from archive.settings import Settings
from archive.users import AccessToken, User, new_token, token_digest, token_id, user_id
from archive.valuations import Valuation


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


class StaleVersionError(ConflictError):
    """The caller's expected version is not the current one."""

    def __init__(self, what: str, current: int, expected: int) -> None:
        super().__init__(f"{what} is at version {current}, not {expected}: reload and retry")
        self.current = current


@dataclass(frozen=True)
class Outcome:
    """What a command returns: the aggregate it changed, its new version, the log position."""

    id: UUID
    version: int
    position: int


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: Role

    def context(
        self, reason: str | None = None, correlation_id: str | None = None
    ) -> CommandContext:
        if correlation_id:
            return CommandContext(self.name, self.role.value, reason, correlation_id)
        return CommandContext(self.name, self.role.value, reason)


def operator_context(reason: str | None = None) -> CommandContext:
    """The local operator running an administrative CLI command on the server itself."""
    return CommandContext(f"operator:{getpass.getuser()}", Role.ADMIN.value, reason)


T = TypeVar("T", bound=Aggregate)


class ArchiveApp(Application[UUID]):
    name = "Archive"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__(env=settings.eventsourcing_env())
        protect_events_table(self.recorder)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())

    # -- plumbing -----------------------------------------------------------------------

    def _load(self, cls: type[T], aggregate_id: UUID, what: str, version: int | None = None) -> T:
        try:
            aggregate = self.repository.get(aggregate_id, version=version)
        except AggregateNotFoundError:
            raise NotFoundError(f"{what} not found") from None
        if not isinstance(aggregate, cls):
            raise NotFoundError(f"{what} not found")
        return aggregate

    def _commit(self, *aggregates: Aggregate, duplicate: str | None = None) -> int:
        try:
            recordings = self.save(*aggregates)
        except IntegrityError:
            raise ConflictError(
                duplicate or "a concurrent change was saved first: reload and retry"
            ) from None
        return recordings[-1].notification.id

    @staticmethod
    def _expect(aggregate: Aggregate, expected_version: int | None, what: str) -> None:
        if expected_version is not None and aggregate.version != expected_version:
            raise StaleVersionError(what, aggregate.version, expected_version)

    def _update(
        self,
        cls: type[T],
        aggregate_id: UUID,
        what: str,
        expected_version: int | None,
        change: Any,
    ) -> Outcome:
        aggregate = self._load(cls, aggregate_id, what)
        self._expect(aggregate, expected_version, what)
        change(aggregate)
        position = self._commit(aggregate)
        return Outcome(aggregate.id, aggregate.version, position)

    # -- loan files ---------------------------------------------------------------------

    def open_loan(self, ctx: CommandContext, **terms: Any) -> Outcome:
        loan = LoanFile.open(ctx, **terms)
        duplicate = f"loan number {loan.loan_number} already exists"
        if loan.id in self.repository:
            raise ConflictError(duplicate)
        position = self._commit(loan, duplicate=duplicate)
        return Outcome(loan.id, loan.version, position)

    def get_loan(self, loan_number: str, version: int | None = None) -> LoanFile:
        return self._load(LoanFile, loan_id(loan_number), f"loan {loan_number}", version)

    def change_loan(
        self, ctx: CommandContext, loan_number: str, expected_version: int | None, change: Any
    ) -> Outcome:
        """Apply one LoanFile command (a callable taking the loan) under optimistic locking."""
        return self._update(
            LoanFile, loan_id(loan_number), f"loan {loan_number}", expected_version, change
        )

    # -- collateral -----------------------------------------------------------------------

    def register_collateral(self, ctx: CommandContext, **fields: Any) -> Outcome:
        loan = self.get_loan(fields["loan_number"])
        registration = MortgageRegistration.file(ctx, uuid4(), **fields)
        try:
            prop = self._load(
                PropertyLiens, property_id(registration.cadastral_reference), "property"
            )
        except NotFoundError:
            prop = PropertyLiens.index(ctx, registration.cadastral_reference)
        others = prop.add_lien(ctx, registration.id, loan.loan_number, registration.lien_rank)
        if others:
            registration.flag_repeated_mortgage(ctx, others)
        loan.link_collateral(ctx, registration.id)
        position = self._commit(registration, prop, loan)
        return Outcome(registration.id, registration.version, position)

    def get_collateral(
        self, registration_id: UUID, version: int | None = None
    ) -> MortgageRegistration:
        return self._load(
            MortgageRegistration, registration_id, f"collateral {registration_id}", version
        )

    def change_collateral(
        self, ctx: CommandContext, registration_id: UUID, expected_version: int | None, change: Any
    ) -> Outcome:
        return self._update(
            MortgageRegistration,
            registration_id,
            f"collateral {registration_id}",
            expected_version,
            change,
        )

    def release_collateral(
        self,
        ctx: CommandContext,
        registration_id: UUID,
        expected_version: int | None,
        released_on: date | str,
    ) -> Outcome:
        registration = self.get_collateral(registration_id)
        self._expect(registration, expected_version, f"collateral {registration_id}")
        registration.release(ctx, released_on)
        prop = self._load(PropertyLiens, property_id(registration.cadastral_reference), "property")
        prop.release_lien(ctx, registration.id)
        position = self._commit(registration, prop)
        return Outcome(registration.id, registration.version, position)

    # -- valuations -------------------------------------------------------------------------

    def appraise(
        self, ctx: CommandContext, supersedes: UUID | None = None, **fields: Any
    ) -> Outcome:
        loan = self.get_loan(fields["loan_number"])
        collateral_id = fields.get("collateral_id")
        if collateral_id is not None:
            collateral = self.get_collateral(collateral_id)
            if collateral.loan_number != loan.loan_number:
                raise DomainError(f"collateral {collateral_id} secures another loan")
        valuation = Valuation.appraise(ctx, uuid4(), **fields)
        changed: list[Aggregate] = [valuation, loan]
        if supersedes is not None:
            old = self.get_valuation(supersedes)
            if old.loan_number != loan.loan_number:
                raise DomainError(f"valuation {supersedes} belongs to another loan")
            old.supersede(ctx, valuation.id)
            changed.append(old)
        loan.link_valuation(ctx, valuation.id)
        position = self._commit(*changed)
        return Outcome(valuation.id, valuation.version, position)

    def get_valuation(self, valuation_id: UUID, version: int | None = None) -> Valuation:
        return self._load(Valuation, valuation_id, f"valuation {valuation_id}", version)

    def change_valuation(
        self, ctx: CommandContext, valuation_id: UUID, expected_version: int | None, change: Any
    ) -> Outcome:
        return self._update(
            Valuation, valuation_id, f"valuation {valuation_id}", expected_version, change
        )

    def review_valuation(
        self,
        ctx: CommandContext,
        valuation_id: UUID,
        expected_version: int | None,
        reviewer: str,
        reviewed_value: Decimal | str,
        notes: str | None = None,
    ) -> Outcome:
        margin = self.settings.overvaluation_margin
        return self.change_valuation(
            ctx,
            valuation_id,
            expected_version,
            lambda v: v.review_value(ctx, reviewer, reviewed_value, margin, notes),
        )

    # -- reading the past -------------------------------------------------------------------

    def loan_events(self, loan_number: str) -> list[tuple[int, Any]]:
        """Every event of the loan and of its collateral and valuations, by position."""
        loan = self.get_loan(loan_number)
        ids = [loan.id, *loan.collateral_ids, *loan.valuation_ids]
        return [
            (n.id, self.mapper.to_domain_event(n))
            for n in select_with_positions(self.recorder, ids)
        ]

    def loan_file(
        self, loan_number: str, *, version: int | None = None, as_of: datetime | None = None
    ) -> dict[str, Any]:
        """The loan file with its collateral and valuations, now or in the past."""
        if version is not None and as_of is not None:
            raise DomainError("give either a version or a moment, not both")
        if version is not None:
            if version < 1:
                raise DomainError("version must be 1 or more")
            head = self.get_loan(loan_number)
            if version > head.version:
                raise NotFoundError(
                    f"loan {loan_number} has no version {version} (head is {head.version})"
                )
            loan = self.get_loan(loan_number, version=version)
            as_of = loan.modified_on
        events = self.loan_events(loan_number)
        if as_of is not None:
            if as_of.tzinfo is None:
                raise DomainError(
                    "a moment in the past needs a time zone, e.g. 2026-01-31T12:00:00Z"
                )
            events = [(p, e) for p, e in events if e.timestamp <= as_of]
        states: dict[UUID, Any] = {}
        for _, event in events:
            states[event.originator_id] = event.mutate(states.get(event.originator_id))
        loan = states.get(loan_id(loan_number))
        if loan is None:
            raise NotFoundError(
                f"loan {loan_number} did not exist at {as_of.isoformat() if as_of else 'that time'}"
            )
        result = loan.state()
        result["collateral"] = [states[i].state() for i in loan.collateral_ids]
        result["valuations"] = [states[i].state() for i in loan.valuation_ids]
        result["as_of"] = as_of
        return result

    # -- users and tokens -------------------------------------------------------------------

    def add_user(self, ctx: CommandContext, name: str, role: str) -> str:
        """Register a user and return a new bearer token (shown once, stored hashed)."""
        user = User.register(ctx, name, role)
        if user.id in self.repository:
            raise ConflictError(f"user {name} already exists")
        token = new_token()
        grant = AccessToken.issue(ctx, name, token_digest(token))
        self._commit(user, grant, duplicate=f"user {name} already exists")
        return token

    def get_user(self, name: str) -> User:
        return self._load(User, user_id(name), f"user {name}")

    def issue_token(self, ctx: CommandContext, name: str) -> str:
        user = self.get_user(name)
        if not user.active:
            raise DomainError(f"user {name} is deactivated")
        token = new_token()
        self._commit(AccessToken.issue(ctx, name, token_digest(token)))
        return token

    def revoke_token(self, ctx: CommandContext, token: str) -> None:
        grant = self._load(AccessToken, token_id(token_digest(token)), "token")
        grant.revoke(ctx)
        self._commit(grant)

    def change_user(self, ctx: CommandContext, name: str, change: Any) -> None:
        user = self.get_user(name)
        change(user)
        self._commit(user)

    def authenticate(self, token: str) -> Principal:
        try:
            grant = self._load(AccessToken, token_id(token_digest(token)), "token")
            user = self.get_user(grant.user_name)
        except NotFoundError:
            raise AuthenticationError("unknown bearer token") from None
        if grant.revoked:
            raise AuthenticationError("this bearer token was revoked")
        if not user.active:
            raise AuthenticationError(f"user {user.name} is deactivated")
        return Principal(user.name, Role(user.role))

    # -- integrity --------------------------------------------------------------------------

    def verify_chain(self) -> ChainReport:
        return verify_store(self.recorder, self.mapper)

    def verify_loan_chain(self, loan_number: str) -> ChainReport:
        try:
            loan = self.get_loan(loan_number)
            ids = [loan.id, *loan.collateral_ids, *loan.valuation_ids]
        except NotFoundError:
            raise
        except Exception:  # the loan's own events are unreadable: verify what we can name
            ids = [loan_id(loan_number)]
        return verify_events(
            self.mapper, ((n.id, n) for n in select_with_positions(self.recorder, ids))
        )

    def verify_aggregate_chain(self, aggregate_id: UUID) -> ChainReport:
        return verify_aggregate(self.recorder, self.mapper, aggregate_id)

    def head_position(self) -> int:
        return self.recorder.max_notification_id() or 0
