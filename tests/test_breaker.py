"""CircuitBreaker and BreakerBoard: every state transition, on a FakeClock (no sleeping)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shared.breaker import BreakerBoard, BreakerState, CircuitBreaker
from shared.settings import Settings
from tests.constants import TEST_DEPLOYMENT
from tests.fake_clock import FakeClock


@pytest.fixture(autouse=True)
def _no_real_waiting() -> Iterator[None]:
    started = time.perf_counter()
    yield
    assert time.perf_counter() - started < 1.0


def _opened(clock: FakeClock, threshold: int = 3, cooldown: float = 30.0) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown, clock=clock)
    for _ in range(threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    return breaker


def test_closed_allows_and_opens_after_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=30.0, clock=FakeClock())
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 2
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    assert breaker.opened_count == 1


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(failure_threshold=3, clock=FakeClock())
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0


async def test_open_rejects_until_the_cooldown_then_reports_half_open() -> None:
    clock = FakeClock()
    breaker = _opened(clock)
    assert breaker.retry_after_s() == pytest.approx(30.0)
    await clock.advance(29.9)
    assert not breaker.allow() and breaker.state is BreakerState.OPEN
    assert breaker.retry_after_s() == pytest.approx(0.1)
    await clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN  # by time alone, before anyone asks
    assert breaker.retry_after_s() == 0.0


async def test_half_open_admits_one_trial_at_a_time() -> None:
    clock = FakeClock()
    breaker = _opened(clock)
    await clock.advance(30)
    assert breaker.allow()  # the trial
    assert not breaker.allow() and not breaker.allow()  # everyone else keeps failing fast
    assert breaker.state is BreakerState.HALF_OPEN


async def test_trial_success_closes() -> None:
    clock = FakeClock()
    breaker = _opened(clock)
    await clock.advance(30)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0
    assert all(breaker.allow() for _ in range(5))


async def test_trial_failure_reopens_with_a_fresh_cooldown() -> None:
    clock = FakeClock()
    breaker = _opened(clock)
    await clock.advance(30)
    assert breaker.allow()
    await clock.advance(5)  # the trial took 5 s and failed at t=35
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.opened_count == 2
    await clock.advance(29)
    assert not breaker.allow()  # cooldown counts from the re-open, not the first open
    await clock.advance(1)
    assert breaker.allow()


async def test_an_unrecorded_trial_lapses_after_a_cooldown() -> None:
    clock = FakeClock()
    breaker = _opened(clock)
    await clock.advance(30)
    assert breaker.allow()  # the trial's caller is cancelled and never reports
    await clock.advance(29)
    assert not breaker.allow()
    await clock.advance(1)
    assert breaker.allow()  # a new trial; the breaker is not stuck half-open


async def test_late_results_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker = _opened(clock)
    await clock.advance(20)
    breaker.record_failure()  # straggler: must not extend the cooldown
    breaker.record_success()  # straggler: must not close without a trial
    assert breaker.state is BreakerState.OPEN
    await clock.advance(10)
    assert breaker.allow()


def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    breaker = CircuitBreaker(failure_threshold=1, clock=FakeClock())
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot() == {
        "state": "open",
        "consecutive_failures": 1,
        "opened_count": 1,
        "retry_after_s": pytest.approx(30.0),
    }


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=-1)


async def test_board_creates_breakers_on_demand_with_shared_settings() -> None:
    clock = FakeClock()
    board = BreakerBoard(failure_threshold=2, cooldown_s=10.0, clock=clock)
    assert TEST_DEPLOYMENT not in board and len(board) == 0
    primary = board.get(TEST_DEPLOYMENT)
    assert board[TEST_DEPLOYMENT] is primary and TEST_DEPLOYMENT in board
    fallback = board.get(f"https://other.openai.azure.com|{TEST_DEPLOYMENT}")
    assert fallback is not primary and len(board) == 2
    assert (primary.failure_threshold, primary.cooldown_s) == (2, 10.0)
    primary.record_failure()
    primary.record_failure()
    assert board.states() == {TEST_DEPLOYMENT: "open", f"https://other.openai.azure.com|{TEST_DEPLOYMENT}": "closed"}
    assert fallback.allow()
    await clock.advance(10)
    assert board.states()[TEST_DEPLOYMENT] == "half_open"


def test_board_from_settings() -> None:
    settings = Settings.from_env(
        {
            "VLM_ENDPOINT": "http://127.0.0.1:8089/v1",
            "VlmStorage": "UseDevelopmentStorage=true",
            "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
            "VLM_BREAKER_FAILURES": "4",
            "VLM_BREAKER_COOLDOWN_S": "12.5",
        }
    )
    breaker = BreakerBoard.from_settings(settings).get(settings.primary.label)
    assert (breaker.failure_threshold, breaker.cooldown_s) == (4, 12.5)
