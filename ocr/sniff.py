"""What the bytes are, from their first bytes: never from a filename or a claimed type."""

from __future__ import annotations

PDF = "application/pdf"
PNG = "image/png"
JPEG = "image/jpeg"
TIFF = "image/tiff"
GIF = "image/gif"
BMP = "image/bmp"
WEBP = "image/webp"
JP2 = "image/jp2"
JBIG2 = "image/x-jbig2"

IMAGE_TYPES = frozenset({PNG, JPEG, TIFF, GIF, BMP, WEBP, JP2})
SUPPORTED_TYPES = IMAGE_TYPES | {PDF}

# Pillow format names for the image types we accept; nothing else is tried.
PILLOW_FORMATS = {
    PNG: "PNG",
    JPEG: "JPEG",
    TIFF: "TIFF",
    GIF: "GIF",
    BMP: "BMP",
    WEBP: "WEBP",
    JP2: "JPEG2000",
}

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", PNG),
    (b"\xff\xd8\xff", JPEG),
    (b"II*\x00", TIFF),
    (b"MM\x00*", TIFF),
    (b"II+\x00", TIFF),  # BigTIFF
    (b"MM\x00+", TIFF),
    (b"GIF87a", GIF),
    (b"GIF89a", GIF),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", JP2),
    (b"\xff\x4f\xff\x51", JP2),  # raw JPEG 2000 codestream
    (b"\x97JB2\r\n\x1a\n", JBIG2),
)


def sniff(data: bytes) -> str | None:
    """The media type of ``data``, or None when it is nothing we know.

    A PDF header may follow up to 1 KiB of junk (readers accept that, and so do we).
    JBIG2 files are recognised so the failure can name them; only JBIG2 inside a PDF is
    supported (PDFium decodes it).
    """
    for magic, media_type in _SIGNATURES:
        if data.startswith(magic):
            return media_type
    if data[:2] == b"BM" and len(data) >= 26:
        return BMP
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    if b"%PDF-" in data[:1024]:
        return PDF
    return None


def describe(data: bytes) -> str:
    """A short printable description of the first bytes, for failure reasons."""
    head = data[:8]
    return "starts with " + (repr(head) if head else "nothing")
