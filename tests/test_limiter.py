"""RateLimiter and FakeClock: bucket arithmetic, FIFO fairness, server feedback, throttle pauses.

Everything runs on a FakeClock: waits are measured in virtual seconds and asserted exactly,
and each test checks it took (almost) no wall time, so nothing here sleeps for a delay.
The only real wait is the 1 ms retry-after the openai SDK honours in the end-to-end hook test.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
from collections.abc import Iterator
from types import SimpleNamespace

import openai
import pytest

from shared.clock import Clock, MonotonicClock
from shared.limiter import (
    CALL,
    DEFAULT_RETRY_AFTER_S,
    HEADROOM,
    MAX_PAUSE_S,
    MIN_SHARE,
    RISE,
    RateLimiter,
    Reservation,
    parse_retry_after,
)
from tests.fake_clock import FakeClock

try:  # the openai SDK 3.x ships httpx2; older SDKs use httpx (same API)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]


@pytest.fixture(autouse=True)
def _no_real_waiting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Waits are virtual: a real sleep longer than the SDK's 1 ms retry in one test fails the test
    (recorded at the call, so a loaded machine cannot fail it the way a wall-clock bound would)."""
    slept: list[float] = []
    real_async_sleep, real_sleep = asyncio.sleep, time.sleep

    async def async_sleep(delay: float, *args: object, **kwargs: object) -> object:
        slept.append(delay)
        return await real_async_sleep(delay, *args, **kwargs)

    def sleep(delay: float) -> None:
        slept.append(delay)
        real_sleep(delay)

    monkeypatch.setattr(asyncio, "sleep", async_sleep)
    monkeypatch.setattr(time, "sleep", sleep)
    yield
    assert all(delay <= 0.01 for delay in slept), f"a limiter test slept for real: {slept}"


async def _acquire_log(limiter: RateLimiter, clock: FakeClock, tokens: int, name: str, log: list) -> Reservation:
    reservation = await limiter.acquire(tokens)
    log.append((name, clock.now()))
    return reservation


def _spawn(limiter: RateLimiter, clock: FakeClock, tokens: int, name: str, log: list) -> asyncio.Task[Reservation]:
    return asyncio.ensure_future(_acquire_log(limiter, clock, tokens, name, log))


# --- FakeClock ----------------------------------------------------------------------------


async def test_fake_clock_wakes_concurrent_sleepers_in_order_at_their_own_time() -> None:
    clock = FakeClock(start=100.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.ensure_future(sleeper(n, s)) for n, s in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0))]
    await clock.run_until_idle()
    assert clock.sleepers == 4 and clock.next_wake() == 101.0
    await clock.advance(1.5)
    assert woke == [("a", 101.0), ("a2", 101.0)] and clock.now() == 101.5
    await clock.advance(10)
    assert woke[2:] == [("b", 102.0), ("c", 103.0)]
    assert clock.now() == 111.5
    await asyncio.gather(*tasks)


async def test_fake_clock_chained_sleeps_within_one_advance_and_cancellation() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(3):
            await clock.sleep(1.0)
            ticks.append(clock.now())

    task = asyncio.ensure_future(ticker())
    doomed = asyncio.ensure_future(clock.sleep(2.5))
    await clock.run_until_idle()
    doomed.cancel()
    await clock.advance(5)
    assert ticks == [1.0, 2.0, 3.0]
    assert clock.sleepers == 0 and clock.next_wake() is None
    await task
    assert doomed.cancelled()


async def test_fake_clock_run_auto_advances_and_detects_deadlock() -> None:
    clock = FakeClock()

    async def work() -> float:
        await clock.sleep(2)
        await clock.sleep(3)
        return clock.now()

    assert await clock.run(work()) == 5.0
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(RuntimeError, match="deadlock"):
        await clock.run(never)
    with pytest.raises(RuntimeError, match="virtual time"):
        await clock.run(clock.sleep(100), max_time=10)


def test_clocks_satisfy_the_protocol() -> None:
    assert isinstance(FakeClock(), Clock) and isinstance(MonotonicClock(), Clock)
    assert MonotonicClock().now() <= MonotonicClock().now()


# --- window arithmetic --------------------------------------------------------------------


async def test_rpm_window_61st_request_waits_until_the_first_leaves_the_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=0, clock=clock)
    for _ in range(60):
        await limiter.acquire(1)  # immediate: no sleeper, no time passes
    assert clock.now() == 0.0 and clock.sleepers == 0
    reservation = await clock.run(limiter.acquire(1))
    assert clock.now() == pytest.approx(60.0)  # counted in windows, as Azure does: nothing refills early
    assert reservation.waited_s == pytest.approx(60.0)


async def test_a_backlog_goes_in_order_as_the_window_frees() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=0, clock=clock, window_s=10)  # 10 per 10 s window
    for _ in range(10):
        await limiter.acquire(0)
        await clock.advance(0.5)  # admitted at 0, 0.5, ... 4.5 s
    log: list = []
    tasks = [_spawn(limiter, clock, 0, f"r{i}", log) for i in range(5)]
    await clock.run(asyncio.gather(*tasks))
    assert [name for name, _ in log] == ["r0", "r1", "r2", "r3", "r4"]
    assert [t for _, t in log] == pytest.approx([10.0, 10.5, 11.0, 11.5, 12.0])


