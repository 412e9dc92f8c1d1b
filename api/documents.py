"""Documents: upload originals, read their metadata, download them (recorded), holds, fixity."""

import base64
import binascii
import re
from typing import Annotated
from urllib.parse import quote
from uuid import UUID

from fastapi import APIRouter, Depends, File, Form, Header, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Archive, AuthFirstRoute, context, require, run_command, state_response
from api.encoding import jsonable
from api.problems import problem
from archive.application import Principal
from archive.domain import Role
from archive.exceptions import ArchiveError, DomainError

router = APIRouter(prefix="/api/v1/documents", tags=["documents"], route_class=AuthFirstRoute)

Uploader = Annotated[Principal, Depends(require(Role.ARCHIVIST, Role.CREDIT_OFFICER))]
Reader = Annotated[Principal, Depends(require(*Role))]
Holder = Annotated[Principal, Depends(require(Role.ARCHIVIST, Role.ADMIN))]
Checker = Annotated[Principal, Depends(require(Role.AUDITOR, Role.ADMIN))]

SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
CONTENT_DIGEST = re.compile(r"(?:^|,)\s*sha-256=:([A-Za-z0-9+/=]+):")
MULTIPART_OVERHEAD = 64 * 1024


class RangeNotSatisfiableError(ArchiveError):
    status = 416
    title = "Range not satisfiable"


def declared_sha256(form_value: str | None, content_digest: str | None) -> str | None:
    """The checksum the client declares: a form field (hex) or RFC 9530 Content-Digest."""
    declared = []
    if form_value:
        if not SHA256_HEX.match(form_value.strip()):
            raise DomainError("sha256 must be 64 hexadecimal characters")
        declared.append(form_value.strip().lower())
    if content_digest:
        found = CONTENT_DIGEST.search(content_digest)
        if found is None:
            raise DomainError("Content-Digest must carry sha-256=:<base64>:")
        try:
            raw = base64.b64decode(found.group(1), validate=True)
        except binascii.Error:
            raise DomainError("Content-Digest sha-256 is not valid base64") from None
        if len(raw) != 32:
            raise DomainError("Content-Digest sha-256 must be 32 bytes")
        declared.append(raw.hex())
    if len(set(declared)) > 1:
        raise DomainError("the sha256 field and Content-Digest disagree")
    return declared[0] if declared else None


@router.post("", status_code=201, summary="Upload an original (streamed, verified, write-once)")
def upload(
    request: Request,
    archive: Archive,
    who: Uploader,
    file: Annotated[UploadFile, File(description="The original: PDF, TIFF, PNG or JPEG.")],
    loan_number: Annotated[str, Form(min_length=1, max_length=64)],
    doc_type: Annotated[
        str, Form(description="contract, mortgage_deed, registry_certificate, ...")
    ],
    collateral_id: Annotated[UUID | None, Form()] = None,
    valuation_id: Annotated[UUID | None, Form()] = None,
    supersedes: Annotated[UUID | None, Form(description="The document this corrects.")] = None,
    sha256: Annotated[
        str | None, Form(description="Expected SHA-256 (hex); 422 if different.")
    ] = None,
    reason: Annotated[str | None, Form(max_length=2000)] = None,
    content_digest: Annotated[str | None, Header(description="RFC 9530, e.g. sha-256=:…:")] = None,
) -> JSONResponse:
    ctx = context(who, request, reason)
    outcome = archive.register_document(
        ctx,
        file.file,
        loan_number=loan_number,
        doc_type=doc_type,
        original_filename=file.filename,
        collateral_id=collateral_id,
        valuation_id=valuation_id,
        supersedes=supersedes,
        expected_sha256=declared_sha256(sha256, content_digest),
    )
    document = archive.get_document(outcome.id)
    body = {
        "id": document.id,
        "sha256": document.sha256,
        "size": document.size,
        "media_type": document.media_type,
        "version": document.version,
        "position": outcome.position,
    }
    return JSONResponse(
        jsonable(body), status_code=201, headers={"Location": f"/api/v1/documents/{document.id}"}
    )


def too_large(request: Request, limit: int) -> bool:
    """Whether a declared Content-Length already exceeds the upload limit (413 before reading)."""
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD


@router.get("/{document_id}", summary="A document's metadata, supersession, hold and retention")
def get_document(document_id: UUID, archive: Archive, who: Reader) -> JSONResponse:
    document = archive.get_document(document_id)
    return state_response(document.state())


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range (RFC 9110); None for the whole representation."""
    if not header:
        return None
    found = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if found is None or (found.group(1) == "" and found.group(2) == ""):
        return None  # multiple or malformed ranges: send the whole file, as RFC 9110 allows
    first, last = found.group(1), found.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError(f"an empty suffix range of a {size}-byte file")
        return max(0, size - suffix), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or end < start:
        raise RangeNotSatisfiableError(
            f"bytes {header.strip()[6:]} are outside the {size}-byte file"
        )
    return start, end


def content_disposition(filename: str) -> str:
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get(
    "/{document_id}/original",
    summary="Download the exact original bytes (Range supported; every download is recorded)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Part"}},
)
def download(
    document_id: UUID,
    request: Request,
    archive: Archive,
    who: Reader,
    range_header: Annotated[str | None, Header(alias="range")] = None,
) -> Response:
    document = archive.get_document(document_id)
    try:
        wanted = parse_range(range_header, document.size)
    except RangeNotSatisfiableError as exc:
        answer = problem(exc.status, exc.title, str(exc), request)
        answer.headers["Content-Range"] = f"bytes */{document.size}"
        return answer
    start, end = wanted if wanted else (0, None)
    _, chunks = archive.open_original(context(who, request, None), document_id, start, end)
    headers = {
        "ETag": f'"{document.sha256}"',
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(document.original_filename),
        "Content-Length": str(document.size if wanted is None else wanted[1] - wanted[0] + 1),
        "Digest-Algorithm": "sha-256",
    }
    if wanted is not None:
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{document.size}"
    return StreamingResponse(
        chunks,
        status_code=206 if wanted is not None else 200,
        media_type=document.media_type,
        headers=headers,
    )


class LegalHold(BaseModel):
    model_config = ConfigDict(extra="forbid")

    on: bool = Field(description="true places the hold, false releases it")
    reason: str | None = Field(None, max_length=2000)


@router.post("/{document_id}/legal-hold", summary="Place or release a legal hold")
def legal_hold(
    document_id: UUID, body: LegalHold, archive: Archive, who: Holder, request: Request
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    return run_command(lambda _: archive.set_legal_hold(ctx, document_id, body.on), None, None)


class FixityRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field("fixity check", max_length=2000)


@router.post("/fixity-checks", summary="Re-read every original and record its fixity")
def fixity_checks(
    archive: Archive, who: Checker, request: Request, body: FixityRun | None = None
) -> JSONResponse:
    reason = body.reason if body is not None else "fixity check"
    results = archive.check_fixity(context(who, request, reason))
    failures = [r for r in results if r.outcome != "ok"]
    return JSONResponse(
        jsonable(
            {
                "documents_checked": len(results),
                "ok": not failures,
                "failures": [
                    {
                        "document_id": r.document_id,
                        "loan_number": r.loan_number,
                        "outcome": r.outcome,
                        "expected_sha256": r.expected_sha256,
                        "observed_sha256": r.observed_sha256,
                    }
                    for r in failures
                ],
            }
        )
    )
