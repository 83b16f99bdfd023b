"""The model seam: one chat-completion call through the openai SDK, a fallback chain, error mapping.

The openai SDK is the retry layer (it honours `retry-after-ms` / `Retry-After`) for every error but
429: a 429 is retried here instead, within the SDK's `max_retries`, through the deployment's limiter
(see RateLimiter.httpx_response_hook(pace_retries=True)), so retries are paced rather than woken
together. Otherwise this module never loops on a failed call itself. When a deployment is still
throttled, down or timing out after the SDK's retries, the next target in
`VLM_FALLBACK_DEPLOYMENTS` is tried; a per-deployment circuit breaker skips a
failing one for a cool-down. A deployment that does not exist or runs a retired model
is skipped too, without counting as a failure. Input errors and content filters never
fall back.

The parameter style (chat: max_tokens + temperature; reasoning: max_completion_tokens +
reasoning_effort) comes from the catalog entry of the deployment's model
(shared/deployments.py). The one exception to "never loops": when the endpoint refuses a
parameter of that style (400 unsupported_parameter / unsupported_value), the style is
switched for that deployment, remembered, and the call is made once more.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import telemetry
from .errors import (
    ContentFiltered,
    DeploymentUnavailable,
    InvalidRequest,
    OutputTruncated,
    Refused,
    UpstreamError,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
    VlmError,
)
from .limiter import CALL, PACED_HEADER
from .reservations import BudgetBook, BudgetPolicy, budget_key
from .settings import ModelTarget, Settings

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from .breaker import BreakerBoard
    from .clock import Clock
    from .deployments import DeploymentBook
    from .limiter import RateLimiter
    from .peers import PeerRegistry

log = logging.getLogger(__name__)

AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
JSON_SCHEMA_REPROBE_S = 600.0  # an endpoint without strict mode is asked again after this (it may be upgraded)
FALLBACK_ERRORS = (UpstreamThrottled, UpstreamError, UpstreamUnavailable, UpstreamTimeout)
# What of an upstream body may reach a caller: content-filter category names and severities that look
# like identifiers (Azure's are hate, self_harm, ..., safe/low/medium/high), and a bounded refusal.
_CATEGORY = re.compile(r"[a-z][a-z_]{0,39}")
MAX_FILTER_CATEGORIES = 16
MAX_REFUSAL_CHARS = 500
MAX_UPSTREAM_MESSAGE = 300  # an upstream message is logged up to this (it never reaches the caller)
# Azure's 400 when json_schema itself is not available (model or API version), as opposed to a 400
# for an invalid schema, which also names response_format: "Invalid parameter: 'response_format' of
# type 'json_schema' is not supported with this model."
# (https://github.com/langchain-ai/langchain/issues/31490), "response_format value as json_schema is
# enabled only for api versions 2024-08-01-preview and later"
# (https://github.com/langgenius/dify/issues/8994), "Invalid parameter: 'response_format' must be one of
# 'json_object', 'text'." (https://github.com/BerriAI/litellm/issues/5295).
JSON_SCHEMA_UNSUPPORTED = ("not supported", "unsupported", "enabled only", "must be one of")
# A deployment of a retired model version: Azure answers 404 (code "404", "Resource not found":
# https://github.com/BerriAI/litellm/issues/11116) or 400 "The chatCompletion operation does not work
# with the specified model, ... Please choose different model"
# (https://github.com/BerriAI/litellm/issues/11505); a missing deployment is 404 DeploymentNotFound,
# "The API deployment for this resource does not exist."
# (https://github.com/Azure-Samples/azure-search-openai-demo-csharp/issues/379).
RETIRED_MARKERS = ("does not work with the specified model", "has been deprecated", "has been retired")


class ResponseFormatRejected(VlmError):
    """The endpoint does not support `response_format` json_schema; the router sends the request's fallback."""

    status = 502
    code = "upstream_error"


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int  # the answer's budget; reasoning models get the reasoning allowance on top
    response_format: dict[str, Any] | None = None
    estimated_tokens: int = 0  # prompt estimate (text + images by formula) + max_tokens
    image_tokens: int = 0  # the images' share of that estimate, by formula (calibrated per deployment)
    reasoning_effort: str | None = None  # sent only to deployments whose style takes it
    # Sent instead when the deployment rejects `response_format` (json_schema); the task builds it (its
    # TaskSpec names the fallback format), the router decides when, and remembers per deployment.
    fallback: ChatRequest | None = None

    @property
    def text_tokens(self) -> int:
        return max(0, self.estimated_tokens - self.max_tokens - self.image_tokens)


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
    reasoning_tokens: int = 0  # already inside completion_tokens (and billed as output)
    cached_tokens: int = 0  # prompt tokens served from the prompt cache
    estimated_prompt_tokens: int = 0  # what we expected usage.prompt_tokens to be (calibrated)
    family: str | None = None  # the catalog family of the model that answered, if known
    identity: str = ""  # the deployment and model that answered, for cache keys
    completion_budget: int = 0

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


