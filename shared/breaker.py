"""Circuit breakers, one per model deployment, so a deployment that is down is skipped fast.

Why: when a deployment keeps failing (5xx, timeouts, throttling that outlasts the SDK's
retries), every request would otherwise spend its whole retry budget on it before the
fallback chain moves on. After `failure_threshold` consecutive failures the breaker opens
and `allow()` says no at once, so the caller goes straight to the next deployment. After
`cooldown_s` one trial call is let through (half-open): success closes the breaker, failure
re-opens it for a fresh cooldown.

Record only upstream faults as failures (transient errors: 429 after retries, 5xx,
timeouts, connection errors), never caller errors such as a bad image or a content
filter hit: those say nothing about the deployment's health.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .clock import Clock, MonotonicClock

if TYPE_CHECKING:
    from .settings import Settings


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open (one trial) after a cooldown.

    Decisions:
    - `state` reports half_open as soon as the cooldown has elapsed, even before anyone asks.
    - Half-open admits ONE trial at a time. If the trial's outcome is never recorded (the
      caller was cancelled), the trial permit lapses after another `cooldown_s`, so the
      breaker cannot stay stuck half-open.
    - While open, late results from calls started before it opened are ignored: a late
      failure does not extend the cooldown and a late success does not close it (only the
      trial decides).
    """

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0, clock: Clock | None = None) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock: Clock = clock or MonotonicClock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_started: float | None = None
        self.opened_count = 0  # how many times it opened (for logs)

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._cooldown_over():
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after_s(self) -> float:
        """Seconds until the cooldown ends and a trial may go (0 unless open); for a Retry-After."""
        if self._state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.cooldown_s - self._clock.now())
        return 0.0

    def allow(self) -> bool:
        """May a call go to this deployment now? In half-open, True means 'you are the trial'."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock.now()
        if self._state is BreakerState.OPEN:
            if not self._cooldown_over():
                return False
            self._state = BreakerState.HALF_OPEN
            self._trial_started = None
        if self._trial_started is not None and now - self._trial_started < self.cooldown_s:
            return False  # a trial is in flight
        self._trial_started = now
        return True

    def record_success(self) -> None:
        if self._state is BreakerState.OPEN:
            return  # a straggler from before the breaker opened; the trial decides
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trial_started = None

    def record_failure(self) -> None:
        if self._state is BreakerState.OPEN:
            return  # a straggler; do not extend the cooldown
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open()

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "consecutive_failures": self._failures,
            "opened_count": self.opened_count,
            "retry_after_s": self.retry_after_s(),
        }

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock.now()
        self._trial_started = None
        self.opened_count += 1

    def _cooldown_over(self) -> bool:
        return self._clock.now() >= self._opened_at + self.cooldown_s


@dataclass
class BreakerBoard:
    """One breaker per deployment label (ModelTarget.label), created on first use."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0
    clock: Clock | None = None
    _breakers: dict[str, CircuitBreaker] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock | None = None) -> BreakerBoard:
        return cls(settings.breaker_failures, settings.breaker_cooldown_s, clock)

    def get(self, label: str) -> CircuitBreaker:
        breaker = self._breakers.get(label)
        if breaker is None:
            breaker = CircuitBreaker(self.failure_threshold, self.cooldown_s, self.clock)
            self._breakers[label] = breaker
        return breaker

    __getitem__ = get

    def __contains__(self, label: object) -> bool:
        return label in self._breakers

    def __len__(self) -> int:
        return len(self._breakers)

    def states(self) -> dict[str, str]:
        return {label: str(b.state) for label, b in self._breakers.items()}
