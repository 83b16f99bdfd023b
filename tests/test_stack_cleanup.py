"""`make run` cleans up after itself: children die with the supervisor, and a new run deals with leftovers.

The supervisor is `python -m local.stack`; a CI runner or the OOM killer may SIGKILL it, which no
handler sees. Its children must still go (the kernel's parent-death signal), and a process that an
earlier run left behind must be stopped or named by the next run, never a bare "port in use".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local import procs
from local.stack import EXAMPLE, Stack, StackConfig

ROOT = Path(__file__).resolve().parents[1]
BANNER = "vlm-functions is running locally"


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    """Poll until every pid is gone or the deadline passes; returns those still there."""
    deadline = time.monotonic() + timeout_s
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [pid for pid in left if procs.process_info(pid) is not None]
    return left


def _start_supervisor(tmp: Path, ports: dict[str, int]) -> subprocess.Popen[str]:
    settings = tmp / "local.settings.json"
    if not settings.exists():
        settings.write_text(EXAMPLE.read_text())
    cmd = [sys.executable, "-m", "local.stack", "--model-mode", "facts", "--data-dir", str(tmp / "data")]
    cmd += ["--settings", str(settings)]
    for name, port in ports.items():
        cmd += [f"--{name}-port", str(port)]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_banner(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the stack prints the banner once every service answers
        seen.append(line)
        if BANNER in line:
            return "".join(seen)
    raise AssertionError("the stack exited before it was running:\n" + "".join(seen))


@pytest.mark.integration
def test_sigkill_to_the_supervisor_group_leaves_no_process_and_the_next_run_starts(tmp_path: Path) -> None:
    ports = {name: procs.free_port() for name in ("host", "blob", "queue", "model")}
    first = _start_supervisor(tmp_path, ports)
    try:
        _wait_banner(first)
        recorded = json.loads((tmp_path / "data" / "stack.pids.json").read_text())["processes"]
        children = [entry["pid"] for entry in recorded]
        assert {entry["name"] for entry in recorded} == {"azurite", "model-server", "functions-host"}
        assert all(procs.process_info(pid) is not None for pid in children)
        os.killpg(first.pid, signal.SIGKILL)  # what a CI runner or the OOM killer does: no handler runs
        first.wait(timeout=10)
        assert _wait_gone(children) == [], "stack processes outlived a SIGKILLed supervisor"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    second = _start_supervisor(tmp_path, ports)
    try:
        _wait_banner(second)
        os.killpg(second.pid, signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    assert not (tmp_path / "data" / "stack.pids.json").exists(), "a clean stop removes the pid file"


@pytest.mark.subprocess  # sleepers it stops itself
def test_a_recorded_leftover_is_stopped_and_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    leftover = procs.start_process(sleeper, name="model-server", log_path=tmp_path / "a.log", die_with_parent=False)
    innocent = procs.start_process(sleeper, name="other", log_path=tmp_path / "b.log", die_with_parent=False)
    try:
        pidfile = procs.PidFile(tmp_path / "stack.pids.json")
        pidfile.record([leftover, innocent])
        doc = json.loads(pidfile.path.read_text())
        doc["processes"][1]["start_ticks"] += 1  # same pid, another process: must not be touched
        pidfile.path.write_text(json.dumps(doc))

        stopped = pidfile.stop_leftovers(grace_s=5)

        assert [(name, info.pid) for name, info in stopped] == [("model-server", leftover.pid)]
        assert leftover.popen.wait(timeout=10) is not None
        assert innocent.alive()
        assert not pidfile.path.exists()
    finally:
        leftover.stop(1)
        innocent.stop(1)


def test_a_taken_port_is_named_with_the_pid_that_holds_it(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        values = json.loads(EXAMPLE.read_text())["Values"]
        config = StackConfig(data_dir=tmp_path, host_port=port, values=values)
        with pytest.raises(procs.ProcessError) as err:
            Stack(config).start()
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and str(port) in message
        assert f"kill {os.getpid()}" in message
    finally:
        holder.close()