async def test_window_s_sets_the_burst_size() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=0, clock=clock, window_s=10)  # 10 requests per 10 s window
    for _ in range(10):
        await limiter.acquire(0)
    await clock.run(limiter.acquire(0))
    assert clock.now() == pytest.approx(10.0)


async def test_tpm_waits_until_enough_tokens_have_left_the_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    await limiter.acquire(1000)
    await clock.advance(20.0)
    await limiter.acquire(4000)
    await clock.run(limiter.acquire(2000))  # 1000 left; the 1000 from 0 s leaves the window at 60 s
    assert clock.now() == pytest.approx(60.0)
    assert limiter.stats()["available_tokens"] == pytest.approx(0.0)


async def test_both_dimensions_wait_for_the_slower_one() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=2, tpm=6000, clock=clock)
    await limiter.acquire(100)
    await clock.advance(30.0)
    await limiter.acquire(100)
    await clock.run(limiter.acquire(100))  # tokens are plentiful; the second request slot frees at 60 s
    assert clock.now() == pytest.approx(60.0)


# --- settle / cancel ----------------------------------------------------------------------


async def test_settle_refunds_an_overestimate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    reservation = await limiter.acquire(5000)
    assert reservation.settle(3000) == 2000
    assert limiter.stats()["available_tokens"] == pytest.approx(3000)
    await limiter.acquire(3000)
    assert clock.now() == 0.0
    assert reservation.settle(10) == 0  # only the first settle counts


async def test_settle_charges_an_underestimate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    reservation = await limiter.acquire(1000)
    assert reservation.settle(4000) == -3000
    assert limiter.stats()["available_tokens"] == pytest.approx(2000)
    await clock.run(limiter.acquire(3000))
    assert clock.now() == pytest.approx(60.0)


async def test_settle_never_overfills_the_bucket() -> None:
    limiter = RateLimiter(rpm=0, tpm=6000, clock=FakeClock())
    reservation = await limiter.acquire(100)
    reservation.settle(-50)  # nonsense usage is clamped to 0, refund capped at capacity
    assert limiter.stats()["available_tokens"] == pytest.approx(6000)


async def test_cancel_refunds_the_request_and_all_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=2, tpm=1000, clock=clock)
    first = await limiter.acquire(1000)
    first.cancel()
    first.cancel()  # idempotent
    stats = limiter.stats()
    assert stats["available_requests"] == pytest.approx(2) and stats["available_tokens"] == pytest.approx(1000)
    await limiter.acquire(1000)
    assert clock.now() == 0.0


async def test_a_refund_wakes_the_waiting_head_early() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    first = await limiter.acquire(6000)
    log: list = []
    waiter = _spawn(limiter, clock, 3000, "w", log)
    await clock.advance(2.0)  # head planned to wake at 30 s
    assert log == []
    first.settle(1000)  # 5000 back: 200 + 5000 available now
    await clock.run_until_idle()
    assert log == [("w", 2.0)]
    await waiter


async def test_reserve_context_manager_keeps_the_estimate_unless_settled() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    async with limiter.reserve(2000) as r:
        r.settle(500)
    assert limiter.stats()["available_tokens"] == pytest.approx(5500)
    with pytest.raises(ValueError):
        async with limiter.reserve(1000):
            raise ValueError("the call failed after it was sent")
    assert limiter.stats()["available_tokens"] == pytest.approx(4500)  # estimate stays charged


# --- fairness and big requests ------------------------------------------------------------


async def test_fifo_a_big_request_is_not_starved_by_small_ones() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    await limiter.acquire(1000)
    await clock.advance(10.0)
    await limiter.acquire(4500)  # 500 left until 60 s, 1500 until 70 s, then the whole window
    log: list = []
    big = _spawn(limiter, clock, 5000, "big", log)
    await clock.run_until_idle()
    smalls = [_spawn(limiter, clock, 100, f"s{i}", log) for i in range(3)]
    await clock.run(asyncio.gather(big, *smalls))
    # Small ones alone would have gone at once; they queue behind the big one.
    assert [name for name, _ in log] == ["big", "s0", "s1", "s2"]
    assert [t for _, t in log] == pytest.approx([70.0, 70.0, 70.0, 70.0])


async def test_a_new_arrival_queues_behind_waiters_even_if_it_would_fit() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    await limiter.acquire(5900)  # 100 left
    log: list = []
    big = _spawn(limiter, clock, 1000, "big", log)
    await clock.run_until_idle()
    small = _spawn(limiter, clock, 50, "small", log)  # 50 would fit right now
    await clock.run_until_idle()
    assert log == []
    await clock.run(asyncio.gather(big, small))
    assert [name for name, _ in log] == ["big", "small"]


async def test_a_request_bigger_than_the_window_goes_when_it_is_empty_and_leaves_debt() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    await limiter.acquire(10_000)  # empty window: allowed at once
    assert clock.now() == 0.0
    assert limiter.stats()["available_tokens"] == pytest.approx(-4000)
    await clock.run(limiter.acquire(1000))  # waits for the big one to leave the window
    assert clock.now() == pytest.approx(60.0)


async def test_a_request_bigger_than_the_window_waits_for_an_empty_one() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    await limiter.acquire(1000)
    await clock.run(limiter.acquire(50_000))
    assert clock.now() == pytest.approx(60.0)


