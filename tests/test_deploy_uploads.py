"""The scale deployment (PostgreSQL + S3) under the load a bank puts on it: many uploads
to one loan at once, and legal holds on originals that several documents share.

Each test runs on PostgreSQL with SeaweedFS (the deployment) and on SQLite with the
filesystem store (the embedded default).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from factories import loan_terms
from ocr_fixtures import DEED_LINES, text_pdf

from archive.application import ArchiveApp
from archive.documents import LoanDocuments
from archive.domain import CommandContext
from archive.settings import Settings

ARCHIVIST = CommandContext("archivist.one", "archivist", "upload")
READER = CommandContext("auditor.one", "auditor")


@pytest.fixture(params=["postgres+s3", "sqlite+filesystem"])
def deploy_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "postgres+s3":
        url = request.getfixturevalue("postgres_url")
        bucket = request.getfixturevalue("s3_bucket")
        server = request.getfixturevalue("seaweedfs")
        return server.settings(tmp_path, bucket, database_url=url, retention_days=1)
    return Settings(data_dir=tmp_path, demo_data=False)


@pytest.fixture
def deployed(deploy_settings: Settings) -> Iterator[ArchiveApp]:
    archive = ArchiveApp(deploy_settings)
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-2"))
    yield archive
    archive.close()


def register(archive: ArchiveApp, content: bytes, loan: str = "CR-1", **kw: Any) -> UUID:
    return archive.register_document(
        ARCHIVIST,
        io.BytesIO(content),
        loan_number=loan,
        doc_type="contract",
        original_filename="doc.pdf",
        **kw,
    ).id


def pdf(n: int) -> bytes:
    return text_pdf([[f"Documento {n}", *DEED_LINES[:3]]])


class RacedArchive(ArchiveApp):
    """Fault injection: another server files a document under the same loan between
    this one's read of the loan's document index and its append (the window real
    concurrent uploads hit, made certain)."""

    name = ArchiveApp.name  # the library names a subclass's tables after it otherwise

    def __init__(self, settings: Settings, other: ArchiveApp) -> None:
        super().__init__(settings)
        self.other = other
        self.raced = 0

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        if not self.raced and any(isinstance(o, LoanDocuments) for o in objs):
            self.raced += 1
            register(self.other, pdf(999))
        return super().save(*objs, **kwargs)


def test_an_upload_racing_another_on_the_same_loan_is_filed_not_refused(
    deployed: ArchiveApp, deploy_settings: Settings
) -> None:
    register(deployed, pdf(0))  # the index exists: the race is on its next version
    raced = RacedArchive(deploy_settings, deployed)
    try:
        document = register(raced, pdf(1))
        assert raced.raced == 1
    finally:
        raced.close()
    index = deployed.loan_documents("CR-1")
    assert index is not None and document in index.document_ids()
    assert len(index.document_ids()) == 3
    assert deployed.reconcile(ARCHIVIST).orphans == []


def test_many_concurrent_uploads_to_one_loan_are_all_filed(
    deployed: ArchiveApp, deploy_settings: Settings
) -> None:
    """The real thing: two servers, twelve uploads at once, six of them the same bytes."""
    second = ArchiveApp(deploy_settings)
    start = threading.Barrier(12)

    def upload(n: int) -> UUID:
        start.wait()
        return register(deployed if n % 2 else second, pdf(n % 7))

    try:
        with ThreadPoolExecutor(12) as pool:
            documents = list(pool.map(upload, range(12)))
    finally:
        second.close()
    index = deployed.loan_documents("CR-1")
    assert index is not None and sorted(index.document_ids()) == sorted(documents)
    assert deployed.reconcile(ARCHIVIST).orphans == []


def test_releasing_one_documents_hold_keeps_the_hold_another_has_on_the_same_original(
    deployed: ArchiveApp,
) -> None:
    """The same bytes under two loans are one stored object (version); a legal hold
    released on one document must not lift it while the other is still held."""
    content = pdf(1)
    first, second = register(deployed, content, "CR-1"), register(deployed, content, "CR-2")
    a, b = deployed.get_document(first), deployed.get_document(second)
    assert (a.object_key, a.object_version) == (b.object_key, b.object_version)

    def stored_hold() -> bool:
        info = deployed.blobs.stat(a.object_key, a.object_version)
        assert info is not None
        return info.legal_hold

    deployed.set_legal_hold(ARCHIVIST, first, True)
    deployed.set_legal_hold(ARCHIVIST, second, True)
    deployed.set_legal_hold(ARCHIVIST, second, False)
    assert deployed.get_document(first).legal_hold
    assert stored_hold(), "the hold of the document still held was lifted in storage"
    deployed.set_legal_hold(ARCHIVIST, first, False)
    assert not stored_hold()


class DownloadedMeanwhile(ArchiveApp):
    """Fault injection: another server records a download of the document between this
    one's setting of a legal hold in storage and its append (the window a real download
    at the same moment hits, made certain)."""

    name = ArchiveApp.name

    def __init__(self, settings: Settings, other: ArchiveApp) -> None:
        super().__init__(settings)
        self.other = other
        self.raced = 0

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        if not self.raced:
            self.raced += 1
            [document] = objs
            self.other.change_document(
                READER, document.id, lambda d: d.record_download(READER, None)
            )
        return super().save(*objs, **kwargs)


def test_a_legal_hold_set_while_the_document_is_downloaded_is_recorded_not_refused(
    deployed: ArchiveApp, deploy_settings: Settings
) -> None:
    """Storage was changed before the append; a 409 then left the hold in force but not
    recorded (or lifted but still recorded)."""
    document_id = register(deployed, pdf(1))
    raced = DownloadedMeanwhile(deploy_settings, deployed)
    try:
        raced.set_legal_hold(ARCHIVIST, document_id, True)
        assert raced.raced == 1
    finally:
        raced.close()
    document = deployed.get_document(document_id)
    assert document.legal_hold and document.downloads == 1
    info = deployed.blobs.stat(document.object_key, document.object_version)
    assert info is not None and info.legal_hold
