"""The image optimiser: sniff, decode once, orient, scale to exactly what the model will look at.

A vision model never looks at more than its detail level allows (DESIGN.md, "Image token
formulas"): low sees 512 px, high sees at most 2048 px with the short side at 768, patch
models see at most 1536 patches. Sending more buys nothing and costs upload time, so
`prepare` sends exactly `shared.tokens.model_view_size`, as JPEG quality 85 with no
metadata at all (no EXIF, GPS, XMP, ICC or comments).

Speed comes from decoding as little as possible: JPEGs are decoded at a reduced DCT scale
(`Image.draft`, never below the target), PDF pages are rendered at the target size,
everything is decoded once, and EXIF orientation is applied after the downscale, where a
transpose is cheap. Decompression bombs are refused from the header before any pixel is
decoded. Figures: docs/performance.md.

Decisions callers can rely on:
- What to do is given as values (`ImagePolicy`, from the task's `shared.tasks.TaskSpec`); this
  module never looks at a task's name. "auto" detail is the policy's: high, low, or by size (low
  when both sides are under 768 px, else high; `choose_detail`).
- Multi-page inputs (PDF, multi-page TIFF, animated GIF/WebP) give one image per page/frame when
  the policy expands that format, else the first (selected) page. `pages="1-3,5"` selects
  (1-based). More pages than `limits.max_pages` without a selection that fits is a 400 naming
  the limit (nothing is dropped silently).
- An encrypted PDF (one that needs a password) is a 400 "PDF is encrypted"; a broken one a
  400 "could not read PDF: ...". Undecodable images are a 400 "could not decode image: ...".
  Messages are ours: decoder and PDFium texts never reach the caller (they may echo input).
- The work is budgeted before it is done (`ImageLimits`, `Budget`; README "Settings"): bytes and
  pixels from the header; one image's decoded bytes (by its mode: 16-bit and alpha cost more);
  the request's decoded bytes, including every frame an animated GIF/WebP composites to reach
  a selected one; frames counted with a cap; images sent (pages x frames x strips); a sent side
  under `min_side` (a 20000x2 strip) is refused rather than sent as 512x1. Each refusal is a
  4xx naming the setting that changes it.
- A truncated JPEG is decoded as far as its data goes (the missing rows are grey, as libjpeg
  fills them) when at least half of it is there, else a 400; done locally, without Pillow's
  global LOAD_TRUNCATED_IMAGES. The corpus's truncated photo decodes (its last 24 of 2736 rows
  are grey).
- `strips=True`: dense pages go as overlapping strips the model sees unscaled (`plan_strips`);
  the token cost is known up front (`estimate_strips`).

`prepare` is synchronous and CPU-bound: callers run it in a worker thread.
"""

from __future__ import annotations

import base64
import io
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from . import tokens
from .errors import ImageTooLarge, InvalidRequest, TooManyPixels, VlmError
from .frame_count import gif_frames, tiff_frames
from .image_formats import PIL_FORMATS, SUPPORTED_FORMATS, sniff
from .image_policy import DEFAULT_POLICY, AutoDetail, ImagePolicy
from .settings import DETAILS, from_settings, mirror

if TYPE_CHECKING:
    from .catalog import ImageTokens
    from .settings import Settings

__all__ = [
    "SUPPORTED_FORMATS",
    "Budget",
    "ImageFacts",
    "ImageLimits",
    "ImagePolicy",
    "PreparedImage",
    "StripPlan",
    "choose_detail",
    "estimate_strips",
    "parse_pages",
    "plan_strips",
    "prepare",
    "sniff",
]

JPEG_QUALITY = 85
MIME = "image/jpeg"

# "auto" by size: an image under this on both sides goes low (the seed design's
# rule; it also covers every image that already fits the 512 px low view, where low sees all).
SMALL_IMAGE_SIDE = 768

# Resampling after the DCT-scaled decode (measured in docs/performance.md): documents get
# Lanczos for legibility; photos get Hamming, which costs what bilinear costs but keeps
# more detail, because on 8-12 MP photos the resize otherwise costs more than the decode.
DOCUMENT_RESAMPLE = Image.Resampling.LANCZOS
PHOTO_RESAMPLE = Image.Resampling.HAMMING
_RESAMPLE = {"document": DOCUMENT_RESAMPLE, "photo": PHOTO_RESAMPLE}
# Non-JPEG inputs cannot be decoded smaller: Pillow's reducing_gap first shrinks them by an
# integer factor (box filter) so that the filtered step still scales by at least 1.5x. Against
# plain Lanczos that is 48-50 dB PSNR and the same OCR word recall, in under half the time.
REDUCING_GAP = 1.5