class StyleRejected(Exception):
    """A 400 refusing a parameter of the style sent (internal: the router adapts and retries once)."""

    def __init__(self, param: str, code: str) -> None:
        super().__init__(param, code)
        self.param = param
        self.code = code


def map_openai_error(exc: Exception, target: ModelTarget) -> VlmError:
    """openai SDK exceptions -> our typed errors (after the SDK's own retries are spent).

    The upstream message decides the error class but never reaches the caller: it can quote the
    caller's input or the SDK's internals. It is logged (bounded) and the caller gets our own words.
    """
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
        message = str(body.get("message") or exc.message)[:MAX_UPSTREAM_MESSAGE]
        code = str(body.get("code") or "")
        param = str(body.get("param") or "")
        log.warning(
            "model endpoint for %s answered %s (code %r, param %r): %s",
            target.deployment,
            status,
            code[:64],
            param[:64],
            message,
        )
        retry_after = _retry_after(exc.response.headers) if exc.response is not None else None
        if status == 429:
            from .limiter import DEFAULT_RETRY_AFTER_S

            return UpstreamThrottled(
                f"{target.deployment} is throttled",
                details=where,
                retry_after_s=DEFAULT_RETRY_AFTER_S if retry_after is None else retry_after,
            )
        if status == 400 and code == "content_filter":
            return ContentFiltered(
                "the request was blocked by the content filter",
                details={**where, "stage": "prompt", "categories": filtered_categories(body)},
            )
        if status == 404 or (status == 400 and any(m in message.lower() for m in RETIRED_MARKERS)):
            return deployment_unavailable(target, "not_found" if status == 404 else "retired")
        if status == 400 and "response_format" in (message + param):
            if any(m in message.lower() for m in JSON_SCHEMA_UNSUPPORTED):
                return ResponseFormatRejected(
                    f"{target.deployment} does not accept a json_schema response_format", details=where
                )
            return InvalidRequest(
                "the model endpoint rejected the response schema (see the structured-output rules under "
                "Tasks in the README)",
                details={**where, "field": "schema"},
            )
        if status in (400, 413, 422):
            return InvalidRequest(f"the model endpoint rejected the request ({status})", details=where)
        if status == 503:
            return UpstreamUnavailable(f"{target.deployment} is unavailable", details=where, retry_after_s=retry_after)
        if status == 504:
            return UpstreamTimeout(f"{target.deployment} gateway timeout", details=where)
        return UpstreamError(f"{target.deployment} answered {status}", details={**where, "status": status})
    log.warning(
        "model call to %s failed: %s: %s", target.deployment, type(exc).__name__, str(exc)[:MAX_UPSTREAM_MESSAGE]
    )
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        return UpstreamError(f"{target.deployment} returned an unreadable response", details=where)
    return UpstreamError(f"model call to {target.deployment} failed", details=where)


