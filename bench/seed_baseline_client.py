"""The baseline we measure against: the seed design's client, written from ../shared/SEED-BASELINE.md.

Label it "baseline (seed design)" (`LABEL`) in every table. What it does, as the seed describes it:

- Image optimisation and detail selection: bench/seed_baseline.py (max side by detail, LANCZOS,
  RGB, JPEG q85, base64; small images low), with the content type declared from the bytes.
- A client-side rate limiter in front of every call, per process: 100 RPM / 100,000 TPM as the
  seed ships it, or any quota passed in. It is a sliding 60 s log of requests and estimated
  tokens; the token estimate uses the seed's stated image costs (low 85, otherwise 765), the
  prompt at 4 characters per token, and max_tokens.
- Retry: up to 3 attempts; on a rate-limit error sleep 2^attempt s (1, 2, 4), on any other error
  1 s; nothing reads Retry-After; a content-filter error returns `{"error": "content_filtered"}`
  at once. After the attempts a secondary client is tried if one is configured, and its failure
  is swallowed.
- The openai SDK runs with `max_retries=0`, so the loop above is the only retry layer.
- Batch: a semaphore of 10; per-image failures are caught and recorded as
  `{"success": false, "error": str(e)}`; results are gathered at the end.

The seed's in-memory response cache is left out: the benchmark sends distinct images, so it
would never hit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.seed_baseline import LABEL, BaselineImage, optimize

__all__ = ["LABEL", "SeedClient", "SeedRateLimiter"]

SEED_RPM = 100
SEED_TPM = 100_000
SEED_CONCURRENCY = 10
SEED_ATTEMPTS = 3
# The seed's stated image costs ("low about 85 tokens; high about 765"): what its limiter counts.
STATED_IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}


def declared_type(data: bytes) -> str:
    """The content type an HTTP client would declare for these bytes (the seed trusts it)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class SeedRateLimiter:
    """The seed's limiter: requests and estimated tokens over the last 60 s; wait until the oldest expire."""

    def __init__(
        self,
        rpm: int = SEED_RPM,
        tpm: int = SEED_TPM,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self._clock, self._sleep = clock, sleep
        self._log: deque[tuple[float, int]] = deque()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] + self.window_s <= now:
            self._log.popleft()

    async def acquire(self, estimated_tokens: int) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                self._expire(now)
                tokens = sum(t for _, t in self._log)
                over_requests = self.rpm and len(self._log) >= self.rpm
                over_tokens = self.tpm and self._log and tokens + estimated_tokens > self.tpm
                if not over_requests and not over_tokens:
                    self._log.append((now, estimated_tokens))
                    return
                wait = self._log[0][0] + self.window_s - now
                self.waited_s += max(0.0, wait)
                await self._sleep(max(0.01, wait))


def estimate_tokens(prompt: str, detail: str, max_tokens: int) -> int:
    return STATED_IMAGE_TOKENS[detail] + len(prompt) // 4 + max_tokens


@dataclass
class SeedStats:
    calls: int = 0
    rate_limited: int = 0
    other_errors: int = 0
    content_filtered: int = 0
    slept_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


class SeedClient:
    """The seed's analyse call: limiter, 3 attempts, fixed sleeps, optional secondary client."""

    def __init__(
        self,
        base_url: str,
        model: str = "gpt-4o",
        *,
        rpm: int = SEED_RPM,
        tpm: int = SEED_TPM,
        api_key: str = "unused",
        timeout_s: float = 60.0,
        secondary: SeedClient | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        from openai import AsyncOpenAI

        self.model = model
        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        self.limiter = SeedRateLimiter(rpm, tpm)
        self.secondary = secondary
        self.stats = SeedStats()
        self._sleep = sleep

    async def _call(self, image: BaselineImage, prompt: str, max_tokens: int) -> dict[str, Any]:
        await self.limiter.acquire(estimate_tokens(prompt, image.detail, max_tokens))
        self.stats.calls += 1
        response = await self.client.chat.completions.create(
            model=self.model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt},
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/jpeg;base64,{image.b64}", "detail": image.detail},
                        },
                    ],
                }
            ],
            max_tokens=max_tokens,
        )
        usage = response.usage
        return {
            "success": True,
            "analysis": response.choices[0].message.content,
            "model": response.model,
            "usage": {
                "prompt_tokens": usage.prompt_tokens if usage else 0,
                "completion_tokens": usage.completion_tokens if usage else 0,
            },
        }

    async def analyze(
        self, data: bytes, task: str = "describe", prompt: str = "Describe this image.", max_tokens: int = 1000
    ) -> dict[str, Any]:
        import openai

        image = await asyncio.to_thread(optimize, data, declared_type(data), task)
        last: Exception | None = None
        for attempt in range(SEED_ATTEMPTS):
            try:
                return await self._call(image, prompt, max_tokens)
            except openai.RateLimitError as exc:
                last = exc
                self.stats.rate_limited += 1
                delay = 2.0**attempt
            except openai.BadRequestError as exc:
                if _is_content_filter(exc):
                    self.stats.content_filtered += 1
                    return {"error": "content_filtered"}
                last = exc
                self.stats.other_errors += 1
                delay = 1.0
            except Exception as exc:
                last = exc
                self.stats.other_errors += 1
                delay = 1.0
            if attempt < SEED_ATTEMPTS - 1:  # no pointless sleep after the last attempt
                self.stats.slept_s += delay
                await self._sleep(delay)
        if self.secondary is not None:
            try:
                return await self.secondary.analyze(data, task, prompt, max_tokens)
            except Exception:
                pass  # the seed swallows the secondary's failure
        assert last is not None
        raise last

    async def process_batch(
        self, images: Sequence[bytes], concurrency: int = SEED_CONCURRENCY, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Semaphore of `concurrency`; every failure is caught and recorded; results at the end."""
        gate = asyncio.Semaphore(concurrency)

        async def one(data: bytes) -> dict[str, Any]:
            async with gate:
                try:
                    return await self.analyze(data, **kwargs)
                except Exception as exc:
                    name = type(exc).__name__
                    self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
                    return {"success": False, "error": str(exc)}

        return list(await asyncio.gather(*(one(d) for d in images)))

    async def close(self) -> None:
        await self.client.close()
        if self.secondary is not None:
            await self.secondary.close()


def _is_content_filter(exc: Exception) -> bool:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body) if isinstance(body.get("error"), dict) else body
        if inner.get("code") == "content_filter":
            return True
    return "content_filter" in str(exc) or "content management policy" in str(exc)
