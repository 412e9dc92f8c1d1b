"""Documents: upload originals, read their metadata, download them (recorded), holds, fixity."""

import base64
import binascii
import ctypes
import ctypes.util
import re
from collections import deque
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast
from urllib.parse import quote
from uuid import UUID

import anyio
import anyio.from_thread
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.bodies import AsOf, Body
from api.deps import Archive, AuthFirstRoute, context, require, run_command, state_response
from api.encoding import jsonable
from api.problems import problem
from archive.application import Outcome, Principal, UnsupportedMediaTypeError
from archive.blobstore import CHUNK
from archive.documents import Document
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


def _share_malloc_arenas() -> None:
    """Let at most two glibc malloc arenas serve all threads (``M_ARENA_MAX``).

    Uploads hand part-sized buffers (8 MiB) from thread to thread (the event loop that
    parses the body, the worker thread that reads it, the threads that send parts); with glibc's default of up to eight
    arenas per core, each thread's arena keeps the part-sized blocks freed into it, and a
    server's peak RSS grows upload after upload (measured, three 500 MB uploads in a
    row: 149, 149, 166 MiB; with two arenas 130, 134, 134 MiB, at the same speed).
    Pinning the mmap threshold instead (so freed parts go back to the OS) halved the
    receiving speed: every part then costs an mmap, page faults and an munmap. Called
    when this module is imported, before the server starts its threads (an arena, once
    taken by a thread, stays); a no-op on other C libraries.
    """
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, 2)


_M_ARENA_MAX = -8  # glibc's malloc.h


_share_malloc_arenas()


class UploadForm(Body):
    """The form fields of an upload, all before the file part (validated before it is read):
    unknown fields and NUL characters are refused as in every JSON body."""

    loan_number: str = Field(min_length=1, max_length=64)
    doc_type: str = Field(description="contract, mortgage_deed, registry_certificate, ...")
    collateral_id: UUID | None = None
    valuation_id: UUID | None = None
    supersedes: UUID | None = Field(None, description="The document this corrects.")
    sha256: str | None = Field(None, description="Expected SHA-256 (hex); 422 if different.")
    reason: str | None = Field(None, max_length=2000)


FILE_FIELD = "file"
FIELD_LIMIT = 64 * 1024  # bytes of one text field
FIELDS_LIMIT = 32
READ_AHEAD = 8 * 1024 * 1024  # bytes of the file parsed before the store asks for them
T = TypeVar("T")


class MalformedUploadError(ArchiveError):
    status = 400
    title = "Malformed upload"


