"""Self-calibrating image-token estimates, one per deployment.

Why: the catalog's formula for a model can be missing, stale or simply different from
what an endpoint counts. Every answer reports `usage.prompt_tokens`; the part not
explained by the text estimate, divided by the image estimate, is the ratio the formula
is off by. The correction is the median of the last `window` ratios (robust to one odd
answer, e.g. a cached or truncated prompt), clamped, and multiplies the image estimate
used by the limiter's reservation and the reported `estimated_prompt_tokens`.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

# A ratio outside this range says more about a broken answer than about the formula.
MIN_RATIO = 0.05
MAX_RATIO = 20.0
# Answers whose images are a small share of the estimate carry little information about them.
MIN_IMAGE_TOKENS = 16


@dataclass
class Calibration:
    window: int = 20
    _ratios: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._ratios = deque(self._ratios, maxlen=max(1, self.window))

    @property
    def factor(self) -> float:
        """The image-estimate correction: 1.0 until the first usable answer."""
        return statistics.median(self._ratios) if self._ratios else 1.0

    @property
    def samples(self) -> int:
        return len(self._ratios)

    def image_estimate(self, formula_tokens: int) -> int:
        return round(formula_tokens * self.factor)

    def observe(self, observed_prompt: int, text_estimate: int, image_formula: int) -> None:
        """Record one answer: observed prompt tokens against the uncorrected text and image estimates."""
        if image_formula < MIN_IMAGE_TOKENS or observed_prompt <= 0:
            return
        ratio = (observed_prompt - text_estimate) / image_formula
        self._ratios.append(min(MAX_RATIO, max(MIN_RATIO, ratio)))
