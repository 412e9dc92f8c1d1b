"""The OCR worker against real Tesseract, real storage and both event stores."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from factories import loan_terms, settings_json, upload
from ocr_fixtures import CADASTRAL_REFERENCE, DEED_LINES, png, scanned_page, text_pdf

from archive.application import ArchiveApp
from archive.domain import CommandContext
from archive.settings import Settings
from archive.worker import ExtractionWorker
from projections.follower import Follower
from projections.loan_files import LoanFilesView
from projections.store import open_store

ROOT = Path(__file__).parents[1]


def events_of(archive: ArchiveApp, document_id: UUID) -> list[Any]:
    return list(archive.repository.event_store.get(document_id))


def kinds(archive: ArchiveApp, document_id: UUID) -> list[str]:
    return [type(e).__name__ for e in events_of(archive, document_id)]


@pytest.fixture
def prepared(doc_settings: Settings) -> Any:
    archive = ArchiveApp(doc_settings)
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    store = open_store(doc_settings)
    yield archive, store
    store.close()
    archive.close()


def test_worker_extracts_scans_and_text_layers_and_reports_failures(prepared: Any) -> None:
    archive, store = prepared
    scan = upload(archive, png(scanned_page(DEED_LINES[:10], dpi=200).image), "escaneo.png")
    typed = upload(archive, text_pdf([DEED_LINES[:6], DEED_LINES[6:12]]), "escritura.pdf")
    broken = upload(archive, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "roto.pdf")
    assert archive.get_document(scan).extraction["status"] == "pending"

    worker = ExtractionWorker(archive, store, name="ocr@test:1")
    assert worker.run_once() == 3
    assert worker.run_once() == 0  # nothing new: tracking moved past the three

    done = archive.get_document(scan).extraction
    assert done["status"] == "done" and done["pages"] == 1 and done["engine"] == "tesseract"
    text_event = events_of(archive, scan)[-1]
    assert type(text_event).__name__ == "TextExtracted"
    page = text_event.pages[0]
    assert page["method"] == "ocr" and CADASTRAL_REFERENCE in page["text"]
    assert "PRÉSTAMO" in page["text"] and page["confidence"] > 50

    typed_pages = events_of(archive, typed)[-1].pages
    assert [p["method"] for p in typed_pages] == ["text_layer", "text_layer"]
    assert "Notario" in typed_pages[0]["text"]

    failed = archive.get_document(broken).extraction
    assert failed["status"] == "failed" and failed["reason"].startswith("malformed")
    assert archive.verify_chain().ok


def test_reindex_records_a_new_result_and_keeps_the_old(prepared: Any) -> None:
    archive, store = prepared
    doc = upload(archive, text_pdf([DEED_LINES[:5]]), "escritura.pdf")
    worker = ExtractionWorker(archive, store, name="ocr@test:1")
    worker.run_once()
    archive.request_reindex(CommandContext("archivist.user", "archivist", "tesseract upgrade"), doc)
    assert archive.get_document(doc).extraction["status"] == "pending"
    worker.run_once()
    assert kinds(archive, doc) == [
        "Registered",
        "ExtractionStarted",
        "TextExtracted",
        "ReindexRequested",
        "ExtractionStarted",
        "TextExtracted",
    ]
    assert [e.attempt for e in events_of(archive, doc) if type(e).__name__ == "TextExtracted"] == [
        1,
        2,
    ]


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from archive.application import ArchiveApp
    from archive.settings import Settings
    from archive.worker import ExtractionWorker, run_extraction
    from projections.store import open_store

    settings = Settings(**json.loads(sys.argv[1]))
    name, mode = sys.argv[2], sys.argv[3]

    def slow(data, media_type, languages):
        time.sleep(60)  # killed in here
        return run_extraction(data, media_type, languages)

    archive = ArchiveApp(settings)
    worker = ExtractionWorker(
        archive, open_store(settings), name=name,
        extract=slow if mode == "hang" else run_extraction,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if worker.run_once() == 0 and mode == "drain":
            break
    """
)


def start_worker(settings: Settings, name: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, settings_json(settings), name, mode],
        cwd=ROOT,
        text=True,
        stderr=subprocess.PIPE,
    )


