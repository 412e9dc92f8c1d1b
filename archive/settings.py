"""All configuration in one place, read from the environment (prefix ``ARCHIVE_``).

Every entry point (server, CLI, worker, tests) builds its Settings here, so a
command honours exactly the same configuration as the server.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(Exception):
    """Raised with one readable line when the configuration is invalid."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARCHIVE_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Where the embedded default keeps its data.")
    database_url: str | None = Field(
        None,
        description="Unset: SQLite under the data dir. postgresql://user:pass@host:port/db: "
        "PostgreSQL.",
    )
    db_pool_size: int = Field(5, ge=1, le=100, description="PostgreSQL connections per process.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    overvaluation_margin: Decimal = Field(
        Decimal("0.10"),
        ge=0,
        le=10,
        description="Appraisal above reviewed value by more than this share is an overvaluation.",
    )
    blob_url: str | None = Field(
        None,
        description="Where originals live. Unset: files under the data dir. s3://BUCKET: an "
        "S3 server (ARCHIVE_S3_*).",
    )
    s3_endpoint: str = Field("127.0.0.1:9000", description="host:port of the S3 server.")
    s3_secure: bool = Field(True, description="Use TLS to reach the S3 server.")
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str | None = None
    retention_mode: Literal["COMPLIANCE", "GOVERNANCE"] = Field(
        "COMPLIANCE", description="S3 Object Lock mode for originals."
    )
    retention_days: int = Field(
        3650, ge=0, le=36500, description="Object Lock retention of originals; 0 = none."
    )
    max_upload_bytes: int = Field(10 * 1024**3, ge=1, description="Largest original accepted.")
    ocr_languages: str = Field(
        "spa+eng", pattern=r"^[a-z_]{3,}(\+[a-z_]{3,})*$", description="Tesseract languages."
    )
    demo_data: bool = Field(True, description="Seed demo loan files into an empty archive.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres", "sqlite"):
            raise ValueError("must start with postgresql:// or sqlite:///")
        if parts.scheme.startswith("postgres") and not (parts.hostname and parts.path.strip("/")):
            raise ValueError("a PostgreSQL URL needs a host and a database name")
        return value

    @field_validator("blob_url")
    @classmethod
    def _check_blob_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("s3", "file"):
            raise ValueError("must be s3://BUCKET or file:///PATH")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError("an s3:// URL needs a bucket name")
        return value

    @property
    def blob_backend(self) -> Literal["filesystem", "s3"]:
        return "s3" if self.blob_url and self.blob_url.startswith("s3:") else "filesystem"

    @property
    def blob_root(self) -> Path:
        if self.blob_url and self.blob_url.startswith("file:"):
            return Path(urlsplit(self.blob_url).path)
        return self.data_dir / "originals"

    @property
    def s3_bucket(self) -> str:
        return urlsplit(self.blob_url or "").netloc

    @cached_property
    def backend(self) -> Literal["sqlite", "postgres"]:
        if self.database_url and self.database_url.startswith("postgres"):
            return "postgres"
        return "sqlite"

    @property
    def sqlite_path(self) -> Path:
        if self.database_url and self.database_url.startswith("sqlite"):
            return Path(urlsplit(self.database_url).path.removeprefix("/"))
        return self.data_dir / "events.sqlite3"

    def eventsourcing_env(self) -> dict[str, str]:
        """The environment the eventsourcing library reads to build its recorders."""
        if self.backend == "sqlite":
            path = self.sqlite_path
            # Every loan file is in there: a new directory is the owner's alone (an
            # existing one keeps the mode it was given).
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(path),
                "SQLITE_LOCK_TIMEOUT": "30",
            }
        assert self.database_url is not None
        parts = urlsplit(self.database_url)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.path.strip("/"),
            "POSTGRES_HOST": parts.hostname or "localhost",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
            "POSTGRES_POOL_SIZE": str(self.db_pool_size),
            "POSTGRES_MAX_OVERFLOW": str(self.db_pool_size * 2),
            "POSTGRES_LOCK_TIMEOUT": "10",
            # The library's insert without pipeline mode, which can hang (see its docstring).
            "APPLICATION_RECORDER_TOPIC": "archive.eventlog:PostgresEventsRecorder",
        }


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment, turning validation errors into one line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "ARCHIVE_" + "_".join(str(p) for p in first["loc"]).upper()
        raise SettingsError(f"invalid setting {name}: {first['msg']}") from None
