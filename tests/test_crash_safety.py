"""Crash safety of uploads: an event never points at nothing.

A child process uploads an original and is made to fail (an exception) or die
(``os._exit``, as a kill would) right after each step of the upload: the bytes
written, verified, made final, and just before the event is appended. Afterwards the
log must hold no event for it, every event's object must exist with its bytes, and
``reconcile`` must report whatever the crash left behind. Then the same upload,
retried, succeeds and adopts what was left.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from factories import loan_terms, settings_json

from archive.application import ArchiveApp, operator_context
from archive.blobstore import content_key
from archive.domain import CommandContext
from archive.settings import Settings

ORIGINAL = b"%PDF-1.7\n" + bytes(range(256)) * 64 + b"\n%%EOF\n"

CHILD = textwrap.dedent(
    """
    import io, json, os, sys
    from archive.application import ArchiveApp
    from archive.domain import CommandContext
    from archive.settings import Settings

    settings = Settings(**json.loads(sys.argv[1]))
    target, mode = sys.argv[2], sys.argv[3]
    archive = ArchiveApp(settings)

    def checkpoint(step):
        if step == target:
            if mode == "kill":
                os._exit(137)
            raise RuntimeError("injected fault at " + step)

    archive.blobs.checkpoint = checkpoint
    ctx = CommandContext("archivist.user", "archivist")
    try:
        archive.register_document(
            ctx, io.BytesIO(bytes.fromhex(sys.argv[4])), loan_number="CR-1",
            doc_type="contract", original_filename="c.pdf",
        )
    except RuntimeError as exc:
        print(exc)
        sys.exit(3)
    sys.exit(0)
    """
)


@pytest.mark.parametrize("mode", ["raise", "kill"])
@pytest.mark.parametrize("step", ["written", "verified", "final", "stored"])
def test_a_crash_never_leaves_an_event_without_its_object(
    doc_settings: Settings, step: str, mode: str
) -> None:
    archive = ArchiveApp(doc_settings)
    try:
        archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
        child = subprocess.run(
            [sys.executable, "-c", CHILD, settings_json(doc_settings), step, mode, ORIGINAL.hex()],
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
        key = content_key(hashlib.sha256(ORIGINAL).hexdigest())
        if step in ("final", "stored"):
            # The object was complete and verified: an orphan, reported.
            assert report.orphans == [key]
        else:
            # Nothing final exists; a killed upload leaves a temporary, reported.
            assert report.orphans == []
            if mode == "kill":
                assert report.temporaries, "a killed upload's leftover must be reported"

        # Retrying the same upload succeeds; an orphan left by the crash is adopted.
        outcome = archive.register_document(
            CommandContext("archivist.user", "archivist"),
            io.BytesIO(ORIGINAL),
            loan_number="CR-1",
            doc_type="contract",
            original_filename="c.pdf",
        )
        document = archive.get_document(outcome.id)
        assert document.object_key == key
        after = archive.reconcile(operator_context("after the retry"))
        assert after.orphans == [] and after.missing == [] and after.changed == []
    finally:
        archive.close()