async def test_cancelling_a_waiter_removes_it_from_the_queue() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    await limiter.acquire(5000)
    await clock.advance(1.0)
    await limiter.acquire(1000)
    log: list = []
    head = _spawn(limiter, clock, 5500, "head", log)  # needs the 5000 from 0 s gone: 60 s
    await clock.run_until_idle()
    middle = _spawn(limiter, clock, 100, "middle", log)
    await clock.run_until_idle()
    tail = _spawn(limiter, clock, 100, "tail", log)
    await clock.run_until_idle()
    assert limiter.stats()["waiting"] == 3
    middle.cancel()
    await clock.run_until_idle()
    head.cancel()  # the next head takes over and computes its own wait
    await clock.run(tail)
    assert log == [("tail", pytest.approx(60.0))]
    assert limiter.stats()["waiting"] == 0
    assert head.cancelled() and middle.cancelled()


# --- server feedback ----------------------------------------------------------------------


async def test_remaining_headers_tell_what_the_others_hold() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=6000, clock=clock)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "10", "x-ratelimit-remaining-tokens": "500"})
    stats = limiter.stats()
    assert stats["available_requests"] == pytest.approx(10) and stats["available_tokens"] == pytest.approx(500)
    # A higher remaining at the same moment may be an older answer overtaking a newer one: ignored.
    limiter.observe_headers({"X-RateLimit-Remaining-Tokens": "100000", "x-ratelimit-remaining-requests": "99"})
    assert limiter.stats()["available_tokens"] == pytest.approx(500)
    assert limiter.stats()["available_requests"] == pytest.approx(10)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "-1", "x-ratelimit-remaining-requests": "soon"})
    assert limiter.stats()["available_tokens"] == pytest.approx(500)
    limiter.observe_headers({"X-RateLimit-Remaining-Tokens": "200"})  # plain dict, other case
    assert limiter.stats()["available_tokens"] == pytest.approx(200)
    await clock.advance(5.0)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "3000"})  # later news: the others let go
    assert limiter.stats()["available_tokens"] == pytest.approx(3000)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "0"})
    await clock.run(limiter.acquire(1000))  # the others' charges are gone a window after we last heard
    assert clock.now() == pytest.approx(65.0)


async def test_without_configured_bounds_the_servers_limit_headers_become_the_bound() -> None:
    limiter = RateLimiter(rpm=0, tpm=0, clock=FakeClock())
    assert not limiter.enabled
    limiter.observe_headers({"x-ratelimit-limit-tokens": "6000", "x-ratelimit-limit-requests": "oops"})
    assert limiter.enabled and (limiter.rpm, limiter.tpm) == (0, 6000)


async def test_our_part_is_of_the_window_the_server_names_not_of_a_bound_configured_above_it() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=480, tpm=0, clock=clock, window_s=6.0)  # the server admits 120
    first = await limiter.acquire(1)
    limiter.observe_headers(
        {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "11"}, admitted_at=first.charge.at
    )
    assert limiter.share == pytest.approx(1.0)  # alone: 1 of the 1 the server holds, not 1 of 37


async def test_a_bound_below_the_servers_limit_caps_our_window_and_the_others_fill_the_servers() -> None:
    """VLM_TPM set to a part of the quota (the old advice, or room kept for another app): the others' 20000
    tokens are of the server's 30000, not of our 4000. Counted against our bound they blocked every call until
    their figure lapsed (the bench's static split ran at a quarter of the quota)."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=4000, clock=clock)
    first = await limiter.acquire(500)
    limiter.observe_headers(
        {"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": str(30000 - 20000 - 500)},
        admitted_at=first.charge.at,
    )
    first.settle(500)
    limiter.share = 1.0  # whatever the answer made of it: here the bound is what holds us
    assert limiter.stats()["available_tokens"] == pytest.approx(4000 - 500)
    for _ in range(7):
        await asyncio.wait_for(limiter.acquire(500), 0.1)  # 4000 of our 4000: no wait
    blocked = asyncio.ensure_future(limiter.acquire(500))
    await clock.advance(1.0)
    assert not blocked.done()  # 4500 would pass our bound, though the server has room
    blocked.cancel()


async def test_a_fixed_split_paces_to_its_part_of_the_bound_from_the_first_call() -> None:
    """VLM_RATE_SPLIT = 4: a quarter of 6000 tokens a window, at once (no slow start: the split is known), and
    the answers' parts never move it: a late instance gets its quarter as the others do (the adaptive share
    keeps whatever split the instances settle on)."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock, slow_start=True, split=4)
    calls = [await asyncio.wait_for(limiter.acquire(100), 0.1) for _ in range(15)]  # 1500 of 6000 / 4
    over = asyncio.ensure_future(limiter.acquire(100))
    await clock.advance(1.0)
    assert not over.done()
    # An answer that shows us holding all of a part-empty window: the adaptive share would follow it.
    limiter.observe_headers(
        {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "4500"}, admitted_at=calls[-1].charge.at
    )
    assert limiter.share == 1.0 and limiter.stats()["split"] == 4
    assert limiter.stats()["available_tokens"] == pytest.approx(0)  # still 1500 of our 1500
    await clock.advance(60.0)
    assert over.done()  # our own charges left the window
    over.cancel()


