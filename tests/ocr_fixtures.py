"""Generated inputs for the OCR tests and benchmark: no binary fixtures are checked in.

Everything here is deterministic (seeded) and built with Pillow, fpdf2 and pypdf:

- ``render_page``: Spanish text with accents drawn with DejaVu Serif at a given dpi, the
  text returned alongside as the ground truth;
- ``degrade``: a small skew, mild noise and blur, like a tired office scanner;
- encoders: image-only PDF, multi-page TIFF, PNG, JPEG, a text-layer PDF (fpdf2 with the
  DejaVu TTF so accents are real text) and a mixed PDF (text page + scanned page);
- ``malformed_corpus``: bad inputs that must give a result or a clear reason, never an
  exception escaping ``ocr.extract``;
- ``char_accuracy``: 1 - normalised Levenshtein distance, on whitespace-normalised text.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fpdf import FPDF
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont
from pypdf import PdfReader, PdfWriter

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SERIF = FONT_DIR / "DejaVuSerif.ttf"
SANS = FONT_DIR / "DejaVuSans.ttf"

CADASTRAL_REFERENCE = "9872023VH5797S0001WX"

DEED_LINES: tuple[str, ...] = (
    "ESCRITURA DE PRÉSTAMO HIPOTECARIO",
    "Número ochocientos cuarenta y dos. En Teruel, a quince de enero",
    "de dos mil veinticuatro, ante mí, Don Joaquín Muñoz Ibáñez, Notario",
    "del Ilustre Colegio de Aragón, con residencia en esta ciudad.",
    "COMPARECEN: Doña Ana Pérez Núñez, mayor de edad, con D.N.I.",
    "número 12345678Z, y la entidad Caja Rural de Teruel, S.C.C.",
    "EXPONEN: Que la parte prestataria es dueña de la finca urbana",
    "sita en la Calle Mayor número 1, piso 2.º, con referencia",
    f"catastral {CADASTRAL_REFERENCE}, inscrita en el Registro de la",
    "Propiedad de Teruel, al tomo 1.204, libro 318, folio 56.",
    "Tasación: la finca ha sido tasada por Tasaciones Aragón, S.A., en",
    "ciento cincuenta mil euros (150.000,00 EUR), según certificado.",
    "Cláusula primera. Capital: ciento veinte mil euros (120.000,00 EUR).",
    "Cláusula segunda. Plazo: doscientos cuarenta meses, con vencimiento",
    "final el quince de enero de dos mil cuarenta y cuatro.",
    "Cláusula tercera. Interés ordinario del tres coma cincuenta por",
    "ciento anual (3,50 %), pagadero por meses vencidos.",
    "Cláusula cuarta. Responsabilidad hipotecaria y extensión de la",
    "hipoteca a las mejoras, según el artículo 110 de la Ley Hipotecaria.",
)

# A second, shorter text so multi-page documents do not repeat the same page.
ANNEX_LINES: tuple[str, ...] = (
    "ANEXO I. CERTIFICADO DE TASACIÓN",
    "Sociedad de tasación: Tasaciones Aragón, S.A. Tasador: Luis Gómez.",
    "Método de comparación; valor de tasación 150.000,00 EUR.",
    f"Finca con referencia catastral {CADASTRAL_REFERENCE}.",
    "Superficie construida: ochenta y cuatro metros cuadrados (84 m²).",
    "Fecha de visita: diez de enero de dos mil veinticuatro.",
)


# Filler clauses for full pages (benchmark documents), mixed with the lines above.
CLAUSE_LINES: tuple[str, ...] = (
    "Cláusula quinta. Amortización anticipada: la parte prestataria podrá",
    "reembolsar total o parcialmente el capital, con un preaviso de un mes.",
    "Cláusula sexta. Comisión por reembolso anticipado del cero coma cinco",
    "por ciento del capital reembolsado durante los cinco primeros años.",
    "Cláusula séptima. Vencimiento anticipado por impago de nueve cuotas",
    "mensuales, conforme al artículo 24 de la Ley 5/2019, de 15 de marzo.",
    "Cláusula octava. Seguro de daños sobre la finca hipotecada, con la",
    "entidad como beneficiaria por el importe del capital pendiente.",
    "Cláusula novena. Gastos: los de notaría y registro, según la ley.",
    "Cláusula décima. Domicilio a efectos de notificaciones: el de la finca.",
    "OTORGAMIENTO. Así lo dicen y otorgan los comparecientes, a quienes",
    "leo esta escritura, por su elección, y enterados de su contenido,",
    "la aprueban y firman conmigo, el Notario, que doy fe de todo ello.",
    "Valor de tasación a efectos de subasta: 150.000,00 euros (ciento",
    "cincuenta mil euros). Tipo de interés de demora: 6,50 % anual.",
    "Oficina: Plaza del Torico, 3, 44001 Teruel. Teléfono 978 60 12 34.",
    "El prestatario declara haber recibido la ficha europea de información",
    "normalizada (FEIN) y la ficha de advertencias estandarizadas (FiAE).",
)


@dataclass(frozen=True)
class Page:
    image: Image.Image
    text: str  # the ground truth, one line per line drawn


def render_page(
    lines: Sequence[str] = DEED_LINES,
    *,
    dpi: int = 300,
    width_in: float = 8.27,
    height_in: float | None = None,
    font_pt: float = 11.0,
    font: Path = SERIF,
    margin_in: float = 0.8,
) -> Page:
    """Lines of text on a white page, mode "L". Height defaults to just fit the text."""
    px_per_pt = dpi / 72
    face = ImageFont.truetype(str(font), round(font_pt * px_per_pt))
    line_height = round(font_pt * 1.6 * px_per_pt)
    margin = round(margin_in * dpi)
    width = round(width_in * dpi)
    height = round(height_in * dpi) if height_in else 2 * margin + line_height * len(lines)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, font=face, fill=0)
    image.info["dpi"] = (dpi, dpi)
    return Page(image, "\n".join(lines))


def degrade(
    image: Image.Image,
    *,
    skew_deg: float = 1.5,
    noise: int = 24,
    blur: float = 0.7,
    seed: int = 5,
    specks: bool = True,
) -> Image.Image:
    """Skew by a small angle, blur slightly and add mild grain plus (by default) specks."""
    out = image.rotate(skew_deg, resample=Image.Resampling.BICUBIC, fillcolor=255)
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        rng = random.Random(seed)
        raw = Image.frombytes("L", out.size, rng.randbytes(out.size[0] * out.size[1]))
        # Uniform bytes -> grain of +-noise/2, plus ~0.4% black and ~0.4% white specks.
        speck = 255 if specks else 0
        darken = raw.point(lambda v: speck if v < 1 else (v * noise // 256 if v < 128 else 0))
        lighten = raw.point(
            lambda v: speck if v > 254 else ((v - 128) * noise // 256 if v >= 128 else 0)
        )
        out = ImageChops.add(ImageChops.subtract(out, darken), lighten)
    out.info["dpi"] = image.info.get("dpi", (300, 300))
    return out


def low_contrast(image: Image.Image, *, ink: int = 100, paper: int = 170) -> Image.Image:
    """Faded print on grey paper: black becomes ``ink``, white becomes ``paper``."""
    out = image.point(lambda v: ink + (paper - ink) * v // 255)
    out.info["dpi"] = image.info.get("dpi", (300, 300))
    return out


def shadow(image: Image.Image, *, darkest: float = 0.45) -> Image.Image:
    """Uneven light, as from a book fold or a phone photo: dark left edge to full right."""
    ramp = Image.linear_gradient("L").rotate(90).resize(image.size)  # 255 left .. 0 right
    ramp = ramp.point(lambda v: round(255 * (1 - (1 - darkest) * v / 255)))
    out = ImageChops.multiply(image, ramp)
    out.info["dpi"] = image.info.get("dpi", (300, 300))
    return out


def scanned_page(lines: Sequence[str] = DEED_LINES, *, dpi: int = 300, seed: int = 5, **kw) -> Page:
    page = render_page(lines, dpi=dpi, **kw)
    return Page(degrade(page.image, seed=seed), page.text)


def scanned_document(
    n_pages: int,
    *,
    dpi: int = 300,
    lines_per_page: int = 36,
    seed: int = 0,
    skew: tuple[float, float] = (1.0, 3.0),
) -> list[Page]:
    """Full A4 pages of shuffled deed clauses, each skewed (``skew`` degrees, either way)
    and degraded."""
    rng = random.Random(seed)
    pool = [*DEED_LINES, *ANNEX_LINES, *CLAUSE_LINES]
    pages = []
    for number in range(n_pages):
        lines = rng.sample(pool, min(lines_per_page, len(pool)))
        page = render_page(lines, dpi=dpi, height_in=11.69)
        angle = rng.choice((-1, 1)) * rng.uniform(*skew)
        pages.append(
            Page(degrade(page.image, skew_deg=angle, seed=seed * 1000 + number), page.text)
        )
    return pages


def rotated(page: Page, degrees: int) -> Page:
    """The page turned by 90, 180 or 270 degrees counter-clockwise, as a sideways scan."""
    image = page.image.rotate(degrees, expand=True, fillcolor=255)
    image.info["dpi"] = page.image.info.get("dpi", (300, 300))
    return Page(image, page.text)


# -- encoders ------------------------------------------------------------------------------


def _dpi(image: Image.Image) -> float:
    return float(image.info.get("dpi", (300, 300))[0])


def image_pdf(images: Sequence[Image.Image]) -> bytes:
    """An image-only PDF (no text layer), one image per page at its own resolution."""
    buf = io.BytesIO()
    first, *rest = [im.convert("L") if im.mode not in ("1", "L", "RGB") else im for im in images]
    first.save(buf, format="PDF", save_all=True, append_images=rest, resolution=_dpi(images[0]))
    return buf.getvalue()


def tiff(images: Sequence[Image.Image], *, compression: str = "tiff_lzw") -> bytes:
    buf = io.BytesIO()
    # Copies: Pillow leaves an earlier save's encoder settings on an image (PNG's would
    # break the TIFF encoder).
    first, *rest = [image.copy() for image in images]
    first.save(
        buf,
        format="TIFF",
        save_all=True,
        append_images=rest,
        compression=compression,
        dpi=(_dpi(first), _dpi(first)),
    )
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", dpi=(_dpi(image), _dpi(image)))
    return buf.getvalue()


def jpeg(image: Image.Image, *, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, dpi=(round(_dpi(image)), round(_dpi(image))))
    return buf.getvalue()


def text_pdf(pages: Sequence[Sequence[str]], *, font_pt: float = 11.0) -> bytes:
    """A born-digital PDF: real text in DejaVu (embedded TTF, so accents are real characters)."""
    pdf = FPDF(format="A4")
    pdf.add_font("DejaVu", fname=str(SERIF))
    pdf.set_font("DejaVu", size=font_pt)
    pdf.set_auto_page_break(False)
    for lines in pages:
        pdf.add_page()
        pdf.set_xy(20, 20)
        for line in lines:
            pdf.cell(0, font_pt * 0.6, line, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def merge_pdfs(parts: Sequence[bytes]) -> bytes:
    writer = PdfWriter()
    for part in parts:
        for page in PdfReader(io.BytesIO(part)).pages:
            writer.add_page(page)
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def invisible_text_pdf(image: Image.Image, hidden_text: str) -> bytes:
    """A scanned page with an invisible text layer (render mode 3), like a copier's OCR."""
    dpi = _dpi(image)
    w_pt, h_pt = image.size[0] * 72 / dpi, image.size[1] * 72 / dpi
    pdf = FPDF(unit="pt", format=(w_pt, h_pt))
    pdf.add_font("DejaVu", fname=str(SANS))
    pdf.set_auto_page_break(False)
    pdf.add_page()
    pdf.image(image, x=0, y=0, w=w_pt, h=h_pt)
    pdf.set_font("DejaVu", size=10)
    pdf.text_mode = "INVISIBLE"
    for i, line in enumerate(hidden_text.splitlines()):
        pdf.text(40, 60 + 14 * i, line)
    return bytes(pdf.output())


