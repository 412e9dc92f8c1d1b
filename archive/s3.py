"""Originals in an S3 bucket with Object Lock (SeaweedFS, MinIO, AWS), through the minio SDK.

How ``put`` makes an original durable
-------------------------------------

The source is read exactly once, through ``HashingReader`` (SHA-256, size, limit), never
rewound, and stored one of three ways. In every one, each request that carries bytes
carries a checksum the server checks, so it refuses bytes damaged on the way
(``BadDigest``): the file's SHA-256 as ``x-amz-checksum-sha256`` for a one-request file
(plus ``Content-MD5`` until the server has answered one with the checksum it checked),
each part's CRC-32 as ``x-amz-checksum-crc32`` for a multipart upload (a part the server
answers without echoing it is checked by its ETag, the part's MD5; see ``_send_parts``).
(SeaweedFS checks these but NOT the signed ``x-amz-content-sha256``, so ``ArchiveMinio``
signs the known SHA-256 or ``UNSIGNED-PAYLOAD`` instead of hashing every body once more.)
The object comes into existence in one request, already under retention
(``x-amz-object-lock-*`` headers, ``Retention(mode, now + retention_days)`` when
``retention_days > 0`` and the bucket has Object Lock), with ``If-None-Match: *`` so that
two uploads of the same bytes cannot stack versions (the second gets
``PreconditionFailed`` and adopts the first, ``created=False``); and before ``put``
returns the object is verified -- ``checkpoint("final")``: a multipart upload's ETag must
be ``md5(md5(part1)..md5(partN))-N`` of the parts' ETags (which SeaweedFS 4.48 follows;
any other ETag, e.g. with SSE-KMS, is checked by reading the object back) and a HEAD must
show the size and the retention; a PutObject is verified from its answer
(``_put_verified``: the echoed SHA-256, else the ETag as MD5; the HEAD only until the
server has shown that it applies retention headers).

1. **Small** (at most one part, 8 MiB): the bytes are in memory once read; a declared
   SHA-256 is checked (``checkpoint("verified")``; nothing has reached S3 yet), then ONE
   PutObject to the content address. Refused because the key exists: the current
   version is adopted if its ETag (else its bytes) match; a current version that does
   NOT hold these bytes (a forged PUT, see below) is logged and covered by a new, good
   version.
2. **Larger, SHA-256 declared by the client** (``Content-Digest``, the ``sha256`` form
   field, ``loan-archive import``): the content address is known before the first byte,
   so the parts go straight to a multipart upload there as they are read (three 8 MiB
   parts in flight, each part's CRC-32 taken by the thread that sends it) --
   ``checkpoint("written")``; then the SHA-256 of what was read must be the declared one,
   else the upload is aborted (422) -- ``checkpoint("verified")``; then
   CompleteMultipartUpload. When the key already exists, the second way is taken.
3. **Larger, nothing declared**: the content address is known only at the end, so the
   bytes are spooled to an anonymous temporary file (``TMPDIR``, unlinked at once) while
   hashed, each part's CRC-32 taken as it is spooled (by a helper thread, while the next
   part arrives); nothing has reached S3 yet, so a failing source or a file over the
   limit leaves nothing. An existing object with these bytes is adopted (ETag against
   the MD5s of the spooled parts). Else the spool is uploaded as in 2., each re-read
   part sent under the CRC-32 taken when it was received (the server refuses it if the
   spool changed) -- ``checkpoint("written")``,
   ``checkpoint("verified")``; then CompleteMultipartUpload. (The upload once hashed the
   whole spool again with SHA-256 as well, and signed every part's SHA-256: see
   ``_spool_then_upload`` for what the cheaper check guards against and what it gained.)

Until CompleteMultipartUpload an upload is unfinished and invisible: any failure aborts
it, and a killed process leaves it behind, listed by ``temporary_keys`` as
``<key>?uploadId=<id>`` (``discard_temporary`` aborts it). Memory stays at a few parts
whatever the file size.

Why not a temporary object and a server-side copy
-------------------------------------------------

That protocol was built and measured first: stream to ``incoming/<uuid>`` (put_object,
length=-1, 16 MiB parts, 2 parallel) computing the part MD5s, compare the ETag, then
``compose_object`` to the final key with retention, then remove the temporary version.
On SeaweedFS 4.48 the server-side copy rewrites every byte (the data directory grows by
the object's size; ~300 MB/s on this machine, a third of the upload time again), and it
has two traps: CopyObject silently DROPS ``x-amz-object-lock-*`` headers (the copy has no
retention and no legal hold; only UploadPartCopy, i.e. ``compose_object`` with a byte
range, keeps them), and the ETag of a copied part is derived from SeaweedFS's internal
4 MiB chunks (``md5-of-chunk-md5s-4``), comparable to nothing the client computed.

Measured again on 2026-11-28 for the undeclared way (3.) as "stage while receiving, then
copy": 200 MB, UploadPartCopy of 8 or 32 MiB ranges into a multipart upload under
retention, 1, 3 or 6 in parallel, against a put_object of the same bytes in the same run
(loaded machine): the copy ran at 0.9-2.9x the upload's speed, median 1.5x. Staging
overlaps receiving with uploading but then pays the copy, ``max(R, U) + C`` with C =
0.35-1.1 U (typically 0.67 U), against ``R + U`` for the spool with R (receiving, 200-270
MB/s) = 0.4-0.65 U: no better, and twice the writes on the server. The retention trap
holds too (the copy target keeps its retention only through UploadPartCopy; a staging
object, written without retention, is deletable by version). So the spool stays; a client
that declares the SHA-256 gets the pipelined way (2.).

Throughput, 200 MB file, loopback SeaweedFS 4.48, 2 vCPU shared with other work (hence
the spread), three runs of 8-10 interleaved rounds, as a ratio to raw
``put_object(bucket, key, file, size)`` with minio's defaults (5 MiB parts, 3 parallel):

========================================================  ============  ============
variant                                                    best          median
========================================================  ============  ============
raw put_object, minio defaults                             110-166 MB/s  73-126 MB/s
raw put_object, 8 MiB parts x 3                            1.02-1.08     0.95-1.29
temp object + ETag check + compose copy (first version)    0.52-0.58     0.53-0.57
**this module**, seekable source (a file)                  0.86-0.90     0.88-0.97
**this module**, non-seekable source (spooled to TMPDIR)   0.70-0.81     0.77-0.82
========================================================  ============  ============

Peak RSS of a whole Python process putting a generated (non-seekable) 300 MB source:
84 MiB, of which 51 MiB is the interpreter with its imports. (The table measured this
module's previous version, which read every source twice; the figures of this one,
through the HTTP API, are in ``bench/RESULTS.md``, "upload (issue 3)".)

Semantics worth knowing
-----------------------

These are S3's, not SeaweedFS quirks: an Object Lock bucket is versioned, and retention
protects object *versions*. Deleting a retained version, shortening its retention or
removing a legal-held version is refused (``AccessDenied``); but a plain DELETE of the
key adds a delete marker and a plain PUT adds a newer version, and both succeed. The
retained original stays readable by its version id: ``put`` returns it in
``StoredBlob.version_id``, the archive records it in the DocumentRegistered event, and
``open``/``stat``/``digest``/``set_legal_hold`` given that ``version_id`` address that
version (SeaweedFS 4.48 serves GetObject, ranged GetObject, HeadObject and the legal
hold by versionId, also behind a delete marker); without one they address the current
version, which ``put`` of the same bytes again makes good. Through the filer HTTP API
(``/buckets/<bucket>/<key>.versions/v_<id>``) SeaweedFS lets anyone who can reach the
filer overwrite a version's bytes regardless of Object Lock; the object then loses its
version id and its retention. Keep the filer port private. SeaweedFS answers
PutObjectLegalHold on a missing key with HTTP 500 (which minio retries for seconds), so
``set_legal_hold`` checks that the key exists first.

This module uses minio's public API plus five of its private methods, stable across
minio 7.x: ``_put_object`` (PutObject and UploadPart with checksum headers and
``If-None-Match``, which ``put_object`` would turn into user metadata, and whose answer's
headers ``_upload_part`` drops), ``_create_multipart_upload``, ``_abort_multipart_upload``,
``_list_multipart_uploads`` and ``_execute`` (for CompleteMultipartUpload with
``If-None-Match``); pin ``minio<8``.

Credentials come from the settings as ``SecretStr`` and are handed to the minio client
only; they appear in no message, log line or repr of this module, and storage errors are
re-raised as ``BlobError`` without minio's exception chain.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import math
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar
from xml.sax.saxutils import escape

import urllib3
from minio import Minio
from minio.datatypes import CompleteMultipartUploadResult
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.time import from_iso8601utc, to_iso8601utc

from archive.blobstore import (
    CHUNK,
    KEY,
    BlobError,
    BlobInfo,
    BlobStore,
    HashingReader,
    Readable,
    StoredBlob,
    content_key,
    hash_stream,
    key_digest,
)

if TYPE_CHECKING:
    from archive.settings import Settings

log = logging.getLogger(__name__)

FINAL_PREFIX = "sha256/"
UPLOAD_MARK = "?uploadId="
PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
PARALLEL_UPLOADS = 3

PAYLOAD_HASH = "x-amz-content-sha256"
UNSIGNED = "UNSIGNED-PAYLOAD"
CHECKSUM_SHA256 = "x-amz-checksum-sha256"
CHECKSUM_CRC32 = "x-amz-checksum-crc32"
CHECKSUM_ALGORITHM = "x-amz-checksum-algorithm"
MD5_HEX = re.compile(r"^[0-9a-f]{32}$")

_MISSING = {"NoSuchKey", "NoSuchVersion", "NoSuchObject"}
_NO_RETENTION = {"ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration"}
_NO_HOLD = {"NoSuchObjectLegalHold", "ObjectLockConfigurationNotFoundError"}
_STORAGE_ERRORS = (MinioException, urllib3.exceptions.HTTPError)

T = TypeVar("T")


class _Raced(Exception):
    """``If-None-Match: *`` refused the write: the final object appeared meanwhile."""


def part_size_for(limit: int | None) -> int:
    """8 MiB parts, larger (whole MiB) when ``limit`` bytes would need over 10,000 of them."""
    if limit is None:
        return PART_SIZE
    mib = 1024 * 1024
    return max(PART_SIZE, math.ceil(math.ceil(limit / MAX_PARTS) / mib) * mib)


def multipart_etag(digests: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload: ``md5(md5(part1)..md5(partN))-N``."""
    joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(digests)}"


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _etag(value: str | None) -> str:
    return (value or "").strip().strip('"').lower()


