"""Child-process helpers for the local stack (`make run`) and test fixtures.

Every service we start locally (Azurite, the local Functions host, the local model server) is a
child process whose output goes to a log file, that must be waited on until it answers, and that
must be stopped with its whole process group so no orphan keeps a port busy. When a service fails
to come up, the error carries the tail of its log: that is where the reason is.

Synchronous on purpose (subprocess + urllib): the stack launcher is a plain script, and async
callers wrap the waits in `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

DEFAULT_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a child gets when the thread that started it dies


class ProcessError(RuntimeError):
    """A child process did not start, died early or never became healthy."""


@dataclass
class Proc:
    """A started child process, its own process group and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    cmd: tuple[str, ...]
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log, for error messages."""
        return log_tail(self.log_path, lines)

    def stop(self, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; returns the exit code."""
        return stop_process(self, grace_s)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def start_process(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    name: str,
    log_path: Path | str,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    die_with_parent: bool = True,
) -> Proc:
    """Start `cmd` in its own session (so the whole group can be stopped), output to `log_path`.

    `env` replaces the environment; `extra_env` is added to it (or to ours when `env` is None).
    The log file is appended to, so restarts keep their history. With `die_with_parent` (Linux),
    the child gets SIGTERM when the thread that started it dies, however it dies (SIGKILL, OOM):
    a killed supervisor leaves no service holding its ports. Start children from a long-lived
    thread (the main thread, or an executor that outlives them).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ if env is None else env)
    if extra_env:
        full_env.update(extra_env)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    args = tuple(str(c) for c in cmd)
    log_file = open(log_path, "ab")  # owned by the Proc, closed in stop_process
    log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {name}: {' '.join(args)}\n".encode())
    log_file.flush()
    try:
        popen = subprocess.Popen(
            args,
            cwd=str(cwd) if cwd is not None else None,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    except OSError as e:
        log_file.close()
        raise ProcessError(f"{name}: cannot start {args[0]!r}: {e}") from e
    return Proc(name=name, popen=popen, log_path=log_path, cmd=args, _log_file=log_file)


def stop_process(proc: Proc, grace_s: float = DEFAULT_GRACE_S) -> int | None:
    """Stop the process and everything it started: SIGTERM to the group, SIGKILL after `grace_s`."""
    try:
        if proc.alive():
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.popen.wait(timeout=10)
            # Anything the leader started and left behind in its group goes too. (A leader that
            # died long ago is left alone: its group id could by now belong to someone else.)
            _signal_group(proc, signal.SIGKILL)
        return proc.popen.returncode
    finally:
        if proc._log_file is not None and not proc._log_file.closed:
            proc._log_file.close()


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel to SIGTERM us when our parent goes (Linux only)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name, use_errno=True)
    if hasattr(libc, "prctl"):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    # The child is a session leader, so its pgid is its pid (even after it has exited).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_alive(proc: Proc | None, what: str) -> None:
    if proc is not None and not proc.alive():
        raise ProcessError(
            f"{proc.name} exited with code {proc.returncode} before {what}; log {proc.log_path}:\n{proc.tail()}"
        )


def _timeout_error(proc: Proc | None, what: str, timeout_s: float, last: str) -> ProcessError:
    name = proc.name if proc is not None else "service"
    msg = f"{name}: {what} not healthy after {timeout_s:.0f}s (last: {last})"
    if proc is not None:
        msg += f"; log {proc.log_path}:\n{proc.tail()}"
    return ProcessError(msg)


def wait_for_port(
    host: str, port: int, *, timeout_s: float = 30.0, proc: Proc | None = None, interval_s: float = 0.1
) -> None:
    """Wait until host:port accepts connections; fail early if `proc` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check_alive(proc, f"{host}:{port} opened")
        if port_open(host, port):
            return
        if time.monotonic() >= deadline:
            raise _timeout_error(proc, f"{host}:{port}", timeout_s, "connection refused")
        time.sleep(interval_s)


def _default_ok(status: int) -> bool:
    return 200 <= status < 300


