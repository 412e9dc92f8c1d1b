"""Upload throughput: originals through the HTTP API into SeaweedFS, against raw minio (issue 3).

For files of 1 MB, 50 MB and 500 MB (fresh random bytes each round, so nothing dedupes):

(a) ``POST /api/v1/documents`` to a real ``uvicorn`` server of the archive, backed by S3
    on a throwaway SeaweedFS (SHA-256, a checksum per request, Object Lock), the client declaring
    no checksum ("api");
(a') the same with the file's SHA-256 declared in ``Content-Digest`` ("api+digest"), as
    ``loan-archive import`` does; the client computes it before the clock starts (it is
    the client's own work, e.g. done while scanning);
(b) raw ``minio.put_object`` of the same file to the same server, same process as the
    client, in the same run ("raw").

Both clients keep their connections open across requests. Rounds rotate the order of the three. Printed: the best round of each side and their
ratio, and the median over rounds of the ratio within a round (sturdier on a shared
machine, where the load changes from one minute to the next). A round of a small
size times several files (20 MB in all), each a fresh file. Also printed: the CPU
time per MB of the server process and of SeaweedFS for each side (steady under load,
where MB/s is not), and the server process's peak RSS (VmHWM), which must stay flat
whatever the file size. One untimed upload per side goes first (first-request costs).
Target: (a)/(b) >= 0.8.

    .venv/bin/python bench/upload.py [--sizes 1,50,500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(ROOT))

import httpx  # noqa: E402
from factories import loan_terms, settings_json  # noqa: E402
from seaweedfs import SeaweedFS  # noqa: E402

from archive.application import ArchiveApp, operator_context  # noqa: E402
from archive.domain import CommandContext  # noqa: E402

MB = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_file(path: Path, size: int) -> None:
    """A PDF-looking file of fresh random bytes (random so no round dedupes another)."""
    with path.open("wb") as out:
        out.write(b"%PDF-1.7\n")
        left = size - 9
        while left > 0:
            chunk = os.urandom(min(left, 4 * 1024 * 1024))
            out.write(chunk)
            left -= len(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,50,500", help="sizes in MB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    server = SeaweedFS().start()
    process = None
    try:
        bucket = server.create_bucket()
        settings = server.settings(work, bucket, retention_days=1, demo_data=False)
        archive = ArchiveApp(settings)
        archive.open_loan(CommandContext("bench", "credit_officer"), **loan_terms("CR-1"))
        token = archive.add_user(operator_context(), "bench.archivist", "archivist")
        archive.close()

        port = free_port()
        code = (
            "import json, sys, uvicorn\n"
            "from api.app import create_app\n"
            "from archive.settings import Settings\n"
            "uvicorn.run(create_app(Settings(**json.loads(sys.argv[1]))),"
            f" host='127.0.0.1', port={port}, log_level='warning')\n"
        )
        env = {**os.environ, "TMPDIR": str(work)}
        process = subprocess.Popen([sys.executable, "-c", code, settings_json(settings)], env=env)
        base = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        raw_client = archive.blobs.client  # type: ignore[attr-defined]
        # One client for the run, as minio keeps its connection pool: a fresh httpx
        # client per request (httpx.post) builds an SSL context each time, ~20 ms.
        http = httpx.Client(timeout=900)
        headers = {"Authorization": f"Bearer {token}"}

        def via_api(path: Path, declare: bool) -> float:
            extra = {}
            if declare:
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    while chunk := handle.read(1024 * 1024):
                        digest.update(chunk)
                value = base64.b64encode(digest.digest()).decode()
                extra = {"Content-Digest": f"sha-256=:{value}:"}
            start = time.perf_counter()
            with path.open("rb") as handle:
                answer = http.post(
                    f"{base}/api/v1/documents",
                    headers={**headers, **extra},
                    data={"loan_number": "CR-1", "doc_type": "contract"},
                    files={"file": (path.name, handle, "application/pdf")},
                    timeout=900,
                )
            elapsed = time.perf_counter() - start
            assert answer.status_code == 201, answer.text
            return elapsed

        def raw(path: Path) -> float:
            start = time.perf_counter()
            with path.open("rb") as handle:
                raw_client.put_object(bucket, f"raw/{path.name}", handle, path.stat().st_size)
            return time.perf_counter() - start

        # One untimed upload per side first: the server's first upload pays one-off costs
        # (the HEAD that shows the server applies retention, first imports, connections)
        # that would otherwise fall on whichever side opens round 1.
        warm = work / "warm-up.pdf"
        make_file(warm, MB)
        via_api(warm, declare=False)
        via_api(warm, declare=True)
        raw(warm)
        warm.unlink()

        sides = ("api", "api+digest", "raw")
        print(f"{'size':>7} {'round':>5} {'side':<10} {'MB/s':>8}")
        results: dict[int, dict[str, float]] = {}
        paired: dict[int, dict[str, list[float]]] = {}
        # CPU per MB of the server process and of SeaweedFS: steadier than MB/s when other
        # work shares the machine, and it shows what each side costs the 2 cores.
        weed = getattr(server, "_process", None)
        cpu: dict[int, dict[str, list[float]]] = {}
        for size in sizes:
            best = dict.fromkeys(sides, 0.0)
            ratios: dict[str, list[float]] = {"api": [], "api+digest": []}
            files = max(1, 20 // size)  # one 1 MB upload is too short to time alone
            cpu[size] = {side: [0.0, 0.0] for side in sides}
            for round_ in range(args.rounds):
                order = sides[round_ % 3 :] + sides[: round_ % 3]
                rates: dict[str, float] = {}
                for side in order:
                    paths = [work / f"f{size}-{round_}-{side}-{n}.pdf" for n in range(files)]
                    seconds = 0.0
                    server_cpu = cpu_seconds(process.pid)
                    weed_cpu = cpu_seconds(weed.pid) if weed is not None else 0.0
                    for path in paths:
                        make_file(path, size * MB)
                        if side == "raw":
                            seconds += raw(path)
                        else:
                            seconds += via_api(path, declare=side == "api+digest")
                        path.unlink()
                    cpu[size][side][0] += cpu_seconds(process.pid) - server_cpu
                    if weed is not None:
                        cpu[size][side][1] += cpu_seconds(weed.pid) - weed_cpu
                    rate = files * size / seconds
                    best[side] = max(best[side], rate)
                    rates[side] = rate
                    print(f"{size:>5}MB {round_ + 1:>5} {side:<10} {rate:>8.1f}")
                for side, found in ratios.items():
                    found.append(rates[side] / rates["raw"])
            results[size] = best
            paired[size] = ratios
        rss = peak_rss_mib(process.pid)

        print()
        print("best round of each side (MB/s), their ratio, and the median of the ratios")
        print("within each round (paired: the three sides ran back to back)")
        print(
            f"{'size':>7} {'API':>7} {'+digest':>8} {'raw':>7}"
            f" {'best':>6} {'+digest':>8} {'median':>7} {'+digest':>8}"
        )
        for size, best in results.items():
            plain, declared = best["api"] / best["raw"], best["api+digest"] / best["raw"]
            middle = {side: statistics.median(found) for side, found in paired[size].items()}
            print(
                f"{size:>5}MB {best['api']:>7.1f} {best['api+digest']:>8.1f} {best['raw']:>7.1f}"
                f" {plain:>6.2f} {declared:>8.2f} {middle['api']:>7.2f}"
                f" {middle['api+digest']:>8.2f}   (target >= 0.8)"
            )
        print()
        print("CPU ms per MB uploaded, archive server / SeaweedFS (raw: the server is idle)")
        print(f"{'size':>7} " + " ".join(f"{side:>15}" for side in sides))
        for size, used in cpu.items():
            megabytes = args.rounds * max(1, 20 // size) * size
            cells = [
                f"{u[0] * 1000 / megabytes:6.1f} / {u[1] * 1000 / megabytes:5.1f}"
                for u in used.values()
            ]
            print(f"{size:>5}MB " + " ".join(f"{c:>15}" for c in cells))
        print(f"server peak RSS over the whole run: {rss:.0f} MiB (largest file {max(sizes)} MB)")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the archive's database and any spool


if __name__ == "__main__":
    main()