@pytest.mark.parametrize("split", [1, 4])
async def test_a_split_whose_bound_is_above_the_limit_the_server_names_paces_to_that_limit(split: int) -> None:
    """VLM_RPM set to four times what the server names (a stale or wrong setting): the split takes 1/N of the
    server's window, not of the bound. Taking 1/N of the bound asked for more room than the window holds, and
    the call waited for ever (the local throttle stack stalled after its first calls)."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=240, tpm=0, clock=clock, window_s=1.0, split=split)  # 4 requests a 1 s window
    # the server's window holds half a call: each instance sends one whenever its own window is empty
    limiter.observe_headers({"x-ratelimit-limit-requests": "30", "x-ratelimit-remaining-requests": "30"})

    async def calls() -> float:
        for _ in range(3):
            await limiter.acquire(0)
        return clock.now()

    done_at = await asyncio.wait_for(clock.run(calls()), 5)
    assert done_at == pytest.approx(2 * limiter._window.hold_s, rel=0.01)  # one call a window
    assert limiter.stats()["available_requests"] <= 0.5 / split


async def test_a_fixed_split_keeps_out_of_a_window_the_others_filled_and_a_429_only_pauses_it() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock, split=4)
    first = await limiter.acquire(100)
    limiter.observe_headers(
        {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "0"}, admitted_at=first.charge.at
    )
    first.settle(100)
    blocked = asyncio.ensure_future(limiter.acquire(100))
    await clock.advance(10.0)
    assert not blocked.done()  # within our quarter, but the others hold the rest of the server's window
    blocked.cancel()
    limiter.on_throttled(5.0)
    assert limiter.share == 1.0 and limiter.stats()["paused_for_s"] == pytest.approx(5.0)


async def test_the_share_is_our_part_of_the_servers_window_down_at_once_up_gently() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    (await limiter.acquire(1000)).settle(1000)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "2000"})  # everyone held 4000, we 1000 of it
    assert limiter.share == pytest.approx(0.25 * (1 - 0.08 * 0.75))  # our part, less headroom for the others
    limiter.on_throttled(2.0)  # clears within a tenth of the window: a race at its edge, the share stays
    assert limiter.share == pytest.approx(0.25 * (1 - 0.08 * 0.75))
    await clock.advance(2.0)
    limiter.on_throttled(10.0)
    assert limiter.share == pytest.approx(0.25 * (1 - 0.08 * 0.75) / 2)  # a 429 for longer halves it
    halved = limiter.share
    # Room again, but the 429 said the others hold all we do not (5000) for a window: our part is 1/6, and the
    # share rises by 15% of the gap to it, not at once (an answer taken just as the others' charges left the
    # window would otherwise take the room of their next calls).
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "5000"})
    risen = halved + 0.15 * ((1 / 6) * (1 - 0.08 * 5 / 6) - halved)
    assert limiter.share == pytest.approx(risen)
    await clock.advance(61.0)  # our charge has left the window: an answer we held nothing for says nothing
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "100"})
    assert limiter.share == pytest.approx(risen)
    for _ in range(20):
        limiter.on_throttled(10.0)
        await clock.advance(10.001)
    assert limiter.share == pytest.approx(MIN_SHARE)


async def test_our_part_is_counted_at_the_answered_calls_admission() -> None:
    """The headers were computed when the answered call was admitted: our calls since are in neither figure."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    first = await limiter.acquire(1000)
    await clock.advance(1.0)
    await limiter.acquire(1000)  # admitted after `first`: the server had not seen it when it answered `first`
    await clock.advance(1.0)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "3000"}, admitted_at=first.charge.at)
    assert limiter.share == pytest.approx((1 / 3) * (1 - 0.08 * 2 / 3))  # 1000 of the 3000 used, not 2000


async def test_a_charge_leaves_our_window_a_window_after_its_request_left() -> None:
    """The server counts a call from when its request arrives, not from our admission: the pipeline's work between
    the two (0.45 s for an instance's first calls on the bench, more than the guard) would otherwise free our room
    before the server's, and the call that took it would draw a 429."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=1000, clock=clock)  # 1000 a 60 s window
    sending = limiter.httpx_request_hook()
    first = await limiter.acquire(1000)
    await clock.advance(0.5)
    token = CALL.set(first)
    try:
        await sending(None)  # the request leaves at 0.5 s
    finally:
        CALL.reset(token)
    other = RateLimiter(rpm=0, tpm=1000, clock=clock)
    theirs = await other.acquire(1000)
    token = CALL.set(theirs)
    try:
        await sending(None)  # another limiter's call: not ours to stamp
    finally:
        CALL.reset(token)
    assert theirs.charge.sent is None
    second = asyncio.ensure_future(limiter.acquire(1000))
    await clock.advance(59.9)  # 60.4 s: a window after admission, not after sending
    assert not second.done()
    await clock.advance(0.2)
    assert second.done()


def _reading(part: float) -> float:
    """The share an answer reads for our part of the server's window: the part less headroom for the others."""
    return part * (1 - HEADROOM * (1 - part))


