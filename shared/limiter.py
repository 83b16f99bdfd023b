"""Client-side RPM / TPM pacing that lets any number of instances share one deployment's quota.

Why client-side: every 429 costs a round trip plus a retry delay, and concurrent calls that all hit
429 retry together. Why adaptive: Flex Consumption runs 1 to hundreds of instances, none of which
knows how many others share the quota, so no fixed per-instance figure is right. By default the
instances count themselves in storage (the counted split below); without a count the limiter paces
like congestion control, from the service's own signals only:

- **Windows, as Azure counts.** Our own admissions are kept for `window_s` (a sliding log of
  charges, settled to what the quota charged), counted from when each request left (the router's
  request hook stamps it: `CALL`), as the server counts them; a call is admitted when it fits the window's
  capacity: `share x capacity`, never above our bound `VLM_RPM|VLM_TPM x window_s / 60`, where
  capacity is the server's window as `x-ratelimit-limit-*` names it (else our bound). Nothing
  refills early, as a token bucket would (it admits more than a window allows right after a burst).
- **The server's remaining quota.** `x-ratelimit-remaining-requests|tokens` is what is left for
  everyone in the server's window when the answered call was admitted. Minus what our window held
  then, it is what the others hold; that figure holds for one window (a higher one at once, a lower
  one only after a latency: answers of one burst arrive in any order). A call is admitted when our
  window plus the call fits `min(share x capacity, bound, capacity - others)`. A 429 (`retry-after-ms`,
  else `retry-after`) pauses every caller until then and halves `share`.
- **Slow start** (the router's limiters): a new instance sends one call until an answer's
  remaining-headers tell it what the others hold, then one more per answer (doubling per latency,
  as TCP's slow start) until an answer shows the server's window over a third full. Eight instances
  that each started at the whole quota overfilled the window before any answer came back.
- **Proportional share** (0 < share <= 1 of `VLM_RPM`/`VLM_TPM`): each answer says what part of the
  server's window was ours (in its fullest dimension): `part = own / (own + others)`. The share becomes
  that part less a headroom for the others' calls since (`HEADROOM x (1 - part)`, none when alone): at
  once when lower, by 15% of the gap per answer when higher (an answer taken just as the others'
  charges left the window would otherwise take their next calls' room). Where a latency is at most 5%
  of the window (fresh figures: the room shown is a moment old and `capacity - others` catches a share
  briefly too high), it moves half-way to each reading instead, both ways, once our slow start is
  over: it takes up the room the others leave within a few answers, and one noisy low reading (a
  part is a handful of calls) no longer cuts it at once. Every instance may grow its
  part by the same factor, so together they fill the window without overfilling it, without knowing
  N; one instance alone keeps 1. The same factor keeps whatever ratios the shares have: they do not
  even out (1.4-3.3x apart at 8 instances, and an instance that starts into a full window keeps one
  call: docs/throughput.md, session 8; a fixed split below is the opt-in). A share is rarely a
  whole number of calls: the last, partial call is admitted with the probability of its fraction (a fresh draw after
  each admission), so eight instances with 2.75 calls each do not all round down to 2.
- **Probe when idle.** The share rises only on an answer, so an instance held back by its share with
  nothing in flight learns nothing. When the queue runs dry, the instances left holding the last items
  would wait for their own charges to leave the window while the others' part of it stands empty (at a
  60 s window, a whole window for the last few calls). After a tenth of a window of such waiting,
  one call goes if the room the server last showed still holds one call for each other instance
  (about 1 / share of them) after ours; its answer updates the share as any other. Only where a
  latency is at most 5% of the window (the room shown is a latency old when the probe lands) and
  that margin is at most 15% of it (beyond, the room shown is mostly the others' calls to come).
- `VLM_RPM` / `VLM_TPM` are the upper bound for one instance (set them to the deployment's
  quota), not a divisor. 0 disables a dimension until the server names its limit in
  `x-ratelimit-limit-requests|tokens`, which is then used as the bound.
- **Counted split** (`peers`, `VLM_RATE_PEERS=storage`, the default): the busy instances count themselves
  in the app's storage account (shared/peers.py). Once a count N is read, the limiter paces as the fixed
  split below with that N, and wakes a waiting call when N changes; the last, partial call of each part
  goes by rank (rank / N, not a draw), so of N partial calls of fraction f, floor(N x f) go in a window.
  Until the first count (a second after start) and whenever storage never answered, the adaptive share
  above paces. Why: the headers carry no N, and the adaptive share keeps whatever split the instances
  settle on; at 10 s windows a random draw per instance sent a binomial number of partial calls, over
  the quota about half the time (docs/throughput.md, session 9).
- **Fixed split** (`split` = N, `VLM_RATE_SPLIT`), opt-in for apps whose instance count is pinned: each
  instance paces to its bound / N, fixed. No slow start, no share, no probe; the remaining-headers still
  keep it out of a window the others have filled, and a 429 pauses it without a cut. The proportional
  share is efficient but keeps whatever split the instances settle on, so an instance that starts
  while the others fill the quota keeps one call per window (`python -m bench.limiter_sim --join`);
  a fixed split gives it its 1/N at once, and leaves (N - running) / N of the quota unused while fewer
  instances run.

`acquire()` is strictly FIFO: only the head of the queue may take quota, so a big image request is
never starved by small ones. A request bigger than the window's capacity is let through when our
window is empty (otherwise it could never run). `Reservation.settle(actual)` corrects the charge;
`Reservation.cancel()` refunds it when the call never reached the model. Single event loop, no
threads; all time comes from the injected `Clock`.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .clock import Clock, MonotonicClock

if TYPE_CHECKING:
    pass

REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
LIMIT_REQUESTS = "x-ratelimit-limit-requests"
LIMIT_TOKENS = "x-ratelimit-limit-tokens"
RETRY_AFTER_MS = "retry-after-ms"
RETRY_AFTER = "retry-after"
SHOULD_RETRY = "x-should-retry"
PACED_HEADER = "x-vlm-paced-retry"  # set on a 429 whose retry the caller makes through acquire()

# A 429 without a usable retry-after still pauses everyone briefly (the SDK backs off 0.5-8 s); the
# same default is the Retry-After a caller is given for such a 429 (shared/model.py).
DEFAULT_RETRY_AFTER_S = 1.0
# Same ceiling as the openai SDK's MAX_RETRY_AFTER_DELAY: beyond it the SDK gives up anyway,
# and a bogus HTTP date must not freeze the instance.
MAX_PAUSE_S = 120.0
# AIMD constants (see the module docstring). MIN_SHARE lets ~250 instances share one quota; below
# one call per window an instance still sends one call whenever its window is empty.
MIN_SHARE = 1 / 256
DECREASE_ON_429 = 0.5
HEADROOM = 0.08
SLOW_START_EXIT = 2.0
RISE = 0.15
# Where a latency is a small part of the window (FRESH_LATENCY), an answer's figures are fresh: the room they show is
# what the others left a moment ago, and the `capacity - others` check catches a share that is briefly too high.
# There, after our slow start, the share moves this part of the way to each reading, up or down: it follows the room
# left by the others' last calls within a few answers (RISE alone took a window's worth of answers, and the first
# window's last calls, echoed in every later window, made the run's tail), and one low reading (a part is a handful
# of calls, so its readings are noisy) no longer cuts it at once. Answers to calls admitted during our slow start
# describe a window everyone was still doubling into, and keep the rules above.
FOLLOW_FRESH = 0.5
FRESH_LATENCY = 0.05
GUARD_OF_WINDOW = 0.05  # our charges count up to 5% of a window (or a quarter latency) longer
# Probe: an idle instance (nothing in flight) whose head has waited this part of a window on its share alone may
# send one call into the room the server last showed, if that room still holds one call for each of the others
# (about 1 / share of them) after ours. When the queue runs dry, the instances left holding the last items would
# otherwise wait for their own charges to leave the window while the others' part of it stands empty.
# Only where the figures are fresh (FRESH_LATENCY): the room shown is a latency old when the probe lands, and
# at a 10 s window the others' calls of that latency fill it (simulated: more 429s, no faster).
# Nor where one call per other instance is over 15% of the window: with that many others, the room a figure
# shows is mostly their calls still to come (simulated at 32 instances: probes into a full window drew 429s,
# whose halved shares cost a window).
PROBE_WAIT = 0.1
PROBE_MARGIN = 1.0
PROBE_MAX_MARGIN = 0.15
RACE_OF_WINDOW = 0.1  # a 429 that clears within a tenth of a window is a race at its edge, not too many calls
# How far back an answer's admission may lie (its headers were computed then); beyond, latency is ignored.
MAX_LAG_S = 30.0
# The reservation whose model call is being made: the router sets it around the SDK call, and the hooks (same
# task) read it. The request hook stamps when the request left, which is when the server's window starts counting
# it: the pipeline's work between admission and sending (the first call of an instance: 0.45 s on the bench, more
# than the guard) otherwise let our charge leave our window before the server's, and every instance's first calls
# were replaced into a full window, a burst of 429s at the first window's end. The response hook reads it to know
# "what we held when the server computed these headers" exactly, not from a latency estimate (an estimate that
# missed our own calls counted them as the others' and stalled us for a window).
CALL: ContextVar[Reservation | None] = ContextVar("vlm_limiter_call", default=None)
# Float slack so that waiting exactly the computed time is always enough.
_EPS = 1e-9


class ResponseLike(Protocol):
    """What the hook reads from a response: httpx.Response and httpx2.Response both fit."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


