"""A throwaway PostgreSQL 15 cluster for the test suite.

``PostgresCluster().start()`` runs initdb in a fresh temporary directory, starts a
server listening only on 127.0.0.1 (a free port, its unix socket inside that
directory, durability switched off for speed) and ``stop()`` kills it and removes
the directory. ``create_database(name)`` returns a ``postgresql://`` URL with the
superuser's name and password, as ``archive.settings.Settings.database_url``
expects.

If ``ARCHIVE_TEST_POSTGRES_URL`` is set (an admin URL such as
``postgresql://postgres:secret@localhost:5432/postgres``) no cluster is started:
databases are created on that server instead.

initdb and postgres refuse to run as root. As root, both run as the ``postgres``
system user (``runuser``/``setpriv``) and the temporary directory is handed to it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

EXTERNAL_URL_ENV = "ARCHIVE_TEST_POSTGRES_URL"
BINDIR_ENV = "ARCHIVE_TEST_POSTGRES_BINDIR"
DEFAULT_BINDIR = Path("/usr/lib/postgresql/15/bin")
SYSTEM_USER = "postgres"  # the OS account the server runs as when we are root

SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
}


class PostgresClusterError(RuntimeError):
    """The throwaway cluster could not be started or used."""


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    candidates: list[Path] = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    candidates.append(DEFAULT_BINDIR)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout
            candidates.append(Path(out.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresClusterError(
        "PostgreSQL server binaries not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); run `make install` or set "
        + BINDIR_ENV
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _traversable_by_others(path: Path) -> bool:
    """Whether every directory from / down to path lets other users pass (o+x)."""
    return all(part.stat().st_mode & 0o001 for part in [path, *path.parents])


class PostgresCluster:
    """A PostgreSQL server for tests: started here, or an existing one by URL."""

    def __init__(self, external_url: str | None = None) -> None:
        if external_url is None:
            external_url = os.environ.get(EXTERNAL_URL_ENV) or None
        self.external_url = external_url
        self.user = SYSTEM_USER
        self.password = secrets.token_hex(16)
        self.host = "127.0.0.1"
        self.port = 0
        self.base_dir: Path | None = None
        self._created: set[str] = set()
        self._running = False
        self._bindir = DEFAULT_BINDIR
        self._as_root = False
        self._prefix: list[str] = []
        if external_url:
            parts = urlsplit(external_url)
            if not parts.scheme.startswith("postgres") or not parts.hostname:
                raise PostgresClusterError(f"{EXTERNAL_URL_ENV} is not a postgresql:// URL")

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> PostgresCluster:
        if self._running:
            return self
        if self.external_url:
            with self._admin():  # fail early and clearly if the server is unreachable
                pass
            self._running = True
            atexit.register(self.stop)
            return self
        self._bindir = find_bindir()
        self._as_root = os.geteuid() == 0
        self._prefix = self._run_as_prefix() if self._as_root else []
        parent = Path(tempfile.gettempdir())
        if self._as_root and not _traversable_by_others(parent):
            parent = Path("/tmp")
        self.base_dir = Path(tempfile.mkdtemp(prefix="archive-pg-", dir=parent))
        atexit.register(self.stop)
        self._running = True
        try:
            self._initdb()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server at once (no checkpoint) and remove its directory. Idempotent."""
        if not self._running:
            return
        self._running = False
        if self.external_url:
            for name in list(self._created):
                with contextlib.suppress(psycopg.Error):
                    self.drop_database(name)
            return
        assert self.base_dir is not None
        data = self.base_dir / "data"
        if (data / "postmaster.pid").exists():
            result = self._run(
                [str(self._bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w"],
                check=False,
            )
            if result.returncode != 0:
                self._kill_postmaster(data)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its postgresql:// URL."""
        with self._admin() as conn:
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if conn.info.server_version >= 150000:  # faster than WAL_LOG with fsync off
                query += sql.SQL(" STRATEGY FILE_COPY")
            conn.execute(query)
        self._created.add(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connections still open to it."""
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        self._created.discard(name)

    def url(self, dbname: str) -> str:
        if self.external_url:
            parts = urlsplit(self.external_url)
            return urlunsplit((parts.scheme, parts.netloc, "/" + quote(dbname), "", ""))
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname)}"
        )

    @property
    def admin_url(self) -> str:
        return self.external_url or self.url("postgres")

    def _admin(self) -> psycopg.Connection:
        if not self._running and not self.external_url:
            raise PostgresClusterError("the cluster is not running")
        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)

    # -- internals -----------------------------------------------------------

    def _run_as_prefix(self) -> list[str]:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresClusterError(
                f"running as root, but there is no {SYSTEM_USER!r} system user to run "
                "initdb/postgres as (install postgresql-15 with `make install`)"
            ) from None
        if shutil.which("runuser"):
            return ["runuser", "-u", SYSTEM_USER, "--"]
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups"]
        raise PostgresClusterError("running as root, but neither runuser nor setpriv is present")

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        result = subprocess.run(
            [*self._prefix, *args],
            cwd=self.base_dir,
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in pytest must not reach the server
        )
        if check and result.returncode != 0:
            raise PostgresClusterError(
                f"{Path(args[0]).name} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{self._log_tail()}"
            )
        return result

    def _initdb(self) -> None:
        assert self.base_dir is not None
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            entry = pwd.getpwnam(SYSTEM_USER)
            for path in (self.base_dir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                str(self._bindir / "initdb"),
                "-D",
                str(self.base_dir / "data"),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        pwfile.unlink()
        conf = self.base_dir / "data" / "postgresql.conf"
        settings = dict(SERVER_SETTINGS)
        settings["unix_socket_directories"] = f"'{self.base_dir}'"
        with conf.open("a") as fh:
            fh.write("\n# throwaway test cluster (tests/postgres_cluster.py)\n")
            fh.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_server(self) -> None:
        assert self.base_dir is not None
        data = self.base_dir / "data"
        for _attempt in range(5):
            self.port = free_port()
            result = self._run(
                [
                    str(self._bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(data),
                    "-l",
                    str(self.base_dir / "server.log"),
                    "-o",
                    f"-p {self.port}",
                    "-w",
                    "-t",
                    "60",
                ],
                check=False,
            )
            if result.returncode == 0:
                return
            if "already in use" not in self._log_tail():  # lost a race for the port: retry
                break
        raise PostgresClusterError(
            f"pg_ctl start failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 30) -> str:
        log = self.base_dir / "server.log" if self.base_dir else None
        if not log or not log.exists():
            return ""
        return "\n--- server.log ---\n" + "\n".join(log.read_text().splitlines()[-lines:])

    @staticmethod
    def _kill_postmaster(data: Path) -> None:
        """Last resort when pg_ctl could not stop the server we started."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
