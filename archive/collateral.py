"""Mortgage registrations (collateral) and the per-property lien index.

A property is identified by its cadastral reference. ``PropertyLiens`` has a
deterministic id per reference, so two registrations racing for the same property
write the same aggregate: one wins, the other gets a version conflict. That makes
the repeated-mortgage rule safe under concurrency without a separate unique index.
"""

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
    currency,
    money,
    stable_id,
    text,
)
from archive.exceptions import DomainError

MAX_LIEN_RANK = 99  # no property carries more; bounded so no view column can overflow


class RegistrationStatus(StrEnum):
    PENDING = "pending"
    REGISTERED = "registered"
    RELEASED = "released"


def normalise_cadastral_reference(reference: str) -> str:
    """Cadastral references are compared without spaces, dashes or case."""
    cleaned = "".join(ch for ch in (reference or "").upper() if ch.isalnum())
    if not 6 <= len(cleaned) <= 40:
        raise DomainError(f"cadastral reference {reference!r} is not a valid reference")
    return cleaned


def property_id(cadastral_reference: str) -> UUID:
    return stable_id("property", normalise_cadastral_reference(cadastral_reference))


class PropertyLiens(ArchiveAggregate):
    """Every lien ever placed on one property; the live ones decide repeated mortgages."""

    class Indexed(ArchiveAggregate.Created):
        cadastral_reference: str

        def apply(self, prop: PropertyLiens) -> None:
            prop.cadastral_reference = self.cadastral_reference
            prop.liens = {}

    class LienAdded(ArchiveAggregate.Event):
        registration_id: UUID
        loan_number: str
        lien_rank: int

        def apply(self, prop: PropertyLiens) -> None:
            prop.liens[str(self.registration_id)] = {
                "loan_number": self.loan_number,
                "lien_rank": self.lien_rank,
                "live": True,
            }

    class LienReleased(ArchiveAggregate.Event):
        registration_id: UUID

        def apply(self, prop: PropertyLiens) -> None:
            key = str(self.registration_id)
            prop.liens[key] = {**prop.liens[key], "live": False}

    @classmethod
    def index(cls, ctx: CommandContext, cadastral_reference: str) -> Self:
        ref = normalise_cadastral_reference(cadastral_reference)
        return cls._start(cls.Indexed, ctx, property_id(ref), cadastral_reference=ref)

    def live_liens(self) -> dict[str, dict[str, Any]]:
        return {rid: lien for rid, lien in self.liens.items() if lien["live"]}

    def add_lien(
        self, ctx: CommandContext, registration_id: UUID, loan_number: str, lien_rank: int
    ) -> list[dict[str, Any]]:
        """Add a lien; return the other live liens (non-empty means a repeated mortgage)."""
        live = self.live_liens()
        if any(lien["loan_number"] == loan_number for lien in live.values()):
            raise DomainError(
                f"property {self.cadastral_reference} already secures loan {loan_number}"
            )
        if live:
            highest = max(lien["lien_rank"] for lien in live.values())
            if lien_rank <= highest:
                raise DomainError(
                    f"property {self.cadastral_reference} already secures another live loan "
                    f"with lien rank {highest}; a repeated mortgage needs a higher rank "
                    f"(at least {highest + 1})"
                )
        self._trigger(
            self.LienAdded,
            ctx,
            registration_id=registration_id,
            loan_number=loan_number,
            lien_rank=lien_rank,
        )
        return [{"registration_id": rid, **lien} for rid, lien in live.items()]

    def release_lien(self, ctx: CommandContext, registration_id: UUID) -> None:
        if str(registration_id) in self.live_liens():
            self._trigger(self.LienReleased, ctx, registration_id=registration_id)