def wait_for_http(
    url: str,
    *,
    timeout_s: float = 30.0,
    proc: Proc | None = None,
    ok: Callable[[int], bool] = _default_ok,
    headers: Mapping[str, str] | None = None,
    interval_s: float = 0.1,
) -> int:
    """Wait until GET `url` answers with a status `ok` accepts (2xx by default); returns it.

    Any HTTP answer counts as an answer: pass `ok=lambda s: s < 500` for services (like Azurite)
    that answer an unauthenticated probe with 4xx once they are up.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        _check_alive(proc, f"{url} answered")
        status: int | None = None
        req = urllib.request.Request(url, headers=dict(headers or {}), method="GET")
        try:
            with urllib.request.urlopen(req, timeout=2.0) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if status is not None:
            if ok(status):
                return status
            last = f"HTTP {status}"
        if time.monotonic() >= deadline:
            raise _timeout_error(proc, url, timeout_s, last)
        time.sleep(interval_s)


# --- processes left behind by an earlier run ------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """A running process as /proc shows it: enough to recognise it again and to name it to a person."""

    pid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat: tells a process from a later one with the same pid
    cmdline: str

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "cmdline": self.cmdline}


def process_info(pid: int) -> ProcessInfo | None:
    """The process `pid` if it exists and is not a zombie (Linux /proc); None otherwise."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw_cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may contain spaces and parentheses
    if not fields or fields[0] == "Z":
        return None
    cmdline = raw_cmd.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    return ProcessInfo(pid, int(fields[19]), cmdline)


def listening_pids(port: int) -> list[ProcessInfo]:
    """The processes with a TCP socket listening on `port` (any address), from /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        if _socket_links(entry / "fd") & wanted:
            info = process_info(int(entry.name))
            if info is not None:
                found.append(info)
    return found


def _socket_links(fd_dir: Path) -> set[str]:
    """What a process's descriptors point at ('socket:[123]', ...); fds may close while we look."""
    links = set()
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return links
    for fd in fds:
        with contextlib.suppress(OSError):
            links.add(os.readlink(fd))
    return links


class PidFile:
    """The stack's record of the processes it started, so a later run can find what a killed one left.

    Written after each start, removed after a clean stop. A later run stops every recorded process
    that is still the same process (same pid *and* start time), and no other.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, procs: Sequence[Proc]) -> None:
        entries = [dict(info.to_dict(), name=p.name) for p in procs if (info := process_info(p.pid)) is not None]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"supervisor": os.getpid(), "processes": entries}, indent=2))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def leftovers(self) -> list[tuple[str, ProcessInfo]]:
        """Recorded processes that still run as the same process."""
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        alive = []
        for entry in doc.get("processes", []) if isinstance(doc, dict) else []:
            try:
                pid, ticks, name = int(entry["pid"]), int(entry["start_ticks"]), str(entry["name"])
            except (KeyError, TypeError, ValueError):
                continue
            info = process_info(pid)
            if info is not None and info.start_ticks == ticks:
                alive.append((name, info))
        return alive

    def stop_leftovers(self, grace_s: float = DEFAULT_GRACE_S) -> list[tuple[str, ProcessInfo]]:
        """Stop (TERM, then KILL after `grace_s`) what an earlier run left running; returns what was stopped."""
        stopped = self.leftovers()
        for _, info in stopped:
            _kill_tree(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(process_info(i.pid) == i for _, i in stopped) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _, info in stopped:
            if process_info(info.pid) == info:
                _kill_tree(info.pid, signal.SIGKILL)
        self.clear()
        return stopped


def _kill_tree(pid: int, sig: signal.Signals) -> None:
    """Signal the process group `pid` leads (our children are session leaders), else the process."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def port_holders_message(host: str, port: int) -> str:
    """'port 127.0.0.1:10000 is already in use by pid 123 (node …)' with a hint on how to stop it."""
    holders = listening_pids(port)
    if not holders:
        return f"port {host}:{port} is already in use"
    named = ", ".join(f"pid {h.pid} ({h.cmdline[:120]})" for h in holders)
    pids = " ".join(str(h.pid) for h in holders)
    return f"port {host}:{port} is already in use by {named}; stop it with `kill {pids}` or choose another port"
