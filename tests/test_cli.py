"""The real ``loan-archive`` console script, run as a subprocess on both backends.

Each CLI call costs a process start, so state the CLI is not under test for is set up
in-process through the ``archive`` fixture, which shares the CLI's database.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
import typer
from factories import appraisal_fields, loan_terms, mortgage_fields, upload
from ocr_fixtures import DEED_LINES, png, scanned_page, text_pdf
from psycopg.sql import SQL, Identifier

from archive import cli
from archive.application import ArchiveApp, Principal, operator_context
from archive.domain import CommandContext, Role
from archive.exceptions import AuthenticationError, NotFoundError
from archive.loans import loan_id
from archive.settings import Settings
from archive.users import user_id
from archive.worker import ExtractionWorker
from projections import registry
from projections.store import open_store

CLI = Path(__file__).parents[1] / ".venv/bin/loan-archive"

OPEN_LOAN = {
    "loan_number": "CR-1",
    "borrower_name": "Ana Pérez Núñez",
    "borrower_national_id": "12345678Z",
    "product": "mortgage",
    "principal": "100000.00",
    "currency": "EUR",
    "interest_rate": "3.50",
    "term_months": 240,
    "disbursement_date": "2024-01-15",
    "maturity_date": "2044-01-15",
    "branch": "Teruel",
    "reason": "new mortgage",
}


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_")}
    env["ARCHIVE_DATA_DIR"] = str(settings.data_dir)
    if settings.database_url:
        env["ARCHIVE_DATABASE_URL"] = settings.database_url
    env.update(extra)
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args],
        env=env,
        cwd=env["ARCHIVE_DATA_DIR"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """A failed call: non-zero exit, nothing on stdout, exactly one line on stderr."""
    assert result.returncode != 0, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("loan-archive: "), lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _the_console_script_is_installed() -> None:
    assert CLI.exists(), f"{CLI} is missing: run `make install`"


def test_users_add_prints_a_working_token_alone(settings: Settings, archive: ArchiveApp) -> None:
    result = run(cli_env(settings), "users", "add", "ana.officer", "--role", "credit_officer")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    token = lines[0]
    assert token.startswith("la_") and token == token.strip()
    assert archive.authenticate(token) == Principal("ana.officer", Role.CREDIT_OFFICER)
    user = archive.get_user("ana.officer")
    assert user.role == "credit_officer" and user.active


def test_loan_commands_show_and_history(settings: Settings, archive: ArchiveApp) -> None:
    token = archive.add_user(operator_context(), "ana.officer", "credit_officer")
    env = cli_env(settings)

    opened = run(env, "loans", "open", "--token", token, "-d", json.dumps(OPEN_LOAN))
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["version"] == 1
    assert json.loads(opened.stdout)["id"] == str(loan_id("CR-1"))

    changed = run(
        env, "loans", "do", "CR-1", "status", "--token", token, "-d", '{"status":"overdue"}'
    )
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["version"] == 2
    assert archive.get_loan("CR-1").status == "overdue"

    # The token may come from the environment too.
    shown = run({**env, "ARCHIVE_TOKEN": token}, "loans", "show", "CR-1", "--version", "1")
    assert shown.returncode == 0, shown.stderr
    past = json.loads(shown.stdout)
    assert (past["version"], past["status"]) == (1, "performing")
    assert past["principal"] == "100000.00"
    # Named as over HTTP (and as the loan list names them).
    assert (past["loan_id"], past["borrower_name"]) == (str(loan_id("CR-1")), "Ana Pérez Núñez")

    history = run(env, "history", "CR-1", "--token", token)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert len(lines) == 2, history.stdout
    assert "LoanFile.Opened" in lines[0] and "v1" in lines[0] and "(new mortgage)" in lines[0]
    assert "LoanFile.StatusChanged" in lines[1] and "v2" in lines[1]
    # What changed, from the event itself (the hash chain is left to `verify`).
    assert "old_status=performing  new_status=overdue" in lines[1], lines[1]
    assert "principal=100000.00" in lines[0] and "hash" not in history.stdout, lines[0]
    for line in lines:
        assert "ana.officer [credit_officer]" in line
    positions = [int(line.split()[0]) for line in lines]
    assert positions == sorted(positions)


def test_history_is_one_line_per_event_whatever_the_reason(
    settings: Settings, archive: ArchiveApp
) -> None:
    """A reason written over several lines (a JSON file's "\\n") split its event's line
    in two: a script reading one event per line read half an event."""
    officer = CommandContext("ana", "credit_officer", reason="new mortgage\napproved by board")
    archive.open_loan(officer, **loan_terms("CR-1"))
    overdue = CommandContext("ana", "credit_officer", reason="three missed\r\ninstalments\u2028")
    archive.change_loan(overdue, "CR-1", 1, lambda loan: loan.change_status(overdue, "overdue"))
    token = archive.add_user(operator_context(), "raul.auditor", "auditor")

    history = run(cli_env(settings), "history", "CR-1", "--token", token)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert len(lines) == 2, history.stdout
    assert "(new mortgage approved by board)" in lines[0], lines[0]
    assert "(three missed instalments)" in lines[1], lines[1]


def test_projections_status_shows_the_lag_as_it_is(settings: Settings, archive: ArchiveApp) -> None:
    """Status reports, it does not catch up: a view that is behind (or stuck) shows it."""
    ctx = CommandContext("ana", "credit_officer")
    archive.open_loan(ctx, **loan_terms("CR-1"))
    archive.open_loan(ctx, **loan_terms("CR-2"))
    env = cli_env(settings)

    shown = run(env, "projections", "status")
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line.split() for line in shown.stdout.splitlines()}
    head = archive.head_position()
    assert lines["loan_files"][-1] == str(head)  # lag: nothing followed yet
    assert run(env, "projections", "rebuild").returncode == 0
    with open_store(settings) as store, store.read() as tx:
        # The first generations were replaced as they were, not caught up first.
        assert [(g.generation, g.position) for g in registry.generations(tx, "loan_files")] == [
            (1, 0),
            (2, head),
        ]
    after = {
        line.split()[0]: line.split()
        for line in run(env, "projections", "status").stdout.splitlines()
    }
    assert after["loan_files"][-1] == "0"
    # The same in two processes (one per share of the views), started from the CLI.
    archive.open_loan(ctx, **loan_terms("CR-3"))
    rebuilt = run(env, "projections", "rebuild", "--processes", "2")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "loan_files: generation 3 is active" in rebuilt.stdout
    # Piped, the output is those lines alone: the progress bar left a blank line first.
    assert rebuilt.stderr == "", rebuilt.stderr
    assert all(line.endswith(" is active") for line in rebuilt.stdout.splitlines()), rebuilt
    after = {
        line.split()[0]: line.split()
        for line in run(env, "projections", "status").stdout.splitlines()
    }
    assert after["loan_files"][-1] == after["audit_trail"][-1] == "0"
    assert one_error_line(run(env, "projections", "rebuild", "--processes", "0"))


def test_refused_commands_exit_non_zero_with_one_line(
    settings: Settings, archive: ArchiveApp
) -> None:
    token = archive.add_user(operator_context(), "ana.officer", "credit_officer")
    auditor = archive.add_user(operator_context(), "raul.auditor", "auditor")
    archive.open_loan(CommandContext("ana.officer", "credit_officer"), **loan_terms("CR-1"))
    env = cli_env(settings)

    forbidden = run(
        env, "loans", "do", "CR-1", "status", "--token", token, "-d", '{"status":"written_off"}'
    )
    line = one_error_line(forbidden)
    assert "written_off" in line
    assert archive.get_loan("CR-1").version == 1

    body = json.dumps({**OPEN_LOAN, "loan_number": "CR-2"})
    refused = run(env, "loans", "open", "--token", auditor, "-d", body)
    assert "auditor" in one_error_line(refused)
    with pytest.raises(NotFoundError):
        archive.get_loan("CR-2")

    # A valid ISO moment with no UTC form is one line too, not a traceback.
    for moment in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+14:00"):
        shown = run(env, "loans", "show", "CR-1", "--token", token, "--as-of", moment)
        assert "outside the calendar" in one_error_line(shown)
    # A moment still to come is one line naming it.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    shown = run(env, "loans", "show", "CR-1", "--token", token, "--as-of", tomorrow)
    line = one_error_line(shown)
    assert "in the future" in line and tomorrow[:19] in line, line


def test_a_report_as_csv_goes_to_stdout_and_a_bad_format_is_one_line(
    settings: Settings, archive: ArchiveApp
) -> None:
    auditor = archive.add_user(operator_context(), "raul.auditor", "auditor")
    archive.open_loan(CommandContext("ana.officer", "credit_officer"), **loan_terms("CR-1"))
    env = cli_env(settings, ARCHIVE_TOKEN=auditor)

    sheet = run(env, "reports", "concentration", "--format", "csv")
    assert sheet.returncode == 0 and sheet.stderr == "", sheet
    header, row = sheet.stdout.splitlines()
    assert header.startswith("rank,national_id,borrower_name,loans,outstanding,")
    assert row.startswith("1,12345678Z,Ana Pérez Núñez,CR-1,100000.00,100.00,100.00,"), row

    unknown = run(env, "reports", "concentration", "--format", "xml")
    line = one_error_line(unknown)
    assert "--format" in line and "'xml' is not one of 'json', 'table', 'csv'" in line, line
    both = run(env, "reports", "npl-gaps", "--table", "--format", "csv")
    assert "--table and --format csv: choose one" in one_error_line(both)


def test_the_analysis_pdf_goes_to_a_file_or_with_a_dash_to_stdout(
    settings: Settings, archive: ArchiveApp, tmp_path: Path
) -> None:
    """'--pdf -' wrote a file named '-' in the working directory and nothing to the pipe;
    --table beside --pdf was dropped without a word."""
    auditor = archive.add_user(operator_context(), "raul.auditor", "auditor")
    archive.open_loan(CommandContext("ana.officer", "credit_officer"), **loan_terms("CR-1"))
    env = cli_env(settings, ARCHIVE_TOKEN=auditor)

    to_file = run(env, "reports", "analysis", "CR-1", "--pdf", str(tmp_path / "cr-1.pdf"))
    assert to_file.returncode == 0 and to_file.stdout == "", to_file
    assert (tmp_path / "cr-1.pdf").read_bytes().startswith(b"%PDF-")
    piped = subprocess.run(
        [str(CLI), "reports", "analysis", "CR-1", "--pdf", "-"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(b"%PDF-") and piped.stdout.rstrip().endswith(b"%%EOF")
    assert piped.stderr.startswith(b"wrote the PDF to stdout (chain head ")
    assert not (tmp_path / "-").exists()
    both = run(env, "reports", "analysis", "CR-1", "--pdf", str(tmp_path / "b.pdf"), "--table")
    assert "--pdf and --table: choose one" in one_error_line(both)
    assert not (tmp_path / "b.pdf").exists()


def tamper(settings: Settings, archive: ArchiveApp, aggregate: str, version: int) -> None:
    """Flip one bit of one stored event behind the archive's back (case of a letter in
    its status), disabling the append-only trigger first."""

    def flipped(state: bytes) -> bytes:
        at = state.index(b'"overdue"') + 1
        changed = bytearray(state)
        changed[at] ^= 0x20
        return bytes(changed)

    table = archive.recorder.events_table_name
    if settings.backend == "sqlite":
        db = sqlite3.connect(settings.sqlite_path)
        try:
            db.execute(f"DROP TRIGGER {table}_no_update")
            key = (aggregate.replace("-", ""), version)
            where = "WHERE originator_id = ? AND originator_version = ?"
            (state,) = db.execute(f"SELECT state FROM {table} {where}", key).fetchone()
            db.execute(f"UPDATE {table} SET state = ? {where}", (flipped(state), *key))
            db.commit()
        finally:
            db.close()
    else:
        assert settings.database_url is not None
        name = Identifier(archive.recorder.datastore.schema, table)
        with psycopg.connect(settings.database_url) as db:
            db.execute(SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(name))
            where = SQL("WHERE originator_id = %s AND originator_version = %s")
            key = (aggregate, version)
            row = db.execute(SQL("SELECT state FROM {} ").format(name) + where, key).fetchone()
            assert row is not None
            db.execute(
                SQL("UPDATE {} SET state = %s ").format(name) + where,
                (flipped(bytes(row[0])), *key),
            )


def test_verify_passes_then_names_the_tampered_event(
    settings: Settings, archive: ArchiveApp, officer: CommandContext
) -> None:
    archive.open_loan(officer, **loan_terms("CR-1"))
    archive.change_loan(officer, "CR-1", 1, lambda loan: loan.change_status(officer, "overdue"))
    archive.change_loan(officer, "CR-1", 2, lambda loan: loan.classify(officer, "doubtful"))
    env = cli_env(settings)

    clean = run(env, "verify")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("ok"), clean.stdout

    aggregate = str(loan_id("CR-1"))
    tamper(settings, archive, aggregate, 2)
    broken = run(env, "verify")
    assert broken.returncode == 1, broken
    line = one_error_line(broken)
    assert aggregate in line, line
    assert "v2" in line.split(), line


def test_verify_originals_refuses_a_loan_it_would_ignore(
    settings: Settings, archive: ArchiveApp
) -> None:
    """'verify --originals --loan CR-1' re-hashed every original of the archive and
    recorded a fixity event on each, --loan silently ignored."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    upload(archive, text_pdf([DEED_LINES[:2]]), "a.pdf")
    auditor = archive.add_user(operator_context(), "raul.auditor", "auditor")
    head = archive.head_position()
    result = run(cli_env(settings), "verify", "--originals", "--loan", "CR-1", "--token", auditor)
    assert "--originals checks every original" in one_error_line(result)
    assert archive.head_position() == head