def deployment_unavailable(target: ModelTarget, reason: str) -> DeploymentUnavailable:
    """A clear, operator-facing error: which deployment, and what to do about it."""
    if reason == "retired":
        what = (
            f"deployment {target.deployment} runs a retired model version: upgrade the deployment to a current "
            "version (or point VLM_DEPLOYMENT / VLM_FALLBACK_DEPLOYMENTS at one that is)"
        )
    else:
        what = (
            f"deployment {target.deployment} does not exist on its endpoint (or runs a retired model): create it, "
            "or fix VLM_DEPLOYMENT / VLM_FALLBACK_DEPLOYMENTS; a deployment made in the last minutes may need a moment"
        )
    return DeploymentUnavailable(what, details={"deployment": target.deployment, "reason": reason})


def _style_rejection(exc: Exception) -> StyleRejected | None:
    """A 400 unsupported_parameter / unsupported_value naming a style parameter, else None."""
    import openai

    if not isinstance(exc, openai.APIStatusError) or exc.status_code != 400:
        return None
    body = exc.body if isinstance(exc.body, dict) else {}
    body = body.get("error", body) if isinstance(body.get("error"), dict) else body
    from .deployments import ADAPTABLE_CODES, ADAPTABLE_PARAMS

    code, param = str(body.get("code") or ""), str(body.get("param") or "")
    return StyleRejected(param, code) if code in ADAPTABLE_CODES and param in ADAPTABLE_PARAMS else None


def _retry_after(headers: Any) -> float | None:
    """The one Retry-After parser (shared.limiter.parse_retry_after: -ms, seconds or an HTTP date);
    None when the response does not say (a 429 then advises DEFAULT_RETRY_AFTER_S, as the limiter pauses)."""
    import time

    from .limiter import parse_retry_after

    return parse_retry_after(headers, time.time())


def filtered_categories(body: dict[str, Any]) -> dict[str, Any]:
    """The categories that tripped, from Azure's `innererror.content_filter_result` (prompt side)
    or `content_filter_results` (completion side)."""
    inner = body.get("innererror") if isinstance(body.get("innererror"), dict) else {}
    results = inner.get("content_filter_result") or body.get("content_filter_results") or {}
    if not isinstance(results, dict):
        return {}
    tripped = [
        (name, r.get("severity"))
        for name, r in results.items()
        if isinstance(r, dict) and r.get("filtered") and isinstance(name, str) and _CATEGORY.fullmatch(name)
    ]
    return {
        name: {
            "severity": severity if isinstance(severity, str) and _CATEGORY.fullmatch(severity) else None,
            "filtered": True,
        }
        for name, severity in tripped[:MAX_FILTER_CATEGORIES]
    }