@pytest.mark.parametrize(
    ("window_s", "fresh"),
    [(60.0, True), (10.0, False)],  # an answer 1 s after admission: 1.7% of the window, or 10% of it
)
async def test_with_fresh_figures_the_share_follows_each_reading_half_way(window_s: float, fresh: bool) -> None:
    """Fresh figures (a latency at most 5% of the window): the share moves half-way to each reading, down as well as
    up, since a part of a handful of calls reads noisily and the `capacity - others` check covers a share briefly too
    high. Staler figures keep the old rules: down to a lower reading at once, up by 15% of the gap."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=round(6000 * 60 / window_s), clock=clock, window_s=window_s)  # 6000 a window
    first = await limiter.acquire(1000)
    await clock.advance(1.0)
    first.settle(1000)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "2000"}, admitted_at=first.charge.at)
    down = _reading(1000 / 4000)  # everyone held 4000 when `first` was admitted, we 1000 of it
    assert limiter.share == pytest.approx(1.0 + 0.5 * (down - 1.0) if fresh else down)
    second = await limiter.acquire(100)
    limiter.share = 0.1  # lower than the next reading, however it got there
    await clock.advance(1.0)
    second.settle(100)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "1000"}, admitted_at=second.charge.at)
    up = _reading(1100 / 5000)
    assert limiter.share == pytest.approx(0.1 + (0.5 if fresh else RISE) * (up - 0.1))


async def test_answers_to_calls_admitted_in_our_slow_start_keep_the_old_rules() -> None:
    """Calls admitted while everyone was still doubling describe a window in flux: their answers cut the share at
    once, even with fresh figures; answers to calls admitted after our slow start ended follow half-way."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock, slow_start=True)  # 6000 a 60 s window
    first = await limiter.acquire(100)
    await clock.advance(1.0)
    first.settle(100)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "5800"}, admitted_at=first.charge.at)  # room: one more
    early = [await limiter.acquire(100) for _ in range(2)]  # at 1 s, in slow start
    await clock.advance(1.0)
    early[0].settle(100)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "2000"}, admitted_at=early[0].charge.at)
    assert limiter.stats()["slow_start"] is None  # the window is two thirds full: slow start ended at 2 s
    limiter.share = 0.5  # whatever the exit made of it
    early[1].settle(100)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "1000"}, admitted_at=early[1].charge.at)
    assert limiter.share == pytest.approx(_reading(300 / 5000))  # at once: we held 300 of the 5000 used at 1 s
    limiter.share = 0.5
    await clock.advance(0.5)
    late = await limiter.acquire(100)  # at 2.5 s, after our slow start
    await clock.advance(1.0)
    late.settle(100)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "500"}, admitted_at=late.charge.at)
    assert limiter.share == pytest.approx(0.5 + 0.5 * (_reading(400 / 5500) - 0.5))  # half-way


