"""What extraction returns: frozen results per page and per document, and the failure type.

Reasons (``PageResult.error``, ``ExtractionResult.failure``, ``ExtractionError.reason``)
are ``"<code>: <detail>"``: a stable code for machines, then words for people. Codes:

``empty_file``, ``unsupported_type``, ``encrypted``, ``malformed``, ``no_pages``,
``too_large``, ``too_many_pages``, ``timeout``, ``crashed``, ``ocr_error``,
``engine_missing``, ``all_pages_failed``, ``internal``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Method(StrEnum):
    TEXT_LAYER = "text_layer"  # the PDF's own text, read with pypdf
    OCR = "ocr"  # rasterised or decoded, then read by Tesseract


class ExtractionError(Exception):
    """Why a document or a page could not be read. ``reason`` is ``"<code>: <detail>"``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across the process pool
        return (type(self), (self.code, self.detail))


@dataclass(frozen=True, slots=True)
class PageResult:
    """One page. ``number`` counts from 1.

    ``confidence`` is Tesseract's mean word confidence (0-100) over the page's words; None
    for text-layer pages and pages without words. ``duration_s`` is the page's wall time in
    the process that did the work. ``error`` is None when the page was read completely;
    otherwise it says why not, and ``text`` holds whatever could still be read (often "").
    ``dpi`` is the resolution Tesseract saw (None for text-layer pages): lower than asked
    when a page was capped at ``max_pixels``.
    """

    number: int
    text: str
    method: Method
    confidence: float | None
    duration_s: float
    error: str | None = None
    dpi: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class ExtractionResult:
    """One document: its pages in order, or a ``failure`` saying why there are none.

    A document-level ``failure`` is set when nothing could be read: the file could not be
    opened (``encrypted``, ``malformed``, ``unsupported_type`` ...) or every page failed
    (``all_pages_failed``). Individual page failures leave ``failure`` None and show in
    ``PageResult.error``. ``media_type`` is what the bytes are, sniffed, whatever the
    caller claimed; ``settings`` records every knob that shaped the result, library
    versions included. ``notes`` says what else happened that a reader of the result
    should know (a claimed type that was wrong, a truncated PDF that was repaired).
    """

    pages: tuple[PageResult, ...]
    engine: str
    engine_version: str | None
    languages: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    failure: str | None = None
    media_type: str | None = None
    duration_s: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def text(self) -> str:
        """All pages' text, pages separated by form feeds."""
        return "\f".join(page.text for page in self.pages)

    @property
    def failed_pages(self) -> tuple[PageResult, ...]:
        return tuple(page for page in self.pages if page.error is not None)

    def raise_for_failure(self) -> ExtractionResult:
        if self.failure is not None:
            code, _, detail = self.failure.partition(": ")
            raise ExtractionError(code, detail)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (enums as their values)."""
        data = asdict(self)
        data["settings"] = dict(self.settings)
        for page in data["pages"]:
            page["method"] = str(page["method"])
        return data
