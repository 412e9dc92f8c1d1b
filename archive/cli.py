"""The ``loan-archive`` command: serve, users, verify, and the credit officer's commands.

Every command builds the same Settings as the server. Domain commands authenticate
with a bearer token (``--token`` or ``ARCHIVE_TOKEN``), exactly as over HTTP, so the
identity that lands in the event is a real user's. Administrative commands run by the
operator on the server itself (``users add``) are recorded as ``operator:<os user>``.
Errors print one line to stderr and exit non-zero.
"""

from __future__ import annotations

import gc
import html
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import typer
from pydantic import BaseModel, ValidationError

from archive.application import ArchiveApp, Outcome, Principal, operator_context
from archive.collateral import MortgageRegistration
from archive.domain import CommandContext, Role
from archive.exceptions import ArchiveError, PermissionDeniedError
from archive.report_cli import reports_app
from archive.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    help="Event-sourced archive and audit service for loan files.", no_args_is_help=True
)
users_app = typer.Typer(help="Users and bearer tokens.", no_args_is_help=True)
loans_app = typer.Typer(help="Loan files.", no_args_is_help=True)
collateral_app = typer.Typer(help="Mortgage registrations.", no_args_is_help=True)
valuations_app = typer.Typer(help="Valuations.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(loans_app, name="loans")
app.add_typer(collateral_app, name="collateral")
app.add_typer(valuations_app, name="valuations")
projections_app = typer.Typer(help="Read models: status and rebuilds.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")
app.add_typer(reports_app, name="reports")

Token = Annotated[
    str, typer.Option(envvar="ARCHIVE_TOKEN", help="Bearer token.", show_default=False)
]
Data = Annotated[
    str, typer.Option("--data", "-d", help="The command as JSON (as over HTTP); - reads stdin.")
]
AsOf = Annotated[
    datetime | None,
    typer.Option(help="ISO 8601 moment with time zone: the state rebuilt as it was then."),
]


class CliError(Exception):
    """A failure to report in one line."""


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"loan-archive: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def archive() -> Iterator[ArchiveApp]:
    settings = load_settings()
    application = ArchiveApp(settings)
    try:
        yield application
    finally:
        application.close()


def print_json(value: Any) -> None:
    from api.encoding import jsonable

    typer.echo(json.dumps(jsonable(value), indent=2, ensure_ascii=False))


def caller(application: ArchiveApp, token: str, *roles: Role) -> Principal:
    principal = application.authenticate(token)
    if principal.role not in roles:
        raise PermissionDeniedError(f"role {principal.role.value} may not do this")
    return principal


def parse(model: type[BaseModel], data: str) -> Any:
    raw = sys.stdin.read() if data == "-" else data
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        raise CliError(f"invalid command data: {where}: {first['msg']}") from None


def report(outcome: Outcome) -> None:
    print_json({"id": outcome.id, "version": outcome.version, "position": outcome.position})


# -- serving -------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Default: ARCHIVE_HOST.")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Default: ARCHIVE_PORT.")
    ] = None,
    with_worker: Annotated[
        bool, typer.Option("--with-worker", help="Also run an OCR worker in this process.")
    ] = False,
) -> None:
    """Serve the HTTP API (seeding demo data into an empty archive when enabled)."""
    import uvicorn

    from api.app import create_app
    from archive.demo import seed

    settings = load_settings()
    if with_worker:
        check_ocr_languages(settings)
    application = ArchiveApp(settings)
    if settings.demo_data and application.head_position() == 0:
        tokens_file = settings.data_dir / "demo-tokens.txt"
        seed(application, tokens_file)
        typer.echo(f"Seeded demo loan files. Demo users and their tokens: {tokens_file}", err=True)
    stop = threading.Event()
    if with_worker:
        threading.Thread(
            target=run_worker, args=(application, stop), name="ocr-worker", daemon=True
        ).start()
    api = create_app(settings, application)
    # Start-up objects (modules, routes, caches) live as long as the process: keep them
    # out of every full collection, whose pauses would otherwise land on requests.
    gc.freeze()
    try:
        uvicorn.run(
            api,
            host=host or settings.host,
            port=port or settings.port,
            log_level=settings.log_level,
        )
    finally:
        stop.set()


