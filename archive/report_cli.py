"""``loan-archive reports ...``: the portfolio reports and the per-loan analysis report.

Each command authenticates like the other domain commands (``--token`` or
``ARCHIVE_TOKEN``; auditor, credit officer, compliance or admin), brings the views up to
the head of the log, and prints the report as JSON (default), with ``--format table``
(or ``--table``) as tables, or with ``--format csv`` as CSV on stdout, the rows the HTTP
route's ``format=csv`` answers. ``analysis --pdf FILE`` writes the PDF report to file
(``--pdf -``: to stdout).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from archive.domain import Role

reports_app = typer.Typer(
    help="Portfolio reports (NPLs, ledgers, collateral, concentration) and loan analyses.",
    no_args_is_help=True,
)

READERS = (Role.AUDITOR, Role.CREDIT_OFFICER, Role.COMPLIANCE, Role.ADMIN)

Token = Annotated[
    str, typer.Option(envvar="ARCHIVE_TOKEN", help="Bearer token.", show_default=False)
]
AsOf = Annotated[
    datetime | None,
    typer.Option(formats=["%Y-%m-%d"], help="Reporting date (YYYY-MM-DD); default today."),
]
Currency = Annotated[
    str | None, typer.Option(help="Only amounts in this currency (needed when mixed).")
]
AsTable = Annotated[bool, typer.Option("--table", help="Print tables instead of JSON.")]


class Output(StrEnum):
    JSON = "json"
    TABLE = "table"
    CSV = "csv"


OutputFormat = Annotated[
    Output | None,
    typer.Option(
        "--format",
        help="json (default), table, or csv: one row per line, to file in a spreadsheet.",
        show_default=False,
    ),
]


def _day(as_of: datetime | None) -> date | None:
    """The reporting date of ``--as-of`` (refused outside the dates a report can handle)."""
    from api.reports import EARLIEST_AS_OF, LATEST_AS_OF

    if as_of is not None and as_of.date() > LATEST_AS_OF:
        raise typer.BadParameter(f"reporting dates end at {LATEST_AS_OF}", param_hint="'--as-of'")
    if as_of is not None and as_of.date() < EARLIEST_AS_OF:
        raise typer.BadParameter(
            f"reporting dates start at {EARLIEST_AS_OF}", param_hint="'--as-of'"
        )
    return None if as_of is None else as_of.date()


@contextmanager
def views(token: str) -> Iterator[tuple[Any, Any]]:
    """The archive (caller checked) and its views brought up to the head of the log."""
    from archive.cli import archive, caller
    from archive.settings import load_settings
    from projections.runner import Projections

    with archive() as application:
        caller(application, token, *READERS)
        with Projections.open(load_settings(), application) as projections:
            projections.catch_up()
            yield application, projections.store


def _output(table: bool, chosen: Output | None) -> Output:
    """``--table`` is ``--format table``, kept as the short way; naming two is refused."""
    if table and chosen not in (None, Output.TABLE):
        raise typer.BadParameter(
            f"--table and --format {chosen}: choose one", param_hint="'--format'"
        )
    return Output.TABLE if table else chosen or Output.JSON


def _show(report: dict[str, Any], output: Output) -> None:
    from archive.cli import print_json
    from projections.reports import report_csv

    if output is Output.TABLE:
        print_tables(report)
    elif output is Output.CSV:
        typer.echo(report_csv(report), nl=False)
    else:
        print_json(report)


def _run(
    token: str, table: bool, chosen: Output | None, make: Callable[[Any], dict[str, Any]]
) -> None:
    output = _output(table, chosen)  # before any work: a bad combination is a usage error
    with views(token) as (_, store):
        report = make(store)
    _show(report, output)


# -- the commands -------------------------------------------------------------------------------


@reports_app.command("npl-portfolio")
def npl_portfolio(
    token: Token,
    as_of: AsOf = None,
    currency: Currency = None,
    table: AsTable = False,
    format: OutputFormat = None,
) -> None:
    """NPLs and write-offs by recovery category and five-tier classification."""
    from projections import reports

    _run(token, table, format, lambda s: reports.npl_portfolio(s, _day(as_of), currency))


@reports_app.command("officer-ledgers")
def officer_ledgers(
    token: Token,
    as_of: AsOf = None,
    currency: Currency = None,
    table: AsTable = False,
    format: OutputFormat = None,
) -> None:
    """Each loan officer's and collection officer's NPL ledger."""
    from projections import reports

    _run(token, table, format, lambda s: reports.officer_ledgers(s, _day(as_of), currency))


@reports_app.command("npl-gaps")
def npl_gaps(
    token: Token, as_of: AsOf = None, table: AsTable = False, format: OutputFormat = None
) -> None:
    """NPLs missing the loan officer, the collection officer or the investigation."""
    from projections import reports

    _run(token, table, format, lambda s: reports.npl_gaps(s, _day(as_of)))


@reports_app.command("repeated-mortgages")
def repeated_mortgages(
    token: Token, as_of: AsOf = None, table: AsTable = False, format: OutputFormat = None
) -> None:
    """Properties securing more than one live loan."""
    from projections import reports

    _run(token, table, format, lambda s: reports.repeated_mortgages(s, _day(as_of)))


@reports_app.command("overvaluation-by-agency")
def overvaluation_by_agency(
    token: Token,
    as_of: AsOf = None,
    currency: Currency = None,
    table: AsTable = False,
    format: OutputFormat = None,
) -> None:
    """Per appraisal agency: reviewed, flagged overvalued, share, average and max cut."""
    from projections import reports

    _run(token, table, format, lambda s: reports.overvaluation_by_agency(s, _day(as_of), currency))


@reports_app.command("revaluations-due")
def revaluations_due(
    token: Token,
    as_of: AsOf = None,
    days: Annotated[int, typer.Option(min=0, help="Look this many days ahead.")] = 30,
    table: AsTable = False,
    format: OutputFormat = None,
) -> None:
    """Valuations in force due for revaluation within DAYS, overdue first."""
    from projections import reports

    _run(token, table, format, lambda s: reports.revaluations_due(s, _day(as_of), days))


@reports_app.command("inspections-overdue")
def inspections_overdue(
    token: Token, as_of: AsOf = None, table: AsTable = False, format: OutputFormat = None
) -> None:
    """NPLs whose monthly or quarterly inspection is overdue."""
    from projections import reports

    _run(token, table, format, lambda s: reports.inspections_overdue(s, _day(as_of)))


@reports_app.command("concentration")
def concentration(
    token: Token,
    as_of: AsOf = None,
    top: Annotated[int, typer.Option(min=1, help="How many borrowers.")] = 10,
    currency: Currency = None,
    table: AsTable = False,
    format: OutputFormat = None,
) -> None:
    """The top borrowers by outstanding, with their shares of the live portfolio."""
    from projections import reports

    _run(token, table, format, lambda s: reports.concentration(s, _day(as_of), top, currency))


@reports_app.command("village-group-loans")
def village_group_loans(
    token: Token,
    as_of: AsOf = None,
    currency: Currency = None,
    table: AsTable = False,
    format: OutputFormat = None,
) -> None:
    """Village-group and cooperative loans by group."""
    from projections import reports

    _run(token, table, format, lambda s: reports.village_group_loans(s, _day(as_of), currency))


@reports_app.command("analysis")
def analysis(
    loan_number: str,
    token: Token,
    as_of: AsOf = None,
    pdf: Annotated[
        Path | None,
        typer.Option(help="Write the PDF report to this file instead (-: to stdout)."),
    ] = None,
    table: AsTable = False,
) -> None:
    """The analysis report of one loan: JSON, tables, or with --pdf a PDF to file."""
    from projections.analysis import analysis_pdf, loan_analysis

    if pdf is not None and table:  # --table was dropped without a word
        raise typer.BadParameter("--pdf and --table: choose one", param_hint="'--pdf'")
    with views(token) as (application, store):
        report = loan_analysis(application, store, loan_number, _day(as_of))
    if pdf is None:
        _show(report, Output.TABLE if table else Output.JSON)
        return
    content = analysis_pdf(report)
    where = f"{pdf}"
    if where == "-":  # as -d - reads stdin (it wrote a file named '-')
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
        where = "the PDF to stdout"
    else:
        pdf.write_bytes(content)
    typer.echo(f"wrote {where} (chain head {report['chain_head']})", err=True)


# -- tables -------------------------------------------------------------------------------------

Column = tuple[str, str]  # (heading, key)

_LISTS: dict[str, list[tuple[str, str, list[Column]]]] = {
    # report -> [(title, key of the list, columns)]
    "npl_gaps": [
        (
            "NPLs with gaps",
            "items",
            [
                ("Loan", "loan_number"),
                ("Borrower", "borrower_name"),
                ("Status", "status"),
                ("Missing", "missing"),
            ],
        )
    ],
    "revaluations_due": [
        (
            "Revaluations due",
            "items",
            [
                ("Due", "revaluation_due"),
                ("Days", "days_until_due"),
                ("Loan", "loan_number"),
                ("Borrower", "borrower_name"),
                ("Agency", "agency"),
                ("Appraised", "appraised_value"),
                ("Reviewed", "reviewed_value"),
                ("Cur.", "currency"),
            ],
        )
    ],
    "inspections_overdue": [
        (
            "Inspections overdue",
            "items",
            [
                ("Loan", "loan_number"),
                ("Borrower", "borrower_name"),
                ("Collection officer", "collection_officer"),
                ("Last monthly", "last_monthly"),
                ("Last quarterly", "last_quarterly"),
                ("Overdue", "overdue"),
            ],
        )
    ],
    "overvaluation_by_agency": [
        (
            "Overvaluation by appraisal agency",
            "agencies",
            [
                ("Agency", "agency"),
                ("Appraisals", "appraisals"),
                ("Reviewed", "reviewed"),
                ("Overvalued", "overvalued"),
                ("Share %", "overvalued_share"),
                ("Avg cut", "average_cut"),
                ("Max cut", "max_cut"),
                ("Avg cut %", "average_cut_pct"),
                ("Max cut %", "max_cut_pct"),
            ],
        )
    ],
    "concentration": [
        (
            "Borrower concentration",
            "items",
            [
                ("#", "rank"),
                ("National id", "national_id"),
                ("Borrower", "borrower_name"),
                ("Loans", "loans"),
                ("Outstanding", "outstanding"),
                ("Share %", "share"),
                ("Cumulative %", "cumulative_share"),
            ],
        )
    ],
}

_LEDGER: list[Column] = [
    ("Loan", "loan_number"),
    ("Borrower", "borrower_name"),
    ("Status", "status"),
    ("Category", "recovery_category"),
    ("Outstanding", "outstanding"),
    ("Actions", "collection_actions"),
    ("Last action", "last_action_date"),
    ("Recovered", "recovered"),
]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def _table(title: str, columns: list[Column], rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for heading, _ in columns:
        table.add_column(heading, overflow="fold")  # too narrow a terminal folds, never elides
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for _, key in columns))
    return table


def tables(report: dict[str, Any]) -> list[Any]:
    """The report as rich tables: a heading line of its scalar figures, then its lists."""
    name = report["report"]
    out: list[Any] = []
    if name == "npl_portfolio":
        for section in ("non_performing", "written_off"):
            part = report[section]
            for key, label in (
                ("by_recovery_category", "recovery_category"),
                ("by_classification", "classification"),
            ):
                out.append(
                    _table(
                        f"{section} by {label}: {part['count']} loans, "
                        f"{part['outstanding']} outstanding",
                        [(label, label), ("Loans", "count"), ("Outstanding", "outstanding")],
                        part[key],
                    )
                )
    elif name == "officer_ledgers":
        for duty in ("loan_officers", "collection_officers"):
            for ledger in report[duty]:
                out.append(
                    _table(
                        f"{duty[:-1].replace('_', ' ')} {ledger['officer']}: {ledger['count']} "
                        f"loans, {ledger['outstanding']} outstanding, "
                        f"{ledger['collection_actions']} actions, {ledger['recovered']} recovered",
                        _LEDGER,
                        ledger["loans"],
                    )
                )
    elif name == "repeated_mortgages":
        for prop in report["properties"]:
            out.append(
                _table(
                    f"{prop['cadastral_reference']} ({prop['address']}): "
                    f"{prop['total_secured']} secured",
                    [
                        ("Rank", "lien_rank"),
                        ("Loan", "loan_number"),
                        ("Borrower", "borrower_name"),
                        ("Secured", "secured_amount"),
                        ("Registration", "registration_status"),
                        ("Flagged", "flagged"),
                    ],
                    prop["liens"],
                )
            )
    elif name == "village_group_loans":
        for group in report["groups"]:
            out.append(
                _table(
                    f"{group['group']}: {group['count']} loans, {group['outstanding']} "
                    f"outstanding, {group['npl_count']} NPLs ({group['npl_outstanding']})",
                    [
                        ("Loan", "loan_number"),
                        ("Borrower", "borrower_name"),
                        ("Status", "status"),
                        ("Outstanding", "outstanding"),
                        ("NPL", "npl"),
                        ("Actions", "collection_actions"),
                        ("Last action", "last_action_date"),
                    ],
                    group["loans"],
                )
            )
    elif name == "loan_analysis":
        loan = report["loan"]
        out.append(
            _table(
                f"Loan {loan['loan_number']}",
                [("Field", "field"), ("Value", "value")],
                [{"field": k, "value": v} for k, v in loan.items()]
                + [
                    {"field": "coverage %", "value": report["coverage"]["percent"]},
                    {"field": "chain head", "value": report["chain_head"]},
                ],
            )
        )
        out.append(
            _table(
                "History",
                [
                    ("Pos.", "position"),
                    ("Time", "time"),
                    ("Actor", "actor"),
                    ("Event", "event"),
                    ("Summary", "summary"),
                    ("Reason", "reason"),
                ],
                report["history"],
            )
        )
    for title, key, columns in _LISTS.get(name, []):
        out.append(_table(title, columns, report[key]))
    return out


def _scalar(value: Any) -> bool:
    return not isinstance(value, dict | list) or all(not isinstance(v, dict | list) for v in value)


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The report's figures that no table shows, for the heading line: its scalars, and
    those of its objects as ``object.key`` (the totals, the loans without an officer,
    the chain check), which the tables alone left out."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if key in ("report", "loan"):  # the name starts the line; the loan has its table
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if _scalar(v)})
        elif _scalar(value) and not isinstance(value, list):
            out[key] = value
    return out


PIPED_WIDTH = 1000
"""Columns of the console when stdout is not a terminal: tables take only what they need."""


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped or redirected: rich would assume 80 columns and cut figures short.
        console = Console(width=PIPED_WIDTH)
    console.print(
        f"[bold]{report['report']}[/bold]  "
        + "  ".join(f"{k}={_cell(v)}" for k, v in figures(report).items())
    )
    for table in tables(report):
        console.print(table)
