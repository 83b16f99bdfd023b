"""How the local model server counts image tokens: its own formula, chosen by a spec string.

Deliberately independent of shared.tokens and the service's model catalog: the stand-in plays a
model, and a model does not read our estimate. Tests give it a formula the catalog does not know
for the model name it reports (e.g. `patch:1.9`), so the service's self-calibration has a real gap
to close. The two shapes follow OpenAI's published image-token rules
(https://platform.openai.com/docs/guides/images-vision#calculating-costs):

- `tile:BASE:PER_TILE[:TILE_PX]`: low detail costs BASE; high detail fits the image in 2048x2048,
  scales the short side down to 768, and costs BASE + PER_TILE per TILE_PX square (default 512).
- `patch:MULTIPLIER[:MAX_PATCHES]`: 32 px patches, at most MAX_PATCHES (default 1536, the image is
  shrunk to fit), times MULTIPLIER; detail does not change the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FIT_PX = 2048
SHORT_SIDE_PX = 768
PATCH_PX = 32
LOW_PX = 512  # low detail: the whole image fits 512x512
DEFAULT_SPEC = "tile:85:170"  # what the stand-in always counted (gpt-4o's numbers)


class ImageTokenSpecError(ValueError):
    """A --image-tokens spec the server cannot use."""


@dataclass(frozen=True)
class ImageTokenRule:
    kind: str  # tile | patch
    base: int = 0
    per_tile: int = 0
    tile_px: int = 512
    multiplier: float = 1.0
    max_patches: int = 1536

    @property
    def spec(self) -> str:
        if self.kind == "tile":
            return f"tile:{self.base}:{self.per_tile}:{self.tile_px}"
        return f"patch:{self.multiplier:g}:{self.max_patches}"

    def count(self, width: int, height: int, detail: str) -> int:
        """Tokens for one image of this size at the effective detail ('low' or 'high')."""
        if self.kind == "patch":
            return math.ceil(_patches(width, height, self.max_patches) * self.multiplier)
        if detail == "low":
            return self.base
        w, h = _tile_view(width, height)
        return self.base + math.ceil(w / self.tile_px) * math.ceil(h / self.tile_px) * self.per_tile

    def view_size(self, width: int, height: int, detail: str) -> tuple[int, int]:
        """The size this model looks at (what its OCR reads): tiles fit 2048 then 768 on the short side,
        or 512 at low detail; patches shrink until the cap covers them. Never upscaled."""
        if self.kind == "patch":
            n = math.ceil(width / PATCH_PX) * math.ceil(height / PATCH_PX)
            if n <= self.max_patches:
                return width, height
            scale = math.sqrt(PATCH_PX * PATCH_PX * self.max_patches / (width * height))
            return max(1, int(width * scale)), max(1, int(height * scale))
        if detail == "low":
            if max(width, height) <= LOW_PX:
                return width, height
            scale = LOW_PX / max(width, height)
            return max(1, round(width * scale)), max(1, round(height * scale))
        w, h = _tile_view(width, height)
        return int(w), int(h)


def _tile_view(width: int, height: int) -> tuple[float, float]:
    w, h = float(width), float(height)
    if max(w, h) > FIT_PX:
        s = FIT_PX / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > SHORT_SIDE_PX:
        s = SHORT_SIDE_PX / min(w, h)
        w, h = w * s, h * s
    return max(1.0, round(w)), max(1.0, round(h))


def _patches(width: int, height: int, cap: int) -> int:
    """Patches covering the image, after shrinking it (keeping its shape) until at most `cap` cover it."""
    n = math.ceil(width / PATCH_PX) * math.ceil(height / PATCH_PX)
    if n <= cap:
        return n
    scale = math.sqrt(PATCH_PX * PATCH_PX * cap / (width * height))
    cols, rows = width * scale / PATCH_PX, height * scale / PATCH_PX
    scale *= min(math.floor(cols) / cols, math.floor(rows) / rows)  # whole patches along the tighter side
    return min(cap, math.ceil(width * scale / PATCH_PX) * math.ceil(height * scale / PATCH_PX))


def _int(text: str, what: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise ImageTokenSpecError(f"{what} must be an integer, got {text!r}") from exc
    if value < low:
        raise ImageTokenSpecError(f"{what} must be >= {low}, got {value}")
    return value


def parse_image_tokens(spec: str) -> ImageTokenRule:
    """`tile:85:170`, `tile:85:170:512`, `patch:1.9` or `patch:1.9:1536`."""
    if not isinstance(spec, str):
        raise ImageTokenSpecError("image_tokens must be a string like 'tile:85:170' or 'patch:1.9'")
    kind, *nums = spec.strip().lower().split(":")
    if kind == "tile" and len(nums) in (2, 3):
        base, per_tile = _int(nums[0], "tile base", 0), _int(nums[1], "tokens per tile", 0)
        tile_px = _int(nums[2], "tile size", 1) if len(nums) == 3 else 512
        return ImageTokenRule("tile", base=base, per_tile=per_tile, tile_px=tile_px)
    if kind == "patch" and len(nums) in (1, 2):
        try:
            mult = float(nums[0])
        except ValueError as exc:
            raise ImageTokenSpecError(f"patch multiplier must be a number, got {nums[0]!r}") from exc
        if not math.isfinite(mult) or mult <= 0:
            raise ImageTokenSpecError(f"patch multiplier must be > 0, got {nums[0]!r}")
        cap = _int(nums[1], "max patches", 1) if len(nums) == 2 else 1536
        return ImageTokenRule("patch", multiplier=mult, max_patches=cap)
    raise ImageTokenSpecError(
        f"image tokens spec must be 'tile:BASE:PER_TILE[:PX]' or 'patch:MULT[:CAP]', got {spec!r}"
    )
