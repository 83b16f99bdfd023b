"""Token and cost mechanics: image-token geometry, a text estimate, a price calculation.

Nothing here names a model or holds a model's numbers: the geometry takes its
parameters from a catalog entry (shared/catalog.py, shared/model_catalog.json).
Tile models count `tile_px` tiles after fitting in `fit_px` squared and scaling the
shortest side to `short_side_px` (low detail: `base` only, seen at most `low_px`);
patch models count `patch_px` patches, capped at `max_patches`, times `multiplier`
(each catalog entry cites its source); an unknown model gets the tile view counted per
patch (`Catalog.unknown_image_tokens`). A `model` argument may be a catalog entry's
`ImageTokens` or a model name, looked up in the shipped catalog (the service passes
the entry it resolved with the user's overrides).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .catalog import Catalog, ImageTokens, Prices


def spec_for(model: ImageTokens | str | None, catalog: Catalog | None = None) -> ImageTokens:
    """The image accounting for a catalog entry or a model name (unknown names get the high estimate)."""
    from .catalog import ImageTokens, load_catalog

    if isinstance(model, ImageTokens):
        return model
    return (catalog or load_catalog()).image_tokens_for(model)


family_for = spec_for  # older name, kept for callers (images, the local stand-in, benches)


def high_detail_size(width: int, height: int, spec: ImageTokens | str | None = None) -> tuple[int, int]:
    """The size a tile model looks at in high detail: fit `fit_px` squared, then shortest side; never upscale."""
    s = _tile(spec)
    fit, short = s.fit_px or 0, s.short_side_px or 0
    w, h = float(width), float(height)
    if max(w, h) > fit:
        r = fit / max(w, h)
        w, h = w * r, h * r
    if min(w, h) > short:
        r = short / min(w, h)
        w, h = w * r, h * r
    return max(1, round(w)), max(1, round(h))


def low_detail_size(width: int, height: int, spec: ImageTokens | str | None = None) -> tuple[int, int]:
    """Low detail: the model sees at most `low_px` squared; never upscale."""
    side = _tile(spec).low_px or 0
    if max(width, height) <= side:
        return width, height
    r = side / max(width, height)
    return max(1, round(width * r)), max(1, round(height * r))


def patch_size(width: int, height: int, spec: ImageTokens | str | None = None) -> tuple[int, int]:
    """The size a patch model looks at: shrunk so that at most `max_patches` patches cover it."""
    s = spec_for(spec)
    patch, cap = s.patch_px or 1, s.max_patches or 1
    if math.ceil(width / patch) * math.ceil(height / patch) <= cap:
        return width, height
    r = math.sqrt(patch * patch * cap / (width * height))
    r *= min(math.floor(width * r / patch) / (width * r / patch), math.floor(height * r / patch) / (height * r / patch))
    return max(1, int(width * r)), max(1, int(height * r))


def image_tokens(width: int, height: int, detail: str, model: ImageTokens | str | None = None) -> int:
    """Estimated input tokens for one image of this size at this detail ('low' or 'high')."""
    s = spec_for(model)
    if s.kind == "patch":
        w, h = patch_size(width, height, s)
        patches = min(s.max_patches or 0, math.ceil(w / (s.patch_px or 1)) * math.ceil(h / (s.patch_px or 1)))
        return math.ceil(patches * (s.multiplier or 0.0))
    if s.kind == "estimate":  # unknown model: the tile view, counted per patch (proportional to pixels sent)
        w, h = model_view_size(width, height, detail, s)
        patch = s.patch_px or 1
        count = math.ceil(w / patch) * math.ceil(h / patch)
        if detail != "low":  # high detail costs at least one whole tile in every tile family
            count = max(count, math.ceil((s.tile_px or 0) / patch) ** 2)
        return math.ceil(count * (s.multiplier or 0.0))
    if detail == "low":
        return s.base or 0
    w, h = high_detail_size(width, height, s)
    tile = s.tile_px or 1
    return (s.base or 0) + math.ceil(w / tile) * math.ceil(h / tile) * (s.per_tile or 0)


def model_view_size(width: int, height: int, detail: str, model: ImageTokens | str | None = None) -> tuple[int, int]:
    """The largest size the model will actually look at: sending more buys nothing."""
    s = spec_for(model)
    if s.kind == "patch":
        return patch_size(width, height, s)
    if detail == "low":
        return low_detail_size(width, height, s)
    return high_detail_size(width, height, s)


def _tile(spec: ImageTokens | str | None) -> ImageTokens:
    s = spec_for(spec)
    if s.kind == "patch":
        raise ValueError("tile geometry asked of a patch-counting model")
    return s


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


def price_usd(prices: Prices, prompt: int, completion: int, cached: int = 0) -> float | None:
    """Cost of one call: uncached input, cached input (at the input price when no cached price is
    known) and output, which already includes reasoning tokens. None when a needed price is unknown."""
    if prices.input is None or prices.output is None:
        return None
    cached = min(max(0, cached), prompt)
    cached_price = prices.cached_input if prices.cached_input is not None else prices.input
    cost = (prompt - cached) * prices.input + cached * cached_price + completion * prices.output
    return round(cost / 1e6, 6)