def check_ocr_languages(settings: Settings) -> None:
    """Refuse to start a worker whose Tesseract lacks ARCHIVE_OCR_LANGUAGES: it would
    otherwise fail every scanned page, quietly, one document at a time."""
    from ocr import tesseract

    if tesseract.engine_version() is None:
        return  # no Tesseract at all: text layers still extract; scans fail, each saying why
    missing = tesseract.missing_languages(settings.ocr_languages)
    if missing:
        installed = "+".join(sorted(tesseract.installed_languages())) or "none"
        raise SettingsError(
            f"invalid setting ARCHIVE_OCR_LANGUAGES: Tesseract has no language data for "
            f"{', '.join(missing)} (installed: {installed})"
        )


def run_worker(application: ArchiveApp, stop: threading.Event, name: str | None = None) -> None:
    """Follow the log and extract text until ``stop`` is set."""
    from archive.worker import ExtractionWorker, default_worker_name
    from projections.store import open_store

    with open_store(application.settings) as store:
        worker = ExtractionWorker(
            application,
            store,
            name=name or default_worker_name(),
            languages=application.settings.ocr_languages,
        )
        gc.freeze()  # start-up objects stay out of full collections (see serve)
        worker.run_forever(stop)


@app.command()
def worker(
    name: Annotated[
        str | None,
        typer.Option(help="Worker identity; default ocr@<hostname>. Unique per process."),
    ] = None,
) -> None:
    """Run an OCR worker: extract the text of every registered original (Ctrl-C stops)."""
    check_ocr_languages(load_settings())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with archive() as application:
        try:
            run_worker(application, stop, name)
        except KeyboardInterrupt:
            stop.set()


