"""Importing v1 function folders and calling their `main`, the way the Python worker does.

The worker puts the function app root on `sys.path` and imports each folder as a submodule of a
namespace package (`__app__.<folder>`), so both `from shared import x` and `from . import helper`
work. Arguments are passed by binding name (plus `context` when `main` asks for it). A coroutine
`main` runs on the event loop; a plain one runs in a thread pool so it cannot block the host.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func

from local.host_config import FunctionSpec, HostConfigError

_APP_PACKAGES: dict[Path, str] = {}
_APP_LOCK = threading.Lock()


def _app_package(root: Path) -> str:
    """The namespace package standing for `root` (`__app__`, or a unique name if that is taken)."""
    root = root.resolve()
    with _APP_LOCK:
        if root in _APP_PACKAGES:
            return _APP_PACKAGES[root]
        name = "__app__"
        n = 0
        while name in sys.modules and list(getattr(sys.modules[name], "__path__", [])) != [str(root)]:
            n += 1
            name = f"__app{n}__"
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root)]
            pkg.__package__ = name
            sys.modules[name] = pkg
        _APP_PACKAGES[root] = name
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return name


class _Context(func.Context):
    """The `context` argument: invocation id, function name and folder."""

    def __init__(self, invocation_id: str, function_name: str, function_directory: str) -> None:
        self._invocation_id = invocation_id
        self._function_name = function_name
        self._function_directory = function_directory
        self._tls = threading.local()
        self._tls.invocation_id = invocation_id

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> Any:
        return self._tls

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> Any:
        return None

    @property
    def retry_context(self) -> Any:
        return None


@dataclass
class LoadedFunction:
    """A function's `main`, ready to be called with its trigger value."""

    spec: FunctionSpec
    main: Callable[..., Any]
    trigger_param: str
    wants_context: bool
    is_async: bool
    executor: ThreadPoolExecutor = field(repr=False)

    async def invoke(
        self, trigger_value: Any, *, invocation_id: str | None = None, timeout_s: float | None = None
    ) -> Any:
        """Call `main` with the trigger value; raises what it raises (or TimeoutError)."""
        invocation_id = invocation_id or str(uuid.uuid4())
        kwargs: dict[str, Any] = {self.trigger_param: trigger_value}
        if self.wants_context:
            kwargs["context"] = _Context(invocation_id, self.spec.name, str(self.spec.directory))
        if self.is_async:
            coro = self.main(**kwargs)
        else:
            loop = asyncio.get_running_loop()
            coro = loop.run_in_executor(self.executor, lambda: self.main(**kwargs))
        if timeout_s is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"Timeout value of {timeout_s:.0f}s exceeded by function 'Functions.{self.spec.name}'"
            ) from None

    async def invoke_logged(
        self,
        trigger_value: Any,
        *,
        trigger: str,
        detail: str,
        timeout_s: float | None,
        log_invocation: Callable[..., None],
    ) -> BaseException | None:
        """Invoke once and log one line; return the failure (not raised) so the caller decides retry or poison."""
        invocation_id = str(uuid.uuid4())
        started = time.monotonic()
        error: BaseException | None = None
        try:
            await self.invoke(trigger_value, invocation_id=invocation_id, timeout_s=timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e
        log_invocation(self.spec.name, trigger, invocation_id, time.monotonic() - started, error, detail)
        return error


async def stop_listener(poller: asyncio.Task[Any] | None, tasks: set[asyncio.Task[Any]], grace_s: float) -> None:
    """Stop a trigger's poll loop; give in-flight invocations `grace_s` to finish, then cancel them
    (no receipt or delete happens for those, so they are redone on the next start)."""
    if poller is not None:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=grace_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def make_executor() -> ThreadPoolExecutor:
    """The pool for sync functions, sized like the worker's (PYTHON_THREADPOOL_THREAD_COUNT)."""
    raw = os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT")
    workers = int(raw) if raw and raw.isdigit() and int(raw) > 0 else min(32, (os.cpu_count() or 1) + 4)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="func")


def load_function(root: Path, spec: FunctionSpec, executor: ThreadPoolExecutor) -> LoadedFunction:
    """Import the function's script file and find its entry point."""
    pkg = _app_package(root)
    rel = spec.script_file.relative_to(root.resolve())
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    module_name = ".".join([pkg, *parts])
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise HostConfigError(f"function {spec.name}: cannot import {spec.script_file}: {type(e).__name__}: {e}") from e
    main = getattr(module, spec.entry_point, None)
    if not callable(main):
        raise HostConfigError(f"function {spec.name}: {spec.script_file} has no callable {spec.entry_point!r}")
    params = inspect.signature(main).parameters
    trigger_name = str(spec.trigger.get("name", ""))
    if trigger_name not in params:
        raise HostConfigError(
            f"function {spec.name}: {spec.entry_point}() has no parameter {trigger_name!r} "
            f"(the trigger binding's name in function.json)"
        )
    return LoadedFunction(
        spec=spec,
        main=main,
        trigger_param=trigger_name,
        wants_context="context" in params,
        is_async=inspect.iscoroutinefunction(main),
        executor=executor,
    )
