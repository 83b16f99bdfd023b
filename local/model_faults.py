"""Fault injection for the local model server, and the exact error bodies Azure OpenAI sends.

Faults come from a script (consumed in order by the next matching requests; "ok" lets one
through) and then from per-kind rates drawn with a seeded RNG, so a resilience test is
repeatable. A fault can be restricted to one deployment (the request's `model`) so a fallback
test fails only the primary.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = (
    "429",
    "500",
    "503",
    "reset",
    "timeout",
    "invalid_json",
    "content_filter_prompt",
    "finish_content_filter",
    "finish_length",
    "bad_output",
    "refusal",
)
# Faults answered before any image work: the request never reaches "the model".
EARLY_FAULTS = {"429", "500", "503", "reset", "timeout", "content_filter_prompt"}

CONTENT_FILTER_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read our "
    "documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)
REFUSAL_TEXT = "I'm sorry, I can't help with that."


class FaultSpecError(ValueError):
    """A fault spec names an unknown kind or a rate outside 0..1."""


def parse_rates(spec: str | dict[str, Any] | None) -> dict[str, float]:
    """`"429:0.05,500:0.05"` or `{"429": 0.05}` -> validated rates (their sum must stay <= 1)."""
    if not spec:
        return {}
    items: list[tuple[str, Any]]
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            kind, sep, rate = part.strip().rpartition(":")
            if not sep:
                raise FaultSpecError(f"fault rate {part!r} is not KIND:RATE")
            items.append((kind, rate))
    else:
        items = list(spec.items())
    rates: dict[str, float] = {}
    for kind, rate in items:
        kind = str(kind).strip()
        if kind not in FAULT_KINDS:
            raise FaultSpecError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        try:
            value = float(rate)
        except (TypeError, ValueError) as exc:
            raise FaultSpecError(f"fault rate for {kind!r} is not a number: {rate!r}") from exc
        if not 0.0 <= value <= 1.0:
            raise FaultSpecError(f"fault rate for {kind!r} must be within 0..1, got {value}")
        rates[kind] = value
    if sum(rates.values()) > 1.0 + 1e-9:
        raise FaultSpecError("fault rates add up to more than 1")
    return rates


def parse_script(script: list[Any] | str | None) -> list[str]:
    """`["500", "ok", "reset"]` or `"500,ok,reset"` -> validated list."""
    if not script:
        return []
    items = script.split(",") if isinstance(script, str) else [str(s) for s in script]
    out = [s.strip() for s in items if s.strip()]
    for s in out:
        if s != "ok" and s not in FAULT_KINDS:
            raise FaultSpecError(f"unknown fault kind {s!r} in script; known: ok, {', '.join(FAULT_KINDS)}")
    return out


@dataclass
class FaultSettings:
    rates: dict[str, float] = field(default_factory=dict)
    script: list[str] = field(default_factory=list)
    model: str | None = None  # only requests for this deployment are faulted
    match: str | None = None  # only requests whose text contains this are faulted (target one blob's prompt)
    timeout_s: float = 120.0  # how long a `timeout` fault holds the request
    retry_after_ms: int = 200  # what an injected 429/503 asks the client to wait
    seed: int | None = None


class FaultInjector:
    """Picks the fault (or None) for each request, and counts what it injected."""

    def __init__(self, settings: FaultSettings | None = None) -> None:
        self.injected: Counter[str] = Counter()
        self.configure(settings or FaultSettings())

    def configure(self, settings: FaultSettings) -> None:
        self.settings = settings
        self._script: deque[str] = deque(settings.script)
        self._rng = random.Random(settings.seed)

    def state(self) -> dict[str, Any]:
        s = self.settings
        return {
            "rates": dict(s.rates),
            "script": list(self._script),
            "model": s.model,
            "match": s.match,
            "timeout_s": s.timeout_s,
            "retry_after_ms": s.retry_after_ms,
            "seed": s.seed,
        }

    def pick(self, model: str, text: str = "") -> str | None:
        s = self.settings
        if s.model is not None and s.model != model:
            return None
        if s.match is not None and s.match not in text:
            return None
        kind: str | None = None
        if self._script:
            step = self._script.popleft()
            kind = None if step == "ok" else step
        elif s.rates:
            r = self._rng.random()
            acc = 0.0
            for k, rate in s.rates.items():
                acc += rate
                if r < acc:
                    kind = k
                    break
        if kind is not None:
            self.injected[kind] += 1
        return kind


def error_body(
    message: str, type_: str | None = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def throttled_body(retry_after_s: int, reason: str, model: str) -> dict[str, Any]:
    """Azure's 429 body: code "429", the operation name and the whole-second wait in the message."""
    what = "call rate limit" if reason == "requests" else "token rate limit"
    if reason == "capacity":
        # Not the quota: Azure's capacity throttling on a shared pool, which its docs list under
        # "System is experiencing high demand" / "temporarily unable to process your request"
        # (learn.microsoft.com, "Manage Azure OpenAI quota"; summarised at
        # developersdigest.tech/errors/api/azure-openai/429-system-capacity-throttling).
        message = (
            f"The service is temporarily unable to process your request: the system is experiencing high demand "
            f"(local model server, deployment {model}). Please retry after {retry_after_s} seconds."
        )
    elif reason == "too_large":
        message = (
            f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded "
            f"token rate limit of your current pricing tier for deployment {model}: this single request needs more "
            f"tokens than the whole per-minute quota. Please reduce max_tokens or the input size. "
            f"Please retry after {retry_after_s} seconds."
        )
    else:
        message = (
            f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded "
            f"{what} of your current OpenAI S0 pricing tier (local model server, deployment {model}). "
            f"Please retry after {retry_after_s} seconds. Please go here: https://aka.ms/oai/quotaincrease "
            f"if you would like to further increase the default rate limit."
        )
    return {"error": {"code": "429", "message": message}}


def server_error_body(status: int) -> dict[str, Any]:
    if status == 503:
        return {
            "error": {
                "code": "ServiceUnavailable",
                "message": "The service is temporarily unable to process your request. Please try again later.",
                "type": "server_error",
                "param": None,
            }
        }
    return {
        "error": {
            "code": "InternalServerError",
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
        }
    }


def filter_results(filtered_category: str | None = None) -> dict[str, Any]:
    """Azure's per-category content filter verdicts; one category filtered at medium severity, or all safe."""
    out: dict[str, Any] = {}
    for cat in ("hate", "self_harm", "sexual", "violence"):
        hit = cat == filtered_category
        out[cat] = {"filtered": hit, "severity": "medium" if hit else "safe"}
    return out


def content_filter_prompt_body() -> dict[str, Any]:
    """HTTP 400 exactly as Azure OpenAI sends it when the prompt trips the content filter."""
    results = filter_results("sexual")
    results["jailbreak"] = {"filtered": False, "detected": False}
    return {
        "error": {
            "message": CONTENT_FILTER_MESSAGE,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": results},
        }
    }


def break_against_schema(value: Any, schema: dict[str, Any]) -> Any:
    """A deliberately invalid instance: drop the first required property, else give the wrong type."""
    required = schema.get("required") or []
    if isinstance(value, dict) and required and required[0] in value:
        broken = dict(value)
        broken.pop(required[0])
        return broken
    return {"unexpected": True} if schema.get("type") == "array" else ["not", "what", "the", "schema", "asks"]
