"""What a pool worker does with one task: render or decode a page, then OCR it.

Runs in the worker processes of ``ocr.pool``; ``execute`` never raises: every failure
becomes ``PageResult.error`` (or, for page counting, an ExtractionError value).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from ocr import images, pdf, preprocess, tesseract
from ocr.model import ExtractionError, Method, PageResult


@dataclass(frozen=True, slots=True)
class OcrSettings:
    languages: str
    dpi: int
    psm: int
    page_timeout: float
    max_pixels: int
    max_image_pixels: int


@dataclass(frozen=True, slots=True)
class PageTask:
    kind: str  # "pdf", "image" or "count" (pages of a PDF that pypdf cannot open)
    path: str  # the document, written once to the extraction's work directory
    index: int  # 0-based page or frame
    settings: OcrSettings
    image_format: str = ""  # Pillow format name, for "image"


def execute(task: PageTask) -> PageResult | int | ExtractionError:
    if task.kind == "count":
        try:
            return pdf.count_pages(task.path)
        except ExtractionError as exc:
            return exc
        except Exception as exc:
            return ExtractionError("malformed", f"PDFium cannot open it: {exc}")
    return ocr_page(task)


def release(_: object = None) -> None:
    """Drop what this worker holds for the document just done (its open PDF)."""
    pdf.close_document()


def ocr_page(task: PageTask) -> PageResult:
    start = time.perf_counter()
    settings = task.settings
    number = task.index + 1
    dpi: float | None = None
    partial: str | None = None
    try:
        if task.kind == "pdf":
            image, dpi = pdf.render_page(
                task.path, task.index, dpi=settings.dpi, max_pixels=settings.max_pixels
            )
        else:
            frame = images.load_frame(
                task.path,
                task.image_format,
                task.index,
                max_pixels=settings.max_pixels,
                max_image_pixels=settings.max_image_pixels,
            )
            image, dpi = frame.image, frame.dpi
            if frame.truncated:
                partial = "malformed: the image data ends early; text is from the part decoded"
        prepared = preprocess.prepare(image, dpi)
        remaining = settings.page_timeout - (time.perf_counter() - start)
        workdir = os.path.dirname(task.path)
        tempfile.tempdir = workdir  # pytesseract's own temporary files go there too
        text, confidence = tesseract.ocr_image(
            prepared.image,
            path=os.path.join(workdir, f"page-{number}-{os.getpid()}.tif"),
            languages=settings.languages,
            psm=settings.psm,
            dpi=prepared.dpi,
            timeout=remaining,
            extra_args=prepared.tesseract_args,
        )
    except ExtractionError as exc:
        return _failed(number, exc.reason, start, dpi)
    except MemoryError:
        return _failed(number, "too_large: out of memory", start, dpi)
    except Exception as exc:
        return _failed(number, f"internal: {type(exc).__name__}: {exc}", start, dpi)
    return PageResult(
        number=number,
        text=text,
        method=Method.OCR,
        confidence=confidence,
        duration_s=round(time.perf_counter() - start, 4),
        error=partial,
        dpi=round(dpi, 2) if dpi else None,
    )


def _failed(number: int, reason: str, start: float, dpi: float | None) -> PageResult:
    return PageResult(
        number=number,
        text="",
        method=Method.OCR,
        confidence=None,
        duration_s=round(time.perf_counter() - start, 4),
        error=reason,
        dpi=round(dpi, 2) if dpi else None,
    )
