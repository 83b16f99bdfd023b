"""PDF pages as images, via pypdfium2 (PDFium, no external tools).

Pages are rendered straight to the size the model will look at (not at a fixed 300 dpi
and then shrunk), and a horizontal band of a page can be rendered on its own, so strips
never need the whole page in memory at strip resolution. PDFium is not thread-safe and
prepare() runs in worker threads, so every PDFium call in the process goes through
PDFIUM_LOCK: nothing unbounded may run while it is held (pages are measured and refused
before anything is planned or rendered).

Errors say what is wrong in our words; PDFium's own messages never reach a caller.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequest

if TYPE_CHECKING:
    from PIL import Image

# PDFium must not be entered from two threads at once (pypdfium2: "Incompatibility with threading").
PDFIUM_LOCK = threading.RLock()

# A page is measured at this nominal resolution: its "original" width and height are the page
# at 300 dpi, and nothing is rendered finer than that (it only matters for tiny pages).
PDF_DPI = 300
POINTS_PER_INCH = 72

# The largest page PDF defines: 14,400 units (200 inches) a side (ISO 32000-1:2008, Annex C.2,
# "Architectural limits"). Anything larger is not a page a viewer shows.
MAX_PAGE_POINTS = 14_400

# PDFium's FPDF_GetLastError codes (fpdfview.h) and what each means, in our words.
_ERR_FILE, _ERR_FORMAT, _ERR_PASSWORD, _ERR_SECURITY, _ERR_PAGE = 2, 3, 4, 5, 6
_REASONS = {
    _ERR_FILE: "the file could not be read",
    _ERR_FORMAT: "it is damaged or not a PDF",
    _ERR_PAGE: "the page is missing or damaged",
}


@contextmanager
def open_pdf(data: bytes) -> Iterator[Any]:
    """An open PdfDocument (forms initialised) under PDFIUM_LOCK; errors become 400s that say why."""
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        try:
            doc = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as e:
            code = getattr(e, "err_code", None)
            if code == _ERR_PASSWORD:
                raise InvalidRequest(
                    "PDF is encrypted: it needs a password to open; send an unencrypted copy",
                    details={"format": "pdf", "reason": "encrypted"},
                ) from None
            if code == _ERR_SECURITY:
                raise InvalidRequest(
                    "PDF is encrypted with an unsupported security handler",
                    details={"format": "pdf", "reason": "encrypted"},
                ) from None
            raise InvalidRequest(
                f"could not read PDF: {_reason(e)}", details={"format": "pdf", "reason": "broken"}
            ) from None
        try:
            try:
                doc.init_forms()  # so filled-in form fields are drawn like a viewer draws them
            except pdfium.PdfiumError:
                pass
            yield doc
        finally:
            doc.close()


def _reason(e: Exception) -> str:
    """Why PDFium failed, from its error code (its message text is never passed on)."""
    return _REASONS.get(getattr(e, "err_code", None), "it is damaged or uses a feature that cannot be read")


@contextmanager
def load_page(doc: Any, index: int) -> Iterator[Any]:
    """Page `index` (0-based), closed afterwards; a page PDFium cannot load is a 400."""
    import pypdfium2 as pdfium

    try:
        page = doc[index]
    except (pdfium.PdfiumError, IndexError) as e:
        raise InvalidRequest(
            f"could not read PDF page {index + 1}: {_reason(e)}", details={"page": index + 1}
        ) from None
    try:
        yield page
    finally:
        page.close()


def page_pixels(page: Any) -> tuple[int, int]:
    """The page's size in pixels at PDF_DPI, after its /Rotate (what a viewer shows)."""
    w_pt, h_pt = page.get_size()
    if not (w_pt > 0 and h_pt > 0):
        raise InvalidRequest("PDF page has no area", details={})
    if not (math.isfinite(w_pt) and math.isfinite(h_pt)) or max(w_pt, h_pt) > MAX_PAGE_POINTS:
        raise InvalidRequest(
            f"PDF page is larger than the {MAX_PAGE_POINTS:,} points (200 inches) a side that PDF allows",
            details={"max_page_points": MAX_PAGE_POINTS},
        )
    scale = PDF_DPI / POINTS_PER_INCH
    return max(1, round(w_pt * scale)), max(1, round(h_pt * scale))


def render(page: Any, size: tuple[int, int], band: tuple[int, int] | None = None) -> Image.Image:
    """Render the page scaled to exactly `size` (w, h) pixels, or only rows band=(top, bottom) of it.

    PDFium draws the page into a bitmap at an offset, so a band costs only its own pixels.
    White background; annotations and form fields drawn; RGB out.
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    width, height = size
    top, bottom = band if band is not None else (0, height)
    rows = bottom - top
    bitmap = pdfium.PdfBitmap.new_native(width, rows, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
    bitmap.fill_rect((255, 255, 255, 255), 0, 0, width, rows)
    flags = pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER
    pdfium_c.FPDF_RenderPageBitmap(bitmap, page, 0, -top, width, height, 0, flags)
    formenv = getattr(page, "formenv", None)
    if formenv:
        pdfium_c.FPDF_FFLDraw(formenv, bitmap, page, 0, -top, width, height, 0, flags)
    return bitmap.to_pil()
