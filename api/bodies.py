"""The base of every JSON request body: no unknown fields, and no text a store refuses."""

import re
from datetime import date, datetime
from typing import Annotated, Any, get_args

from fastapi import Query
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationInfo,
    field_validator,
)


def refuse_nul(value: Any) -> None:
    """Raise ValueError if ``value`` (or a string inside it) holds a NUL character."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain NUL (U+0000) characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_nul(key)
            refuse_nul(item)
    elif isinstance(value, list | tuple):
        for item in value:
            refuse_nul(item)


def _nul_free(value: str | None) -> str | None:
    refuse_nul(value)
    return value


QueryText = Annotated[str | None, AfterValidator(_nul_free)]
"""An optional text query parameter compared with stored text: PostgreSQL refuses a NUL
in a statement's parameter, which would be a 500 (or a streamed export cut short after
its 200) instead of a 422 naming the parameter."""

NUMBER = re.compile(r"^\s*[-+]?\d+(\.\d*)?\s*$")


def _written_as_iso(example: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, int | float) or (isinstance(value, str) and NUMBER.match(value)):
            raise ValueError(f"expected ISO 8601 (e.g. {example}), not a number")
        return value

    return BeforeValidator(check)


QueryMoment = Annotated[datetime | None, _written_as_iso("2024-05-01T09:30:00Z")]
"""An optional moment in a query. Lax parsing reads a bare number as a Unix timestamp, in
seconds or milliseconds as its size suggests (``as_of=99999999999`` is 1973): a moment is
written as ISO 8601, or refused."""
AsOf = Annotated[
    QueryMoment,
    Query(description="ISO 8601 with time zone; not in the future (5 minutes of skew)"),
]
"""``?as_of=``: the state rebuilt from the events as it was at that moment."""
QueryDay = Annotated[date | None, _written_as_iso("2024-05-01")]
"""An optional day in a query, ISO 8601, for the same reason."""


class Body(BaseModel):
    """A request body. PostgreSQL text cannot hold NUL: an event carrying one would be
    stored forever and then fail every read model that copies it, so it is refused here."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _without_nul(cls, value: Any) -> Any:
        refuse_nul(value)
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_int(cls, value: Any, info: ValidationInfo) -> Any:
        """JSON true is not a number, but lax validation reads it as 1: a one-month term,
        a first-rank lien or expected version 1, stored in an event forever."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = get_args(annotation) or (annotation,)
            if int in kinds and bool not in kinds:
                raise ValueError("expected a whole number, not true or false")
        return value