def _content_md5(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _crc32_header(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


@dataclass(frozen=True)
class _Part:
    """One uploaded part: the ETag to complete with, its MD5 and its CRC-32."""

    etag: str
    md5: bytes
    crc: int


def _etags(digests: list[bytes]) -> set[str]:
    """The ETags S3 gives these bytes: as one multipart upload, and as one PutObject."""
    found = {multipart_etag(digests)}
    if len(digests) == 1:
        found.add(digests[0].hex())
    return found


def _read_exactly(stream: IO[bytes] | Readable, size: int) -> bytes:
    pieces: list[bytes] = []
    got = 0
    while got < size:
        data = stream.read(size - got)
        if not data:
            break
        pieces.append(data)
        got += len(data)
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if len(data) > size:  # a source that returned more than it was asked for
        raise BlobError(f"the source returned more than the {size} bytes asked for")
    return data


class ArchiveMinio(Minio):
    """minio's client, except that a request may bring its own payload hash.

    Over plain HTTP, minio signs the SHA-256 of every body it sends (``x-amz-content-sha256``),
    which costs as much CPU as the archive's own SHA-256 of the file, and which SeaweedFS
    does not even check. ``put`` already knows the SHA-256 of a one-request file, and
    sends each part with its CRC-32 (covered by the signature, checked by the server),
    so it passes the hash (or ``UNSIGNED-PAYLOAD``, what minio itself sends over TLS) in
    the request's headers and this client signs that instead of hashing the body again.
    Anything else (TLS, anonymous access, no preset) is minio's own behaviour.
    """

    def _build_headers(
        self, host: str, headers: Any, body: bytes | None, creds: Any
    ) -> tuple[Any, datetime]:
        preset = (headers or {}).get(PAYLOAD_HASH)
        if preset is None or not body or not creds or self._base_url.is_https:
            if preset is not None and not creds:
                del headers[PAYLOAD_HASH]  # an anonymous request signs nothing
            return super()._build_headers(host, headers, body, creds)
        built, date = super()._build_headers(host, headers, b"", creds)  # hashes nothing
        built["Content-Length"] = str(len(body))
        built[PAYLOAD_HASH] = preset
        return built, date


class S3BlobStore(BlobStore):
    """Originals as objects ``sha256/ab/cd/<hex>`` in one bucket, retained by Object Lock."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        retention_mode: str = "COMPLIANCE",
        retention_days: int = 0,
        part_size: int = PART_SIZE,
        parallel_uploads: int = PARALLEL_UPLOADS,
        spool_dir: Path | None = None,
        endpoint: str = "",
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        if retention_mode not in ("COMPLIANCE", "GOVERNANCE"):
            raise ValueError("retention_mode must be COMPLIANCE or GOVERNANCE")
        self.client = client
        self.bucket = bucket
        self.retention_mode = retention_mode
        self.retention_days = retention_days
        self.part_size = part_size
        self.parallel_uploads = max(1, parallel_uploads)
        self.spool_dir = spool_dir
        self.endpoint = endpoint
        self._object_lock: bool | None = None
        #: The server has answered a PutObject with the SHA-256 it checked (see ``_put_verified``).
        self._checks_sha256 = False
        #: A HEAD has shown that this server applies a PutObject's retention headers.
        self._put_applies_retention = False

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        bucket = settings.s3_bucket
        if not bucket:
            raise BlobError("ARCHIVE_BLOB_URL must name a bucket: s3://BUCKET")
        endpoint = settings.s3_endpoint.strip()
        secure = settings.s3_secure
        for scheme, tls in (("https://", True), ("http://", False)):
            if endpoint.lower().startswith(scheme):
                endpoint, secure = endpoint[len(scheme) :].rstrip("/"), tls
        access, secret = settings.s3_access_key, settings.s3_secret_key
        if (access is None) != (secret is None):
            raise BlobError("set both ARCHIVE_S3_ACCESS_KEY and ARCHIVE_S3_SECRET_KEY, or neither")
        try:
            client = ArchiveMinio(
                endpoint,
                access_key=access.get_secret_value() if access else None,
                secret_key=secret.get_secret_value() if secret else None,
                secure=secure,
                region=settings.s3_region or None,
            )
        except ValueError as exc:  # minio's messages name the endpoint, never the keys
            raise BlobError(f"invalid ARCHIVE_S3_ENDPOINT {endpoint!r}: {exc}") from None
        return cls(
            client,
            bucket,
            retention_mode=settings.retention_mode,
            retention_days=settings.retention_days,
            part_size=part_size_for(settings.max_upload_bytes),
            endpoint=endpoint,
        )

    def __repr__(self) -> str:
        return f"S3BlobStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    def ensure_bucket(self) -> bool:
        """Create the bucket with Object Lock if it does not exist; True if created.
        Object Lock can only be enabled when a bucket is created, so this is the one place."""
        try:
            if self.client.bucket_exists(self.bucket):
                return False
            self.client.make_bucket(self.bucket, object_lock=True)
        except S3Error as exc:
            raise BlobError(f"cannot create bucket {self.bucket}: {exc.code}") from None
        self._object_lock = None
        self._put_applies_retention = False
        return True

    # -- Object Lock ---------------------------------------------------------------

    @property  # type: ignore[override]
    def enforces_retention(self) -> bool:
        """Whether the bucket has Object Lock (asked once, then remembered)."""
        if self._object_lock is None:
            try:
                self.client.get_object_lock_config(self.bucket)
                self._object_lock = True
            except S3Error as exc:
                if exc.code not in _NO_RETENTION:
                    raise self._error(
                        "reading the Object Lock configuration of", None, exc
                    ) from None
                self._object_lock = False
                if self.retention_days:
                    log.warning(
                        "bucket %s has no Object Lock: originals are stored WITHOUT retention",
                        self.bucket,
                    )
            except _STORAGE_ERRORS as exc:
                raise self._error("reading the Object Lock configuration of", None, exc) from None
        return self._object_lock

    def _lock_headers(self) -> dict[str, str]:
        """Retention per object, not the bucket's default: S3 refuses a write whose
        headers it cannot apply, so a PutObject that succeeded holds them and its answer
        can stand for the HEAD; under a default retention the answer says nothing of it
        (SeaweedFS applies one, measured 2026-11-28: no faster), and anyone allowed
        PutObjectLockConfiguration could change it."""
        if self.retention_days <= 0 or not self.enforces_retention:
            return {}
        until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=self.retention_days)
        return {
            "x-amz-object-lock-mode": self.retention_mode,
            "x-amz-object-lock-retain-until-date": to_iso8601utc(until),
        }

    # -- put -----------------------------------------------------------------------

    def put(
        self, source: Readable, *, expected_sha256: str | None = None, limit: int | None = None
    ) -> StoredBlob:
        """Read ``source`` once; see the module docstring for the three ways it is stored."""
        _ = self.enforces_retention  # asked now: an unreachable S3 fails before any reading
        reader = HashingReader(source, limit)
        first = _read_exactly(reader, self.part_size)
        more = reader.read(1) if len(first) == self.part_size else b""
        if not more:  # the whole file is in ``first``: one PutObject
            sha256 = reader.sha256()
            self.check_expected(sha256, expected_sha256)
            self.checkpoint("verified")
            return self._put_whole(content_key(sha256), first, sha256)
        parts = self._parts(first, more, reader)
        if expected_sha256 is not None:
            key = content_key(expected_sha256.lower())
            if self.stat(key) is None:
                return self._stream_to(key, parts, reader, expected_sha256)
        return self._spool_then_upload(parts, reader, expected_sha256)

    def _parts(self, first: bytes, more: bytes, reader: HashingReader) -> Iterator[bytes]:
        """``first``, then parts of ``part_size`` bytes read from ``reader`` (the last shorter)."""
        yield first
        number = 1
        carry = more
        while True:
            data = carry + _read_exactly(reader, self.part_size - len(carry))
            carry = b""
            if not data:
                return
            number += 1
            if number > MAX_PARTS:
                raise BlobError(
                    f"the file needs more than {MAX_PARTS} parts of {self.part_size} bytes"
                )
            yield data
            if len(data) < self.part_size:
                return

    def _put_whole(self, key: str, data: bytes, sha256: str) -> StoredBlob:
        """One PutObject with the SHA-256 as ``x-amz-checksum-sha256`` (and as the signed
        payload hash) and ``If-None-Match: *`` (no second version over a good one);
        refused because the key exists: adopt it if it holds these bytes, else (a forged
        current version) cover it with a good one. Content-MD5 (an MD5 costs three
        SHA-256s here) is sent only until the server has shown that it checks the SHA-256.

        ``If-None-Match`` is the dearest header (SeaweedFS 4.48: +1.3-1.8 ms on a 1 MB
        PutObject of ~12 ms, measured 2026-11-28, bench/RESULTS.md) and stays: without it
        each upload of bytes already stored adds an identical version that Object Lock
        keeps for years, and a HEAD before the PUT would cost a round trip and race."""
        md5: list[bytes] = []

        def digests() -> list[bytes]:
            if not md5:
                md5.append(_md5(data))
            return md5

        headers = {
            "Content-Type": "application/octet-stream",
            CHECKSUM_SHA256: base64.b64encode(bytes.fromhex(sha256)).decode("ascii"),
            PAYLOAD_HASH: sha256,  # the body is the whole file: minio need not hash it again
            **self._lock_headers(),
        }
        if not self._checks_sha256:
            headers["Content-MD5"] = _content_md5(digests()[0])
        try:
            written = self._call(
                "storing",
                key,
                lambda: self.client._put_object(
                    self.bucket, key, data, {**headers, "If-None-Match": "*"}
                ),
                guarded=True,
            )
        except _Raced:
            existing, _current = self._existing(key, sha256, len(data), digests)
            if existing is not None:
                return existing
            written = self._call(
                "storing", key, lambda: self.client._put_object(self.bucket, key, data, headers)
            )
        return self._put_verified(key, sha256, len(data), digests, written, headers)

    def _put_verified(
        self,
        key: str,
        sha256: str,
        size: int,
        digests: Callable[[], list[bytes]],
        written: Any,
        headers: dict[str, str],
    ) -> StoredBlob:
        """Check a PutObject from its response where that proves enough, else by a HEAD.

        The bytes: the server echoes ``x-amz-checksum-sha256`` only after it computed the
        SHA-256 of what it received and found the one sent (it answers BadDigest
        otherwise; SeaweedFS 4.48, MinIO and AWS do); without the echo, the ETag must be
        the MD5 (else the object is read back). The retention: S3 applies the
        ``x-amz-object-lock-*`` headers of a PutObject or refuses the request
        (``InvalidRequest`` on a bucket without Object Lock, for an unknown mode or a past
        date; tested against SeaweedFS in tests/test_blobstores.py), so a PutObject that
        succeeded holds them. That is S3's contract; SeaweedFS has been seen to break it
        elsewhere (CopyObject drops those headers silently), so the first PutObject of
        every store is HEADed all the same, and only once the server has shown that it
        applies them does a response that carries a version id stand for the HEAD
        (1-3 ms of a 1 MB upload). The retention then recorded is the one sent, to the
        second; ``stat`` reads the server's.
        """
        lock = bool(headers.get("x-amz-object-lock-mode"))
        echoed = (written.http_headers or {}).get(CHECKSUM_SHA256)
        checked = echoed is not None and echoed == headers[CHECKSUM_SHA256]
        if checked:
            self._checks_sha256 = True
        version = written.version_id if written.version_id not in (None, "", "null") else None
        if checked and (not lock or (self._put_applies_retention and version is not None)):
            until = headers.get("x-amz-object-lock-retain-until-date")
            retain_until = from_iso8601utc(until) if until else None
            self.checkpoint("final")
            return StoredBlob(key, sha256, size, version, retain_until, created=True)
        blob = self._verified(
            key, sha256, size, [] if checked else digests(), written.etag, headers, checked=checked
        )
        if lock:
            self._put_applies_retention = True
        return blob

    def _stream_to(
        self, key: str, parts: Iterator[bytes], reader: HashingReader, expected_sha256: str
    ) -> StoredBlob:
        """The client declared the SHA-256, so the key is known before the first byte: the
        parts go straight to it while they are received; the upload is completed only if
        the bytes turn out to have that SHA-256, and aborted otherwise."""
        upload_id, headers = self._start_upload(key)
        completed = None
        try:
            sent = self._send_parts(key, upload_id, parts)
            digests = [part.md5 for part in sent]
            self.checkpoint("written")  # an unfinished upload: listed by temporary_keys
            sha256, size = reader.sha256(), reader.size
            self.check_expected(sha256, expected_sha256)
            self.checkpoint("verified")
            try:
                completed = self._complete(key, upload_id, sent, {"If-None-Match": "*"})
            except _Raced:  # someone stored the same bytes meanwhile
                existing, _current = self._existing(key, sha256, size, lambda: digests)
                if existing is None:
                    raise BlobError(f"S3 refused to store {self.bucket}/{key}") from None
                return existing
        finally:
            if completed is None:
                self._abort(key, upload_id)
        return self._verified(key, sha256, size, digests, completed.etag, headers)

    def _spool_then_upload(
        self, parts: Iterator[bytes], reader: HashingReader, expected_sha256: str | None
    ) -> StoredBlob:
        """The key is known only at the end: spool to an unlinked temporary file while
        hashing (SHA-256, and each part's CRC-32), then upload the spooled parts
        (``_upload``), each re-read part sent under its CRC-32 (the server checks it).

        Receiving is the sequential part of the whole (the upload cannot start before the
        last byte names the key), so it does the least work that still ties the spool to
        the bytes received: a CRC-32 per part (4 GB/s here), not an MD5 (0.7 GB/s, which
        held receiving to ~160-300 MB/s) nor, as at first, a second SHA-256 pass over the
        spool. The same CRC-32s go with the parts as ``x-amz-checksum-crc32``, so the server
        checks each re-read part against the bytes received (``_send_parts``). A CRC-32 catches
        every error of up to 32 bits and any other with odds of 1 in 4 billion: the spool
        is a file only this process holds open, so what it guards against is storage
        faults, not an adversary (who could reach the process's memory as well). Measured
        A/B on 2 shared cores, 500 MB, 4 rounds: 0.67 of raw with the MD5s taken while
        receiving, 0.82 with the CRC-32s."""
        with tempfile.TemporaryFile(dir=self.spool_dir) as spool:
            crcs: list[int] = []

            def keep(data: bytes) -> None:
                crcs.append(zlib.crc32(data))
                spool.write(data)

            # One helper thread takes the CRC and writes part N while this one receives
            # and hashes part N + 1 (zlib and write release the GIL): two parts in hand.
            with ThreadPoolExecutor(1, thread_name_prefix="s3-spool") as helper:
                kept: Future[None] | None = None
                for data in parts:
                    if kept is not None:
                        kept.result()
                    kept = helper.submit(keep, data)
                    del data
                if kept is not None:
                    kept.result()
            sha256, size = reader.sha256(), reader.size
            self.check_expected(sha256, expected_sha256)
            key = content_key(sha256)

            def spooled_digests() -> list[bytes]:  # only to compare with an existing ETag
                spool.seek(0)
                return [_md5(_read_exactly(spool, n)) for n in self._part_lengths(size)]

            existing, current = self._existing(key, sha256, size, spooled_digests)
            if existing is not None:
                return existing
            spool.seek(0)
            try:
                return self._upload(key, spool, sha256, size, crcs, over_current=current)
            except _Raced:  # someone else stored the same bytes a moment ago
                existing, _current = self._existing(key, sha256, size, spooled_digests)
                if existing is None:
                    raise BlobError(f"S3 refused to store {self.bucket}/{key}") from None
                return existing

    def _existing(
        self, key: str, sha256: str, size: int, digests: Callable[[], list[bytes]]
    ) -> tuple[StoredBlob | None, bool]:
        """(the final object if it already holds these bytes, whether a current version exists)

        Its ETag is compared with the ones these bytes would get (from the part MD5s,
        ``digests()``); when that differs (another part size, another ETag convention)
        the object itself is read back and hashed.
        """
        try:
            found = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None, False
            raise self._error("reading the status of", key, exc) from None
        except _STORAGE_ERRORS as exc:
            raise self._error("reading the status of", key, exc) from None
        if found.size == size and (
            _etag(found.etag) in _etags(digests()) or hash_stream(self.open(key)) == (sha256, size)
        ):
            info = self._info(key, found)
            blob = StoredBlob(key, sha256, size, info.version_id, info.retain_until, created=False)
            return blob, True
        log.warning(
            "the current version of %s/%s does not hold its bytes: storing them again",
            self.bucket,
            key,
        )
        return None, True

    def _verified(
        self,
        key: str,
        sha256: str,
        size: int,
        digests: list[bytes],
        etag: str | None,
        headers: dict[str, str],
        *,
        checked: bool = False,
    ) -> StoredBlob:
        """Check what S3 made of the upload: its ETag (else the bytes, read back; not when
        the bytes are ``checked`` already), size and retention; ``checkpoint("final")``
        once the object is known good."""
        if (
            not checked
            and _etag(etag) not in _etags(digests)
            and hash_stream(self.open(key)) != (sha256, size)
        ):
            raise BlobError(
                f"S3 stored something other than the bytes sent to {self.bucket}/{key} "
                f"(ETag {etag}, expected {multipart_etag(digests)})"
            )
        found = self._call(
            "reading the status of", key, lambda: self.client.stat_object(self.bucket, key)
        )
        info = self._info(key, found)
        if info.size != size:
            raise BlobError(f"S3 holds {info.size} bytes at {self.bucket}/{key}, expected {size}")
        if headers.get("x-amz-object-lock-mode") and info.retain_until is None:
            raise BlobError(f"S3 did not apply retention to {self.bucket}/{key}")
        self.checkpoint("final")
        return StoredBlob(key, sha256, size, info.version_id, info.retain_until, created=True)

    def _upload(
        self,
        key: str,
        body: IO[bytes],
        sha256: str,
        size: int,
        crcs: list[int],
        *,
        over_current: bool,
    ) -> StoredBlob:
        """Send the spooled bytes to ``key`` as a multipart upload, each part under the
        CRC-32 taken when it was received: the server refuses a part whose bytes changed
        in the spool or on the way (``_send_parts``), so the object exists only if every
        part is the bytes that were hashed."""
        # Never a second version over a good one: only a damaged current one is covered.
        guard = {} if over_current else {"If-None-Match": "*"}
        upload_id, headers = self._start_upload(key)
        completed = None
        try:
            parts = (_read_exactly(body, length) for length in self._part_lengths(size))
            sent = self._send_parts(key, upload_id, parts, crcs)
            self.checkpoint("written")  # an unfinished upload: listed by temporary_keys
            self.checkpoint("verified")  # every part was the received one, and accepted
            completed = self._complete(key, upload_id, sent, guard)
        finally:
            if completed is None:
                self._abort(key, upload_id)
        digests = [part.md5 for part in sent]
        return self._verified(key, sha256, size, digests, completed.etag, headers)

    def _start_upload(self, key: str) -> tuple[str, dict[str, str]]:
        """Start a multipart upload of ``key`` under the retention settings, its parts
        checked by CRC-32 (``_send_parts``): its id, and the headers the finished object
        must show (checked by ``_verified``)."""
        headers = {"Content-Type": "application/octet-stream", **self._lock_headers()}
        create = {**headers, CHECKSUM_ALGORITHM: "CRC32"}  # AWS wants it before the parts
        upload_id = self._call(
            "starting the upload of",
            key,
            lambda: self.client._create_multipart_upload(self.bucket, key, create),
        )
        return upload_id, headers

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client._abort_multipart_upload(self.bucket, key, upload_id)
        except Exception as exc:  # never hides the first failure; reconcile lists it
            log.warning("could not abort the upload of %s/%s: %s", self.bucket, key, exc)

    def _part_lengths(self, size: int) -> list[int]:
        full, rest = divmod(size, self.part_size)
        return [self.part_size] * full + ([rest] if rest else [])

    def _send_parts(
        self,
        key: str,
        upload_id: str,
        parts: Iterator[bytes],
        crcs: list[int] | None = None,
    ) -> list[_Part]:
        """Upload the parts, at most ``parallel_uploads`` in flight (memory stays flat).

        Each part carries its CRC-32 as ``x-amz-checksum-crc32``: the one in ``crcs``
        (spooled bytes: taken when they were received), else taken by the worker that
        sends it. A server that echoes it has computed the CRC-32 of what it received and
        found that one (it answers BadDigest otherwise: bytes changed in the spool or on
        the way), and its ETag is then the part's MD5 (``_verified`` compares the final
        ETag with those). A part answered without the echo is checked here instead: the
        spooled bytes against their CRC-32, the server's ETag against their MD5. This
        replaced a Content-MD5 per part: MD5 (0.7 GB/s) cost the sending threads more
        CPU than minio's own SHA-256 of raw's parts, on the cores SeaweedFS needs; CRC-32
        runs at 4 GB/s and the spool's are free. The payload is not hashed again for the
        signature (``ArchiveMinio``). This thread reads the next part when a sender is free.
        """
        done_parts: dict[int, _Part] = {}

        def send(number: int, data: bytes) -> _Part:
            crc = zlib.crc32(data) if crcs is None else crcs[number - 1]
            extra = {CHECKSUM_CRC32: _crc32_header(crc), PAYLOAD_HASH: UNSIGNED}
            query = {"partNumber": str(number), "uploadId": upload_id}
            written = self._call(
                f"uploading part {number} of",
                key,
                lambda: self.client._put_object(self.bucket, key, data, extra, query),
            )
            etag = _etag(written.etag)
            if (written.http_headers or {}).get(CHECKSUM_CRC32) == extra[CHECKSUM_CRC32]:
                md5 = bytes.fromhex(etag) if MD5_HEX.match(etag) else _md5(data)
                return _Part(written.etag, md5, crc)
            if crcs is not None and zlib.crc32(data) != crc:
                raise BlobError(f"the spooled bytes of {key} changed before they were sent")
            md5 = _md5(data)
            if MD5_HEX.match(etag) and etag != md5.hex():
                raise BlobError(
                    f"S3 stored other bytes than were sent as part {number} of {self.bucket}/{key}"
                )
            return _Part(written.etag, md5, crc)

        in_flight: dict[Future[_Part], int] = {}

        def collect(until: int) -> None:
            while len(in_flight) > until:
                done, _pending = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    done_parts[in_flight.pop(future)] = future.result()

        pool = ThreadPoolExecutor(self.parallel_uploads, thread_name_prefix="s3-part")
        try:
            # The next part is read once a sender is free, not before: one part fewer in
            # memory (the request's read-ahead keeps receiving meanwhile).
            for number in itertools.count(1):
                collect(self.parallel_uploads - 1)
                data = next(parts, None)
                if data is None:
                    break
                in_flight[pool.submit(send, number, data)] = number
                del data
            collect(0)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [done_parts[n] for n in sorted(done_parts)]

    def _complete(
        self, key: str, upload_id: str, parts: list[_Part], guard: dict[str, str]
    ) -> CompleteMultipartUploadResult:
        body = "".join(
            f"<Part><PartNumber>{number}</PartNumber><ETag>{escape(part.etag)}</ETag>"
            f"<ChecksumCRC32>{_crc32_header(part.crc)}</ChecksumCRC32></Part>"
            for number, part in enumerate(parts, start=1)
        )
        xml = f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>".encode()
        headers = {
            "Content-Type": "application/xml",
            "Content-MD5": _content_md5(hashlib.md5(xml, usedforsecurity=False).digest()),
            **guard,
        }

        def complete() -> CompleteMultipartUploadResult:
            response = self.client._execute(
                "POST",
                self.bucket,
                key,
                body=xml,
                headers=headers,
                query_params={"uploadId": upload_id},
            )
            return CompleteMultipartUploadResult(response)

        return self._call("completing the upload of", key, complete, guarded=True)

    # -- reading -------------------------------------------------------------------

    def open(
        self, key: str, start: int = 0, end: int | None = None, version_id: str | None = None
    ) -> Iterator[bytes]:
        key_digest(key)  # refuses anything that is not a content address
        if end is not None and end < start:
            return
        length = 0 if end is None else end - start + 1
        try:
            response = self.client.get_object(
                self.bucket, key, offset=start, length=length, version_id=version_id
            )
        except S3Error as exc:
            if exc.code in _MISSING:
                raise BlobError(f"original {key} is missing from storage") from None
            if exc.code == "InvalidRange":  # start at or past the end, as a file would
                return
            raise self._error("reading", key, exc) from None
        except _STORAGE_ERRORS as exc:
            raise self._error("reading", key, exc) from None
        complete = False
        try:
            try:
                yield from response.stream(CHUNK)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise self._error("reading", key, exc) from None
            complete = True
        finally:
            if not complete:  # a half-read body must not go back to the connection pool
                response.close()
            response.release_conn()

    def stat(self, key: str, version_id: str | None = None) -> BlobInfo | None:
        key_digest(key)
        try:
            found = self.client.stat_object(self.bucket, key, version_id=version_id)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise self._error("reading the status of", key, exc) from None
        except _STORAGE_ERRORS as exc:
            raise self._error("reading the status of", key, exc) from None
        return self._info(key, found)

    def _info(self, key: str, found: Any) -> BlobInfo:
        version = found.version_id if found.version_id not in (None, "", "null") else None
        retain_until: datetime | None = None
        hold = False
        if self.enforces_retention:
            headers = found.metadata or {}
            until = headers.get("x-amz-object-lock-retain-until-date")
            held = headers.get("x-amz-object-lock-legal-hold")
            if held is not None:  # the HEAD answered both (AWS, MinIO and SeaweedFS do)
                retain_until = from_iso8601utc(until) if until else None
                hold = held.upper() == "ON"
            else:
                retain_until = self._retain_until(key, version)
                hold = self._legal_hold(key, version)
        return BlobInfo(key, found.size or 0, version, retain_until, hold)

    def _retain_until(self, key: str, version_id: str | None) -> datetime | None:
        try:
            retention = self.client.get_object_retention(self.bucket, key, version_id)
        except S3Error as exc:
            if exc.code in _NO_RETENTION:
                return None
            raise self._error("reading the retention of", key, exc) from None
        except _STORAGE_ERRORS as exc:
            raise self._error("reading the retention of", key, exc) from None
        return retention.retain_until_date if retention else None

    def _legal_hold(self, key: str, version_id: str | None) -> bool:
        try:
            return self.client.is_object_legal_hold_enabled(self.bucket, key, version_id)
        except S3Error as exc:
            if exc.code in _NO_HOLD:
                return False
            raise self._error("reading the legal hold of", key, exc) from None
        except _STORAGE_ERRORS as exc:
            raise self._error("reading the legal hold of", key, exc) from None

    def keys(self) -> Iterator[str]:
        for name in self._list(FINAL_PREFIX):
            if KEY.match(name):
                yield name

    def temporary_keys(self) -> Iterator[str]:
        """Uploads a killed process never finished, as ``<key>?uploadId=<id>``.

        ``put`` writes no temporary objects; the only leftover it can have is an unfinished
        multipart upload, which S3 keeps (and bills) until it is aborted, but never shows
        as an object.
        """
        found = (f"{name}{UPLOAD_MARK}{upload}" for name, upload in self._uploads(FINAL_PREFIX))
        yield from sorted(found)

    def discard_temporary(self, name: str) -> None:
        """Abort an unfinished upload listed by ``temporary_keys``."""
        key, mark, upload_id = name.partition(UPLOAD_MARK)
        if not (mark and upload_id and key.startswith(FINAL_PREFIX)):
            raise BlobError(f"not an unfinished upload: {name!r}")
        self._call(
            "aborting the upload of",
            key,
            lambda: self.client._abort_multipart_upload(self.bucket, key, upload_id),
        )

    def set_legal_hold(self, key: str, on: bool, version_id: str | None = None) -> None:
        key_digest(key)
        if not self.enforces_retention:
            raise BlobError(f"bucket {self.bucket} has no Object Lock: legal holds are impossible")
        if self.stat(key, version_id) is None:  # SeaweedFS answers 500 for a missing key
            raise BlobError(f"original {key} is missing from storage")
        try:
            if on:
                self.client.enable_object_legal_hold(self.bucket, key, version_id)
            else:
                self.client.disable_object_legal_hold(self.bucket, key, version_id)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise BlobError(f"original {key} is missing from storage") from None
            raise self._error("setting the legal hold of", key, exc) from None
        except _STORAGE_ERRORS as exc:
            raise self._error("setting the legal hold of", key, exc) from None

    # -- internals -----------------------------------------------------------------

    def _list(self, prefix: str) -> Iterator[str]:
        try:
            for found in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if found.object_name and not found.is_dir:
                    yield found.object_name
        except _STORAGE_ERRORS as exc:
            raise self._error("listing", prefix, exc) from None

    def _uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Unfinished multipart uploads under ``prefix`` (name, upload id)."""
        key_marker: str | None = None
        upload_marker: str | None = None
        try:
            while True:
                page = self.client._list_multipart_uploads(
                    self.bucket,
                    prefix=prefix,
                    key_marker=key_marker,
                    upload_id_marker=upload_marker,
                )
                for upload in page.uploads:
                    if upload.object_name and upload.upload_id:
                        yield upload.object_name, upload.upload_id
                if not page.is_truncated or not page.uploads:
                    return
                key_marker = page.uploads[-1].object_name
                upload_marker = page.uploads[-1].upload_id
        except _STORAGE_ERRORS as exc:
            raise self._error("listing the unfinished uploads under", prefix, exc) from None

    def _call(
        self, action: str, key: str | None, func: Callable[[], T], *, guarded: bool = False
    ) -> T:
        try:
            return func()
        except S3Error as exc:
            if guarded and exc.code == "PreconditionFailed":
                raise _Raced from None
            raise self._error(action, key, exc) from None
        except _STORAGE_ERRORS as exc:
            raise self._error(action, key, exc) from None

    def _error(self, action: str, key: str | None, exc: BaseException) -> BlobError:
        where = f"{self.bucket}/{key}" if key else self.bucket
        if isinstance(exc, S3Error):
            reason = f"{exc.code}: {exc.message}"
            if exc.code == "NoSuchBucket":
                reason = f"the bucket {self.bucket} does not exist"
            elif exc.code == "BadDigest":
                reason = "the server received other bytes than were sent (BadDigest)"
        elif isinstance(exc, ServerError | InvalidResponseError):
            reason = f"unexpected answer from the server: {exc}"
        elif isinstance(exc, urllib3.exceptions.MaxRetryError) and isinstance(
            exc.reason, urllib3.exceptions.ResponseError
        ):
            reason = f"the S3 server kept failing ({exc.reason})"
        elif isinstance(exc, urllib3.exceptions.HTTPError):
            reason = f"cannot reach the S3 server ({exc})"
        else:
            reason = str(exc)
        return BlobError(f"S3 storage failed {action} {where}: {reason}")
