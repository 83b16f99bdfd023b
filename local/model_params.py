"""Which request parameters the local model server takes, and how it spends reasoning tokens.

Two parameter styles, as Azure OpenAI's chat completions endpoint shows them (see
https://learn.microsoft.com/azure/ai-foundry/openai/how-to/reasoning, "Reasoning models will
only work with the max_completion_tokens parameter"):

- chat (gpt-4o and older): `max_tokens` or `max_completion_tokens`, any `temperature`;
  `reasoning_effort` is refused.
- reasoning (o-series, gpt-5.x): `max_tokens` is refused, `temperature` other than 1 is refused,
  `max_completion_tokens` and `reasoning_effort` are taken.

The refusal bodies are the ones the service answers, copied from reports of real responses:
- max_tokens: github.com/griptape-ai/ComfyUI-Griptape/issues/312 (code unsupported_parameter)
- temperature: github.com/gabrii/Cursor-Azure-GPT-5/issues/33 (Azure, code unsupported_value)
- reasoning_effort value: github.com/anomalyco/opencode/issues/4451 (code unsupported_value)
- reasoning_effort on a chat model: github.com/BoundaryML/baml/pull/2708 (code unsupported_parameter)

Reasoning tokens are billed as output and count against `max_completion_tokens`
(completion_tokens_details.reasoning_tokens, part of completion_tokens); when reasoning uses the
whole budget the answer is empty with finish_reason "length". The stand-in spends a fixed number
per effort (settable), so tests know what to expect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Every value the API knows (openai-python's ReasoningEffort); a model takes a subset.
KNOWN_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# What the gpt-5.1 generation takes (the opencode#4451 message above).
DEFAULT_EFFORTS = ("none", "low", "medium", "high")
DEFAULT_EFFORT = "medium"  # the API's default when a request names none
# Reasoning tokens per answer, growing with effort; small at the low end so a task's usual budget fits.
DEFAULT_REASONING_TOKENS: dict[str, int] = {
    "none": 0,
    "minimal": 16,
    "low": 64,
    "medium": 256,
    "high": 1024,
    "xhigh": 4096,
}
DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class ParamError(ValueError):
    """A parameter the model refuses: becomes a 400 in Azure's error format."""

    def __init__(self, message: str, param: str | None, code: str | None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class Params:
    max_tokens: int | None  # the output budget the request set (either name), None = the model's maximum
    reasoning_effort: str | None  # effective effort in reasoning mode, None in chat mode


def _quoted_list(values: tuple[str, ...] | list[str]) -> str:
    """'a', 'b', and 'c' (the API's wording)."""
    q = [f"'{v}'" for v in values]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f", and {q[-1]}"


def _number_text(value: Any) -> str:
    return repr(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _budget(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamError(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    return value


def check_params(
    body: dict[str, Any],
    *,
    reasoning: bool,
    efforts: tuple[str, ...],
    default_effort: str,
    model_name: str,
) -> Params:
    """The budget and effort a request asks for, or the ParamError the model would answer."""
    if not reasoning:
        if body.get("reasoning_effort") is not None:
            raise ParamError(
                "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                "reasoning_effort",
                "unsupported_parameter",
            )
        completion = _budget(body, "max_completion_tokens")
        legacy = _budget(body, "max_tokens")
        return Params(completion if completion is not None else legacy, None)
    if body.get("max_tokens") is not None:
        raise ParamError(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or temperature != 1):
        raise ParamError(
            f"Unsupported value: 'temperature' does not support {_number_text(temperature)} with this model. "
            "Only the default (1) value is supported.",
            "temperature",
            "unsupported_value",
        )
    effort = body.get("reasoning_effort")
    if effort is None:
        effort = default_effort
    elif not isinstance(effort, str) or effort not in KNOWN_EFFORTS:
        raise ParamError(
            f"Invalid value: '{effort}'. Supported values are: {_quoted_list(KNOWN_EFFORTS)}.",
            "reasoning_effort",
            "invalid_value",
        )
    elif effort not in efforts:
        base = DATE_SUFFIX.sub("", model_name)
        raise ParamError(
            f"Unsupported value: '{effort}' is not supported with the '{base}' model. "
            f"Supported values are: {_quoted_list(efforts)}.",
            "reasoning_effort",
            "unsupported_value",
        )
    return Params(_budget(body, "max_completion_tokens"), effort)


@dataclass(frozen=True)
class Completion:
    """How an answer spends its budget: content kept, tokens billed, why it stopped."""

    content: str
    completion_tokens: int
    reasoning_tokens: int
    finish_reason: str  # stop | length


def spend(content: str, content_tokens: int, reasoning_tokens: int, limit: int, chars_per_token: int) -> Completion:
    """Reasoning comes first out of `limit`; the visible answer gets what is left, cut at the limit."""
    if reasoning_tokens >= limit:  # the model thought until the budget ran out and said nothing
        return Completion("", limit, limit, "length")
    left = limit - reasoning_tokens
    if content_tokens > left:
        return Completion(content[: left * chars_per_token], reasoning_tokens + left, reasoning_tokens, "length")
    return Completion(content, reasoning_tokens + content_tokens, reasoning_tokens, "stop")


def parse_efforts(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'none,low,medium,high' -> a tuple of known efforts."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    bad = [s for s in items if not isinstance(s, str) or s not in KNOWN_EFFORTS]
    if not items or bad:
        raise ValueError(f"reasoning efforts must be a non-empty list of {', '.join(KNOWN_EFFORTS)}; got {spec!r}")
    return tuple(items)


def parse_reasoning_tokens(spec: str | dict[str, Any]) -> dict[str, int]:
    """'low:64,high:2000' (or a dict) over the defaults: reasoning tokens per effort."""
    pairs: list[tuple[str, Any]]
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = []
        for item in (s.strip() for s in spec.split(",")):
            if item:
                name, sep, value = item.partition(":")
                if not sep:
                    raise ValueError(f"reasoning tokens must look like 'low:64,high:2000', got {item!r}")
                pairs.append((name.strip(), value.strip()))
    out = dict(DEFAULT_REASONING_TOKENS)
    for name, value in pairs:
        if name not in KNOWN_EFFORTS:
            raise ValueError(f"unknown reasoning effort {name!r}; use one of {', '.join(KNOWN_EFFORTS)}")
        try:
            n = int(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"reasoning tokens for {name!r} must be an integer, got {value!r}") from exc
        if n < 0 or isinstance(value, bool):
            raise ValueError(f"reasoning tokens for {name!r} must be >= 0, got {value!r}")
        out[name] = n
    return out
