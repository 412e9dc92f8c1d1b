"""Bulk import of originals from a folder or a manifest, resumable by content.

Each file is hashed locally first: if the loan already holds a document of the same
type with the same SHA-256 it is skipped, so an interrupted import simply runs again.
The local hash is sent as the expected checksum, so a file that changes in transit is
refused.

The type is part of "already archived": a manifest that lists one file twice for a
loan with two types (a notarial deed that is both the loan contract and the mortgage
deed) registers it twice, one document per type, over the one stored object (originals
are content-addressed). A manifest line says what a file is; skipping the second line
dropped that statement without a word, and refusing the manifest would leave no way to
file a document under both types, as two uploads can.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from archive.application import ArchiveApp
from archive.documents import DocumentType
from archive.domain import CommandContext, choice
from archive.exceptions import ArchiveError, DomainError, NotFoundError

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ImportItem:
    path: Path
    loan_number: str
    doc_type: str


@dataclass
class ImportSummary:
    imported: int = 0
    skipped: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)


def plan_import(
    directory: Path | None, loan: str | None, doc_type: str | None, manifest: Path | None
) -> list[ImportItem]:
    """What to import: every file of a folder, or the rows of a manifest CSV.

    Not only regular files: a link whose target is gone (an unmounted share) is named by
    check_plan, not passed over as if the folder were complete."""
    if (directory is None) == (manifest is None):
        raise DomainError("give either a folder (with --loan and --type) or --manifest")
    if manifest is not None:
        if loan or doc_type:  # ignored, they read as filing every listed file under them
            raise DomainError("a manifest names each file's loan and type: drop --loan and --type")
        return read_manifest(manifest)
    assert directory is not None
    if not directory.is_dir():
        raise DomainError(f"{directory} is not a folder")
    if not loan or not doc_type:
        raise DomainError("importing a folder needs --loan and --type")
    files = sorted(
        p for p in directory.rglob("*") if not p.is_dir() and not hidden(p.relative_to(directory))
    )
    return [ImportItem(p, loan, doc_type) for p in files]


SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})


def hidden(relative: Path) -> bool:
    """A dot file or folder (.DS_Store, .git) or a Windows shell file (Thumbs.db) is the
    scanner's or the desktop's, never an original: it would fail every run as a
    refused media type."""
    return any(part.startswith(".") for part in relative.parts) or (
        relative.name.lower() in SYSTEM_FILES
    )


MANIFEST_COLUMNS = ("path", "loan_number", "doc_type")
DELIMITERS = ",;\t"
"""Spreadsheets in Spanish (and other decimal-comma) locales save CSV with semicolons."""


def read_manifest(manifest: Path) -> list[ImportItem]:
    """The rows of a manifest CSV, refused whole (one line naming the line) if any row is
    unusable: a half-read manifest would import some files and leave the rest unsaid.

    Spreadsheet exports are read as they come: a UTF-8 byte-order mark (Excel), ``;`` or
    tab separators, spaces around fields, extra columns (ignored) and blank lines."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as exc:
        raise DomainError(f"cannot read manifest {manifest}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DomainError(f"manifest {manifest} is not UTF-8 text; save it as CSV UTF-8") from None
    header = text.partition("\n")[0]
    delimiter = max(DELIMITERS, key=header.count)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    columns = [c.strip().lower() for c in next(reader, [])]
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise DomainError(
            f"the manifest needs the columns {', '.join(MANIFEST_COLUMNS)} in its first line "
            f"(missing {', '.join(missing)})"
        )
    where = [columns.index(c) for c in MANIFEST_COLUMNS]
    items = []
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(columns):
            raise DomainError(
                f"manifest line {line} has {len(values)} fields, the header {len(columns)}: "
                "nothing imported"
            )
        path, loan_number, doc_type = (values[i].strip() for i in where)
        for name, value in zip(MANIFEST_COLUMNS, (path, loan_number, doc_type), strict=True):
            if not value:
                raise DomainError(f"manifest line {line} has no {name}: nothing imported")
        items.append(ImportItem(manifest.parent / path, loan_number, doc_type))
    return items


def filename(path: Path) -> str:
    """The name to record, as HTTP decodes an upload's: a name that is not UTF-8 (copied
    from an old Windows share) keeps its other letters; its raw bytes could not be stored
    in an event and stopped the import at that file, every run."""
    return os.fsencode(path.name).decode("utf-8", "replace")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_plan(archive: ArchiveApp, plan: list[ImportItem]) -> None:
    """Refuse the whole import, before a byte moves, if a loan, a type or a file is wrong:
    one line to fix the command or the manifest, not the same failure for every file."""
    for doc_type in sorted({item.doc_type for item in plan}):
        choice(DocumentType, doc_type, "document type")
    unknown = [n for n in sorted({item.loan_number for item in plan}) if not archive.has_loan(n)]
    if unknown:
        raise NotFoundError(f"no loan file {', '.join(unknown)}: nothing imported")
    absent = [str(item.path) for item in plan if not item.path.is_file()]
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        raise NotFoundError(f"no file {', '.join(absent[:3])}{more}: nothing imported")


def archived(archive: ArchiveApp, loan_number: str, sha256: str, doc_type: str) -> bool:
    """Whether the loan holds these bytes as a document of this type (see the module's
    docstring: under another type they are filed again)."""
    index = archive.loan_documents(loan_number)
    if index is None:
        return False
    return any(archive.get_document(doc).doc_type == doc_type for doc in index.find(sha256))


def run_import(archive: ArchiveApp, ctx: CommandContext, plan: list[ImportItem]) -> ImportSummary:
    check_plan(archive, plan)
    summary = ImportSummary()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    # On stderr, and only on a terminal: stdout keeps the summary alone (for scripts).
    console = Console(stderr=True)
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as progress:
        task = progress.add_task("importing", total=len(plan))
        for item in plan:
            progress.update(task, description=item.path.name[:40])
            try:
                sha256 = file_sha256(item.path)
                if archived(archive, item.loan_number, sha256, item.doc_type):
                    summary.skipped += 1
                else:
                    with item.path.open("rb") as source:
                        archive.register_document(
                            ctx,
                            source,
                            loan_number=item.loan_number,
                            doc_type=item.doc_type,
                            original_filename=filename(item.path),
                            expected_sha256=sha256,
                        )
                    summary.imported += 1
            except ArchiveError as exc:
                summary.failures.append((item.path, str(exc)))
            except OSError as exc:  # the path is printed with the message already
                summary.failures.append((item.path, exc.strerror or str(exc)))
            progress.advance(task)
    return summary
