from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Iterator

import pytest
from postgres_cluster import PostgresCluster
from seaweedfs import SeaweedFS

# ---------------------------------------------------------------------------
# PostgreSQL fixtures (tests/postgres_cluster.py)
#
#   postgres_cluster  session-scoped: one throwaway PostgreSQL 15 server, started
#                     on first use, stopped at the end of the session (even on
#                     failure). With ARCHIVE_TEST_POSTGRES_URL set, an existing
#                     server is used instead.
#   postgres_url      function-scoped: a fresh, empty database for one test, as a
#                     postgresql://user:password@127.0.0.1:port/name URL (usable
#                     as ARCHIVE_DATABASE_URL); dropped after the test.
#
# Tests using either fixture get the `postgres` marker: `-m "not postgres"`
# skips them.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster(request: pytest.FixtureRequest) -> PostgresCluster:
    cluster = PostgresCluster()
    request.addfinalizer(cluster.stop)
    # SIGTERM (a CI timeout, `kill`) would end pytest without teardown and leave the
    # server running: treat it as Ctrl-C, which pytest unwinds through finalizers.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    return cluster.start()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture
def postgres_url(
    postgres_cluster: PostgresCluster, request: pytest.FixtureRequest
) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"t_{slug}_{uuid.uuid4().hex[:8]}"
    url = postgres_cluster.create_database(name)
    yield url
    postgres_cluster.drop_database(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"postgres_url", "postgres_cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


# ---------------------------------------------------------------------------
# Backend-parametrised fixtures: every test that asks for `settings` (or anything
# built on it) runs once on SQLite and once on PostgreSQL.
# ---------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from archive.application import ArchiveApp  # noqa: E402
from archive.domain import CommandContext, Role  # noqa: E402
from archive.settings import Settings  # noqa: E402


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")
        return Settings(data_dir=tmp_path, database_url=url, demo_data=False)
    return Settings(data_dir=tmp_path, demo_data=False)


@pytest.fixture
def archive(settings: Settings) -> Iterator[ArchiveApp]:
    app = ArchiveApp(settings)
    yield app
    app.close()


@pytest.fixture
def officer() -> CommandContext:
    return CommandContext("officer.one", Role.CREDIT_OFFICER.value, "test")


# ---------------------------------------------------------------------------
# Blob-store-parametrised fixtures for the documents suite: every test that asks
# for `doc_settings` runs on the filesystem store and on a real S3 server.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def seaweedfs(request: pytest.FixtureRequest) -> SeaweedFS:
    """One throwaway SeaweedFS (master, volume, filer, S3) on free loopback ports."""
    server = SeaweedFS()
    request.addfinalizer(server.stop)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    return server.start()


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """A fresh bucket with Object Lock for one test, removed afterwards."""
    bucket = seaweedfs.create_bucket()
    yield bucket
    seaweedfs.drop_bucket(bucket)


@pytest.fixture(params=["filesystem", "s3"])
def blob_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def doc_settings(blob_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    if blob_backend == "s3":
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        bucket = request.getfixturevalue("s3_bucket")
        return server.settings(tmp_path, bucket, retention_days=1, demo_data=False)
    return Settings(data_dir=tmp_path, demo_data=False)


@pytest.fixture
def doc_archive(doc_settings: Settings) -> Iterator[ArchiveApp]:
    app = ArchiveApp(doc_settings)
    yield app
    app.close()


@pytest.fixture
def tamper(blob_backend: str, doc_settings: Settings, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Change a stored original's bytes behind the archive's back."""

    def change(archive: ArchiveApp, key: str, content: bytes) -> None:
        if blob_backend == "s3":  # the filer API bypasses S3 Object Lock
            request.getfixturevalue("seaweedfs").overwrite(doc_settings.s3_bucket, key, content)
            return
        path = doc_settings.blob_root / key
        path.chmod(0o644)
        path.write_bytes(content)

    return change
