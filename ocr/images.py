"""Scanned images (TIFF frames, PNG, JPEG, and GIF/BMP/WebP/JPEG 2000): counting and decoding.

``probe`` reads headers only and runs in the calling process; ``load_frame`` decodes pixels
and runs in a worker process (``ocr.pool``), where Pillow's decompression-bomb limit is set
to ``max_image_pixels`` and its warning is an error.

Every frame becomes an 8-bit grayscale image (or stays 1-bit): Tesseract reads gray, and it
is a quarter of the memory of RGBA. Conversions that Pillow gets wrong on its own:

- 16-bit and 32-bit gray (``I;16``, ``I``, ``F``): Pillow clips to 0..255 (a 16-bit scan
  turns white); we stretch the actual range onto 0..255 instead.
- transparency (``RGBA``, ``LA``, ``P`` with a transparent index): flattened onto white, as
  paper; Pillow would drop alpha and leave black on black.
- CMYK (JPEG from prepress, often Adobe-inverted: Pillow reads the APP14 marker) and other
  colour spaces go through RGB.
- EXIF orientation (phone photos) is applied before OCR.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Any

from ocr.model import ExtractionError
from ocr.sniff import PILLOW_FORMATS

MAX_FRAMES = 10_000
_BOMB = "refused undecoded as a possible decompression bomb"


@dataclass(frozen=True, slots=True)
class Probe:
    format: str
    frames: int


def probe(data: bytes, media_type: str, *, max_image_pixels: int) -> Probe:
    """Format and page count from the headers; refuses bombs before any pixel is decoded.

    TIFF pages are counted by walking the IFD chain ourselves: Pillow's ``n_frames`` sets
    up every frame on the way and fails on the first one it cannot decode, which would
    lose the good pages after it. Animated GIF/WebP frames are not pages: one page each.
    """
    from PIL import Image, UnidentifiedImageError

    fmt = PILLOW_FORMATS[media_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError as exc:
            raise ExtractionError("too_large", f"{_BOMB}: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ExtractionError("malformed", f"not a readable {fmt} image") from exc
        except Exception as exc:
            raise ExtractionError("malformed", f"{fmt}: {type(exc).__name__}: {exc}") from exc
        with image:
            _check_size(image.size, max_image_pixels)
    frames = tiff_page_count(data) if fmt == "TIFF" else 1
    if frames > MAX_FRAMES:
        raise ExtractionError("too_many_pages", f"more than {MAX_FRAMES} pages")
    return Probe(fmt, max(1, frames))


def tiff_page_count(data: bytes) -> int:
    """Images in a TIFF's main IFD chain (classic or BigTIFF), stopping at loops and EOF."""
    endian = "<" if data[:2] == b"II" else ">"
    (magic,) = struct.unpack_from(endian + "H", data, 2)
    if magic == 43:  # BigTIFF: 8-byte counts and offsets, 20-byte entries
        count_fmt, offset_fmt, entry, (offset,) = (
            "Q",
            "Q",
            20,
            struct.unpack_from(endian + "Q", data, 8),
        )
    else:
        count_fmt, offset_fmt, entry, (offset,) = (
            "H",
            "I",
            12,
            struct.unpack_from(endian + "I", data, 4),
        )
    count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
    seen: set[int] = set()
    pages = 0
    while offset and offset not in seen and offset + count_size <= len(data):
        seen.add(offset)
        pages += 1
        if pages > MAX_FRAMES:
            break
        (entries,) = struct.unpack_from(endian + count_fmt, data, offset)
        link = offset + count_size + entries * entry
        if link + offset_size > len(data):
            break
        (offset,) = struct.unpack_from(endian + offset_fmt, data, link)
    return pages