@app.command()
def reindex(
    token: Token,
    document: Annotated[UUID | None, typer.Option(help="One document.")] = None,
    all_failed: Annotated[
        bool,
        typer.Option(
            "--all-failed",
            help="Every document whose extraction failed, or left a page without text.",
        ),
    ] = False,
    reason: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Ask the workers to extract again (e.g. after a Tesseract upgrade); the old result stays."""
    if (document is None) == (not all_failed):
        raise CliError("give either --document ID or --all-failed")
    with archive() as application:
        who = caller(application, token, Role.ARCHIVIST, Role.ADMIN)
        ctx = who.context(reason or "reindex")
        if document is not None:
            targets = [document]
        else:
            targets = [
                d
                for d in application.document_ids()
                if extraction_failed(application.get_document(d).extraction)
            ]
        for target in targets:
            application.request_reindex(ctx, target)
    typer.echo(f"reindex requested for {len(targets)} document{'' if len(targets) == 1 else 's'}")


def extraction_failed(extraction: dict[str, Any]) -> bool:
    """Failed outright, or done with pages that failed (e.g. Tesseract lacked a language):
    either way some of the original is not searchable."""
    return extraction["status"] == "failed" or (
        extraction["status"] == "done" and bool(extraction.get("failed_pages"))
    )


# -- users ---------------------------------------------------------------------------------


@users_app.command("add")
def users_add(
    name: str,
    role: Annotated[Role, typer.Option(help="The user's role.")],
    reason: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Add a user; prints the new bearer token alone on stdout."""
    with archive() as application:
        token = application.add_user(operator_context(reason), name, role.value)
    typer.echo(token)


@users_app.command("token")
def users_token(name: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """Issue another token for a user; prints it alone on stdout."""
    with archive() as application:
        typer.echo(application.issue_token(operator_context(reason), name))


@users_app.command("revoke")
def users_revoke(name: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """Revoke one of a user's tokens, read from stdin (not an argument: those are in the
    shell history and the process list); the user's other tokens keep working."""
    token = sys.stdin.readline().strip()
    if not token:
        raise CliError("give the token to revoke on stdin (one line)")
    with archive() as application:
        application.revoke_token(operator_context(reason), token, user=name)
    typer.echo(f"a token of {name} is revoked", err=True)


@users_app.command("role")
def users_role(
    name: str,
    role: Annotated[Role, typer.Option(help="The user's new role.")],
    reason: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a user's role (as POST /api/v1/users/{name}/role); their tokens keep working."""
    ctx = operator_context(reason)
    with archive() as application:
        application.change_user(ctx, name, lambda u: u.change_role(ctx, role.value))
    typer.echo(f"{name} is now {role.value}", err=True)


@users_app.command("deactivate")
def users_deactivate(name: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """Deactivate a user: every token of theirs stops working."""
    ctx = operator_context(reason)
    with archive() as application:
        application.change_user(ctx, name, lambda u: u.deactivate(ctx))
    typer.echo(f"{name} deactivated", err=True)


# -- integrity -----------------------------------------------------------------------------


@app.command()
def verify(
    loan: Annotated[str | None, typer.Option(help="Only this loan file.")] = None,
    originals: Annotated[
        bool, typer.Option("--originals", help="Re-hash every original (fixity), recorded.")
    ] = False,
    token: Annotated[str | None, typer.Option(envvar="ARCHIVE_TOKEN", show_default=False)] = None,
) -> None:
    """Verify the hash chains, or with --originals every original; exit 1 naming what is bad."""
    if originals and loan:  # ignored, it re-hashed and recorded every original of the archive
        raise CliError("--originals checks every original: --loan is for the hash chains")
    with archive() as application:
        if originals:
            if token is None:
                raise CliError("--originals records fixity events: give --token (auditor or admin)")
            who = caller(application, token, Role.AUDITOR, Role.ADMIN)
            results = application.check_fixity(who.context("fixity check"))
            bad = [r for r in results if r.outcome != "ok"]
            for r in bad:
                typer.echo(
                    f"{r.outcome.value.upper()}: document {r.document_id} (loan {r.loan_number})"
                )
            if bad:
                fail(f"{len(bad)} of {len(results)} originals failed the fixity check")
            typer.echo(f"ok: {len(results)} originals verified")
            return
        result = application.verify_loan_chain(loan) if loan else application.verify_chain()
    if result.breach is not None:
        fail(f"integrity breach: {result.breach}")
    typer.echo(f"ok: {result.events_checked} events in {result.aggregates_checked} chains verified")


@app.command("init-storage")
def init_storage() -> None:
    """Create the S3 bucket with Object Lock if it is missing (the filesystem needs nothing)."""
    with archive() as application:
        store = application.blobs
        ensure = getattr(store, "ensure_bucket", None)
        if ensure is None:
            typer.echo(f"filesystem store at {application.settings.blob_root}: nothing to do")
            return
        created = ensure()
        typer.echo(f"bucket {application.settings.s3_bucket} {'created' if created else 'exists'}")


@app.command("reconcile")
def reconcile_command(token: Token) -> None:
    """Compare storage with the log: orphan objects, missing or changed originals (recorded)."""
    with archive() as application:
        who = caller(application, token, Role.AUDITOR, Role.ADMIN)
        report = application.reconcile(who.context("reconcile"))
    for key in report.orphans:
        typer.echo(f"orphan object (no event references it): {key}")
    for key in report.temporaries:
        typer.echo(f"leftover of an interrupted upload: {key}")
    for item in report.missing:
        typer.echo(
            f"MISSING original of document {item['document_id']} (loan {item['loan_number']})"
        )
    for item in report.changed:
        typer.echo(
            f"CHANGED original of document {item['document_id']} (loan {item['loan_number']})"
        )
    if report.missing or report.changed:
        fail(f"{len(report.missing) + len(report.changed)} originals missing or changed")
    typer.echo(f"reconciled: {len(report.orphans)} orphans, {len(report.temporaries)} leftovers")


@app.command("import")
def import_command(
    token: Token,
    directory: Annotated[Path | None, typer.Argument(help="A folder of originals.")] = None,
    loan: Annotated[
        str | None, typer.Option(help="Loan number for every file of DIRECTORY.")
    ] = None,
    doc_type: Annotated[
        str | None, typer.Option("--type", help="Document type for every file.")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="CSV with columns path, loan_number, doc_type.")
    ] = None,
) -> None:
    """Upload a folder (or a manifest) of originals, skipping what is already archived.

    A file the loan already holds as that document type is skipped; a file a manifest lists under two types is filed as both."""
    from archive.imports import plan_import, run_import

    plan = plan_import(directory, loan, doc_type, manifest)
    with archive() as application:
        who = caller(application, token, Role.ARCHIVIST, Role.CREDIT_OFFICER)
        summary = run_import(application, who.context("import"), plan)
    typer.echo(
        f"imported {summary.imported}, skipped {summary.skipped} already archived, "
        f"failed {len(summary.failures)}"
    )
    for path, message in summary.failures:
        typer.echo(f"failed: {path}: {message}", err=True)
    if summary.failures:
        raise typer.Exit(1)


# -- loan files ----------------------------------------------------------------------------


def _officer_command(token: str, run: Callable[[ArchiveApp, Principal], Outcome]) -> None:
    with archive() as application:
        report(run(application, caller(application, token, Role.CREDIT_OFFICER)))


@loans_app.command("open")
def loans_open(token: Token, data: Data) -> None:
    """Open a loan file (fields as for POST /api/v1/loans)."""
    from api.loans import OpenLoan

    body = parse(OpenLoan, data)
    terms = body.model_dump(exclude={"reason", "currency"})
    _officer_command(
        token,
        lambda a, p: a.open_loan(p.context(body.reason), currency_code=body.currency, **terms),
    )


@loans_app.command("do")
def loans_do(
    loan_number: str,
    command: Annotated[str, typer.Argument(help="status, classification, officers, ...")],
    token: Token,
    data: Data,
) -> None:
    """Run a loan-file command (names and fields as POST /api/v1/loans/{n}/<command>)."""
    from api.loans import LOAN_COMMANDS

    if command not in LOAN_COMMANDS:
        raise CliError(f"unknown command {command!r}; one of: {', '.join(LOAN_COMMANDS)}")
    model, apply = LOAN_COMMANDS[command]
    body = parse(model, data)

    def run(a: ArchiveApp, p: Principal) -> Outcome:
        ctx = p.context(body.reason)
        return a.change_loan(
            ctx, loan_number, body.expected_version, lambda loan: apply(loan, ctx, body)
        )

    _officer_command(token, run)


@loans_app.command("show")
def loans_show(
    loan_number: str,
    token: Token,
    as_of: AsOf = None,
    version: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Print a loan file now, at a version or as of a moment (rebuilt from events)."""
    from api.shapes import loan_shape

    with archive() as application:
        caller(application, token, *Role)
        print_json(loan_shape(application.loan_file(loan_number, version=version, as_of=as_of)))


@app.command("history")
def history(loan_number: str, token: Token) -> None:
    """Print the loan's timeline.

    Every event of the file, its collateral, valuations, documents and liens."""
    from api.loans import HEADER_FIELDS

    with archive() as application:
        caller(application, token, Role.AUDITOR, Role.CREDIT_OFFICER, Role.COMPLIANCE, Role.ADMIN)
        for position, event in application.loan_events(loan_number):
            kind = type(event).__qualname__
            reason = f"  ({_field(event.reason)})" if event.reason else ""
            what = "  ".join(
                f"{name}={_field(value)}"
                for name, value in vars(event).items()
                if name not in HEADER_FIELDS | CHAIN_FIELDS and not name.startswith("_")
            )
            typer.echo(
                f"{position:>8}  {event.timestamp:%Y-%m-%d %H:%M:%S}  {kind:<40} "
                f"v{event.originator_version:<4} {event.actor_id} [{event.actor_role}]{reason}"
                + (f"  {what}" if what else "")
            )


CHAIN_FIELDS = frozenset({"prev_hash", "event_hash"})
"""Left out of ``history`` lines: ``verify`` checks the chain."""


def _field(value: Any) -> str:
    """One event field on one line: scalars as text, the rest as compact JSON."""
    from api.encoding import jsonable

    plain = jsonable(value)
    if isinstance(plain, str):
        return " ".join(plain.splitlines())  # \r, \u2028 ... end a line for readers too
    return json.dumps(plain, ensure_ascii=False, separators=(",", ":"))


# -- collateral and valuations ---------------------------------------------------------------


@collateral_app.command("file")
def collateral_file(token: Token, data: Data) -> None:
    """File a mortgage registration (fields as for POST /api/v1/collateral)."""
    from api.collateral import FileMortgage

    body = parse(FileMortgage, data)
    fields = body.model_dump(exclude={"reason", "currency"})
    _officer_command(
        token,
        lambda a, p: a.register_collateral(
            p.context(body.reason), currency_code=body.currency, **fields
        ),
    )


def _collateral_command(
    token: str,
    registration_id: UUID,
    body: Any,
    change: Callable[[MortgageRegistration, CommandContext], None],
) -> None:
    """One command on a mortgage registration, under the body's expected version."""

    def run(a: ArchiveApp, p: Principal) -> Outcome:
        ctx = p.context(body.reason)
        return a.change_collateral(
            ctx, registration_id, body.expected_version, lambda reg: change(reg, ctx)
        )

    _officer_command(token, run)


@collateral_app.command("register")
def collateral_register(registration_id: UUID, token: Token, data: Data) -> None:
    """Record the registry entry (fields as POST /api/v1/collateral/{id}/registration)."""
    from api.collateral import MarkRegistered

    body = parse(MarkRegistered, data)
    _collateral_command(
        token,
        registration_id,
        body,
        lambda reg, ctx: reg.mark_registered(ctx, body.registry_entry, body.registered_on),
    )


@collateral_app.command("verify-on-site")
def collateral_verify_on_site(registration_id: UUID, token: Token, data: Data) -> None:
    """Record an on-site verification (fields as POST .../{id}/site-verifications)."""
    from api.collateral import VerifyOnSite

    body = parse(VerifyOnSite, data)
    _collateral_command(
        token,
        registration_id,
        body,
        lambda reg, ctx: reg.verify_on_site(
            ctx, body.officer, body.verified_on, body.findings, body.defects
        ),
    )


@collateral_app.command("release")
def collateral_release(registration_id: UUID, token: Token, data: Data) -> None:
    """Release the mortgage and its lien (fields as POST /api/v1/collateral/{id}/release)."""
    from api.collateral import Release

    body = parse(Release, data)
    _officer_command(
        token,
        lambda a, p: a.release_collateral(
            p.context(body.reason), registration_id, body.expected_version, body.released_on
        ),
    )


@collateral_app.command("show")
def collateral_show(
    registration_id: UUID,
    token: Token,
    version: Annotated[int | None, typer.Option()] = None,
    as_of: AsOf = None,
) -> None:
    """Print a mortgage registration now, at a version or as of a moment (as GET
    /api/v1/collateral/{id})."""
    from api.shapes import collateral_shape

    with archive() as application:
        caller(application, token, *Role)
        registration = application.get_collateral(registration_id, version, as_of)
        print_json(collateral_shape(registration.state()))


@valuations_app.command("appraise")
def valuations_appraise(token: Token, data: Data) -> None:
    """Record an appraisal (fields as for POST /api/v1/valuations)."""
    from api.valuations import Appraise

    body = parse(Appraise, data)
    fields = body.model_dump(exclude={"reason", "currency", "supersedes"})
    _officer_command(
        token,
        lambda a, p: a.appraise(
            p.context(body.reason),
            supersedes=body.supersedes,
            currency_code=body.currency,
            **fields,
        ),
    )


@valuations_app.command("review")
def valuations_review(valuation_id: UUID, token: Token, data: Data) -> None:
    """Record the independent review (fields as for POST /api/v1/valuations/{id}/review)."""
    from api.valuations import Review

    body = parse(Review, data)
    _officer_command(
        token,
        lambda a, p: a.review_valuation(
            p.context(body.reason),
            valuation_id,
            body.expected_version,
            body.reviewer,
            body.reviewed_value,
            body.notes,
        ),
    )


@valuations_app.command("schedule-revaluation")
def valuations_schedule_revaluation(valuation_id: UUID, token: Token, data: Data) -> None:
    """Set the next revaluation date (fields as POST /api/v1/valuations/{id}/revaluation)."""
    from api.valuations import ScheduleRevaluation

    body = parse(ScheduleRevaluation, data)

    def run(a: ArchiveApp, p: Principal) -> Outcome:
        ctx = p.context(body.reason)
        return a.change_valuation(
            ctx,
            valuation_id,
            body.expected_version,
            lambda val: val.schedule_revaluation(ctx, body.revaluation_due),
        )

    _officer_command(token, run)


@valuations_app.command("show")
def valuations_show(
    valuation_id: UUID,
    token: Token,
    version: Annotated[int | None, typer.Option()] = None,
    as_of: AsOf = None,
) -> None:
    """Print a valuation now, at a version or as of a moment (as GET
    /api/v1/valuations/{id})."""
    from api.shapes import valuation_shape

    with archive() as application:
        caller(application, token, *Role)
        valuation = application.get_valuation(valuation_id, version, as_of)
        print_json(valuation_shape(valuation.state()))


# -- read models ---------------------------------------------------------------------------


@contextmanager
def read_models_of(application: ArchiveApp) -> Iterator[Any]:
    """The read models, caught up with the log (a CLI has no background followers)."""
    from projections.runner import Projections

    with Projections.open(application.settings, application) as views:
        views.catch_up()
        yield views


@app.command("search", context_settings={"ignore_unknown_options": True})
def search_command(
    query: Annotated[str, typer.Argument(help='Words, "phrases", OR, -exclusion, prefix*.')],
    token: Token,
    loan: Annotated[str | None, typer.Option(help="Only this loan number.")] = None,
    doc_type: Annotated[str | None, typer.Option("--type", help="Only this document type.")] = None,
    borrower: Annotated[str | None, typer.Option(help="Part of a name, or a national id.")] = None,
    uploaded_from: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Uploaded on or after (UTC).")
    ] = None,
    uploaded_to: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Uploaded on or before (UTC).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,  # as GET /api/v1/search
    offset: Annotated[
        int, typer.Option(min=0, help="Skip this many hits (the next page: --offset 20).")
    ] = 0,
) -> None:
    """Search the text of the originals; prints one line per page hit.

    A query may start with an exclusion: search '-borrador escritura'. A mistyped option is refused as an extra argument."""
    from projections.search import search

    with archive() as application:
        caller(application, token, Role.COMPLIANCE, Role.AUDITOR, Role.CREDIT_OFFICER)
        with read_models_of(application) as views:
            page = search(
                views.store,
                query,
                loan_number=loan,
                doc_type=doc_type,
                borrower=borrower,
                uploaded_from=None if uploaded_from is None else uploaded_from.date(),
                uploaded_to=None if uploaded_to is None else uploaded_to.date(),
                limit=limit,
                offset=offset,
            )
    shown = len(page.items)
    more = page.total - offset - shown
    # The hits past --limit were unreachable: say which ones are shown and how to go on.
    typer.echo(
        f"{page.total} {'page matches' if page.total == 1 else 'pages match'}"
        + (f"; hits {offset + 1}-{offset + shown} shown" if shown and (more or offset) else "")
        + (f"; next: --offset {offset + shown}" if shown and more > 0 else "")
    )
    for hit in page.items:
        marked = hit["snippet"].replace("<mark>", "[").replace("</mark>", "]")
        snippet = html.unescape(marked)
        typer.echo(
            f"{hit['loan_number']:<14} {hit['doc_type']:<20} {str(hit['document_id'])[:8]} "
            f"p.{hit['page_number']:<3} {' '.join(snippet.split())}"
        )


@projections_app.command("status")
def projections_status() -> None:
    """Each view's position, the log head and the lag (as they are: a stuck view shows)."""
    from projections.runner import Projections

    with archive() as application, Projections.open(application.settings, application) as views:
        for s in views.status():
            typer.echo(
                f"{s.view:<14} generation {s.generation:<3} position {s.position:>9} "
                f"head {s.head:>9} lag {s.lag:>7}{'  STALE: rebuild it' if s.stale else ''}"
            )


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str | None, typer.Argument(help="One view; default: all.")] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes sharing out the views, each reading the log; default: one per"
            " core once the log has 100,000 events, else 1.",
        ),
    ] = None,
) -> None:
    """Replay the log into new generations of the views (readers keep being served).

    The views a process rebuilds are rebuilt in one pass: it reads the log once for them all, and decodes only the events they need."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from projections.runner import Projections

    # Not caught up first: that would replay into the generations being replaced.
    with archive() as application, Projections.open(application.settings, application) as views:
        names = [name] if name else list(views.views)
        for view in names:
            if view not in views.views:
                raise CliError(f"no view named {view}; views: {', '.join(views.views)}")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        # As import's: on stderr, and only on a terminal (piped, it left a blank line).
        console = Console(stderr=True)
        with Progress(
            *columns, console=console, transient=True, disable=not console.is_terminal
        ) as progress:
            task = progress.add_task(", ".join(names), total=None)

            def advance(position: int, head: int) -> None:
                progress.update(task, completed=position, total=head)

            generations = views.rebuild_views(
                names, progress=advance, processes=processes, join=True
            )
        for view, generation in generations.items():
            typer.echo(f"{view}: generation {generation} is active")


def main() -> None:
    """Console entry point: every expected failure is one line on stderr."""
    from psycopg import OperationalError as PsycopgOperationalError
    from typer._click.exceptions import ClickException

    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (SettingsError, ArchiveError, CliError) as exc:
        typer.echo(f"loan-archive: {exc}", err=True)
        sys.exit(2 if isinstance(exc, SettingsError) else 1)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except PsycopgOperationalError as exc:  # the server is down, unreachable or refuses us
        reason = " ".join(str(exc).split())
        typer.echo(f"loan-archive: cannot reach the PostgreSQL database: {reason}", err=True)
        sys.exit(1)
    except OSError as exc:  # e.g. ARCHIVE_DATA_DIR cannot be created or is not a directory
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"loan-archive: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    except ClickException as exc:  # usage errors: unknown option, missing argument
        # Click puts the choices of a missing option on lines of their own.
        message = " ".join(exc.format_message().split())
        if message:  # none: a group named without a command, whose help was printed
            typer.echo(f"loan-archive: {message}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["Settings", "app", "main"]
