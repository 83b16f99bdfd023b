"""Media-type sniffing from magic bytes: the only source of truth for what an upload is.

Headers and file names lie (DESIGN.md: "sniffed from the bytes, never trusted from the
header"), and sniffing here means the decoder that runs is the one for the format we
named, so Pillow never probes a file with every plugin it has. Anything we cannot
analyse is refused with a 415 that says what the bytes look like, so a caller who sent
a base64 string, a data: URL or a ZIP learns that from the message.
"""

from __future__ import annotations

from .errors import UnsupportedMediaType

# The formats prepare() accepts, in the order the error message lists them.
SUPPORTED_FORMATS: tuple[str, ...] = ("jpeg", "png", "webp", "gif", "bmp", "tiff", "heic", "heif", "pdf")

# Pillow's plugin name for each raster format: Image.open(..., formats=[...]) then runs
# only the decoder we sniffed, never a guess.
PIL_FORMATS: dict[str, str] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
    "heic": "HEIF",
    "heif": "HEIF",
}

# ISO-BMFF brands (the 'ftyp' box): HEVC-coded HEIF is "heic"; other HEIF is "heif".
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"mif2"}
_AVIF_BRANDS = {b"avif", b"avis"}
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def sniff(data: bytes) -> str:
    """The format of `data` from its magic bytes: one of SUPPORTED_FORMATS.

    Raises UnsupportedMediaType naming what was found ("text/plain", "zip", "unknown", ...).
    """
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[4:8] == b"ftyp":
        brands = _ftyp_brands(data)
        if brands & _HEIC_BRANDS and not brands & _AVIF_BRANDS:
            return "heic"
        if brands & _HEIF_BRANDS and not brands & _AVIF_BRANDS:
            return "heif"
    if b"%PDF-" in data[:1024]:  # PDF readers accept up to 1 KiB of junk before the header
        return "pdf"
    found = describe_unknown(data)
    raise UnsupportedMediaType(
        f"unsupported media type: the data looks like {found}; send JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF or PDF",
        details={"found": found, "supported": list(SUPPORTED_FORMATS)},
    )


def _ftyp_brands(data: bytes) -> set[bytes]:
    """Major and compatible brands of an ISO-BMFF 'ftyp' box (the first box of HEIF/AVIF/MP4)."""
    size = int.from_bytes(data[:4], "big")
    size = max(16, min(size, len(data), 256))
    brands = {data[8:12]}
    brands.update(data[i : i + 4] for i in range(16, size - 3, 4))
    return brands


def describe_unknown(data: bytes) -> str:
    """A short name for bytes we do not accept, for the 415 message; "unknown" when unsure."""
    if not data:
        return "empty"
    head = data[:512]
    signatures: tuple[tuple[bytes, str], ...] = (
        (b"PK\x03\x04", "zip"),
        (b"\x1f\x8b", "gzip"),
        (b"7z\xbc\xaf\x27\x1c", "7z"),
        (b"Rar!", "rar"),
        (b"8BPS", "image/vnd.adobe.photoshop"),
        (b"\x00\x00\x00\x0cjP  ", "image/jp2"),
        (b"\xff\x4f\xff\x51", "image/jp2"),
        (b"\x00\x00\x01\x00", "image/x-icon"),
        (b"\x76\x2f\x31\x01", "image/x-exr"),
        (b"\xd0\xcf\x11\xe0", "application/x-ole-storage"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        brands = _ftyp_brands(data)
        if brands & _AVIF_BRANDS:
            return "image/avif"
        return f"iso-bmff ({data[8:12].decode('latin-1').strip()})"
    text = _as_text(head)
    if text is None:
        return "unknown"
    low = text.lstrip().lower()
    if low.startswith("data:"):
        return "text/plain (a data: URL; send the decoded bytes)"
    if low.startswith(("<svg", "<?xml")) and "<svg" in low:
        return "image/svg+xml"
    if low.startswith(("<!doctype html", "<html")):
        return "text/html"
    if low.startswith(("{", "[")):
        return "application/json"
    if low.startswith(("/9j/", "ivborw0kggo", "r0lgod", "uklgr", "jvberi0")):
        return "text/plain (base64; send the decoded bytes)"
    return "text/plain"


def _as_text(head: bytes) -> str | None:
    """The head as text if it is mostly printable UTF-8 (a cut multi-byte character at the end is fine)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:
            return None
        text = head[: e.start].decode("utf-8")
    if not text:
        return None
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return text if printable / len(text) > 0.95 else None
