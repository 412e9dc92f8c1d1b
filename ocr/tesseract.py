"""Tesseract through pytesseract: one ``tesseract`` run per page gives text and confidences.

- Rotation: page segmentation mode 1 ("automatic page segmentation with OSD") runs
  Tesseract's orientation and script detection inside the same run and recognises the
  page in its detected orientation, so sideways and upside-down scans read correctly
  without a second process (``image_to_osd``) per page: measured on a 19-line page at
  300 dpi, OCR with ``--psm 3`` read 90° and 180° scans as garbage (difflib ratio 0.02),
  ``--psm 1`` read all four orientations at 0.99-0.995, for about 0.1-0.3 s more per
  page; a separate ``--psm 0`` OSD run costs 0.56-0.81 s.
- Text and confidence come from one TSV run (``image_to_data``): words are put back into
  lines and paragraphs as Tesseract's own text output does, and the confidence is the
  mean over words (Tesseract's 0-100 scale).
- The image goes to Tesseract as an uncompressed single-page TIFF written by us (4 ms
  for an A4 page at 300 dpi). pytesseract would PNG-encode every page (0.9 s), and
  Tesseract itself spends about 50 ms more CPU reading a PNG or a PGM than an
  uncompressed TIFF (measured: median 2.21 s PNG, 2.22 s PGM, 2.16 s TIFF per page).
- ``OMP_THREAD_LIMIT=1`` is set by the pool for its workers (one page per core is
  faster overall than OpenMP threads inside one page).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Any

from ocr.model import ExtractionError

ENGINE = "tesseract"
# Options beyond language, page segmentation and engine mode, on every run.
EXTRA_ARGS: tuple[str, ...] = ()
_LANGUAGES = re.compile(r"^[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*$")


def check_languages(languages: str) -> None:
    if not isinstance(languages, str) or not _LANGUAGES.match(languages):
        raise ValueError(f"languages must look like 'spa+eng', not {languages!r}")


@functools.cache
def engine_version() -> str | None:
    """Tesseract's version, or None when the ``tesseract`` command is missing."""
    import pytesseract

    try:
        return str(pytesseract.get_tesseract_version())
    except Exception:
        return None


@functools.cache
def installed_languages() -> frozenset[str]:
    import pytesseract

    try:
        return frozenset(pytesseract.get_languages(config=""))
    except Exception:
        return frozenset()


def missing_languages(languages: str) -> list[str]:
    installed = installed_languages()
    return [lang for lang in languages.split("+") if lang not in installed]


def ocr_image(
    image: Any,
    *,
    path: str,
    languages: str,
    psm: int,
    dpi: float | None,
    timeout: float,
    extra_args: tuple[str, ...] = (),
) -> tuple[str, float | None]:
    """Text and mean word confidence of ``image`` (PIL, "L" or "1"), via a TIFF at ``path``."""
    import pytesseract

    if timeout <= 0:
        raise ExtractionError("timeout", "no time left for Tesseract")
    image.save(path, format="TIFF")
    config = " ".join([f"--psm {int(psm)} --oem 1", *EXTRA_ARGS, *extra_args])
    if dpi:
        config += f" --dpi {round(dpi)}"
    try:
        data = pytesseract.image_to_data(
            path,
            lang=languages,
            config=config,
            timeout=timeout,
            output_type=pytesseract.Output.DICT,
        )
    except pytesseract.TesseractNotFoundError as exc:
        raise ExtractionError("engine_missing", "the tesseract command is not installed") from exc
    except pytesseract.TesseractError as exc:
        message = " ".join(str(exc.message).split())[:300]
        raise ExtractionError("ocr_error", f"tesseract exited {exc.status}: {message}") from exc
    except RuntimeError as exc:
        if "timeout" in str(exc).lower():
            raise ExtractionError(
                "timeout", f"Tesseract ran out of time ({timeout:.0f} s)"
            ) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return assemble(data)


def assemble(data: dict[str, list[Any]]) -> tuple[str, float | None]:
    """Text (lines joined by newlines, paragraphs by blank lines) and mean word confidence."""
    paragraphs: list[list[list[str]]] = []
    last_par: tuple[int, int] | None = None
    last_line: tuple[int, int, int] | None = None
    confidences: list[float] = []
    for i, word in enumerate(data.get("text", ())):
        if int(data["level"][i]) != 5:
            continue
        word = str(word).strip()
        if not word:
            continue
        block, par, line = (
            int(data["block_num"][i]),
            int(data["par_num"][i]),
            int(data["line_num"][i]),
        )
        if (block, par) != last_par:
            paragraphs.append([])
            last_par, last_line = (block, par), None
        if (block, par, line) != last_line:
            paragraphs[-1].append([])
            last_line = (block, par, line)
        paragraphs[-1][-1].append(word)
        conf = float(data["conf"][i])
        if conf >= 0:
            confidences.append(conf)
    text = "\n\n".join("\n".join(" ".join(words) for words in par) for par in paragraphs)
    confidence = round(sum(confidences) / len(confidences), 2) if confidences else None
    return text, confidence