# -- bad inputs ----------------------------------------------------------------------------


def encrypted_pdf(password: str = "s3creta") -> bytes:
    writer = PdfWriter(clone_from=io.BytesIO(text_pdf([DEED_LINES[:4]])))
    writer.encrypt(user_password=password, owner_password="owner", algorithm="AES-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def permissions_only_pdf() -> bytes:
    """Encrypted with an empty user password (restrictions only): must open without one."""
    writer = PdfWriter(clone_from=io.BytesIO(text_pdf([DEED_LINES[:4]])))
    writer.encrypt(user_password="", owner_password="owner", algorithm="AES-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def zero_page_pdf() -> bytes:
    buf = io.BytesIO()
    PdfWriter().write(buf)
    return buf.getvalue()


def huge_page_pdf(inches: float = 200.0) -> bytes:
    """A page of inches x inches with a little text: 60 000 x 60 000 px at 300 dpi uncapped."""
    pt = inches * 72
    pdf = FPDF(unit="pt", format=(pt, pt))
    pdf.add_font("DejaVu", fname=str(SANS))
    pdf.set_auto_page_break(False)
    pdf.add_page()
    pdf.set_font("DejaVu", size=600)
    pdf.text(pt * 0.1, pt * 0.3, "TASACIÓN")
    return bytes(pdf.output())


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header claims width x height 1-bit pixels (10^10 by default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = compressor.compress(row * 64) + compressor.flush()  # only the first rows exist
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def cmyk_jpeg(lines: Sequence[str] = DEED_LINES[:6], dpi: int = 200) -> tuple[bytes, str]:
    page = render_page(lines, dpi=dpi)
    buf = io.BytesIO()
    page.image.convert("CMYK").save(buf, format="JPEG", quality=90, dpi=(dpi, dpi))
    return buf.getvalue(), page.text


def png_16bit(lines: Sequence[str] = DEED_LINES[:6], dpi: int = 200) -> tuple[bytes, str]:
    page = render_page(lines, dpi=dpi)
    wide = page.image.point(lambda v: v * 257, mode="I").convert("I;16")
    buf = io.BytesIO()
    wide.save(buf, format="PNG", dpi=(dpi, dpi))
    return buf.getvalue(), page.text


def g4_tiff(
    lines: Sequence[str] = DEED_LINES[:6], dpi: int = 200, frames: int = 2
) -> tuple[bytes, str]:
    """CCITT Group 4 bilevel TIFF, as fax and many document scanners produce."""
    page = render_page(lines, dpi=dpi)
    bilevel = page.image.point(lambda v: 255 if v > 128 else 0).convert("1")
    return tiff([bilevel] * frames, compression="group4"), page.text


def _ink_bitmap(image: Image.Image) -> Image.Image:
    """Mode "1" with ink as 1 bits (CCITT and JBIG2 code 1 as black)."""
    return image.point(lambda v: 255 if v < 128 else 0).convert("1")


def _g4_strip(bitmap: Image.Image) -> bytes:
    """CCITT G4 (T.6) data for a mode "1" image, as one strip, from Pillow's TIFF encoder."""
    buf = io.BytesIO()
    bitmap.save(buf, format="TIFF", compression="group4", tiffinfo={278: bitmap.size[1]})
    data = buf.getvalue()
    parsed = Image.open(io.BytesIO(data))
    (offset,), (count,) = parsed.tag_v2[273], parsed.tag_v2[279]
    return data[offset : offset + count]


def pdf_with_image(width: int, height: int, dpi: float, image_dict: str, stream: bytes) -> bytes:
    """A one-page PDF, written by hand, whose page is one image XObject filling it."""
    w_pt, h_pt = width * 72 / dpi, height * 72 / dpi
    content = f"q {w_pt:.2f} 0 0 {h_pt:.2f} 0 0 cm /Im0 Do Q".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w_pt:.2f} {h_pt:.2f}] "
            "/Resources << /XObject << /Im0 4 0 R >> >> /Contents 5 0 R >>"
        ).encode(),
        (
            f"<< /Type /XObject /Subtype /Image /Width {width} /Height {height} "
            f"{image_dict} /Length {len(stream)} >>\nstream\n"
        ).encode()
        + stream
        + b"\nendstream",
        f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out.getvalue()


