"""Following the event log: one mechanism for every view, on both backends.

A follower reads notifications after its generation's tracking position, in batches
(``archive.eventlog.select_notes``: ``select_notifications`` read as plain tuples),
applies them to the view and moves the position forward, all in one transaction of
the views database. A crash anywhere in a batch rolls back rows and position
together, so every event is applied exactly once and a restarted follower resumes
where the last commit left it. SQLite is polled; PostgreSQL is polled too, woken
early by the NOTIFY the event store sends on every insert.

``rebuild_views`` replays the whole log into a new generation of each view while
readers keep reading the active ones, then switches each in one transaction (see
``projections.registry``). A large log is loaded by one process per core, each reading
the log once for its share of the views.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, Mapper
from eventsourcing.sqlite import SQLiteApplicationRecorder

from archive.eventlog import select_notes
from projections import registry
from projections.encoding import event_type
from projections.store import Store, Tx, WriteBuffer
from projections.view import Cache, Decoded, Events, View

log = logging.getLogger("projections")


class EventSource(Protocol):
    """What a follower needs of the archive: ``ArchiveApp`` fits."""

    recorder: ApplicationRecorder
    mapper: Mapper[UUID]


@dataclass(frozen=True)
class Rebuilding:
    generation: int
    position: int


@dataclass(frozen=True)
class ViewStatus:
    view: str
    generation: int
    position: int
    head: int
    lag: int
    #: the view schema version the active generation was built with
    schema_version: int
    #: True when the code's view is newer than the active generation: rebuild it
    stale: bool
    #: a generation being built, if any
    rebuilding: Rebuilding | None
    updated_at: str
    #: why this process's follower of the view keeps failing (it retries; None when well)
    error: str | None = None
    #: when that run of failures began (UTC, ISO 8601)
    failing_since: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "generation": self.generation,
            "position": self.position,
            "head": self.head,
            "lag": self.lag,
            "schema_version": self.schema_version,
            "stale": self.stale,
            "rebuilding": None
            if self.rebuilding is None
            else {"generation": self.rebuilding.generation, "position": self.rebuilding.position},
            "updated_at": self.updated_at,
            "error": self.error,
            "failing_since": self.failing_since,
        }


def head_position(recorder: ApplicationRecorder) -> int:
    return recorder.max_notification_id() or 0


def status(store: Store, recorder: ApplicationRecorder, view: View) -> ViewStatus:
    """Where the view's active generation has read to, against the head of the log."""
    head = head_position(recorder)  # read first: the lag is never negative
    with store.read() as tx:
        gens = registry.generations(tx, view.name)
        current = registry.active(tx, view.name)
    if current is None:
        return ViewStatus(view.name, 0, 0, head, head, 0, True, None, "")
    building = [g for g in gens if g.state == registry.BUILDING]
    return ViewStatus(
        view=view.name,
        generation=current.generation,
        position=current.position,
        head=head,
        lag=max(head - current.position, 0),
        schema_version=current.schema_version,
        stale=current.schema_version != view.schema_version,
        rebuilding=Rebuilding(building[-1].generation, building[-1].position) if building else None,
        updated_at=current.updated_at,
    )


def position(store: Store, view_name: str) -> int:
    """The active generation's position (0 if the view was never registered)."""
    with store.read() as tx:
        current = registry.active(tx, view_name)
    return 0 if current is None else current.position