async def _held_back_by_our_share(
    window_s: float, tpm: int, others: int, settle_all: bool = True, share: float = 0.25
) -> tuple[RateLimiter, FakeClock, asyncio.Future[Reservation]]:
    """Calls of 100 filling our share of a 6000-token window (15 at 0.25) taken at 0 s, answered after 1 s with
    the server showing `others` tokens of the others' calls; one more call queued at 1 s."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=tpm, clock=clock, window_s=window_s)
    ours = round(share * 6000)
    taken = [await limiter.acquire(100) for _ in range(ours // 100)]
    await clock.advance(1.0)
    limiter.observe_headers(
        {"x-ratelimit-remaining-tokens": str(6000 - ours - others)}, admitted_at=taken[-1].charge.at
    )
    for reservation in taken if settle_all else taken[:-1]:
        reservation.settle(100)
    limiter.share = share  # whatever the answer made of it: the calls taken are exactly our share
    queued = asyncio.ensure_future(limiter.acquire(100))
    return limiter, clock, queued


async def test_an_idle_instance_held_back_by_its_share_probes_the_room_the_server_showed() -> None:
    """When the queue runs dry, the instances left holding the last items must not wait a whole window for their
    own charges to leave it while the others' part stands empty: after a tenth of a window with nothing in
    flight, one call goes into the room the server last showed (4000 free after it, more than one call per
    other instance at a 0.25 share)."""
    limiter, clock, queued = await _held_back_by_our_share(60.0, 6000, others=500)
    await clock.advance(5.9)
    assert not queued.done()
    await clock.advance(0.2)
    assert queued.done()  # at 7 s (queued at 1 s), not at 60 s
    assert limiter.share == pytest.approx(0.25)  # a probe takes one call, not a bigger share
    assert limiter.stats()["probes"] == 1


@pytest.mark.parametrize(
    ("window_s", "tpm", "others", "settle_all", "share", "why"),
    [
        (60.0, 6000, 4200, True, 0.25, "the room shown (300) would not leave one call per other instance (400)"),
        (60.0, 6000, 500, False, 0.25, "a call of ours is in flight: its answer will tell"),
        (15.0, 24000, 500, True, 0.25, "a latency (1 s) is over 5% of the window: the room shown is stale"),
        (60.0, 6000, 500, True, 0.05, "one call per other instance (2000) is over 15% of the window"),
    ],
)
async def test_no_probe_when(window_s: float, tpm: int, others: int, settle_all: bool, share: float, why: str) -> None:
    limiter, clock, queued = await _held_back_by_our_share(window_s, tpm, others, settle_all, share)
    await clock.advance(window_s - 1.5)
    assert not queued.done(), why
    await clock.advance(1.0)  # our first charges leave the window (plus its guard of a quarter latency)
    assert queued.done(), why
    assert limiter.stats()["probes"] == 0, why


async def test_slow_start_one_call_until_the_server_speaks_then_one_more_per_answer() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=6000, clock=clock, slow_start=True)
    first = await limiter.acquire(100)
    second = asyncio.ensure_future(limiter.acquire(100))
    await clock.advance(1.0)
    assert not second.done()  # nobody has told us yet what the others hold
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "5900", "x-ratelimit-remaining-requests": "59"})
    first.settle(100)
    await clock.advance(0.0)
    assert second.done()  # the answer: two calls in flight now
    third = asyncio.ensure_future(limiter.acquire(100))
    fourth = asyncio.ensure_future(limiter.acquire(100))
    await clock.advance(1.0)
    assert third.done() and not fourth.done()  # two in flight, two allowed: wait for another answer
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "5800", "x-ratelimit-remaining-requests": "58"})
    (await second).settle(100)
    await clock.advance(0.0)
    assert fourth.done()  # three allowed
    (await fourth).settle(100)
    (await third).settle(100)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "100", "x-ratelimit-remaining-requests": "1"})
    assert limiter.share < 0.1  # over half full: slow start ends at our part of the window
    assert limiter.stats()["slow_start"] is None


async def test_an_endpoint_without_remaining_headers_ends_slow_start_and_paces_by_our_bound() -> None:
    """A proxy or OpenAI-compatible server that names no x-ratelimit-remaining-*: slow start has nothing to
    learn from, so it ends at the first answer and our bound paces alone (it used to keep one call in flight
    for good, waiting for news that never came)."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=100_000, clock=clock, slow_start=True)
    first = await limiter.acquire(100)
    waiting = asyncio.ensure_future(limiter.acquire(100))
    await clock.advance(0.5)
    assert not waiting.done()  # slow start: one call until the first answer
    limiter.observe_headers({"x-ratelimit-limit-tokens": "100000"}, answered=False)  # a 500: says nothing
    await clock.advance(0.0)
    assert not waiting.done()
    limiter.observe_headers({"x-ratelimit-limit-tokens": "100000"})  # an answer: no remaining-headers
    first.settle(100)
    await clock.advance(0.0)
    assert waiting.done()
    more = [asyncio.ensure_future(limiter.acquire(100)) for _ in range(5)]
    await clock.advance(0.0)
    assert all(call.done() for call in more)  # six in flight: the bound is far away
    assert limiter.stats()["slow_start"] is None


async def test_throttle_pauses_all_callers_halves_the_share_then_releases_them_at_it() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=0, clock=clock, window_s=10)  # 10 per 10 s window
    for _ in range(8):
        await limiter.acquire(0)  # 2 requests left
    log: list = []
    early = [_spawn(limiter, clock, 0, f"e{i}", log) for i in range(2)]
    await clock.run_until_idle()
    assert [n for n, _ in log] == ["e0", "e1"]  # there was room for these
    waiting = [_spawn(limiter, clock, 0, f"w{i}", log) for i in range(3)]
    await clock.advance(0.5)
    limiter.on_throttled(10.0)  # a 429 at 0.5 s: pause until 10.5 s, share 1 -> 0.5
    assert limiter.share == pytest.approx(0.5)
    later = [_spawn(limiter, clock, 0, f"l{i}", log) for i in range(3)]  # new arrivals during the pause
    await clock.advance(9.9)
    assert len(log) == 2, "nobody may go during the pause"
    await clock.run(asyncio.gather(*early, *waiting, *later))
    assert [n for n, _ in log[2:]] == ["w0", "w1", "w2", "l0", "l1", "l2"]
    # Half the window after the pause (5 of 10), the sixth a window later: not all at once.
    assert [t for _, t in log[2:]] == pytest.approx([10.5] * 5 + [20.5])
    assert limiter.stats()["throttles"] == 1


async def test_overlapping_throttles_extend_the_pause_never_shorten_it_and_cut_the_share_once() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    (await limiter.acquire(100)).settle(100)
    limiter.on_throttled(20.0)
    limiter.on_throttled(5.0)
    assert limiter.stats()["paused_for_s"] == pytest.approx(20.0)
    assert limiter.share == pytest.approx(0.5)  # one congestion event, one cut
    await clock.run(limiter.acquire(100))  # the window is taken as full: our 100 from 0 s must leave it
    assert clock.now() == pytest.approx(60.0)
    limiter.on_throttled(float("inf"))
    assert limiter.stats()["paused_for_s"] == pytest.approx(MAX_PAUSE_S)
    assert limiter.share == pytest.approx(0.25)


async def test_a_cancel_during_a_pause_frees_our_window_but_not_the_pause() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=6000, clock=clock)
    inflight = await limiter.acquire(3000)
    limiter.on_throttled(5.0)
    inflight.cancel()
    task = asyncio.ensure_future(limiter.acquire(100))
    await clock.advance(4.9)
    assert not task.done()
    await clock.run(task)
    assert clock.now() == pytest.approx(5.0)


