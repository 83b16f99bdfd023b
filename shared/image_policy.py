"""What a task wants from the image optimiser, as values: `images.prepare` never sees a task name.

Each `shared.tasks.TaskSpec` holds one `ImagePolicy`; this module is separate (and imports nothing)
so that both `tasks` and `images` can use it without `tasks` loading Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AutoDetail = Literal["high", "low", "by_size"]
Resample = Literal["document", "photo"]

# The container formats whose pages or frames can be expanded (one image sent per page/frame).
PAGED_FORMATS = frozenset({"pdf", "tiff", "gif", "webp"})


@dataclass(frozen=True)
class ImagePolicy:
    """How one input becomes images to send.

    auto_detail: what detail "auto" means ("by_size": low when both sides are under 768 px, else high).
    expand: the formats (of PAGED_FORMATS) whose every (selected) page/frame is sent; any other input
        sends its first (selected) page or frame only.
    resample: "document" (Lanczos, for legible glyphs) or "photo" (Hamming, cheaper on large photos).
    """

    auto_detail: AutoDetail = "by_size"
    expand: frozenset[str] = frozenset()
    resample: Resample = "photo"

    def __post_init__(self) -> None:
        unknown = self.expand - PAGED_FORMATS
        if unknown:
            raise ValueError(f"expand names formats without pages: {sorted(unknown)}")

    def expands(self, fmt: str) -> bool:
        return fmt in self.expand


DEFAULT_POLICY = ImagePolicy()
