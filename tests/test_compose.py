"""docker-compose.yml and the Dockerfile agree with the code and hold no secrets.

No Docker engine is needed: the file is parsed and checked statically.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from archive.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

PREFIX = "ARCHIVE_"
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY")
# ${VAR} or ${VAR:?message} / ${VAR?message}: a required variable, no literal default.
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*)?\}")
INTERPOLATED_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^:/@\s]*:(?P<password>.+?)@[^@]*$", re.I)


def setting_env_names() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields}


def environment_of(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment, whether written as a mapping or as KEY=VALUE list."""
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): None if v is None else str(v) for k, v in env.items()}
    pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: v for k, v in pairs}


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def compose_problems(compose: dict[str, Any], settings: set[str]) -> list[str]:
    """Everything wrong with a parsed compose file; [] when it is fine.

    settings: the ARCHIVE_* names the application reads.
    """
    problems: list[str] = []
    services = compose.get("services") or {}
    if not services:
        problems.append("no services")
    for name, service in services.items():
        env = environment_of(service)
        for key, value in env.items():
            if key.startswith(PREFIX) and key not in settings:
                problems.append(f"{name}: {key} is not a setting of archive.settings.Settings")
            is_secret = any(word in key.upper() for word in SECRET_WORDS)
            if is_secret and not (value and REQUIRED_VARIABLE.fullmatch(value.strip())):
                problems.append(f"{name}: {key} must be a required ${{VARIABLE}}, not a literal")
        for text in strings_in(service):
            for var in INTERPOLATED_NAME.findall(text):
                if var.startswith(PREFIX) and var not in settings:
                    problems.append(f"{name}: ${{{var}}} is not a setting")
            match = URL_PASSWORD.search(text)
            if match and not REQUIRED_VARIABLE.fullmatch(match["password"]):
                problems.append(f"{name}: literal password in URL {text!r}")
        healthcheck = service.get("healthcheck") or {}
        test = healthcheck.get("test")
        if healthcheck.get("disable") or not test or test == ["NONE"]:
            problems.append(f"{name}: no healthcheck")
    return problems


def dockerfile_env_names(text: str) -> set[str]:
    names: set[str] = set()
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip().upper().startswith("ENV "):
            names.update(re.findall(r"\b([A-Z_][A-Z0-9_]*)=", line))
    return names


# -- the real files ----------------------------------------------------------


def test_compose_file_has_no_problems() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert compose_problems(compose, setting_env_names()) == []


def test_compose_file_has_the_expected_services() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert {"postgres", "s3", "storage-init", "api", "ocr-worker"} <= set(services)
    api = services["api"]
    assert api["environment"]["ARCHIVE_DATABASE_URL"].startswith("postgresql://archive:${")
    assert api["environment"]["ARCHIVE_BLOB_URL"].startswith("s3://")
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The bucket must exist, with Object Lock, before anything stores an original.
    assert services["storage-init"]["command"] == "loan-archive init-storage"
    assert services["storage-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
    assert api["depends_on"]["storage-init"]["condition"] == "service_completed_successfully"
    assert services["ocr-worker"]["deploy"]["replicas"] >= 2
    # A production stack must not seed demo users (an admin with a token in a file)
    # unless asked to.
    assert api["environment"]["ARCHIVE_DEMO_DATA"] == "${ARCHIVE_DEMO_DATA:-false}"


def test_dockerfile_sets_only_real_settings() -> None:
    names = dockerfile_env_names(DOCKERFILE.read_text())
    archive_names = {n for n in names if n.startswith(PREFIX)}
    assert archive_names, "expected the Dockerfile to set ARCHIVE_DATA_DIR"
    assert archive_names <= setting_env_names()


# -- the checker itself --------------------------------------------------------

GOOD_SERVICE: dict[str, Any] = {
    "environment": {
        "ARCHIVE_DATABASE_URL": "postgresql://archive:${POSTGRES_PASSWORD:?set it}@db:5432/a",
        "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD}",
    },
    "healthcheck": {"test": ["CMD", "true"]},
}


def with_service(**changes: Any) -> dict[str, Any]:
    service = {**GOOD_SERVICE, **changes}
    return {"services": {"svc": service}}


def test_setting_names_come_from_the_settings_model() -> None:
    names = setting_env_names()
    assert {"ARCHIVE_DATABASE_URL", "ARCHIVE_DATA_DIR", "ARCHIVE_LOG_LEVEL"} <= names
    assert "ARCHIVE_DATABASE" not in names


def test_checker_accepts_a_good_service() -> None:
    assert compose_problems(with_service(), setting_env_names()) == []


@pytest.mark.parametrize(
    "environment",
    [
        {"ARCHIVE_NO_SUCH_SETTING": "1"},
        ["ARCHIVE_NO_SUCH_SETTING=1"],
        ["ARCHIVE_NO_SUCH_SETTING"],
        {"LOG": "${ARCHIVE_NO_SUCH_SETTING:-x}"},
    ],
)
def test_checker_rejects_an_unknown_archive_variable(environment: Any) -> None:
    problems = compose_problems(with_service(environment=environment), setting_env_names())
    assert len(problems) == 1
    assert "ARCHIVE_NO_SUCH_SETTING" in problems[0]


@pytest.mark.parametrize(
    "healthcheck",
    [None, {}, {"test": ["NONE"]}, {"test": ["CMD", "true"], "disable": True}],
)
def test_checker_rejects_a_service_without_healthcheck(healthcheck: Any) -> None:
    service = dict(GOOD_SERVICE)
    if healthcheck is None:
        del service["healthcheck"]
    else:
        service["healthcheck"] = healthcheck
    problems = compose_problems({"services": {"svc": service}}, setting_env_names())
    assert problems == ["svc: no healthcheck"]


@pytest.mark.parametrize(
    "environment",
    [
        {"POSTGRES_PASSWORD": "hunter2"},
        {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-hunter2}"},
        {"POSTGRES_PASSWORD": ""},
        {"AWS_SECRET_ACCESS_KEY": "abc"},
        ["POSTGRES_PASSWORD=hunter2"],
        {"ARCHIVE_DATABASE_URL": "postgresql://archive:hunter2@db:5432/a"},
        {"ARCHIVE_DATABASE_URL": "postgresql://archive:${PW:-hunter2}@db:5432/a"},
    ],
)
def test_checker_rejects_a_literal_password(environment: Any) -> None:
    problems = compose_problems(with_service(environment=environment), setting_env_names())
    assert len(problems) == 1
    assert "literal" in problems[0]


def test_dockerfile_env_names_are_parsed() -> None:
    text = "FROM x\nENV ARCHIVE_DATA_DIR=/data \\\n    OTHER=1\nENV PATH=/bin\nRUN X=1 true\n"
    assert dockerfile_env_names(text) == {"ARCHIVE_DATA_DIR", "OTHER", "PATH"}
