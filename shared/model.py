"""The model seam: one chat-completion call through the openai SDK, a fallback chain, error mapping.

The openai SDK is the only retry layer (it honours `retry-after-ms` / `Retry-After`);
this module never loops on a failed call itself. When a deployment is still
throttled, down or timing out after the SDK's retries, the next target in
`VLM_FALLBACK_DEPLOYMENTS` is tried; a per-deployment circuit breaker skips a
failing one for a cool-down. Input errors and content filters never fall back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import (
    ContentFiltered,
    InvalidRequest,
    OutputTruncated,
    Refused,
    UpstreamError,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
    VlmError,
)
from .settings import ModelTarget, Settings

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from .breaker import BreakerBoard
    from .clock import Clock
    from .limiter import RateLimiter

log = logging.getLogger(__name__)

AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
JSON_SCHEMA_REPROBE_S = 600.0  # an endpoint without strict mode is asked again after this (it may be upgraded)
FALLBACK_ERRORS = (UpstreamThrottled, UpstreamError, UpstreamUnavailable, UpstreamTimeout)


class ResponseFormatRejected(VlmError):
    """The endpoint does not support `response_format` json_schema; the caller falls back to json_object."""

    status = 502
    code = "upstream_error"


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    response_format: dict[str, Any] | None = None
    estimated_tokens: int = 0  # prompt estimate (text + images) + max_tokens, reserved in the limiter


@dataclass
class ChatResult:
    content: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    deployment: str
    refusal: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatBackend(Protocol):
    """What the pipeline needs from a model: one validated completion (tests may plug their own)."""

    async def complete(self, request: ChatRequest) -> ChatResult: ...


def base_url_for(target: ModelTarget) -> str:
    """Azure endpoints use the v1 GA path; anything else is already an OpenAI-compatible base URL."""
    if target.is_azure:
        return f"{target.endpoint.rstrip('/')}/openai/v1/"
    return target.endpoint.rstrip("/") + "/"


def build_client(
    target: ModelTarget, settings: Settings, event_hooks: dict[str, list[Any]] | None = None
) -> AsyncOpenAI:
    """An AsyncOpenAI client for one target: key if given, Entra ID for Azure without a key."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    api_key: Any = target.api_key
    if api_key is None:
        if target.is_azure:
            from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

            credential = DefaultAzureCredential(managed_identity_client_id=settings.azure_client_id)
            api_key = get_bearer_token_provider(credential, AZURE_SCOPE)
        else:
            api_key = "unused"  # OpenAI-compatible local servers ignore it; the SDK requires one
    http_client = DefaultAsyncHttpxClient(event_hooks=event_hooks or {})
    return AsyncOpenAI(
        base_url=base_url_for(target),
        api_key=api_key,
        timeout=settings.vlm_timeout_s,
        max_retries=settings.vlm_max_retries,
        http_client=http_client,
    )


def _reasoning(deployment: str) -> bool:
    name = deployment.lower()
    return name.startswith(("o1", "o3", "o4", "gpt-5"))


def map_openai_error(exc: Exception, target: ModelTarget) -> VlmError:
    """openai SDK exceptions -> our typed errors (after the SDK's own retries are spent)."""
    import openai

    where = {"deployment": target.deployment}
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamTimeout(f"model call to {target.deployment} timed out", details=where)
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamUnavailable(f"could not reach the model endpoint for {target.deployment}", details=where)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        body = body.get("error", body) if isinstance(body.get("error"), dict) else body
        message = str(body.get("message") or exc.message)
        code = str(body.get("code") or "")
        retry_after = _retry_after(exc.response.headers) if exc.response is not None else None
        if status == 429:
            return UpstreamThrottled(
                f"{target.deployment} is throttled: {message}", details=where, retry_after_s=retry_after or 10.0
            )
        if status == 400 and code == "content_filter":
            return ContentFiltered(
                "the request was blocked by the content filter",
                details={**where, "stage": "prompt", "categories": filtered_categories(body)},
            )
        if status == 400 and "response_format" in (message + str(body.get("param") or "")):
            return ResponseFormatRejected(f"{target.deployment} rejected response_format: {message}", details=where)
        if status in (400, 413, 422):
            return InvalidRequest(f"the model endpoint rejected the request: {message}", details=where)
        if status == 503:
            return UpstreamUnavailable(
                f"{target.deployment} unavailable: {message}", details=where, retry_after_s=retry_after
            )
        if status == 504:
            return UpstreamTimeout(f"{target.deployment} gateway timeout: {message}", details=where)
        return UpstreamError(f"{target.deployment} answered {status}: {message}", details={**where, "status": status})
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        return UpstreamError(f"{target.deployment} returned an unreadable response: {exc}", details=where)
    return UpstreamError(f"model call to {target.deployment} failed: {exc}", details=where)


def _retry_after(headers: Any) -> float | None:
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) / divisor
            except ValueError:
                continue
    return None


def filtered_categories(body: dict[str, Any]) -> dict[str, Any]:
    """The categories that tripped, from Azure's `innererror.content_filter_result` (prompt side)
    or `content_filter_results` (completion side)."""
    inner = body.get("innererror") or {}
    results = inner.get("content_filter_result") or body.get("content_filter_results") or {}
    return {
        name: {"severity": r.get("severity"), "filtered": True}
        for name, r in results.items()
        if isinstance(r, dict) and r.get("filtered")
    }


