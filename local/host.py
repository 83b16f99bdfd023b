"""The local Azure Functions host: runs the v1 function folders on one machine, no Core Tools needed.

    python -m local.host [--root .] [--port 7071] [--settings local.settings.json]

Start-up follows the real host: settings from local.settings.json "Values" go into the
environment before any function module is imported (variables already set win), host.json is
read, and every `<folder>/function.json` becomes a function:

- httpTrigger  -> served on http://127.0.0.1:PORT/api/<route> (methods, authLevel + LOCAL_FUNCTION_KEY)
- blobTrigger  -> the container is polled in storage (Azurite); receipts, retries, poison queue
                  (Azure pushes blob events through Event Grid; polling is the local stand-in)
- queueTrigger -> the queue is polled; retries by dequeue count, then `<queue>-poison`
- timerTrigger -> its NCRONTAB `schedule` (six fields, `%SETTING%` resolved), one run at a time

GET /admin/host/status (with the function key) answers {"state": "Running", ...} for health checks. One log line per
invocation goes to stdout; SIGINT / SIGTERM stop it cleanly (in-flight work gets a grace period).
`LocalHost` is the same host for in-process use (tests).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import signal
import sys
import time
import zlib
from collections.abc import Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from local.host_blob import BlobPathPattern, BlobTriggerListener, RetryPolicy
from local.host_config import (
    FunctionSpec,
    HostConfigError,
    HostJson,
    apply_settings,
    discover_functions,
    load_host_json,
    load_local_settings,
    resolve_setting_refs,
)
from local.host_http import HttpFrontEnd, HttpRoute
from local.host_loader import LoadedFunction, load_function, make_executor
from local.host_queue import QueueTriggerListener
from local.host_storage import ConnectionPool
from local.host_timer import TimerTriggerListener

log = logging.getLogger("local.host")

DEFAULT_PORT = 7071
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024  # the real host's default request size limit
FUNCTION_KEY_SETTING = "LOCAL_FUNCTION_KEY"


@dataclass(frozen=True)
class HostOptions:
    """Knobs of the local host; None means "from host.json / the real host's default"."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (see LocalHost.port after start)
    poll_interval_s: float = 0.5
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 60.0
    shutdown_grace_s: float = 10.0
    max_degree_of_parallelism: int | None = None
    poison_threshold: int | None = None
    function_timeout_s: float | None = None
    host_id: str | None = None
    functions: tuple[str, ...] | None = None  # run only these (like `func start --functions`)
    strict: bool = False  # a function that fails to load stops the host (default: reported, others run)


def default_host_id(root: Path) -> str:
    """Stable per machine and app folder, like the real host's local default (<machine>-<hash>, <=32, lowercase)."""
    machine = "".join(c for c in platform.node() if c.isalnum()) or "localhost"
    host_id = f"{machine}-{zlib.crc32(str(root.resolve()).encode()) & 0x7FFFFFFF}"
    return host_id[:32].lower().rstrip("-")


def _short_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


def log_invocation(
    function: str, trigger: str, invocation_id: str, duration_s: float, error: BaseException | None, detail: str
) -> None:
    """One line per invocation, in the real host's words ("Executed 'Functions.x' (Succeeded, ...)")."""
    outcome = "Succeeded" if error is None else "Failed"
    line = (
        f"Executed 'Functions.{function}' ({outcome}, Id={invocation_id}, Duration={duration_s * 1000:.0f}ms) "
        f"trigger={trigger} {detail}"
    )
    if error is None:
        log.info(line)
    else:
        log.error("%s error=%s", line, _short_error(error), exc_info=(type(error), error, error.__traceback__))


