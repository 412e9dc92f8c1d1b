"""What every view is: named tables per generation, and one apply function per event type.

A view's tables carry a generation suffix (``loan_files_g3``): a rebuild fills the next
generation while readers keep reading the active one, then the registry switches.
Dispatch is on ``type(event).__qualname__`` ("LoanFile.Opened"); an event type a view
has no function for is skipped, so new event types never break an old view.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, SupportsIndex, TypeVar, overload

from projections.store import Row, Store, Tx, identifier

Tables = dict[str, str]
Handler = Callable[[Tx, Tables, int, Any], None]
#: one decoded batch of the log: (position, event), in log order
Events = Sequence[tuple[int, Any]]
#: what a view keeps in memory between batches; see ``View.apply_batch``
Cache = dict[str, Any]
H = TypeVar("H", bound=Callable[..., None])


class Decoded(list[tuple[int, Any]]):
    """A decoded batch that keeps each event's stored form: ``stored[i]`` is the log's
    notification of ``self[i]`` (``topic``, ``state``: the encoded JSON). A view can copy
    or parse the encoded state instead of decoding the event, and an event none of the
    batch's views needs decoded is ``None`` here (``View.needs``). Slices keep theirs."""

    def __init__(self, events: Iterable[tuple[int, Any]], stored: Sequence[Any]) -> None:
        super().__init__(events)
        self.stored = stored

    @overload
    def __getitem__(self, index: SupportsIndex) -> tuple[int, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> Decoded: ...
    def __getitem__(self, index: SupportsIndex | slice) -> tuple[int, Any] | Decoded:
        if isinstance(index, slice):
            return Decoded(list.__getitem__(self, index), self.stored[index])
        return list.__getitem__(self, index)


class Handlers(dict[str, H]):
    """The apply functions of one view, registered with ``@handlers.on("LoanFile.Opened")``."""

    def on(self, *qualnames: str) -> Callable[[H], H]:
        def register(fn: H) -> H:
            for name in qualnames:
                self[name] = fn
            return fn

        return register


class View:
    """Base of every view. Subclasses set the class attributes; they hold no state."""

    #: the registry key, and the prefix of nothing: table names are listed in ``tables``
    name: ClassVar[str]
    #: bump when the tables or the apply functions change: the status then says "stale"
    #: and a rebuild brings the view up to date
    schema_version: ClassVar[int]
    #: logical table names; physical names are ``<logical>_g<generation>``
    table_names: ClassVar[tuple[str, ...]]
    #: tables rebuilt from the others (a full-text index): left out of ``dump``
    derived_tables: ClassVar[tuple[str, ...]] = ()
    #: DDL, formatted with the physical names, e.g. ``CREATE TABLE {loan_files} (...)``
    ddl: ClassVar[tuple[str, ...]]
    #: secondary indexes, formatted likewise. A rebuild creates them after its bulk load
    #: (loading into indexed tables costs several times more), before the switch.
    indexes: ClassVar[tuple[str, ...]] = ()
    handlers: ClassVar[Handlers[Handler]]
    #: what a rebuild of the view costs, in µs an event beyond reading the log (measured
    #: by bench/rebuild.py): a rebuild in several processes shares views out by it
    rebuild_cost: ClassVar[float] = 1.0

    def tables(self, generation: int) -> Tables:
        return {n: identifier(f"{n}_g{generation}") for n in self.table_names}

    def create(self, tx: Tx, generation: int) -> None:
        """The tables of a generation (``create_indexes`` adds the secondary indexes)."""
        tables = self.tables(generation)
        for statement in self.ddl:
            tx.execute(statement.format(**tables))

    def create_indexes(self, tx: Tx, generation: int) -> None:
        tables = self.tables(generation)
        for statement in self.indexes:
            tx.execute(statement.format(**tables))

    def drop(self, tx: Tx, generation: int) -> None:
        for table in self.tables(generation).values():
            tx.execute(f"DROP TABLE IF EXISTS {table}")

    def needs(self, qualname: str) -> bool:
        """Whether the view needs events of this type decoded. The follower does not
        decode an event no view it feeds needs: such an event comes as ``None`` (its
        stored form stays in ``Decoded.stored``). A view that applies events other than
        through ``handlers`` overrides this."""
        return qualname in self.handlers

    def apply(self, tx: Tx, tables: Tables, position: int, event: Any) -> None:
        """Apply one event at its log position; unknown event types are ignored."""
        handler = self.handlers.get(type(event).__qualname__)
        if handler is not None:
            handler(tx, tables, position, event)

    def apply_batch(self, tx: Tx, tables: Tables, events: Events, cache: Cache) -> None:
        """Apply a batch of events in log order, inside the batch's transaction (in a
        rebuild, a ``WriteBuffer``: read first, write at the end, never read back a row
        written in the same batch).

        ``cache`` is where a view may keep rows between batches instead of reading them
        back. The follower hands the same dict to every batch only while it is the sole
        writer of the generation (a rebuild), and a fresh one per batch otherwise; it is
        dropped with the transaction on any failure, so it never outlives rolled-back
        rows. Views that write event by event need not override this.
        """
        for position, event in events:
            self.apply(tx, tables, position, event)

    def load_batch(self, tx: Tx, tables: Tables, events: Events, cache: Cache) -> None:
        """A rebuild's batch. Like ``apply_batch``, except that the view may hold
        changed rows back in ``cache`` instead of writing them each batch, and write
        them in ``finish_load``: until its switch nobody reads a generation being
        built, and an interrupted build is dropped, never resumed, so its rows may
        trail its position. Views that gain nothing from it need not override this."""
        self.apply_batch(tx, tables, events, cache)

    def finish_load(self, tx: Tx, tables: Tables, cache: Cache) -> None:
        """Write the rows ``load_batch`` held back: once, after a rebuild's last batch
        and before its indexes."""

    def dump(self, store: Store, generation: int | None = None) -> dict[str, list[Row]]:
        """Every row of every table (of the active generation), in a stable order: for
        comparing an incrementally maintained view with a rebuilt one."""
        from projections import registry

        compared = [n for n in self.table_names if n not in self.derived_tables]
        with store.read() as tx:
            if generation is None:
                active = registry.active(tx, self.name)
                if active is None:
                    return {n: [] for n in compared}
                generation = active.generation
            tables = self.tables(generation)
            return {
                logical: sorted(
                    tx.execute(f"SELECT * FROM {tables[logical]}"),
                    key=lambda row: json.dumps(row, sort_keys=True, default=str),
                )
                for logical in compared
            }


# -- small row helpers shared by the views ---------------------------------------------------


def trim(cached: dict[Any, Any], limit: int) -> None:
    """Bound a cache of written rows: past ``limit`` entries, forget the older half (in
    the order they were first cached, so long-finished aggregates go first). Only call
    it once the batch is written; a forgotten row is read back when next needed."""
    if len(cached) > limit:
        for key in list(itertools.islice(cached, len(cached) // 2)):
            del cached[key]


def insert_row(tx: Tx, table: str, row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    tx.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))


def update_row(tx: Tx, table: str, key: str, value: Any, changes: dict[str, Any]) -> None:
    assignments = ", ".join(f"{column} = ?" for column in changes)
    tx.execute(f"UPDATE {table} SET {assignments} WHERE {key} = ?", [*changes.values(), value])


def fetch_row(tx: Tx, table: str, key: str, value: Any) -> Row | None:
    return tx.one(f"SELECT * FROM {table} WHERE {key} = ?", (value,))


@dataclass(frozen=True)
class Page:
    """One page of a query: the rows, how many match in all, and the view position the
    rows are consistent with (compare with the position a command returned)."""

    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int
    position: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "total": self.total,
            "limit": self.limit,
            "offset": self.offset,
            "position": self.position,
        }


MAX_LIMIT = 1000


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