# Strips (prepare(strips=True)): a dense page is scaled so text is this wide in pixels and cut
# into overlapping horizontal strips that the model sees without downscaling any of them.
STRIP_TEXT_WIDTH = 1536
STRIP_NARROWER = (1024, 768)  # fallbacks when a very tall page would need too many strips
STRIP_OVERLAP = 0.10
MAX_STRIPS_PER_PAGE = 12

# A truncated JPEG is decoded as far as its data goes; refuse it when less than this is there.
MIN_TRUNCATED_FRACTION = 0.5

_MULTI_FRAME_FORMATS = ("tiff", "gif", "webp")
_DRAFT_FORMATS = ("jpeg", "heic", "heif")
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_PAGES_PART = re.compile(r"^\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?$")


MIB = 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """Input limits, checked before the work they bound (each is a setting, named in its error)."""

    max_bytes: int = mirror("max_image_bytes")  # MAX_IMAGE_BYTES
    max_pixels: int = mirror("max_image_pixels")  # MAX_IMAGE_PIXELS
    max_pages: int = mirror("max_pdf_pages")  # MAX_PDF_PAGES: pages/frames sent from one input
    max_decoded_bytes: int = mirror("max_decoded_bytes")  # one image in memory (decoded + full-size copy)
    max_request_decoded_bytes: int = mirror("max_request_decoded_bytes")  # decoding work per request
    max_frames: int = mirror("max_frames")  # frames counted in a multi-frame file
    min_side: int = mirror("min_image_side")  # smallest side an image is sent with
    max_sent_images: int = mirror("max_sent_images")  # pages x frames x strips sent per request

    @classmethod
    def from_settings(cls, s: Settings) -> ImageLimits:
        return from_settings(cls, s)


class Budget:
    """What one request has spent so far, across all its inputs; every charge is made before the work.

    One request prepares its inputs one after another, so this needs no lock.
    """

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.decoded_bytes = 0
        self.sent_images = 0

    def decode(self, nbytes: int, what: str, fmt: str) -> None:
        """Charge decoding `nbytes` (pixels x bytes per pixel) for `what`; refuse if the request would pass its budget."""
        limit = self.limits.max_request_decoded_bytes
        if self.decoded_bytes + nbytes > limit:
            raise TooManyPixels(
                f"{what} would decode {_mib(self.decoded_bytes + nbytes)} in this request; "
                f"the limit is {_mib(limit)} (MAX_REQUEST_DECODED_BYTES)",
                details={"format": fmt, "limit": "MAX_REQUEST_DECODED_BYTES", "max_request_decoded_bytes": limit},
            )
        self.decoded_bytes += nbytes

    def send(self, count: int) -> None:
        """Charge `count` more images to send; refuse past MAX_SENT_IMAGES."""
        limit = self.limits.max_sent_images
        if self.sent_images + count > limit:
            raise InvalidRequest(
                f"this request would send {self.sent_images + count} images (pages, frames and strips); "
                f"at most {limit} can be sent in one request (MAX_SENT_IMAGES): select fewer pages or turn strips off",
                details={"limit": "MAX_SENT_IMAGES", "max_sent_images": limit},
            )
        self.sent_images += count


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:,.0f} MiB"


@dataclass(frozen=True)
class ImageFacts:
    """What was received and what was sent, for one page/frame/strip (the response's `images`)."""

    format: str  # sniffed: jpeg png webp gif bmp tiff heic heif pdf
    width: int  # original, after EXIF orientation; a PDF page at 300 dpi
    height: int
    sent_width: int
    sent_height: int
    bytes_in: int  # the whole input
    bytes_sent: int  # this image's JPEG
    detail: str  # "low" or "high"
    estimated_tokens: int
    page: int | None = None  # 1-based page/frame of a PDF or multi-page input, else None
    strip: int | None = None  # 1-based strip of the page in strips mode (when cut in more than one)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "sent_width": self.sent_width,
            "sent_height": self.sent_height,
            "bytes_in": self.bytes_in,
            "bytes_sent": self.bytes_sent,
            "detail": self.detail,
            "estimated_tokens": self.estimated_tokens,
        }
        if self.page is not None:
            d["page"] = self.page
        if self.strip is not None:
            d["strip"] = self.strip
        return d


