"""Client-side RPM / TPM limiter that keeps a Functions instance inside its model quota.

Why client-side: every 429 costs a round trip plus the SDK's retry delay, and a burst of
concurrent calls that all hit 429 at once then all retry at once (thundering herd). The
limiter spends the quota deliberately instead:

- Two token buckets (requests and tokens). A bucket holds `window_s` worth of quota
  (capacity = rate x window_s, i.e. `rpm` / `tpm` with the default 60 s) and refills
  continuously at rpm/60 and tpm/60 per second. Azure evaluates quota over 1 s or 10 s
  windows, so `window_s=10` gives an Azure-like burst of a sixth of a minute's quota.
  0 disables a dimension.
- `acquire()` is strictly FIFO: only the head of the queue may take from the buckets, so a
  big image request is never starved by a stream of small ones. A request bigger than the
  whole bucket is let through once the bucket is full and leaves it in debt, which later
  callers wait out (otherwise it could never run).
- The estimate is corrected afterwards: `Reservation.settle(actual)` refunds or charges
  the difference; `Reservation.cancel()` refunds everything when the call never reached
  the model.
- It learns from the server through an HTTP response hook installed on the client handed
  to the openai SDK, so it also sees the 429s the SDK retries internally (the SDK stays the
  only retry layer): `x-ratelimit-remaining-*` can only lower the buckets, and a 429 pauses
  every caller until the server's retry-after, then restarts the buckets empty so waiters
  are let go at the refill rate rather than all at once.

Single event loop, no threads (the Functions Python worker runs async functions on one
loop). All time comes from the injected `Clock`.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .clock import Clock, MonotonicClock

if TYPE_CHECKING:
    pass

REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
RETRY_AFTER_MS = "retry-after-ms"
RETRY_AFTER = "retry-after"

# A 429 without a usable retry-after still pauses everyone briefly (the SDK backs off 0.5-8 s); the
# same default is the Retry-After a caller is given for such a 429 (shared/model.py).
DEFAULT_RETRY_AFTER_S = 1.0
# Same ceiling as the openai SDK's MAX_RETRY_AFTER_DELAY: beyond it the SDK gives up anyway,
# and a bogus HTTP date must not freeze the instance.
MAX_PAUSE_S = 120.0
# Float slack so that waiting exactly the computed time is always enough.
_EPS = 1e-9


class ResponseLike(Protocol):
    """What the hook reads from a response: httpx.Response and httpx2.Response both fit."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


