"""Azurite (blob + queue) as a child process: the local stand-in for the storage account.

Azurite 3.35 ships one `azurite` binary that always serves blob, queue and table; the table
service is pointed at a free port so only the blob and queue ports matter. It runs with
`--disableProductStyleUrl` (account name from the path, as the connection string below expects),
`--loose` and `--skipApiVersionCheck` (newer SDKs than the emulator knows) and no telemetry.

    python -m local.azurite [--blob-port 10000] [--queue-port 10001] [--location .local/azurite]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from local import procs
from shared.storage import DEV_ACCOUNT, dev_connection_string

ACCOUNT_NAME = DEV_ACCOUNT
DEFAULT_BLOB_PORT = 10000
DEFAULT_QUEUE_PORT = 10001
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCATION = PROJECT_ROOT / ".local" / "azurite"


def connection_string(
    blob_port: int = DEFAULT_BLOB_PORT, queue_port: int = DEFAULT_QUEUE_PORT, host: str = "127.0.0.1"
) -> str:
    """The connection string for Azurite on these ports (what `UseDevelopmentStorage=true` means on defaults)."""
    return dev_connection_string(blob_port, queue_port, host)


def azurite_binary(project_root: Path = PROJECT_ROOT) -> Path:
    """node_modules/.bin/azurite, installed by the Makefile (npm ci)."""
    path = project_root / "node_modules" / ".bin" / "azurite"
    if path.exists():
        return path
    found = shutil.which("azurite")
    if found:
        return Path(found)
    raise procs.ProcessError(f"azurite not found at {path} nor on PATH: run `npm ci` (the Makefile does)")


@dataclass
class Azurite:
    """A running Azurite: its ports, data folder and process."""

    blob_port: int
    queue_port: int
    table_port: int
    location: Path
    proc: procs.Proc
    host: str = "127.0.0.1"

    @property
    def connection_string(self) -> str:
        return connection_string(self.blob_port, self.queue_port, self.host)

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.blob_port}/{ACCOUNT_NAME}"

    @property
    def queue_endpoint(self) -> str:
        return f"http://{self.host}:{self.queue_port}/{ACCOUNT_NAME}"

    def stop(self, grace_s: float = procs.DEFAULT_GRACE_S) -> None:
        self.proc.stop(grace_s)

    def __enter__(self) -> Azurite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_healthy(
    blob_port: int,
    queue_port: int,
    *,
    host: str = "127.0.0.1",
    timeout_s: float = 30.0,
    proc: procs.Proc | None = None,
) -> None:
    """Wait until both services answer HTTP (an unauthenticated probe gets 4xx: that is an answer)."""
    for port in (blob_port, queue_port):
        procs.wait_for_http(
            f"http://{host}:{port}/{ACCOUNT_NAME}?comp=list",
            timeout_s=timeout_s,
            proc=proc,
            ok=lambda status: status < 500,
        )


def start_azurite(
    location: Path | str | None = None,
    *,
    blob_port: int = DEFAULT_BLOB_PORT,
    queue_port: int = DEFAULT_QUEUE_PORT,
    table_port: int | None = None,
    host: str = "127.0.0.1",
    log_path: Path | str | None = None,
    in_memory: bool = False,
    timeout_s: float = 30.0,
    project_root: Path = PROJECT_ROOT,
) -> Azurite:
    """Start Azurite and wait until blob and queue answer; the caller stops it (or uses `with`).

    Data lives under `location` (default .local/azurite) unless `in_memory`; the log goes there
    too. The table service, which we do not use, gets `table_port` or any free port.
    """
    location = Path(location) if location is not None else DEFAULT_LOCATION
    location.mkdir(parents=True, exist_ok=True)
    for port in (blob_port, queue_port):
        if procs.port_open(host, port):
            raise procs.ProcessError(f"azurite: {procs.port_holders_message(host, port)}")
    if table_port is None:
        table_port = procs.free_port(host)  # unused, but Azurite always serves it: keep it off 10002
    cmd: list[str] = [
        str(azurite_binary(project_root)),
        "--silent",
        "--skipApiVersionCheck",
        "--loose",
        "--disableProductStyleUrl",
        "--disableTelemetry",
        "--blobHost",
        host,
        "--blobPort",
        str(blob_port),
        "--queueHost",
        host,
        "--queuePort",
        str(queue_port),
        "--tableHost",
        host,
        "--tablePort",
        str(table_port),
    ]
    # Azurite refuses --location together with --inMemoryPersistence; cwd still holds its debug files.
    cmd += ["--inMemoryPersistence"] if in_memory else ["--location", str(location)]
    log = Path(log_path) if log_path is not None else location / "azurite.log"
    proc = procs.start_process(cmd, name="azurite", log_path=log, cwd=location)
    try:
        wait_healthy(blob_port, queue_port, host=host, timeout_s=timeout_s, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return Azurite(
        blob_port=blob_port, queue_port=queue_port, table_port=table_port, location=location, proc=proc, host=host
    )


def main(argv: list[str] | None = None) -> int:
    """Run Azurite in the foreground until Ctrl-C / SIGTERM; print its connection string."""
    p = argparse.ArgumentParser(prog="python -m local.azurite", description=__doc__.splitlines()[0])
    p.add_argument("--blob-port", type=int, default=DEFAULT_BLOB_PORT)
    p.add_argument("--queue-port", type=int, default=DEFAULT_QUEUE_PORT)
    p.add_argument("--location", type=Path, default=DEFAULT_LOCATION)
    p.add_argument("--in-memory", action="store_true")
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    az = start_azurite(args.location, blob_port=args.blob_port, queue_port=args.queue_port, in_memory=args.in_memory)
    print(f"azurite running (pid {az.proc.pid}, log {az.proc.log_path})", flush=True)
    print(az.connection_string, flush=True)
    try:
        while not stop.wait(0.5):
            if not az.proc.alive():
                print(f"azurite exited:\n{az.proc.tail()}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        az.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
