"""Originals end to end over HTTP, on every blob store (filesystem and real S3)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
from factories import loan_terms, mortgage_fields
from fastapi.testclient import TestClient

from api.app import create_app
from archive.application import ArchiveApp, operator_context
from archive.documents import sanitise_filename
from archive.domain import CommandContext
from archive.settings import Settings

PDF = b"%PDF-1.7\n" + os.urandom(5000) + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
TIFF = b"II*\x00" + os.urandom(2000)
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(2000)


class Client:
    """A TestClient with one user per role."""

    def __init__(self, archive: ArchiveApp, settings: Settings) -> None:
        self.archive = archive
        self.http = TestClient(create_app(settings, archive))
        operator = operator_context()
        self.tokens = {
            role: archive.add_user(operator, f"{role.replace('_', '.')}.user", role)
            for role in ("archivist", "credit_officer", "auditor", "compliance", "admin")
        }
        officer = CommandContext("credit.officer.user", "credit_officer")
        archive.open_loan(officer, **loan_terms("CR-1"))
        archive.open_loan(officer, **loan_terms("CR-2"))

    def as_(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def upload(
        self,
        content: bytes,
        filename: str = "contrato.pdf",
        role: str = "archivist",
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> Any:
        data = {"loan_number": "CR-1", "doc_type": "contract", **fields}
        return self.http.post(
            "/api/v1/documents",
            headers={**self.as_(role), **(headers or {})},
            data={k: str(v) for k, v in data.items() if v is not None},
            files={"file": (filename, content, "application/octet-stream")},
        )


@pytest.fixture
def client(doc_archive: ArchiveApp, doc_settings: Settings) -> Client:
    return Client(doc_archive, doc_settings)


def document_events(archive: ArchiveApp) -> list[Any]:
    return [
        e for _, e in archive.loan_events("CR-1") if type(e).__qualname__.startswith("Document.")
    ]


def assert_problem(response: Any, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and fragment in body["detail"], body


# -- upload and download --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "media_type"),
    [(PDF, "application/pdf"), (PNG, "image/png"), (TIFF, "image/tiff"), (JPEG, "image/jpeg")],
)
def test_upload_then_download_exact_bytes(client: Client, content: bytes, media_type: str) -> None:
    answer = client.upload(content, filename="Escritura hipoteca ñ.bin")
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["size"] == len(content)
    assert body["media_type"] == media_type  # sniffed, not the client's octet-stream
    assert answer.headers["location"] == f"/api/v1/documents/{body['id']}"

    got = client.http.get(
        f"/api/v1/documents/{body['id']}/original", headers=client.as_("compliance")
    )
    assert got.status_code == 200
    assert got.content == content
    assert got.headers["content-type"] == media_type
    assert got.headers["etag"] == f'"{body["sha256"]}"'
    assert got.headers["content-length"] == str(len(content))
    assert (
        "filename*=UTF-8''Escritura%20hipoteca%20%C3%B1.bin" in got.headers["content-disposition"]
    )

    meta = client.http.get(f"/api/v1/documents/{body['id']}", headers=client.as_("auditor")).json()
    assert meta["uploaded_by"] == "archivist.user"
    assert meta["downloads"] == 1
    assert meta["object_key"].endswith(body["sha256"])


def test_range_requests(client: Client) -> None:
    doc = client.upload(PDF).json()["id"]
    url = f"/api/v1/documents/{doc}/original"
    for header, expected, content_range in [
        ("bytes=0-9", PDF[:10], f"bytes 0-9/{len(PDF)}"),
        ("bytes=100-", PDF[100:], f"bytes 100-{len(PDF) - 1}/{len(PDF)}"),
        ("bytes=-7", PDF[-7:], f"bytes {len(PDF) - 7}-{len(PDF) - 1}/{len(PDF)}"),
        ("bytes=10-999999", PDF[10:], f"bytes 10-{len(PDF) - 1}/{len(PDF)}"),
    ]:
        got = client.http.get(url, headers={**client.as_("auditor"), "Range": header})
        assert got.status_code == 206, header
        assert got.content == expected, header
        assert got.headers["content-range"] == content_range
    outside = client.http.get(url, headers={**client.as_("auditor"), "Range": f"bytes={len(PDF)}-"})
    assert_problem(outside, 416, "outside")
    assert outside.headers["content-range"] == f"bytes */{len(PDF)}"
    ranges = [e.range for e in document_events(client.archive) if type(e).__name__ == "Downloaded"]
    assert ranges[:2] == ["0-9", f"100-{len(PDF) - 1}"]  # the bytes actually served


def test_a_range_under_another_validator_sends_the_whole_file(client: Client) -> None:
    """RFC 9110 If-Range: a resumed download whose validator is not this original's ETag
    (another file's, a weak tag, a date: none is sent) gets the whole file, not a part
    to stitch onto other bytes."""
    answer = client.upload(PDF).json()
    url = f"/api/v1/documents/{answer['id']}/original"
    etag = f'"{answer["sha256"]}"'
    for validator in ('"0123"', f"W/{etag}", "Sun, 06 Nov 1994 08:49:37 GMT"):
        headers = {**client.as_("auditor"), "Range": "bytes=0-9", "If-Range": validator}
        got = client.http.get(url, headers=headers)
        assert got.status_code == 200, validator
        assert got.content == PDF and "content-range" not in got.headers
    headers = {**client.as_("auditor"), "Range": "bytes=0-9", "If-Range": etag}
    got = client.http.get(url, headers=headers)
    assert got.status_code == 206 and got.content == PDF[:10]


def test_every_download_is_recorded_with_its_reader(client: Client) -> None:
    doc = client.upload(PDF).json()["id"]
    for role in ("auditor", "compliance", "credit_officer"):
        got = client.http.get(f"/api/v1/documents/{doc}/original", headers=client.as_(role))
        assert got.status_code == 200
    downloads = [
        (e.actor_id, e.actor_role)
        for e in document_events(client.archive)
        if type(e).__name__ == "Downloaded"
    ]
    assert downloads == [
        ("auditor.user", "auditor"),
        ("compliance.user", "compliance"),
        ("credit.officer.user", "credit_officer"),
    ]
    history = client.http.get("/api/v1/loans/CR-1/history", headers=client.as_("auditor")).json()
    assert [h["actor"] for h in history if h["type"] == "Downloaded"] == [d[0] for d in downloads]


def test_head_and_a_cached_copy_send_no_bytes_and_record_no_download(client: Client) -> None:
    doc = client.upload(PDF, filename="escritura.pdf").json()["id"]
    url = f"/api/v1/documents/{doc}/original"
    etag = f'"{hashlib.sha256(PDF).hexdigest()}"'

    head = client.http.head(url, headers=client.as_("auditor"))
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == etag
    assert head.headers["content-length"] == str(len(PDF))
    assert head.headers["content-type"] == "application/pdf"
    assert "escritura.pdf" in head.headers["content-disposition"]
    for held in (etag, f'W/{etag}, "other"', "*"):
        cached = client.http.get(url, headers={**client.as_("auditor"), "If-None-Match": held})
        assert (cached.status_code, cached.content) == (304, b""), held
        assert cached.headers["etag"] == etag
    stale = client.http.get(url, headers={**client.as_("auditor"), "If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.content == PDF
    downloads = [e for e in document_events(client.archive) if type(e).__name__ == "Downloaded"]
    assert len(downloads) == 1  # only the GET that sent the bytes
    assert client.http.head(url).status_code == 401


@pytest.mark.parametrize("declared", [False, True])
def test_a_file_larger_than_a_part_streams_through(client: Client, declared: bool) -> None:
    """Over one S3 part: spooled and uploaded (no checksum declared), or streamed straight
    to its content address (Content-Digest)."""
    content = PDF + os.urandom(9 * 1024 * 1024)
    digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
    headers = {"Content-Digest": f"sha-256=:{digest}:"} if declared else None
    answer = client.upload(content, headers=headers)
    assert answer.status_code == 201, answer.text
    assert answer.json()["size"] == len(content)
    got = client.http.get(
        f"/api/v1/documents/{answer.json()['id']}/original", headers=client.as_("auditor")
    )
    assert got.content == content
    assert list(client.archive.blobs.temporary_keys()) == []


def test_same_bytes_twice_are_stored_once(client: Client) -> None:
    first = client.upload(PDF).json()
    second = client.upload(PDF, filename="copia.pdf", loan_number="CR-2").json()
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    assert list(client.archive.blobs.keys()) == [
        f"sha256/{first['sha256'][:2]}/{first['sha256'][2:4]}/{first['sha256']}"
    ]


def test_filename_is_metadata_only(client: Client) -> None:
    doc = client.upload(PDF, filename="../../etc/pass|wd.pdf").json()["id"]
    meta = client.archive.get_document(UUID(doc))
    assert meta.original_filename == "pass_wd.pdf"
    assert not any(".." in k or "pass" in k for k in client.archive.blobs.keys())  # noqa: SIM118


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("C:\\Users\\ana\\deed.pdf", "deed.pdf"),
        ("a\x00b\x1fc.tif", "a_b_c.tif"),
        ("  .hidden. ", "hidden"),
        ("", "original"),
        (None, "original"),
        ("x" * 300 + ".pdf", "x" * 190 + ".pdf"),
    ],
)
def test_sanitise_filename(given: str | None, kept: str) -> None:
    assert sanitise_filename(given) == kept


def test_links_and_supersession(client: Client) -> None:
    officer = CommandContext("credit.officer.user", "credit_officer")
    reg = client.archive.register_collateral(officer, **mortgage_fields("CR-1"))
    old = client.upload(PDF, doc_type="mortgage_deed", collateral_id=reg.id).json()["id"]
    corrected = PDF + b"% corrected\n"
    new = client.upload(
        corrected, doc_type="mortgage_deed", collateral_id=reg.id, supersedes=old
    ).json()["id"]
    old_meta = client.http.get(f"/api/v1/documents/{old}", headers=client.as_("auditor")).json()
    new_meta = client.http.get(f"/api/v1/documents/{new}", headers=client.as_("auditor")).json()
    assert old_meta["superseded_by"] == new and new_meta["supersedes"] == old
    assert new_meta["collateral_id"] == str(reg.id)
    # Both originals stay, byte for byte.
    for doc, content in ((old, PDF), (new, corrected)):
        got = client.http.get(f"/api/v1/documents/{doc}/original", headers=client.as_("auditor"))
        assert got.content == content
    loan = client.http.get("/api/v1/loans/CR-1", headers=client.as_("auditor")).json()
    assert [d["document_id"] for d in loan["documents"]] == [old, new]
    listed = client.http.get("/api/v1/loans", headers=client.as_("auditor")).json()["items"]
    assert [d["document_id"] for d in listed[0]["documents"]] == [old, new]
    only_listed = {"last_downloaded_at", "updated_at"}  # the log's state does not keep these
    assert set(listed[0]["documents"][0]) - only_listed == set(loan["documents"][0])
    again = client.upload(PDF + b"x", supersedes=old)
    assert_problem(again, 422, "already superseded")
    elsewhere = client.upload(PDF + b"y", loan_number="CR-2", collateral_id=reg.id)
    assert_problem(elsewhere, 422, "secures another loan")


# -- bad input: clear errors, nothing stored or registered ----------------------------------


def nothing_stored(client: Client) -> None:
    assert document_events(client.archive) == []
    assert list(client.archive.blobs.keys()) == []


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"", 422, "empty"),
        (b"PK\x03\x04 a zip, not a scan", 415, "received application/zip"),
        (b"Hello, just text", 415, "received text/plain"),
        (b"GIF89a....", 415, "received image/gif"),
        (b"<html><body>x</body></html>", 415, "received text/html"),
    ],
)
def test_refused_content(client: Client, content: bytes, status: int, fragment: str) -> None:
    assert_problem(client.upload(content, filename="looks.pdf"), status, fragment)
    nothing_stored(client)


@pytest.mark.parametrize(
    ("fields", "status", "fragment"),
    [
        ({"loan_number": "NOPE"}, 404, "loan NOPE not found"),
        ({"doc_type": "selfie"}, 422, "unknown document type"),
        ({"collateral_id": "not-a-uuid"}, 422, "collateral_id"),
        ({"supersedes": "3f1c0f5e-8f4e-4a4e-9d0b-2d9f4c1f0a11"}, 404, "not found"),
        ({"sha256": "abc"}, 422, "64 hexadecimal"),
    ],
)
def test_refused_metadata(
    client: Client, fields: dict[str, str], status: int, fragment: str
) -> None:
    assert_problem(client.upload(PDF, **fields), status, fragment)
    nothing_stored(client)


BOUNDARY = "archive-test-boundary"


def form_part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def post_form(client: Client, body: bytes, content_type: str | None = None) -> Any:
    return client.http.post(
        "/api/v1/documents",
        headers={
            **client.as_("archivist"),
            "Content-Type": content_type or f"multipart/form-data; boundary={BOUNDARY}",
        },
        content=body,
    )


FIELDS = form_part("loan_number", b"CR-1") + form_part("doc_type", b"contract")
FILE = form_part("file", PDF, "c.pdf")
END = f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "fragment"),
    [
        (FILE + FIELDS + END, None, 422, "body.loan_number: Field required before the file"),
        (FIELDS + FILE + form_part("sha256", b"0" * 64) + END, None, 422, "must be the last part"),
        (FIELDS + END, None, 422, "body.file: Field required"),
        (FIELDS + FILE, None, 400, "ended before"),
        (b"garbage", None, 400, "not a valid multipart/form-data body"),
        (FIELDS + form_part("reason", b"x" * 70_000) + FILE + END, None, 422, "longer than"),
        (FIELDS + form_part("reason", b"a\x00b") + FILE + END, None, 422, "NUL"),
        (FIELDS + form_part("evil", b"1") + FILE + END, None, 422, "body.evil: Extra inputs"),
        (
            FIELDS + form_part("loan_number", b"CR-2") + FILE + END,
            None,
            422,
            "'loan_number' is given more than once",
        ),
        (b'{"loan_number": "CR-1"}', "application/json", 415, "multipart/form-data"),
        (FIELDS + FILE + END, "multipart/form-data", 415, "multipart/form-data"),
    ],
)
def test_the_form_is_read_as_it_arrives(
    client: Client, body: bytes, content_type: str | None, status: int, fragment: str
) -> None:
    """The file is the last part: the fields before it are checked before a byte of it
    is stored; anything else is refused with a problem, and nothing is left behind."""
    assert_problem(post_form(client, body, content_type), status, fragment)
    nothing_stored(client)
    assert list(client.archive.blobs.temporary_keys()) == []
    ok = post_form(client, FIELDS + FILE + END)
    assert ok.status_code == 201, ok.text
    assert ok.json()["sha256"] == hashlib.sha256(PDF).hexdigest()


def test_declared_checksum_must_match(client: Client) -> None:
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    assert_problem(client.upload(PDF, sha256=wrong), 422, "does not match")
    digest = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    assert_problem(
        client.upload(PDF, headers={"Content-Digest": f"sha-256=:{digest}:"}), 422, "does not match"
    )
    nothing_stored(client)
    assert list(client.archive.blobs.temporary_keys()) == []
    good = base64.b64encode(hashlib.sha256(PDF).digest()).decode()
    ok = client.upload(
        PDF, sha256=hashlib.sha256(PDF).hexdigest(), headers={"Content-Digest": f"sha-256=:{good}:"}
    )
    assert ok.status_code == 201


def test_size_limit(doc_settings: Settings, doc_archive: ArchiveApp) -> None:
    small = doc_settings.model_copy(update={"max_upload_bytes": 4000})
    client = Client(doc_archive, small)
    # Declared too large: refused before the body is read.
    assert_problem(client.upload(os.urandom(100_000)), 413, "limited to 4000 bytes")
    # Declared length within the multipart allowance, but the file itself is too large.
    doc_archive.settings = small
    assert_problem(client.upload(PDF), 413, "larger than the limit of 4000 bytes")
    nothing_stored(client)
    assert list(doc_archive.blobs.temporary_keys()) == []


def test_roles(client: Client) -> None:
    for role in ("auditor", "compliance", "admin"):
        assert client.upload(PDF, role=role).status_code == 403
    assert client.upload(PDF, role="credit_officer").status_code == 201
    assert (
        client.http.get("/api/v1/documents/3f1c0f5e-8f4e-4a4e-9d0b-2d9f4c1f0a11").status_code == 401
    )


# -- legal hold, fixity, reconcile ---------------------------------------------------------------


def test_legal_hold(client: Client) -> None:
    doc = client.upload(PDF).json()["id"]
    url = f"/api/v1/documents/{doc}/legal-hold"
    assert (
        client.http.post(url, headers=client.as_("auditor"), json={"on": True}).status_code == 403
    )
    placed = client.http.post(
        url, headers=client.as_("archivist"), json={"on": True, "reason": "litigio"}
    )
    assert placed.status_code == 200, placed.text
    key = client.archive.get_document(UUID(doc)).object_key
    assert client.archive.blobs.stat(key).legal_hold is True
    assert client.http.get(f"/api/v1/documents/{doc}", headers=client.as_("auditor")).json()[
        "legal_hold"
    ]
    assert_problem(
        client.http.post(url, headers=client.as_("archivist"), json={"on": True}), 422, "already"
    )
    released = client.http.post(url, headers=client.as_("admin"), json={"on": False})
    assert released.status_code == 200
    assert client.archive.blobs.stat(key).legal_hold is False


def test_fixity_names_a_changed_or_missing_original(client: Client, tamper: Any) -> None:
    first = client.upload(PDF).json()
    second = client.upload(PNG, loan_number="CR-2").json()
    ok = client.http.post("/api/v1/documents/fixity-checks", headers=client.as_("auditor")).json()
    assert ok == {"documents_checked": 2, "ok": True, "failures": []}
    tamper(
        client.archive,
        client.archive.get_document(UUID(first["id"])).object_key,
        b"%PDF-1.7 forged",
    )
    report = client.http.post(
        "/api/v1/documents/fixity-checks", headers=client.as_("auditor")
    ).json()
    assert report["ok"] is False
    assert [(f["document_id"], f["loan_number"], f["outcome"]) for f in report["failures"]] == [
        (first["id"], "CR-1", "changed")
    ]
    meta = client.archive.get_document(UUID(first["id"]))
    assert meta.last_fixity["outcome"] == "changed"
    assert client.archive.get_document(UUID(second["id"])).last_fixity["outcome"] == "ok"
    checks = [
        e for _, e in client.archive.loan_events("CR-1") if type(e).__name__ == "FixityChecked"
    ]
    assert [c.actor_id for c in checks] == ["auditor.user", "auditor.user"]


def test_reconcile_reports_orphans_and_missing(client: Client, tamper: Any) -> None:
    doc = client.upload(PDF).json()
    # An object no event references: what a crash between storing and appending leaves.
    orphan = client.archive.blobs.put(iter_reader([PNG]))
    tamper(client.archive, client.archive.get_document(UUID(doc["id"])).object_key, b"%PDF changed")
    report = client.archive.reconcile(operator_context("test"))
    assert report.orphans == [orphan.key]
    assert [(c["document_id"], c["loan_number"]) for c in report.changed] == [
        (client.archive.get_document(UUID(doc["id"])).id, "CR-1")
    ]
    runs = [
        e for _, e in iter_all(client.archive) if type(e).__qualname__ == "Reconciliation.Completed"
    ]
    assert runs[-1].orphans == [orphan.key]


@pytest.mark.parametrize("blob_backend", ["s3"])
def test_a_put_or_delete_behind_the_archives_back_does_not_replace_the_original(
    client: Client, blob_backend: str
) -> None:
    """On S3 a plain PUT adds a newer version and a plain DELETE a delete marker; the
    archive reads the version its event recorded, so downloads, fixity, reconcile and
    the extraction worker still get the original."""
    doc = client.upload(PDF).json()["id"]
    document = client.archive.get_document(UUID(doc))
    assert document.object_version
    s3, bucket = client.archive.blobs.client, client.archive.settings.s3_bucket  # type: ignore[attr-defined]
    url = f"/api/v1/documents/{doc}/original"
    fixity = "/api/v1/documents/fixity-checks"
    for change in ("put", "delete"):
        if change == "put":
            s3.put_object(bucket, document.object_key, io.BytesIO(b"%PDF-1.7 forged"), 15)
        else:
            s3.remove_object(bucket, document.object_key)
        got = client.http.get(url, headers=client.as_("auditor"))
        assert got.status_code == 200 and got.content == PDF, change
        part = client.http.get(url, headers={**client.as_("auditor"), "Range": "bytes=0-7"})
        assert part.status_code == 206 and part.content == PDF[:8], change
        report = client.http.post(fixity, headers=client.as_("auditor")).json()
        assert report == {"documents_checked": 1, "ok": True, "failures": []}, change
        reconciled = client.archive.reconcile(operator_context(change))
        assert reconciled.missing == [] and reconciled.changed == [], change
        assert b"".join(client.archive.original_bytes(document)) == PDF


class iter_reader:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks: Iterator[bytes] = iter(chunks)

    def read(self, size: int = -1, /) -> bytes:
        return next(self.chunks, b"")


def iter_all(archive: ArchiveApp) -> Iterator[tuple[int, Any]]:
    from archive.integrity import iter_log

    for position, stored in iter_log(archive.recorder):
        yield position, archive.mapper.to_domain_event(stored)
