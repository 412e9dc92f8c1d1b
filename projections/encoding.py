"""How event values become view columns: text that sorts and compares the same everywhere.

Money stays a decimal string (never a float), times are ISO 8601 UTC with a fixed width
(so they compare as text on both backends), ids are canonical UUID strings.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Mapper,
    UUIDAsHex,
)
from eventsourcing.utils import resolve_topic

#: entries of the id cache below: an aggregate's events come close together in the log
CACHED = 16_384


def iso_utc(moment: datetime) -> str:
    """``2026-01-31T12:00:00.000000Z``: fixed width, so text order is time order.

    Not cached: nearly every time formatted is an event's own, met once (a cache missed
    cost 2.1 µs a call against 1.35 to format)."""
    if moment.tzinfo is UTC:  # every event's time: one call instead of three
        return moment.isoformat(timespec="microseconds")[:-6] + "Z"
    if moment.tzinfo is None:
        raise ValueError("a moment needs a time zone")
    # isoformat is about twice as fast as strftime, and this runs for every event.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_ID_TEXTS: dict[int | str, str] = {}


def id_text(value: UUID | str) -> str:
    """An aggregate id as text (``str`` of its UUID), from a ``UUID`` or from the text a
    log's notes carry (``archive.eventlog.LogNote``: on SQLite 32 hex digits, on
    PostgreSQL the canonical form). ``str`` of a UUID costs ten times a look-up keyed by
    its integer (an ``lru_cache`` keyed by the UUID itself runs its Python ``__hash__``
    and ``__eq__``)."""
    key = value if type(value) is str else value.int
    text = _ID_TEXTS.get(key)
    if text is None:
        if len(_ID_TEXTS) >= CACHED:
            _ID_TEXTS.clear()
        if type(value) is not str:
            text = str(value)
        elif len(value) == 32 and value.islower():  # UUID.hex, as SQLite's log stores ids
            text = f"{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"
        elif len(value) == 36 and value.islower() and value[8] == "-":  # PostgreSQL's text
            text = value
        else:
            text = str(UUID(value))
        _ID_TEXTS[key] = text
    return text


def plain(value: Any) -> Any:
    """Map an event value onto JSON types: Decimal as string, dates ISO, UUIDs as text."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:  # most values: fast
        return value
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, float):  # pragma: no cover - events refuse floats
        raise TypeError("floats have no place in the archive; use Decimal")
    return str(value)


def dumps(value: Any) -> str:
    """Canonical JSON text (sorted keys), so equal values give equal text."""
    return json_text(plain(value))


def json_text(value: Any) -> str:
    """``dumps`` of a value that is already plain (skips the walk through ``plain``)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def opt(value: Any) -> Any:
    """A nullable scalar column."""
    return None if value is None else plain(value)


# -- the log's stored form ---------------------------------------------------------------------


@functools.cache
def archive_mapper() -> Mapper[Any]:
    """Decodes stored states as the archive encodes them: the transcodings of
    ``ArchiveApp.register_transcodings`` (the library's three and dates), no compression
    or encryption (the archive configures none)."""
    from archive.application import DateAsISO

    transcoder = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO(), DateAsISO()):
        transcoder.register(transcoding)
    return Mapper(transcoder=transcoder)


@functools.cache
def event_type(topic: str) -> str:
    """The event type a stored event's topic names, e.g. "LoanFile.Opened" (its class's
    qualified name, as views dispatch on it)."""
    return resolve_topic(topic).__qualname__


_JSON = json.JSONDecoder()


def parse_json(text: str) -> Any:
    """Plain JSON text parsed by the C scanner alone: ``json.loads`` adds an encoding
    check and two whitespace matches per call, a fifth of the time on 300 bytes."""
    return _JSON.raw_decode(text)[0]


def stored_time(value: Any) -> str:
    """An event's time as stored (``DatetimeAsISO``: ``{"_type_": ..., "_data_": ISO}``)
    as ``iso_utc`` writes it: a UTC time with microseconds only needs its offset
    replaced."""
    text = value["_data_"] if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise ValueError(f"an event's time is not ISO 8601 text: {value!r}")
    if len(text) == 32 and text.endswith("+00:00"):
        return text[:-6] + "Z"
    return iso_utc(datetime.fromisoformat(text))


# -- CSV exports ---------------------------------------------------------------------------

#: what a spreadsheet takes for the start of a formula
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def inert(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (a reason typed as
    ``=HYPERLINK(...)``) gets a leading apostrophe, OWASP's advice for CSV exports; the
    JSON exports keep the exact text."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_lines(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """CSV text (RFC 4180: CRLF line ends), a line at a time so a long export streams:
    the header, then each row's cells as given (see ``inert``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for values in itertools.chain([header], rows):
        writer.writerow(values)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
