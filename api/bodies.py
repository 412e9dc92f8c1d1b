"""The base of every JSON request body: no unknown fields, and no text a store refuses."""

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


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


class Body(BaseModel):
    """A request body. PostgreSQL text cannot hold NUL: an event carrying one would be
    stored forever and then fail every read model that copies it, so it is refused here."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _without_nul(cls, value: Any) -> Any:
        refuse_nul(value)
        return value
