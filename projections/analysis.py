"""The per-loan analysis report ("informe de análisis completo y detallado"), as JSON and PDF.

For one loan file: its terms, officers, investigation checklist, classification,
recovery category, causes of default and plan, collection actions, inspections,
collateral and valuations with the collateral coverage, and its whole history (every
event of the loan, its collateral, valuations and documents, from the archive's log).

State comes from the loan_files view; the history is cut at the view's position, so
the whole report is consistent with that one position, and the chain head printed in
the PDF footer is the hash of the loan file's last event at that position: an auditor
can check the filed paper against the log and its signed checkpoints.

Collateral coverage = the reviewed values of the valuations in force (not superseded,
reviewed, in the loan's currency, and not of a released mortgage) / the outstanding
amount; null when nothing is outstanding.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archive.exceptions import NotFoundError
from archive.loans import ChecklistItem
from projections import loan_files
from projections.audit_trail import state_changes, summarise
from projections.encoding import iso_utc, plain
from projections.reports import (
    INSPECTION_MONTHS,
    RECOVERY_BOOK,
    ZERO,
    inspection_status,
    money,
    percent,
    report_date,
)
from projections.store import Store

if TYPE_CHECKING:
    from archive.application import ArchiveApp

CHECKLIST_LABELS = {
    ChecklistItem.CREDITOR_DEBTOR_RELATIONSHIP_CLEAR.value: "Creditor-debtor relationship clear",
    ChecklistItem.WILLINGNESS_TO_PAY.value: "Debtor willing to pay",
    ChecklistItem.CAPACITY_TO_PAY.value: "Debtor able to pay",
    ChecklistItem.VALID_ASSETS.value: "Debtor has valid assets",
    ChecklistItem.ASSET_DISPOSAL_FEASIBLE.value: "Disposal of assets feasible",
    ChecklistItem.LIABILITIES_INVESTIGATED.value: "Liabilities investigated",
}
RATIO = Decimal("0.0001")
CELL_CHARS_PER_MM = 8
"""At most this many characters per millimetre of a PDF table column: far less than a
page of height at the table's font sizes, whatever the letters."""


# -- JSON -----------------------------------------------------------------------------------------


def _history(
    events: Sequence[tuple[int, Any]], position: int, loan_id: str
) -> tuple[list[dict[str, Any]], str | None]:
    """The events up to ``position``, one summarised row each, and the loan file's chain
    head (its last event's hash) at that position."""
    seen: dict[str, dict[str, Any]] = {}
    rows = []
    head = None
    for pos, event in events:
        if pos > position:
            break
        aggregate = str(event.originator_id)
        fields = seen.setdefault(aggregate, {})
        qualname = type(event).__qualname__
        rows.append(
            {
                "position": pos,
                "time": iso_utc(event.timestamp),
                "actor": getattr(event, "actor_id", None),
                "role": getattr(event, "actor_role", None),
                "aggregate": qualname.split(".")[0],
                "aggregate_id": aggregate,
                "version": event.originator_version,
                "event": qualname,
                "reason": getattr(event, "reason", None),
                "summary": summarise(event, fields),
                "event_hash": getattr(event, "event_hash", None),
            }
        )
        for name, (_, after) in state_changes(event).items():
            fields[name] = after
        if aggregate == loan_id:
            head = getattr(event, "event_hash", None)
    return rows, head


def _changes(history: list[dict[str, Any]], events: Sequence[tuple[int, Any]], kind: str) -> list:
    """Status or classification changes, from the events in the history."""
    wanted = {row["position"] for row in history if row["event"] == kind}
    old, new = (
        ("old_status", "new_status")
        if kind.endswith("StatusChanged")
        else ("old_classification", "new_classification")
    )
    return [
        {
            "position": pos,
            "time": iso_utc(e.timestamp),
            "from": getattr(e, old),
            "to": getattr(e, new),
            "actor": e.actor_id,
            "reason": e.reason,
        }
        for pos, e in events
        if pos in wanted
    ]


