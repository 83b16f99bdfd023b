"""Request options: one typed parser for every place a caller sets them.

HTTP form fields, JSON body keys, query parameters, blob metadata and `_task.json` /
`_manifest.json` keys all pass through `parse_options`, so a value means the same thing
and fails with the same message wherever it is written (`strips: "on"` is true everywhere).
Every field is bounded *before* it is parsed (lengths, JSON size and depth), and no
message echoes the caller's value or a Python exception: it names the field and the rule.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest, InvalidSchema, VlmError
from .settings import DETAILS, Settings, from_settings, mirror

OPTION_KEYS = ("task", "prompt", "detail", "schema", "labels", "max_tokens", "pages", "strips", "reasoning_effort")
MODES = ("realtime", "batch")  # a folder's route: answered now, or queued for the Batch API (shared/batch.py)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
MAX_TASK_CHARS = 64
MAX_SCHEMA_NAME_CHARS = 256
_DIGITS = re.compile(r"[0-9]{1,9}")
_PAGES = re.compile(r"[0-9]{1,6}(?:-[0-9]{1,6})?(?:,[0-9]{1,6}(?:-[0-9]{1,6})?)*")


@dataclass(frozen=True)
class OptionLimits:
    """The caps on option fields: each mirrors a setting (see README, Limits)."""

    max_prompt_chars: int = mirror("max_prompt_chars")
    max_schema_bytes: int = mirror("schema_max_bytes")  # the same cap the schema guard applies after parsing
    max_json_depth: int = mirror("max_json_depth")
    max_json_items: int = mirror("max_json_items")
    max_labels: int = mirror("max_labels")
    max_label_chars: int = mirror("max_label_chars")
    max_pages_spec_chars: int = mirror("max_pages_spec_chars")
    max_tokens: int = mirror("max_tokens_limit")

    @classmethod
    def from_settings(cls, s: Settings) -> OptionLimits:
        return from_settings(cls, s)

    @property
    def max_labels_text(self) -> int:
        """Longest `labels` string worth parsing: every label fully \\u-escaped, quoted, separated."""
        return self.max_labels * (self.max_label_chars * 6 + 4) + 16

    @property
    def max_field_bytes(self) -> int:
        """Longest single option value in bytes (multipart parts are cut off here, while reading)."""
        return max(self.max_schema_bytes, self.max_prompt_chars * 4, self.max_labels_text, 1024)


@dataclass(frozen=True)
class RequestOptions:
    """What the caller asked for, typed and within limits (the images travel separately)."""

    task: str
    prompt: str | None = None
    detail: str = "auto"
    schema: dict[str, Any] | str | None = None  # str: a schema *name* (folder configs only)
    labels: list[str] | None = None
    max_tokens: int | None = None
    pages: str | None = None
    strips: bool = False
    reasoning_effort: str | None = None


def _where(source: str) -> str:
    if source == "http":
        return ""
    return f" (in {source[:200]}{'...' if len(source) > 200 else ''})"


def _bad(field: str, rule: str, source: str, error: type[VlmError] = InvalidRequest, **details: Any) -> VlmError:
    return error(f"{field} {rule}{_where(source)}", details={"field": field, **details})


# --- bounded JSON ------------------------------------------------------------------


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constant(_: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (1 for a scalar)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def loads_bounded(
    text: str | bytes,
    *,
    field: str,
    limits: OptionLimits,
    source: str = "http",
    error: type[VlmError] = InvalidRequest,
) -> Any:
    """`json.loads` with its work bounded: items counted before parsing (a cheap upper bound from
    the structural characters), depth refused whether Python's recursion limit or ours is hit,
    non-finite numbers refused. Messages give the position only, never the decoder's text."""
    marks: tuple[Any, ...] = (b",", b"[", b"{") if isinstance(text, bytes) else (",", "[", "{")
    if sum(text.count(mark) for mark in marks) > limits.max_json_items:
        raise _bad(field, f"has too many JSON items (over {limits.max_json_items})", source, error)
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _bad(field, f"is not valid JSON (line {exc.lineno}, column {exc.colno})", source, error) from None
    except RecursionError:
        raise _bad(field, f"is nested deeper than {limits.max_json_depth} levels", source, error) from None
    except (UnicodeDecodeError, ValueError):  # not UTF-8, an integer of over 4300 digits, 1e400, NaN
        raise _bad(field, "is not valid JSON (bad encoding or a number out of range)", source, error) from None
    if json_depth(value) > limits.max_json_depth:
        raise _bad(field, f"is nested deeper than {limits.max_json_depth} levels", source, error)
    return value


