"""Time as an injectable dependency, so rate and breaker logic can be tested without sleeping.

`MonotonicClock` is the real one (time.monotonic + asyncio.sleep); the tests' deterministic
one is `tests/fake_clock.py: FakeClock`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    """What the limiter and the breaker need from time: a monotonic reading and a way to wait."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The production clock: monotonic seconds (immune to wall-clock jumps) and asyncio.sleep."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