@dataclass(frozen=True)
class PreparedImage:
    """One image as it goes to the model: JPEG bytes and the facts about it."""

    data: bytes
    facts: ImageFacts
    mime: str = MIME

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class StripPlan:
    """How a page is cut into strips: its scaled size and the rows of each strip."""

    width: int  # the width the page is scaled to (every strip's width)
    height: int  # the page's height at that width
    bands: tuple[tuple[int, int], ...]  # (top, bottom) rows of each strip; neighbours overlap
    tokens: int  # estimated tokens of all strips together

    @property
    def count(self) -> int:
        return len(self.bands)


# --- detail ------------------------------------------------------------------------


def choose_detail(auto: AutoDetail, width: int, height: int, requested: str = "auto") -> str:
    """Resolve the detail level for one image of this (upright) size: "low" or "high".

    An explicit low/high is honoured. "auto" is the task's policy: "high" (documents need every
    glyph), "low" (skimming many images), or "by_size": an image under 768 px on both sides goes
    low (what low shows is close to all there is), a larger one high. The same for every model.
    """
    _check_detail(requested)
    if requested != "auto":
        return requested
    if auto != "by_size":
        return auto
    if width < SMALL_IMAGE_SIDE and height < SMALL_IMAGE_SIDE:
        return "low"
    return "high"


def _check_detail(requested: str) -> None:
    if requested not in DETAILS:
        raise InvalidRequest(f"detail must be one of low, high, auto; got {requested!r}", details={"detail": requested})


# --- strips ------------------------------------------------------------------------


def plan_strips(width: int, height: int, model: ImageTokens | str | None = None) -> StripPlan:
    """Cut a page of this upright size into strips the model sees at full resolution.

    The page is scaled (never up) so it is STRIP_TEXT_WIDTH px wide, about 186 dpi on A4,
    where the local OCR reads every word the 300 dpi render gives (768 px, the single-image
    high view, loses a few percent: docs/performance.md). Each strip stays within what
    high detail keeps unscaled (short side <= 768, long side <= 2048; patch models: <= 1536
    patches), neighbours overlap by 10% so no line is only ever seen cut in half, and the
    strip height is the one that costs fewest tokens. A page too tall for
    MAX_STRIPS_PER_PAGE strips is scaled narrower; beyond that it is refused. The strip count
    is computed before any band is listed, so a page 2^31 points tall costs a few divisions.
    """
    if width < 1 or height < 1:
        raise InvalidRequest("image has no area", details={"width": width, "height": height})
    fam = tokens.family_for(model)
    widths = sorted({min(width, w) for w in (STRIP_TEXT_WIDTH, *STRIP_NARROWER)}, reverse=True)
    for strip_width in widths:
        page_height = max(1, round(height * strip_width / width))
        best: StripPlan | None = None
        for strip_height in _strip_heights(strip_width, fam):
            if _band_count(page_height, strip_height) > MAX_STRIPS_PER_PAGE:
                continue
            bands = _bands(page_height, strip_height)
            cost = sum(tokens.image_tokens(strip_width, b - t, "high", model) for t, b in bands)
            plan = StripPlan(strip_width, page_height, bands, cost)
            if best is None or (plan.tokens, plan.count) < (best.tokens, best.count):
                best = plan
        if best is not None and best.count <= MAX_STRIPS_PER_PAGE:
            return best
    raise InvalidRequest(
        f"page is too tall for strips: {width}x{height} would need more than {MAX_STRIPS_PER_PAGE} strips",
        details={"width": width, "height": height, "max_strips": MAX_STRIPS_PER_PAGE},
    )


def estimate_strips(width: int, height: int, model: ImageTokens | str | None = None) -> tuple[int, int]:
    """(number of strips, total estimated tokens) for a page of this upright size: the cost up front."""
    plan = plan_strips(width, height, model)
    return plan.count, plan.tokens


