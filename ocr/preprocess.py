"""Light preprocessing: only what measurably helped, and only where it helps.

Kept, in ``prepare`` (about 0.01 s per A4 page at 300 dpi, 0.03 s when it deskews;
Tesseract takes 2-3 s on the same page):

1. **Deskewing** when the text lines slope by ``DESKEW_MIN_DEG`` (2) to
   ``DESKEW_MAX_DEG`` (5) degrees. Tesseract's layout analysis drops about 30 % of the
   lines of a page turned 2.5-3 degrees clockwise (every page tried, 10 and 36 lines);
   at 2 degrees and less, either way, it reads as well as level, and turning such pages
   only reshuffles which characters it gets wrong (measured with a 1-degree threshold:
   -0.003 to +0.004, and accents or a code lost on some pages), so they are left alone.
   ``estimate_skew`` finds the slope from projection profiles of a copy 200 pixels on
   its short side (7-12 ms); the page is then turned with nearest-neighbour resampling
   (15-25 ms; bilinear costs 90 ms and read no better, bicubic read worse), corners
   filled with the paper's grey.
2. **Adaptive binarisation for unevenly lit pages.** The paper's brightness is taken in
   a 6x8 grid of tiles (90th percentile of each); when it varies by more than
   ``UNEVEN_SPREAD`` grey levels between the 10th and 90th percentile tile (a shadow
   from a book's fold, a phone photo, a yellowed edge), Tesseract binarises with
   Leptonica's tiled Otsu (``thresholding_method=1``) instead of its global Otsu.

Everything else goes to Tesseract as it is, in grey.

Measured with ``bench/ocr.py --preprocessing``: 10-line pages of the deed in DejaVu Serif,
degraded as in tests/ocr_fixtures.py (turned 1.0-1.8 degrees unless stated), mean
character accuracy over 3 seeds, Tesseract 5.3.0, spa+eng, psm 1. "tiled" is tiled
Otsu on every page; "auto" is this module:

=================  ======  ======  ======  =======  ======  =======  ======  ======
condition          none    median  autoc.  upscale  tiled   sauvola  deskew  auto
=================  ======  ======  ======  =======  ======  =======  ======  ======
300 dpi            0.9875  0.9949  0.9898  n/a      0.9881  0.9852   0.9875  0.9875
200 dpi            0.9875  0.9960  0.9892  0.8578   0.9869  0.9881   0.9875  0.9875
150 dpi            0.9784  0.9932  0.9852  0.8714   0.9824  0.9784   0.9784  0.9784
100 dpi            0.9608  0.9898  0.9716  0.9005   0.9676  0.9608   0.9608  0.9608
grain, 300 dpi     0.9954  0.9943  0.9943  n/a      0.9846  0.9937   0.9954  0.9954
specks, 300 dpi    0.9903  0.9920  0.9909  n/a      0.9892  0.9881   0.9903  0.9903
faded, 300 dpi     0.9812  0.8914  0.8931  n/a      0.9778  0.9744   0.9812  0.9812
shadow, 300 dpi    0.7332  0.7321  0.7332  n/a      0.9892  0.9898   0.7332  0.9892
skew +3°, 300 dpi  0.9829  0.9937  0.9841  n/a      0.9818  0.9846   0.9875  0.9875
skew -3°, 300 dpi  0.6997  0.6997  0.6997  n/a      0.6997  0.6997   0.9858  0.9858
JPEG q30, 200 dpi  0.9824  0.9966  0.9818  0.8328   0.9863  0.9727   0.9824  0.9824
mean               0.9345  0.9340  0.9284  n/a      0.9576  0.9559   0.9609  0.9842
=================  ======  ======  ======  =======  ======  =======  ======  ======

Cost per A4 page at 300 dpi on one core: skew estimate 0.007-0.012 s, turn 0.014-0.023
s, unevenness check 0.003 s, median 3x3 0.53-0.88 s, autocontrast 0.013-0.024 s; tiled
Otsu and Sauvola cost nothing measurable inside Tesseract (2.1-4.7 s per page on a
shared, loaded machine whichever the method). Ranges are over runs at different loads.

Not kept:

- tiled Otsu on every page fixes shadows (0.73 -> 0.99) but costs elsewhere (grain
  0.995 -> 0.985) and splits codes: the cadastral reference came out as
  "987202 3VH5797S0001WX" on 2 of 3 clean 300 dpi pages. Hence only on uneven pages.
- a 3x3 median helps low-resolution and noisy scans (100 dpi 0.961 -> 0.990) but wrecks
  faded print (0.981 -> 0.891), does nothing for the mean, and costs a fifth of a page.
- upscaling low-resolution scans to 300 dpi makes things worse (0.83-0.90): Tesseract
  reads the interpolated noise as marks. For the same reason PDF pages are rendered at
  their scan's own resolution (``ocr.pdf.render_page``).
- autocontrast: no better than nothing on average, and bad on faded print.
- rotation by 90/180/270 degrees is not preprocessing here: Tesseract's OSD does it
  inside the OCR run (``--psm 1``, see ``ocr.tesseract``).
"""

from __future__ import annotations

import array
import itertools
import math
from dataclasses import dataclass
from typing import Any

