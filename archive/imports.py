"""Bulk import of originals from a folder or a manifest, resumable by content.

Each file is hashed locally first: if the loan already holds a document with the same
SHA-256 it is skipped, so an interrupted import simply runs again. The local hash is
sent as the expected checksum, so a file that changes in transit is refused.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

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
    """What to import: every regular file of a folder, or the rows of a manifest CSV."""
    if (directory is None) == (manifest is None):
        raise DomainError("give either a folder (with --loan and --type) or --manifest")
    if manifest is not None:
        try:
            with manifest.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except OSError as exc:
            raise DomainError(f"cannot read manifest {manifest}: {exc.strerror}") from None
        needed = {"path", "loan_number", "doc_type"}
        if rows and not needed <= set(rows[0]):
            raise DomainError(f"the manifest needs the columns {', '.join(sorted(needed))}")
        base = manifest.parent
        return [ImportItem(base / r["path"], r["loan_number"], r["doc_type"]) for r in rows]
    assert directory is not None
    if not directory.is_dir():
        raise DomainError(f"{directory} is not a folder")
    if not loan or not doc_type:
        raise DomainError("importing a folder needs --loan and --type")
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return [ImportItem(p, loan, doc_type) for p in files]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_plan(archive: ArchiveApp, plan: list[ImportItem]) -> None:
    """Refuse the whole import, before a byte moves, if a loan or a type is wrong: one
    line to fix the command or the manifest, not the same failure for every file."""
    for doc_type in sorted({item.doc_type for item in plan}):
        choice(DocumentType, doc_type, "document type")
    unknown = [n for n in sorted({item.loan_number for item in plan}) if not archive.has_loan(n)]
    if unknown:
        raise NotFoundError(f"no loan file {', '.join(unknown)}: nothing imported")


def run_import(archive: ArchiveApp, ctx: CommandContext, plan: list[ImportItem]) -> ImportSummary:
    check_plan(archive, plan)
    summary = ImportSummary()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("importing", total=len(plan))
        for item in plan:
            progress.update(task, description=item.path.name[:40])
            try:
                sha256 = file_sha256(item.path)
                index = archive.loan_documents(item.loan_number)
                if index is not None and index.find(sha256):
                    summary.skipped += 1
                else:
                    with item.path.open("rb") as source:
                        archive.register_document(
                            ctx,
                            source,
                            loan_number=item.loan_number,
                            doc_type=item.doc_type,
                            original_filename=item.path.name,
                            expected_sha256=sha256,
                        )
                    summary.imported += 1
            except (ArchiveError, OSError) as exc:
                summary.failures.append((item.path, str(exc)))
            progress.advance(task)
    return summary