def _strip_heights(strip_width: int, fam: ImageTokens) -> tuple[int, ...]:
    """Strip heights the model keeps unscaled at this width (catalog geometry); the planner picks the cheapest."""
    if fam.kind == "patch":
        patch, cap = fam.patch_px or 1, fam.max_patches or 1
        cols = math.ceil(strip_width / patch)
        return (max(1, cap // cols) * patch,)
    fit, short, tile = fam.fit_px or 1, fam.short_side_px or 1, fam.tile_px or 1
    if strip_width <= short:  # narrow page: tall strips, the width is the short side
        return (fit, 3 * tile, 2 * tile)
    return (short, tile)  # wide strips: the height is the short side


def _band_count(total: int, strip_height: int) -> int:
    """How many strips `_bands` cuts `total` rows into (arithmetic only: nothing is listed)."""
    if total <= strip_height:
        return 1
    overlap = round(strip_height * STRIP_OVERLAP)
    return math.ceil((total - strip_height) / (strip_height - overlap)) + 1


def _bands(total: int, strip_height: int) -> tuple[tuple[int, int], ...]:
    """Equal-height rows covering `total`, each pair overlapping by at least STRIP_OVERLAP."""
    if total <= strip_height:
        return ((0, total),)
    overlap = round(strip_height * STRIP_OVERLAP)
    n = _band_count(total, strip_height)
    h = math.ceil((total + (n - 1) * overlap) / n)
    step = (total - h) / (n - 1)
    return tuple((round(i * step), round(i * step) + h) for i in range(n))


# --- pages -------------------------------------------------------------------------


def parse_pages(spec: str, count: int) -> list[int]:
    """1-based pages from a selection like "1-3,5": sorted, unique, each within 1..count."""
    chosen: set[int] = set()
    for first, last in _page_ranges(spec):
        if last > count:
            raise InvalidRequest(
                f"pages={_quote(spec)} asks for page {last}, but the input has {count} page(s)",
                details={"pages": _clip(spec), "page_count": count},
            )
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def _page_ranges(spec: str) -> list[tuple[int, int]]:
    """Syntax check of a page selection (done before anything is decoded)."""
    ranges = []
    parts = spec.split(",") if len(spec) <= 1000 else []
    for part in parts:
        m = _PAGES_PART.match(part)
        if not m:
            break
        first, last = int(m[1]), int(m[2] or m[1])
        if first < 1 or last < first:
            break
        ranges.append((first, last))
    else:
        if ranges:
            return ranges
    raise InvalidRequest(
        f"pages must be 1-based page numbers and ranges like '1-3,5', got {_quote(spec)}",
        details={"pages": _clip(spec)},
    )


def _clip(spec: str, limit: int = 40) -> str:
    """The caller's text as it may appear in an error: cut short (never echoed unbounded)."""
    return spec if len(spec) <= limit else spec[:limit] + "..."


def _quote(spec: str) -> str:
    return repr(_clip(spec))


def _select(count: int, pages: str | None, expand: bool, limits: ImageLimits, what: str) -> list[int]:
    """0-based indices to send: all (or the selected) pages when expanding, else the first one."""
    chosen = parse_pages(pages, count) if pages else None
    if not expand:
        return [(chosen[0] if chosen else 1) - 1]
    if chosen is None:
        if count > limits.max_pages:
            raise InvalidRequest(
                f"the {what} has {count} pages; at most {limits.max_pages} can be sent in one request: "
                f"choose them with pages, e.g. pages=1-{limits.max_pages}",
                details={"page_count": count, "max_pages": limits.max_pages},
            )
        chosen = list(range(1, count + 1))
    elif len(chosen) > limits.max_pages:
        raise InvalidRequest(
            f"pages={_quote(pages)} selects {len(chosen)} pages; at most {limits.max_pages} can be sent in one request",
            details={"pages": _clip(pages), "selected": len(chosen), "max_pages": limits.max_pages},
        )
    return [p - 1 for p in chosen]


# --- prepare -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    fmt: str
    policy: ImagePolicy
    detail: str
    model: ImageTokens | str | None
    strips: bool
    bytes_in: int
    limits: ImageLimits
    budget: Budget


@dataclass(frozen=True)
class _Plan:
    detail: str
    size: tuple[int, int]  # upright size the page/frame is scaled to
    bands: tuple[tuple[int, int], ...] | None  # strips: rows of `size`; None: the whole image


def prepare(
    data: bytes,
    *,
    policy: ImagePolicy = DEFAULT_POLICY,
    detail: str = "auto",
    limits: ImageLimits = ImageLimits(),
    model: ImageTokens | str | None = None,
    pages: str | None = None,
    strips: bool = False,
    budget: Budget | None = None,
) -> list[PreparedImage]:
    """Turn one upload into the images to send: one per page/frame (or per strip with strips=True).

    Multi-page inputs (PDF; multi-page TIFF, animated GIF/WebP) give every page, or the pages
    selected with `pages` ("1-3,5"), when `policy` expands that format; otherwise the first
    (selected) page. Raises a VlmError (4xx) for anything it cannot send.
    `budget` carries what earlier inputs of the same request spent (a fresh one when None).
    """
    _check_detail(detail)
    if strips and detail == "low":
        raise InvalidRequest("strips are sent at high detail; use detail=high or auto with strips", details={})
    if pages is not None and not pages.strip():
        pages = None
    if pages is not None:
        _page_ranges(pages)
    if not data:
        raise InvalidRequest("the image is empty (0 bytes)", details={"bytes": 0})
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"image is {len(data):,} bytes; the limit is {limits.max_bytes:,}",
            details={"bytes": len(data), "max_bytes": limits.max_bytes},
        )
    fmt = sniff(data)
    job = _Job(fmt, policy, detail, model, strips, len(data), limits, budget or Budget(limits))
    if fmt == "pdf":
        return _prepare_pdf(data, job, limits, pages)
    return _prepare_raster(data, job, limits, pages)


def _plan(job: _Job, width: int, height: int) -> _Plan:
    """What to send for an upright image of this size; refuses one whose sent side would be under min_side."""
    if job.strips:
        sp = plan_strips(width, height, job.model)
        plan = _Plan("high", (sp.width, sp.height), sp.bands)
        smallest = min(sp.width, min(bottom - top for top, bottom in sp.bands))
    else:
        det = choose_detail(job.policy.auto_detail, width, height, job.detail)
        plan = _Plan(det, tokens.model_view_size(width, height, det, job.model), None)
        smallest = min(plan.size)
    if smallest < job.limits.min_side:
        raise InvalidRequest(
            f"image is {width}x{height}: too thin to send, it would reach the model {smallest} px wide on one side; "
            f"the minimum is {job.limits.min_side} px (MIN_IMAGE_SIDE): crop or pad it",
            details={
                "format": job.fmt,
                "width": width,
                "height": height,
                "limit": "MIN_IMAGE_SIDE",
                "min_image_side": job.limits.min_side,
            },
        )
    return plan


def _precheck(job: _Job, width: int, height: int) -> None:
    """`_plan`'s refusals before decoding, when EXIF orientation is not known yet: refuse only if both ways fail."""
    try:
        _plan(job, width, height)
    except VlmError as err:
        try:
            _plan(job, height, width)
        except VlmError:
            raise err from None


def _sends(plan: _Plan) -> int:
    return 1 if plan.bands is None else len(plan.bands)


def _emit(im: Image.Image, job: _Job, size: tuple[int, int], plan: _Plan, page: int | None) -> list[PreparedImage]:
    """Encode the scaled, upright image, or each of its strips."""
    if plan.bands is None or len(plan.bands) == 1:
        return [_send(im, job, size, plan.detail, page, None)]
    return [
        _send(im.crop((0, top, im.width, bottom)), job, size, plan.detail, page, n)
        for n, (top, bottom) in enumerate(plan.bands, 1)
    ]


def _send(
    im: Image.Image, job: _Job, size: tuple[int, int], detail: str, page: int | None, strip: int | None
) -> PreparedImage:
    """One JPEG and the facts about it; tokens come from shared.tokens for exactly what is sent."""
    blob = _encode(im)
    facts = ImageFacts(
        format=job.fmt,
        width=size[0],
        height=size[1],
        sent_width=im.width,
        sent_height=im.height,
        bytes_in=job.bytes_in,
        bytes_sent=len(blob),
        detail=detail,
        estimated_tokens=tokens.image_tokens(im.width, im.height, detail, job.model),
        page=page,
        strip=strip,
    )
    return PreparedImage(blob, facts)


def _encode(im: Image.Image) -> bytes:
    """Baseline JPEG, quality 85, and nothing else: info is cleared so no EXIF/XMP/ICC/comment rides along."""
    im.info = {}
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


# --- PDF ---------------------------------------------------------------------------


def _prepare_pdf(data: bytes, job: _Job, limits: ImageLimits, pages: str | None) -> list[PreparedImage]:
    from . import pdf

    out: list[PreparedImage] = []
    with pdf.open_pdf(data) as doc:
        count = len(doc)
        if count < 1:
            raise InvalidRequest("PDF has no pages", details={"format": "pdf"})
        expand = job.policy.expands("pdf")
        for index in _select(count, pages, expand, limits, "PDF"):
            with pdf.load_page(doc, index) as page:
                size = pdf.page_pixels(page)
                plan = _plan(job, *size)
                job.budget.send(_sends(plan))
                rows = plan.size[1] if plan.bands is None else sum(b - t for t, b in plan.bands)
                job.budget.decode(plan.size[0] * rows * _RENDER_BPP, f"rendering PDF page {index + 1}", "pdf")
                if plan.bands is None or len(plan.bands) == 1:
                    out.append(_send(pdf.render(page, plan.size), job, size, plan.detail, index + 1, None))
                    continue
                for n, band in enumerate(plan.bands, 1):  # each strip rendered on its own: bounded memory
                    out.append(_send(pdf.render(page, plan.size, band), job, size, plan.detail, index + 1, n))
    return out


# --- raster ------------------------------------------------------------------------

# PDF pages are rendered into a BGR bitmap (3 bytes a pixel) and copied into an RGB image (4).
_RENDER_BPP = 7
# GIF and WebP frames are composited on the full canvas, RGBA at most.
_CANVAS_BPP = 4
# Frame formats where reaching frame n means decoding every frame before it (TIFF seeks by offset).
_SEQUENTIAL_FORMATS = ("gif", "webp")


def _storage_bpp(mode: str) -> int:
    """Bytes a pixel of this mode takes in Pillow's memory (multi-band modes are stored 4 bytes a pixel)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _working_bpp(mode: str) -> int:
    """Bytes a pixel of the full-size copy `_working_mode` makes before scaling (0: none is made)."""
    if mode in ("RGB", "L", "RGBA", "LA"):
        return 0
    if mode in ("I", "F") or mode.startswith("I;16"):
        return 8  # float copy plus the scaled float result (_to_8bit)
    return 4


def _charge_decode(job: _Job, mode: str, width: int, height: int) -> None:
    """Before decoding a frame: its bytes in memory must fit MAX_DECODED_BYTES, and the request's budget."""
    nbytes = width * height * (_storage_bpp(mode) + _working_bpp(mode))
    limit = job.limits.max_decoded_bytes
    if nbytes > limit:
        raise TooManyPixels(
            f"image is {width}x{height} ({mode}): decoding it takes {_mib(nbytes)} of memory; "
            f"the limit is {_mib(limit)} (MAX_DECODED_BYTES)",
            details={
                "format": job.fmt,
                "width": width,
                "height": height,
                "limit": "MAX_DECODED_BYTES",
                "max_decoded_bytes": limit,
            },
        )
    job.budget.decode(nbytes, "the image", job.fmt)


def _charge_seek(im: Image.Image, index: int, job: _Job) -> None:
    """Before seeking a GIF/WebP: the current frame and every one after it up to `index` is composited."""
    if job.fmt not in _SEQUENTIAL_FORMATS:
        return
    current = im.tell()
    frames = index - current + 1 if index > current else index + 1  # backwards restarts from frame 1
    width, height = im.size
    job.budget.decode(width * height * _CANVAS_BPP * frames, f"reaching frame {index + 1}", job.fmt)


def _frame_count(im: Image.Image, data: bytes, job: _Job) -> int:
    """Frames of a multi-frame input, counted with a cap (MAX_FRAMES) so counting is bounded too."""
    cap = job.limits.max_frames
    if job.fmt == "gif":
        count = gif_frames(data, cap)
    elif job.fmt == "tiff":
        count = tiff_frames(data, cap)
    else:  # WebP: the count is in the container's header
        with _decoding(job.fmt):
            count = getattr(im, "n_frames", 1)
    if count > cap:
        raise InvalidRequest(
            f"the {job.fmt.upper()} image has more than {cap} frames (MAX_FRAMES)",
            details={"format": job.fmt, "limit": "MAX_FRAMES", "max_frames": cap},
        )
    return count


_heif_lock = threading.Lock()
_heif_registered = False


def _register_heif() -> None:
    """Teach Pillow HEIC/HEIF on first use: importing pillow_heif costs ~40 ms, so not at import time."""
    global _heif_registered
    if _heif_registered:
        return
    with _heif_lock:
        if not _heif_registered:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_registered = True


@contextmanager
def _decoding(fmt: str) -> Iterator[None]:
    """Map whatever a decoder raises to a VlmError: a broken upload is the caller's 4xx, never a 500.

    Only decoder calls (open, seek, load) run inside this; our own processing does not, so a
    bug of ours is not disguised as a bad image.
    """
    try:
        yield
    except VlmError:
        raise
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, zlib.error, ...
        raise _decode_error(e, fmt) from None


def _decode_error(e: Exception, fmt: str) -> VlmError:
    if isinstance(e, Image.DecompressionBombError):
        return TooManyPixels(
            "image has too many pixels to decode safely (a decompression bomb)", details={"format": fmt}
        )
    if isinstance(e, MemoryError):
        return TooManyPixels("image is too large to decode in memory", details={"format": fmt})
    if isinstance(e, Image.UnidentifiedImageError):  # its message names a BytesIO object, not the problem
        name = fmt.upper()
        return InvalidRequest(
            f"could not decode image: it starts like {name} but is not a readable {name} file", details={"format": fmt}
        )
    # Decoder messages can quote the input and name our internals: the caller gets our words only.
    name = fmt.upper()
    return InvalidRequest(
        f"could not decode image: the {name} data is damaged or uses a feature that cannot be read",
        details={"format": fmt},
    )


def _check_pixels(width: int, height: int, limits: ImageLimits, fmt: str) -> None:
    if width * height > limits.max_pixels:
        raise TooManyPixels(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}",
            details={"format": fmt, "width": width, "height": height, "max_pixels": limits.max_pixels},
        )


