"""The local host's timer trigger (local/host_timer.py): NCRONTAB with seconds, settings resolved."""

from __future__ import annotations

import asyncio
import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from local.host import HostOptions, LocalHost
from local.host_timer import next_fire

TIMER_CODE = """
import json, os
from pathlib import Path

import azure.functions as func


async def main(tick: func.TimerRequest) -> None:
    out = Path(os.environ["TICKS_FILE"])
    with out.open("a") as f:
        f.write(json.dumps({"past_due": tick.past_due}) + "\\n")
"""


def test_next_fire_reads_six_fields_seconds_first() -> None:
    start = datetime(2026, 1, 1, 0, 1, 0, tzinfo=UTC)
    assert next_fire("30 */5 * * * *", start) == datetime(2026, 1, 1, 0, 5, 30, tzinfo=UTC)
    assert next_fire("0 */5 * * * *", start) == datetime(2026, 1, 1, 0, 5, 0, tzinfo=UTC)
    assert next_fire("*/10 * * * * *", start) == datetime(2026, 1, 1, 0, 1, 10, tzinfo=UTC)
    for bad in ("*/5 * * * *", "x * * * * *", "99 * * * * *"):
        with pytest.raises(ValueError, match="schedule"):
            next_fire(bad, start)


def timer_app(root: Path, schedule: str) -> None:
    (root / "tick").mkdir(parents=True)
    (root / "host.json").write_text(json.dumps({"version": "2.0"}))
    binding = {"name": "tick", "type": "timerTrigger", "direction": "in", "schedule": schedule, "runOnStartup": True}
    (root / "tick" / "function.json").write_text(json.dumps({"scriptFile": "__init__.py", "bindings": [binding]}))
    (root / "tick" / "__init__.py").write_text(textwrap.dedent(TIMER_CODE).lstrip())


async def test_the_host_runs_a_timer_function_on_its_resolved_schedule(tmp_path: Path) -> None:
    root = tmp_path / "timerapp"
    timer_app(root, "%TICK_SCHEDULE%")
    ticks = tmp_path / "ticks.jsonl"
    values = {"TICK_SCHEDULE": "0 0 0 1 1 *", "TICKS_FILE": str(ticks)}  # once a year: only the start-up run
    host = LocalHost(root, settings_path=None, values=values, options=HostOptions(port=0, shutdown_grace_s=1.0))
    async with host:
        assert host.errors == [] and [f.spec.name for f in host.functions] == ["tick"]
        for _ in range(200):
            if ticks.exists():
                break
            await asyncio.sleep(0.02)
    assert [json.loads(x) for x in ticks.read_text().splitlines()] == [{"past_due": False}]


async def test_a_bad_or_missing_schedule_puts_only_that_function_in_error(tmp_path: Path) -> None:
    root = tmp_path / "timerapp"
    timer_app(root, "%TICK_SCHEDULE%")
    host = LocalHost(root, settings_path=None, values={"TICK_SCHEDULE": "every minute"}, options=HostOptions(port=0))
    async with host:
        assert len(host.errors) == 1 and "schedule" in host.errors[0]
