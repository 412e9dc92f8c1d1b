"""Pure text extraction from originals: bytes in, pages out. Imports nothing of ours.

    from ocr import extract
    result = extract(pdf_bytes, languages="spa+eng")
    result.failure          # None, or "<code>: <why>" when nothing could be read
    for page in result.pages:
        page.number, page.method, page.text, page.confidence, page.duration_s, page.error

See ``ocr.pipeline.extract`` for the parameters and ``ocr.model`` for the results.
"""

from ocr.model import ExtractionError, ExtractionResult, Method, PageResult
from ocr.pipeline import DEFAULT_DPI, DEFAULT_LANGUAGES, extract

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_LANGUAGES",
    "ExtractionError",
    "ExtractionResult",
    "Method",
    "PageResult",
    "extract",
]
