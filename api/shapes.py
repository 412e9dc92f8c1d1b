"""One shape per record, whether it is rebuilt from the log or read from the loan_files view.

``GET /api/v1/loans`` answers from the loan_files view, whose columns name the facts as
the request bodies do (``loan_id``, ``borrower_name``, ``opened_at``); ``GET
/api/v1/loans/{n}`` (now, ``?version`` or ``?as_of``) rebuilds the file from the events,
whose aggregates name them as the library does (``id``, ``borrower{}``, ``created_on``).
A client should not need two parsers for one loan file, so the rebuilt state is renamed
here into the view's names, and its values written as the view writes them (``plain``:
times as fixed-width UTC ``…Z``, money and ids as text), so equal facts are equal text. The aggregates keep theirs: the views and the auditors'
tools compare against them.

The models below only document the shape in OpenAPI; the routes build plain dicts.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from projections.encoding import plain

Renames = dict[str, str]
Flattens = dict[str, dict[str, str]]


def _renamed(state: dict[str, Any], renames: Renames, flattens: Flattens) -> dict[str, Any]:
    """``state`` with keys renamed and nested dicts spread into prefixed keys, in order."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in flattens:
            inner = value or {}
            for field, name in flattens[key].items():
                out[name] = inner.get(field)
        else:
            out[renames.get(key, key)] = value
    return out


LOAN_RENAMES = {"id": "loan_id", "created_on": "opened_at", "modified_on": "updated_at"}
LOAN_FLATTENS = {"borrower": {"name": "borrower_name", "national_id": "borrower_national_id"}}
COLLATERAL_RENAMES = {
    "id": "registration_id",
    "created_on": "filed_at",
    "modified_on": "updated_at",
}
COLLATERAL_FLATTENS = {
    "property": {
        "cadastral_reference": "cadastral_reference",
        "address": "address",
        "owner": "owner",
    }
}
VALUATION_RENAMES = {
    "id": "valuation_id",
    "created_on": "appraised_at",
    "modified_on": "updated_at",
}
VALUATION_FLATTENS = {
    "review": {
        "reviewer": "reviewer",
        "reviewed_value": "reviewed_value",
        "notes": "review_notes",
        "reviewed_at": "reviewed_at",
    }
}
DOCUMENT_RENAMES = {"id": "document_id"}
DOCUMENT_FLATTENS = {
    "extraction": {"status": "extraction_status"},
    "last_fixity": {"outcome": "fixity_status", "checked_at": "fixity_checked_at"},
}


def collateral_shape(state: dict[str, Any]) -> dict[str, Any]:
    """A mortgage registration's state (``MortgageRegistration.state()``) in the view's names."""
    return plain(_renamed(state, COLLATERAL_RENAMES, COLLATERAL_FLATTENS))


def valuation_shape(state: dict[str, Any]) -> dict[str, Any]:
    """A valuation's state (``Valuation.state()``) in the view's names."""
    shaped: dict[str, Any] = {}
    for key, value in _renamed(state, VALUATION_RENAMES, VALUATION_FLATTENS).items():
        if key == "overvaluation":
            shaped["overvalued"] = value is not None
        shaped[key] = value
    return plain(shaped)


def document_shape(state: dict[str, Any]) -> dict[str, Any]:
    """A document as the loan file lists it: the view's summary of extraction and fixity
    (``GET /api/v1/documents/{id}`` has the details)."""
    return plain(_renamed(state, DOCUMENT_RENAMES, DOCUMENT_FLATTENS))


def loan_shape(file: dict[str, Any]) -> dict[str, Any]:
    """``ArchiveApp.loan_file()`` (a state rebuilt from the log) in the names of the
    ``GET /api/v1/loans`` items, children included."""
    out = _renamed(file, LOAN_RENAMES, LOAN_FLATTENS)
    out["collateral"] = [collateral_shape(c) for c in file["collateral"]]
    out["valuations"] = [valuation_shape(v) for v in file["valuations"]]
    out["documents"] = [document_shape(d) for d in file["documents"]]
    return plain(out)


