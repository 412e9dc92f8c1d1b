"""The views database: where read models live, never in the event tables.

SQLite keeps the views in their own file (``<data_dir>/views.sqlite3``) so that a
rebuild or a vacuum never touches the event log; PostgreSQL keeps them in the schema
``views`` of the same database. One small adapter per backend offers the same
interface, so views write their SQL once:

- statements use ``?`` placeholders (translated to ``%s`` for psycopg);
- ``transaction()`` is the write transaction: view rows and tracking commit together;
- ``read()`` is a consistent read-only snapshot (registry lookup and rows agree);
- rows come back as plain ``dict``; JSON columns are TEXT on both backends;
- ``insert_rows``/``upsert_rows`` write a batch's rows at once (values: text,
  integers, NULL).
"""

from __future__ import annotations

import json
import operator
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from archive.settings import Settings

Row = dict[str, Any]
Params = Sequence[Any]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def identifier(name: str) -> str:
    """Table names are built from view names and generations; refuse anything else."""
    if not _NAME.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


class Tx:
    """One open transaction: the only handle view code gets to the database."""

    backend: Literal["sqlite", "postgres"]
    #: appended to a SELECT that must lock the rows it reads (nothing on SQLite, whose
    #: write transactions are already exclusive)
    for_update: str

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement; return its rows (empty for statements without rows)."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        raise NotImplementedError

    def lock(self, key: str) -> None:
        """Serialise schema changes (create/drop generations) between processes."""
        raise NotImplementedError

    def insert_rows(self, table: str, rows: Sequence[Row]) -> None:
        """Insert many rows (dicts with the same keys) at once: a batch's bulk write."""
        if rows:
            columns = list(rows[0])
            if len(columns) == 1:
                self.insert_values(table, columns, [(r[columns[0]],) for r in rows])
            else:
                values = operator.itemgetter(*columns)  # a tuple of the row's values
                self.insert_values(table, columns, [values(r) for r in rows])

    def insert_values(self, table: str, columns: Sequence[str], rows: Sequence[Params]) -> None:
        """``insert_rows`` for rows given as values in the order of ``columns``: no dict
        to build per row."""
        raise NotImplementedError

    def upsert_rows(self, table: str, key: str, rows: Sequence[Row]) -> None:
        """Insert many rows; a row whose ``key`` exists overwrites the other columns."""
        if rows:
            assignments = ", ".join(f"{c} = excluded.{c}" for c in rows[0] if c != key)
            self._write_rows(table, rows, f" ON CONFLICT ({key}) DO UPDATE SET {assignments}")

    def _write_rows(self, table: str, rows: Sequence[Row], conflict: str) -> None:
        raise NotImplementedError

    def one(self, sql: str, params: Params = ()) -> Row | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None


class WriteBuffer(Tx):
    """A batch's writes, held until ``replay`` runs them in a real transaction.

    A rebuild works out a batch's rows (the Python, most of its time) before it opens
    the write transaction, so that on SQLite, which has one writer at a time, another
    rebuild process or a live follower writes meanwhile. Reads run at once, each in a
    read snapshot of its own; writes are recorded in order. That is only right where a
    batch never reads back what it wrote: views read what they need first and write at
    the end (``View.apply_batch``), and a rebuild's generation has no other writer. A
    statement is a read when it starts with SELECT.
    """

    for_update = ""  # a read here never runs inside the write transaction

    def __init__(self, store: Store) -> None:
        self.store = store
        self.backend = store.backend
        #: (method of ``Tx``, its arguments), in the order they were asked for
        self.writes: list[tuple[str, tuple[Any, ...]]] = []

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        if sql.lstrip()[:6].upper() == "SELECT":
            with self.store.read() as tx:
                return tx.execute(sql, params)
        self.writes.append(("execute", (sql, params)))
        return []

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        self.writes.append(("executemany", (sql, rows)))

    def lock(self, key: str) -> None:
        self.writes.append(("lock", (key,)))

    def insert_values(self, table: str, columns: Sequence[str], rows: Sequence[Params]) -> None:
        if rows:
            self.writes.append(("insert_values", (table, columns, rows)))

    def upsert_rows(self, table: str, key: str, rows: Sequence[Row]) -> None:
        if rows:
            self.writes.append(("upsert_rows", (table, key, rows)))

    def replay(self, tx: Tx) -> None:
        """Run the recorded writes, in order, in ``tx``."""
        for method, args in self.writes:
            getattr(tx, method)(*args)
        self.writes.clear()

    def split(self) -> list[WriteBuffer]:
        """One buffer per recorded write, in order: to run each in a transaction of its
        own (e.g. one index at a time, so that another writer may go in between)."""
        parts = []
        for write in self.writes:
            part = WriteBuffer(self.store)
            part.writes.append(write)
            parts.append(part)
        return parts


