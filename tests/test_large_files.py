"""A 1 GiB original goes up and comes back through the real server with flat memory."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from factories import loan_terms, settings_json

from archive.application import ArchiveApp, operator_context
from archive.domain import CommandContext
from archive.settings import Settings

SIZE = 1024**3 + 12345  # a little over 1 GiB, not a multiple of any chunk size
PEAK_RSS_LIMIT = 150 * 1024**2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def write_large_pdf(path: Path) -> str:
    """A file that starts like a PDF, with no repeating block (so nothing dedupes by accident)."""
    digest = hashlib.sha256()
    block = os.urandom(1024 * 1024)
    with path.open("wb") as out:
        written = 0
        header = b"%PDF-1.7\n"
        out.write(header)
        digest.update(header)
        written += len(header)
        counter = 0
        while written < SIZE:
            chunk = (counter.to_bytes(8, "big") + block)[: SIZE - written]
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            counter += 1
    return digest.hexdigest()


@pytest.fixture
def server(doc_settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    archive = ArchiveApp(doc_settings)
    archive.open_loan(CommandContext("officer", "credit_officer"), **loan_terms("CR-1"))
    token = archive.add_user(operator_context(), "archivist.user", "archivist")
    archive.close()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = (
        "import json, sys, uvicorn\n"
        "from api.app import create_app\n"
        "from archive.settings import Settings\n"
        "uvicorn.run(create_app(Settings(**json.loads(sys.argv[1]))), host='127.0.0.1',"
        f" port={port}, log_level='warning')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, settings_json(doc_settings)], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        raise AssertionError("server did not start")
    yield base, token, process.pid
    process.terminate()
    process.wait(timeout=30)


def test_one_gigabyte_up_and_down_with_flat_memory(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, token, pid = server
    path = tmp_path / "escritura-escaneada.pdf"
    expected = write_large_pdf(path)
    headers = {"Authorization": f"Bearer {token}"}
    with path.open("rb") as handle:
        answer = httpx.post(
            f"{base}/api/v1/documents",
            headers=headers,
            data={"loan_number": "CR-1", "doc_type": "mortgage_deed", "sha256": expected},
            files={"file": (path.name, handle, "application/pdf")},
            timeout=600,
        )
    path.unlink()
    assert answer.status_code == 201, answer.text
    document = answer.json()
    assert (document["sha256"], document["size"]) == (expected, SIZE)
    after_upload = peak_rss(pid)

    digest = hashlib.sha256()
    size = 0
    with httpx.stream(
        "GET", f"{base}/api/v1/documents/{document['id']}/original", headers=headers, timeout=600
    ) as download:
        assert download.status_code == 200
        for chunk in download.iter_bytes(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    assert (digest.hexdigest(), size) == (expected, SIZE)
    after_download = peak_rss(pid)
    print(
        f"server peak RSS: {after_upload / 2**20:.0f} MiB after upload, "
        f"{after_download / 2**20:.0f} MiB after download"
    )
    assert after_upload < PEAK_RSS_LIMIT, f"upload peak RSS {after_upload / 2**20:.0f} MiB"
    assert after_download < PEAK_RSS_LIMIT, f"download peak RSS {after_download / 2**20:.0f} MiB"
