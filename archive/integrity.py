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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, Mapper, StoredEvent
from eventsourcing.utils import get_topic

GENESIS = "0" * 64


def _canonical(value: Any) -> Any:
    """Map a value onto plain JSON types, tagging the types JSON lacks."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in an event")
        return {"$datetime": value.astimezone(UTC).isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, UUID):
        return {"$uuid": str(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        raise ValueError("floats are not allowed in events; use Decimal")
    raise TypeError(f"cannot canonicalise {type(value).__name__}")


def canonical_bytes(topic: str, fields: Mapping[str, Any]) -> bytes:
    body = {"topic": topic, "fields": _canonical(fields)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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
