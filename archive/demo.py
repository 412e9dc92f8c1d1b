"""A small demo archive, seeded once into an empty store so a newcomer sees something at once.

The demo originals are generated scans (Spanish text rendered, skewed, saved as image-only
PDF, TIFF and PNG), so the OCR worker has real work and a newcomer's first search hits.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from archive.application import ArchiveApp, operator_context
from archive.domain import CommandContext, Role

DEMO_USERS = {
    "demo.officer": Role.CREDIT_OFFICER,
    "demo.archivist": Role.ARCHIVIST,
    "demo.auditor": Role.AUDITOR,
    "demo.compliance": Role.COMPLIANCE,
    "demo.admin": Role.ADMIN,
}


def seed(archive: ArchiveApp, tokens_file: Path) -> dict[str, str]:
    """Seed users and loan files; write the users' tokens to ``tokens_file`` (mode 600)."""
    operator = operator_context("demo data")
    tokens = {
        name: archive.add_user(operator, name, role.value) for name, role in DEMO_USERS.items()
    }
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(
            f"{name}\t{DEMO_USERS[name].value}\t{token}\n" for name, token in tokens.items()
        )

    ctx = CommandContext("demo.officer", Role.CREDIT_OFFICER.value, "demo data")
    archive.open_loan(
        ctx,
        loan_number="CR-2023-0001",
        borrower_name="María José Fernández Núñez",
        borrower_national_id="12345678Z",
        product="mortgage",
        principal="180000.00",
        currency_code="EUR",
        interest_rate="3.25",
        term_months=300,
        disbursement_date="2023-03-01",
        maturity_date="2048-03-01",
        branch="Teruel Centro",
    )
    home = archive.register_collateral(
        ctx,
        loan_number="CR-2023-0001",
        cadastral_reference="9872023VH5797S0001WX",
        address="Calle Mayor 12, 44001 Teruel",
        owner="María José Fernández Núñez",
        registry_office="Registro de la Propiedad de Teruel",
        lien_rank=1,
        secured_amount="216000.00",
        currency_code="EUR",
    )
    archive.change_collateral(
        ctx,
        home.id,
        None,
        lambda r: r.mark_registered(ctx, "Tomo 812, Libro 95, Folio 33", "2023-03-10"),
    )
    archive.change_collateral(
        ctx,
        home.id,
        None,
        lambda r: r.verify_on_site(
            ctx,
            "demo.officer",
            "2023-02-20",
            "Vivienda habitada, estado conforme a la tasación",
            [],
        ),
    )
    val = archive.appraise(
        ctx,
        loan_number="CR-2023-0001",
        collateral_id=home.id,
        agency="Tasaciones Aragón SA",
        appraiser="Luis Gómez",
        method="market_comparison",
        appraised_value="240000.00",
        currency_code="EUR",
        appraisal_date="2023-02-15",
    )
    archive.review_valuation(ctx, val.id, None, "Carmen Ruiz", "205000.00", "Comparables más bajos")

    archive.open_loan(
        ctx,
        loan_number="CR-2022-0417",
        borrower_name="Agropecuaria Los Olmos SL",
        borrower_national_id="B44123456",
        product="business",
        principal="95000.00",
        currency_code="EUR",
        interest_rate="5.10",
        term_months=60,
        disbursement_date="2022-05-10",
        maturity_date="2027-05-10",
        branch="Alcañiz",
    )
    npl = "CR-2022-0417"
    for command in (
        lambda loan: loan.change_status(ctx, "overdue"),
        lambda loan: loan.change_status(ctx, "non_performing"),
        lambda loan: loan.classify(ctx, "substandard"),
        lambda loan: loan.assign_officer(ctx, "loan", "Pedro Sanz"),
        lambda loan: loan.assign_officer(ctx, "collection", "Elena Martín"),
        lambda loan: loan.record_investigation(
            ctx,
            {
                "creditor_debtor_relationship_clear": True,
                "willingness_to_pay": True,
                "capacity_to_pay": False,
                "valid_assets": True,
                "asset_disposal_feasible": True,
                "liabilities_investigated": True,
            },
            "2024-09-02",
            "Caída de precios del cereal; maquinaria embargable",
        ),
        lambda loan: loan.categorise_recovery(
            ctx, "recoverable_with_effort", ["caída de ingresos agrícolas", "sobreendeudamiento"]
        ),
        lambda loan: loan.set_recovery_plan(
            ctx, "Reestructurar a 36 meses con garantía de maquinaria", "2025-06-30", "60000.00"
        ),
        lambda loan: loan.record_collection_action(
            ctx, "visit", "2024-09-15", "Compromiso de pago parcial", "4500.00", "Elena Martín"
        ),
        lambda loan: loan.record_inspection(
            ctx, "monthly", "2024-10-01", "Pedro Sanz", "Actividad reducida, sin nuevos impagos"
        ),
    ):
        archive.change_loan(ctx, npl, None, command)

    archive.open_loan(
        ctx,
        loan_number="CR-2021-0950",
        borrower_name="Grupo vecinal de Valdecebro",
        borrower_national_id="G44987654",
        product="village_group",
        village_group="Asociación de regantes de Valdecebro",
        principal="250000.00",
        currency_code="EUR",
        interest_rate="4.00",
        term_months=120,
        disbursement_date="2021-01-20",
        maturity_date="2031-01-20",
        branch="Teruel Centro",
    )
    archive.open_loan(
        ctx,
        loan_number="CR-2024-0102",
        borrower_name="María José Fernández Núñez",
        borrower_national_id="12345678Z",
        product="personal",
        principal="15000.00",
        currency_code="EUR",
        interest_rate="7.90",
        term_months=48,
        disbursement_date="2024-04-01",
        maturity_date="2028-04-01",
        branch="Teruel Centro",
    )
    archive.register_collateral(
        ctx,
        loan_number="CR-2024-0102",
        cadastral_reference="9872023VH5797S0001WX",
        address="Calle Mayor 12, 44001 Teruel",
        owner="María José Fernández Núñez",
        registry_office="Registro de la Propiedad de Teruel",
        lien_rank=2,
        secured_amount="18000.00",
        currency_code="EUR",
    )
    scans = (
        ("CR-2023-0001", "mortgage_deed", "escritura-hipoteca.pdf", DEED, 1.5, "PDF"),
        ("CR-2023-0001", "valuation_report", "tasacion.tiff", VALUATION, -2.0, "TIFF"),
        ("CR-2022-0417", "collection_notice", "requerimiento-pago.png", NOTICE, 0.0, "PNG"),
    )
    archivist = CommandContext("demo.archivist", Role.ARCHIVIST.value, "demo data")
    for loan_number, doc_type, filename, lines, skew, fmt in scans:
        archive.register_document(
            archivist,
            io.BytesIO(scan(lines, skew, fmt)),
            loan_number=loan_number,
            doc_type=doc_type,
            original_filename=filename,
        )
    return tokens


