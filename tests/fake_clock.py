"""A deterministic clock for tests (shared.clock.Clock): time moves only when a test says so.

Every sleeper wakes at exactly its own wake time, in time order, with `now()` equal to that
instant when it resumes. Several concurrent sleepers do not distort each other's time
(unlike a fake whose `sleep(s)` just adds `s` to `now`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class FakeClock:
    """A virtual clock for tests: `sleep` parks on a future that only `advance*`/`run` resolve.

    - `await clock.advance(s)` / `advance_to(t)`: move time forward, waking sleepers one
      wake time at a time (earliest first); after each wake the event loop is run until
      idle, so woken tasks observe `now()` == their wake time and may sleep again within
      the same advance.
    - `await clock.run(aw)`: auto-advance mode. Drive `aw` to completion, jumping time to
      the next wake time whenever every task is blocked; raises if `aw` is blocked with no
      sleeper left (a deadlock that would hang forever in production).
    - `await clock.run_until_idle()`: let every runnable task run without moving time.

    "Idle" is detected by looking at the event loop's ready queue (CPython's asyncio loop
    keeps it in `_ready`); on other loops a fixed number of yields is used instead.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)  # a zero sleep still yields, as asyncio.sleep(0) does
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self._now + seconds, next(self._seq), fut))
        await fut  # a cancelled sleep cancels fut; it is dropped from the heap lazily

    @property
    def sleepers(self) -> int:
        """How many tasks are parked in `sleep` right now."""
        return sum(1 for _, _, fut in self._heap if not fut.done())

    def next_wake(self) -> float | None:
        """The earliest pending wake time, or None when nothing sleeps."""
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def run_until_idle(self, max_spins: int = 100_000) -> None:
        """Yield to the event loop until no other task is runnable (time does not move)."""
        ready = getattr(asyncio.get_running_loop(), "_ready", None)
        for spin in range(max_spins):
            await asyncio.sleep(0)
            if ready is not None:
                if not ready:
                    return
            elif spin >= 200:
                return
        raise RuntimeError("FakeClock.run_until_idle: tasks kept running without blocking (busy loop?)")

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking every sleeper due on the way, in order."""
        await self.advance_to(self._now + max(0.0, seconds))

    async def advance_to(self, when: float) -> None:
        await self.run_until_idle()
        while (wake := self.next_wake()) is not None and wake <= when:
            self._now = max(self._now, wake)
            while self._heap and self._heap[0][0] <= self._now:
                _, _, fut = heapq.heappop(self._heap)
                if not fut.done():
                    fut.set_result(None)
            await self.run_until_idle()
        self._now = max(self._now, when)
        await self.run_until_idle()

    async def run(self, aw: Awaitable[T], *, max_time: float = math.inf) -> T:
        """Await `aw`, advancing virtual time whenever everything is blocked on a sleep.

        `max_time` bounds the virtual time spent (from now) so a test cannot spin forever.
        """
        task = asyncio.ensure_future(aw)
        deadline = self._now + max_time
        try:
            while True:
                await self.run_until_idle()
                if task.done():
                    return task.result()
                wake = self.next_wake()
                if wake is None:
                    raise RuntimeError("FakeClock.run: the awaitable is blocked and no task is sleeping (deadlock)")
                if wake > deadline:
                    raise RuntimeError(f"FakeClock.run: not done after {max_time} s of virtual time")
                await self.advance_to(wake)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