class Store:
    """A views database. Thread-safe: each thread gets its own connection."""

    backend: Literal["sqlite", "postgres"]

    def transaction(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def read(self) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def listener(
        self, channel: str | None
    ) -> AbstractContextManager[Callable[[float], bool] | None]:
        """A ``wait(timeout) -> notified`` that returns True as soon as new events may
        have arrived, or None where the backend cannot tell (the follower then polls)."""
        raise NotImplementedError

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Settings for a bulk load by this thread (a rebuild); nothing by default."""
        yield

    def checkpoint(self) -> None:
        """During a bulk load, after a write transaction: let the database catch up
        with its log, if it keeps one apart (SQLite's WAL); nothing by default."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- SQLite ------------------------------------------------------------------------------


class _SQLiteTx(Tx):
    backend = "sqlite"
    for_update = ""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        cursor = self.conn.execute(sql, tuple(params))
        if cursor.description is None:
            return []
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        self.conn.executemany(sql, [tuple(r) for r in rows])

    def lock(self, key: str) -> None:
        """BEGIN IMMEDIATE already excludes every other writer."""

    def insert_values(self, table: str, columns: Sequence[str], rows: Sequence[Params]) -> None:
        if rows:
            marks = ", ".join("?" for _ in columns)
            self.conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
            )

    def _write_rows(self, table: str, rows: Sequence[Row], conflict: str) -> None:
        # No round trips to save in process: one prepared statement, stepped per row.
        columns = list(rows[0])
        marks = ", ".join("?" for _ in columns)
        values = operator.itemgetter(*columns)  # a tuple of the row's values (>= 2 columns)
        self.conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}){conflict}",
            map(values, rows),
        )


