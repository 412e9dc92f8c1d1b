"""A small process pool for page tasks: one task per worker at a time, a deadline per task.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot stop one running task (a
page stuck in PDFium past its time limit would hold its worker until it finishes), and
one crashed worker breaks the whole executor, failing every page in flight. Why not
``multiprocessing`` at all: its spawn and forkserver workers re-import the caller's
``__main__`` (for the OCR worker service, the whole CLI) every time one starts, and fork is
unsafe in a threaded caller. So each worker here is a plain ``python -c`` child process
(``ocr.worker.serve``) speaking length-prefixed pickles over its stdin and stdout:

- a task past its deadline gets its worker killed with its whole process group (so the
  Tesseract child goes too) and the worker replaced; a worker that dies takes only its
  own page with it;
- workers start lazily, up to ``max_workers`` (default: the cores this process may use),
  so a document whose pages all have a text layer starts none;
- tasks are pulled from the iterator only when a worker is free: at most ``max_workers``
  pages are in flight however long the document is, which keeps memory flat;
- idle workers are kept (up to the number of cores) for the next call, so a stream of
  one-page documents pays the interpreter start-up (about 0.1 s) once, not per document;
- ``OMP_THREAD_LIMIT=1`` in the workers' environment keeps Tesseract on one core each.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

WORKER_ENV = {"OMP_THREAD_LIMIT": "1"}
_HEADER = struct.Struct(">Q")
_SERVE = "from ocr.pool import serve; serve()"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class Lost:
    """A task that produced no result: it ran past its deadline or its worker died."""

    code: str  # "timeout" or "crashed"
    detail: str


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        env.update(WORKER_ENV)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
            start_new_session=True,  # its own process group, Tesseract included
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin = self.process.stdin
        self.stdout = self.process.stdout
        self.owner = os.getpid()
        self.task: Any = None
        self.deadline = 0.0

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None

    def send(self, fn: Callable[[Any], Any], task: Any, deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        body = pickle.dumps((fn, task), protocol=pickle.HIGHEST_PROTOCOL)
        _write_all(self.stdin, _HEADER.pack(len(body)) + body)

    def receive(self) -> Any:
        """The result of the task in flight; EOFError if the worker died."""
        (size,) = _HEADER.unpack(_read_exactly(self.stdout, _HEADER.size))
        return pickle.loads(_read_exactly(self.stdout, size))

    def kill(self) -> None:
        if self.owner != os.getpid():
            return
        with contextlib.suppress(OSError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait()
        self._close()

    def stop(self) -> None:
        if self.owner != os.getpid():
            return
        try:
            self.stdin.close()  # EOF: the worker exits
            self.process.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        self._close()

    def _close(self) -> None:
        for stream in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                stream.close()


def _write_all(stream: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[stream.write(view) :]


def _read_exactly(stream: Any, size: int) -> bytes:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError("worker closed its pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


_idle: list[_Worker] = []
_idle_lock = threading.Lock()


def _take_idle() -> _Worker | None:
    with _idle_lock:
        while _idle:
            worker = _idle.pop()
            if worker.alive():
                return worker
            worker.kill()
    return None


def _give_back(workers: list[_Worker]) -> None:
    with _idle_lock:
        for worker in workers:
            if worker.alive() and len(_idle) < available_cores():
                _idle.append(worker)
            else:
                worker.stop()


@atexit.register
def shutdown() -> None:
    """Stop the idle workers (also run at exit)."""
    with _idle_lock:
        workers, _idle[:] = list(_idle), []
    for worker in workers:
        worker.stop()


def run(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    *,
    max_workers: int | None = None,
    task_timeout: float,
    release: Callable[[Any], Any] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(task, fn(task) or Lost)`` as tasks finish, in completion order.

    ``fn`` runs in a worker process and must be importable there (it is pickled by
    reference) and should catch its own exceptions; one that escapes is yielded as the
    outcome. ``release(None)``, if given, runs in each worker before it is kept idle for
    the next call (to drop what it cached for these tasks). Closing the generator early
    kills the workers still busy.
    """
    limit = max(1, max_workers or available_cores())
    source = iter(tasks)
    idle: list[_Worker] = []
    busy: dict[int, _Worker] = {}  # stdout fd -> worker
    exhausted = False
    try:
        while True:
            while not exhausted and (idle or len(busy) < limit):
                task = next(source, _END)
                if task is _END:
                    exhausted = True
                    break
                worker = idle.pop() if idle else (_take_idle() or _Worker())
                try:
                    worker.send(fn, task, time.monotonic() + task_timeout)
                except OSError:  # it died while idle: replace it, once
                    worker.kill()
                    worker = _Worker()
                    worker.send(fn, task, time.monotonic() + task_timeout)
                busy[worker.stdout.fileno()] = worker
            if not busy:
                return
            timeout = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
            for fd in wait(list(busy), timeout=timeout):
                worker = busy.pop(fd)  # type: ignore[call-overload]
                try:
                    outcome = worker.receive()
                except (EOFError, OSError, pickle.UnpicklingError):
                    code = worker.process.poll()
                    if code is None:
                        try:
                            code = worker.process.wait(2)
                        except subprocess.TimeoutExpired:
                            code = None
                    worker.kill()
                    yield worker.task, Lost("crashed", f"the worker process died ({_exit(code)})")
                    continue
                idle.append(worker)
                yield worker.task, outcome
            now = time.monotonic()
            for fd, worker in list(busy.items()):
                if worker.deadline <= now:
                    del busy[fd]
                    worker.kill()
                    yield worker.task, Lost("timeout", f"no result after {task_timeout:.0f} s")
    finally:
        for worker in busy.values():
            worker.kill()
        if release is not None:
            idle = [w for w in idle if _released(w, release)]
        _give_back(idle)


def _released(worker: _Worker, release: Callable[[Any], Any]) -> bool:
    try:
        worker.send(release, None, time.monotonic() + 10)
        if wait([worker.stdout], timeout=10):
            worker.receive()
            return True
    except (EOFError, OSError, pickle.UnpicklingError):
        pass
    worker.kill()
    return False


_END = object()


def _exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def serve() -> None:
    """The worker's loop (``python -c "from ocr.pool import serve; serve()"``)."""
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    while True:
        try:
            (size,) = _HEADER.unpack(_read_exactly(requests, _HEADER.size))
            request = _read_exactly(requests, size)
        except EOFError:
            return
        try:
            fn, task = pickle.loads(request)
            result = fn(task)
        except BaseException as exc:  # fn should not raise; report rather than die
            result = RuntimeError(f"{type(exc).__name__}: {exc}")
        try:
            body = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            body = pickle.dumps(RuntimeError(f"unpicklable result: {exc}"))
        try:
            _write_all(replies, _HEADER.pack(len(body)) + body)
        except OSError:
            return