class FormStream:
    """A multipart/form-data body parsed as it arrives: the text fields, then the file.

    Nothing is spooled: the file part is handed on in reads of the size the store asks
    for (a part, at most), so that hashing and uploading start with the first bytes. The
    file must be the last part (as in S3's POST uploads): the fields it comes with are
    checked before a byte of it is read, and a field after it fails the upload before
    the store makes anything final (stores read to the end of the file first).
    """

    def __init__(self, request: Request) -> None:
        kind, options = parse_options_header(request.headers.get("content-type"))
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise UnsupportedMediaTypeError("send the original as multipart/form-data")
        self._body = request.stream()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._header = [b"", b""]
        self._disposition = b""
        self._name = ""
        self._text = bytearray()
        self._state = "fields"  # -> "file" -> "after file" -> "end"
        self._in_file = False
        self._has_file = False
        self._pending: deque[memoryview] = deque()
        self._pending_size = 0
        self._data: anyio.Event | None = None  # set when the waiting reader may go on
        self._wanted = 0  # bytes the waiting reader asked for
        self._space: anyio.Event | None = None  # set when the read-ahead may go on
        self._error: Exception | None = None
        self._late_part: str | None = None
        length = request.headers.get("content-length", "")
        self._small = length.isdigit() and int(length) <= READ_AHEAD
        self.parsed = False  # the whole body is parsed: the worker reads without a hop

    # -- parser callbacks (synchronous, on the event loop) ---------------------------

    def _part_begin(self) -> None:
        self._disposition = b""
        self._text = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        if self._header[0].strip().lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise MalformedUploadError("every part needs a Content-Disposition with a name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._state != "fields":  # refused when the file has been read (read_file)
            self._late_part = self._late_part or self._name
        elif self._name == FILE_FIELD:
            self._state = "file"
            self._in_file = self._has_file = True
            name = options.get(b"filename")
            self.filename = None if name is None else name.decode("utf-8", "replace")
        elif len(self.fields) >= FIELDS_LIMIT:
            raise DomainError(f"an upload has at most {FIELDS_LIMIT} form fields")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._late_part is not None:
            return  # refused anyway
        if self._in_file:
            self._pending.append(memoryview(data)[start:end])
            self._pending_size += end - start
            return
        self._text += data[start:end]
        if len(self._text) > FIELD_LIMIT:
            raise DomainError(f"form field {self._name!r} is longer than {FIELD_LIMIT} bytes")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self._state = "after file"
        elif self._late_part is None:
            if self._name in self.fields:  # which one would count is anyone's guess
                raise DomainError(f"form field {self._name!r} is given more than once")
            self.fields[self._name] = self._text.decode("utf-8", "replace")

    def _end(self) -> None:
        self._state = "end"

    # -- reading (async, on the event loop) ----------------------------------------------

    async def _feed(self) -> None:
        """Parse the next piece of the body."""
        try:
            chunk = await anext(self._body)
        except StopAsyncIteration:
            if self._state != "end":
                raise MalformedUploadError("the body ended before the multipart form did") from None
            return
        except ClientDisconnect:
            raise MalformedUploadError("the client went away before the upload ended") from None
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise MalformedUploadError(f"not a valid multipart/form-data body: {exc}") from None

    async def form(self) -> UploadForm:
        """The fields before the file (422 when they are invalid or there is no file)."""
        while self._state == "fields":
            await self._feed()
        if not self._has_file:
            raise RequestValidationError(
                [{"type": "missing", "loc": ("body", FILE_FIELD), "msg": "Field required"}]
            )
        given = {name: value for name, value in self.fields.items() if value != ""}
        try:
            return UploadForm.model_validate(given)
        except ValidationError as exc:
            # A field sent after the file (curl's ``-F file=@x`` first) is missing here:
            # say where it belongs rather than only that it is missing.
            late = "Field required before the file part (the file is the last part of the form)"
            errors = [
                {
                    **e,
                    "loc": ("body", *e["loc"]),
                    **({"msg": late} if e["type"] == "missing" else {}),
                }
                for e in exc.errors()
            ]
            raise RequestValidationError(errors) from None

    async def run_reading_ahead(self, work: Callable[[], T]) -> T:
        """Run ``work`` (which reads the file through a ``FileReader``) in a worker thread,
        while this task parses up to ``READ_AHEAD`` bytes of the file ahead of it: the
        body keeps arriving while the store hashes, writes or sends what it read."""
        outcome: T | None = None
        failure: Exception | None = None
        if self._small:
            # The whole body fits in the read-ahead: parse it all first, then the worker
            # reads it without a hop to this loop per read (a 1 MB upload made three).
            while self._state != "end":
                await self._feed()
            self.parsed = True
            return await run_in_threadpool(work)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._read_ahead)
            try:
                outcome = await run_in_threadpool(work)
            except Exception as exc:  # re-raised as it is, not in an exception group
                failure = exc
            tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return cast(T, outcome)

    async def _read_ahead(self) -> None:
        """Parse the body as it arrives, up to ``READ_AHEAD`` bytes of the file ahead of
        the reader. Everything here and in ``read_file`` runs on the event loop, so the
        two hand over with plain events, set only when the other side waits for them (an
        ``anyio.Condition`` took its lock twice per body chunk, each time a trip through
        the event loop: receiving ran at ~300 MB/s where the bare body stream gave 500+)."""
        try:
            while self._state != "end":
                while self._pending_size >= READ_AHEAD:
                    self._space = anyio.Event()
                    await self._space.wait()
                await self._feed()
                self._wake_reader()
        except Exception as exc:  # raised in the reader's thread, by read_file
            self._error = exc
            self._wake_reader()

    def _must_wait(self, size: int) -> bool:
        return self._error is None and (
            (self._pending_size < size and self._state == "file")
            or (not self._pending and self._state != "end")
        )

    def _wake_reader(self) -> None:
        if self._data is not None and not self._must_wait(self._wanted):
            self._data.set()
            self._data = None

    async def read_file(self, size: int) -> bytes:
        """Up to ``size`` bytes of the file, fewer only at its end (then b"", once the rest
        of the body was parsed: a part after the file is refused here)."""
        while self._must_wait(size):
            self._wanted = size
            self._data = anyio.Event()
            await self._data.wait()
        if self._error is not None:
            raise self._error
        data = self.take(size)
        if self._space is not None:
            self._space.set()
            self._space = None
        return data

    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes of what was parsed of the file (called from the worker
        directly once the whole body is ``parsed``: nothing else touches it then)."""
        if not self._pending and self._late_part is not None:
            raise DomainError(
                f"the {FILE_FIELD} must be the last part of the form;"
                f" {self._late_part!r} came after it"
            )
        pieces = []
        wanted = size
        while self._pending and wanted:
            piece = self._pending.popleft()
            if len(piece) > wanted:
                self._pending.appendleft(piece[wanted:])
                piece = piece[:wanted]
            pieces.append(piece)
            wanted -= len(piece)
        self._pending_size -= size - wanted
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)


class FileReader:
    """The file part of a ``FormStream`` as a blocking stream, for a worker thread."""

    def __init__(self, form: FormStream) -> None:
        self.form = form

    def read(self, size: int = -1, /) -> bytes:
        if self.form.parsed:
            return self.form.take(size if size > 0 else CHUNK)
        return anyio.from_thread.run(self.form.read_file, size if size > 0 else CHUNK)


def upload_request_body() -> dict[str, Any]:
    """The OpenAPI request body: the form fields, then the file, last."""
    schema = UploadForm.model_json_schema()
    schema["properties"][FILE_FIELD] = {
        "type": "string",
        "format": "binary",
        "description": "The original: PDF, TIFF, PNG or JPEG. The last part of the form.",
    }
    schema["required"] = [*schema.get("required", []), FILE_FIELD]
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


@router.post(
    "",
    status_code=201,
    summary="Upload an original (streamed, verified, write-once)",
    openapi_extra={"requestBody": upload_request_body()},
)
async def upload(
    request: Request,
    archive: Archive,
    who: Uploader,
    content_digest: Annotated[str | None, Header(description="RFC 9530, e.g. sha-256=:…:")] = None,
) -> JSONResponse:
    """The body is parsed as it arrives and the file streamed into storage in one pass
    (no temporary copy of the request): see ``FormStream``."""
    body = FormStream(request)
    fields = await body.form()
    expected = declared_sha256(fields.sha256, content_digest)
    ctx = context(who, request, fields.reason)

    def register() -> tuple[Outcome, Document]:  # in a worker thread
        outcome = archive.register_document(
            ctx,
            FileReader(body),
            loan_number=fields.loan_number,
            doc_type=fields.doc_type,
            original_filename=body.filename,
            collateral_id=fields.collateral_id,
            valuation_id=fields.valuation_id,
            supersedes=fields.supersedes,
            expected_sha256=expected,
        )
        return outcome, archive.get_document(outcome.id)

    outcome, document = await body.run_reading_ahead(register)
    answer = {
        "id": document.id,
        "sha256": document.sha256,
        "size": document.size,
        "media_type": document.media_type,
        "version": document.version,
        "position": outcome.position,
    }
    return JSONResponse(
        jsonable(answer), status_code=201, headers={"Location": f"/api/v1/documents/{document.id}"}
    )


def too_large(request: Request, limit: int) -> bool:
    """Whether a declared Content-Length already exceeds the upload limit (413 before reading)."""
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD


@router.get("/{document_id}", summary="A document's metadata, supersession, hold and retention")
def get_document(
    document_id: UUID,
    archive: Archive,
    who: Reader,
    version: Annotated[int | None, Query(ge=1)] = None,
    as_of: AsOf = None,
) -> JSONResponse:
    """Now, at a past ``version``, or as it was at ``as_of`` (rebuilt from its events), as
    collateral and valuations."""
    document = archive.get_document(document_id, version=version, as_of=as_of)
    return state_response(document.state())


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range (RFC 9110); None for the whole representation."""
    if not header:
        return None
    found = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if found is None or (found.group(1) == "" and found.group(2) == ""):
        return None  # multiple or malformed ranges: send the whole file, as RFC 9110 allows
    first, last = _position(found.group(1)), _position(found.group(2))
    if first is None:
        suffix = cast(int, last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError(f"an empty suffix range of a {size}-byte file")
        return max(0, size - suffix), size - 1
    start = first
    end = size - 1 if last is None else min(last, size - 1)
    if start >= size or end < start:
        raise RangeNotSatisfiableError(
            f"bytes {header.strip()[6:]} are outside the {size}-byte file"
        )
    return start, end


def _position(digits: str) -> int | None:
    """A byte position of a Range, None if absent. Any number past what a file can hold
    is as good as 2**63 here, and converting thousands of digits would raise (Python
    caps int() at 4300 digits): a 500 instead of the whole file or a 416."""
    if digits == "":
        return None
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else 2**63


def content_disposition(filename: str) -> str:
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def range_holds(if_range: str | None, etag: str) -> bool:
    """RFC 9110 If-Range: a Range is served only while the client's validator is this
    original's (strong comparison); otherwise the whole file is sent, so that a resumed
    download is never stitched onto other bytes. A date never matches: no Last-Modified
    is sent, and a weak tag never matches by the rules of strong comparison."""
    return if_range is None or if_range.strip() == etag


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match (weak comparison): ``*`` or a list naming ``etag``."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.head(
    "/{document_id}/original",
    summary="The original's headers (size, type, ETag): no bytes sent, no download recorded",
)
@router.get(
    "/{document_id}/original",
    summary="Download the exact original bytes (Range supported; every download is recorded)",
    description="A GET whose If-None-Match names the ETag gets 304: no bytes are sent, so "
    "no download is recorded.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "Part"},
        304: {"description": "The client holds these bytes (If-None-Match)"},
    },
)
def download(
    document_id: UUID,
    request: Request,
    archive: Archive,
    who: Reader,
    range_header: Annotated[str | None, Header(alias="range")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
    if_range: Annotated[str | None, Header()] = None,
) -> Response:
    document = archive.stored_document(document_id)
    etag = f'"{document.sha256}"'
    if request.method == "GET" and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    ranged = request.method == "GET" and range_holds(if_range, etag)
    try:
        wanted = parse_range(range_header, document.size) if ranged else None
    except RangeNotSatisfiableError as exc:
        answer = problem(exc.status, exc.title, str(exc), request)
        answer.headers["Content-Range"] = f"bytes */{document.size}"
        return answer
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition(document.original_filename),
        "Content-Length": str(document.size if wanted is None else wanted[1] - wanted[0] + 1),
        "Digest-Algorithm": "sha-256",
    }
    if request.method == "HEAD":
        return Response(media_type=document.media_type, headers=headers)
    start, end = wanted if wanted else (0, None)
    chunks = archive.open_original(context(who, request, None), document, start, end)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{document.size}"
    return StreamingResponse(
        chunks,
        status_code=206 if wanted is not None else 200,
        media_type=document.media_type,
        headers=headers,
    )


class LegalHold(Body):
    on: bool = Field(description="true places the hold, false releases it")
    reason: str | None = Field(None, max_length=2000)


@router.post("/{document_id}/legal-hold", summary="Place or release a legal hold")
def legal_hold(
    document_id: UUID, body: LegalHold, archive: Archive, who: Holder, request: Request
) -> JSONResponse:
    ctx = context(who, request, body.reason)
    return run_command(lambda _: archive.set_legal_hold(ctx, document_id, body.on), None, None)


class FixityRun(Body):
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