def _valuation(row: dict[str, Any], loan: dict[str, Any], released: set[str]) -> dict[str, Any]:
    why_not = None
    if row["superseded_by"] is not None:
        why_not = "superseded"
    elif row["reviewed_value"] is None:
        why_not = "not reviewed"
    elif row["collateral_id"] is not None and row["collateral_id"] in released:
        why_not = "mortgage released"
    elif row["currency"] != loan["currency"]:
        why_not = f"in {row['currency']}, the loan is in {loan['currency']}"
    appraised = Decimal(row["appraised_value"])
    reviewed = None if row["reviewed_value"] is None else Decimal(row["reviewed_value"])
    return {
        "valuation_id": row["valuation_id"],
        "collateral_id": row["collateral_id"],
        "agency": row["agency"],
        "appraiser": row["appraiser"],
        "method": row["method"],
        "appraisal_date": row["appraisal_date"],
        "appraised_value": money(appraised),
        "reviewer": row["reviewer"],
        "reviewed_value": None if reviewed is None else money(reviewed),
        "cut_pct": None if reviewed is None else percent(appraised - reviewed, appraised),
        "currency": row["currency"],
        "overvalued": bool(row["overvalued"]),
        "revaluation_due": row["revaluation_due"],
        "superseded_by": row["superseded_by"],
        "counted": why_not is None,
        "not_counted_because": why_not,
    }


def coverage(valuations: list[dict[str, Any]], outstanding: Decimal) -> dict[str, Any]:
    value = sum((Decimal(v["reviewed_value"]) for v in valuations if v["counted"]), ZERO)
    ratio = None if outstanding == 0 else (value / outstanding).quantize(RATIO, ROUND_HALF_UP)
    return {
        "collateral_value": money(value),
        "outstanding": money(outstanding),
        "ratio": None if ratio is None else str(ratio),
        "percent": percent(value, outstanding),
        "valuations_counted": sum(1 for v in valuations if v["counted"]),
    }


def inspection_duty(row: dict[str, Any], day: date) -> dict[str, Any]:
    """The inspection status of the loan; only the recovery book owes monthly and
    quarterly inspections, so a performing or settled loan is never overdue (the PDF
    filed for a settled loan said both were OVERDUE)."""
    items = row["inspections"] or []
    status = inspection_status(items, day)
    required = row["status"] in RECOVERY_BOOK
    if not required:
        status.update({f"{kind}_overdue": False for kind in INSPECTION_MONTHS}, overdue=[])
    return {**status, "required": required, "items": items}