def _check_size(size: tuple[int, int], max_image_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ExtractionError("malformed", f"image of {width} x {height} pixels")
    if width * height > max_image_pixels:
        raise ExtractionError(
            "too_large",
            f"image of {width} x {height} pixels exceeds {max_image_pixels} pixels: {_BOMB}",
        )


@dataclass(frozen=True, slots=True)
class Frame:
    image: Any  # PIL.Image.Image, mode "L" or "1"
    dpi: float | None  # from the file, when plausible
    truncated: bool  # the data ended early; the rest of the frame is blank


def load_frame(path: str, fmt: str, index: int, *, max_pixels: int, max_image_pixels: int) -> Frame:
    """Frame ``index`` of the image file at ``path``, decoded and normalised (see above).

    Frames over ``max_pixels`` are scaled down to fit (JPEG decodes at the reduced size);
    frames over ``max_image_pixels`` are refused without decoding. Truncated data is
    decoded as far as it goes (``Frame.truncated``).
    """
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = max_image_pixels
    where = f"{fmt} page {index + 1}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image, dpi, truncated = _decode(path, fmt, index, max_pixels, max_image_pixels)
        except ExtractionError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ExtractionError("too_large", f"{_BOMB}: {exc}") from exc
        except EOFError as exc:
            raise ExtractionError("malformed", f"{where} is missing") from exc
        except KeyError as exc:  # Pillow's tables: an unknown compression or tag value
            raise ExtractionError("malformed", f"{where}: unsupported value {exc}") from exc
        except MemoryError:
            raise
        except Exception as exc:
            raise ExtractionError("malformed", f"{where}: {type(exc).__name__}: {exc}") from exc
    with contextlib.suppress(Exception):  # a broken EXIF block is no reason to lose the page
        image = ImageOps.exif_transpose(image)
    image = to_gray(image)
    pixels = image.size[0] * image.size[1]
    if pixels > max_pixels:
        factor = math.sqrt(pixels / max_pixels)
        size = (max(1, int(image.size[0] / factor)), max(1, int(image.size[1] / factor)))
        image = image.convert("L").resize(size, Image.Resampling.LANCZOS)
        dpi = dpi / factor if dpi else None
    return Frame(image, dpi, truncated)


def _decode(
    path: str, fmt: str, index: int, max_pixels: int, max_image_pixels: int
) -> tuple[Any, float | None, bool]:
    from PIL import Image, ImageFile

    def open_frame() -> Any:
        image = Image.open(path, formats=[fmt])
        if index:
            image.seek(index)
        _check_size(image.size, max_image_pixels)
        return image

    image = open_frame()
    dpi = _dpi(image)
    width = image.size[0]
    if image.format == "JPEG" and image.size[0] * image.size[1] > max_pixels:
        factor = math.sqrt(image.size[0] * image.size[1] / max_pixels)
        image.draft("L", (int(image.size[0] / factor), int(image.size[1] / factor)))
    try:
        image.load()
        truncated = False
    except OSError as exc:
        if "truncated" not in str(exc) and "broken data stream" not in str(exc):
            raise
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # this worker's setting, for this frame
        try:
            image = open_frame()
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        truncated = True
    if dpi and image.size[0] != width:  # JPEG draft mode decoded it smaller
        dpi = dpi * image.size[0] / width
    return image, dpi, truncated


def _dpi(image: Any) -> float | None:
    dpi = image.info.get("dpi")
    try:
        value = float(dpi[0]) if isinstance(dpi, tuple) else float(dpi)
    except (TypeError, ValueError, IndexError):
        return None
    return value if 50 <= value <= 2400 else None


def to_gray(image: Any) -> Any:
    """Mode "L" (or "1" untouched) from any Pillow mode, as the module docstring says."""
    from PIL import Image

    mode = image.mode
    if mode in ("L", "1"):
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        wide = image.convert("F") if mode != "F" else image
        low, high = wide.getextrema()
        if high <= low:
            return Image.new("L", image.size, 255 if low > 0 else 0)
        scale = 255.0 / (high - low)
        return wide.point(lambda v: (v - low) * scale).convert("L")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        paper.alpha_composite(rgba)
        return paper.convert("L")
    if mode != "RGB":
        image = image.convert("RGB")
    return image.convert("L")
