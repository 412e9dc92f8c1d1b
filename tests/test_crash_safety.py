"""Crash safety of uploads: an event never points at nothing.

A child process uploads an original and is made to fail (an exception) or die
(``os._exit``, as a kill would) right after each step of the upload the store goes
through (``PUT_STEPS``: the bytes written, verified, made final), and just before the
event is appended ("stored"). Afterwards the log must hold no event for it, every
event's object must exist with its bytes, and ``reconcile`` must report whatever the
crash left behind. Then the same upload, retried, succeeds and adopts what was left.
Each way a store can take is covered: on S3 one PutObject (small), a multipart upload
from a spool (larger, undeclared) and one streamed to the declared key.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from factories import loan_terms, settings_json
from test_blobstores import PUT_STEPS

from archive.application import ArchiveApp, operator_context
from archive.blobstore import content_key
from archive.domain import CommandContext
from archive.settings import Settings

HEAD = b"%PDF-1.7\n" + bytes(range(256)) * 64 + b"\n%%EOF\n"

CHILD = textwrap.dedent(
    """
    import io, json, os, sys
    from pathlib import Path
    from archive.application import ArchiveApp
    from archive.domain import CommandContext
    from archive.settings import Settings

    settings = Settings(**json.loads(sys.argv[1]))
    target, mode, path, declared = sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    archive = ArchiveApp(settings)

    def checkpoint(step):
        if step == target:
            if mode == "kill":
                os._exit(137)
            raise RuntimeError("injected fault at " + step)

    archive.blobs.checkpoint = checkpoint
    ctx = CommandContext("archivist.user", "archivist")
    try:
        with path.open("rb") as source:
            archive.register_document(
                ctx, source, loan_number="CR-1", doc_type="contract",
                original_filename="c.pdf", expected_sha256=declared or None,
            )
    except RuntimeError as exc:
        print(exc)
        sys.exit(3)
    sys.exit(0)
    """
)

CASES = [
    (backend, way, step)
    for (backend, way), steps in sorted(PUT_STEPS.items())
    for step in [*steps, "stored"]
]


def original(archive: ArchiveApp, way: str) -> bytes:
    """A PDF for this way of storing: larger than the store's part when not "small"."""
    if way == "small":
        return HEAD
    return HEAD + os.urandom(getattr(archive.blobs, "part_size", 8 * 1024 * 1024))


@pytest.mark.parametrize("mode", ["raise", "kill"])
@pytest.mark.parametrize(("blob_backend", "way", "step"), CASES)
def test_a_crash_never_leaves_an_event_without_its_object(
    doc_settings: Settings, blob_backend: str, way: str, step: str, mode: str, tmp_path: Path
) -> None:
    archive = ArchiveApp(doc_settings)
    try:
        archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
        data = original(archive, way)
        sha256 = hashlib.sha256(data).hexdigest()
        declared = sha256 if way == "streamed" else ""
        path = tmp_path / "c.pdf"
        path.write_bytes(data)
        args = [settings_json(doc_settings), step, mode, str(path), declared]
        child = subprocess.run(
            [sys.executable, "-c", CHILD, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parents[1],
        )
        expected_code = 137 if mode == "kill" else 3
        assert child.returncode == expected_code, child.stderr

        # No event references the interrupted upload.
        assert archive.loan_documents("CR-1") is None
        assert list(archive.document_ids()) == []

        report = archive.reconcile(operator_context("after the crash"))
        assert report.missing == [] and report.changed == []
        key = content_key(sha256)
        if step in ("final", "stored"):
            # The object was complete and verified: an orphan, reported.
            assert report.orphans == [key]
            assert report.temporaries == []
        else:
            # Nothing final exists. A failure cleans up after itself; a killed upload
            # leaves its temporary (a file, an unfinished multipart upload), reported --
            # except S3's single PutObject, before which nothing is written at all.
            assert report.orphans == []
            writes_first = (blob_backend, way) != ("s3", "small")
            assert bool(report.temporaries) == (mode == "kill" and writes_first)

        # Retrying the same upload succeeds; an orphan left by the crash is adopted.
        outcome = archive.register_document(
            CommandContext("archivist.user", "archivist"),
            io.BytesIO(data),
            loan_number="CR-1",
            doc_type="contract",
            original_filename="c.pdf",
            expected_sha256=declared or None,
        )
        document = archive.get_document(outcome.id)
        assert document.object_key == key
        assert b"".join(archive.original_bytes(document)) == data
        after = archive.reconcile(operator_context("after the retry"))
        assert after.orphans == [] and after.missing == [] and after.changed == []
    finally:
        archive.close()