def check_finish(result: ChatResult) -> ChatResult:
    """A completed call can still be unusable: refused, filtered or cut short. Never retried or fallen back."""
    if result.refusal:
        refusal = result.refusal[:MAX_REFUSAL_CHARS] + ("…" if len(result.refusal) > MAX_REFUSAL_CHARS else "")
        raise Refused(f"the model refused: {refusal}", details={"deployment": result.deployment})
    if result.finish_reason == "content_filter":
        raise ContentFiltered(
            "the answer was blocked by the content filter",
            details={
                "deployment": result.deployment,
                "stage": "completion",
                "categories": filtered_categories(result.extra),
            },
        )
    if result.finish_reason == "length" and result.reasoning_tokens and not (result.content or "").strip():
        raise OutputTruncated(
            "the model spent the whole completion budget on reasoning and wrote no answer; lower reasoning_effort "
            "or raise VLM_REASONING_ALLOWANCE (or max_tokens)",
            details={
                "deployment": result.deployment,
                "reason": "reasoning_used_budget",
                "reasoning_tokens": result.reasoning_tokens,
                "completion_tokens": result.completion_tokens,
                "completion_budget": result.completion_budget,
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
        book: DeploymentBook | None = None,
        peers: PeerRegistry | None = None,
    ) -> None:
        from .breaker import BreakerBoard
        from .clock import MonotonicClock
        from .deployments import DeploymentBook

        self.settings = settings
        self.peers = peers  # the busy instances counted in storage (shared/peers.py); None: not counted
        self.book: DeploymentBook = book or DeploymentBook(settings)
        self.clock = clock or MonotonicClock()
        self.breakers: BreakerBoard = BreakerBoard(
            failure_threshold=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s, clock=self.clock
        )
        self._clients: dict[str, AsyncOpenAI] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._client_factory = client_factory or (lambda target, hooks: build_client(target, settings, hooks))
        self._no_json_schema: dict[str, float] = {}  # target -> when it rejected json_schema (re-probed later)
        # Until a deployment has answered once, its calls go one at a time: if its parameter style is
        # wrong, only one call pays the extra round trip, not every call of a concurrent burst.
        self._confirmed: set[str] = set()
        self._probes: dict[str, asyncio.Lock] = {}
        # learned completion budgets per deployment and task, from a prior before the first answer
        self.budgets = BudgetBook(BudgetPolicy(prior=settings.vlm_budget_prior_tokens))
        self.retried_truncations = 0  # answers cut at a learned budget and asked again at the full one

    def limiter(self, target: ModelTarget) -> RateLimiter:
        from .limiter import RateLimiter

        if target.label not in self._limiters:
            s = self.settings
            self._limiters[target.label] = RateLimiter(
                s.vlm_rpm,
                s.vlm_tpm,
                clock=self.clock,
                window_s=s.vlm_rate_window_s,
                slow_start=True,
                split=s.vlm_rate_split,
                peers=self.peers,
            )
        return self._limiters[target.label]

    def client(self, target: ModelTarget) -> AsyncOpenAI:
        if target.label not in self._clients:
            limiter = self.limiter(target)
            hooks = [limiter.httpx_response_hook(pace_retries=True)]
            counter = telemetry.current(self.settings).http_hook(target.deployment)  # None: telemetry off
            hooks += [counter] if counter is not None else []
            self._clients[target.label] = self._client_factory(
                target, {"request": [limiter.httpx_request_hook()], "response": hooks}
            )
        return self._clients[target.label]

    async def complete(self, request: ChatRequest) -> ChatResult:
        last: VlmError | None = None
        for position, target in enumerate(self.settings.model_targets):
            breaker = self.breakers.get(target.label)
            if not breaker.allow():
                log.info("skipping %s: circuit open", target.label)
                continue
            try:
                result = await self._call(target, request)
            except DeploymentUnavailable as err:
                log.warning(
                    "deployment %s is unavailable (%s); trying the next one", target.label, err.details["reason"]
                )
                last = err  # a configuration fault, not a transient one: no breaker failure, no retries
                continue
            except FALLBACK_ERRORS as err:
                breaker.record_failure()
                log.warning("deployment %s failed (%s); trying the next one", target.label, err.code)
                last = err
                continue
            except VlmError:
                breaker.record_success()  # the deployment answered; the request itself was the problem
                raise
            breaker.record_success()
            if position > 0:
                telemetry.note_fallback()
            return check_finish(result)
        if last is not None:
            raise last
        raise UpstreamUnavailable(
            "every model deployment is cooling down after repeated failures",
            retry_after_s=self.settings.breaker_cooldown_s,
        )

    async def _call(self, target: ModelTarget, request: ChatRequest) -> ChatResult:
        """One request to one deployment; its `fallback` instead when the deployment rejects the response format
        (at once, without a call, while the rejection is remembered: JSON_SCHEMA_REPROBE_S)."""
        try:
            return await self._probed_call(target, request)
        except ResponseFormatRejected:
            if request.fallback is None:
                raise
            return await self._probed_call(target, request.fallback)

    async def _probed_call(self, target: ModelTarget, request: ChatRequest) -> ChatResult:
        if target.label not in self._confirmed:
            async with self._probes.setdefault(target.label, asyncio.Lock()):
                if target.label not in self._confirmed:
                    try:
                        return await self._adaptive_call(target, request)
                    finally:  # any answer settles the style question; a cancelled probe does not
                        if not _cancelled():
                            self._confirmed.add(target.label)
        return await self._adaptive_call(target, request)

    async def _adaptive_call(self, target: ModelTarget, request: ChatRequest) -> ChatResult:
        """One call, or two when the endpoint refuses the parameter style (switched and remembered)."""
        for attempt in (1, 2):
            style = self.book.style(target)
            try:
                return await self._call_once(target, request, style)
            except StyleRejected as rejected:
                from .deployments import adapt

                effort = self._effort(target, request, style)
                new_style = adapt(style, rejected.param, rejected.code, effort)
                if new_style is None or new_style == style or attempt == 2:
                    raise InvalidRequest(
                        f"{target.deployment} refused the parameter {rejected.param} ({rejected.code})",
                        details={"deployment": target.deployment, "param": rejected.param},
                    ) from None
                log.info(
                    "deployment %s refused %s: switching to the %s style", target.label, rejected.param, new_style.name
                )
                self.book.set_style(target, new_style)
        raise AssertionError("unreachable")  # pragma: no cover

    def _effort(self, target: ModelTarget, request: ChatRequest, style: Any) -> str | None:
        from .deployments import choose_effort

        return choose_effort(request.reasoning_effort, self.book.family(target), style)

    async def _call_once(self, target: ModelTarget, request: ChatRequest, style: Any) -> ChatResult:
        """One call at the learned completion budget (shared/reservations.py); an answer cut off at that
        guess is asked again, once, at the caller's full budget, so the user never gets our truncation."""
        full = self.book.completion_budget(target, request.max_tokens, style)
        key = budget_key(target.label, request.messages, request.response_format)
        # reasoning models (a budget parameter other than max_tokens) get no guess before min_samples answers
        budget = self.budgets.budget(key, full, guess=style.budget_param == "max_tokens")
        result = await self._send(target, request, style, budget)
        if result.finish_reason == "length" and budget < full:
            self.retried_truncations += 1
            log.info("answer cut at the learned budget %d on %s: asking again at %d", budget, target.label, full)
            result = await self._send(target, request, style, full)
        if result.finish_reason != "content_filter" and not result.refusal:
            self.budgets.observe(key, result.completion_tokens)
        return result

    async def _send(self, target: ModelTarget, request: ChatRequest, style: Any, budget: int) -> ChatResult:
        import openai
        from openai.types.chat import ChatCompletion

        kwargs: dict[str, Any] = {"model": target.deployment, "messages": request.messages, style.budget_param: budget}
        if style.temperature:
            kwargs["temperature"] = 0
        effort = self._effort(target, request, style)
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        if request.response_format is not None:
            rejected_at = self._no_json_schema.get(target.label)
            if request.response_format.get("type") == "json_schema" and rejected_at is not None:
                if self.clock.now() - rejected_at < JSON_SCHEMA_REPROBE_S:
                    raise ResponseFormatRejected(f"{target.deployment} does not take json_schema", details={})
                del self._no_json_schema[target.label]
            kwargs["response_format"] = request.response_format
        calibration = self.book.calibration(target)
        estimated_prompt = request.text_tokens + calibration.image_estimate(request.image_tokens)
        tel = telemetry.current(self.settings)
        limiter = self.limiter(target)
        waiting = time.perf_counter()
        reservation = await limiter.acquire(estimated_prompt + budget)
        tel.limiter_wait(target.deployment, (time.perf_counter() - waiting) * 1000)
        throttled = 0
        with tel.model_call(target, kwargs) as span:
            while True:
                try:
                    calling = CALL.set(reservation)
                    try:
                        response = await self.client(target).chat.completions.create(**kwargs)
                    finally:
                        CALL.reset(calling)
                    if not isinstance(response, ChatCompletion):  # a proxy's 200 that is JSON but not a completion
                        raise ValueError(f"the answer is a {type(response).__name__}, not a chat completion")
                    break
                except openai.RateLimitError as exc:
                    reservation.cancel()  # refused: the server charged nothing
                    paced = exc.response is not None and exc.response.headers.get(PACED_HEADER) == "1"
                    if paced and throttled < self.client(target).max_retries:  # the SDK's retry budget, spent here
                        # a 429 is retried here, through the limiter (paused until retry-after, FIFO), not by
                        # the SDK: see RateLimiter.httpx_response_hook(pace_retries=True)
                        throttled += 1
                        reservation = await limiter.acquire(estimated_prompt + budget)
                        continue
                    raise map_openai_error(exc, target) from exc
                except (openai.OpenAIError, ValueError) as exc:  # ValueError: a 200 whose body is not JSON
                    reservation.cancel()
                    rejected = _style_rejection(exc)
                    if rejected is not None:
                        raise rejected from None
                    error = map_openai_error(exc, target)
                    if isinstance(error, ResponseFormatRejected):
                        self._no_json_schema[target.label] = self.clock.now()
                    raise error from exc
                except BaseException:  # also CancelledError: a call cancelled mid-flight gives its reservation back
                    reservation.cancel()
                    raise
            usage = response.usage
            prompt_tokens = usage.prompt_tokens if usage else 0
            completion_tokens = usage.completion_tokens if usage else 0
            # The quota is charged at admission with the prompt plus the completion budget, and a shorter answer
            # is not refunded (Azure; the local model server does the same). Settle to that charge, correcting
            # only our prompt estimate: settling to the billed usage would hand the unused budget back to the
            # limiter, which would then admit calls the server refuses with 429.
            reservation.settle(prompt_tokens + budget if usage else estimated_prompt + budget)
            self.book.learn(target, response.model)
            if usage:
                calibration.observe(prompt_tokens, request.text_tokens, request.image_tokens)
            if not response.choices:
                raise UpstreamError(
                    f"{target.deployment} returned no choices", details={"deployment": target.deployment}
                )
            choice = response.choices[0]
            message = choice.message
            extra = {}
            cfr = getattr(choice, "content_filter_results", None) or (choice.model_extra or {}).get(
                "content_filter_results"
            )
            if cfr:
                extra["content_filter_results"] = cfr
            family = self.book.family(target)
            reasoning_tokens = _detail(usage, "completion_tokens_details", "reasoning_tokens")
            if span is not None:
                span.response_model, span.response_id = response.model, response.id
                span.finish_reason = choice.finish_reason
                if usage:
                    span.input_tokens, span.output_tokens = prompt_tokens, completion_tokens
                    span.reasoning_tokens = reasoning_tokens
            return ChatResult(
                content=message.content,
                finish_reason=choice.finish_reason or "stop",
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                model=response.model or target.deployment,
                deployment=target.deployment,
                refusal=getattr(message, "refusal", None),
                extra=extra,
                reasoning_tokens=reasoning_tokens,
                cached_tokens=_detail(usage, "prompt_tokens_details", "cached_tokens"),
                estimated_prompt_tokens=estimated_prompt,
                family=family.family if family else None,
                identity=self.book.identity(target),
                completion_budget=budget,
            )

    async def close(self) -> None:
        if self.peers is not None:
            await self.peers.close()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _detail(usage: Any, group: str, name: str) -> int:
    """A count from usage.*_details, 0 when the endpoint does not report it."""
    value = getattr(getattr(usage, group, None), name, None) if usage else None
    return value if isinstance(value, int) and value > 0 else 0
