"""The limiter simulation (`python -m bench.limiter_sim`): its designs differ only in the rule they name.

Virtual time and fixed seeds, so the figures are exact and the run takes a few seconds. The 60 s
window is where following fresh readings and the idle probe matter: without either, on some seeds the
instances left holding the last calls wait a whole window for their own charges to leave it, and the
run spills into a fourth window (docs/throughput.md, "Session 5" and "Session 6").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.limiter_sim import COUNTED, DESIGNS, EQUAL_SPLIT, FIXED_SPLIT, SPLITS, _constants, simulate, simulate_join
from shared import limiter

ROOT = Path(__file__).resolve().parents[1]


async def test_following_fresh_readings_and_the_probe_keep_a_60_s_run_in_its_three_windows() -> None:
    """360 calls of 227 tokens need 2.72 windows; a run that spills a call into a fourth is 1.5x the fastest. (At the
    bench's 232, 2.78 windows, ours spills in about half the runs, as the bench does: docs/throughput.md, session 7.)"""
    seeds = range(8)

    async def runs(design: str) -> list[dict[str, float]]:
        with _constants(DESIGNS[design]):
            return [await simulate(8, 60.0, 360, seed, call_tokens=227) for seed in seeds]

    def spills(results: list[dict[str, float]]) -> int:
        return sum(run["elapsed_over_fastest"] > 1.4 for run in results)

    def mean(results: list[dict[str, float]]) -> float:
        return sum(run["elapsed_over_fastest"] for run in results) / len(results)

    ours = await runs("ours")
    assert spills(ours) <= 1 and all(run["calls_429_share"] < 0.02 for run in ours)
    for design in ("no-follow", "no-probe", "neither"):
        without = await runs(design)
        assert spills(without) > spills(ours) and mean(without) > mean(ours) + 0.05, design


@pytest.mark.parametrize("split", [EQUAL_SPLIT, FIXED_SPLIT, COUNTED])
async def test_an_equal_split_keeps_the_60_s_run_in_its_three_windows(split: str) -> None:
    """The reference an operator who knew N would set (quota / N each, nothing read from the answers but
    the limit and retry-after), and the limiter's own fixed split (VLM_RATE_SPLIT = N): at the bench's load
    neither needs a fourth window. Where ours does, the shares cost the time, not the window accounting
    (docs/throughput.md, session 8)."""
    for seed in range(3):
        run = await simulate(8, 60.0, 360, seed, split=split)
        assert run["elapsed_over_fastest"] < 1.1, seed
        assert run["calls_429_share"] < 0.02, seed


async def test_the_join_scenario_counts_what_each_group_sends() -> None:
    """Instances that join after a few windows: the equal split gives them what it gives the others, so the
    measurement can tell a fair design from an unfair one (ours, today: docs/throughput.md, session 8)."""
    for design in (EQUAL_SPLIT, FIXED_SPLIT, COUNTED):
        split = await simulate_join(4, 2, 60.0, seed=1, split=design)
        assert split["jain_index"] > 0.95, design
        assert split["joiners_calls_per_window"] > 0.8 * split["incumbents_calls_per_window"] > 0, design


async def test_counted_instances_keep_the_10_s_run_under_the_429_bar_where_a_draw_each_does_not() -> None:
    """At a 10 s window each of 8 instances holds 2.7 calls: with the partial call by rank (the counted split),
    no window is overfilled; the fixed split, told the same N but drawing each partial call, draws 429s."""
    counted = [await simulate(8, 10.0, 300, seed, split=COUNTED) for seed in range(3)]
    drawn = [await simulate(8, 10.0, 300, seed, split=FIXED_SPLIT) for seed in range(3)]
    assert all(run["calls_429_share"] < 0.005 for run in counted)
    assert min(run["calls_429_share"] for run in drawn) > 0.01
    assert all(run["elapsed_over_fastest"] < 1.2 for run in counted)


def test_the_overrides_are_put_back() -> None:
    before = limiter.PROBE_WAIT
    with _constants(DESIGNS["no-probe"]):
        assert limiter.PROBE_WAIT == float("inf")
    assert limiter.PROBE_WAIT == before


def _sim(*args: str) -> str:
    """`python -m bench.limiter_sim` with these arguments; its standard output."""
    return subprocess.run(
        [sys.executable, "-m", "bench.limiter_sim", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


@pytest.mark.subprocess
def test_the_last_line_is_json_with_every_design_per_window() -> None:
    out = _sim("--seeds", "1", "--windows", "10")
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last["runs"]["8x10s"]) == {*DESIGNS, *SPLITS}
    assert 0.0 <= last["runs"]["8x10s"]["ours"]["calls_429_share_mean"] <= 1.0


@pytest.mark.subprocess
def test_join_prints_each_group_per_design() -> None:
    out = _sim("--seeds", "1", "--windows", "10", "--instances", "2", "--join", "1")
    last = json.loads(out.strip().splitlines()[-1])
    figures = last["joins"]["2x10s+1"]
    assert set(figures) == {*DESIGNS, *SPLITS}
    assert figures[EQUAL_SPLIT]["jain_index"] > 0.9
    assert "| 2 | 10 s | ours |" in out
