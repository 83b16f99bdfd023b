"""RPM/TPM quota the way Azure OpenAI enforces it, over a sliding window, per deployment.

The limits are per minute; a window shorter than 60 s admits the rate scaled to it (a 10 s window
admits a sixth of the minute's quota), as Azure evaluates over 1-10 s windows.

Azure charges a request at admission time with its *estimated* tokens: the prompt estimate plus
`max_tokens` (or `max_completion_tokens`); nothing is refunded when the answer is shorter. A
request that does not fit is refused with 429 and told exactly how long until enough of the
window has expired (`retry-after-ms`). The clock is injectable so the arithmetic is unit-tested
without sleeping.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass(frozen=True)
class QuotaLimits:
    """0 means unlimited. `model` restricts the quota to one deployment (others are unlimited)."""

    rpm: int = 0
    tpm: int = 0
    window_s: float = 60.0
    model: str | None = None

    @property
    def active(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    @property
    def window_requests(self) -> int:
        """Requests admitted per window: the per-minute rate scaled to the window (Azure checks RPM over
        1-10 s windows, i.e. rpm/60 per second), at least 1."""
        return max(1, math.floor(self.rpm * self.window_s / 60)) if self.rpm else 0

    @property
    def window_tokens(self) -> int:
        return max(1, math.floor(self.tpm * self.window_s / 60)) if self.tpm else 0


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    reason: str  # "" | "requests" | "tokens" | "too_large"
    retry_after_s: float
    limit_requests: int | None
    limit_tokens: int | None
    remaining_requests: int | None
    remaining_tokens: int | None

    @property
    def retry_after_ms(self) -> int:
        return max(0, math.ceil(self.retry_after_s * 1000 - 1e-6))

    @property
    def retry_after_header(self) -> int:
        """Whole seconds for `retry-after`, rounded up so a client honouring it is never early."""
        return max(1, math.ceil(self.retry_after_s - 1e-9)) if self.retry_after_s > 0 else 0

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers Azure sends on every answer, plus retry-after on a refusal."""
        h: dict[str, str] = {}
        if self.limit_requests is not None:
            h["x-ratelimit-limit-requests"] = str(self.limit_requests)
            h["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
        if self.limit_tokens is not None:
            h["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            h["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
        if not self.allowed:
            h["retry-after-ms"] = str(self.retry_after_ms)
            h["retry-after"] = str(self.retry_after_header)
            if self.reason == "too_large":
                h["x-should-retry"] = "false"  # the openai SDK honours this: waiting will never help
        return h


@dataclass
class SlidingWindow:
    """Admitted requests in the last `window_s` seconds, as (time, tokens) in arrival order."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    tokens: int = 0

    def expire(self, now: float, window_s: float) -> None:
        while self.entries and self.entries[0][0] + window_s <= now:
            _, tok = self.entries.popleft()
            self.tokens -= tok


# Decisions kept for the timeline (bench.multi reads it to show where a run's time went); a bench run makes a few
# thousand, and older ones fall off.
TIMELINE_MAX = 100_000


@dataclass(frozen=True)
class Decided:
    """One quota decision, for the timeline: seconds since the last reset, the tokens asked, admitted or not."""

    at_s: float
    tokens: int
    allowed: bool


class Quota:
    """Per-deployment sliding windows under one set of limits."""

    def __init__(self, limits: QuotaLimits | None = None, clock: Clock = time.monotonic) -> None:
        self.limits = limits or QuotaLimits()
        self.clock = clock
        self._windows: dict[str, SlidingWindow] = {}
        self.timeline: deque[Decided] = deque(maxlen=TIMELINE_MAX)
        self._since = clock()

    def configure(self, limits: QuotaLimits) -> None:
        """New limits start from an empty window, so a test that sets them knows where it stands."""
        self.limits = limits
        self.reset()

    def reset(self) -> None:
        """An empty window and timeline; the timeline counts seconds from now."""
        self._windows.clear()
        self.timeline.clear()
        self._since = self.clock()

    def _applies(self, model: str) -> bool:
        return self.limits.active and (self.limits.model is None or self.limits.model == model)

    def _decision(self, w: SlidingWindow, allowed: bool, reason: str, retry: float) -> QuotaDecision:
        lim = self.limits
        return QuotaDecision(
            allowed=allowed,
            reason=reason,
            retry_after_s=retry,
            limit_requests=lim.rpm or None,
            limit_tokens=lim.tpm or None,
            remaining_requests=max(0, lim.window_requests - len(w.entries)) if lim.rpm else None,
            remaining_tokens=max(0, lim.window_tokens - w.tokens) if lim.tpm else None,
        )

    def peek(self, model: str) -> QuotaDecision:
        """Remaining quota without charging (for headers on answers that were not admitted here)."""
        if not self._applies(model):
            return QuotaDecision(True, "", 0.0, None, None, None, None)
        w = self._windows.setdefault(model, SlidingWindow())
        w.expire(self.clock(), self.limits.window_s)
        return self._decision(w, True, "", 0.0)

    def try_acquire(self, model: str, tokens: int) -> QuotaDecision:
        """Admit and charge `tokens`, or refuse with the exact wait until the request would fit."""
        decision = self._decide(model, tokens)
        if self._applies(model):
            self.timeline.append(Decided(self.clock() - self._since, tokens, decision.allowed))
        return decision

    def _decide(self, model: str, tokens: int) -> QuotaDecision:
        if not self._applies(model):
            return QuotaDecision(True, "", 0.0, None, None, None, None)
        lim = self.limits
        now = self.clock()
        w = self._windows.setdefault(model, SlidingWindow())
        w.expire(now, lim.window_s)
        max_requests, max_tokens = lim.window_requests, lim.window_tokens
        if lim.tpm and tokens > max_tokens:
            return self._decision(w, False, "too_large", lim.window_s)
        waits: list[tuple[float, str]] = []
        if lim.rpm and len(w.entries) >= max_requests:
            # the entry whose expiry brings the count down to max_requests - 1
            t_free = w.entries[len(w.entries) - max_requests][0]
            waits.append((t_free + lim.window_s - now, "requests"))
        if lim.tpm and w.tokens + tokens > max_tokens:
            need = w.tokens + tokens - max_tokens
            freed = 0
            for t, tok in w.entries:
                freed += tok
                if freed >= need:
                    waits.append((t + lim.window_s - now, "tokens"))
                    break
        if waits:
            retry, reason = max(waits)
            return self._decision(w, False, reason, retry)
        w.entries.append((now, tokens))
        w.tokens += tokens
        return self._decision(w, True, "", 0.0)
