"""How many instances share the quota right now, counted in the app's own storage account (`VLM_RATE_PEERS`).

Why: the rate-limit headers carry no instance count, and without it the adaptive share keeps whatever
split the instances settle on (docs/throughput.md, sessions 6-8): a late instance keeps one call per
window, and at the end of a batch the instance with the smallest share holds the last items while the
others' part of the window stands empty. With the count N and its rank r among the live instances,
each instance paces to 1/N of the quota, and the last, partial call of each share goes to a fixed
part of them (`shared/limiter.py`), so N partial calls do not round up together into a 429.

How: while an instance has model calls waiting or in flight, or charges still in its limiter's window,
it writes an empty blob
`peers/<instance id>` every `period_s` and lists the prefix. The blobs the storage service stamped
within `ttl_s` of our own write (its clock, not ours) are the live instances; our rank is our place
among their names. An instance with nothing to do and nothing left in its window for a whole period
deletes its blob, so the ones still busy take its part at their next listing (not sooner: the service
still counts its charges until they leave); one that stops without a word (a crash, a recycled
host) drops out after `ttl_s`. A storage fault keeps the last count: the
remaining-headers and 429s still hold the limiter back, and a count that was never read leaves the
adaptive share in charge. The cost is one write and one list per instance and period while busy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from .clock import Clock, MonotonicClock

log = logging.getLogger(__name__)

PREFIX = "peers/"
TTL_PERIODS = 2.5  # a beat may be late by a period and a half (a slow write, a busy loop) before it drops out
MIN_PERIOD_S = 2.0  # one write and one list per busy instance at most every 2 s
MAX_PERIOD_S = 10.0
FIRST_LIST_S = 1.0  # instances starting together have written by then (a write takes tens of milliseconds)
STALE_S = 86_400.0  # blobs of instances gone for a day are deleted by whoever lists them
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def period_for(window_s: float) -> float:
    """A fifth of the quota window, within 2-10 s: a joining or leaving instance changes the others' split
    within about a fifth of a window, at 6-30 storage operations a minute per busy instance."""
    return min(MAX_PERIOD_S, max(MIN_PERIOD_S, window_s / 5))


def blob_name(instance_id: str) -> str:
    """`peers/<id>`: the platform's id as is when it is a plain token, else its hash (a blob name is hostile
    input to storage's naming rules like any other)."""
    token = instance_id if _SAFE_ID.match(instance_id) else hashlib.sha256(instance_id.encode()).hexdigest()[:32]
    return PREFIX + token


@dataclass(frozen=True)
class PeerView:
    """The last count read: `count` live instances, this one included (0: never read), and our `rank` among them."""

    count: int = 0
    rank: int = 0


class PeerStore(Protocol):
    """Where the beats are kept: the storage service's time of each write is what ages them."""

    async def beat(self, name: str) -> datetime: ...

    async def listing(self, prefix: str) -> list[tuple[str, datetime]]: ...

    async def remove(self, name: str) -> None: ...


class BlobPeerStore:
    """Beats as empty blobs in one container (the app's cache container): `last_modified` is the service's clock."""

    def __init__(self, container: Callable[[], Awaitable[Any]]) -> None:
        self._container = container  # the app's BlobStore.container for the right name: created lazily, per loop

    async def beat(self, name: str) -> datetime:
        container = await self._container()
        written = await container.get_blob_client(name).upload_blob(b"", overwrite=True)  # a dict of its properties
        return written["last_modified"]

    async def listing(self, prefix: str) -> list[tuple[str, datetime]]:
        container = await self._container()
        return [(b.name, b.last_modified) async for b in container.list_blobs(name_starts_with=prefix)]

    async def remove(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            await (await self._container()).delete_blob(name)
        except ResourceNotFoundError:
            pass  # another instance cleared it first


class PeerRegistry:
    """Keeps `view` current while any watched limiter is busy (see the module docstring)."""

    def __init__(self, store: PeerStore, instance_id: str, period_s: float, clock: Clock | None = None) -> None:
        if period_s <= 0:
            raise ValueError("period_s must be > 0")
        self.view = PeerView()
        self.name = blob_name(instance_id)
        self.period_s = period_s
        self.ttl_s = TTL_PERIODS * period_s
        self.reads = 0  # listings that updated the view
        self.faults = 0  # storage errors (the view kept its last count)
        self._store = store
        self._clock: Clock = clock or MonotonicClock()
        self._watchers: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._last_busy = -math.inf  # the last time a call wanted quota or a watched limiter was busy

    def watch(self, busy: Callable[[], bool], changed: Callable[[], None]) -> None:
        """A limiter: its calls waiting or in flight, or charges still in its window (`busy`), keep this instance
        counted; `changed` is called when the count or our rank moves (a parked call may go sooner)."""
        self._watchers.append((busy, changed))

    def wake(self) -> None:
        """A call wants quota: start beating if we are not (from within the event loop)."""
        self._last_busy = self._clock.now()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._beat())

    def _busy_now(self) -> bool:
        return any(busy() for busy, _ in self._watchers)

    async def _beat(self) -> None:
        """Write and list every period while busy; once not busy for a whole period (nothing waiting, in flight or
        left in our window), leave the count at once by deleting our blob: the instances still busy take our
        part at their next listing.

        The first listing waits FIRST_LIST_S after our first write: instances that start together (a scale-out,
        a drop into an idle app) would otherwise each count only the ones that wrote before them, and the first
        would take the whole quota for a period. Until then the adaptive share's slow start paces us."""
        if not self.view.count:
            try:
                await self._store.beat(self.name)
            except asyncio.CancelledError:
                raise
            except Exception:  # the first refresh() below writes again, and counts and logs a fault
                pass
            await self._clock.sleep(min(FIRST_LIST_S, self.period_s))
        while True:
            await self.refresh()
            await self._clock.sleep(self.period_s)
            if self._busy_now():
                self._last_busy = self._clock.now()
            if self._clock.now() - self._last_busy >= self.period_s:
                await self._forget(self.name)
                if self._clock.now() - self._last_busy >= self.period_s:  # no call came while we left
                    return

    async def refresh(self) -> None:
        """One beat and one listing; on a storage fault the view keeps its last count."""
        try:
            stamped = await self._store.beat(self.name)
            rows = await self._store.listing(PREFIX)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.faults += 1
            log.warning("instance count not refreshed (%s); keeping %d", type(err).__name__, self.view.count)
            return
        live = sorted({name for name, at in rows if at >= stamped - timedelta(seconds=self.ttl_s)} | {self.name})
        view = PeerView(count=len(live), rank=live.index(self.name))
        self.reads += 1
        if view != self.view:
            self.view = view
            for _, changed in self._watchers:
                changed()
        for name, at in rows:  # instances gone for a day: nobody else will clear their blobs
            if at < stamped - timedelta(seconds=STALE_S):
                await self._forget(name)

    async def _forget(self, name: str) -> None:
        try:
            await self._store.remove(name)
        except Exception as err:
            log.info("instance blob %s not removed (%s); it ages out", name, type(err).__name__)

    async def close(self) -> None:
        """Stop beating and leave the count at once (best effort: otherwise we age out after a ttl)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None
        if self.view.count:
            await self._forget(self.name)