def loan_analysis(
    archive: ArchiveApp,
    store: Store,
    loan_number: str,
    as_of: date | None = None,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The analysis report of one loan as a JSON-ready dict (NotFoundError if the loan
    is not in the view)."""
    day = report_date(as_of)
    row = loan_files.get(store, loan_number)
    if row is None:
        raise NotFoundError(f"loan {loan_number} not found")
    position = int(row.pop("view_position"))
    events = archive.loan_events(loan_number)
    history, chain_head = _history(events, position, row["loan_id"])
    outstanding = Decimal(row["outstanding"])
    released = {c["registration_id"] for c in row["collateral"] if c["status"] == "released"}
    valuations = [_valuation(v, row, released) for v in row["valuations"]]
    actions = row["collection_actions"] or []
    investigation = row["investigation"]
    chain = archive.verify_loan_chain(loan_number)
    generated = (now or datetime.now(UTC)).astimezone(UTC)
    return {
        "report": "loan_analysis",
        "as_of": day.isoformat(),
        "position": position,
        "generated_at": iso_utc(generated),
        "loan": {
            key: row[key]
            for key in (
                "loan_number",
                "borrower_name",
                "borrower_national_id",
                "product",
                "village_group",
                "principal",
                "currency",
                "interest_rate",
                "term_months",
                "disbursement_date",
                "maturity_date",
                "branch",
                "status",
                "classification",
                "repaid",
                "recovered",
                "outstanding",
                "opened_at",
                "version",
            )
        },
        "officers": {
            "loan_officer": row["loan_officer"],
            "collection_officer": row["collection_officer"],
            "history": row["officer_history"] or [],
        },
        "investigation": None
        if investigation is None
        else {
            "investigated_on": investigation.get("investigated_on"),
            "investigated_by": investigation.get("investigated_by"),
            "notes": investigation.get("notes"),
            "checklist": [
                {
                    "item": item,
                    "label": label,
                    "answer": (investigation.get("checklist") or {}).get(item),
                }
                for item, label in CHECKLIST_LABELS.items()
            ],
        },
        "classification": {
            "current": row["classification"],
            "history": _changes(history, events, "LoanFile.Classified"),
        },
        "status_history": _changes(history, events, "LoanFile.StatusChanged"),
        "recovery": {
            "category": row["recovery_category"],
            "causes_of_default": row["causes_of_default"] or [],
            "plan": row["recovery_plan"],
        },
        "collection_actions": actions,
        "collection_summary": {
            "count": len(actions),
            "recovered": money(Decimal(row["recovered"])),
            "last_action_date": max((a["action_date"] for a in actions), default=None),
        },
        "repayments": row["repayments"] or [],
        "inspections": inspection_duty(row, day),
        "collateral": [
            {
                "registration_id": c["registration_id"],
                "cadastral_reference": c["cadastral_reference"],
                "address": c["address"],
                "owner": c["owner"],
                "registry_office": c["registry_office"],
                "registry_entry": c["registry_entry"],
                "lien_rank": c["lien_rank"],
                "secured_amount": c["secured_amount"],
                "currency": c["currency"],
                "status": c["status"],
                "repeated_mortgage": c["repeated_mortgage"] is not None,
                "site_verifications": c["site_verifications"] or [],
            }
            for c in row["collateral"]
        ],
        "valuations": valuations,
        "coverage": coverage(valuations, outstanding),
        "documents": [
            {
                "document_id": d["document_id"],
                "doc_type": d["doc_type"],
                "original_filename": d["original_filename"],
                "sha256": d["sha256"],
                "uploaded_at": d["uploaded_at"],
                "superseded_by": d["superseded_by"],
            }
            for d in row["documents"]
        ],
        "history": history,
        "chain_head": chain_head,
        "integrity": {
            "ok": chain.ok,
            "events_checked": chain.events_checked,
            "chains_checked": chain.aggregates_checked,
            "breach": None if chain.breach is None else str(chain.breach),
        },
    }


# -- PDF ----------------------------------------------------------------------------------------------

#: where Debian's fonts-dejavu-core puts the font with the widest coverage of Latin text
FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),
)

_REPLACEMENTS = {
    "\u2192": "->",  # rightwards arrow
    "\u2190": "<-",
    "\u2014": "-",  # em dash
    "\u2013": "-",  # en dash
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2026": "...",
    "\u20ac": "EUR",
    "\u2022": "*",
    "\u0141": "L",  # L with stroke
    "\u0142": "l",
    "\u0110": "D",
    "\u0111": "d",
    "\u0152": "OE",
    "\u0153": "oe",
}


def latin1(text: str) -> str:
    """Text a core PDF font can show: Latin-1 as it is (á, é, ñ, ü stay), everything
    else transliterated (accents stripped when the letter is outside Latin-1)."""
    out = []
    for ch in text:
        if ord(ch) < 256:
            out.append(ch)
        elif ch in _REPLACEMENTS:
            out.append(_REPLACEMENTS[ch])
        else:
            base = unicodedata.normalize("NFKD", ch).encode("latin-1", "ignore").decode("latin-1")
            out.append(base or codepoint(ch))
    return "".join(out)


def codepoint(ch: str) -> str:
    """A character no font of the report can draw, as ``[U+674E]``: a filed report must
    not show a borrower's name with letters silently dropped or turned into '?'."""
    return f"[U+{ord(ch):04X}]"


@functools.cache
def font_characters(path: str) -> frozenset[int]:
    """The code points a TrueType font has glyphs for."""
    from fontTools.ttLib import TTFont

    with TTFont(path, lazy=True) as font:
        return frozenset(font.getBestCmap())


def drawable(text: str, characters: frozenset[int]) -> str:
    """``text`` with what the embedded font lacks (CJK, most emoji) as code points; fpdf
    would only log a warning and leave the letters out of the page."""
    return "".join(ch if ord(ch) in characters or ch < " " else codepoint(ch) for ch in text)


def find_font() -> Path | None:
    for path in FONT_CANDIDATES:
        if path.is_file():
            return path
    return None


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value) or "-"
    return str(plain(value))


def _when(iso: str | None) -> str:
    """``2026-01-31T12:00:00.000000Z`` as ``2026-01-31 12:00:00``."""
    if not iso:
        return "-"
    return iso[:19].replace("T", " ")


