"""The timer trigger: NCRONTAB schedules (six fields, seconds first), one invocation at a time.

Like the Functions timer extension: `schedule` is `{second} {minute} {hour} {day} {month}
{day-of-week}` in UTC (https://learn.microsoft.com/azure/azure-functions/functions-bindings-timer#ncrontab-expressions),
`%SETTING%` references are resolved from the settings, a run that is still going when the next
occurrence comes skips it (the real host holds a singleton lock per timer function), and
`runOnStartup: true` fires once when the host starts. The schedule is parsed by `cronsim`
(which takes the seconds-first six-field form).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from local.host_blob import InvocationLogger
from local.host_loader import LoadedFunction, stop_listener

log = logging.getLogger("local.host")


def next_fire(schedule: str, after: datetime) -> datetime:
    """The first occurrence of an NCRONTAB schedule strictly after `after` (UTC). ValueError when malformed."""
    from cronsim import CronSim, CronSimError

    fields = schedule.split()
    if len(fields) != 6:  # cronsim also takes five fields; NCRONTAB in function.json has six
        raise ValueError(f"timer schedule {schedule!r} must have six fields (seconds first)")
    try:
        return next(CronSim(schedule, after))
    except (CronSimError, StopIteration) as e:
        raise ValueError(f"timer schedule {schedule!r} is not a valid NCRONTAB expression") from e


@dataclass
class TimerTriggerListener:
    """Fires one function on a schedule."""

    fn: LoadedFunction
    schedule: str
    run_on_startup: bool
    timeout_s: float | None
    log_invocation: InvocationLogger
    _poller: asyncio.Task[None] | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        next_fire(self.schedule, datetime.now(UTC))  # a bad schedule fails at start-up, like the real host

    def start(self) -> None:
        self._poller = asyncio.create_task(self._loop(), name=f"timer:{self.fn.spec.name}")

    async def stop(self, grace_s: float) -> None:
        await stop_listener(self._poller, self._tasks, grace_s)

    async def _loop(self) -> None:
        from azure.functions.timer import TimerRequest

        if self.run_on_startup:
            await self._fire(TimerRequest(past_due=False))
        while True:
            now = datetime.now(UTC)
            due = next_fire(self.schedule, now)
            await asyncio.sleep(max(0.0, (due - now).total_seconds()))
            late = (datetime.now(UTC) - due).total_seconds() > 1.0
            await self._fire(TimerRequest(past_due=late))

    async def _fire(self, request: object) -> None:
        """One invocation, awaited: occurrences that pass while it runs are skipped."""
        task = asyncio.create_task(
            self.fn.invoke_logged(
                request,
                trigger="timer",
                detail=self.schedule,
                timeout_s=self.timeout_s,
                log_invocation=self.log_invocation,
            )
        )
        self._tasks.add(task)  # stays until done: a stopping host gives it the grace period
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)