@pytest.mark.parametrize("command", [("worker",), ("serve", "--with-worker", "--port", "1")])
def test_a_worker_refuses_ocr_languages_tesseract_lacks(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Rather than start and fail every scan, one line names the variable (exit 2)."""
    env = cli_env(Settings(data_dir=tmp_path, demo_data=False), ARCHIVE_OCR_LANGUAGES="spa+tlh")
    result = run(env, *command)
    line = one_error_line(result)
    assert result.returncode == 2, result
    assert "ARCHIVE_OCR_LANGUAGES" in line and "tlh" in line, line
    assert "spa" not in line.split("installed")[0], line


def test_reindex_all_failed_takes_failed_documents_and_pages(
    settings: Settings, archive: ArchiveApp
) -> None:
    """A document whose pages all failed is "done" but unsearchable: it is retried too."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))

    scan = png(scanned_page(DEED_LINES[:4], dpi=150).image)
    clean = upload(archive, text_pdf([DEED_LINES[:6]]), "escritura.pdf")
    broken = upload(archive, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "roto.pdf")
    cut = upload(archive, scan[: len(scan) // 2], "cortado.png")
    with open_store(settings) as store:
        assert ExtractionWorker(archive, store, name="ocr@test").run_once() == 3
    assert archive.get_document(broken).extraction["status"] == "failed"
    partial = archive.get_document(cut).extraction
    assert (partial["status"], partial["failed_pages"]) == ("done", 1)

    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    result = run(cli_env(settings), "reindex", "--all-failed", "--token", token)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reindex requested for 2 documents"
    assert archive.get_document(clean).extraction["status"] == "done"
    for retried in (broken, cut):
        assert archive.get_document(retried).extraction["status"] not in ("done", "failed")


def test_search_pages_through_every_hit_with_date_filters(
    settings: Settings, archive: ArchiveApp
) -> None:
    """'N pages match' showed the first --limit hits and no way to the rest (no
    --offset), nor the upload-date filters HTTP has."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    archivist = CommandContext("ines.archivist", "archivist")
    for name, lines in (("a.pdf", DEED_LINES[:4]), ("b.pdf", DEED_LINES[1:5])):
        archive.register_document(
            archivist,
            io.BytesIO(text_pdf([lines])),
            loan_number="CR-1",
            doc_type="mortgage_deed",
            original_filename=name,
        )
    with open_store(settings) as store:
        assert ExtractionWorker(archive, store, name="ocr@test").run_once() == 2
    token = archive.add_user(operator_context(), "c.compliance", "compliance")
    env = cli_env(settings, ARCHIVE_TOKEN=token)
    today = datetime.now(UTC).date()

    first = run(env, "search", "teruel", "--limit", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "2 pages match; hits 1-1 shown; next: --offset 1"
    second = run(env, "search", "teruel", "--limit", "1", "--offset", "1")
    assert second.stdout.splitlines()[0] == "2 pages match; hits 2-2 shown"
    assert first.stdout.splitlines()[1] != second.stdout.splitlines()[1]
    one = run(env, "search", "comparecen", "--uploaded-from", today.isoformat())
    assert one.stdout.splitlines()[0] == "1 page matches", one.stderr
    none = run(env, "search", "teruel", "--uploaded-to", (today - timedelta(days=1)).isoformat())
    assert none.stdout == "0 pages match\n", none.stderr
    reversed_ = run(
        env, "search", "teruel", "--uploaded-from", "2025-02-01", "--uploaded-to", "2025-01-01"
    )
    assert "uploaded_from 2025-02-01 is after uploaded_to 2025-01-01" in one_error_line(reversed_)
    excluded = run(env, "search", "--", "teruel -comparecen")
    assert excluded.stdout.splitlines()[0] == "1 page matches", excluded.stderr
    # A query that starts with an exclusion needs no "--" (it is not an option).
    leading = run(env, "search", "-comparecen teruel", "--limit", "5")
    assert leading.stdout.splitlines()[0] == "1 page matches", leading.stderr
    mistyped = run(env, "search", "teruel", "--lone", "CR-1")
    assert "unexpected extra argument" in one_error_line(mistyped)
    # Pages of at most 100 hits, as over HTTP (GET /api/v1/search?limit=101 is a 422).
    assert "100" in one_error_line(run(env, "search", "teruel", "--limit", "101"))


def test_import_a_folder_then_again_skips_what_is_archived(
    settings: Settings, archive: ArchiveApp, tmp_path: Path
) -> None:
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    scans = tmp_path / "scans"
    (scans / "2024").mkdir(parents=True)
    (scans / "escritura.pdf").write_bytes(text_pdf([DEED_LINES[:6]]))
    (scans / "2024" / "nota-simple.png").write_bytes(
        png(scanned_page(DEED_LINES[:3], dpi=100).image)
    )
    # What desktops and scanners leave in a folder is not an original: passed over.
    (scans / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (scans / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (scans / ".cache").mkdir()
    (scans / ".cache" / "escritura.pdf").write_bytes(text_pdf([DEED_LINES[6:9]]))
    env = cli_env(settings)
    args = ("import", str(scans), "--loan", "CR-1", "--type", "registry_certificate")

    first = run(env, *args, "--token", token)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "imported 2, skipped 0 already archived, failed 0"
    index = archive.loan_documents("CR-1")
    assert index is not None and len(index.documents) == 2
    (scans / "informe.txt").write_text("not an original")
    again = run(env, *args, "--token", token)
    assert again.returncode == 1  # the text file is refused, the rest skipped
    assert again.stdout.strip() == "imported 0, skipped 2 already archived, failed 1"
    assert "informe.txt" in again.stderr and "415" not in again.stderr


def test_import_files_whose_names_are_not_utf8(
    settings: Settings, archive: ArchiveApp, tmp_path: Path
) -> None:
    """A Latin-1 name (an old Windows share) stopped the import at that file with a
    traceback (its bytes could not go into the event), every run: the files after it
    were never imported."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / os.fsdecode(b"acu\xf1a.pdf")).write_bytes(text_pdf([DEED_LINES[:2]]))
    (scans / "zona.pdf").write_bytes(text_pdf([DEED_LINES[2:4]]))
    args = ("import", str(scans), "--loan", "CR-1", "--type", "contract", "--token", token)

    result = run(cli_env(settings), *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "imported 2, skipped 0 already archived, failed 0\n"
    index = archive.loan_documents("CR-1")
    assert index is not None
    names = sorted(archive.get_document(d).original_filename for d in index.document_ids())
    assert names == ["acu\ufffda.pdf", "zona.pdf"]  # as HTTP decodes such a name
    assert run(cli_env(settings), *args).stdout.startswith("imported 0, skipped 2")


def test_import_names_a_link_whose_original_is_gone(
    settings: Settings, archive: ArchiveApp, tmp_path: Path
) -> None:
    """A scan linked from a share that is not mounted was passed over without a word:
    'imported 1, failed 0' for a folder of two."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.pdf").write_bytes(text_pdf([DEED_LINES[:2]]))
    (scans / "b.pdf").symlink_to(tmp_path / "share" / "b.pdf")
    args = ("import", str(scans), "--loan", "CR-1", "--type", "contract", "--token", token)
    result = run(cli_env(settings), *args)
    assert f"no file {scans / 'b.pdf'}: nothing imported" in one_error_line(result)
    assert archive.loan_documents("CR-1") is None


@pytest.mark.parametrize(
    ("loan", "doc_type", "message"),
    [
        ("CR-404", "contract", "no loan file CR-404: nothing imported"),
        ("CR-1", "selfie", "unknown document type 'selfie'"),
    ],
)
def test_import_refuses_an_unknown_loan_or_type_before_any_upload(
    settings: Settings, archive: ArchiveApp, tmp_path: Path, loan: str, doc_type: str, message: str
) -> None:
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    (tmp_path / "a.pdf").write_bytes(text_pdf([DEED_LINES[:2]]))
    (tmp_path / "b.pdf").write_bytes(text_pdf([DEED_LINES[2:4]]))
    result = run(
        cli_env(settings),
        "import",
        str(tmp_path),
        "--loan",
        loan,
        "--type",
        doc_type,
        "--token",
        token,
    )
    assert message in one_error_line(result)
    assert archive.loan_documents("CR-1") is None


def test_import_reads_a_spreadsheet_manifest(
    settings: Settings, archive: ArchiveApp, tmp_path: Path
) -> None:
    """Excel's "CSV UTF-8" in a Spanish locale: a byte-order mark, semicolons, spaces
    around fields, an extra column and a blank line; stdout is the summary alone."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    (tmp_path / "a.pdf").write_bytes(text_pdf([DEED_LINES[:2]]))
    (tmp_path / "b.pdf").write_bytes(text_pdf([DEED_LINES[2:4]]))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "\ufeffpath;loan_number;doc_type;notes\r\n"
        "a.pdf ; CR-1 ; contract;firmado\r\n\r\n"
        "b.pdf;CR-1;mortgage_deed;\r\n",
        encoding="utf-8",
    )
    result = run(cli_env(settings), "import", "--manifest", str(manifest), "--token", token)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "imported 2, skipped 0 already archived, failed 0\n"
    index = archive.loan_documents("CR-1")
    assert index is not None and len(index.documents) == 2


def test_a_file_listed_under_two_types_is_filed_as_both_and_stored_once(
    settings: Settings, archive: ArchiveApp, tmp_path: Path
) -> None:
    """A deed that is both the loan contract and the mortgage deed, listed once per type:
    the second line was skipped as "already archived" (same SHA-256 for the loan) and its
    type silently lost. Each line is a document now, over one stored object; what the
    loan holds as that type is still skipped on a second run."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "escritura.pdf").write_bytes(text_pdf([DEED_LINES[:4]]))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,loan_number,doc_type\n"
        "scans/escritura.pdf,CR-1,contract\n"
        "scans/escritura.pdf,CR-1,mortgage_deed\n",
        encoding="utf-8",
    )
    env = cli_env(settings)
    args = ("import", "--manifest", str(manifest), "--token", token)

    first = run(env, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "imported 2, skipped 0 already archived, failed 0\n"
    index = archive.loan_documents("CR-1")
    assert index is not None
    documents = [archive.get_document(d) for d in index.document_ids()]
    assert sorted(d.doc_type for d in documents) == ["contract", "mortgage_deed"]
    assert len({d.id for d in documents}) == 2
    assert len({(d.sha256, d.object_key) for d in documents}) == 1  # one stored original

    again = run(env, *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "imported 0, skipped 2 already archived, failed 0\n"
    folder = ("import", str(scans), "--loan", "CR-1", "--token", token)
    as_contract = run(env, *folder, "--type", "contract")
    assert as_contract.returncode == 0, as_contract.stderr
    assert as_contract.stdout == "imported 0, skipped 1 already archived, failed 0\n"
    assert len(archive.loan_documents("CR-1").document_ids()) == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"path,loan_number,doc_type\nb.pdf,CR-1,contract\na.pdf,CR-1\n",
            "manifest line 3 has 2 fields, the header 3",
        ),
        (
            b"path,loan_number,doc_type\nb.pdf,CR-1,contract\n,CR-1,contract\n",
            "manifest line 3 has no path",
        ),
        (
            b"path,loan_number,doc_type\nb.pdf,CR-1,contract\nnope.pdf,CR-1,contract\n",
            "nope.pdf: nothing imported",
        ),
        (b"file,loan,type\nb.pdf,CR-1,contract\n", "(missing path, loan_number, doc_type)"),
        (b"", "the manifest needs the columns path, loan_number, doc_type"),
        (
            b"path,loan_number,doc_type\nb.pdf,CR-1,contract\nacu\xf1a.pdf,CR-1,contract\n",
            "is not UTF-8 text",
        ),
    ],
)
def test_a_bad_manifest_is_one_line_and_imports_nothing(
    settings: Settings, archive: ArchiveApp, tmp_path: Path, content: bytes, message: str
) -> None:
    """Short rows, empty fields, missing files, wrong headers and Latin-1 text were a
    cryptic 'unknown document type None', one file's failure or a traceback."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    (tmp_path / "a.pdf").write_bytes(text_pdf([DEED_LINES[:2]]))
    (tmp_path / "b.pdf").write_bytes(text_pdf([DEED_LINES[2:4]]))
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(content)
    result = run(cli_env(settings), "import", "--manifest", str(manifest), "--token", token)
    assert message in one_error_line(result)
    assert archive.loan_documents("CR-1") is None


@pytest.mark.parametrize("option", [("--loan", "CR-2"), ("--type", "mortgage_deed")])
def test_a_manifest_refuses_the_folder_options_it_would_ignore(
    settings: Settings, archive: ArchiveApp, tmp_path: Path, option: tuple[str, str]
) -> None:
    """'--manifest m.csv --loan CR-2' filed the files under the manifest's loans, not
    CR-2, and said nothing of the --loan it dropped."""
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-2"))
    token = archive.add_user(operator_context(), "ines.archivist", "archivist")
    (tmp_path / "a.pdf").write_bytes(text_pdf([DEED_LINES[:2]]))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,loan_number,doc_type\na.pdf,CR-1,contract\n")
    args = ("import", "--manifest", str(manifest), *option, "--token", token)
    line = one_error_line(run(cli_env(settings), *args))
    assert "a manifest names each file's loan and type: drop --loan and --type" in line, line
    assert archive.loan_documents("CR-1") is None


def commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command of the console script, by its words (``("projections", "rebuild")``)."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_help_keeps_each_paragraph_of_a_command_whole(tmp_path: Path) -> None:
    """--help kept the docstring's line breaks after its first paragraph: 'it reads the
    log once for them' on one line, 'all, and decodes ...' on the next."""
    env = cli_env(Settings(data_dir=tmp_path, demo_data=False), TERMINAL_WIDTH="400")
    described = [
        (words, inspect.cleandoc(command.help).split("\n\n")[1:])
        for words, command in commands(typer.main.get_command(cli.app))
    ]
    assert any(paragraphs for _, paragraphs in described)
    for words, paragraphs in described:
        if not paragraphs:
            continue
        shown = run(env, *words, "--help")
        lines = {line.strip() for line in shown.stdout.splitlines()}
        for paragraph in paragraphs:
            assert " ".join(paragraph.split()) in lines, (words, shown.stdout)


def test_usage_errors_are_one_line_and_a_bare_group_prints_its_help_alone(
    tmp_path: Path,
) -> None:
    """A missing --role listed its choices on five more lines; a group named without a
    command printed its help and then an empty 'loan-archive: ' line on stderr."""
    env = cli_env(Settings(data_dir=tmp_path, demo_data=False))
    line = one_error_line(run(env, "users", "add", "ana.perez"))
    assert line == (
        "loan-archive: Missing option '--role'. "
        "Choose from: archivist, credit_officer, auditor, compliance, admin"
    ), line
    for group in ((), ("loans",), ("reports",)):
        bare = run(env, *group)
        assert bare.returncode == 2 and bare.stderr == "", bare
        assert "Usage: loan-archive" in bare.stdout, bare


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_refuses_a_port_out_of_range_in_one_line(tmp_path: Path, port: str) -> None:
    env = cli_env(Settings(data_dir=tmp_path, demo_data=False))
    result = run(env, "serve", "--port", port)
    assert result.returncode == 2, result
    assert "--port" in one_error_line(result)


def test_an_unusable_data_dir_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    data_dir = tmp_path / "a-file" / "archive"
    env = cli_env(Settings(data_dir=data_dir, demo_data=False))
    result = subprocess.run(
        [str(CLI), "verify"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = one_error_line(result)
    assert "a-file" in line, line
    assert result.returncode == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ARCHIVE_PORT", "abc"), ("ARCHIVE_DATABASE_URL", "mysql://x")],
)
def test_invalid_settings_exit_2_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    env = cli_env(Settings(data_dir=tmp_path, demo_data=False), **{variable: value})
    result = run(env, "verify")
    assert result.returncode == 2, result
    assert variable in one_error_line(result)


# -- collateral, valuations and users: the commands HTTP has ---------------------------------


def ok_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


MORTGAGE = {
    "loan_number": "CR-1",
    "cadastral_reference": "9872023VH5797S0001WX",
    "address": "Calle Mayor 1, Teruel",
    "owner": "Ana Pérez Núñez",
    "registry_office": "Registro de Teruel",
    "secured_amount": "120000.00",
    "reason": "first mortgage",
}


def test_collateral_register_verify_release_and_show(
    settings: Settings, archive: ArchiveApp
) -> None:
    token = archive.add_user(operator_context(), "ana.officer", "credit_officer")
    archive.open_loan(CommandContext("ana.officer", "credit_officer"), **loan_terms("CR-1"))
    env = {**cli_env(settings), "ARCHIVE_TOKEN": token}

    reg = ok_json(run(env, "collateral", "file", "-d", json.dumps(MORTGAGE)))["id"]
    entry = {"registry_entry": "Tomo 812, Folio 33", "registered_on": "2024-01-20"}
    registered = run(
        env, "collateral", "register", reg, "-d", json.dumps({**entry, "reason": "nota simple"})
    )
    assert ok_json(registered)["version"] == 2
    visit = {
        "officer": "Marta Ruiz",
        "verified_on": "2024-03-01",
        "findings": "as described",
        "defects": ["damp in the basement"],
        "expected_version": 2,
        "reason": "annual visit",
    }
    assert (
        ok_json(run(env, "collateral", "verify-on-site", reg, "-d", json.dumps(visit)))["version"]
        == 3
    )
    release = {"released_on": "2025-02-01", "reason": "loan repaid"}
    assert (
        ok_json(run(env, "collateral", "release", reg, "-d", json.dumps(release)))["version"] == 4
    )

    state = archive.get_collateral(UUID(reg)).state()
    assert (state["status"], state["registry_entry"]) == ("released", "Tomo 812, Folio 33")
    assert state["site_verifications"][0]["defects"] == ["damp in the basement"]
    # The release freed the property: a first-rank mortgage for another loan is accepted.
    archive.open_loan(CommandContext("ana.officer", "credit_officer"), **loan_terms("CR-2"))
    again = archive.register_collateral(
        CommandContext("ana.officer", "credit_officer"), **mortgage_fields("CR-2")
    )
    assert archive.get_collateral(again.id).repeated_mortgage is None

    shown = ok_json(run(env, "collateral", "show", reg, "--version", "2"))
    assert (shown["status"], shown["registered_on"]) == ("registered", "2024-01-20")
    registered = [e for _, e in archive.loan_events("CR-1") if str(e.originator_id) == reg][1]
    moment = registered.timestamp.isoformat()
    then = ok_json(run(env, "collateral", "show", reg, "--as-of", moment))
    assert (then["version"], then["status"]) == (2, "registered")

    events = [e for _, e in archive.loan_events("CR-1") if str(e.originator_id) == reg]
    assert [type(e).__name__ for e in events] == ["Filed", "Registered", "SiteVerified", "Released"]
    assert {(e.actor_id, e.actor_role) for e in events} == {("ana.officer", "credit_officer")}
    assert [e.reason for e in events] == [
        "first mortgage",
        "nota simple",
        "annual visit",
        "loan repaid",
    ]


def test_valuation_review_revaluation_and_show(settings: Settings, archive: ArchiveApp) -> None:
    token = archive.add_user(operator_context(), "ana.officer", "credit_officer")
    archive.open_loan(CommandContext("ana.officer", "credit_officer"), **loan_terms("CR-1"))
    env = {**cli_env(settings), "ARCHIVE_TOKEN": token}
    appraisal = {
        "loan_number": "CR-1",
        "agency": "Tasaciones Aragón SA",
        "appraiser": "Luis Gómez",
        "method": "market_comparison",
        "appraised_value": "150000.00",
        "appraisal_date": "2024-01-10",
        "reason": "origination",
    }
    first = ok_json(run(env, "valuations", "appraise", "-d", json.dumps(appraisal)))["id"]
    review = {"reviewer": "Carmen Ruiz", "reviewed_value": "120000.00", "reason": "desk review"}
    assert (
        ok_json(run(env, "valuations", "review", first, "-d", json.dumps(review)))["version"] == 3
    )  # Reviewed, then OvervaluationFlagged: 25 % above the reviewed value
    due = {"revaluation_due": "2025-06-01", "expected_version": 3, "reason": "NPL watch"}
    assert (
        ok_json(run(env, "valuations", "schedule-revaluation", first, "-d", json.dumps(due)))[
            "version"
        ]
        == 4
    )
    # A revaluation: a new appraisal that supersedes the first.
    newer = {**appraisal, "appraisal_date": "2025-05-20", "supersedes": first, "reason": "revalue"}
    second = ok_json(run(env, "valuations", "appraise", "-d", json.dumps(newer)))["id"]

    old = ok_json(run(env, "valuations", "show", first))
    assert old["revaluation_due"] == "2025-06-01"
    assert old["overvaluation"] is not None and old["superseded_by"] == second
    past = ok_json(run(env, "valuations", "show", first, "--version", "1"))
    assert (past["reviewer"], past["revaluation_due"]) == (None, "2025-01-10")
    appraised = next(iter(archive.repository.event_store.get(UUID(first)))).timestamp
    then = ok_json(run(env, "valuations", "show", first, "--as-of", appraised.isoformat()))
    assert then == past
    before = run(env, "valuations", "show", first, "--as-of", "2000-01-01T00:00:00+00:00")
    assert "did not exist" in one_error_line(before)
    events = archive.repository.event_store.get(UUID(first))
    assert [(type(e).__name__, e.actor_id, e.reason) for e in events] == [
        ("Appraised", "ana.officer", "origination"),
        ("Reviewed", "ana.officer", "desk review"),
        ("OvervaluationFlagged", "ana.officer", "desk review"),
        ("RevaluationScheduled", "ana.officer", "NPL watch"),
        ("Superseded", "ana.officer", "revalue"),
    ]


def test_users_role_changes_the_role_and_records_the_operator(
    settings: Settings, archive: ArchiveApp
) -> None:
    token = archive.add_user(operator_context(), "ana.officer", "credit_officer")
    env = cli_env(settings)
    changed = run(env, "users", "role", "ana.officer", "--role", "auditor", "--reason", "moved")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout == ""  # nothing a script would mistake for a token
    assert archive.authenticate(token) == Principal("ana.officer", Role.AUDITOR)
    *_, event = archive.repository.event_store.get(user_id("ana.officer"))
    assert type(event).__name__ == "RoleChanged"
    assert event.actor_id.startswith("operator:") and event.reason == "moved"


def test_bad_collateral_valuation_and_user_input_is_one_line_and_loses_nothing(
    settings: Settings, archive: ArchiveApp
) -> None:
    officer = CommandContext("ana.officer", "credit_officer")
    token = archive.add_user(operator_context(), "ana.officer", "credit_officer")
    auditor = archive.add_user(operator_context(), "raul.auditor", "auditor")
    archive.open_loan(officer, **loan_terms("CR-1"))
    reg = archive.register_collateral(officer, **mortgage_fields("CR-1")).id
    archive.change_collateral(
        officer, reg, None, lambda r: r.mark_registered(officer, "T-1", "2024-01-20")
    )
    val = archive.appraise(officer, **appraisal_fields("CR-1")).id
    archive.add_user(operator_context(), "old.clerk", "archivist")
    archive.change_user(operator_context(), "old.clerk", lambda u: u.deactivate(officer))
    env = {**cli_env(settings), "ARCHIVE_TOKEN": token}
    head = archive.head_position()
    tomorrow_but_one = (datetime.now(UTC).date() + timedelta(days=2)).isoformat()

    refusals = [
        (("collateral", "release", str(reg), "-d", "{released_on: 2025}"), "invalid command"),
        (("collateral", "release", str(reg), "-d", '{"released_on": "2025-02-30"}'), "released_on"),
        (("collateral", "release", str(reg), "-d", '{"released_on": "2024-01-19"}'), "before the"),
        (
            (
                "collateral",
                "release",
                str(reg),
                "-d",
                json.dumps({"released_on": tomorrow_but_one}),
            ),
            "in the future",
        ),
        (("collateral", "release", "not-a-uuid", "-d", '{"released_on": "2025-02-01"}'), "UUID"),
        (
            (
                "collateral",
                "release",
                str(reg),
                "-d",
                '{"released_on": "2025-02-01", "expected_version": true}',
            ),
            "not true or false",
        ),
        (
            ("collateral", "release", str(uuid4()), "-d", '{"released_on": "2025-02-01"}'),
            "not found",
        ),
        (
            (
                "collateral",
                "register",
                str(reg),
                "-d",
                '{"registry_entry": "x", "registered_on": "2024-02-01"}',
            ),
            "only a pending",
        ),
        (
            (
                "collateral",
                "verify-on-site",
                str(reg),
                "-d",
                json.dumps(
                    {"officer": "M", "verified_on": "2024-03-01", "findings": "ok", "colour": "red"}
                ),
            ),
            "colour",
        ),
        (
            (
                "collateral",
                "verify-on-site",
                str(reg),
                "-d",
                json.dumps(
                    {
                        "officer": "M",
                        "verified_on": "2024-03-01",
                        "findings": "ok",
                        "expected_version": 1,
                    }
                ),
            ),
            "version 2, not 1",
        ),
        (
            (
                "collateral",
                "release",
                str(reg),
                "--token",
                auditor,
                "-d",
                '{"released_on": "2025-02-01"}',
            ),
            "auditor",
        ),
        (
            (
                "valuations",
                "schedule-revaluation",
                str(val),
                "-d",
                '{"revaluation_due": "2023-01-01"}',
            ),
            "after the appraisal",
        ),
        (
            (
                "valuations",
                "review",
                str(val),
                "-d",
                '{"reviewer": "luis gómez", "reviewed_value": "1"}',
            ),
            "appraiser",
        ),
        (("valuations", "show", str(uuid4())), "not found"),
        (("users", "role", "ana.officer", "--role", "superuser"), "superuser"),
        (("users", "role", "nobody", "--role", "auditor"), "user nobody not found"),
        (("users", "role", "ana.officer", "--role", "credit_officer"), "already has role"),
        (("users", "role", "old.clerk", "--role", "auditor"), "old.clerk is deactivated"),
    ]
    for args, message in refusals:
        line = one_error_line(run(env, *args))
        assert message in line, (args, line)

    assert archive.head_position() == head  # not one event was written
    state = archive.get_collateral(reg).state()
    assert (state["version"], state["status"], state["released_on"]) == (2, "registered", None)
    assert archive.get_valuation(val).version == 1
    assert archive.authenticate(token) == Principal("ana.officer", Role.CREDIT_OFFICER)


def test_a_database_that_cannot_be_reached_is_one_line(tmp_path: Path) -> None:
    """Not an 83-line traceback: the operator reads which server failed and why."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://archive:not-the-password@127.0.0.1:{port}/archive"
    env = cli_env(Settings(data_dir=tmp_path, database_url=url))
    line = one_error_line(run(env, "verify"))
    assert "cannot reach the PostgreSQL database" in line and str(port) in line, line
    assert "not-the-password" not in line


def test_users_revoke_reads_the_token_from_stdin(settings: Settings, archive: ArchiveApp) -> None:
    leaked = archive.add_user(operator_context(), "leaky", "auditor")
    kept = archive.issue_token(operator_context(), "leaky")
    env = cli_env(settings)
    refused = subprocess.run(
        [str(CLI), "users", "revoke", "leaky"], env=env, input="", capture_output=True, text=True
    )
    assert "on stdin" in one_error_line(refused)
    revoked = subprocess.run(
        [str(CLI), "users", "revoke", "leaky", "--reason", "pasted in a ticket"],
        env=env,
        input=leaked + "\n",
        capture_output=True,
        text=True,
    )
    assert revoked.returncode == 0 and revoked.stdout == "", revoked.stderr
    with pytest.raises(AuthenticationError, match="revoked"):
        archive.authenticate(leaked)
    assert archive.authenticate(kept).name == "leaky"
    other = subprocess.run(
        [str(CLI), "users", "revoke", "someone.else"],
        env=env,
        input=kept + "\n",
        capture_output=True,
        text=True,
    )
    assert "no such token" in one_error_line(other)
