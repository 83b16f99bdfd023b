"""What the local Functions host reads before it starts: settings, host.json and function.json files.

Mirrors the real host's start-up: `local.settings.json` "Values" become environment variables
(variables already set win, as with `func start`), then every `<folder>/function.json` one level
below the root describes a function whose bindings say how it is triggered.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("local.host")

DEFAULT_ROUTE_PREFIX = "api"
DEFAULT_MAX_DEGREE_OF_PARALLELISM = 8
DEFAULT_MAX_DEQUEUE_COUNT = 5
DEFAULT_QUEUE_BATCH_SIZE = 16
DEFAULT_FUNCTION_TIMEOUT_S = 600.0  # the "00:10:00" host.json default we ship
TRIGGER_TYPES = ("httpTrigger", "blobTrigger", "queueTrigger", "timerTrigger")


class HostConfigError(ValueError):
    """A settings file, host.json or function.json the host cannot use."""


# --- settings -------------------------------------------------------------------------------


def load_local_settings(path: Path | str) -> dict[str, str]:
    """The "Values" of a local.settings.json ({} when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HostConfigError(f"{path}: not valid JSON: {e}") from e
    if doc.get("IsEncrypted"):
        raise HostConfigError(f"{path}: encrypted settings are not supported by the local host")
    values = doc.get("Values") or {}
    if not isinstance(values, dict):
        raise HostConfigError(f"{path}: 'Values' must be an object")
    return {str(k): _setting_str(v) for k, v in values.items()}


def _setting_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def apply_settings(
    values: Mapping[str, str], environ: MutableMapping[str, str] | None = None, *, override: bool = False
) -> list[str]:
    """Copy settings into the environment; returns the names skipped because already set.

    `func start` does the same: a variable already in the environment is kept and the file's
    value is skipped, so a shell or CI can override local.settings.json.
    """
    env = os.environ if environ is None else environ
    skipped: list[str] = []
    for key, value in values.items():
        if key in env and not override:
            skipped.append(key)
            continue
        env[key] = value
    return skipped


_SETTING_REF = re.compile(r"%([^%]+)%")


def resolve_setting_refs(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace `%NAME%` with the setting's value, as binding expressions in function.json do."""
    env = os.environ if environ is None else environ

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            raise HostConfigError(f"binding expression %{name}% refers to setting {name!r}, which is not set")
        return env[name]

    return _SETTING_REF.sub(sub, text)


def setting_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


# --- host.json ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostJson:
    """The parts of host.json the local host honours (defaults as the real host's)."""

    route_prefix: str = DEFAULT_ROUTE_PREFIX
    max_degree_of_parallelism: int = DEFAULT_MAX_DEGREE_OF_PARALLELISM
    poison_blob_threshold: int = DEFAULT_MAX_DEQUEUE_COUNT
    max_dequeue_count: int = DEFAULT_MAX_DEQUEUE_COUNT
    queue_batch_size: int = DEFAULT_QUEUE_BATCH_SIZE
    queue_visibility_timeout_s: float = 0.0
    queue_message_encoding: str = "base64"
    function_timeout_s: float | None = DEFAULT_FUNCTION_TIMEOUT_S
    host_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def parse_timespan(value: str | int | float | None) -> float | None:
    """'hh:mm:ss[.fff]' or 'd.hh:mm:ss' (or seconds) -> seconds; '-1' / None -> None (unbounded)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    if text in ("-1", ""):
        return None
    days = 0
    m = re.fullmatch(r"(?:(\d+)\.)?(\d+):(\d+):(\d+(?:\.\d+)?)", text)
    if not m:
        raise HostConfigError(f"host.json: cannot read timespan {value!r} (expected hh:mm:ss)")
    if m.group(1):
        days = int(m.group(1))
    return days * 86400 + int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))


def load_host_json(root: Path | str) -> HostJson:
    """Read root/host.json ({} and defaults when absent)."""
    path = Path(root) / "host.json"
    if not path.exists():
        return HostJson()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HostConfigError(f"{path}: not valid JSON: {e}") from e
    ext = doc.get("extensions") or {}
    blobs = ext.get("blobs") or {}
    queues = ext.get("queues") or {}
    http = ext.get("http") or {}
    max_dequeue = int(queues.get("maxDequeueCount", DEFAULT_MAX_DEQUEUE_COUNT))
    route_prefix = http.get("routePrefix", DEFAULT_ROUTE_PREFIX)
    timeout = parse_timespan(doc["functionTimeout"]) if "functionTimeout" in doc else DEFAULT_FUNCTION_TIMEOUT_S
    return HostJson(
        route_prefix=str(route_prefix).strip("/"),
        max_degree_of_parallelism=max(1, int(blobs.get("maxDegreeOfParallelism", DEFAULT_MAX_DEGREE_OF_PARALLELISM))),
        # The blobs extension has its own threshold; older ones reuse the queues' maxDequeueCount.
        poison_blob_threshold=max(1, int(blobs.get("poisonBlobThreshold", max_dequeue))),
        max_dequeue_count=max(1, max_dequeue),
        queue_batch_size=max(1, min(32, int(queues.get("batchSize", DEFAULT_QUEUE_BATCH_SIZE)))),
        queue_visibility_timeout_s=parse_timespan(queues.get("visibilityTimeout", "00:00:00")) or 0.0,
        queue_message_encoding=str(queues.get("messageEncoding", "base64")).lower(),
        function_timeout_s=timeout,
        host_id=doc.get("id"),
        raw=doc,
    )


# --- function.json --------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSpec:
    """One function folder: where its code is and how it is triggered."""

    name: str
    directory: Path
    script_file: Path
    entry_point: str
    bindings: tuple[dict[str, Any], ...]
    disabled: bool = False

    @property
    def function_id(self) -> str:
        """The id the real host gives it (used in blob receipts and poison messages)."""
        return f"Host.Functions.{self.name}"

    @property
    def trigger(self) -> dict[str, Any]:
        for b in self.bindings:
            if str(b.get("type", "")).endswith("Trigger"):
                return b
        raise HostConfigError(f"{self.directory}/function.json: no trigger binding")

    @property
    def trigger_type(self) -> str:
        return str(self.trigger["type"])

    @property
    def unsupported_outputs(self) -> list[str]:
        """Output bindings other than the HTTP `$return` (the local host does not implement them)."""
        out = []
        for b in self.bindings:
            if b.get("direction") == "out" and not (b.get("type") == "http"):
                out.append(f"{b.get('type')}:{b.get('name')}")
        return out


def discover_functions(root: Path | str, environ: Mapping[str, str] | None = None) -> list[FunctionSpec]:
    """Every `<folder>/function.json` directly under `root`, like the real host (sorted by name).

    A function is disabled by its `disabled` flag or the `AzureWebJobs.<name>.Disabled` setting.
    """
    env = os.environ if environ is None else environ
    root = Path(root).resolve()
    specs: list[FunctionSpec] = []
    for fj in sorted(root.glob("*/function.json")):
        folder = fj.parent
        if folder.name.startswith((".", "_")) or folder.name == "node_modules":
            continue
        try:
            doc = json.loads(fj.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise HostConfigError(f"{fj}: not valid JSON: {e}") from e
        bindings = tuple(doc.get("bindings") or ())
        script = folder / doc.get("scriptFile", "__init__.py")
        disabled = bool(doc.get("disabled", False)) or setting_true(env.get(f"AzureWebJobs.{folder.name}.Disabled"))
        spec = FunctionSpec(
            name=folder.name,
            directory=folder,
            script_file=script.resolve(),
            entry_point=str(doc.get("entryPoint", "main")),
            bindings=bindings,
            disabled=disabled,
        )
        spec.trigger  # noqa: B018 - validates that there is one
        specs.append(spec)
    return specs