def _use_wal(conn: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Switch the file to WAL once (the mode is persistent), retrying while locked.

    Converting a new file needs an exclusive lock, and SQLite refuses a second
    connection converting at the same time with an immediate "database is locked"
    (its busy handler is skipped to avoid a deadlock). Threads or processes opening a
    new views file together hit that; checking first and retrying makes it harmless.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


#: the page size of a new views file. Views rows are large (an audit row holds its
#: event's fields; a loan row its lists): 200,000 audit rows inserted 15 % faster,
#: checkpointed 40 % faster and indexed 25 % faster than with SQLite's default 4 KiB.
PAGE_SIZE = 16_384
#: write transactions of a bulk load between two checkpoints (a rebuild's batches of
#: 25,000 events write about 25-50 MB each)
BULK_CHECKPOINT_EVERY = 5
#: SQLite's page cache during a bulk load, negative as in ``PRAGMA cache_size``: 64 MiB
BULK_CACHE_KIB = -65_536


class SQLiteStore(Store):
    """Views in their own SQLite file, in WAL mode so readers never wait for the follower."""

    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the log's
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are opened explicitly below. The connection
            # is used by this thread only; check_same_thread is off so close() may run
            # from any thread.
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a new file only; before WAL
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            # Debian's SQLite zero-fills every freed page (SECURE_DELETE): dropping a
            # retired generation wrote it all again. FAST zeroes only within pages that
            # are written anyway; views hold nothing the event log does not.
            conn.execute("PRAGMA secure_delete=FAST")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._guard:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _begin(self, mode: str) -> Iterator[Tx]:
        conn = self._conn()
        conn.execute(f"BEGIN {mode}")
        try:
            yield _SQLiteTx(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT leaves the transaction open
                conn.execute("ROLLBACK")
            raise

    def transaction(self) -> AbstractContextManager[Tx]:
        return self._begin("IMMEDIATE")

    def read(self) -> AbstractContextManager[Tx]:
        return self._begin("DEFERRED")

    @contextmanager
    def listener(self, channel: str | None) -> Iterator[Callable[[float], bool] | None]:
        yield None  # SQLite has no notifications: the follower polls

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """No automatic checkpoints on this thread's connection while it loads: the
        loader calls ``checkpoint`` after its transactions instead. An automatic one
        runs inside COMMIT, so it kept the rebuild's other process, which waits for the
        write lock, waiting for the copy too; and a page cache of ``BULK_CACHE_KIB``
        instead of 2 MB: loan rows are updated in the order of their random ids, all
        over the table (loan_files and search, 200,000 events: 15 % less CPU; the audit
        trail, written in order, gains nothing)."""
        conn = self._conn()
        conn.execute("PRAGMA wal_autocheckpoint=0")
        cache = conn.execute("PRAGMA cache_size").fetchone()[0]
        conn.execute(f"PRAGMA cache_size={BULK_CACHE_KIB}")
        self._local.bulk_commits = 0
        try:
            yield
        finally:
            conn.execute("PRAGMA wal_autocheckpoint=1000")
            conn.execute(f"PRAGMA cache_size={cache}")
            self._local.bulk_commits = None

    def checkpoint(self) -> None:
        """A passive checkpoint every ``BULK_CHECKPOINT_EVERY`` calls: it copies what
        the WAL holds into the database without blocking writers, so another process
        writes meanwhile. (Fewer, larger checkpoints than SQLite's every 1,000 pages: a
        rebuild of all views ran 15-25 % faster in one process.)"""
        done = getattr(self._local, "bulk_commits", None)
        if done is None:
            return
        self._local.bulk_commits = done + 1
        if self._local.bulk_commits % BULK_CHECKPOINT_EVERY == 0:
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        with self._guard:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()


# -- PostgreSQL ----------------------------------------------------------------------------


def _pg(sql: str) -> str:
    """Translate ``?`` placeholders to psycopg's ``%s`` (our SQL has no literal % or ?)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgresTx(Tx):
    backend = "postgres"
    for_update = " FOR UPDATE"

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Params = ()) -> list[Row]:
        cursor = self.conn.execute(_pg(sql), tuple(params))
        if cursor.description is None:
            return []
        return cursor.fetchall()

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(_pg(sql), [tuple(r) for r in rows])

    def lock(self, key: str) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"views:{key}",))

    def insert_values(self, table: str, columns: Sequence[str], rows: Sequence[Params]) -> None:
        """COPY: about 3 times faster than the JSON statement below for plain inserts."""
        if not rows:
            return
        with (
            self.conn.cursor() as cursor,
            cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)

    def _write_rows(self, table: str, rows: Sequence[Row], conflict: str) -> None:
        """One statement and one round trip for all the rows: they travel as one JSON
        array, which ``json_populate_recordset`` turns into rows of the table's types
        (statement by statement, even pipelined, costs a server round per row)."""
        columns = ", ".join(rows[0])
        self.conn.execute(
            f"INSERT INTO {table} ({columns}) SELECT {columns}"
            f" FROM json_populate_recordset(NULL::{table}, %s){conflict}",
            (json.dumps(rows, separators=(",", ":")),),
        )


class PostgresStore(Store):
    """Views in the schema ``views`` of the archive's own PostgreSQL database."""

    backend = "postgres"

    def __init__(self, url: str, schema: str = "views", pool_size: int = 5) -> None:
        self.url = url
        self.schema = identifier(schema)
        # Two processes starting together would race on CREATE SCHEMA IF NOT EXISTS.
        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('views:schema'))")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        self.pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={
                "row_factory": dict_row,
                "autocommit": True,
                "options": f"-c search_path={self.schema}",
            },
            open=True,
            name="views",
        )

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.pool.connection() as conn, conn.transaction():
            yield _PostgresTx(conn)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A REPEATABLE READ, READ ONLY transaction, declared in its BEGIN: one round trip
        fewer than BEGIN then SET TRANSACTION. The pool's connections are shared with
        writes, so the characteristics go back to the server defaults afterwards."""
        with self.pool.connection() as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            try:
                with conn.transaction():
                    yield _PostgresTx(conn)
            finally:
                if not conn.closed:  # a broken connection is discarded by the pool
                    conn.isolation_level = None
                    conn.read_only = None

    @contextmanager
    def listener(self, channel: str | None) -> Iterator[Callable[[float], bool] | None]:
        """LISTEN on the recorder's channel: the event store NOTIFYs on every insert."""
        if channel is None:
            yield None
            return
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'LISTEN "{channel}"')

            def wait(timeout: float) -> bool:
                return any(True for _ in conn.notifies(timeout=timeout, stop_after=1))

            yield wait

    def close(self) -> None:
        self.pool.close()


def views_path(settings: Settings) -> Path:
    return settings.data_dir / "views.sqlite3"


def open_store(settings: Settings) -> Store:
    """The views database for these settings: beside the events, never inside them."""
    if settings.backend == "postgres":
        assert settings.database_url is not None
        return PostgresStore(settings.database_url, pool_size=settings.db_pool_size)
    return SQLiteStore(views_path(settings))