@dataclass(eq=False)
class _Charge:
    """One admission in our window: settled in place, zeroed when cancelled."""

    at: float
    requests: int
    tokens: int
    sent: float | None = None  # when its request left (the request hook); the server counts it from then

    @property
    def start(self) -> float:
        """When the server's window began to count it (as near as we can tell)."""
        return self.at if self.sent is None else self.sent


class _Window:
    """Our own charges over the last `window_s` seconds (the way the quota counts them)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.hold_s = window_s  # how long a charge counts: the window plus a guard (see RateLimiter._guard)
        self.entries: deque[_Charge] = deque()
        self.requests = 0
        self.tokens = 0
        self.gone: deque[_Charge] = deque()  # expired lately: an answer's headers describe its admission time

    def expire(self, now: float) -> None:
        # in admission order, but a later admission's request may leave first: any charge whose time is up goes
        kept: deque[_Charge] = deque()
        for charge in self.entries:
            if charge.start + self.hold_s <= now + _EPS:
                self.requests -= charge.requests
                self.tokens -= charge.tokens
                self.gone.append(charge)
            else:
                kept.append(charge)
        self.entries = kept
        while self.gone and self.gone[0].start + self.window_s + MAX_LAG_S < now:
            self.gone.popleft()

    def held_at(self, t: float) -> tuple[int, int]:
        """(requests, tokens) our window held at time t (t up to MAX_LAG_S ago)."""
        held = [c for c in (*self.gone, *self.entries) if t - self.window_s < c.at <= t + _EPS]
        return sum(c.requests for c in held), sum(c.tokens for c in held)

    def add(self, charge: _Charge) -> None:
        self.entries.append(charge)
        self.requests += charge.requests
        self.tokens += charge.tokens

    def adjust(self, charge: _Charge, requests: int, tokens: int) -> None:
        """Change a charge still in the window (no-op once it expired: the window forgot it)."""
        if any(entry is charge for entry in self.entries):
            charge.requests += requests
            charge.tokens += tokens
            self.requests += requests
            self.tokens += tokens


@dataclass
class _Others:
    """What everyone else had charged in the server's window when it last told us (remaining-headers).

    Their charges leave the server's window at times we cannot see, but all of them within
    `window_s` of the observation: the figure holds until then and is 0 after, never stale for longer
    (a linear fade would promise room in mid-window that a burst at the window's start still holds)."""

    amount: float = 0.0
    at: float = -math.inf

    def now(self, now: float, window_s: float) -> float:
        return self.amount if now < self.at + window_s else 0.0

    def below(self, limit: float, window_s: float) -> float:
        """The earliest time at which `now()` <= limit (inf when limit < 0)."""
        if limit < 0:
            return math.inf
        return -math.inf if self.amount <= limit + _EPS else self.at + window_s

    def observe(self, amount: float, now: float, window_s: float, lag_s: float) -> None:
        """A higher figure always counts; a lower one only when it cannot be an older snapshot
        overtaking a newer one (answers of one burst arrive in any order, within one latency)."""
        if amount >= self.now(now, window_s) or now - self.at > lag_s:
            self.amount, self.at = amount, now


@dataclass(eq=False)
class _Waiter:
    tokens: int
    wake: asyncio.Future[None] | None = None


@dataclass(eq=False)
class Reservation:
    """Quota taken for one model call; settle it with the real charge (or cancel it)."""

    limiter: RateLimiter = field(repr=False)
    estimated_tokens: int
    waited_s: float = 0.0
    done: bool = False
    charge: _Charge | None = field(default=None, repr=False)

    def settle(self, actual_tokens: int) -> int:
        """Correct the charge to `actual_tokens`; returns (estimated - actual), 0 after the first settle/cancel."""
        if self.done:
            return 0
        self.done = True
        delta = self.estimated_tokens - max(0, int(actual_tokens))
        self.limiter._give_back(self, requests=0, tokens=delta)
        return delta

    def cancel(self) -> None:
        """The call never reached the model: refund the request and every estimated token."""
        if self.done:
            return
        self.done = True
        self.limiter._give_back(self, requests=1, tokens=self.estimated_tokens)


class Peers(Protocol):
    """The live instance count (shared/peers.py `PeerRegistry`): read at each admission, kept current by itself."""

    @property
    def view(self) -> Any: ...  # .count (0: not read yet) and .rank

    def watch(self, busy: Callable[[], bool], changed: Callable[[], None]) -> None: ...

    def wake(self) -> None: ...


class RateLimiter:
    """FIFO, windowed, AIMD-paced RPM/TPM limiter (see the module docstring)."""

    def __init__(
        self,
        rpm: int,
        tpm: int,
        clock: Clock | None = None,
        window_s: float = 60.0,
        seed: int | None = None,
        slow_start: bool = False,
        split: int = 0,
        peers: Peers | None = None,
    ) -> None:
        if rpm < 0 or tpm < 0:
            raise ValueError("rpm and tpm must be >= 0 (0 disables a dimension)")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        if split < 0:
            raise ValueError("split must be >= 0 (0: the adaptive share)")
        if split and peers is not None:
            raise ValueError("a fixed split and a counted one are exclusive")
        slow_start = slow_start and not split
        self.rpm = rpm
        self.tpm = tpm
        self._fixed_split = split  # N > 0: a fixed 1/N of the bound (see the module docstring); 0: none
        self._peers = peers  # the live instance count (shared/peers.py), once read: a split of that many
        self.window_s = window_s
        self.share = 1.0
        self._clock: Clock = clock or MonotonicClock()
        self._window = _Window(window_s)
        self._others_requests = _Others()
        self._others_tokens = _Others()
        self._queue: deque[_Waiter] = deque()
        self._paused_until = -math.inf
        self._latency_s = 0.0  # running mean from admission to settle: when an answer's headers were computed
        self._call_tokens = 0.0  # running mean of a call's charge, for the AIMD step
        self._in_flight = 0  # admitted, not yet settled or cancelled
        self._server_limit: dict[str, float] = {}  # x-ratelimit-limit-* per minute, as the server last named them
        # Our share is rarely a whole number of calls: the last, partial call is admitted with the probability
        # of its fraction (a fresh draw after each admission), so N instances fill the window on average
        # instead of each rounding down.
        self._random = random.Random(seed)
        self._dither = self._random.random()
        self._news = (
            not slow_start
        )  # has any answer told us the server's remaining quota yet (one call at a time until then)
        # Slow start, as TCP's: calls we may have in flight (one more per answer, so it doubles per latency) until the
        # server's window is half full; None once over. Eight new instances at share 1 would each fill the window.
        self._slow_start: float | None = 1.0 if slow_start else None
        self._slow_start_ended = -math.inf if not slow_start else math.inf  # when our slow start ended
        self._acquired = 0
        self._probes = 0  # calls admitted as idle probes (see PROBE_WAIT)
        self._throttles = 0
        self._total_wait_s = 0.0
        self._max_wait_s = 0.0
        if peers is not None:
            peers.watch(self._holds_quota, self._wake_head)

    def _holds_quota(self) -> bool:
        """Calls waiting or in flight, or charges still in our window: our part of the quota is in use, so we
        stay counted. Leaving with charges in the window let the others take our part while the service still
        counted it (simulated at 10 s: 2-3% 429s at the end of each run, 0% when counted until they left)."""
        if self._queue or self._in_flight:
            return True
        self._window.expire(self._clock.now())
        return bool(self._window.entries)

    @property
    def split(self) -> int:
        """N > 0: pace to 1/N of the bound (fixed, or the live instances counted); 0: the adaptive share."""
        return self._fixed_split or (self._peers.view.count if self._peers is not None else 0)

    def _partial_point(self) -> float:
        """Where our partial call's fraction must reach for it to go (see `_ready_at`). Counted instances take
        evenly spaced fixed points by rank (rank / N), so of N partial calls of fraction f, floor(N x f) go
        in every window; a draw each (`_dither`) lets a binomial number go, over the quota about half the time."""
        if self._peers is not None and self._peers.view.count:
            return self._peers.view.rank / self._peers.view.count
        return self._dither

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    def _server_capacity(self, attr: str) -> float:
        """The server's window in one dimension ("rpm" or "tpm"): as it names it, else our configured bound."""
        return self._server_limit.get(attr, getattr(self, attr)) * self.window_s / 60.0

    def _bound(self, attr: str) -> float:
        """Our bound's window capacity in one dimension ("rpm" or "tpm"): VLM_RPM|VLM_TPM scaled to the window,
        over the split when there is one."""
        return getattr(self, attr) * self.window_s / 60.0 / max(1, self.split)

    def _part(self, bound: float, capacity: float) -> float:
        """What our window may hold in one dimension. Under a split: 1/N of the bound, never above 1/N of the
        server's window (a bound set above the limit the server names asked for room the window cannot hold,
        and waited for ever). Else our share of the server's window, never above the bound."""
        split = self.split
        return min(bound, capacity / split) if split else min(self.share * capacity, bound)

    def _dims(self) -> list[tuple[float, float, _Others, Callable[[_Charge], int], int]]:
        """Per dimension: (our bound's window capacity, the server's, the others' charge, a charge's amount, the
        amount of this call). A bound below the server's limit (VLM_TPM set to a part of the quota, or a split)
        caps our window; the share and the others' calls are parts of the server's window."""
        dims: list[tuple[float, float, _Others, Callable[[_Charge], int], int]] = []
        if self.rpm:
            dims.append(
                (self._bound("rpm"), self._server_capacity("rpm"), self._others_requests, lambda c: c.requests, 1)
            )
        if self.tpm:
            dims.append((self._bound("tpm"), self._server_capacity("tpm"), self._others_tokens, lambda c: c.tokens, -1))
        return dims

    # --- acquiring --------------------------------------------------------------------

    async def acquire(self, estimated_tokens: int) -> Reservation:
        """Wait (FIFO) until one request and `estimated_tokens` fit, then take them.

        Cancelling the waiting task removes it from the queue cleanly (use asyncio.timeout
        around it to bound the wait).
        """
        tokens = max(0, int(estimated_tokens))
        start = self._clock.now()
        if self._peers is not None:
            self._peers.wake()
        if not self._queue:
            taken = self._try_take(tokens)
            if isinstance(taken, _Charge):
                return self._granted(tokens, start, taken)
        waiter = _Waiter(tokens)
        self._queue.append(waiter)
        try:
            while True:
                delay: float | None = None
                if self._queue[0] is waiter:
                    taken = self._try_take(tokens, waited_s=self._clock.now() - start)
                    if isinstance(taken, _Charge):
                        break
                    delay = taken
                await self._park(waiter, delay)
        except BaseException:
            was_head = bool(self._queue) and self._queue[0] is waiter
            self._queue.remove(waiter)
            if was_head:
                self._wake_head()
            raise
        self._queue.popleft()
        self._wake_head()
        return self._granted(tokens, start, taken)

    @asynccontextmanager
    async def reserve(self, estimated_tokens: int) -> AsyncIterator[Reservation]:
        """`async with limiter.reserve(n) as r: ...; r.settle(usage.total_tokens)`.

        Leaving the block without settle/cancel keeps the estimate charged, also on an
        exception: the request may have reached the model, so refunding would over-admit.
        A cancelled block (CancelledError, a BaseException) gives the reservation back.
        """
        reservation = await self.acquire(estimated_tokens)
        try:
            yield reservation
        except asyncio.CancelledError:
            reservation.cancel()
            raise
        finally:
            if not reservation.done:
                reservation.done = True
                self._finished()

    def _ready_at(self, now: float, tokens: int, probe: bool = False) -> float:
        """The earliest time >= now at which one more call of `tokens` fits every dimension.

        It fits when our window plus the call stays within min(share x capacity, capacity - others);
        a call bigger than our share goes when our window is empty and the others leave us our share.
        Candidate times are now and each expiry of one of our charges; between two expiries only the
        others' (decaying) figure changes, which has a closed form.
        """
        entries = sorted(self._window.entries, key=lambda e: e.start)  # in the order they leave
        expiries = [now] + [max(now, e.start + self._window.hold_s) for e in entries]
        dims = self._dims()
        for k, start in enumerate(expiries):
            end = expiries[k + 1] if k + 1 < len(expiries) else math.inf
            kept = entries[k:]
            ready = start
            if (
                self._news
                and self._slow_start is not None
                and not self.split
                and self._in_flight + 1 > self._slow_start + _EPS
            ):
                return now + self.window_s  # slow start: calls in flight, one more per answer (woken by it)
            for bound, capacity, others, amount_of, this in dims:
                need = tokens if this < 0 else this
                own = sum(amount_of(e) for e in kept)
                mine = self._part(bound, capacity)
                if probe:  # our share aside: the room the server last showed, less one call per other instance
                    margin = PROBE_MARGIN * max(1, need) / max(self.share, MIN_SHARE)
                    if own + need > bound + _EPS * max(1.0, bound) or margin > PROBE_MAX_MARGIN * capacity:
                        return math.inf  # never past our bound; nor among so many others that the room is theirs
                    ready = max(ready, others.below(capacity - own - need - margin, self.window_s))
                    continue
                if own > 0 and own + need > mine + self._partial_point() * need + _EPS * max(1.0, mine):
                    ready = math.inf
                    break
                room_needed = min(own + need, mine) if own == 0 else own + need
                ready = max(ready, others.below(capacity - room_needed, self.window_s))
            if ready < end or (ready < math.inf and k + 1 == len(expiries)):
                return max(now, ready)
        return now + self.window_s  # unreachable in practice; re-check after a window

    def _try_take(self, tokens: int, waited_s: float = 0.0) -> _Charge | float:
        """Take one request and `tokens` now, or return the seconds to wait."""
        now = self._clock.now()
        if now < self._paused_until:
            return self._paused_until - now
        if self.enabled and not self._news and self._in_flight > 0 and not self.split:
            return self.window_s  # slow start: woken by the first answer (settle or cancel), not by this timer
        if self.enabled:
            self._window.expire(now)
            ready = self._ready_at(now, tokens)
            if ready > now + _EPS and self._may_probe():
                probe_at = now + max(0.0, PROBE_WAIT * self.window_s - waited_s)
                if probe_at > now + _EPS:
                    ready = min(ready, probe_at)  # look again when a probe may go
                elif self._ready_at(now, tokens, probe=True) <= now + _EPS:
                    ready = now
                    self._probes += 1
            if ready > now + _EPS:
                return ready - now
        charge = _Charge(now, 1, tokens)
        self._in_flight += 1
        self._dither = self._random.random()
        if self.enabled:
            self._window.add(charge)
        self._call_tokens = tokens if not self._call_tokens else 0.8 * self._call_tokens + 0.2 * tokens
        return charge

    def _may_probe(self) -> bool:
        """Idle after slow start: a probe's answer is then the only way our share can learn the others left."""
        return not self.split and self._news and self._slow_start is None and self._in_flight == 0 and self._fresh()

    def _fresh(self) -> bool:
        """An answer's figures are a small part of a window old (see FRESH_LATENCY)."""
        return 0.0 < self._latency_s <= FRESH_LATENCY * self.window_s

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

    def _granted(self, tokens: int, start: float, charge: _Charge) -> Reservation:
        waited = self._clock.now() - start
        self._acquired += 1
        self._total_wait_s += waited
        self._max_wait_s = max(self._max_wait_s, waited)
        return Reservation(self, tokens, waited_s=waited, charge=charge)

    def _finished(self, wake: bool = True) -> None:
        """One admitted call is over (settled, cancelled or abandoned): in slow start the next may go."""
        self._in_flight = max(0, self._in_flight - 1)
        slow = not self._news or self._slow_start is not None
        if wake and slow and self._clock.now() >= self._paused_until:
            self._wake_head()

    def _give_back(self, reservation: Reservation, requests: int, tokens: int) -> None:
        """Apply a settle/cancel correction to the charge still in our window (positive = refund)."""
        now = self._clock.now()
        self._finished(wake=False)
        if reservation.charge is not None and self.enabled:
            self._window.expire(now)
            self._window.adjust(reservation.charge, -requests, -tokens)
            if requests == 0:  # settled: the call went through; its latency dates the next answers' headers
                lag = min(MAX_LAG_S, max(0.0, now - reservation.charge.at))
                self._latency_s = lag if not self._latency_s else 0.8 * self._latency_s + 0.2 * lag
                # Our charge reached the server some time after we took it, so it leaves the server's window later
                # than ours: replacing it the moment it leaves ours is a 429 (eight instances at load did that).
                self._window.hold_s = self.window_s + min(GUARD_OF_WINDOW * self.window_s, 0.25 * self._latency_s)
        slow = not self._news or self._slow_start is not None  # in slow start a finished call frees a place
        if now >= self._paused_until and (requests > 0 or tokens > 0 or slow or self._in_flight == 0):
            self._wake_head()  # the head may be able to go earlier than it planned

    # --- server feedback --------------------------------------------------------------

    def observe_headers(
        self,
        headers: Mapping[str, str],
        *,
        throttled: bool = False,
        admitted_at: float | None = None,
        answered: bool = True,
    ) -> None:
        """Learn from one answer's `x-ratelimit-*` headers (see the module docstring).

        `answered=False` for an error other than a 429: its missing remaining-headers do not mean the
        server never sends them.

        Missing, malformed or negative values (Azure sends -1 on some APIs) are ignored.
        """
        now = self._clock.now()
        for name, attr in ((LIMIT_REQUESTS, "rpm"), (LIMIT_TOKENS, "tpm")):
            limit = _number(_header(headers, name))
            if limit is not None and limit >= 1:
                self._server_limit[attr] = limit
                if getattr(self, attr) == 0:
                    setattr(self, attr, int(limit))  # no bound configured: the server's own limit is the bound
        if not self.enabled:
            return
        self._window.expire(now)
        if throttled and self._throttle_reports_room(headers):
            return  # not the quota's doing: it says nothing about the window (the hook pauses without a cut)
        seen: dict[str, float] = {}
        at = admitted_at if admitted_at is not None and 0.0 <= now - admitted_at <= MAX_LAG_S else None
        own_requests, own_tokens = self._window.held_at(now - self._latency_s if at is None else at)
        for name, others, per_min, own in (
            (REMAINING_REQUESTS, self._others_requests, self.rpm, own_requests),
            (REMAINING_TOKENS, self._others_tokens, self.tpm, own_tokens),
        ):
            remaining = _number(_header(headers, name)) if per_min else None
            if remaining is None or remaining < 0:
                continue
            seen[name] = remaining
            # Used by everyone minus what we held when the answered call was admitted (one latency ago;
            # calls we admitted since are in neither figure).
            capacity = self._server_capacity("rpm" if name == REMAINING_REQUESTS else "tpm")
            others.observe(max(0.0, capacity - remaining - own), now, self.window_s, self._latency_s)
        if not seen:
            if answered and not throttled and not self._news:  # no remaining-headers: nothing to start slowly
                self._slow_start = None  # from; our bound paces alone (waiting for news would keep one call going)
                self._news = True
                self._wake_head()
            return
        if not self._news:  # slow start is over: the server has told us what the others hold
            self._news = True
            self._wake_head()
        if throttled or self.split:
            return  # a split is fixed: the others' figure (the room) was all this answer could change
        # Proportional share: in the fullest dimension, what we held of what everyone held when the answered
        # call was admitted. Each instance may grow its part of the window by the same factor, so together they
        # fill the window without overfilling it, whatever their number; one instance alone gets all of it.
        fullest: tuple[float, float, float, float, float] | None = None
        for name, own, others in (
            (REMAINING_REQUESTS, own_requests, self._others_requests),
            (REMAINING_TOKENS, own_tokens, self._others_tokens),
        ):
            if name not in seen:
                continue
            # the server's window as it names it (a bound configured above it is not the others' calls)
            capacity = self._server_capacity("rpm" if name == REMAINING_REQUESTS else "tpm")
            # the others' figure is the highest of the answers of the last latency (an answer admitted early in a
            # burst saw fewer of the others' calls)
            used = max(capacity - seen[name], own + others.now(now, self.window_s), float(own))
            if used > 0 and (fullest is None or used / capacity > fullest[0]):
                held = self._window.requests if name == REMAINING_REQUESTS else self._window.tokens
                fullest = (used / capacity, own / used, used, seen[name], held / capacity)
        if fullest is None or fullest[1] <= 0:
            return  # we held nothing then (an answer we cannot date): it says nothing about our part
        _, part, used, remaining, _held_now = fullest
        if self._slow_start is not None and remaining >= SLOW_START_EXIT * used:
            self._slow_start += 1  # the next doubling still fits the server's window
            self._wake_head()
            return
        exiting = self._slow_start is not None
        self._slow_start = None
        if exiting:
            self._slow_start_ended = now
        if exiting:  # the others were doubling too, since the answered call was admitted
            part = part * used / (used + (1.0 - part) * used)
        # headroom for what the others admitted since, none when we are alone
        measured = min(1.0, max(MIN_SHARE, part * (1.0 - HEADROOM * (1.0 - part))))
        if exiting:
            self.share = measured
        elif FOLLOW_FRESH and self._fresh() and at is not None and at >= self._slow_start_ended:
            self.share += FOLLOW_FRESH * (measured - self.share)  # see FOLLOW_FRESH
        elif measured <= self.share:
            self.share = measured
        else:  # up gently (about one call's worth per window of our calls, as TCP's 1/cwnd per ack): an answer
            # taken while others' charges had just left the window would otherwise grab their next calls' room
            self.share += RISE * (measured - self.share)

    def _held_fractions(self) -> list[tuple[float, None, None, float]]:
        scale = self.window_s / 60.0
        out: list[tuple[float, None, None, float]] = []
        if self.rpm:
            out.append((self.rpm * scale, None, None, float(self._window.requests)))
        if self.tpm:
            out.append((self.tpm * scale, None, None, float(self._window.tokens)))
        return out

    def _throttle_reports_room(self, headers: Mapping[str, str]) -> bool:
        """True when a 429's own `x-ratelimit-remaining-*` leave room for two more calls in every
        dimension it reports: the quota did not refuse this call (a busy region, a noisy neighbour),
        so it says nothing about congestion. Cutting the share on such 429s (a few percent of calls)
        would shrink an instance far below its quota, as random loss does to TCP."""
        checks = 0
        for name, need in ((REMAINING_TOKENS, 2 * max(1.0, self._call_tokens)), (REMAINING_REQUESTS, 2.0)):
            remaining = _number(_header(headers, name))
            if remaining is None or remaining < 0:
                continue
            if remaining < need:
                return False
            checks += 1
        return checks > 0

    def on_throttled(self, retry_after_s: float, *, congestion: bool = True) -> None:
        """A 429: pause every caller until now + retry_after_s and halve the share (once per pause).

        With `congestion=False` (a 429 whose own headers report room: `_throttle_reports_room`) the pause
        is all: no cut, and the window is not taken to be full.

        No one probes the server during the pause; the server's window is then taken to be full
        (the others hold what we do not) until our next answer says otherwise or a window has
        passed, so after the pause waiters go as our own charges leave the window. The pause applies even with both dimensions disabled
        (it is the server's instruction), capped at MAX_PAUSE_S. Overlapping 429s extend the
        pause, never shorten it.
        """
        now = self._clock.now()
        pause = DEFAULT_RETRY_AFTER_S if math.isnan(retry_after_s) else min(max(0.0, retry_after_s), MAX_PAUSE_S)
        self._throttles += 1
        if not congestion or self.split:  # see _throttle_reports_room (a split is fixed): wait as told, no more
            self._paused_until = max(self._paused_until, now + pause)
            return
        if self._slow_start is not None and self.enabled:  # slow start overshot: half of what our window holds
            self._window.expire(now)
            held = [own / cap for cap, _, _, own in self._held_fractions()]
            self.share = max(MIN_SHARE, min(self.share, max(held, default=1.0)))
            self._slow_start = None
        if now >= self._paused_until and pause >= RACE_OF_WINDOW * self.window_s:  # one cut per event
            self.share = max(MIN_SHARE, self.share * DECREASE_ON_429)
        self._paused_until = max(self._paused_until, now + pause)
        if self.enabled:
            self._window.expire(now)
            for others, attr, own in (
                (self._others_requests, "rpm", self._window.requests),
                (self._others_tokens, "tpm", self._window.tokens),
            ):
                if getattr(self, attr):
                    full = max(0.0, self._server_capacity(attr) - own)
                    if others.now(self._paused_until, self.window_s) < full:
                        others.amount, others.at = full, self._paused_until

    def httpx_response_hook(
        self, *, wall_clock: Callable[[], float] = time.time, pace_retries: bool = False
    ) -> Callable[[ResponseLike], Awaitable[None]]:
        """An async response event hook for httpx / httpx2 `AsyncClient(event_hooks=...)`.

        It runs for every HTTP attempt, including the 429s the openai SDK retries
        internally. It never raises (a hook error would fail the request). `wall_clock` is
        used only to turn an HTTP-date `Retry-After` into seconds when the response has no
        `Date` header.

        With `pace_retries`, a retryable 429 is marked `x-should-retry: false` (the openai SDK
        obeys it) and `PACED_HEADER`, so the caller retries it through `acquire()` instead: the
        SDK's own retries all wake at the same retry-after and bypass the limiter, which at many
        instances turns one 429 into a herd of them.
        """

        async def on_response(response: ResponseLike) -> None:
            headers = response.headers
            throttled = response.status_code == 429
            call = CALL.get()
            admitted_at = call.charge.at if call is not None and call.charge is not None else None
            answered = 200 <= response.status_code < 300
            self.observe_headers(headers, throttled=throttled, admitted_at=admitted_at, answered=answered)
            if throttled:
                seconds = parse_retry_after(headers, wall_clock())
                congestion = not (self.enabled and self._throttle_reports_room(headers))
                self.on_throttled(DEFAULT_RETRY_AFTER_S if seconds is None else seconds, congestion=congestion)
                if pace_retries and _header(headers, SHOULD_RETRY) != "false":
                    try:
                        headers[SHOULD_RETRY] = "false"  # type: ignore[index]
                        headers[PACED_HEADER] = "1"  # type: ignore[index]
                    except TypeError:  # read-only headers: the SDK retries as before
                        pass

        return on_response

    def httpx_request_hook(self) -> Callable[[Any], Awaitable[None]]:
        """An async request event hook: stamps the current call's charge (`CALL`) with when its request left.

        Our window then holds the charge as long as the server's does (see `CALL`). It runs for every attempt
        (an SDK retry after a connection error re-stamps it later, which only holds the charge longer) and
        never raises.
        """

        async def on_request(_request: Any) -> None:
            call = CALL.get()
            if call is not None and call.charge is not None and call.limiter is self:
                call.charge.sent = self._clock.now()

        return on_request

    # --- reporting --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot for logs and benchmarks (available = what one more call could take now; None = off)."""
        now = self._clock.now()
        self._window.expire(now)

        def available(attr: str, others: _Others, own: int) -> float | None:
            if not getattr(self, attr):
                return None
            capacity = self._server_capacity(attr)
            return min(self._part(self._bound(attr), capacity), capacity - others.now(now, self.window_s)) - own

        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "share": self.share,
            "split": self.split,
            "slow_start": self._slow_start,
            "available_requests": available("rpm", self._others_requests, self._window.requests),
            "available_tokens": available("tpm", self._others_tokens, self._window.tokens),
            "waiting": len(self._queue),
            "in_flight": self._in_flight,
            "acquired": self._acquired,
            "throttles": self._throttles,
            "probes": self._probes,
            # admission to answer, running mean: figures are fresh (the following and the probe apply) up to
            # FRESH_LATENCY of the window
            "latency_s": self._latency_s,
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
