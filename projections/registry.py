"""Which generation of each view is active, and how far every generation has read.

Two tables in the views database:

- ``projection_registry``: view -> active generation (what readers read);
- ``projection_generations``: view, generation -> position (its tracking record),
  state (building | active | retired), the view's schema version it was built with.

A generation's position is updated in the same transaction as its rows, which is what
makes application exactly-once. Lock order, to stay deadlock-free on PostgreSQL:
registry row first, then generation row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from projections.encoding import iso_utc
from projections.store import Store, Tx
from projections.view import View

BUILDING = "building"
ACTIVE = "active"
RETIRED = "retired"

DDL = (
    "CREATE TABLE IF NOT EXISTS projection_registry ("
    " view TEXT PRIMARY KEY,"
    " active_generation INTEGER NOT NULL,"
    " switched_at TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS projection_generations ("
    " view TEXT NOT NULL,"
    " generation INTEGER NOT NULL,"
    " schema_version INTEGER NOT NULL,"
    " state TEXT NOT NULL,"
    " position BIGINT NOT NULL,"
    " created_at TEXT NOT NULL,"
    " updated_at TEXT NOT NULL,"
    " PRIMARY KEY (view, generation))",
)


class GenerationGoneError(RuntimeError):
    """The generation being built was abandoned (another rebuild started)."""


@dataclass(frozen=True)
class Generation:
    view: str
    generation: int
    schema_version: int
    state: str
    position: int
    created_at: str
    updated_at: str


def _now() -> str:
    return iso_utc(datetime.now(UTC))


def install(store: Store) -> None:
    with store.transaction() as tx:
        tx.lock("registry")
        for statement in DDL:
            tx.execute(statement)


def ensure(store: Store, view: View) -> int:
    """Register the view with an empty first generation if it has none; return the active one."""
    install(store)
    with store.transaction() as tx:
        tx.lock(f"view:{view.name}")
        row = tx.one(
            "SELECT active_generation FROM projection_registry WHERE view = ?", (view.name,)
        )
        if row is not None:
            return int(row["active_generation"])
        view.drop(tx, 1)  # leftovers of a registry that was dropped by hand
        view.create(tx, 1)
        view.create_indexes(tx, 1)  # followed event by event from the start
        now = _now()
        tx.execute(
            "INSERT INTO projection_generations VALUES (?, 1, ?, ?, 0, ?, ?)",
            (view.name, view.schema_version, ACTIVE, now, now),
        )
        tx.execute("INSERT INTO projection_registry VALUES (?, 1, ?)", (view.name, now))
        return 1


def _generation(row: dict[str, object]) -> Generation:
    return Generation(
        view=str(row["view"]),
        generation=int(row["generation"]),  # type: ignore[call-overload]
        schema_version=int(row["schema_version"]),  # type: ignore[call-overload]
        state=str(row["state"]),
        position=int(row["position"]),  # type: ignore[call-overload]
        created_at=str(row["created_at"]),
        updated_at=str(row["updated_at"]),
    )


def active(tx: Tx, view_name: str) -> Generation | None:
    """The generation readers should read (None: the view was never registered)."""
    row = tx.one(
        "SELECT g.* FROM projection_registry r JOIN projection_generations g"
        " ON g.view = r.view AND g.generation = r.active_generation WHERE r.view = ?",
        (view_name,),
    )
    return None if row is None else _generation(row)


def generations(tx: Tx, view_name: str) -> list[Generation]:
    rows = tx.execute(
        "SELECT * FROM projection_generations WHERE view = ? ORDER BY generation", (view_name,)
    )
    return [_generation(r) for r in rows]


def lock_active(tx: Tx, view_name: str) -> int:
    """The active generation, locked: a switch waits for the live follower's batch, and
    the follower's next batch waits for a switch."""
    row = tx.one(
        "SELECT active_generation FROM projection_registry WHERE view = ?" + tx.for_update,
        (view_name,),
    )
    if row is None:
        raise LookupError(f"view {view_name} is not registered")
    return int(row["active_generation"])


def lock_position(tx: Tx, view_name: str, generation: int) -> int:
    """A generation's tracking position, locked against a second follower of it."""
    row = tx.one(
        "SELECT position FROM projection_generations WHERE view = ? AND generation = ?"
        + tx.for_update,
        (view_name, generation),
    )
    if row is None:
        raise GenerationGoneError(f"generation {generation} of view {view_name} is gone")
    return int(row["position"])


def advance(tx: Tx, view_name: str, generation: int, position: int) -> None:
    tx.execute(
        "UPDATE projection_generations SET position = ?, updated_at = ?"
        " WHERE view = ? AND generation = ?",
        (position, _now(), view_name, generation),
    )


def begin_generation(store: Store, view: View) -> int:
    """Create empty tables for a new generation, without their secondary indexes (the
    rebuild adds them after its bulk load). Retired generations (kept since the last
    switch for readers still on them) and abandoned builds are dropped first."""
    ensure(store, view)
    with store.transaction() as tx:
        tx.lock(f"view:{view.name}")
        known = generations(tx, view.name)
        for old in known:
            if old.state != ACTIVE:
                view.drop(tx, old.generation)
                tx.execute(
                    "DELETE FROM projection_generations WHERE view = ? AND generation = ?",
                    (view.name, old.generation),
                )
        new = max(g.generation for g in known) + 1
        view.drop(tx, new)  # leftovers of a crash before this registry existed
        view.create(tx, new)
        now = _now()
        tx.execute(
            "INSERT INTO projection_generations VALUES (?, ?, ?, ?, 0, ?, ?)",
            (view.name, new, view.schema_version, BUILDING, now, now),
        )
        return new


def activate(tx: Tx, view_name: str, generation: int) -> None:
    """Switch readers to ``generation``; the previous one is retired, not yet dropped.
    Call with the registry row locked (``lock_active``) in the same transaction."""
    now = _now()
    tx.execute(
        "UPDATE projection_generations SET state = ?, updated_at = ? WHERE view = ? AND state = ?",
        (RETIRED, now, view_name, ACTIVE),
    )
    tx.execute(
        "UPDATE projection_generations SET state = ?, updated_at = ?"
        " WHERE view = ? AND generation = ?",
        (ACTIVE, now, view_name, generation),
    )
    tx.execute(
        "UPDATE projection_registry SET active_generation = ?, switched_at = ? WHERE view = ?",
        (generation, now, view_name),
    )