class LocalHost:
    """The host, programmatically: `async with LocalHost(root, values=...) as host: ... host.url ...`."""

    def __init__(
        self,
        root: Path | str = ".",
        *,
        settings_path: Path | str | None = "local.settings.json",
        values: Mapping[str, str] | None = None,
        options: HostOptions | None = None,
        environ: MutableMapping[str, str] | None = None,
    ) -> None:
        """`settings_path` is relative to `root` unless absolute (None: no file). `values` are
        applied after the file and override the environment (explicit wins); both are restored on stop."""
        self.root = Path(root).resolve()
        self.options = options or HostOptions()
        self._environ = os.environ if environ is None else environ
        self._settings_path = None if settings_path is None else (self.root / settings_path)
        self._values = dict(values or {})
        self._saved_env: dict[str, str | None] = {}
        self.host_json: HostJson = HostJson()
        self.functions: list[LoadedFunction] = []
        self.errors: list[str] = []  # functions that failed to load (the host runs the others)
        self.host_id = ""
        self._pool: ConnectionPool | None = None
        self._listeners: list[BlobTriggerListener | QueueTriggerListener | TimerTriggerListener] = []
        self._runner: web.AppRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._started_at = 0.0
        self._state = "Initialized"
        self.port = self.options.port

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    async def __aenter__(self) -> LocalHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _apply_settings(self) -> None:
        file_values = load_local_settings(self._settings_path) if self._settings_path is not None else {}
        for key in {*file_values, *self._values}:
            self._saved_env.setdefault(key, self._environ.get(key))
        skipped = apply_settings(file_values, self._environ)
        for key in skipped:
            if key not in self._values:
                log.info("Skipping '%s' from local.settings.json as it's already defined in the environment", key)
        apply_settings(self._values, self._environ, override=True)

    def _restore_settings(self) -> None:
        for key, old in self._saved_env.items():
            if old is None:
                self._environ.pop(key, None)
            else:
                self._environ[key] = old
        self._saved_env.clear()

    async def start(self) -> None:
        """Load settings and functions, start listeners and the HTTP server."""
        self._started_at = time.monotonic()
        self._state = "Starting"
        self._apply_settings()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self._state = "Running"

    async def _start(self) -> None:
        self.host_json = load_host_json(self.root)
        self.host_id = (
            self.options.host_id
            or self._environ.get("AzureFunctionsJobHost__id")
            or self.host_json.host_id
            or default_host_id(self.root)
        )
        self.functions = []
        self.errors = []
        specs = discover_functions(self.root, self._environ)
        if self.options.functions is not None:
            unknown = set(self.options.functions) - {s.name for s in specs}
            if unknown:
                raise HostConfigError(f"no such function(s): {', '.join(sorted(unknown))}")
            specs = [s for s in specs if s.name in self.options.functions]
        self._pool = ConnectionPool(self._environ)
        self._executor = make_executor()
        timeout_s = self.options.function_timeout_s or self.host_json.function_timeout_s
        http_routes: list[HttpRoute] = []
        lines: list[str] = []
        parallelism = asyncio.Semaphore(
            self.options.max_degree_of_parallelism or self.host_json.max_degree_of_parallelism
        )
        for spec in specs:
            if spec.disabled:
                lines.append(f"    {spec.name}: disabled")
                continue
            try:
                lines.append(self._add_function(spec, http_routes, parallelism, timeout_s))
            except HostConfigError as e:
                if self.options.strict:
                    raise
                # The real host keeps running the other functions and lists the broken one in its status.
                self.errors.append(str(e))
                log.error("The '%s' function is in error: %s", spec.name, e)
                lines.append(f"    {spec.name}: ERROR (see above)")
        front = HttpFrontEnd(
            http_routes,
            function_key=lambda: self._environ.get(FUNCTION_KEY_SETTING),
            status=self.status,
            timeout_s=timeout_s,
            log_invocation=log_invocation,
            max_body_bytes=int(self._environ.get("FUNCTIONS_REQUEST_BODY_SIZE_LIMIT") or DEFAULT_MAX_BODY_BYTES),
        )
        if any(r.auth_level != "anonymous" for r in http_routes) and not self._environ.get(FUNCTION_KEY_SETTING):
            log.warning("%s is not set: functions with authLevel function/admin will answer 401", FUNCTION_KEY_SETTING)
        self._runner = web.AppRunner(
            front.app, access_log=None, handle_signals=False, shutdown_timeout=self.options.shutdown_grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await site.start()
        self.port = _bound_port(self._runner, self.options.port)
        for listener in self._listeners:
            listener.start()
        log.info("Host started (id %s, root %s)", self.host_id, self.root)
        log.info("Functions:\n%s", "\n".join(line.replace("{url}", self.url) for line in lines) or "    (none)")
        log.info("Listening on %s", self.url)

    def _add_function(
        self, spec: FunctionSpec, http_routes: list[HttpRoute], parallelism: asyncio.Semaphore, timeout_s: float | None
    ) -> str:
        """Load one function and wire its trigger; returns its line for the start-up listing."""
        assert self._executor is not None
        fn = load_function(self.root, spec, self._executor)
        kind = spec.trigger_type
        line: str
        listener: BlobTriggerListener | QueueTriggerListener | TimerTriggerListener | None = None
        if kind == "httpTrigger":
            route = HttpRoute.from_function(fn, self.host_json.route_prefix)
            http_routes.append(route)
            auth = "" if route.auth_level == "anonymous" else f" (authLevel {route.auth_level})"
            line = f"    {spec.name}: [{','.join(route.methods)}] {{url}}/{self._route_path(route)}{auth}"
        elif kind == "blobTrigger":
            listener = blob = self._blob_listener(fn, spec, parallelism, timeout_s)
            line = f"    {spec.name}: blobTrigger ({blob.pattern.container}/{blob.pattern.blob_pattern})"
        elif kind == "queueTrigger":
            listener = queue = self._queue_listener(fn, spec, timeout_s)
            line = f"    {spec.name}: queueTrigger ({queue.queue_name})"
        elif kind == "timerTrigger":
            trig = spec.trigger
            schedule = resolve_setting_refs(str(trig.get("schedule", "")), self._environ)
            try:
                listener = TimerTriggerListener(
                    fn, schedule, bool(trig.get("runOnStartup")), timeout_s, log_invocation=log_invocation
                )
            except ValueError as e:
                raise HostConfigError(f"function {spec.name}: {e}") from e
            line = f"    {spec.name}: timerTrigger ({schedule})"
        else:
            raise HostConfigError(f"function {spec.name}: trigger {kind} is not supported by the local host")
        for out in spec.unsupported_outputs:
            log.warning("function %s: output binding %s is not implemented by the local host", spec.name, out)
        if listener is not None:
            self._listeners.append(listener)
        self.functions.append(fn)
        return line

    def _route_path(self, route: HttpRoute) -> str:
        prefix = self.host_json.route_prefix
        return f"{prefix}/{route.template}" if prefix else route.template

    def _blob_listener(
        self, fn: LoadedFunction, spec: FunctionSpec, parallelism: asyncio.Semaphore, timeout_s: float | None
    ) -> BlobTriggerListener:
        trig = spec.trigger
        path = resolve_setting_refs(str(trig.get("path", "")), self._environ)
        try:
            pattern = BlobPathPattern.parse(path)
        except ValueError as e:
            raise HostConfigError(f"function {spec.name}: {e}") from e
        assert self._pool is not None
        return BlobTriggerListener(
            fn=fn,
            pattern=pattern,
            storage=self._pool.get(trig.get("connection")),
            host_id=self.host_id,
            poison_threshold=self.options.poison_threshold or self.host_json.poison_blob_threshold,
            parallelism=parallelism,
            retry=RetryPolicy(self.options.retry_base_delay_s, self.options.retry_max_delay_s),
            poll_interval_s=self.options.poll_interval_s,
            timeout_s=timeout_s,
            log_invocation=log_invocation,
        )

    def _queue_listener(self, fn: LoadedFunction, spec: FunctionSpec, timeout_s: float | None) -> QueueTriggerListener:
        trig = spec.trigger
        assert self._pool is not None
        return QueueTriggerListener(
            fn=fn,
            queue_name=resolve_setting_refs(str(trig.get("queueName", "")), self._environ).lower(),
            storage=self._pool.get(trig.get("connection")),
            max_dequeue_count=self.options.poison_threshold or self.host_json.max_dequeue_count,
            batch_size=self.host_json.queue_batch_size,
            retry_visibility_s=self.host_json.queue_visibility_timeout_s,
            message_encoding=self.host_json.queue_message_encoding,
            poll_interval_s=self.options.poll_interval_s,
            timeout_s=timeout_s,
            log_invocation=log_invocation,
        )

    async def stop(self) -> None:
        """Stop accepting work, let in-flight invocations finish (up to the grace period), close clients."""
        if self._state == "Stopped":
            return
        self._state = "Stopping"
        grace = self.options.shutdown_grace_s
        await asyncio.gather(*(listener.stop(grace) for listener in self._listeners), return_exceptions=True)
        self._listeners.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._restore_settings()
        self._state = "Stopped"
        log.info("Host stopped")

    def status(self) -> dict[str, Any]:
        """What GET /admin/host/status returns (a subset of the real host's answer)."""
        return {
            "id": self.host_id,
            "state": self._state,
            "version": "local",
            "processUptime": int((time.monotonic() - self._started_at) * 1000),
            "functions": [f.spec.name for f in self.functions],
            **({"errors": list(self.errors)} if self.errors else {}),
        }


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    if requested:
        return requested
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("could not find the port the host is listening on")


# --- CLI ----------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m local.host", description="Local Azure Functions host (v1 model).")
    p.add_argument("--root", type=Path, default=Path("."), help="function app root (default: .)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default: 7071; 0 = any free port)")
    p.add_argument(
        "--settings",
        default="local.settings.json",
        help="settings file, relative to --root (default: local.settings.json)",
    )
    p.add_argument("--no-settings", action="store_true", help="do not read a settings file")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between blob/queue polls (default: 0.5)")
    p.add_argument(
        "--retry-base-delay", type=float, default=1.0, help="first blob retry delay, doubled each time (default: 1)"
    )
    p.add_argument("--retry-max-delay", type=float, default=60.0, help="longest blob retry delay (default: 60)")
    p.add_argument(
        "--shutdown-grace", type=float, default=10.0, help="seconds in-flight work gets on stop (default: 10)"
    )
    p.add_argument("--functions", nargs="+", default=None, help="run only these functions")
    p.add_argument("--strict", action="store_true", help="exit (code 2) when a function fails to load")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    options = HostOptions(
        host=args.host,
        port=args.port,
        poll_interval_s=args.poll_interval,
        retry_base_delay_s=args.retry_base_delay,
        retry_max_delay_s=args.retry_max_delay,
        shutdown_grace_s=args.shutdown_grace,
        functions=tuple(args.functions) if args.functions else None,
        strict=args.strict,
    )
    host = LocalHost(args.root, settings_path=None if args.no_settings else args.settings, options=options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await host.start()
    except HostConfigError as e:
        log.error("%s", e)
        return 2
    await stop.wait()
    log.info("Stopping (signal received)")
    await host.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # The storage SDK logs every request at INFO; keep the host's own lines readable.
    logging.getLogger("azure").setLevel(logging.WARNING)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