def check_finish(result: ChatResult) -> ChatResult:
    """A completed call can still be unusable: refused, filtered or cut short. Never retried or fallen back."""
    if result.refusal:
        raise Refused(f"the model refused: {result.refusal}", details={"deployment": result.deployment})
    if result.finish_reason == "content_filter":
        raise ContentFiltered(
            "the answer was blocked by the content filter",
            details={
                "deployment": result.deployment,
                "stage": "completion",
                "categories": filtered_categories(result.extra),
            },
        )
    if result.finish_reason == "length":
        raise OutputTruncated(
            "the answer was cut off at max_tokens; raise max_tokens or narrow the task",
            details={"deployment": result.deployment, "completion_tokens": result.completion_tokens},
        )
    return result


class ModelRouter:
    """Primary then fallbacks, each behind its own limiter and circuit breaker."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock | None = None,
        client_factory: Callable[[ModelTarget, dict[str, list[Any]]], AsyncOpenAI] | None = None,
    ) -> None:
        from .breaker import BreakerBoard
        from .clock import MonotonicClock

        self.settings = settings
        self.clock = clock or MonotonicClock()
        self.breakers: BreakerBoard = BreakerBoard(
            failure_threshold=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s, clock=self.clock
        )
        self._clients: dict[str, AsyncOpenAI] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._client_factory = client_factory or (lambda target, hooks: build_client(target, settings, hooks))
        self._no_json_schema: dict[str, float] = {}  # target -> when it rejected json_schema (re-probed later)

    def limiter(self, target: ModelTarget) -> RateLimiter:
        from .limiter import RateLimiter

        if target.label not in self._limiters:
            s = self.settings
            self._limiters[target.label] = RateLimiter(
                s.vlm_rpm, s.vlm_tpm, clock=self.clock, window_s=s.vlm_rate_window_s
            )
        return self._limiters[target.label]

    def client(self, target: ModelTarget) -> AsyncOpenAI:
        if target.label not in self._clients:
            hook = self.limiter(target).httpx_response_hook()
            self._clients[target.label] = self._client_factory(target, {"response": [hook]})
        return self._clients[target.label]

    async def complete(self, request: ChatRequest) -> ChatResult:
        last: VlmError | None = None
        for target in self.settings.model_targets:
            breaker = self.breakers.get(target.label)
            if not breaker.allow():
                log.info("skipping %s: circuit open", target.label)
                continue
            try:
                result = await self._call(target, request)
            except FALLBACK_ERRORS as err:
                breaker.record_failure()
                log.warning("deployment %s failed (%s); trying the next one", target.label, err.code)
                last = err
                continue
            except VlmError:
                breaker.record_success()  # the deployment answered; the request itself was the problem
                raise
            breaker.record_success()
            return check_finish(result)
        if last is not None:
            raise last
        raise UpstreamUnavailable(
            "every model deployment is cooling down after repeated failures",
            retry_after_s=self.settings.breaker_cooldown_s,
        )

    async def _call(self, target: ModelTarget, request: ChatRequest) -> ChatResult:
        import openai

        kwargs: dict[str, Any] = {"model": target.deployment, "messages": request.messages}
        if _reasoning(target.deployment):
            kwargs["max_completion_tokens"] = request.max_tokens
        else:
            kwargs["max_tokens"] = request.max_tokens
            kwargs["temperature"] = 0
        if request.response_format is not None:
            rejected_at = self._no_json_schema.get(target.label)
            if request.response_format.get("type") == "json_schema" and rejected_at is not None:
                if self.clock.now() - rejected_at < JSON_SCHEMA_REPROBE_S:
                    raise ResponseFormatRejected(f"{target.deployment} does not take json_schema", details={})
                del self._no_json_schema[target.label]
            kwargs["response_format"] = request.response_format
        reservation = await self.limiter(target).acquire(request.estimated_tokens)
        try:
            response = await self.client(target).chat.completions.create(**kwargs)
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: a 200 whose body is not JSON
            reservation.cancel()
            error = map_openai_error(exc, target)
            if isinstance(error, ResponseFormatRejected):
                self._no_json_schema[target.label] = self.clock.now()
            raise error from exc
        except Exception:
            reservation.cancel()
            raise
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        # The quota is charged at admission with the prompt plus max_tokens, and a shorter answer is not
        # refunded (Azure; the local model server does the same). Settle to that charge, correcting only
        # our prompt estimate: settling to the billed usage would hand the unused max_tokens back to the
        # limiter, which would then admit calls the server refuses with 429.
        reservation.settle(prompt_tokens + request.max_tokens if usage else request.estimated_tokens)
        if not response.choices:
            raise UpstreamError(f"{target.deployment} returned no choices", details={"deployment": target.deployment})
        choice = response.choices[0]
        message = choice.message
        extra = {}
        cfr = getattr(choice, "content_filter_results", None) or (choice.model_extra or {}).get(
            "content_filter_results"
        )
        if cfr:
            extra["content_filter_results"] = cfr
        return ChatResult(
            content=message.content,
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=response.model or target.deployment,
            deployment=target.deployment,
            refusal=getattr(message, "refusal", None),
            extra=extra,
        )

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