def _prepare_raster(data: bytes, job: _Job, limits: ImageLimits, pages: str | None) -> list[PreparedImage]:
    fmt = job.fmt
    if fmt in ("heic", "heif"):
        _register_heif()
    with _decoding(fmt):
        im = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[fmt]])
    try:
        _check_pixels(*im.size, limits, fmt)
        # Only TIFF/GIF/WebP pages are pages: a JPEG's MPF extras (gain maps, depth) and a
        # HEIC's other images are not, so those always send the primary image.
        multi = fmt in _MULTI_FRAME_FORMATS
        expand = multi and job.policy.expands(fmt)
        count = 1
        if multi and (expand or pages):  # counting frames costs a walk through the file: only when needed
            count = _frame_count(im, data, job)
        out: list[PreparedImage] = []
        for index in _select(count, pages, expand, limits, f"{fmt.upper()} image"):
            if index != im.tell():
                _charge_seek(im, index, job)
                with _decoding(fmt):
                    im.seek(index)
                _check_pixels(*im.size, limits, fmt)
            page = index + 1 if count > 1 else None
            out.extend(_raster_frame(im, data, job, page, draft=index == 0 and fmt in _DRAFT_FORMATS))
        return out
    finally:
        im.close()


def _raster_frame(im: Image.Image, data: bytes, job: _Job, page: int | None, draft: bool) -> list[PreparedImage]:
    fmt = job.fmt
    _precheck(job, *im.size)  # a hopeless aspect ratio is refused before any pixel is decoded
    if not draft:
        _charge_decode(job, im.mode, *im.size)
        with _decoding(fmt):  # PNG keeps EXIF after the pixels: decode before asking for it
            im.load()
    orientation = _orientation(im)
    swap = orientation in (5, 6, 7, 8)
    w0, h0 = im.size
    upright = (h0, w0) if swap else (w0, h0)
    plan = _plan(job, *upright)
    job.budget.send(_sends(plan))
    target = (plan.size[1], plan.size[0]) if swap else plan.size  # in stored orientation
    frame = _load_draft(im, data, job, target) if draft else im
    frame = _working_mode(frame)
    if frame.size != target:
        resample = _RESAMPLE[job.policy.resample]
        frame = frame.resize(target, resample, reducing_gap=REDUCING_GAP)
    frame = _flatten(frame)
    if orientation in _TRANSPOSE:
        frame = frame.transpose(_TRANSPOSE[orientation])
    return _emit(frame, job, upright, plan, page)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8 (1 when absent, invalid or unreadable: bad EXIF is no reason to refuse a picture)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _load_draft(im: Image.Image, data: bytes, job: _Job, target: tuple[int, int]) -> Image.Image:
    """Decode at the smallest DCT scale (JPEG) or thumbnail (HEIF) that is still >= target.

    A JPEG cut short is decoded as far as its data goes: libjpeg fills the missing blocks
    with grey, as it already does for a file that keeps its end marker. That is done locally,
    by re-reading the bytes with an end marker appended (Pillow's global
    LOAD_TRUNCATED_IMAGES stays untouched), and refused when less than half is there.
    The decode is charged at the reduced size the draft chose.
    """
    fmt = job.fmt
    if im.size != target:
        im.draft("RGB", target)
    _charge_decode(job, im.mode, *im.size)
    try:
        im.load()
        return im
    except Exception as e:
        if fmt != "jpeg" or "truncated" not in str(e):
            raise _decode_error(e, fmt) from None
    with _decoding(fmt):
        fixed = Image.open(io.BytesIO(data + b"\xff\xd9"), formats=["JPEG"])
        if fixed.size != target:
            fixed.draft("RGB", target)
        _charge_decode(job, fixed.mode, *fixed.size)
        fixed.load()
    present = 1.0 - _flat_tail_rows(fixed) / fixed.height
    if present < MIN_TRUNCATED_FRACTION:
        raise InvalidRequest(
            f"could not decode image: the JPEG is truncated; only {present:.0%} of it is present",
            details={"format": fmt, "truncated": True, "fraction_present": round(present, 3)},
        )
    return fixed


