"""Token and cost estimates: image-token formulas per model family, a text estimate, prices.

The image formulas are the published ones (DESIGN.md, "Image token formulas"): tile
models count 512 px tiles after fitting in 2048x2048 and scaling the shortest side
to 768; patch models count 32 px patches, capped at 1536, times a multiplier. The
same functions serve the estimates, the limiter and the local model server's usage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    kind: str  # "tile" or "patch"
    base: int = 0  # tile models: tokens for the low-res overview
    tile: int = 0  # tile models: tokens per 512 px tile
    multiplier: float = 1.0  # patch models
    input_per_mtok: float = 0.0  # USD per million input tokens
    output_per_mtok: float = 0.0  # USD per million output tokens


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("gpt-4o", "tile", 85, 170, input_per_mtok=2.50, output_per_mtok=10.00),
        ModelFamily("gpt-4o-mini", "tile", 2833, 5667, input_per_mtok=0.15, output_per_mtok=0.60),
        ModelFamily("gpt-4.1", "tile", 85, 170, input_per_mtok=2.00, output_per_mtok=8.00),
        ModelFamily("gpt-4.5", "tile", 85, 170, input_per_mtok=75.00, output_per_mtok=150.00),
        ModelFamily("o1", "tile", 75, 150, input_per_mtok=15.00, output_per_mtok=60.00),
        ModelFamily("o3", "tile", 75, 150, input_per_mtok=2.00, output_per_mtok=8.00),
        ModelFamily("gpt-5", "tile", 70, 140, input_per_mtok=1.25, output_per_mtok=10.00),
        ModelFamily("gpt-4.1-mini", "patch", multiplier=1.62, input_per_mtok=0.40, output_per_mtok=1.60),
        ModelFamily("gpt-4.1-nano", "patch", multiplier=2.46, input_per_mtok=0.10, output_per_mtok=0.40),
        ModelFamily("o4-mini", "patch", multiplier=1.72, input_per_mtok=1.10, output_per_mtok=4.40),
        ModelFamily("gpt-5-mini", "patch", multiplier=1.62, input_per_mtok=0.25, output_per_mtok=2.00),
        ModelFamily("gpt-5-nano", "patch", multiplier=2.46, input_per_mtok=0.05, output_per_mtok=0.40),
        # The local stand-in (local/model_server.py) counts like gpt-4o and costs nothing.
        ModelFamily("local-ocr", "tile", 85, 170),
    )
}
DEFAULT_FAMILY = "gpt-4o"

TILE_FIT = 2048
TILE_SHORT_SIDE = 768
TILE_SIZE = 512
LOW_DETAIL_SIDE = 512
PATCH = 32
MAX_PATCHES = 1536


def known_family(model: str | None) -> ModelFamily | None:
    """The family a model or deployment name starts with (longest prefix wins: gpt-4o-mini before gpt-4o)."""
    name = (model or "").lower()
    best = max((key for key in FAMILIES if name.startswith(key)), key=len, default=None)
    return FAMILIES[best] if best else None


def family_for(model: str | None) -> ModelFamily:
    """Like `known_family`, defaulting to gpt-4o for names that say nothing (custom deployment names)."""
    return known_family(model) or FAMILIES[DEFAULT_FAMILY]


def high_detail_size(width: int, height: int) -> tuple[int, int]:
    """The size a tile model looks at in high detail: fit 2048x2048, then shortest side 768; never upscale."""
    w, h = float(width), float(height)
    if max(w, h) > TILE_FIT:
        s = TILE_FIT / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > TILE_SHORT_SIDE:
        s = TILE_SHORT_SIDE / min(w, h)
        w, h = w * s, h * s
    return max(1, round(w)), max(1, round(h))


def low_detail_size(width: int, height: int) -> tuple[int, int]:
    """Low detail: the model sees at most 512x512; never upscale."""
    if max(width, height) <= LOW_DETAIL_SIDE:
        return width, height
    s = LOW_DETAIL_SIDE / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def patch_size(width: int, height: int) -> tuple[int, int]:
    """The size a patch model looks at: shrunk so that at most 1536 32-px patches cover it."""
    if math.ceil(width / PATCH) * math.ceil(height / PATCH) <= MAX_PATCHES:
        return width, height
    r = math.sqrt(PATCH * PATCH * MAX_PATCHES / (width * height))
    r *= min(math.floor(width * r / PATCH) / (width * r / PATCH), math.floor(height * r / PATCH) / (height * r / PATCH))
    return max(1, int(width * r)), max(1, int(height * r))


def image_tokens(width: int, height: int, detail: str, model: str | None = None) -> int:
    """Estimated input tokens for one image of this size at this detail ('low' or 'high')."""
    fam = family_for(model)
    if fam.kind == "patch":
        w, h = patch_size(width, height)
        patches = min(MAX_PATCHES, math.ceil(w / PATCH) * math.ceil(h / PATCH))
        return math.ceil(patches * fam.multiplier)
    if detail == "low":
        return fam.base
    w, h = high_detail_size(width, height)
    tiles = math.ceil(w / TILE_SIZE) * math.ceil(h / TILE_SIZE)
    return fam.base + tiles * fam.tile


def model_view_size(width: int, height: int, detail: str, model: str | None = None) -> tuple[int, int]:
    """The largest size the model will actually look at: sending more buys nothing."""
    fam = family_for(model)
    if fam.kind == "patch":
        return patch_size(width, height)
    if detail == "low":
        return low_detail_size(width, height)
    return high_detail_size(width, height)


# Chat overhead per message and per request, as in OpenAI's cookbook counting guide.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REQUEST = 3
CHARS_PER_TOKEN = 4


def text_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters a token for English); errs high on short text."""
    if not text:
        return 0
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def prompt_tokens(texts: list[str], messages: int = 1) -> int:
    return TOKENS_PER_REQUEST + messages * TOKENS_PER_MESSAGE + sum(text_tokens(t) for t in texts)


def cost_usd(prompt_tokens_used: int, completion_tokens_used: int, model: str | None) -> float:
    fam = family_for(model)
    cost = prompt_tokens_used * fam.input_per_mtok / 1e6 + completion_tokens_used * fam.output_per_mtok / 1e6
    return round(cost, 6)
