"""The throwaway PostgreSQL cluster the postgres-backed tests run on."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import pytest
from postgres_cluster import PostgresCluster

from archive.settings import load_settings


def test_postgres_url_is_a_postgresql_15_database(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        (version,) = conn.execute("select version()").fetchone()
        (dbname,) = conn.execute("select current_database()").fetchone()
    assert version.startswith("PostgreSQL 15"), version
    assert dbname == urlsplit(postgres_url).path.strip("/")


def test_postgres_url_is_a_valid_archive_database_url(postgres_url: str) -> None:
    settings = load_settings(database_url=postgres_url)
    assert settings.backend == "postgres"
    env = settings.eventsourcing_env()
    with psycopg.connect(
        host=env["POSTGRES_HOST"],
        port=int(env["POSTGRES_PORT"]),
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        dbname=env["POSTGRES_DBNAME"],
    ) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_databases_are_isolated(postgres_cluster: PostgresCluster) -> None:
    first = postgres_cluster.create_database("isolation_a")
    second = postgres_cluster.create_database("isolation_b")
    try:
        assert first != second
        with psycopg.connect(first) as conn:
            conn.execute("create table marker (x int)")
            conn.execute("insert into marker values (1)")
        with psycopg.connect(second) as conn:
            (exists,) = conn.execute("select to_regclass('marker') is not null").fetchone()
        assert exists is False
    finally:
        postgres_cluster.drop_database("isolation_a")
        postgres_cluster.drop_database("isolation_b")


def test_drop_database_ends_open_connections(postgres_cluster: PostgresCluster) -> None:
    url = postgres_cluster.create_database("dropped_while_open")
    conn = psycopg.connect(url)
    try:
        postgres_cluster.drop_database("dropped_while_open")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)


def test_password_is_required(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    wrong = parts._replace(netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong.geturl(), connect_timeout=5)