async def test_a_disabled_limiter_never_waits_but_still_honours_a_throttle() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=0, tpm=0, clock=clock)
    assert not limiter.enabled
    for _ in range(1000):
        (await limiter.acquire(1_000_000)).settle(5)
    assert clock.now() == 0.0 and clock.sleepers == 0
    stats = limiter.stats()
    assert stats["available_tokens"] is None and stats["acquired"] == 1000 and stats["total_wait_s"] == 0.0
    limiter.on_throttled(3.0)  # the server's instruction applies even with no client quota
    await clock.run(limiter.acquire(10))
    assert clock.now() == pytest.approx(3.0)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rpm=-1, tpm=0)
    with pytest.raises(ValueError):
        RateLimiter(rpm=1, tpm=1, window_s=0)
    with pytest.raises(ValueError):
        RateLimiter(rpm=1, tpm=1, split=-2)


async def test_stats_report_waiting_and_wait_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=6000, clock=clock, window_s=10)
    await limiter.acquire(1000)
    task = asyncio.ensure_future(limiter.acquire(200))
    await clock.run_until_idle()
    assert limiter.stats()["waiting"] == 1
    await clock.run(task)
    stats = limiter.stats()
    assert stats["waiting"] == 0 and stats["acquired"] == 2
    assert stats["total_wait_s"] == pytest.approx(10.0) and stats["max_wait_s"] == pytest.approx(10.0)
    assert set(stats) >= {"available_requests", "available_tokens", "throttles", "paused_for_s", "share"}


# --- retry-after parsing and the HTTP hook -------------------------------------------------


def test_parse_retry_after_forms_and_precedence() -> None:
    assert parse_retry_after({"retry-after-ms": "2500", "retry-after": "9"}) == 2.5
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "junk", "retry-after": "4"}) == 4.0
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "later"}) is None
    date = "Wed, 21 Oct 2015 07:28:30 GMT"
    sent = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert parse_retry_after({"retry-after": date, "date": sent}) == 30.0  # measured on the server's clock
    when = email.utils.mktime_tz(email.utils.parsedate_tz(date))  # type: ignore[arg-type]
    assert parse_retry_after({"retry-after": date}, wall_now=when - 12) == 12.0
    assert parse_retry_after({"retry-after": date}, wall_now=when + 99) == 0.0
    assert parse_retry_after({"retry-after": date}) is None  # no reference to measure against


async def test_hook_on_stub_responses() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=6000, clock=clock)
    hook = limiter.httpx_response_hook(wall_clock=lambda: 0.0)
    await hook(SimpleNamespace(status_code=200, headers={"x-ratelimit-remaining-tokens": "1200"}))
    assert limiter.stats()["available_tokens"] == pytest.approx(1200)
    await hook(SimpleNamespace(status_code=429, headers={"retry-after": "7"}))
    assert limiter.stats()["paused_for_s"] == pytest.approx(7.0)
    await clock.advance(7.0)
    await hook(SimpleNamespace(status_code=429, headers={}))
    assert limiter.stats()["paused_for_s"] == pytest.approx(DEFAULT_RETRY_AFTER_S)
    await hook(SimpleNamespace(status_code=503, headers={"retry-after": "60"}))  # only 429 pauses
    assert limiter.stats()["paused_for_s"] == pytest.approx(DEFAULT_RETRY_AFTER_S)
    assert limiter.stats()["throttles"] == 2


async def test_hook_installed_on_an_async_http_client() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=60_000, clock=clock)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/busy":
            return httpx.Response(429, headers={"retry-after-ms": "2500", "x-ratelimit-remaining-tokens": "0"})
        return httpx.Response(200, headers={"x-ratelimit-remaining-requests": "42"}, json={})

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), event_hooks={"response": [limiter.httpx_response_hook()]}
    ) as client:
        await client.get("http://model.test/ok")
        assert limiter.stats()["available_requests"] == pytest.approx(42)
        response = await client.get("http://model.test/busy")
    assert response.status_code == 429
    stats = limiter.stats()
    assert stats["throttles"] == 1 and stats["paused_for_s"] == pytest.approx(2.5)
    assert stats["available_tokens"] == pytest.approx(0) and stats["available_requests"] == pytest.approx(0)


async def test_hook_sees_the_429s_the_openai_sdk_retries_internally() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=60_000, clock=clock)
    calls: list[int] = []
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:  # 1 ms so the SDK's own (real) retry wait is negligible
            return httpx.Response(429, headers={"retry-after-ms": "1"}, json={"error": {"message": "slow down"}})
        return httpx.Response(200, headers={"x-ratelimit-remaining-tokens": "5000"}, content=json.dumps(completion))

    http_client = httpx.AsyncClient(
        transport=httpx.MockTransport(handler), event_hooks={"response": [limiter.httpx_response_hook()]}
    )
    client = openai.AsyncOpenAI(api_key="k", base_url="http://model.test/v1", http_client=http_client, max_retries=2)
    try:
        result = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()
    assert result.choices[0].message.content == "hi"
    assert len(calls) == 2  # one retry, done by the SDK, not by us
    stats = limiter.stats()
    assert stats["throttles"] == 1
    assert stats["available_tokens"] == pytest.approx(0)  # drained by the 429, pause not over in fake time