def wait_for(store: Store, view_name: str, target: int, timeout: float) -> bool:
    """Wait until the view has applied the event at ``target`` (read your own write).

    Polls the views database, so it works whichever process runs the follower.
    Returns False on timeout.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        if position(store, view_name) >= target:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.1)


Needs = Callable[[str], bool]


def needs_of(views: Sequence[View]) -> Needs:
    """Whether any of the views needs events of a topic decoded (``View.needs``),
    worked out once per topic."""
    known: dict[str, bool] = {}

    def needs(topic: str) -> bool:
        found = known.get(topic)
        if found is None:
            found = known[topic] = any(view.needs(event_type(topic)) for view in views)
        return found

    return needs


def decode(
    source: EventSource,
    start: int,
    limit: int,
    stop: int | None = None,
    needs: Needs | None = None,
) -> Events:
    """The next batch of the log after ``start``, decoded: (position, event) pairs. With
    ``needs``, an event whose topic it refuses is not decoded: it comes as None."""
    notes = select_notes(source.recorder, start, limit, stop)
    decode = source.mapper.to_domain_event
    if needs is None:
        return Decoded([(note.id, decode(note)) for note in notes], notes)
    return Decoded([(n.id, decode(n) if needs(n.topic) else None) for n in notes], notes)


def apply_batch(tx: Tx, view: View, generation: int, events: Events, cache: Cache) -> None:
    """Apply decoded events to a generation and move its position past them, in ``tx``:
    rows and tracking commit together."""
    view.apply_batch(tx, view.tables(generation), events, cache)
    registry.advance(tx, view.name, generation, events[-1][0])


def advance(
    tx: Tx,
    view: View,
    source: EventSource,
    generation: int,
    batch_size: int,
    cache: Cache,
    stop: int | None = None,
    needs: Needs | None = None,
) -> int:
    """Apply the batch after the generation's locked position; return how many events."""
    start = registry.lock_position(tx, view.name, generation)
    if stop is not None and start >= stop:
        return 0
    events = decode(source, start, batch_size, stop, needs)
    if events:
        apply_batch(tx, view, generation, events, cache)
    return len(events)