DEED = (
    "ESCRITURA DE PRÉSTAMO CON GARANTÍA HIPOTECARIA",
    "En Teruel, a uno de marzo de dos mil veintitrés, ante mí, Notario,",
    "COMPARECEN Doña María José Fernández Núñez, con D.N.I. 12345678Z,",
    "y la Caja Rural de Teruel, Sociedad Cooperativa de Crédito.",
    "La prestataria hipoteca la vivienda de la Calle Mayor 12, Teruel,",
    "referencia catastral 9872023VH5797S0001WX, en garantía de un",
    "préstamo de ciento ochenta mil euros (180.000,00 EUR).",
    "Cláusula tercera. Interés anual del tres coma veinticinco por ciento.",
)
VALUATION = (
    "CERTIFICADO DE TASACIÓN",
    "Sociedad de tasación: Tasaciones Aragón, S.A. Tasador: Luis Gómez.",
    "Inmueble: vivienda en Calle Mayor 12, 44001 Teruel.",
    "Referencia catastral 9872023VH5797S0001WX.",
    "Método de comparación. Valor de tasación: 240.000,00 euros.",
)
NOTICE = (
    "REQUERIMIENTO DE PAGO",
    "Agropecuaria Los Olmos, S.L. Préstamo CR-2022-0417.",
    "Les comunicamos que mantienen cuotas impagadas por importe de",
    "doce mil cuatrocientos euros. Rogamos regularicen la deuda.",
)
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf")


def scan(lines: Sequence[str], skew: float, fmt: str, dpi: int = 200) -> bytes:
    """Render lines as a scanned page (slightly skewed, greyscale) in ``fmt``."""
    size = round(11 * dpi / 72)
    face = ImageFont.truetype(str(FONT), size) if FONT.exists() else ImageFont.load_default(size)
    margin, step = dpi, round(size * 1.6)
    page = Image.new("L", (round(8.27 * dpi), 2 * margin + step * len(lines)), 255)
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * step), line, font=face, fill=20)
    if skew:
        page = page.rotate(skew, resample=Image.Resampling.BICUBIC, fillcolor=255)
    out = io.BytesIO()
    page.save(out, format=fmt, resolution=dpi, dpi=(dpi, dpi))
    return out.getvalue()