def analysis_pdf(report: dict[str, Any], *, font: Path | str | None = "auto") -> bytes:
    """The analysis report as a PDF to file. ``font`` "auto": DejaVu Sans, embedded, when
    installed; a path: that TrueType font; None (or not found): a core font, which shows
    Latin-1 (Spanish accents included) and transliterates the rest. Whatever the font
    cannot draw is written as its code point (``[U+674E]``)."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    path = find_font() if font == "auto" else (None if font is None else Path(font))
    loan = report["loan"]
    footer_lines = (
        f"Generated {_when(report['generated_at'])} UTC - loan {loan['loan_number']} - "
        f"view position {report['position']}",
        f"Loan chain head: {report['chain_head'] or '-'}",
    )

    class Document(FPDF):
        def footer(self) -> None:
            self.set_y(-15)
            self.set_font(family, "", 7)
            self.set_text_color(90, 90, 90)
            for line in footer_lines:
                self.cell(0, 3.5, clean(line), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            self.cell(0, 3.5, f"Page {self.page_no()}/{{nb}}", align="R")
            self.set_text_color(0, 0, 0)

    pdf = Document(orientation="P", unit="mm", format="A4")
    if path is not None:
        family = "DejaVu"
        pdf.add_font(family, "", str(path))
        bold = Path(str(path)).with_name("DejaVuSans-Bold.ttf")
        pdf.add_font(family, "B", str(bold if bold.is_file() else path))

        characters = font_characters(str(path))

        def clean(text: str) -> str:
            return drawable(text, characters)

    else:
        family = "Helvetica"
        clean = latin1
    pdf.set_title(clean(f"Loan analysis {loan['loan_number']}"))
    pdf.set_author("loan-archive")
    pdf.set_subject(clean(f"Analysis report of loan {loan['loan_number']}"))
    pdf.set_creation_date(datetime.fromisoformat(report["generated_at"].replace("Z", "+00:00")))
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.set_margins(15, 15, 15)
    pdf.add_page()

    def heading(text: str) -> None:
        pdf.ln(3)
        pdf.set_font(family, "B", 11)
        pdf.cell(0, 7, clean(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font(family, "", 9)

    def para(text: str) -> None:
        pdf.multi_cell(0, 5, clean(text), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def table(
        header: Sequence[str] | None,
        rows: Sequence[Sequence[Any]],
        widths: Sequence[float],
        size: float = 8.5,
    ) -> None:
        pdf.set_font(family, "", size)
        with pdf.table(
            col_widths=tuple(widths),
            first_row_as_headings=header is not None,
            line_height=size * 0.5,
            text_align="LEFT",
        ) as t:
            for values in ([header] if header is not None else []) + list(rows):
                row = t.row()
                for value, width in zip(values, widths, strict=True):
                    row.cell(fit(clean(_text(value)), width))
        pdf.set_font(family, "", 9)
        while notes:
            para(notes.pop(0))

    notes: list[str] = []
    counter = iter(range(1, 1_000_000))

    def fit(text: str, width: float) -> str:
        """A cell's text, or its start and a note number when it is longer than a row
        can be: fpdf refuses a row taller than a page (a 2000-character reason or a
        long collection outcome made the whole PDF fail). The full text follows the
        table as that note, so nothing of the record is left out."""
        limit = max(int(width * CELL_CHARS_PER_MM), 40)
        if len(text) <= limit:
            return text
        n = next(counter)
        notes.append(f"[note {n}] {text}")
        return f"{text[: limit - 12]}... [note {n}]"

    # Title
    pdf.set_font(family, "B", 15)
    pdf.cell(
        0,
        9,
        clean(f"Loan analysis report - {loan['loan_number']}"),
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    pdf.set_font(family, "", 11)
    pdf.cell(0, 6, clean(loan["borrower_name"]), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font(family, "", 9)
    para(
        f"Report date {report['as_of']}; figures as of view position {report['position']}. "
        f"Chain verification: {'ok' if report['integrity']['ok'] else 'BREACH'} "
        f"({report['integrity']['events_checked']} events in "
        f"{report['integrity']['chains_checked']} chains)"
        + (f": {report['integrity']['breach']}" if report["integrity"]["breach"] else ".")
    )

    heading("Loan terms")
    cur = loan["currency"]
    table(
        None,
        [
            ("Loan number", loan["loan_number"], "Borrower", loan["borrower_name"]),
            ("National id", loan["borrower_national_id"], "Branch", loan["branch"]),
            ("Product", loan["product"], "Village group", loan["village_group"]),
            (
                "Principal",
                f"{loan['principal']} {cur}",
                "Interest rate",
                f"{loan['interest_rate']} %",
            ),
            ("Term", f"{loan['term_months']} months", "Disbursed", loan["disbursement_date"]),
            ("Matures", loan["maturity_date"], "Status", loan["status"]),
            ("Classification", loan["classification"], "Repaid", f"{loan['repaid']} {cur}"),
            (
                "Recovered",
                f"{loan['recovered']} {cur}",
                "Outstanding",
                f"{loan['outstanding']} {cur}",
            ),
        ],
        (30, 60, 30, 60),
    )

    heading("Officers")
    officers = report["officers"]
    para(
        f"Loan officer: {_text(officers['loan_officer'])}    "
        f"Collection officer: {_text(officers['collection_officer'])}"
    )
    if officers["history"]:
        table(
            ("Assigned", "Duty", "Officer", "Previous", "By"),
            [
                (
                    _when(h["assigned_at"]),
                    h["duty"],
                    h["officer"],
                    h["previous_officer"],
                    h["assigned_by"],
                )
                for h in officers["history"]
            ],
            (36, 22, 42, 42, 38),
        )

    heading("Investigation checklist")
    investigation = report["investigation"]
    if investigation is None:
        para("No investigation recorded.")
    else:
        para(
            f"Investigated on {investigation['investigated_on']} by "
            f"{investigation['investigated_by']}."
            + (f" Notes: {investigation['notes']}" if investigation["notes"] else "")
        )
        table(
            ("Item", "Answer"),
            [(c["label"], c["answer"]) for c in investigation["checklist"]],
            (120, 60),
        )

    heading("Classification and recovery")
    recovery = report["recovery"]
    para(
        f"Classification: {report['classification']['current']}    "
        f"Recovery category: {_text(recovery['category'])}"
    )
    if report["classification"]["history"]:
        table(
            ("Time (UTC)", "From", "To", "By", "Reason"),
            [
                (_when(c["time"]), c["from"], c["to"], c["actor"], c["reason"])
                for c in report["classification"]["history"]
            ],
            (34, 30, 30, 36, 50),
        )
    pdf.ln(1)
    para("Causes of default:")
    for cause in recovery["causes_of_default"] or ["none recorded"]:
        para(f"  - {cause}")
    plan = recovery["plan"]
    if plan is None:
        para("Recovery plan: none set.")
    else:
        para(
            f"Recovery plan: {plan['summary']} Target {plan['target_amount']} {cur} "
            f"by {plan['target_date']} (set by {plan['set_by']})."
        )

    heading("Collection actions")
    summary = report["collection_summary"]
    para(
        f"{summary['count']} actions; recovered {summary['recovered']} {cur}; "
        f"last action {_text(summary['last_action_date'])}."
    )
    if report["collection_actions"]:
        table(
            ("Date", "Kind", "Officer", "Outcome", f"Recovered ({cur})"),
            [
                (a["action_date"], a["kind"], a["officer"], a["outcome"], a["amount_recovered"])
                for a in report["collection_actions"]
            ],
            (24, 26, 34, 66, 30),
        )
    inspections = report["inspections"]
    para(
        (
            ""
            if inspections["required"]
            else "No inspections due (neither non-performing nor written off). "
        )
        + f"Inspections: last monthly {_text(inspections['last_monthly'])}"
        f"{' (OVERDUE)' if inspections['monthly_overdue'] else ''}; last quarterly "
        f"{_text(inspections['last_quarterly'])}"
        f"{' (OVERDUE)' if inspections['quarterly_overdue'] else ''}."
    )

    heading("Collateral and valuations")
    if report["collateral"]:
        table(
            ("Cadastral reference", "Address", "Rank", "Secured", "Status", "Repeated"),
            [
                (
                    c["cadastral_reference"],
                    c["address"],
                    c["lien_rank"],
                    f"{c['secured_amount']} {c['currency']}",
                    c["status"],
                    c["repeated_mortgage"],
                )
                for c in report["collateral"]
            ],
            (44, 46, 12, 30, 24, 24),
        )
    else:
        para("No collateral filed.")
    if report["valuations"]:
        pdf.ln(1)
        table(
            ("Agency", "Appraised", "Reviewed", "Cut %", "Overvalued", "Reval. due", "Counted"),
            [
                (
                    v["agency"],
                    f"{v['appraised_value']} {v['currency']}",
                    v["reviewed_value"],
                    v["cut_pct"],
                    v["overvalued"],
                    v["revaluation_due"],
                    "yes" if v["counted"] else f"no: {v['not_counted_because']}",
                )
                for v in report["valuations"]
            ],
            (36, 28, 22, 14, 22, 22, 36),
        )
    cov = report["coverage"]
    pdf.ln(1)
    pdf.set_font(family, "B", 9)
    para(
        f"Collateral coverage: {cov['percent'] + ' %' if cov['percent'] is not None else 'n/a'}"
        f" (ratio {_text(cov['ratio'])}): reviewed value {cov['collateral_value']} {cur} of "
        f"{cov['valuations_counted']} valuations in force / outstanding {cov['outstanding']} {cur}"
    )
    pdf.set_font(family, "", 9)

    heading("Event history")
    table(
        ("Pos.", "Time (UTC)", "Actor", "Event", "Reason"),
        [
            (
                h["position"],
                _when(h["time"]),
                h["actor"],
                f"{h['event']}: {h['summary']}",
                h["reason"],
            )
            for h in report["history"]
        ],
        (11, 33, 26, 80, 30),
        size=7.5,
    )
    return bytes(pdf.output())