async def test_a_reserve_block_cancelled_mid_flight_gives_its_reservation_back() -> None:
    """A cancelled call (CancelledError is a BaseException) must not leave the limiter owing its estimate."""
    limiter = RateLimiter(rpm=10, tpm=1000, clock=FakeClock())
    started = asyncio.Event()

    async def call() -> None:
        async with limiter.reserve(800):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(call())
    await started.wait()
    assert limiter.stats()["available_tokens"] == pytest.approx(200)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = limiter.stats()
    assert (stats["available_tokens"], stats["available_requests"]) == (pytest.approx(1000), pytest.approx(10))


# --- many instances, one quota (issue 12) -------------------------------------------------


async def _simulate(instances: int, window_s: float, calls: int, call_tokens: int = 227, latency_s: float = 1.0):
    """N limiters, each set to the WHOLE quota, against the stand-in's sliding-window quota on one
    FakeClock; each instance runs 4 callers that retry a refused call after the pause, as the SDK does.
    Returns (admitted, refused, elapsed virtual seconds, final shares)."""
    from local.model_quota import Quota, QuotaLimits

    clock = FakeClock()
    quota = Quota(QuotaLimits(rpm=180, tpm=30000, window_s=window_s), clock=clock.now)
    limiters = [
        RateLimiter(180, 30000, clock=clock, window_s=window_s, seed=i, slow_start=True) for i in range(instances)
    ]
    work = list(range(calls))
    counts = {"admitted": 0, "refused": 0}

    async def caller(limiter: RateLimiter) -> None:
        while work:
            work.pop()
            while True:
                reservation = await limiter.acquire(call_tokens)
                decision = quota.try_acquire("d", call_tokens)
                await clock.sleep(latency_s if decision.allowed else 0.05)
                response = SimpleNamespace(status_code=200 if decision.allowed else 429, headers=decision.headers())
                await limiter.httpx_response_hook(wall_clock=lambda: 0.0)(response)
                if decision.allowed:
                    reservation.settle(call_tokens)
                    counts["admitted"] += 1
                    break
                reservation.cancel()
                counts["refused"] += 1

    await clock.run(asyncio.gather(*(caller(lim) for lim in limiters for _ in range(4))))
    return counts["admitted"], counts["refused"], clock.now(), [lim.share for lim in limiters]


@pytest.mark.parametrize(("window_s", "max_elapsed_over_fastest"), [(60.0, 1.15), (10.0, 1.25)])
async def test_eight_instances_each_set_to_the_whole_quota_share_it_without_a_divisor(
    window_s: float, max_elapsed_over_fastest: float
) -> None:
    """Every call goes through with at most 3% of calls refused, near the fastest the quota allows, and
    the shares come down from 1 each to about 1/8 without anyone telling an instance how many there are.
    Calls of 227 tokens: describe's prompt plus its learned budget (shared/reservations.py). At 10 s
    the bound is 1.25x the fastest (1.2x here), not the issue's 1.15x: the headroom, the guard on our
    charges' expiry and 22 calls a window over 8 instances cost it (docs/throughput.md)."""
    admitted, refused, elapsed, shares = await _simulate(8, window_s, calls=300)
    assert admitted == 300
    assert refused / (admitted + refused) <= 0.03
    windows_needed = 300 * 227 / (30000 * window_s / 60)  # 2.3 or 13.6 windows' worth of tokens
    fastest = (math.ceil(windows_needed) - 1) * window_s + 1.0
    assert elapsed <= max_elapsed_over_fastest * fastest
    assert sum(shares) < 2.0  # from 8 x 1 (the last calls leave room, so the shares rise again at the end)


async def test_one_instance_keeps_the_whole_quota() -> None:
    admitted, refused, elapsed, shares = await _simulate(1, 60.0, calls=90, call_tokens=1000)  # 3 windows' worth
    assert (admitted, refused) == (90, 0)
    assert elapsed <= 1.15 * 121.0  # the fastest: 30 calls at 0, 60 and 120 s, 1 s each; slow start costs a few s
    assert shares == [1.0]


async def test_a_429_that_reports_room_pauses_as_told_without_a_cut_or_a_full_window() -> None:
    """A few percent of 429s that are not the quota's doing (a busy region: their own remaining-headers
    show room) must not shrink an instance: the soak's injected 429s collapsed the share before."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=60_000, clock=clock)
    (await limiter.acquire(1000)).settle(1000)
    not_quota = {
        "x-ratelimit-remaining-tokens": "50000",
        "x-ratelimit-remaining-requests": "500",
        "retry-after-ms": "300",
    }
    hook = limiter.httpx_response_hook(wall_clock=lambda: 0.0)
    for _ in range(20):
        await hook(SimpleNamespace(status_code=429, headers=not_quota))
        await clock.run(limiter.acquire(1000))  # each goes when its pause ends, not a window later
    assert limiter.share == 1.0
    assert clock.now() == pytest.approx(20 * 0.3)

    # A 429 whose headers show the window full is the quota: a cut, and a wait past the pause.
    quota = {"x-ratelimit-remaining-tokens": "500", "x-ratelimit-remaining-requests": "500", "retry-after-ms": "20000"}
    await hook(SimpleNamespace(status_code=429, headers=quota))
    assert limiter.share == pytest.approx(0.5)
    started = clock.now()
    await clock.run(limiter.acquire(1000))
    assert clock.now() - started > 10.0
