"""The limiter simulation (`python -m bench.limiter_sim`): its designs differ only in the rule they name.

Virtual time and fixed seeds, so the figures are exact and the run takes about a second. The 60 s
window is where the idle probe matters: without it, the instances left holding the last calls wait a
whole window for their own charges to leave it (docs/throughput.md, "Session 5").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.limiter_sim import DESIGNS, _constants, simulate
from shared import limiter

ROOT = Path(__file__).resolve().parents[1]


async def test_the_probe_shortens_the_tail_at_a_60_s_window_without_a_429() -> None:
    for seed in (0, 1):
        ours = await simulate(8, 60.0, 360, seed)
        with _constants(DESIGNS["no-probe"]):
            without = await simulate(8, 60.0, 360, seed)
        assert ours["calls_429_share"] == 0.0 and without["calls_429_share"] == 0.0
        assert without["elapsed_over_fastest"] > 1.4  # the last calls spilled into a fourth window
        assert ours["elapsed_over_fastest"] < 1.3


def test_the_overrides_are_put_back() -> None:
    before = limiter.PROBE_WAIT
    with _constants(DESIGNS["no-probe"]):
        assert limiter.PROBE_WAIT == float("inf")
    assert limiter.PROBE_WAIT == before


@pytest.mark.subprocess
def test_the_last_line_is_json_with_every_design_per_window() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.limiter_sim", "--seeds", "1", "--windows", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last["runs"]["8x10s"]) == set(DESIGNS)
    assert 0.0 <= last["runs"]["8x10s"]["ours"]["calls_429_share_mean"] <= 1.0