# -- OpenAPI documentation of the shapes ------------------------------------------------------


def money() -> Any:
    return Field(description='Decimal as a string, e.g. "120000.00" (never a float).')


class Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class CollateralOut(Shape):
    registration_id: UUID
    loan_number: str
    version: int
    cadastral_reference: str
    address: str
    owner: str
    registry_office: str
    registry_entry: str | None
    lien_rank: int
    secured_amount: str = money()
    currency: str
    status: str = Field(description="pending, registered or released")
    registered_on: date | None
    released_on: date | None
    site_verifications: list[dict[str, Any]]
    repeated_mortgage: dict[str, Any] | None
    filed_at: datetime
    updated_at: datetime


class ValuationOut(Shape):
    valuation_id: UUID
    loan_number: str
    version: int
    collateral_id: UUID | None
    agency: str
    appraiser: str
    method: str
    appraised_value: str = money()
    currency: str
    appraisal_date: date
    revaluation_due: date
    reviewer: str | None
    reviewed_value: str | None = money()
    review_notes: str | None
    reviewed_at: datetime | None
    overvalued: bool
    overvaluation: dict[str, Any] | None
    superseded_by: UUID | None
    appraised_at: datetime
    updated_at: datetime


class DocumentOut(Shape):
    """A document as its loan file lists it (the view's summary of extraction and fixity)."""

    document_id: UUID
    version: int
    extraction_status: str = Field(description="pending, running, done or failed")
    loan_number: str
    collateral_id: UUID | None
    valuation_id: UUID | None
    doc_type: str
    original_filename: str
    media_type: str
    size: int
    sha256: str
    object_key: str
    object_version: str | None
    retain_until: datetime | None
    legal_hold: bool
    supersedes: UUID | None
    superseded_by: UUID | None
    uploaded_by: str
    uploaded_at: datetime
    downloads: int
    fixity_status: str | None = Field(description="ok, missing or changed; null: never checked")
    fixity_checked_at: datetime | None
    last_downloaded_at: datetime | None = Field(None, description="List items only.")
    updated_at: datetime | None = Field(None, description="List items only.")


class LoanFileOut(Shape):
    """A loan file: the same names in the list, in one file, now or as of the past."""

    loan_id: UUID
    loan_number: str
    version: int = Field(description="Also the ETag of GET /api/v1/loans/{loan_number}.")
    borrower_name: str
    borrower_national_id: str
    product: str
    village_group: str | None
    principal: str = money()
    currency: str
    interest_rate: str = Field(description='Yearly percentage as a string, e.g. "3.125".')
    term_months: int
    disbursement_date: date
    maturity_date: date
    branch: str
    status: str
    classification: str
    loan_officer: str | None
    collection_officer: str | None
    officer_history: list[dict[str, Any]]
    investigation: dict[str, Any] | None
    recovery_category: str | None
    causes_of_default: list[str]
    recovery_plan: dict[str, Any] | None
    collection_actions: list[dict[str, Any]]
    repayments: list[dict[str, Any]]
    inspections: list[dict[str, Any]]
    repaid: str = money()
    recovered: str = money()
    outstanding: str = money()
    opened_at: datetime
    updated_at: datetime
    collateral: list[CollateralOut]
    valuations: list[ValuationOut]
    documents: list[DocumentOut]
    chain_head: str | None = Field(
        None, description="One file only: the hash of the loan's last event."
    )
    as_of: datetime | None = Field(
        None, description="One file only: the moment it was rebuilt at (null: now)."
    )
    position: int | None = Field(
        None, description="List items only: the log position of the loan's last event."
    )


class LoanFilePage(BaseModel):
    items: list[LoanFileOut]
    total: int
    limit: int
    offset: int
    position: int = Field(description="The view position the items are consistent with.")
