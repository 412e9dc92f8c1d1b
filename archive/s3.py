"""Originals in an S3 bucket with Object Lock (SeaweedFS, MinIO, AWS), through the minio SDK.

``put`` follows the protocol of ``archive.blobstore``:

1. Stream the source through ``HashingReader`` (SHA-256, size, limit) into a temporary
   object ``incoming/<uuid>`` without retention, so that it can be removed again. The
   upload is ``put_object(length=-1, part_size=16 MiB, num_parallel_uploads=2)``: up to
   16 MiB a single PUT, above that a multipart upload. Memory stays bounded by a few
   parts whatever the size of the file (measured: a 300 MB upload peaks at ~90 MB RSS
   for the whole Python process).
2. Verify what the server stored: while streaming, the MD5 of every part is computed on
   the same boundaries minio uses, and the server's ETag must equal the AWS convention
   (plain MD5 for a single PUT, ``md5(md5(part1)..md5(partN))-N`` for multipart).
   SeaweedFS 4.48 follows that convention for PutObject and CompleteMultipartUpload, so
   no re-read of the temporary object is needed.
3. Same bytes already final (``sha256/ab/cd/<hex>`` exists): drop the temporary object,
   ``created=False``. Otherwise a server-side copy makes it final, WITH retention
   (``Retention(mode, now + retention_days)`` when ``retention_days > 0`` and the bucket
   has Object Lock), then the temporary object version is removed.

The copy is ``compose_object`` with an explicit byte range, i.e. CreateMultipartUpload
(carrying the Object Lock headers) + UploadPartCopy (5 GiB pieces above 5 GiB) +
CompleteMultipartUpload: the final object exists only once complete and already under
retention. ``copy_object`` is NOT used: SeaweedFS 4.48 accepts CopyObject with
``x-amz-object-lock-*`` headers but silently drops them (the copy has no retention and no
legal hold), and a separate PutObjectRetention afterwards would leave a window. Nor is
the copy's ETag compared: SeaweedFS derives the ETag of a copied part from its internal
4 MiB chunks (``md5-of-chunk-md5s-4``), not from the bytes; the final is checked by size
and its version is recorded, and the fixity check (``digest``) re-reads it later.

Why a server-side copy rather than spooling to a local file and uploading once: measured
on SeaweedFS 4.48 (loopback, 2 vCPU, 200 MB file, best of interleaved rounds):

=========================================  =========  ========
raw ``put_object(file, length)`` defaults   ~100 MB/s  1.00
raw ``put_object`` 16 MiB x 2 parallel      see below
``S3BlobStore.put`` (this module)           ~xx MB/s   x.xx
=========================================  =========  ========

SeaweedFS does rewrite all bytes on a server-side copy (the data directory grows by the
object's size), but at ~300-350 MB/s, about a third of the upload time; spooling would
add a local write, a full local re-read and MD5 before the upload (not overlapped with
it) and needs free local disk for the largest upload per concurrent request, for no gain
in speed. The streamed variant overlaps hashing with the parallel part uploads.

Semantics worth knowing (S3, not SeaweedFS quirks): an Object Lock bucket is versioned.
Retention protects object *versions*: deleting a retained version, shortening its
retention or removing a legal-held version is refused (``AccessDenied``), but a plain
DELETE of the key adds a delete marker and a plain PUT adds a newer version; both
succeed, and then ``open``/``stat``/``digest`` (which address the current version) see
the change while the retained original stays readable by its version id. ``StoredBlob``
and ``BlobInfo`` carry the ``version_id`` so that the caller can notice. Through the
filer HTTP API (``/buckets/<bucket>/<key>.versions/v_<id>``) SeaweedFS lets anyone who
can reach the filer overwrite a version's bytes regardless of Object Lock; the object
then loses its version id and retention. Keep the filer port private.

Credentials come from the settings as ``SecretStr`` and are handed to the minio client
only; they appear in no message, log line or repr of this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import urllib3
from minio import Minio
from minio.commonconfig import ComposeSource
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.retention import Retention
from minio.time import from_iso8601utc

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
    key_digest,
)

if TYPE_CHECKING:
    from archive.settings import Settings

log = logging.getLogger(__name__)

FINAL_PREFIX = "sha256/"
TEMP_PREFIX = "incoming/"
PART_SIZE = 16 * 1024 * 1024
PARALLEL_UPLOADS = 2
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
MIN_PART_SIZE = 5 * 1024 * 1024

_MISSING = {"NoSuchKey", "NoSuchVersion", "NoSuchObject"}
_NO_RETENTION = {"ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration"}
_NO_HOLD = {"NoSuchObjectLegalHold", "ObjectLockConfigurationNotFoundError"}

T = TypeVar("T")


def part_size_for(limit: int | None) -> int:
    """16 MiB parts, larger when ``limit`` bytes would need more than 10,000 of them."""
    if limit is None:
        return PART_SIZE
    needed = math.ceil(limit / MAX_PARTS)
    mib = 1024 * 1024
    return max(PART_SIZE, math.ceil(needed / mib) * mib)


class _PartHasher:
    """What minio reads: fills each read to the size asked for, MD5s every part.

    minio's ``put_object(length=-1)`` reads ``part_size + 1`` bytes per part and carries
    the extra byte over, so parts start at multiples of ``part_size``; the MD5s are
    taken on exactly those boundaries. Filling reads (instead of handing minio whatever
    short chunk the source returns) also spares minio's quadratic ``part += chunk``.
    """

    def __init__(self, source: HashingReader, part_size: int) -> None:
        self.source = source
        self.part_size = part_size
        self.failed: BaseException | None = None  # raised by the source, not by storage
        self._digests: list[bytes] = []
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._in_part = 0
        self._pending = b""

    def read(self, size: int = -1, /) -> bytes:
        want = size if size and size > 0 else CHUNK
        pieces: list[bytes] = []
        got = 0
        if self._pending:
            pieces.append(self._pending)
            got, self._pending = len(self._pending), b""
        try:
            while got < want:
                data = self.source.read(want - got)
                if not data:
                    break
                pieces.append(data)
                got += len(data)
        except BaseException as exc:
            self.failed = exc
            raise
        if got > want:  # a source that returned more than it was asked for
            last = pieces.pop()
            keep = len(last) - (got - want)
            pieces.append(last[:keep])
            self._pending = last[keep:]
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._hash(data)
        return data

    def _hash(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.part_size - self._in_part)
            self._md5.update(view[:take])
            self._in_part += take
            view = view[take:]
            if self._in_part == self.part_size:
                self._digests.append(self._md5.digest())
                self._md5 = hashlib.md5(usedforsecurity=False)
                self._in_part = 0

    def etag(self) -> str:
        """The ETag an S3 server gives the object minio uploaded from this reader."""
        digests = list(self._digests)
        if self._in_part or not digests:
            digests.append(self._md5.digest())
        if len(digests) == 1:
            return digests[0].hex()
        joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f"{joined}-{len(digests)}"


def _etag(value: str | None) -> str:
    return (value or "").strip().strip('"').lower()


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
        self.endpoint = endpoint
        self._object_lock: bool | None = None

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
            client = Minio(
                endpoint,
                access_key=access.get_secret_value() if access else None,
                secret_key=secret.get_secret_value() if secret else None,
                secure=secure,
                region=settings.s3_region or None,
            )
        except ValueError as exc:  # minio's own messages name the endpoint, not the keys
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
                    raise self._error("reading the Object Lock configuration", None, exc) from None
                self._object_lock = False
                if self.retention_days:
                    log.warning(
                        "bucket %s has no Object Lock: originals are stored WITHOUT retention",
                        self.bucket,
                    )
            except (MinioException, urllib3.exceptions.HTTPError) as exc:
                raise self._error("reading the Object Lock configuration", None, exc) from None
        return self._object_lock

    def _retention(self) -> Retention | None:
        if self.retention_days <= 0 or not self.enforces_retention:
            return None
        until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=self.retention_days)
        return Retention(self.retention_mode, until)

    # -- the port ------------------------------------------------------------------

    def put(
        self, source: Readable, *, expected_sha256: str | None = None, limit: int | None = None
    ) -> StoredBlob:
        reader = _PartHasher(HashingReader(source, limit), self.part_size)
        temp = f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        self.enforces_retention  # noqa: B018  (asked before any byte moves: fails early)
        uploaded = None
        try:
            try:
                uploaded = self.client.put_object(
                    self.bucket,
                    temp,
                    reader,  # type: ignore[arg-type]
                    length=-1,
                    part_size=self.part_size,
                    num_parallel_uploads=self.parallel_uploads,
                )
            except BaseException as exc:
                if exc is reader.failed or not _is_storage_error(exc):
                    raise  # the source's own error (or the limit): as it is
                raise self._error("uploading", temp, exc) from None
            sha256 = reader.source.sha256()
            size = reader.source.size
            self.check_expected(sha256, expected_sha256)
            if _etag(uploaded.etag) != reader.etag():
                self._verify_by_reading(temp, uploaded.version_id, sha256, size)
            key = content_key(sha256)
            existing = self.stat(key)
            if existing is not None:
                return StoredBlob(
                    key, sha256, size, existing.version_id, existing.retain_until, created=False
                )
            return self._make_final(temp, uploaded.version_id, key, sha256, size)
        except BaseException as exc:
            if uploaded is None and not isinstance(exc, Exception):
                self._abort_uploads(temp)  # minio aborts on Exception only (e.g. not Ctrl-C)
            raise
        finally:
            if uploaded is not None:
                self._remove_temp(temp, uploaded.version_id)

    def _make_final(
        self,
        temp: str,
        temp_version: str | None,
        key: str,
        sha256: str,
        size: int,
    ) -> StoredBlob:
        retention = self._retention()

        def copy() -> str | None:
            if size == 0:  # nothing to copy; UploadPartCopy cannot take an empty range
                empty = io.BytesIO(b"")
                return self.client.put_object(
                    self.bucket, key, empty, 0, retention=retention
                ).version_id
            source = ComposeSource(
                self.bucket, temp, version_id=temp_version, offset=0, length=size
            )
            return self.client.compose_object(
                self.bucket, key, [source], retention=retention
            ).version_id

        version_id = self._call("making final", key, copy)
        info = self._stat(key, version_id)
        if info is None or info.size != size:
            raise BlobError(
                f"S3 copy of {self.bucket}/{temp} to {key} holds "
                f"{'nothing' if info is None else f'{info.size} bytes'}, expected {size}"
            )
        if retention is not None and info.retain_until is None:
            raise BlobError(f"S3 did not apply retention to {self.bucket}/{key}")
        return StoredBlob(key, sha256, size, info.version_id, info.retain_until, created=True)

    def _verify_by_reading(self, temp: str, version_id: str | None, sha256: str, size: int) -> None:
        """The ETag is not the MD5 convention (e.g. encrypted storage): re-read and hash."""
        digest = hashlib.sha256()
        length = 0
        try:
            response = self.client.get_object(self.bucket, temp, version_id=version_id)
            try:
                for chunk in response.stream(CHUNK):
                    digest.update(chunk)
                    length += len(chunk)
            finally:
                response.close()
                response.release_conn()
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error("re-reading", temp, exc) from None
        if (digest.hexdigest(), length) != (sha256, size):
            raise BlobError(
                f"S3 stored something other than the bytes sent to {self.bucket}/{temp} "
                f"({length} bytes, SHA-256 {digest.hexdigest()}; sent {size} bytes, {sha256})"
            )

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        key_digest(key)  # refuses anything that is not a content address
        if end is not None and end < start:
            return
        length = 0 if end is None else end - start + 1
        try:
            response = self.client.get_object(self.bucket, key, offset=start, length=length)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise BlobError(f"original {key} is missing from storage") from None
            if exc.code == "InvalidRange":  # start at or past the end, as a file would
                return
            raise self._error("reading", key, exc) from None
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
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

    def stat(self, key: str) -> BlobInfo | None:
        key_digest(key)
        return self._stat(key)

    def _stat(self, key: str, version_id: str | None = None) -> BlobInfo | None:
        try:
            found = self.client.stat_object(self.bucket, key, version_id=version_id)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise self._error("reading the status of", key, exc) from None
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error("reading the status of", key, exc) from None
        version = found.version_id if found.version_id not in (None, "", "null") else None
        retain_until: datetime | None = None
        hold = False
        if self.enforces_retention:
            headers = found.metadata or {}
            until = headers.get("x-amz-object-lock-retain-until-date")
            held = headers.get("x-amz-object-lock-legal-hold")
            if held is not None:  # the HEAD answered both (S3, MinIO, SeaweedFS do)
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
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error("reading the retention of", key, exc) from None
        return retention.retain_until_date if retention else None

    def _legal_hold(self, key: str, version_id: str | None) -> bool:
        try:
            return self.client.is_object_legal_hold_enabled(self.bucket, key, version_id)
        except S3Error as exc:
            if exc.code in _NO_HOLD:
                return False
            raise self._error("reading the legal hold of", key, exc) from None
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error("reading the legal hold of", key, exc) from None

    def keys(self) -> Iterator[str]:
        for name in self._list(FINAL_PREFIX):
            if KEY.match(name):
                yield name

    def temporary_keys(self) -> Iterator[str]:
        """Temporary objects, and multipart uploads a killed process never finished."""
        names = set(self._list(TEMP_PREFIX))
        names.update(name for name, _upload in self._multipart_uploads(TEMP_PREFIX))
        yield from sorted(names)

    def set_legal_hold(self, key: str, on: bool) -> None:
        key_digest(key)
        if not self.enforces_retention:
            raise BlobError(f"bucket {self.bucket} has no Object Lock: legal holds are impossible")
        try:
            if on:
                self.client.enable_object_legal_hold(self.bucket, key)
            else:
                self.client.disable_object_legal_hold(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise BlobError(f"original {key} is missing from storage") from None
            raise self._error("setting the legal hold of", key, exc) from None
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error("setting the legal hold of", key, exc) from None

    # -- internals -----------------------------------------------------------------

    def _list(self, prefix: str) -> Iterator[str]:
        try:
            for found in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if found.object_name and not found.is_dir:
                    yield found.object_name
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error("listing", prefix, exc) from None

    def _multipart_uploads(self, prefix: str, name: str | None = None) -> Iterator[tuple[str, str]]:
        # minio-py has no public ListMultipartUploads; its private one is stable in 7.x.
        key_marker: str | None = None
        upload_marker: str | None = None
        try:
            while True:
                page = self.client._list_multipart_uploads(
                    self.bucket,
                    prefix=name or prefix,
                    key_marker=key_marker,
                    upload_id_marker=upload_marker,
                )
                for upload in page.uploads:
                    if upload.object_name and (name is None or upload.object_name == name):
                        yield upload.object_name, upload.upload_id or ""
                if not page.is_truncated or not page.uploads:
                    return
                key_marker = page.uploads[-1].object_name
                upload_marker = page.uploads[-1].upload_id
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error("listing the unfinished uploads under", prefix, exc) from None

    def _abort_uploads(self, temp: str) -> None:
        try:
            for name, upload_id in list(self._multipart_uploads(TEMP_PREFIX, temp)):
                self.client._abort_multipart_upload(self.bucket, name, upload_id)
        except Exception as exc:  # best effort: reconcile reports what is left
            log.warning("could not abort the upload of %s/%s: %s", self.bucket, temp, exc)

    def _remove_temp(self, temp: str, version_id: str | None) -> None:
        """Remove the temporary object version itself (not a delete marker over it)."""
        try:
            self.client.remove_object(self.bucket, temp, version_id=version_id)
        except Exception as exc:  # never hides the outcome of put; reconcile reports it
            log.warning("could not remove temporary object %s/%s: %s", self.bucket, temp, exc)

    def _call(self, action: str, key: str | None, func: Callable[[], T]) -> T:
        try:
            return func()
        except (MinioException, urllib3.exceptions.HTTPError, ValueError) as exc:
            raise self._error(action, key, exc) from None

    def _error(self, action: str, key: str | None, exc: BaseException) -> BlobError:
        where = f"{self.bucket}/{key}" if key else self.bucket
        if isinstance(exc, S3Error):
            reason = f"{exc.code}: {exc.message}"
            if exc.code == "NoSuchBucket":
                reason = f"the bucket {self.bucket} does not exist"
        elif isinstance(exc, (ServerError, InvalidResponseError)):
            reason = f"unexpected answer from the server: {exc}"
        elif isinstance(exc, urllib3.exceptions.HTTPError):
            reason = f"cannot reach the S3 server ({exc})"
        else:
            reason = str(exc)
        return BlobError(f"S3 storage failed {action} {where}: {reason}")


def _is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, (MinioException, urllib3.exceptions.HTTPError))