@dataclass
class _Bucket:
    """A continuously refilling token bucket; `level` may go negative (debt)."""

    capacity: float
    rate: float  # units per second
    level: float
    last: float  # time of the last refill; may lie in the future while a throttle pause runs

    def refill(self, now: float) -> None:
        if now > self.last:
            self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
            self.last = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` (at most the capacity) is available; 0 when it already is."""
        need = min(amount, self.capacity)
        missing = need - self.level
        return 0.0 if missing <= _EPS * max(1.0, need) else missing / self.rate

    def add(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


@dataclass(eq=False)
class _Waiter:
    tokens: int
    wake: asyncio.Future[None] | None = None


@dataclass(eq=False)
class Reservation:
    """Quota taken for one model call; settle it with the real usage (or cancel it)."""

    limiter: RateLimiter = field(repr=False)
    estimated_tokens: int
    waited_s: float = 0.0
    done: bool = False

    def settle(self, actual_tokens: int) -> int:
        """Return (estimated - actual) tokens to the bucket; negative means more was taken.

        Idempotent: only the first settle/cancel counts (returns 0 afterwards).
        """
        if self.done:
            return 0
        self.done = True
        delta = self.estimated_tokens - max(0, int(actual_tokens))
        self.limiter._give_back(requests=0, tokens=delta)
        return delta

    def cancel(self) -> None:
        """The call never reached the model: refund the request and every estimated token."""
        if self.done:
            return
        self.done = True
        self.limiter._give_back(requests=1, tokens=self.estimated_tokens)


class RateLimiter:
    """FIFO RPM/TPM limiter with server feedback (see the module docstring)."""

    def __init__(self, rpm: int, tpm: int, clock: Clock | None = None, window_s: float = 60.0) -> None:
        if rpm < 0 or tpm < 0:
            raise ValueError("rpm and tpm must be >= 0 (0 disables a dimension)")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.rpm = rpm
        self.tpm = tpm
        self.window_s = window_s
        self._clock: Clock = clock or MonotonicClock()
        now = self._clock.now()
        self._requests = self._bucket(rpm, now)
        self._tokens = self._bucket(tpm, now)
        self._queue: deque[_Waiter] = deque()
        self._paused_until = -math.inf
        self._acquired = 0
        self._throttles = 0
        self._total_wait_s = 0.0
        self._max_wait_s = 0.0

    def _bucket(self, per_minute: int, now: float) -> _Bucket | None:
        if per_minute <= 0:
            return None
        rate = per_minute / 60.0
        capacity = rate * self.window_s
        return _Bucket(capacity=capacity, rate=rate, level=capacity, last=now)

    @property
    def enabled(self) -> bool:
        return self._requests is not None or self._tokens is not None

    # --- acquiring --------------------------------------------------------------------

    async def acquire(self, estimated_tokens: int) -> Reservation:
        """Wait (FIFO) until one request and `estimated_tokens` are available, then take them.

        Cancelling the waiting task removes it from the queue cleanly (use asyncio.timeout
        around it to bound the wait).
        """
        tokens = max(0, int(estimated_tokens))
        start = self._clock.now()
        if not self._queue and self._try_take(tokens) == 0.0:
            return self._granted(tokens, start)
        waiter = _Waiter(tokens)
        self._queue.append(waiter)
        try:
            while True:
                delay: float | None = None
                if self._queue[0] is waiter:
                    delay = self._try_take(tokens)
                    if delay == 0.0:
                        break
                await self._park(waiter, delay)
        except BaseException:
            was_head = bool(self._queue) and self._queue[0] is waiter
            self._queue.remove(waiter)
            if was_head:
                self._wake_head()
            raise
        self._queue.popleft()
        self._wake_head()
        return self._granted(tokens, start)

    @asynccontextmanager
    async def reserve(self, estimated_tokens: int) -> AsyncIterator[Reservation]:
        """`async with limiter.reserve(n) as r: ...; r.settle(usage.total_tokens)`.

        Leaving the block without settle/cancel keeps the estimate charged, also on an
        exception: the request may have reached the model, so refunding would over-admit.
        A cancelled block (CancelledError, a BaseException) gives the reservation back:
        keeping it would leave the limiter owing for calls that were abandoned.
        """
        reservation = await self.acquire(estimated_tokens)
        try:
            yield reservation
        except asyncio.CancelledError:
            reservation.cancel()
            raise
        finally:
            reservation.done = True

    def _try_take(self, tokens: int) -> float:
        """Take one request and `tokens` now and return 0, or return the seconds to wait."""
        now = self._clock.now()
        if now < self._paused_until:
            return self._paused_until - now
        wait = 0.0
        if self._requests is not None:
            self._requests.refill(now)
            wait = max(wait, self._requests.wait_for(1))
        if self._tokens is not None:
            self._tokens.refill(now)
            wait = max(wait, self._tokens.wait_for(tokens))
        if wait > 0.0:
            return wait
        if self._requests is not None:
            self._requests.level -= 1
        if self._tokens is not None:
            self._tokens.level -= tokens
        return 0.0

    async def _park(self, waiter: _Waiter, delay: float | None) -> None:
        """Block until woken (became head, quota refunded) or, for the head, `delay` elapsed."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter.wake = wake
        try:
            if delay is None:
                await wake
                return
            timer = asyncio.ensure_future(self._clock.sleep(delay))
            try:
                await asyncio.wait({wake, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
        finally:
            waiter.wake = None
            if not wake.done():
                wake.cancel()

    def _wake_head(self) -> None:
        if self._queue:
            wake = self._queue[0].wake
            if wake is not None and not wake.done():
                wake.set_result(None)

    def _granted(self, tokens: int, start: float) -> Reservation:
        waited = self._clock.now() - start
        self._acquired += 1
        self._total_wait_s += waited
        self._max_wait_s = max(self._max_wait_s, waited)
        return Reservation(self, tokens, waited_s=waited)

    def _give_back(self, requests: int, tokens: int) -> None:
        """Apply a settle/cancel correction (positive = refund, negative = extra charge).

        Refunds are dropped while a throttle pause runs: after a 429 our accounting is
        known to be optimistic and the buckets restart empty; extra charges still count.
        """
        now = self._clock.now()
        paused = now < self._paused_until
        for bucket, amount in ((self._requests, requests), (self._tokens, tokens)):
            if bucket is None or amount == 0 or (paused and amount > 0):
                continue
            bucket.refill(now)
            bucket.add(amount)
        if not paused and (requests > 0 or tokens > 0):
            self._wake_head()  # the head may be able to go earlier than it planned

    # --- server feedback --------------------------------------------------------------

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Lower the buckets to the server's `x-ratelimit-remaining-*`; never raise them.

        The server knows about traffic we cannot see (other instances, other clients), so
        when it reports less than we think we have, it is right; when it reports more, our
        own accounting (which includes calls in flight) stays. Missing, malformed or
        negative values (Azure sends -1 on some APIs) are ignored.
        """
        now = self._clock.now()
        for bucket, name in ((self._requests, REMAINING_REQUESTS), (self._tokens, REMAINING_TOKENS)):
            if bucket is None:
                continue
            remaining = _number(_header(headers, name))
            if remaining is None or remaining < 0:
                continue
            bucket.refill(now)
            bucket.level = min(bucket.level, remaining)

    def on_throttled(self, retry_after_s: float) -> None:
        """A 429: pause every caller until now + retry_after_s, then restart with empty buckets.

        All waiters queue behind the pause (no one probes the server during it); the
        buckets are drained and do not refill during the pause, so after it waiters are
        released one by one at the refill rate instead of all at once. The pause applies
        even with both dimensions disabled (it is the server's instruction), capped at
        MAX_PAUSE_S. Overlapping 429s extend the pause, never shorten it.
        """
        now = self._clock.now()
        pause = DEFAULT_RETRY_AFTER_S if math.isnan(retry_after_s) else min(max(0.0, retry_after_s), MAX_PAUSE_S)
        self._throttles += 1
        self._paused_until = max(self._paused_until, now + pause)
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
                bucket.level = min(bucket.level, 0.0)
                bucket.last = max(bucket.last, self._paused_until)

    def httpx_response_hook(
        self, *, wall_clock: Callable[[], float] = time.time
    ) -> Callable[[ResponseLike], Awaitable[None]]:
        """An async response event hook for httpx / httpx2 `AsyncClient(event_hooks=...)`.

        It runs for every HTTP attempt, including the 429s the openai SDK retries
        internally. It never raises (a hook error would fail the request). `wall_clock` is
        used only to turn an HTTP-date `Retry-After` into seconds when the response has no
        `Date` header.
        """

        async def on_response(response: ResponseLike) -> None:
            headers = response.headers
            self.observe_headers(headers)
            if response.status_code == 429:
                seconds = parse_retry_after(headers, wall_clock())
                self.on_throttled(DEFAULT_RETRY_AFTER_S if seconds is None else seconds)

        return on_response

    # --- reporting --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot for logs and benchmarks (levels are refilled to now; None = disabled)."""
        now = self._clock.now()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "available_requests": None if self._requests is None else self._requests.level,
            "available_tokens": None if self._tokens is None else self._tokens.level,
            "waiting": len(self._queue),
            "acquired": self._acquired,
            "throttles": self._throttles,
            "paused_for_s": max(0.0, self._paused_until - now),
            "total_wait_s": self._total_wait_s,
            "max_wait_s": self._max_wait_s,
        }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for httpx Headers and plain dicts alike."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, val in headers.items():
        if key.lower() == name:
            return val
    return None


def _number(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_retry_after(headers: Mapping[str, str], wall_now: float | None = None) -> float | None:
    """Seconds to wait according to a response, or None when it does not say.

    Same precedence as the openai SDK: `retry-after-ms` (milliseconds), then `retry-after`
    as (possibly fractional) seconds, then `retry-after` as an HTTP date. A date is measured
    against the response's own `Date` header when present (no client/server clock skew),
    else against `wall_now`. Negative results become 0.
    """
    ms = _number(_header(headers, RETRY_AFTER_MS))
    if ms is not None and ms >= 0:
        return ms / 1000.0
    raw = _header(headers, RETRY_AFTER)
    seconds = _number(raw)
    if seconds is not None and seconds >= 0:
        return seconds
    if raw is None:
        return None
    target = _http_date(raw)
    if target is None:
        return None
    reference = _http_date(_header(headers, "date"))
    if reference is None:
        reference = wall_now
    if reference is None:
        return None
    return max(0.0, target - reference)


def _http_date(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        parsed = email.utils.parsedate_tz(raw)
        return None if parsed is None else float(email.utils.mktime_tz(parsed))
    except (TypeError, ValueError, OverflowError):
        return None
