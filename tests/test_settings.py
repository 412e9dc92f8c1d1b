"""Settings: one place, one clear line on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from archive.application import ArchiveApp
from archive.settings import Settings, SettingsError, load_settings
from projections.store import open_store


def test_defaults_are_the_embedded_sqlite_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ARCHIVE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("ARCHIVE_DATABASE_URL", raising=False)
    settings = load_settings()
    assert settings.backend == "sqlite"
    env = settings.eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"
    assert env["SQLITE_DBNAME"] == str(tmp_path / "events.sqlite3")


def test_postgres_url_is_split_for_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVE_DATABASE_URL", "postgresql://arch%40ive:p%3Ass@db.local:6543/loans")
    env = load_settings().eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"], env["POSTGRES_DBNAME"]) == (
        "db.local",
        "6543",
        "loans",
    )
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == ("arch@ive", "p:ss")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("ARCHIVE_PORT", "eighty", "ARCHIVE_PORT"),
        ("ARCHIVE_PORT", "70000", "ARCHIVE_PORT"),
        ("ARCHIVE_DATABASE_URL", "mysql://x/y", "postgresql://"),
        ("ARCHIVE_DATABASE_URL", "postgresql://hostonly", "database name"),
        ("ARCHIVE_OVERVALUATION_MARGIN", "-0.1", "ARCHIVE_OVERVALUATION_MARGIN"),
        ("ARCHIVE_LOG_LEVEL", "loud", "ARCHIVE_LOG_LEVEL"),
    ],
)
def test_invalid_settings_fail_with_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"invalid setting {name}:")
    assert fragment in message


def test_a_new_data_directory_is_the_owners_alone(tmp_path: Path) -> None:
    """It holds every loan file (events.sqlite3, views.sqlite3) and original: other
    users of the machine must not read it. An existing directory keeps its mode."""
    fresh = tmp_path / "fresh"
    settings = Settings(data_dir=fresh, demo_data=False)
    archive = ArchiveApp(settings)
    store = open_store(settings)
    try:
        assert archive.blobs is not None  # the filesystem store, made on first use
        for folder in (fresh, fresh / "originals"):
            assert folder.stat().st_mode & 0o777 == 0o700, folder
    finally:
        store.close()
        archive.close()
    tmp_path.chmod(0o755)
    ArchiveApp(Settings(data_dir=tmp_path, demo_data=False)).close()
    assert tmp_path.stat().st_mode & 0o777 == 0o755