class Follower:
    """Keeps one view up to date with the log.

    ``generation=None`` follows whatever generation is active (the live follower);
    a fixed generation follows that one only.
    """

    def __init__(
        self,
        view: View,
        source: EventSource,
        store: Store,
        *,
        batch_size: int = 500,
        generation: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.view = view
        self.recorder = source.recorder
        self.mapper = source.mapper
        self.store = store
        self.batch_size = batch_size
        self.generation = generation
        self.needs = needs_of([view])
        self.last_error: BaseException | None = None
        self.failing_since: datetime | None = None
        if generation is None:
            registry.ensure(store, view)

    # -- applying --------------------------------------------------------------------------

    def run_once(self) -> int:
        """Apply the next batch, rows and position in one transaction; return its size."""
        with self.store.transaction() as tx:
            generation = (
                self.generation
                if self.generation is not None
                else registry.lock_active(tx, self.view.name)
            )
            # A fresh cache per batch: another follower may write between our batches.
            return advance(tx, self.view, self, generation, self.batch_size, {}, needs=self.needs)

    def catch_up(self) -> int:
        """Apply everything up to the head as it is now; return how many events."""
        head = head_position(self.recorder)
        applied = 0
        while self.position() < head:
            n = self.run_once()
            if n == 0:
                break
            applied += n
        return applied

    def run_forever(self, stop: threading.Event, poll_interval: float = 0.5) -> None:
        """Follow until ``stop`` is set. Errors are logged and retried with backoff: a
        broken event stops the view (visible as lag), it is never skipped."""
        channel = getattr(self.recorder, "channel_name", None)
        backoff = poll_interval
        with self.store.listener(channel) as notified:
            while not stop.is_set():
                try:
                    n = self.run_once()
                except Exception as exc:
                    self.last_error = exc
                    self.failing_since = self.failing_since or datetime.now(UTC)
                    log.exception("view %s: applying a batch failed; retrying", self.view.name)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                self.last_error = self.failing_since = None
                backoff = poll_interval
                if n >= self.batch_size:
                    continue  # more is waiting
                if notified is None:
                    stop.wait(poll_interval)
                    continue
                # Wait for a NOTIFY in short slices, so that stop is honoured promptly.
                deadline = time.monotonic() + poll_interval
                while not stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or notified(min(remaining, 0.25)):
                        break

    # -- reading ---------------------------------------------------------------------------

    def position(self) -> int:
        if self.generation is None:
            return position(self.store, self.view.name)
        with self.store.read() as tx:
            gens = registry.generations(tx, self.view.name)
        for g in gens:
            if g.generation == self.generation:
                return g.position
        raise registry.GenerationGoneError(
            f"generation {self.generation} of view {self.view.name} is gone"
        )

    def status(self) -> ViewStatus:
        """The view's status, with this follower's current failure if it keeps failing."""
        found = status(self.store, self.recorder, self.view)
        error, since = self.last_error, self.failing_since
        if error is None:
            return found
        return replace(
            found,
            error=f"{type(error).__name__}: {error}".splitlines()[0][:500],
            failing_since=since.isoformat() if since is not None else None,
        )

    def wait_for(self, target: int, timeout: float) -> bool:
        return wait_for(self.store, self.view.name, target, timeout)


#: events per batch of a rebuild: each batch is one transaction, so a larger one writes
#: a loan file's row (and its pages) once for several of its events instead of once per
#: event. Against 1,000: 5,000 halved the commit time of a 100,000-event rebuild, and
#: 10,000 halved the loan rows' writes again; 25,000 took a 1M-event rebuild on SQLite
#: from 33 to 28 s (the loan rows' writes held SQLite's one write lock 6.7 s, then 4.3)
#: and cut them by a third on PostgreSQL. At most three batches are in memory (applied,
#: queued, being read): about 150 MB
REBUILD_BATCH = 25_000
#: decoded batches the reader of a rebuild may hold ahead of the views
READ_AHEAD = 1
#: the cyclic GC's first threshold while a rebuild runs (CPython's default is 700)
REBUILD_GC_THRESHOLD = 100_000

_gc_lock = threading.Lock()
_gc_rebuilds = 0
_gc_threshold: tuple[int, ...] = ()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often while a rebuild runs (process-wide,
    restored when the last rebuild ends; cycles are still collected). A rebuild keeps
    thousands of decoded events and the views' caches alive, so collections come often
    and each walks them: reading and decoding cost 13 µs an event with the GC held off
    and 16-21 with the default thresholds, above the 12 of reading without keeping."""
    global _gc_rebuilds, _gc_threshold
    with _gc_lock:
        if _gc_rebuilds == 0:
            _gc_threshold = gc.get_threshold()
            gc.set_threshold(REBUILD_GC_THRESHOLD, *_gc_threshold[1:])
        _gc_rebuilds += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_rebuilds -= 1
            if _gc_rebuilds == 0:
                gc.set_threshold(*_gc_threshold)


def read_in_turn(source: EventSource, batch_size: int, needs: Needs) -> Iterator[Events]:
    """The whole log in decoded batches, each read when the caller asks for it."""
    position = 0
    while events := decode(source, position, batch_size, needs=needs):
        yield events
        position = events[-1][0]


def read_ahead(source: EventSource, batch_size: int, needs: Needs) -> Iterator[Events]:
    """The whole log in decoded batches, read by a thread of its own while the caller
    applies the previous batch: on PostgreSQL the log's round trips run while the views'
    Python runs. The reads are the same as reading in turn (the empty read that ends the
    log included).

    Not on SQLite: its driver releases the GIL around each row it steps, so a reader
    thread next to busy Python gets the GIL back once per switch interval, takes turns
    with it row by row, and adds the hand-overs' cost. A 1M-event rebuild read in turn
    took 27.0-29.0 s instead of 29.5-29.9, and 45-47 s of CPU instead of 48-49."""
    batches: queue.Queue[tuple[Events | None, BaseException | None]] = queue.Queue(READ_AHEAD)
    stop = threading.Event()

    def put(item: tuple[Events | None, BaseException | None]) -> None:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read() -> None:
        position = 0
        try:
            while not stop.is_set():
                events = decode(source, position, batch_size, needs=needs)
                put((events, None))
                if not events:
                    return
                position = events[-1][0]
        except BaseException as exc:  # handed to the caller, raised there
            put((None, exc))

    reader = threading.Thread(target=read, name="projection-rebuild-reader", daemon=True)
    reader.start()
    try:
        while True:
            events, error = batches.get()
            if error is not None:
                raise error
            if not events:
                return
            yield events
    finally:
        stop.set()
        reader.join()


#: a log at least this long is rebuilt by several processes when ``Reopen`` says how
#: (below that, starting them costs more than it saves)
PARALLEL_FROM = 100_000


def default_processes(head: int) -> int:
    """How many processes a rebuild of a log ``head`` events long uses by default."""
    return (os.cpu_count() or 1) if head >= PARALLEL_FROM else 1


@dataclass(frozen=True)
class Reopen:
    """How another process opens the same log and views database: picklable factories
    (e.g. ``functools.partial(ArchiveApp, settings)``), for a rebuild in processes."""

    source: Callable[[], EventSource]
    store: Callable[[], Store]


def _groups(views: Sequence[View], processes: int) -> list[list[View]]:
    """Views shared out among ``processes`` groups of about equal ``rebuild_cost``: the
    costliest view first, each to the group with the least so far. The costliest group
    comes first (the one a joining process loads: it starts before the others)."""
    groups: list[list[View]] = [[] for _ in range(min(processes, len(views)))]
    costs = [0.0] * len(groups)
    for view in sorted(views, key=lambda v: v.rebuild_cost, reverse=True):
        least = costs.index(min(costs))
        groups[least].append(view)
        costs[least] += view.rebuild_cost
    return [g for _, g in sorted(zip(costs, groups, strict=True), key=lambda cg: -cg[0])]


def _load_batch(
    store: Store,
    views: Sequence[View],
    generations: dict[str, int],
    events: Events,
    caches: dict[str, Cache],
    position: int,
    writing: AbstractContextManager[Any],
) -> None:
    """One batch of a rebuild: each view works out its writes first (``WriteBuffer``),
    then one transaction writes them all and moves each view's position past the batch.
    On SQLite the write lock is held for the writes only, not for the Python before them.
    ``writing`` is held around the transaction (see ``_load_in_processes``)."""
    buffers = []
    for view in views:
        buffer = WriteBuffer(store)
        view.load_batch(buffer, view.tables(generations[view.name]), events, caches[view.name])
        buffers.append(buffer)
    with writing, store.transaction() as tx:
        for view, buffer in zip(views, buffers, strict=True):
            generation = generations[view.name]
            if registry.lock_position(tx, view.name, generation) != position:
                raise registry.GenerationGoneError(
                    f"generation {generation} of view {view.name} has another writer"
                )
            buffer.replay(tx)
            registry.advance(tx, view.name, generation, events[-1][0])


def load_views(
    views: Sequence[View],
    source: EventSource,
    store: Store,
    generations: dict[str, int],
    batch_size: int = REBUILD_BATCH,
    progress: Callable[[int, int], None] | None = None,
    writing: AbstractContextManager[Any] | None = None,
) -> None:
    """Replay the whole log into the given (new, building) generations, in one pass,
    then build their secondary indexes. Each batch is read once for all the views (on
    PostgreSQL by a reader thread, a batch ahead: see ``read_ahead``), and its events
    decoded if one of them needs it (``View.needs``). The generations have no other
    writer and no reader until their switch, so each view keeps a cache across batches
    and may hold rows back until the last (``View.load_batch``, ``View.finish_load``).
    ``progress(position, head)`` is called after each batch; ``writing`` is held around
    each write transaction."""
    writing = writing if writing is not None else nullcontext()
    with store.bulk(), fewer_collections():
        caches: dict[str, Cache] = {v.name: {} for v in views}
        position = 0
        read = (
            read_in_turn if isinstance(source.recorder, SQLiteApplicationRecorder) else read_ahead
        )
        for events in read(source, batch_size, needs_of(views)):
            _load_batch(store, views, generations, events, caches, position, writing)
            store.checkpoint()  # outside ``writing``: the other process writes meanwhile
            position = events[-1][0]
            if progress is not None:
                progress(position, head_position(source.recorder))
        for view in views:
            held = WriteBuffer(store)
            view.finish_load(held, view.tables(generations[view.name]), caches[view.name])
            with writing, store.transaction() as tx:
                held.replay(tx)
        for view in views:
            statements = WriteBuffer(store)
            view.create_indexes(statements, generations[view.name])
            for statement in statements.split():  # one index a transaction: see WriteBuffer
                with writing, store.transaction() as tx:
                    statement.replay(tx)


#: the lock a rebuild's child processes take to write on SQLite (see ``_load_in_processes``)
_sqlite_writer: AbstractContextManager[Any] | None = None


def _share_lock(lock: AbstractContextManager[Any]) -> None:
    global _sqlite_writer
    _sqlite_writer = lock


def _load_in_child(
    reopen: Reopen, views: Sequence[View], generations: dict[str, int], batch_size: int
) -> None:
    """``load_views`` in a process of its own (see ``rebuild_views``)."""
    source, store = reopen.source(), reopen.store()
    try:
        writing = _sqlite_writer if store.backend == "sqlite" else None
        load_views(views, source, store, generations, batch_size, writing=writing)
    finally:
        store.close()
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _load_in_processes(
    groups: list[list[View]],
    reopen: Reopen,
    source: EventSource,
    store: Store,
    generations: dict[str, int],
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    join: bool,
) -> None:
    """Each group of views loaded by a process of its own, which reads the log itself:
    Python runs one thread at a time, so this is how a rebuild uses more than one core.
    Started with "spawn" (a fork would copy this process's threads' locks mid-use). With
    ``join``, this process loads the first group itself while the others start.

    SQLite has one writer at a time, and a writer that finds the file locked sleeps in
    steps of up to 100 ms before it tries again. The processes take turns with a lock of
    their own instead, which hands over as soon as it is released."""
    context = multiprocessing.get_context("spawn")
    lock = context.Lock()
    here, elsewhere = (groups[0], groups[1:]) if join else ([], groups)

    def report() -> None:
        if progress is not None:
            with store.read() as tx:
                positions = [
                    g.position
                    for name, generation in generations.items()
                    for g in registry.generations(tx, name)
                    if g.generation == generation
                ]
            progress(min(positions, default=0), head_position(source.recorder))

    # Leaving the block terminates the pool: on an error the other processes stop at once.
    with context.Pool(len(elsewhere), _share_lock, (lock,)) as pool:
        pending = [
            pool.apply_async(
                _load_in_child,
                (reopen, group, {v.name: generations[v.name] for v in group}, batch_size),
            )
            for group in elsewhere
        ]

        def collect() -> None:
            for result in [r for r in pending if r.ready()]:
                result.get()  # a child's error, raised here with its traceback
                pending.remove(result)

        if here:

            def loaded(position: int, head: int) -> None:
                collect()  # a child's error stops this load too
                report()

            writing = lock if store.backend == "sqlite" else None
            mine = {v.name: generations[v.name] for v in here}
            load_views(here, source, store, mine, batch_size, loaded, writing)
        while pending:
            pending[0].wait(1.0)
            collect()
            report()
        # Leaving the block terminates the workers: their loads are committed and their
        # connections closed, and letting them free their caches on exit took 0.1 s.


def rebuild_views(
    views: Sequence[View],
    source: EventSource,
    store: Store,
    *,
    batch_size: int = REBUILD_BATCH,
    before_switch: Callable[[View, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    reopen: Reopen | None = None,
    processes: int | None = None,
    join: bool = False,
) -> dict[str, int]:
    """Replay the log from position 0 into a new generation of each view, then make
    each new generation the active one. Returns the new generations by view.

    The load (``load_views``) runs in this thread, or, given ``reopen``, in up to
    ``processes`` processes, each loading a share of the views (``_groups``). By
    default that is one per core once the log has ``PARALLEL_FROM`` events. With
    ``join`` this thread loads one share itself instead of waiting for child processes
    to load them all: one process fewer to start, which a command-line rebuild, with
    nothing else to do, saves; a server leaves the loads to the children and keeps
    serving. A crash leaves the new generations "building", never read, and the next
    rebuild drops them.

    Readers keep reading the active generations (and the live followers keep them up to
    date) until the switch. A view's switch locks its registry row, which waits for the
    live follower's batch, applies what the new generation still lacks up to the head,
    and activates it, all in one transaction: readers never see a generation behind the
    one they saw before. The old generation is retired and dropped at the next rebuild.
    ``progress(position, head)`` is called as the load goes.
    """
    if len({v.name for v in views}) != len(views):
        raise ValueError("each view can be rebuilt once per pass")
    if processes is None:
        processes = 1 if reopen is None else default_processes(head_position(source.recorder))
    if processes > 1 and reopen is None:
        raise ValueError("a rebuild in several processes needs to know how to reopen")
    generations = {v.name: registry.begin_generation(store, v) for v in views}
    groups = _groups(views, processes)
    if len(groups) > 1:
        assert reopen is not None
        _load_in_processes(groups, reopen, source, store, generations, batch_size, progress, join)
    else:
        load_views(views, source, store, generations, batch_size, progress)
    for view in views:
        generation = generations[view.name]
        if before_switch is not None:
            before_switch(view, generation)
        with store.transaction() as tx:
            registry.lock_active(tx, view.name)
            head = head_position(source.recorder)
            needs = needs_of([view])
            while advance(tx, view, source, generation, batch_size, {}, head, needs):
                pass
            registry.activate(tx, view.name, generation)
        log.info("view %s: generation %d is active", view.name, generation)
    return generations


def rebuild(
    view: View,
    source: EventSource,
    store: Store,
    *,
    batch_size: int = REBUILD_BATCH,
    before_switch: Callable[[int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """``rebuild_views`` of one view; returns its new generation."""
    return rebuild_views(
        [view],
        source,
        store,
        batch_size=batch_size,
        before_switch=None if before_switch is None else lambda _, g: before_switch(g),
        progress=progress,
    )[view.name]