def jbig2_pdf(lines: Sequence[str] = DEED_LINES[:6], dpi: int = 200) -> tuple[bytes, str]:
    """A scanned page stored as JBIG2 (embedded stream: page information, an immediate
    generic region coded with MMR, end of page), as archival scanners write."""
    page = render_page(lines, dpi=dpi)
    bitmap = _ink_bitmap(page.image)
    width, height = bitmap.size

    def segment(number: int, kind: int, data: bytes) -> bytes:
        return struct.pack(">IBBBI", number, kind, 0, 1, len(data)) + data

    page_info = struct.pack(">IIIIBH", width, height, 0, 0, 0, 0)
    region = struct.pack(">IIIIB", width, height, 0, 0, 0) + b"\x01" + _g4_strip(bitmap)
    stream = segment(0, 48, page_info) + segment(1, 38, region) + segment(2, 49, b"")
    image_dict = "/ColorSpace /DeviceGray /BitsPerComponent 1 /Filter /JBIG2Decode"
    return pdf_with_image(width, height, dpi, image_dict, stream), page.text


def ccitt_pdf(lines: Sequence[str] = DEED_LINES[:6], dpi: int = 200) -> tuple[bytes, str]:
    """A scanned page stored as a bilevel image; Pillow writes it /CCITTFaxDecode (G4)."""
    page = render_page(lines, dpi=dpi)
    bilevel = page.image.point(lambda v: 255 if v > 128 else 0).convert("1")
    buf = io.BytesIO()
    bilevel.save(buf, format="PDF", resolution=dpi)
    assert b"/CCITTFaxDecode" in buf.getvalue()
    return buf.getvalue(), page.text


