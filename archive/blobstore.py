"""The port for original files: content-addressed, streamed, verified, write-once.

Both adapters (``archive.filesystem`` and ``archive.s3``) follow one protocol for
``put``: stream the bytes to a temporary place while computing SHA-256 and size,
verify what storage now holds, then make it final at its content address
``sha256/ab/cd/<hex>``. Same bytes twice: one object. Nothing here ever deletes or
overwrites a final object; a crash part-way leaves at worst a temporary or orphan
object, which ``reconcile`` reports.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from archive.exceptions import ArchiveError, DomainError

if TYPE_CHECKING:
    from archive.settings import Settings

CHUNK = 1024 * 1024
KEY = re.compile(r"^sha256/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})$")


class BlobError(ArchiveError):
    """Storage failed or holds something other than what was written."""

    status = 502
    title = "Storage error"


class BlobTooLargeError(ArchiveError):
    status = 413
    title = "Content too large"


class ChecksumMismatchError(DomainError):
    """The client's declared checksum does not match the bytes received."""


def content_key(sha256_hex: str) -> str:
    return f"sha256/{sha256_hex[:2]}/{sha256_hex[2:4]}/{sha256_hex}"


def key_digest(key: str) -> str:
    found = KEY.match(key)
    if not found:
        raise BlobError(f"not a content address: {key!r}")
    return found.group(3)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """Wraps a stream: counts and hashes every byte read through it, and enforces a limit."""

    def __init__(self, source: Readable, limit: int | None = None) -> None:
        self.source = source
        self.limit = limit
        self.size = 0
        self._sha256 = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        data = self.source.read(size if size and size > 0 else CHUNK)
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            raise BlobTooLargeError(f"the file is larger than the limit of {self.limit} bytes")
        self._sha256.update(data)
        return data

    def sha256(self) -> str:
        return self._sha256.hexdigest()


def hash_stream(chunks: Iterator[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class StoredBlob:
    """What ``put`` made durable (or found already there)."""

    key: str
    sha256: str
    size: int
    version_id: str | None
    retain_until: datetime | None
    created: bool


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    version_id: str | None
    retain_until: datetime | None
    legal_hold: bool


class BlobStore(ABC):
    """Where originals live. Adapters implement the storage primitives below."""

    #: Whether the store itself refuses deletes and overwrites (S3 Object Lock).
    enforces_retention: bool = False

    def checkpoint(self, step: str) -> None:
        """Called after each step of ``put`` ("written", "verified", "final") and by the
        application before it appends the event ("stored"). A seam for fault injection:
        tests make it raise or kill the process to prove the crash-safety order."""
        del step  # production stores do nothing here

    @abstractmethod
    def put(
        self, source: Readable, *, expected_sha256: str | None = None, limit: int | None = None
    ) -> StoredBlob:
        """Stream ``source`` in, verify it, make it final at its content address."""

    @abstractmethod
    def open(
        self, key: str, start: int = 0, end: int | None = None, version_id: str | None = None
    ) -> Iterator[bytes]:
        """Stream the bytes of ``key`` from ``start`` to ``end`` inclusive, in chunks: of the
        version ``version_id`` if given (S3: the one ``put`` recorded, whatever was written
        over it since), else of the current one."""

    @abstractmethod
    def stat(self, key: str, version_id: str | None = None) -> BlobInfo | None:
        """Size, version, retention and hold of ``key`` (that version); None when absent."""

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """Every final key (content address) in the store."""

    @abstractmethod
    def temporary_keys(self) -> Iterator[str]:
        """Leftovers of interrupted uploads."""

    @abstractmethod
    def set_legal_hold(self, key: str, on: bool, version_id: str | None = None) -> None:
        """Place or release a legal hold on ``key`` (that version)."""

    def digest(self, key: str, version_id: str | None = None) -> tuple[str, int]:
        """Re-read ``key`` (that version) and recompute its SHA-256 and size (fixity)."""
        return hash_stream(self.open(key, version_id=version_id))

    @staticmethod
    def check_expected(actual: str, expected: str | None) -> None:
        if expected is not None and actual != expected.lower():
            raise ChecksumMismatchError(
                f"the declared SHA-256 {expected} does not match the bytes received ({actual})"
            )


def open_blob_store(settings: Settings) -> BlobStore:
    """The adapter the settings ask for."""
    if settings.blob_backend == "s3":
        from archive.s3 import S3BlobStore

        return S3BlobStore.from_settings(settings)
    from archive.filesystem import FilesystemBlobStore

    return FilesystemBlobStore(settings.blob_root)