UNEVEN_SPREAD = 40  # grey levels of paper brightness, 10th to 90th percentile tile
DESKEW_MIN_DEG = 2.0  # Tesseract drops lines from about 2.5° clockwise; below, it copes
DESKEW_MAX_DEG = 5.0
_GRID = (6, 8)
_TILED_OTSU = ("-c", "thresholding_method=1")
_SKEW_SAMPLE_PX = 200  # the estimate works on a copy this many pixels on its short side

DESCRIPTION = (
    f"grey; deskewed when the text lines slope by {DESKEW_MIN_DEG:g}-{DESKEW_MAX_DEG:g} "
    f"degrees; Tesseract tiled Otsu (thresholding_method=1) when the paper's brightness "
    f"varies by more than {UNEVEN_SPREAD} grey levels across the page, else global Otsu"
)


@dataclass(frozen=True, slots=True)
class Prepared:
    image: Any
    dpi: float | None
    tesseract_args: tuple[str, ...]


def prepare(image: Any, dpi: float | None) -> Prepared:
    angle = estimate_skew(image)
    if angle is not None and DESKEW_MIN_DEG <= abs(angle) <= DESKEW_MAX_DEG:
        image = deskew(image, angle, fill=paper_level(image))
    args = _TILED_OTSU if paper_spread(image) > UNEVEN_SPREAD else ()
    return Prepared(image, dpi, args)


def deskew(image: Any, angle: float, *, fill: int = 255) -> Any:
    """``image`` turned by ``angle`` degrees counter-clockwise, grown to keep the corners,
    which are filled with ``fill`` (the paper's grey: white corners on grey paper would
    look like uneven light to the binariser)."""
    from PIL import Image

    if image.mode == "1":
        fill = 1 if fill >= 128 else 0
    return image.rotate(angle, resample=Image.Resampling.NEAREST, expand=True, fillcolor=fill)


def paper_level(image: Any) -> int:
    """The paper's grey: the 90th percentile of a small copy's histogram."""
    if image.mode != "L":
        return 255
    factor = max(1, min(image.size) // 256)
    small = image.reduce(factor) if factor > 1 else image
    return _percentile(small.histogram(), 0.9)


def estimate_skew(image: Any, *, coarse: float = 0.5, fine: float = 0.1) -> float | None:
    """The turn (degrees, counter-clockwise) that makes the text lines level, or None.

    Projection profiles of a small copy: each candidate angle shears the copy vertically
    and sums its rows; level lines give the sharpest profile (the largest sum of squared
    differences between neighbouring rows). Coarse steps over +-``DESKEW_MAX_DEG``, then
    fine steps around the best. None when nothing stands out (a blank or sideways page,
    a photo): the best must beat the level page's score by 10 %.
    """
    from PIL import Image, ImageOps

    gray = image.convert("L") if image.mode != "L" else image
    factor = max(1, round(min(gray.size) / _SKEW_SAMPLE_PX))
    small = gray.reduce(factor) if factor > 1 else gray
    ink = ImageOps.invert(small).convert("F")
    width, height = ink.size
    if width < 32 or height < 32:
        return None

    def sharpness(angle: float) -> float:
        t = math.tan(math.radians(angle))
        sheared = ink.transform(
            (width, height),
            Image.Transform.AFFINE,
            (1, 0, 0, t, 1, -t * width / 2),
            resample=Image.Resampling.NEAREST,
            fillcolor=0,
        )
        rows = array.array("f", sheared.resize((1, height), Image.Resampling.BOX).tobytes())
        return sum((b - a) * (b - a) for a, b in itertools.pairwise(rows))

    steps = int(DESKEW_MAX_DEG / coarse)
    scores = {k * coarse: sharpness(k * coarse) for k in range(-steps, steps + 1)}
    best = max(scores, key=scores.__getitem__)
    for k in range(-int(coarse / fine) + 1, int(coarse / fine)):
        angle = round(best + k * fine, 3)
        if angle not in scores:
            scores[angle] = sharpness(angle)
    best = max(scores, key=scores.__getitem__)
    level = scores[0.0]
    if level <= 0 or scores[best] < 1.1 * level:
        return None if best != 0.0 else 0.0
    return best


def paper_spread(image: Any) -> int:
    """Spread of paper brightness over the page, in grey levels (0 for a bilevel page)."""
    if image.mode != "L":
        return 0
    factor = max(1, min(image.size) // 256)
    small = image.reduce(factor) if factor > 1 else image
    width, height = small.size
    columns, rows = _GRID
    if width < columns or height < rows:
        return 0
    levels = []
    for row in range(rows):
        for column in range(columns):
            box = (
                column * width // columns,
                row * height // rows,
                (column + 1) * width // columns,
                (row + 1) * height // rows,
            )
            levels.append(_percentile(small.crop(box).histogram(), 0.9))
    levels.sort()
    return levels[int(0.9 * (len(levels) - 1))] - levels[int(0.1 * (len(levels) - 1))]


def _percentile(histogram: list[int], fraction: float) -> int:
    target = fraction * sum(histogram)
    seen = 0
    for value, count in enumerate(histogram):
        seen += count
        if seen >= target:
            return value
    return 255