def cmyk_pdf(lines: Sequence[str] = DEED_LINES[:6], dpi: int = 200) -> tuple[bytes, str]:
    """A scanned page stored as a CMYK JPEG; Pillow writes it /DCTDecode /DeviceCMYK."""
    page = render_page(lines, dpi=dpi)
    buf = io.BytesIO()
    page.image.convert("CMYK").save(buf, format="PDF", resolution=dpi)
    assert b"/DeviceCMYK" in buf.getvalue()
    return buf.getvalue(), page.text


def tiff_with_bad_frame(images: Sequence[Image.Image], bad: int, compression: int = 34661) -> bytes:
    """A multi-page TIFF whose frame ``bad`` (0-based) claims a compression Pillow lacks
    (34661 is JBIG, the fax standard), so that frame cannot be decoded."""
    data = bytearray(tiff(images, compression="raw"))
    assert data[:4] == b"II*\x00"
    offset = struct.unpack_from("<I", data, 4)[0]
    for _ in range(bad):
        count = struct.unpack_from("<H", data, offset)[0]
        offset = struct.unpack_from("<I", data, offset + 2 + 12 * count)[0]
    count = struct.unpack_from("<H", data, offset)[0]
    for i in range(count):
        entry = offset + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 259:
            struct.pack_into("<H", data, entry + 8, compression)
            return bytes(data)
    raise ValueError("no Compression tag")


