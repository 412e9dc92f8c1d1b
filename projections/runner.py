"""All views of one process, run together: what the API server or a worker starts.

One daemon thread per view follows the log; ``wait_for`` lets a request read its own
write; ``status`` and ``rebuild`` are what the operator endpoints and CLI call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from archive.settings import Settings
from projections.audit_trail import AuditTrailView
from projections.follower import (
    EventSource,
    Follower,
    Reopen,
    ViewStatus,
    rebuild_views,
    wait_for,
)
from projections.loan_files import LoanFilesView
from projections.search import SearchView
from projections.store import Store, open_store
from projections.view import View

log = logging.getLogger("projections")


def default_views() -> list[View]:
    return [LoanFilesView(), AuditTrailView(), SearchView()]


class Projections:
    def __init__(
        self,
        source: EventSource,
        store: Store,
        views: Sequence[View] | None = None,
        *,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        owns_store: bool = False,
        reopen: Reopen | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.views = {v.name: v for v in (views if views is not None else default_views())}
        self.followers = {
            name: Follower(view, source, store, batch_size=batch_size)
            for name, view in self.views.items()
        }
        self.poll_interval = poll_interval
        self.owns_store = owns_store
        #: how a rebuild's child processes open the same log and views (None: no children)
        self.reopen = reopen
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def open(cls, settings: Settings, source: EventSource, **kwargs: Any) -> Projections:
        """The views database of these settings, with the default views. A rebuild may
        load them in child processes, which open the log as ``type(source)(settings,
        create_tables=False)`` (an ``ArchiveApp``: this process made the tables) and the
        views as this does."""
        reopen = Reopen(
            partial(type(source), settings, create_tables=False), partial(open_store, settings)
        )
        return cls(source, open_store(settings), owns_store=True, reopen=reopen, **kwargs)

    def _rebuild_stale(self, stale: Sequence[str], done: threading.Event) -> None:
        try:
            log.info("views %s are stale: rebuilding", ", ".join(stale))
            self.rebuild_views(stale)
        except Exception:
            log.exception("rebuild of %s failed; following the old ones", ", ".join(stale))
        finally:
            done.set()

    def _run(self, follower: Follower, rebuilt: threading.Event | None) -> None:
        """Follow one view; a stale view first waits for its rebuild (it would only
        follow the old generation meanwhile, and the switch catches the new one up)."""
        while rebuilt is not None and not rebuilt.wait(0.1):
            if self._stop.is_set():
                return
        follower.run_forever(self._stop, self.poll_interval)

    def start(self, *, rebuild_stale: bool = True) -> None:
        """Follow the log in the background, one thread per view. Stale views are first
        rebuilt together by one more thread (see ``rebuild_views``)."""
        if self._threads:
            return
        self._stop.clear()
        stale = [n for n, f in self.followers.items() if rebuild_stale and f.status().stale]
        rebuilt = threading.Event()
        if stale:
            self._spawn("projection-rebuild", self._rebuild_stale, stale, rebuilt)
        for name, follower in self.followers.items():
            self._spawn(
                f"projection-{name}", self._run, follower, rebuilt if name in stale else None
            )

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def fresh(self, head: int, timeout: float, views: Sequence[str] | None = None) -> bool:
        """Make the views (or the named ones) reflect the log up to ``head`` (a
        read-your-writes barrier): wait for the background followers, or, when none
        run, catch up in this thread."""
        if self.running:
            return self.wait_for(head, timeout, views)
        for name in views if views is not None else self.views:
            self.followers[name].catch_up()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def close(self) -> None:
        self.stop()
        if self.owns_store:
            self.store.close()

    def __enter__(self) -> Projections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def catch_up(self) -> dict[str, int]:
        """Apply everything up to the head now, in this thread (CLI, tests)."""
        return {name: f.catch_up() for name, f in self.followers.items()}

    def status(self) -> list[ViewStatus]:
        return [f.status() for f in self.followers.values()]

    def failing(self) -> list[str]:
        """The views whose follower in this process failed its last batch (it retries)."""
        return [name for name, f in self.followers.items() if f.last_error is not None]

    def wait_for(self, position: int, timeout: float, views: Sequence[str] | None = None) -> bool:
        """Wait until every view (or the named ones) has applied ``position``."""
        deadline = time.monotonic() + timeout
        for name in views if views is not None else self.views:
            if name not in self.views:
                raise KeyError(f"no view named {name}")
            if not wait_for(self.store, name, position, max(deadline - time.monotonic(), 0)):
                return False
        return True

    def rebuild(self, name: str, **kwargs: Any) -> int:
        """Replay the log into a new generation of one view and switch to it."""
        return self.rebuild_views([name], **kwargs)[name]

    def rebuild_views(self, names: Sequence[str] | None = None, **kwargs: Any) -> dict[str, int]:
        """Replay the log into a new generation of the named views (default: all), in
        this process or, for a long log, in one process per core (``Reopen``), and switch
        each to it. Returns the new generations by view. Keyword
        arguments go to ``follower.rebuild_views`` (batch_size, progress, before_switch,
        processes, join)."""
        for name in names or ():
            if name not in self.views:
                raise KeyError(f"no view named {name}")
        views = [self.views[n] for n in names] if names else list(self.views.values())
        return rebuild_views(views, self.source, self.store, reopen=self.reopen, **kwargs)