class MortgageRegistration(ArchiveAggregate):
    """A mortgage over one property securing one loan, from filing to release."""

    class Filed(ArchiveAggregate.Created):
        loan_number: str
        cadastral_reference: str
        address: str
        owner: str
        registry_office: str
        lien_rank: int
        secured_amount: Decimal
        currency: str

        def apply(self, reg: MortgageRegistration) -> None:
            reg.loan_number = self.loan_number
            reg.cadastral_reference = self.cadastral_reference
            reg.address = self.address
            reg.owner = self.owner
            reg.registry_office = self.registry_office
            reg.lien_rank = self.lien_rank
            reg.secured_amount = self.secured_amount
            reg.currency = self.currency
            reg.status = RegistrationStatus.PENDING.value
            reg.registry_entry = None
            reg.registered_on = None
            reg.released_on = None
            reg.site_verifications = []
            reg.repeated_mortgage = None

    class RepeatedMortgageFlagged(ArchiveAggregate.Event):
        other_liens: list[dict[str, Any]]

        def apply(self, reg: MortgageRegistration) -> None:
            reg.repeated_mortgage = {"other_liens": self.other_liens, "flagged_at": self.timestamp}

    class Registered(ArchiveAggregate.Event):
        registry_entry: str
        registered_on: date

        def apply(self, reg: MortgageRegistration) -> None:
            reg.status = RegistrationStatus.REGISTERED.value
            reg.registry_entry = self.registry_entry
            reg.registered_on = self.registered_on

    class SiteVerified(ArchiveAggregate.Event):
        officer: str
        verified_on: date
        findings: str
        defects: list[str]

        def apply(self, reg: MortgageRegistration) -> None:
            reg.site_verifications.append(
                {
                    "officer": self.officer,
                    "verified_on": self.verified_on,
                    "findings": self.findings,
                    "defects": list(self.defects),
                }
            )

    class Released(ArchiveAggregate.Event):
        released_on: date

        def apply(self, reg: MortgageRegistration) -> None:
            reg.status = RegistrationStatus.RELEASED.value
            reg.released_on = self.released_on

    @classmethod
    def file(
        cls,
        ctx: CommandContext,
        registration_id: UUID,
        *,
        loan_number: str,
        cadastral_reference: str,
        address: str,
        owner: str,
        registry_office: str,
        lien_rank: int,
        secured_amount: Decimal | str,
        currency_code: str,
    ) -> Self:
        bounded_int(lien_rank, "lien rank", 1, MAX_LIEN_RANK)
        return cls._start(
            cls.Filed,
            ctx,
            registration_id,
            loan_number=loan_number,
            cadastral_reference=normalise_cadastral_reference(cadastral_reference),
            address=text(address, "address"),
            owner=text(owner, "owner"),
            registry_office=text(registry_office, "registry office"),
            lien_rank=lien_rank,
            secured_amount=money(secured_amount, "secured amount"),
            currency=currency(currency_code),
        )

    def flag_repeated_mortgage(
        self, ctx: CommandContext, other_liens: list[dict[str, Any]]
    ) -> None:
        self._trigger(self.RepeatedMortgageFlagged, ctx, other_liens=other_liens)

    def mark_registered(
        self, ctx: CommandContext, registry_entry: str, registered_on: date | str
    ) -> None:
        if self.status != RegistrationStatus.PENDING:
            raise DomainError(
                f"only a pending registration can be registered; this one is {self.status}"
            )
        self._trigger(
            self.Registered,
            ctx,
            registry_entry=text(registry_entry, "registry entry", max_length=120),
            registered_on=not_in_future(
                a_date(registered_on, "registration date"), "registration date"
            ),
        )

    def verify_on_site(
        self,
        ctx: CommandContext,
        officer: str,
        verified_on: date | str,
        findings: str,
        defects: list[str],
    ) -> None:
        if self.status == RegistrationStatus.RELEASED:
            raise DomainError("a released mortgage is no longer verified on site")
        self._trigger(
            self.SiteVerified,
            ctx,
            officer=text(officer, "officer", max_length=120),
            verified_on=not_in_future(
                a_date(verified_on, "verification date"), "verification date"
            ),
            findings=text(findings, "findings", max_length=4000),
            defects=[text(d, "defect") for d in defects],
        )

    def release(self, ctx: CommandContext, released_on: date | str) -> None:
        """Release the mortgage: on a day that has come, and not before the registry
        entered it (a pending filing may be withdrawn on any past day)."""
        if self.status == RegistrationStatus.RELEASED:
            raise DomainError("this mortgage is already released")
        day = not_in_future(a_date(released_on, "release date"), "release date")
        if self.registered_on is not None:
            not_before(day, self.registered_on, "release date", "registration date")
        self._trigger(self.Released, ctx, released_on=day)

    def state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "loan_number": self.loan_number,
            "property": {
                "cadastral_reference": self.cadastral_reference,
                "address": self.address,
                "owner": self.owner,
            },
            "registry_office": self.registry_office,
            "registry_entry": self.registry_entry,
            "lien_rank": self.lien_rank,
            "secured_amount": self.secured_amount,
            "currency": self.currency,
            "status": self.status,
            "registered_on": self.registered_on,
            "released_on": self.released_on,
            "site_verifications": self.site_verifications,
            "repeated_mortgage": self.repeated_mortgage,
            "created_on": self.created_on,
            "modified_on": self.modified_on,
        }