# --- one parser per field ----------------------------------------------------------


def _absent(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _task(raw: Any, present: set[str], default_task: str, source: str) -> str:
    from .tasks import TASKS, implied_task

    if _absent(raw):
        return implied_task(present, default_task)
    if not isinstance(raw, str) or len(raw) > MAX_TASK_CHARS or raw.strip().lower() not in TASKS:
        named = f" {raw!r}" if isinstance(raw, str) and len(raw) <= MAX_TASK_CHARS else ""  # short: safe to show
        raise _bad("task", f"names an unknown task{named}; use one of: {', '.join(TASKS)}", source, tasks=list(TASKS))
    return raw.strip().lower()


def _prompt(raw: Any, limits: OptionLimits, source: str) -> str | None:
    if _absent(raw):
        return None
    if not isinstance(raw, str):
        raise _bad("prompt", "must be a string", source)
    if len(raw) > limits.max_prompt_chars:
        raise _bad("prompt", f"is over {limits.max_prompt_chars} characters", source, limit=limits.max_prompt_chars)
    return raw


def _choice(field: str, raw: Any, allowed: tuple[str, ...], source: str) -> str:
    if not isinstance(raw, str) or raw.strip().lower() not in allowed:
        raise _bad(field, f"must be one of: {', '.join(allowed)}", source, allowed=list(allowed))
    return raw.strip().lower()


def _schema(raw: Any, limits: OptionLimits, source: str) -> dict[str, Any] | str | None:
    """A JSON object (inline, or as JSON text), or outside HTTP the name of a schema blob."""
    if _absent(raw):
        return None
    if isinstance(raw, str):
        if len(raw) > limits.max_schema_bytes or len(raw.encode()) > limits.max_schema_bytes:
            raise _bad(
                "schema", f"is over {limits.max_schema_bytes} bytes", source, InvalidSchema,
                limit=limits.max_schema_bytes,
            )  # fmt: skip
        text = raw.strip()
        if source != "http" and not text.startswith(("{", "[")):
            if len(text) > MAX_SCHEMA_NAME_CHARS:
                raise _bad("schema", f"name is over {MAX_SCHEMA_NAME_CHARS} characters", source, InvalidSchema)
            return text
        raw = loads_bounded(text, field="schema", limits=limits, source=source, error=InvalidSchema)
    if not isinstance(raw, dict):
        rule = "must be a JSON object (a JSON Schema)"
        raise _bad("schema", rule + ("" if source == "http" else " or a schema name"), source, InvalidSchema)
    if json_depth(raw) > limits.max_json_depth:
        raise _bad("schema", f"is nested deeper than {limits.max_json_depth} levels", source, InvalidSchema)
    if len(json.dumps(raw, ensure_ascii=False).encode()) > limits.max_schema_bytes:
        raise _bad(
            "schema", f"is over {limits.max_schema_bytes} bytes", source, InvalidSchema, limit=limits.max_schema_bytes
        )
    return raw


def parse_labels(raw: Any, limits: OptionLimits | None = None, source: str = "http") -> list[str] | None:
    """`labels` as a list of strings, JSON list text, or a comma-separated string; each stripped."""
    limits = limits or OptionLimits()
    if _absent(raw):
        return None
    if isinstance(raw, str):
        if len(raw) > limits.max_labels_text:
            raise _bad("labels", f"is too long (at most {limits.max_labels} labels)", source)
        text = raw.strip()
        if text.startswith("["):
            raw = loads_bounded(text, field="labels", limits=limits, source=source)
        else:
            raw = [p for p in text.split(",") if p.strip()]
    if not isinstance(raw, list):
        raise _bad("labels", "must be a list of strings or a comma-separated string", source)
    if len(raw) > limits.max_labels:
        raise _bad("labels", f"has over {limits.max_labels} entries", source, limit=limits.max_labels)
    labels = []
    for i, label in enumerate(raw):
        if not isinstance(label, str) or not label.strip():
            raise _bad("labels", f"entry {i} must be a non-empty string", source, index=i)
        if len(label.strip()) > limits.max_label_chars:
            raise _bad(
                "labels", f"entry {i} is over {limits.max_label_chars} characters", source,
                index=i, limit=limits.max_label_chars,
            )  # fmt: skip
        labels.append(label.strip())
    return labels or None


def _max_tokens(raw: Any, limits: OptionLimits, source: str) -> int | None:
    if _absent(raw):
        return None
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and _DIGITS.fullmatch(raw.strip()):
        value = int(raw.strip())
    if value is None or not 1 <= value <= limits.max_tokens:
        raise _bad("max_tokens", f"must be an integer from 1 to {limits.max_tokens}", source, limit=limits.max_tokens)
    return value


def _pages(raw: Any, limits: OptionLimits, source: str) -> str | None:
    if _absent(raw):
        return None
    rule = 'must be a string of 1-based pages and ranges, like "1-3,5"'
    if not isinstance(raw, str):
        raise _bad("pages", rule, source)
    if len(raw) > limits.max_pages_spec_chars:
        raise _bad("pages", f"is over {limits.max_pages_spec_chars} characters", source)
    compact = "".join(raw.split())
    if not _PAGES.fullmatch(compact):
        raise _bad("pages", rule, source)
    return compact


def _strips(raw: Any, source: str) -> bool:
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in (*TRUE_WORDS, *FALSE_WORDS, ""):
        return raw.strip().lower() in TRUE_WORDS
    raise _bad("strips", f"must be true or false ({', '.join(TRUE_WORDS)} / {', '.join(FALSE_WORDS)})", source)


def check_known_keys(fields: Mapping[str, Any], source: str, allowed: tuple[str, ...] = OPTION_KEYS) -> None:
    """Folder configs are strict: a misspelt key must fail, not be silently ignored."""
    unknown = sorted(str(k)[:40] for k in fields if k not in allowed)
    if unknown:
        shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise InvalidRequest(
            f"unknown keys: {shown}; allowed: {', '.join(allowed)}{_where(source)}",
            details={"field": unknown[0], "unknown": unknown[:10]},
        )


def parse_options(
    fields: Mapping[str, Any], *, source: str, default_task: str, default_detail: str, limits: OptionLimits
) -> RequestOptions:
    """-> RequestOptions, or InvalidRequest / InvalidSchema with `details.field` naming the field.

    `source` is "http", "metadata" or a config file's path; it only appears in messages.
    Unknown keys are ignored here (see `check_known_keys`); "" and None mean "not given".
    """
    schema = _schema(fields.get("schema"), limits, source)
    return RequestOptions(
        task=_task(fields.get("task"), {k for k, v in fields.items() if not _absent(v)}, default_task, source),
        prompt=_prompt(fields.get("prompt"), limits, source),
        detail=default_detail
        if _absent(fields.get("detail"))
        else _choice("detail", fields["detail"], DETAILS, source),
        schema=schema,
        labels=parse_labels(fields.get("labels"), limits, source),
        max_tokens=_max_tokens(fields.get("max_tokens"), limits, source),
        pages=_pages(fields.get("pages"), limits, source),
        strips=_strips(fields.get("strips"), source),
        reasoning_effort=None
        if _absent(fields.get("reasoning_effort"))
        else _choice("reasoning_effort", fields["reasoning_effort"], REASONING_EFFORTS, source),
    )


def parse_mode(raw: Any, source: str) -> str:
    """A folder config's `mode`: "realtime" (default) or "batch"; only `_task.json` and metadata take it."""
    return "realtime" if _absent(raw) else _choice("mode", raw, MODES, source)
