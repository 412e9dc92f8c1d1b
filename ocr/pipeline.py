"""``extract``: bytes in, pages out. The one entry point of the package.

The shape is OCRmyPDF's: a document becomes a stream of per-page tasks. PDF pages with a
real text layer (``ocr.pdf``) are read right here with pypdf and never reach the pool;
every other page (scanned PDF pages, TIFF frames, PNG/JPEG scans) is rendered or decoded
and OCRed by a worker process (``ocr.pool``, ``ocr.worker``), one page per core.

Failure handling: nothing raises out of ``extract`` for bad *data* (bad *arguments* are a
programming error and raise ValueError). A document that cannot be opened gets
``ExtractionResult.failure``; a page that cannot be read gets ``PageResult.error`` and the
other pages are kept. Each OCR page has ``page_timeout`` seconds: Tesseract is stopped
at that point by pytesseract, and a worker that is still busy ``GRACE_S`` later
(stuck rendering or decoding) is killed. Text-layer pages are read in the calling process
by pure-Python pypdf, which has no such limit.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from ocr import images, pdf, pool, tesseract, worker
from ocr.model import ExtractionError, ExtractionResult, Method, PageResult
from ocr.sniff import IMAGE_TYPES, JBIG2, PDF, describe, sniff

log = logging.getLogger(__name__)

DEFAULT_LANGUAGES = "spa+eng"
DEFAULT_DPI = 300
DEFAULT_PSM = 1  # automatic page segmentation with orientation and script detection
MAX_PIXELS = 40_000_000  # largest raster handed to Tesseract: A4 at 600 dpi is 34.8 MP
MAX_IMAGE_PIXELS = 160_000_000  # larger images are refused undecoded (decompression bombs)
MAX_PAGES = 10_000
GRACE_S = 10.0


def extract(
    data: bytes,
    *,
    media_type: str | None = None,
    languages: str = DEFAULT_LANGUAGES,
    dpi: int = DEFAULT_DPI,
    page_timeout: float = 120.0,
    workers: int | None = None,
    psm: int = DEFAULT_PSM,
    max_pixels: int = MAX_PIXELS,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_pages: int = MAX_PAGES,
) -> ExtractionResult:
    """Extract the text of a PDF or a scanned image, page by page.

    ``media_type`` is what the uploader claimed; the bytes decide (it is only mentioned
    in failure reasons). ``languages`` is Tesseract's ``-l`` (``"spa+eng"``). ``dpi`` is
    the resolution scanned PDF pages are rendered at; images keep their own. ``workers``
    defaults to the cores this process may use. ``psm`` is Tesseract's page segmentation
    mode; the default 1 includes orientation detection, so rotated scans read correctly.
    ``max_pixels`` caps the raster given to Tesseract (bigger pages are rendered at a
    lower dpi, bigger images scaled down); images over ``max_image_pixels`` are refused.
    """
    data = _check_arguments(data, languages, dpi, page_timeout, workers, psm, max_pixels)
    start = time.perf_counter()
    n_workers = workers or pool.available_cores()
    settings = worker.OcrSettings(
        languages=languages,
        dpi=int(dpi),
        psm=int(psm),
        page_timeout=float(page_timeout),
        max_pixels=int(max_pixels),
        max_image_pixels=max(int(max_image_pixels), int(max_pixels)),
    )
    pages: list[PageResult] = []
    notes: list[str] = []
    failure: str | None = None
    sniffed: str | None = None
    try:
        sniffed = sniff(data)
        if media_type and sniffed and media_type.split(";")[0].strip().lower() != sniffed:
            notes.append(f"claimed to be {media_type}, but the content is {sniffed}")
        if not data:
            raise ExtractionError("empty_file", "the file is empty (0 bytes)")
        if sniffed is None:
            claimed = f", claimed to be {media_type}" if media_type else ""
            raise ExtractionError(
                "unsupported_type", f"not a PDF or a supported image ({describe(data)}{claimed})"
            )
        if sniffed == JBIG2:
            raise ExtractionError(
                "unsupported_type", "a standalone JBIG2 file (JBIG2 is read only inside PDFs)"
            )
        with tempfile.TemporaryDirectory(prefix="ocr-", ignore_cleanup_errors=True) as workdir:
            if sniffed == PDF:
                pages = _pdf_pages(data, workdir, settings, n_workers, max_pages, notes)
            else:
                pages = _image_pages(data, sniffed, workdir, settings, n_workers)
        failure = _document_failure(pages)
    except ExtractionError as exc:
        failure = exc.reason
    except Exception as exc:  # a bug or an exotic library error: report, never raise
        log.exception("extraction failed unexpectedly")
        failure = f"internal: {type(exc).__name__}: {exc}"
    return ExtractionResult(
        pages=tuple(pages),
        engine=tesseract.ENGINE,
        engine_version=tesseract.engine_version(),
        languages=languages,
        settings=_settings_record(settings, n_workers, max_pages),
        failure=failure,
        media_type=sniffed,
        duration_s=round(time.perf_counter() - start, 4),
        notes=tuple(notes),
    )


def _check_arguments(
    data: Any,
    languages: str,
    dpi: int,
    page_timeout: float,
    workers: int | None,
    psm: int,
    max_pixels: int,
) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    tesseract.check_languages(languages)
    if not 36 <= dpi <= 1200:
        raise ValueError(f"dpi must be between 36 and 1200, not {dpi}")
    if not page_timeout > 0:
        raise ValueError("page_timeout must be positive")
    if workers is not None and workers < 1:
        raise ValueError("workers must be at least 1")
    if psm in (0, 2) or not 0 <= psm <= 13:
        raise ValueError(f"psm {psm} does not recognise text")
    if max_pixels < 100_000:
        raise ValueError("max_pixels is too small to read a page")
    return bytes(data)


def _document_failure(pages: list[PageResult]) -> str | None:
    failed = [page for page in pages if page.error is not None and not page.text.strip()]
    if not pages or len(failed) < len(pages):
        return None
    if len(pages) == 1:
        return failed[0].error
    return f"all_pages_failed: {len(pages)} pages; page 1: {failed[0].error}"


# -- PDF -----------------------------------------------------------------------------------


def _pdf_pages(
    data: bytes,
    workdir: str,
    settings: worker.OcrSettings,
    n_workers: int,
    max_pages: int,
    notes: list[str],
) -> list[PageResult]:
    reader, count, problem = _open_pypdf(data)
    if reader is None:
        repaired = pdf.repair_truncated(data)
        if repaired is not None:
            notes.append(
                "repaired: the PDF had no trailer (cut short?); one was added to read the rest"
            )
            data = repaired
            reader, count, problem = _open_pypdf(data)
    path = _write(workdir, "document.pdf", data)
    if reader is None:  # pypdf cannot read it: PDFium may (in a worker)
        count = _pdfium_count(path, settings, f"pypdf: {problem}")
    if count == 0:
        raise ExtractionError("no_pages", "the PDF has no pages")
    if count > max_pages:
        raise ExtractionError("too_many_pages", f"{count} pages (at most {max_pages})")

    results: dict[int, PageResult] = {}

    def plan() -> Iterator[worker.PageTask]:
        for index in range(count):
            began = time.perf_counter()
            if reader is not None:
                try:
                    layer = pdf.read_text_layer(reader.pages[index])
                except Exception as exc:  # unreadable content stream: let PDFium try
                    log.debug("text layer of page %d unreadable: %s", index + 1, exc)
                    layer = None
                if layer is not None and layer.usable:
                    results[index] = PageResult(
                        number=index + 1,
                        text=layer.text,
                        method=Method.TEXT_LAYER,
                        confidence=None,
                        duration_s=round(time.perf_counter() - began, 4),
                    )
                    continue
            yield worker.PageTask("pdf", path, index, settings)

    _ocr(plan(), results, settings, n_workers)
    return [results[index] for index in range(count)]


def _open_pypdf(data: bytes) -> tuple[Any, int, str]:
    """(reader, page count, "") or (None, 0, what went wrong); ExtractionError if encrypted."""
    try:
        reader = pdf.open_reader(data)
        return reader, len(reader.pages), ""
    except ExtractionError:
        raise
    except Exception as exc:
        return None, 0, _short(exc)


def _pdfium_count(path: str, settings: worker.OcrSettings, pypdf_error: str) -> int:
    task = worker.PageTask("count", path, 0, settings)
    for _, outcome in pool.run(
        worker.execute,
        [task],
        max_workers=1,
        task_timeout=settings.page_timeout,
        release=worker.release,
    ):
        if isinstance(outcome, int):
            return outcome
        if isinstance(outcome, ExtractionError) and outcome.code == "encrypted":
            raise outcome
        detail = outcome.detail if isinstance(outcome, ExtractionError | pool.Lost) else outcome
        raise ExtractionError("malformed", f"{pypdf_error}; PDFium: {detail}")
    raise ExtractionError("malformed", pypdf_error)  # pragma: no cover


# -- images --------------------------------------------------------------------------------


def _image_pages(
    data: bytes, media_type: str, workdir: str, settings: worker.OcrSettings, n_workers: int
) -> list[PageResult]:
    assert media_type in IMAGE_TYPES
    probe = images.probe(data, media_type, max_image_pixels=settings.max_image_pixels)
    path = _write(workdir, f"document.{probe.format.lower()}", data)
    tasks = (
        worker.PageTask("image", path, index, settings, probe.format)
        for index in range(probe.frames)
    )
    results: dict[int, PageResult] = {}
    _ocr(tasks, results, settings, n_workers)
    return [results[index] for index in range(probe.frames)]


# -- OCR through the pool ------------------------------------------------------------------


def _ocr(
    tasks: Iterator[worker.PageTask],
    results: dict[int, PageResult],
    settings: worker.OcrSettings,
    n_workers: int,
) -> None:
    """Run ``tasks`` on the pool, filling ``results`` by page index (0-based)."""
    submitted: dict[int, float] = {}

    def tracked() -> Iterator[worker.PageTask]:
        problem: str | None = None
        for number, task in enumerate(tasks):
            if number == 0:
                problem = _engine_problem(settings.languages)
            if problem:
                results[task.index] = _lost(task.index, problem, 0.0)
                continue
            submitted[task.index] = time.perf_counter()
            yield task

    for task, outcome in pool.run(
        worker.execute,
        tracked(),
        max_workers=n_workers,
        task_timeout=settings.page_timeout + GRACE_S,
        release=worker.release,
    ):
        elapsed = time.perf_counter() - submitted.get(task.index, time.perf_counter())
        if isinstance(outcome, PageResult):
            results[task.index] = outcome
        elif isinstance(outcome, pool.Lost):
            results[task.index] = _lost(task.index, f"{outcome.code}: {outcome.detail}", elapsed)
        else:
            results[task.index] = _lost(task.index, f"internal: {outcome!r}", elapsed)


def _engine_problem(languages: str) -> str | None:
    if tesseract.engine_version() is None:
        return "engine_missing: the tesseract command is not installed"
    missing = tesseract.missing_languages(languages)
    if missing:
        return f"engine_missing: Tesseract language data not installed: {', '.join(missing)}"
    return None


def _lost(index: int, reason: str, elapsed: float) -> PageResult:
    return PageResult(index + 1, "", Method.OCR, None, round(elapsed, 4), error=reason)


# -- helpers -------------------------------------------------------------------------------


def _write(workdir: str, name: str, data: bytes) -> str:
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _settings_record(settings: worker.OcrSettings, n_workers: int, max_pages: int) -> dict:
    return {
        "dpi": settings.dpi,
        "psm": settings.psm,
        "oem": 1,
        "page_timeout_s": settings.page_timeout,
        "workers": n_workers,
        "max_pixels": settings.max_pixels,
        "max_image_pixels": settings.max_image_pixels,
        "max_pages": max_pages,
        "text_layer_min_chars": pdf.MIN_TEXT_CHARS,
        "text_layer_scan_chars": pdf.SCAN_TEXT_CHARS,
        "preprocessing": preprocess_description(),
        **_library_versions(),
    }


def preprocess_description() -> str:
    from ocr import preprocess

    return getattr(preprocess, "DESCRIPTION", "none")


@functools.cache
def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("pypdf", "pypdfium2", "pillow", "pytesseract"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "missing"
    try:
        import pypdfium2

        versions["pdfium"] = str(pypdfium2.version.PDFIUM_INFO)
    except Exception:
        versions["pdfium"] = "missing"
    return versions