@dataclass(frozen=True)
class BadInput:
    name: str
    data: bytes
    claimed_type: str | None
    # What a correct extraction does with it: "fail" (a clear document failure), "text"
    # (some page reads `expect_text`), or "any" (pages or a clear failure: both are right).
    outcome: str
    expect_text: str | None = None
    failure_contains: str | None = None


MALFORMED_NAMES = (
    "encrypted.pdf",
    "permissions-only.pdf",
    "truncated.pdf",
    "header-only.pdf",
    "garbage.pdf",
    "empty-file.pdf",
    "zero-pages.pdf",
    "bomb.png",
    "g4.tiff",
    "cmyk.jpg",
    "16bit.png",
    "huge-page.pdf",
    "png-named.pdf",
    "pdf-named.jpg",
    "truncated.png",
)


def malformed_corpus(*, small_dpi: int = 150) -> list[BadInput]:
    """The bad inputs named in ``MALFORMED_NAMES``, in that order."""
    good_pdf = text_pdf([DEED_LINES[:4]])
    small = scanned_page(DEED_LINES[:5], dpi=small_dpi).image
    scans = image_pdf([small, scanned_page(ANNEX_LINES[:3], dpi=small_dpi).image])
    cmyk, _ = cmyk_jpeg(dpi=small_dpi)
    wide, _ = png_16bit(dpi=small_dpi)
    g4, _ = g4_tiff(dpi=small_dpi)
    return [
        BadInput(
            "encrypted.pdf",
            encrypted_pdf(),
            "application/pdf",
            "fail",
            failure_contains="encrypted",
        ),
        BadInput(
            "permissions-only.pdf", permissions_only_pdf(), "application/pdf", "text", "PRÉSTAMO"
        ),
        BadInput(
            "truncated.pdf", scans[: len(scans) * 3 // 4], "application/pdf", "text", "PRÉSTAMO"
        ),
        BadInput(
            "header-only.pdf",
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
            "application/pdf",
            "fail",
            failure_contains="malformed",
        ),
        BadInput(
            "garbage.pdf",
            random.Random(1).randbytes(4096),
            "application/pdf",
            "fail",
            failure_contains="unsupported",
        ),
        BadInput("empty-file.pdf", b"", "application/pdf", "fail", failure_contains="empty"),
        BadInput(
            "zero-pages.pdf",
            zero_page_pdf(),
            "application/pdf",
            "fail",
            failure_contains="no pages",
        ),
        BadInput(
            "bomb.png", png_bomb(), "image/png", "fail", failure_contains="decompression bomb"
        ),
        BadInput("g4.tiff", g4, "image/tiff", "text", "PRÉSTAMO"),
        BadInput("cmyk.jpg", cmyk, "image/jpeg", "text", "PRÉSTAMO"),
        BadInput("16bit.png", wide, "image/png", "text", "PRÉSTAMO"),
        BadInput("huge-page.pdf", huge_page_pdf(), "application/pdf", "text", "TASACIÓN"),
        BadInput("png-named.pdf", png(small), "application/pdf", "text", "PRÉSTAMO"),
        BadInput("pdf-named.jpg", good_pdf, "image/jpeg", "text", "PRÉSTAMO"),
        BadInput("truncated.png", png(small)[: len(png(small)) * 2 // 3], "image/png", "any"),
    ]


# -- accuracy ------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return " ".join(text.split())


def levenshtein(a: str, b: str, limit: int | None = None) -> int:
    """Edit distance, computed in a band of width ``limit`` (beyond it: ``limit + 1``)."""
    if limit is None:
        limit = max(len(a), len(b))
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    over = limit + 1
    prev = [j if j <= limit else over for j in range(len(b) + 1)]
    for i in range(1, len(a) + 1):
        lo, hi = max(1, i - limit), min(len(b), i + limit)
        cur = [over] * (len(b) + 1)
        cur[0] = i if i <= limit else over
        ca = a[i - 1]
        for j in range(lo, hi + 1):
            best = prev[j - 1] + (ca != b[j - 1])
            if prev[j] + 1 < best:
                best = prev[j] + 1
            if cur[j - 1] + 1 < best:
                best = cur[j - 1] + 1
            cur[j] = best
        if min(cur[lo - 1 : hi + 1]) > limit:
            return over
        prev = cur
    return min(prev[len(b)], over)


def char_accuracy(got: str, want: str) -> float:
    """1 - normalised Levenshtein distance, whitespace collapsed. Below 0.7 it is a bound."""
    got, want = normalise(got), normalise(want)
    limit = max(1, int(0.3 * max(len(want), 1)))
    return max(0.0, 1 - levenshtein(got, want, limit) / max(len(want), 1))
