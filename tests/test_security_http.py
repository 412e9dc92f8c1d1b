"""HTTP hardening found by the security review: request body limits, response headers
that keep originals from being rendered or cached, and numbers too long to convert."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import loan_terms
from fastapi.testclient import TestClient

from api.app import JSON_BODY_LIMIT, create_app
from archive.application import ArchiveApp, operator_context
from archive.domain import CommandContext
from archive.settings import Settings

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
# An HTML page the sniffer takes for a PDF (readers accept "%PDF-" anywhere in the first
# kilobyte): a browser that sniffed it would run its script on the archive's origin.
POLYGLOT = b"<html><!-- %PDF-1.4 --><script>alert(document.domain)</script></html>"
HUGE = "9" * 5000  # past int()'s 4300-digit limit


class World:
    def __init__(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path, demo_data=False)
        self.archive = ArchiveApp(settings)
        self.http = TestClient(create_app(settings, self.archive))
        operator = operator_context()
        self.tokens = {
            role: self.archive.add_user(operator, f"{role.replace('_', '.')}.user", role)
            for role in ("archivist", "credit_officer", "auditor", "admin")
        }
        officer = CommandContext("credit.officer.user", "credit_officer")
        self.archive.open_loan(officer, **loan_terms("CR-1"))
        self.document = self.archive.register_document(
            officer,
            io.BytesIO(PDF),
            loan_number="CR-1",
            doc_type="contract",
            original_filename="c.pdf",
        ).id

    def as_(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def loan_version(self) -> int:
        return int(self.archive.get_loan("CR-1").version)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    with made.http:
        yield made
    made.archive.close()


def assert_problem(response: Any, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert fragment in response.json()["detail"], response.json()


# -- request bodies -----------------------------------------------------------------------------


def status_body(reason_chars: int) -> bytes:
    return b'{"status": "overdue", "reason": "' + b"a" * reason_chars + b'"}'


def test_a_json_body_past_the_limit_is_refused_before_it_is_buffered(world: World) -> None:
    """Any JSON route read a body of up to the upload limit (10 GiB) whole into memory:
    one credit officer's request could exhaust the server's memory."""
    before = world.loan_version()
    path = "/api/v1/loans/CR-1/status"
    headers = {**world.as_("credit_officer"), "Content-Type": "application/json"}
    big = status_body(JSON_BODY_LIMIT + 1)
    # Declared: refused from its length.
    assert_problem(world.http.post(path, headers=headers, content=big), 413, "limited to")

    # Chunked (no length declared): refused as it arrives.
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    answer = world.http.post(path, headers=headers, content=chunks())
    assert_problem(answer, 413, "limited to")
    assert world.loan_version() == before
    # A body within the limit still works, and a caller without a token still hears 401.
    assert world.http.post(path, headers=headers, content=status_body(10)).status_code == 200
    unauthenticated = world.http.post(path, content=status_body(10))
    assert_problem(unauthenticated, 401, "Bearer")


def test_uploads_keep_their_own_limit(world: World) -> None:
    """The upload route streams its body: the JSON limit does not apply to it."""
    original = PDF + b"%" + b"x" * (JSON_BODY_LIMIT + 10) + b"\n"
    answer = world.http.post(
        "/api/v1/documents",
        headers=world.as_("archivist"),
        data={"loan_number": "CR-1", "doc_type": "contract"},
        files={"file": ("big.pdf", original, "application/pdf")},
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["size"] == len(original)


# -- response headers ---------------------------------------------------------------------------


def test_an_html_page_passing_for_a_pdf_is_never_rendered_or_cached(world: World) -> None:
    uploaded = world.http.post(
        "/api/v1/documents",
        headers=world.as_("archivist"),
        data={"loan_number": "CR-1", "doc_type": "other"},
        files={"file": ("x.pdf", POLYGLOT, "application/pdf")},
    )
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.headers["cache-control"] == "no-store"
    download = world.http.get(
        f"/api/v1/documents/{uploaded.json()['id']}/original", headers=world.as_("auditor")
    )
    assert download.status_code == 200 and download.content == POLYGLOT
    assert download.headers["content-type"] == "application/pdf"
    assert download.headers["x-content-type-options"] == "nosniff"
    assert download.headers["content-disposition"].startswith("attachment;")
    assert download.headers["cache-control"] == "no-store"


def test_authenticated_answers_are_not_cached_and_never_sniffed(world: World) -> None:
    loan = world.http.get("/api/v1/loans/CR-1", headers=world.as_("auditor"))
    assert loan.status_code == 200
    new_user = world.http.post(
        "/api/v1/users", headers=world.as_("admin"), json={"name": "ana.perez", "role": "auditor"}
    )
    assert new_user.status_code == 201 and "token" in new_user.json()
    refused = world.http.get("/api/v1/loans/CR-1")
    assert refused.status_code == 401
    for answer in (loan, new_user, refused):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"
    health = world.http.get("/healthz")
    assert health.headers["x-content-type-options"] == "nosniff"
    # No CORS: a page on another origin gets no permission to read answers.
    preflight = world.http.options(
        "/api/v1/loans",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers


# -- numbers too long to convert --------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "status"),
    [
        (f"bytes=0-{HUGE}", 206),  # to the end
        (f"bytes=-{HUGE}", 206),  # a suffix longer than the file: all of it
        (f"bytes={HUGE}-", 416),  # starts past the end
        (f"bytes=000{len(PDF) - 1}-0000{len(PDF) + 5}", 206),  # leading zeros still count
    ],
)
def test_a_range_with_a_huge_number_is_answered(
    world: World, range_header: str, status: int
) -> None:
    answer = world.http.get(
        f"/api/v1/documents/{world.document}/original",
        headers={**world.as_("auditor"), "Range": range_header},
    )
    assert answer.status_code == status, answer.text
    if status == 206:
        assert answer.content == PDF[-len(answer.content) :]
        assert answer.headers["content-range"].endswith(f"/{len(PDF)}")


def test_an_if_match_with_a_huge_number_is_a_422(world: World) -> None:
    before = world.loan_version()
    headers = {**world.as_("credit_officer"), "If-Match": f'"{HUGE}"'}
    body = {"status": "overdue", "reason": "x"}
    answer = world.http.post("/api/v1/loans/CR-1/status", headers=headers, json=body)
    assert_problem(answer, 422, "If-Match must be a version ETag")
    assert world.loan_version() == before
    # Leading zeros name the same version.
    headers["If-Match"] = f'"000{before}"'
    assert (
        world.http.post("/api/v1/loans/CR-1/status", headers=headers, json=body).status_code == 200
    )