def _flat_tail_rows(im: Image.Image) -> int:
    """How many rows at the bottom are one flat colour (where a truncated JPEG's data ran out)."""
    width, height = im.size

    def flat(top: int) -> bool:
        extrema = im.crop((0, top, width, height)).getextrema()
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        return all(lo == hi for lo, hi in bands) and len({lo for lo, _ in bands}) == 1

    if not flat(height - 1):
        return 0
    lo, hi = 0, height - 1  # invariant: rows hi.. are flat; find the smallest such hi
    while lo < hi:
        mid = (lo + hi) // 2
        if flat(mid):
            hi = mid
        else:
            lo = mid + 1
    return height - hi


def _working_mode(im: Image.Image) -> Image.Image:
    """L, LA, RGB or RGBA: modes that resize smoothly (Pillow resizes 1 and P with NEAREST only)."""
    mode = im.mode
    if mode in ("RGB", "L", "RGBA", "LA"):
        return im
    if mode == "P":
        if "transparency" in im.info:
            return im.convert("RGBA")
        return im.convert("L" if _grey_palette(im) else "RGB")  # scanned documents: a third of the work
    if mode in ("PA", "RGBa"):
        return im.convert("RGBA")
    if mode == "La":
        return im.convert("LA")
    if mode == "1":
        return im.convert("L")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit(im)
    return im.convert("RGB")  # CMYK (Adobe-inverted ones are un-inverted by the decoder), YCbCr, LAB, HSV, RGBX


def _grey_palette(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale to L by scaling, not clipping (Pillow's convert clips at 255)."""
    src = im.convert("F")
    lo, hi = src.getextrema()
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        lo, hi = 0.0, 65535.0  # full 16-bit range: keep absolute brightness
    elif im.mode == "I" and lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    offset = -lo * scale
    return src.point(lambda v: v * scale + offset).convert("L")


def _flatten(im: Image.Image) -> Image.Image:
    """Transparent pixels onto white: what a viewer shows, and JPEG has no alpha."""
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode == "LA":
        bg = Image.new("L", im.size, 255)
        bg.paste(im.getchannel("L"), mask=im.getchannel("A"))
        return bg
    return im
