"""Valid command arguments for tests, so each test states only what it is about."""

from __future__ import annotations

import io
import json
from typing import Any
from uuid import UUID

from archive.application import ArchiveApp, Outcome
from archive.domain import CommandContext
from archive.settings import Settings


def loan_terms(loan_number: str = "CR-1", **overrides: Any) -> dict[str, Any]:
    terms: dict[str, Any] = {
        "loan_number": loan_number,
        "borrower_name": "Ana Pérez Núñez",
        "borrower_national_id": "12345678Z",
        "product": "mortgage",
        "principal": "100000.00",
        "currency_code": "EUR",
        "interest_rate": "3.50",
        "term_months": 240,
        "disbursement_date": "2024-01-15",
        "maturity_date": "2044-01-15",
        "branch": "Teruel",
    }
    terms.update(overrides)
    return terms


def mortgage_fields(loan_number: str = "CR-1", **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "loan_number": loan_number,
        "cadastral_reference": "9872023VH5797S0001WX",
        "address": "Calle Mayor 1, Teruel",
        "owner": "Ana Pérez Núñez",
        "registry_office": "Registro de Teruel",
        "lien_rank": 1,
        "secured_amount": "120000.00",
        "currency_code": "EUR",
    }
    fields.update(overrides)
    return fields


def appraisal_fields(loan_number: str = "CR-1", **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "loan_number": loan_number,
        "collateral_id": None,
        "agency": "Tasaciones Aragón SA",
        "appraiser": "Luis Gómez",
        "method": "market_comparison",
        "appraised_value": "150000.00",
        "currency_code": "EUR",
        "appraisal_date": "2024-01-10",
    }
    fields.update(overrides)
    return fields


def open_loan(
    archive: ArchiveApp, ctx: CommandContext, loan_number: str = "CR-1", **kw: Any
) -> Outcome:
    return archive.open_loan(ctx, **loan_terms(loan_number, **kw))


def settings_json(settings: Settings) -> str:
    """Settings as JSON for a child process, secrets included (tests only)."""
    values = settings.model_dump(mode="json", exclude_none=True)
    for secret in ("s3_access_key", "s3_secret_key"):
        if getattr(settings, secret) is not None:
            values[secret] = getattr(settings, secret).get_secret_value()
    return json.dumps(values)


def upload(archive: ArchiveApp, content: bytes, name: str = "doc.pdf") -> UUID:
    """Register ``content`` as a mortgage deed of CR-1, uploaded by an archivist."""
    return archive.register_document(
        CommandContext("archivist.user", "archivist"),
        io.BytesIO(content),
        loan_number="CR-1",
        doc_type="mortgage_deed",
        original_filename=name,
    ).id