def test_a_killed_worker_resumes_and_the_document_gets_one_result(settings: Settings) -> None:
    archive = ArchiveApp(settings)
    try:
        archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
        doc = upload(archive, text_pdf([DEED_LINES[:5]]))
        child = start_worker(settings, "ocr@host-a:1", "hang")
        deadline = time.monotonic() + 60
        while archive.get_document(doc).extraction["status"] != "running":
            assert time.monotonic() < deadline, "the worker never claimed the document"
            time.sleep(0.1)
        child.kill()  # mid-document, as a crash or an OOM kill would
        child.wait(timeout=30)
        assert archive.get_document(doc).extraction["status"] == "running"

        # The same worker restarted (same name, new process) claims it again and finishes.
        with open_store(settings) as store:
            worker = ExtractionWorker(archive, store, name="ocr@host-a:1")
            assert worker.run_once() == 1
            assert worker.run_once() == 0
        assert kinds(archive, doc) == [
            "Registered",
            "ExtractionStarted",
            "ExtractionStarted",
            "TextExtracted",
        ]
        assert archive.get_document(doc).extraction["attempt"] == 2
    finally:
        archive.close()


def test_two_worker_processes_split_the_work_without_doing_anything_twice(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=postgres_url, demo_data=False)
    archive = ArchiveApp(settings)
    try:
        archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
        docs = [upload(archive, text_pdf([[f"Documento {i}", *DEED_LINES[:3]]])) for i in range(8)]
        workers = [start_worker(settings, f"ocr@host-{x}:1", "drain") for x in ("a", "b")]
        for child in workers:
            _, stderr = child.communicate(timeout=180)
            assert child.returncode == 0, stderr[-2000:]
        by_worker: dict[str, int] = {}
        for doc in docs:
            history = events_of(archive, doc)
            assert [type(e).__name__ for e in history] == [
                "Registered",
                "ExtractionStarted",
                "TextExtracted",
            ], doc
            by_worker[history[1].worker] = by_worker.get(history[1].worker, 0) + 1
        assert sum(by_worker.values()) == len(docs)
    finally:
        archive.close()


def test_a_claim_whose_worker_never_returns_is_taken_over_when_its_lease_ends(
    prepared: Any,
) -> None:
    """A worker killed mid-document that never comes back under its name (a recreated
    container has a new hostname): the worker that passed the document under its live
    claim takes it over once the lease is over, and the document gets one result."""
    archive, store = prepared
    doc = upload(archive, text_pdf([DEED_LINES[:5]]), "escritura.pdf")
    gone = CommandContext("ocr@gone", "archivist", "text extraction")
    archive.claim_extraction(gone, archive.get_document(doc), "ocr@gone")  # then it died

    worker = ExtractionWorker(archive, store, name="ocr@alive", lease=timedelta(seconds=1))
    assert worker.run_once() == 1  # passes the document: its claim is still live
    assert archive.get_document(doc).extraction["status"] == "running"
    time.sleep(1.2)
    assert worker.run_once() == 0  # nothing new in the log, but the lease is over
    assert kinds(archive, doc) == [
        "Registered",
        "ExtractionStarted",
        "ExtractionStarted",
        "TextExtracted",
    ]
    assert events_of(archive, doc)[-1].attempt == 2
    assert worker.run_once() == 0 and len(events_of(archive, doc)) == 4


def test_a_claim_left_running_is_taken_over_by_a_worker_started_after_it(
    prepared: Any,
) -> None:
    """Every worker that passed a dead worker's claim restarted too (the watch list is
    in memory): a worker starting finds the claim through the loan_files view and takes
    it over when the lease ends, though the request is behind its tracking position."""
    archive, store = prepared
    doc = upload(archive, text_pdf([DEED_LINES[:5]]), "escritura.pdf")
    gone = CommandContext("ocr@gone", "archivist", "text extraction")
    archive.claim_extraction(gone, archive.get_document(doc), "ocr@gone")  # then it died
    passed = ExtractionWorker(archive, store, name="ocr@new", lease=timedelta(seconds=1))
    assert passed.run_once() == 1  # passed it under the live claim, then restarted:
    Follower(LoanFilesView(), archive, store).catch_up()  # (the server's view follows)

    restarted = ExtractionWorker(archive, store, name="ocr@new", lease=timedelta(seconds=1))
    time.sleep(1.2)
    assert restarted.run_once() == 0  # nothing new in the log, but the lease is over
    assert kinds(archive, doc)[-1] == "TextExtracted"
    assert events_of(archive, doc)[-1].attempt == 2


def test_a_worker_on_a_database_no_server_has_followed_starts(settings: Settings) -> None:
    """No loan_files view yet (the worker started first): nothing to recover."""
    archive = ArchiveApp(settings)
    store = open_store(settings)
    try:
        worker = ExtractionWorker(archive, store, name="ocr@first")
        assert worker.watched == {} and worker.run_once() == 0
    finally:
        store.close()
        archive.close()
