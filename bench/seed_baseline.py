"""The seed design's image optimiser, written from ../shared/SEED-BASELINE.md, for benchmarks only.

Label it "baseline (seed design)" in every table. As the seed describes it:

1. Open the upload with Pillow at full resolution.
2. Maximum side by detail: low 512, high 2048, auto 1024.
3. If the longest side is larger, scale both sides by max_side / longest (truncated to int),
   LANCZOS, from the full-resolution image.
4. Convert to RGB if the mode is not RGB. No EXIF transpose, no alpha compositing, metadata
   not stripped deliberately (whatever Pillow keeps, it keeps).
5. JPEG quality 85, optimize=True, base64.
6. Only JPEG, PNG and WebP uploads (by declared content type) up to 20 MB.
7. Sent with the chosen detail (default auto).

Its detail rule: ocr / table_extraction / detailed_analysis -> high; classification /
object_detection / quick_summary -> low; otherwise both sides under 768 -> low, either side
over 2048 -> high, else auto.

Estimated tokens use shared.tokens for what it sends, at the detail it sends. "auto" counts as
high: the API decides by size, and every image the seed sends as auto is larger than 512 px
(it only picks auto when a side is at least 768), where auto means high.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from PIL import Image

from shared.tokens import image_tokens

LABEL = "baseline (seed design)"
MAX_BYTES = 20 * 1024 * 1024
MAX_SIDE = {"low": 512, "high": 2048, "auto": 1024}
ACCEPTED_TYPES = {"image/jpeg", "image/png", "image/webp"}
HIGH_TASKS = {"ocr", "table_extraction", "detailed_analysis"}
LOW_TASKS = {"classification", "object_detection", "quick_summary"}
# The seed's tasks for ours: what each of our tasks is called in the seed design.
SEED_TASK = {"ocr": "ocr", "table": "table_extraction", "classify": "classification", "describe": "describe"}
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".heic": "image/heic",
    ".heif": "image/heif",
    ".pdf": "application/pdf",
}


class Unsupported(ValueError):
    """The seed design refuses this upload (content type or size)."""


@dataclass(frozen=True)
class BaselineImage:
    b64: str
    detail: str  # what it sends: low, high or auto
    sent_width: int
    sent_height: int
    bytes_sent: int  # the JPEG, before base64
    estimated_tokens: int


def choose_detail(task: str, width: int, height: int) -> str:
    if task in HIGH_TASKS:
        return "high"
    if task in LOW_TASKS:
        return "low"
    if width < 768 and height < 768:
        return "low"
    if width > 2048 or height > 2048:
        return "high"
    return "auto"


def content_type_for(name: str) -> str:
    """What an HTTP client would declare for this file name (the seed trusts the declaration)."""
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    return CONTENT_TYPES.get(suffix, "application/octet-stream")


def optimize(
    data: bytes, content_type: str, task: str = "describe", detail: str | None = None, model: str | None = None
) -> BaselineImage:
    if content_type not in ACCEPTED_TYPES:
        raise Unsupported(f"content type {content_type} is not accepted")
    if len(data) > MAX_BYTES:
        raise Unsupported("file larger than 20 MB")
    img = Image.open(io.BytesIO(data))
    chosen = detail or choose_detail(SEED_TASK.get(task, task), img.width, img.height)
    max_side = MAX_SIDE[chosen]
    if max(img.size) > max_side:
        ratio = max_side / max(img.size)
        img = img.resize((int(img.width * ratio), int(img.height * ratio)), Image.Resampling.LANCZOS)
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85, optimize=True)
    jpeg = buf.getvalue()
    token_detail = "low" if chosen == "low" else "high"
    return BaselineImage(
        b64=base64.b64encode(jpeg).decode("ascii"),
        detail=chosen,
        sent_width=img.width,
        sent_height=img.height,
        bytes_sent=len(jpeg),
        estimated_tokens=image_tokens(img.width, img.height, token_detail, model),
    )
