"""What the local model "sees": decoded images, image facts and OCR lines in reading order.

The local model server answers from these instead of a real vision model. Images are decoded
at the size the model it plays would look at (its own image rule, local/model_tokens.py, for the
requested detail), so a low-detail request reads as badly as it would on a real model. OCR is RapidOCR (onnxruntime,
models inside the wheel), loaded once per engine and run on one worker thread so the event loop
keeps serving while a page is read.
"""

from __future__ import annotations

import asyncio
import colorsys
import hashlib
import io
import logging
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from local.model_tokens import ImageTokenRule

log = logging.getLogger(__name__)

# A decompression bomb is a client error here, not a crash: 50 MP matches MAX_IMAGE_PIXELS. Checked from
# the header in read_header(), not by changing Pillow's global limit (tests share the process).
MAX_PIXELS = 50_000_000
# Memory the decode may take, by the mode's bytes per pixel (16-bit grey converts through float):
# a 7071x7071 16-bit PNG is ~100 KB on the wire and ~500 MB here, so it is refused from the header.
MAX_DECODED_BYTES = 256 * 1024 * 1024
# What OpenAI accepts (its invalid_image_format message lists these); nothing else is even probed.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
# RapidOCR scales the short side up to 30 px and then pads to a 1:8 aspect: a 2048x1 view would
# become 61440x7680 (~23 GB on the way through the detector). OCR gets the view padded with white
# to at least this short side and at most this aspect instead: text is unchanged, work bounded.
OCR_MIN_SIDE = 32
OCR_MAX_ASPECT = 4
MAX_OCR_SIDE = 2048  # never OCR more than a high-detail view could hold
FACTS_SIDE = 256  # facts are statistics; a thumbnail gives the same numbers much faster


class ImageDecodeError(ValueError):
    """The bytes are not an image the server can read (OpenAI's invalid_image_format)."""


@dataclass(frozen=True)
class ImageHeader:
    """Cheap facts read from the header only: enough for usage and quota before any decode."""

    format: str
    width: int
    height: int


def read_header(data: bytes) -> ImageHeader:
    """Size and format without decoding pixels; EXIF rotation swaps sides, which no token formula cares about."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            header = ImageHeader((im.format or "unknown").lower(), int(im.width), int(im.height))
            mode = im.mode
    except Exception as exc:  # PIL raises many types for bad input
        raise ImageDecodeError(str(exc) or type(exc).__name__) from exc
    if header.width * header.height > MAX_PIXELS:
        raise ImageDecodeError(f"image of {header.width}x{header.height} is over {MAX_PIXELS} pixels")
    # A JPEG is decoded at a reduced DCT scale (draft), never more than twice the 2048 px view a side.
    if header.format != "jpeg" and header.width * header.height * _decode_bpp(mode) > MAX_DECODED_BYTES:
        raise ImageDecodeError(f"image of {header.width}x{header.height} ({mode}) is over {MAX_DECODED_BYTES} bytes")
    return header


def _decode_bpp(mode: str) -> int:
    """Bytes a pixel costs while decoding: Pillow's storage plus the RGB/float copies decode() makes."""
    if mode.startswith("I;16") or mode in ("I", "F"):
        return 12  # stored (2-4), float copy (4), RGB copy (4)
    return 8  # stored (1-4) plus an RGB copy (4)


