"""The hash chain: canonical serialisation of events and verification of stored history.

Every event carries ``prev_hash`` (the digest of its aggregate's previous event, or
GENESIS) and ``event_hash`` (its own digest over a canonical serialisation of all its
fields). Verification reads the stored records, not the aggregates, and checks four
things per event: the stored bytes decode, they are exactly the canonical encoding of
the decoded event (so no byte can change unnoticed), the event's own digest matches,
and it links to its predecessor. The first event that fails is named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, Mapper, StoredEvent
from eventsourcing.utils import get_topic

GENESIS = "0" * 64


def _datetime(value: datetime) -> dict[str, str]:
    if value.tzinfo is None:
        raise ValueError("naive datetime in an event")
    return {"$datetime": value.astimezone(UTC).isoformat()}


_TAGS: dict[type, Callable[[Any], dict[str, str]]] = {
    Decimal: lambda value: {"$decimal": str(value)},
    datetime: _datetime,
    date: lambda value: {"$date": value.isoformat()},
    UUID: lambda value: {"$uuid": str(value)},
}


def _tagged(value: Any) -> Any:
    """json's hook for the types JSON lacks (it is called for nothing else)."""
    tag = _TAGS.get(type(value))
    if tag is not None:
        return tag(value)
    for kind, tag in _TAGS.items():  # subclasses; datetime is listed before date
        if isinstance(value, kind):
            return tag(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    raise TypeError(f"cannot canonicalise {type(value).__name__}")


def _refuse_floats(value: Any) -> None:
    kind = type(value)
    if kind is float:
        raise ValueError("floats are not allowed in events; use Decimal")
    if kind is dict:
        for item in value.values():
            _refuse_floats(item)
    elif kind is list or kind is tuple:
        for item in value:
            _refuse_floats(item)


_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=_tagged
)
_CONTAINERS = (float, dict, list, tuple)


def canonical_bytes(topic: str, fields: Mapping[str, Any]) -> bytes:
    """Sorted, spaceless JSON of ``{"topic", "fields"}``; Decimal, datetime (UTC), date and
    UUID become ``{"$decimal": "1.00"}``-style tags, tuples lists, mapping keys strings.

    The C encoder does the walk (json calls ``_tagged`` only for the tagged types), which
    halves the cost of a per-event Python walk. It would write floats, so they are refused
    first: only containers are descended into, and events rarely have any."""
    for value in fields.values():
        if type(value) in _CONTAINERS:
            _refuse_floats(value)
    return _ENCODER.encode({"topic": topic, "fields": fields}).encode()


def event_digest(topic: str, fields: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical serialisation of an event's fields (all but event_hash)."""
    return hashlib.sha256(canonical_bytes(topic, fields)).hexdigest()


def digest_of(event: Any) -> str:
    fields = {k: v for k, v in vars(event).items() if k != "event_hash"}
    return event_digest(get_topic(type(event)), fields)


@dataclass(frozen=True)
class Breach:
    """The first event whose stored record fails verification."""

    originator_id: UUID
    originator_version: int
    position: int | None
    problem: str

    def __str__(self) -> str:
        where = f" at position {self.position}" if self.position is not None else ""
        return f"event {self.originator_id} v{self.originator_version}{where}: {self.problem}"


@dataclass(frozen=True)
class ChainReport:
    events_checked: int
    aggregates_checked: int
    breach: Breach | None

    @property
    def ok(self) -> bool:
        return self.breach is None


def _check(
    mapper: Mapper[UUID], stored: StoredEvent, prev: tuple[int, str] | None
) -> tuple[str | None, str]:
    """Return (problem or None, this event's hash) for one stored event."""
    try:
        event = mapper.to_domain_event(stored)
    except Exception as exc:  # any corruption may surface as any decoding error
        return f"stored record does not decode ({type(exc).__name__}: {exc})", ""
    try:
        again = mapper.to_stored_event(event)
    except Exception as exc:
        return f"decoded event does not re-encode ({type(exc).__name__})", ""
    if again.state != stored.state or again.topic != stored.topic:
        return "stored bytes differ from the event's canonical encoding", ""
    own = getattr(event, "event_hash", None)
    if own is None:
        return "event carries no hash", ""
    if digest_of(event) != own:
        return "content does not match its recorded hash", own
    expected_version = 1 if prev is None else prev[0] + 1
    if stored.originator_version != expected_version:
        return f"version {stored.originator_version} follows {expected_version - 1}", own
    expected_prev = GENESIS if prev is None else prev[1]
    if event.prev_hash != expected_prev:
        return "previous-hash link is broken", own
    return None, own


def verify_events(
    mapper: Mapper[UUID], records: Iterable[tuple[int | None, StoredEvent]]
) -> ChainReport:
    """Verify stored events given in order of position (or of version, per aggregate)."""
    heads: dict[UUID, tuple[int, str]] = {}
    count = 0
    for position, stored in records:
        count += 1
        problem, own = _check(mapper, stored, heads.get(stored.originator_id))
        if problem is not None:
            breach = Breach(stored.originator_id, stored.originator_version, position, problem)
            return ChainReport(count, len(heads), breach)
        heads[stored.originator_id] = (stored.originator_version, own)
    return ChainReport(count, len(heads), None)


def iter_log(
    recorder: ApplicationRecorder, batch: int = 1000, topics: Sequence[str] = ()
) -> Iterator[tuple[int, StoredEvent]]:
    """Every stored event (of ``topics``, if given), in order of position, read in batches."""
    start = 0
    while True:
        notes = recorder.select_notifications(start, batch, topics=topics, inclusive_of_start=False)
        if not notes:
            return
        for n in notes:
            yield n.id, n
        start = notes[-1].id


def verify_aggregate(
    recorder: ApplicationRecorder, mapper: Mapper[UUID], aggregate_id: UUID
) -> ChainReport:
    return verify_events(mapper, ((None, s) for s in recorder.select_events(aggregate_id)))


def verify_store(recorder: ApplicationRecorder, mapper: Mapper[UUID]) -> ChainReport:
    return verify_events(mapper, iter_log(recorder))
