"""The embedded default blob store: files under the data dir, written once, read-only after.

Write to a temporary file in the same file system, fsync, re-read to verify, then
rename into the content address and fsync the directory: after a crash a key either
holds the complete verified bytes or does not exist.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.holds = root / ".holds"
        for folder in (self.root, self.incoming, self.holds):  # the originals: owner only
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        key_digest(key)  # refuses anything that is not a content address
        return self.root / key

    def put(
        self, source: Readable, *, expected_sha256: str | None = None, limit: int | None = None
    ) -> StoredBlob:
        reader = HashingReader(source, limit)
        fd, name = tempfile.mkstemp(dir=self.incoming, prefix="upload-")
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            self.checkpoint("written")
            sha256 = reader.sha256()
            self.check_expected(sha256, expected_sha256)
            with temp.open("rb") as written:
                again, size = hash_stream(iter(lambda: written.read(CHUNK), b""))
            if (again, size) != (sha256, reader.size):
                raise BlobError("the stored bytes differ from the bytes received")
            self.checkpoint("verified")
            key = content_key(sha256)
            final = self.root / key
            if final.exists():
                temp.unlink()
                return StoredBlob(key, sha256, size, None, None, created=False)
            final.parent.mkdir(parents=True, exist_ok=True)
            temp.chmod(0o444)
            os.rename(temp, final)
            _fsync_dir(final.parent)
            self.checkpoint("final")
            return StoredBlob(key, sha256, size, None, None, created=True)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def open(
        self, key: str, start: int = 0, end: int | None = None, version_id: str | None = None
    ) -> Iterator[bytes]:
        del version_id  # files have no versions: a key is written once, never again
        path = self._path(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise BlobError(f"original {key} is missing from storage") from None
        with handle:
            handle.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = handle.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def stat(self, key: str, version_id: str | None = None) -> BlobInfo | None:
        del version_id
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        hold = (self.holds / key_digest(key)).exists()
        return BlobInfo(key, size, None, None, hold)

    def keys(self) -> Iterator[str]:
        base = self.root / "sha256"
        if not base.exists():
            return
        for path in sorted(base.glob("*/*/*")):
            key = path.relative_to(self.root).as_posix()
            if KEY.match(key):
                yield key

    def temporary_keys(self) -> Iterator[str]:
        for path in sorted(self.incoming.iterdir()):
            yield path.relative_to(self.root).as_posix()

    def set_legal_hold(self, key: str, on: bool, version_id: str | None = None) -> None:
        del version_id
        if self.stat(key) is None:
            raise BlobError(f"original {key} is missing from storage")
        marker = self.holds / key_digest(key)
        if on:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)