def ocr_canvas(view: Image.Image) -> Image.Image:
    """The view as OCR gets it: padded with white so RapidOCR's own rescaling stays bounded (see OCR_MIN_SIDE)."""
    w, h = view.size
    width = max(w, OCR_MIN_SIDE, -(-h // OCR_MAX_ASPECT))
    height = max(h, OCR_MIN_SIDE, -(-w // OCR_MAX_ASPECT))
    if (width, height) == (w, h):
        return view
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(view.convert("RGB"), (0, 0))
    return canvas


def resolve_detail(detail: str, width: int, height: int) -> str:
    """`auto` -> `high` when either side is over 512 px, else `low` (a small image gains nothing from tiles)."""
    if detail in ("low", "high"):
        return detail
    return "high" if max(width, height) > 512 else "low"


@dataclass(frozen=True)
class ImageFacts:
    """Numbers a caller can check against the picture, and the words used to describe it."""

    width: int
    height: int
    view_width: int
    view_height: int
    detail: str
    format: str
    tokens: int
    orientation: str  # landscape | portrait | square
    brightness: float  # mean luma 0..255
    brightness_word: str  # dark | medium | bright
    contrast: float  # luma standard deviation
    colour: str  # dominant colour name, e.g. "dark blue"
    colour_share: float  # fraction of pixels with that name
    second_colour: str | None
    sharpness: float  # variance of the Laplacian at the view size
    sharpness_word: str  # blurry | soft | sharp
    edge_density: float  # fraction of strong-gradient pixels

    def phrase(self) -> str:
        """One line such as `768x1024 portrait, mostly white with some black, brightness 231/255 (bright), sharp`."""
        colours = f"mostly {self.colour}"
        if self.second_colour:
            colours += f" with some {self.second_colour}"
        return (
            f"{self.width}x{self.height} {self.orientation}, {colours}, "
            f"brightness {round(self.brightness)}/255 ({self.brightness_word}), {self.sharpness_word}"
        )

    def words(self) -> set[str]:
        """Words the facts justify, for matching enum values such as `portrait` or `dark`."""
        out = {self.orientation, self.brightness_word, self.sharpness_word, *self.colour.split()}
        if self.second_colour:
            out.update(self.second_colour.split())
        return out


@dataclass
class Fragment:
    """One OCR box: text and its axis-aligned bounds in view pixels."""

    text: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def h(self) -> float:
        return max(1.0, self.y1 - self.y0)

    @property
    def xc(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def yc(self) -> float:
        return (self.y0 + self.y1) / 2


@dataclass
class OcrLine:
    """Fragments on one visual line, left to right; `page` is the image index for multi-page requests."""

    fragments: list[Fragment]
    page: int = 0

    @property
    def text(self) -> str:
        return " ".join(f.text for f in self.fragments)

    @property
    def y0(self) -> float:
        return min(f.y0 for f in self.fragments)

    @property
    def y1(self) -> float:
        return max(f.y1 for f in self.fragments)

    @property
    def height(self) -> float:
        return float(np.median([f.h for f in self.fragments]))


def reading_order(fragments: list[Fragment], page: int = 0) -> list[OcrLine]:
    """Group boxes into lines (vertical overlap of at least half the smaller height), top to bottom, left to right."""
    lines: list[OcrLine] = []
    for frag in sorted(fragments, key=lambda f: (f.yc, f.x0)):
        best: OcrLine | None = None
        best_overlap = 0.0
        for line in lines[-3:]:  # only recent lines can still be on the same row
            y0 = float(np.mean([f.y0 for f in line.fragments]))
            y1 = float(np.mean([f.y1 for f in line.fragments]))
            overlap = min(y1, frag.y1) - max(y0, frag.y0)
            if overlap >= 0.5 * min(frag.h, y1 - y0) and overlap > best_overlap:
                best, best_overlap = line, overlap
        if best is None:
            lines.append(OcrLine([frag], page))
        else:
            best.fragments.append(frag)
    for line in lines:
        line.fragments.sort(key=lambda f: f.x0)
    lines.sort(key=lambda ln: (ln.y0 + ln.y1) / 2)
    return lines


@dataclass
class DecodedImage:
    """An image as the model sees it: the resized view plus facts; OCR lines are filled in later."""

    index: int
    key: str  # sha256 of the bytes + view size: the OCR cache key
    view: Image.Image
    facts: ImageFacts
    lines: list[OcrLine] = field(default_factory=list)
    ocr_done: bool = False


# Reference colours for naming the dominant colour (hue in degrees).
_HUES: list[tuple[float, str]] = [
    (15, "red"),
    (40, "orange"),
    (70, "yellow"),
    (165, "green"),
    (195, "cyan"),
    (255, "blue"),
    (290, "purple"),
    (340, "pink"),
    (361, "red"),
]


def _colour_name(r: float, g: float, b: float) -> str:
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    if v < 0.2:
        return "black"
    if s < 0.18:
        return "white" if v > 0.8 else ("gray" if v > 0.35 else "dark gray")
    deg = h * 360
    name = next(n for limit, n in _HUES if deg < limit)
    if name in ("orange", "red") and v < 0.55 and s > 0.3:
        return "brown"
    if v < 0.45:
        return f"dark {name}"
    if v > 0.85 and s < 0.45:
        return f"light {name}"
    return name


def compute_facts(
    view: Image.Image, header: ImageHeader, width: int, height: int, detail: str, rule: ImageTokenRule
) -> ImageFacts:
    """Statistics of the view the model looks at; colours are named on a thumbnail."""
    thumb = view.copy()
    thumb.thumbnail((FACTS_SIDE, FACTS_SIDE))
    luma = np.asarray(view.convert("L"), dtype=np.float32)
    brightness = float(luma.mean())
    # Count the quantized palette's entries with numpy, then name each entry once: a Python loop over the
    # thumbnail's pixels cost ~70 ms per image. Entries go in the order they first appear in the picture,
    # so ties in most_common() break as a scan of the pixels would.
    quantized = thumb.convert("RGB").quantize(colors=24)
    palette = quantized.getpalette() or []
    indices, first, counts = np.unique(np.asarray(quantized).ravel(), return_index=True, return_counts=True)
    names = Counter()
    for _, index, count in sorted(zip(first.tolist(), indices.tolist(), counts.tolist(), strict=True)):
        names[_colour_name(*palette[3 * index : 3 * index + 3])] += count
    total = max(1, sum(names.values()))
    ranked = names.most_common(2)
    colour, count = ranked[0]
    second = ranked[1][0] if len(ranked) > 1 and ranked[1][1] / total >= 0.12 else None
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1]
    sharpness = float(lap.var()) if lap.size else 0.0
    gx = np.abs(np.diff(luma, axis=1))[:-1, :]
    gy = np.abs(np.diff(luma, axis=0))[:, :-1]
    edges = float(((gx + gy) > 60).mean()) if gx.size else 0.0
    orientation = (
        "square"
        if abs(width - height) <= 0.02 * max(width, height)
        else ("landscape" if width > height else "portrait")
    )
    return ImageFacts(
        width=width,
        height=height,
        view_width=view.width,
        view_height=view.height,
        detail=detail,
        format=header.format,
        tokens=rule.count(header.width, header.height, detail),
        orientation=orientation,
        brightness=round(brightness, 1),
        brightness_word="dark" if brightness < 85 else ("bright" if brightness > 170 else "medium"),
        contrast=round(float(luma.std()), 1),
        colour=colour,
        colour_share=round(count / total, 3),
        second_colour=second,
        sharpness=round(sharpness, 1),
        sharpness_word="blurry" if sharpness < 60 else ("soft" if sharpness < 300 else "sharp"),
        edge_density=round(edges, 4),
    )


def decode(data: bytes, index: int, detail: str, rule: ImageTokenRule) -> DecodedImage:
    """Decode at the model's view size (JPEG draft mode keeps 12 MP photos cheap), upright per EXIF."""
    header = read_header(data)
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
        swapped = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that turn the picture 90°
        width, height = (header.height, header.width) if swapped else (header.width, header.height)
        vw, vh = rule.view_size(width, height, detail)
        if im.format == "JPEG":
            im.draft("RGB", (vh, vw) if swapped else (vw, vh))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")  # transparent pixels read as white paper, not black
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        elif im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        vw, vh = rule.view_size(width, height, detail)
        vw, vh = min(vw, MAX_OCR_SIDE), min(vh, MAX_OCR_SIDE)
        view = im.resize((vw, vh), Image.Resampling.LANCZOS) if (vw, vh) != im.size else im.copy()
        if view.mode != "RGB":
            view = view.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(str(exc) or type(exc).__name__) from exc
    facts = compute_facts(view, header, width, height, detail, rule)
    key = hashlib.sha256(data).hexdigest() + f":{vw}x{vh}"
    return DecodedImage(index=index, key=key, view=view, facts=facts)


class OcrEngine:
    """RapidOCR loaded once, on its own single worker thread, with a small LRU of results.

    One thread because the machine's cores are already used by onnxruntime inside one call;
    the cache because clients re-ask (schema retries, fallbacks) with the same image.
    """

    def __init__(self, cache_size: int = 64) -> None:
        self._engine: Any = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocr")
        self._cache: OrderedDict[str, list[OcrLine]] = OrderedDict()
        self._cache_size = cache_size
        self.loads = 0  # how many times the model was loaded: must stay 1
        self.calls = 0  # OCR runs that were not served from the cache

    def load(self) -> None:
        with self._lock:
            if self._engine is None:
                from rapidocr_onnxruntime import RapidOCR  # heavy import, only in OCR mode

                self._engine = RapidOCR()
                self.loads += 1
                log.info("RapidOCR loaded")

    async def aload(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    def read_sync(self, view: Image.Image, page: int = 0) -> list[OcrLine]:
        self.load()
        bgr = np.ascontiguousarray(np.asarray(ocr_canvas(view).convert("RGB"))[:, :, ::-1])
        result, _ = self._engine(bgr)
        self.calls += 1
        frags: list[Fragment] = []
        for box, text, score in result or []:
            text = str(text).strip()
            if not text:
                continue
            xs = [float(p[0]) for p in box]
            ys = [float(p[1]) for p in box]
            frags.append(Fragment(text, float(score), min(xs), min(ys), max(xs), max(ys)))
        return reading_order(frags, page)

    async def read(self, image: DecodedImage) -> list[OcrLine]:
        cached = self._cache.get(image.key)
        if cached is None:
            loop = asyncio.get_running_loop()
            cached = await loop.run_in_executor(self._executor, self.read_sync, image.view, 0)
            self._cache[image.key] = cached
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(image.key)
        return [OcrLine(list(line.fragments), image.index) for line in cached]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
