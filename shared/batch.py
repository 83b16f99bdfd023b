"""The batch route's request side: a folder in `"mode": "batch"` defers its model call.

The blob trigger runs the same pipeline as today (optimiser, cache look-up, request checks) with
a model that does not answer: the first chat request the task makes is captured (`Deferred`) and
becomes one line of the folder's pending batch, stored durably in the cache container
(`shared/batch_store.py`). A cache hit never reaches the model, so it still answers at once.
`shared/batch_jobs.py` seals, submits and collects; collecting replays the pipeline with the
batch's answer standing in for the first call (`ReplayBackend`), so validation, the re-ask (on the
realtime route) and the record are today's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .model import ChatRequest, ChatResult
from .settings import ModelTarget, Settings

MODES = ("realtime", "batch")
CHAT_URL = "/chat/completions"  # Azure v1 batch line url (docs/batch.md, [B])
CUSTOM_ID_PREFIX = "vlm-"


class Deferred(Exception):
    """Raised by `DeferringBackend` instead of calling the model: carries the request the task made."""

    def __init__(self, request: ChatRequest) -> None:
        super().__init__("deferred to the batch route")
        self.request = request


def batch_target(settings: Settings) -> ModelTarget:
    """The Global Batch deployment: the primary's endpoint, key and model, VLM_BATCH_DEPLOYMENT's name."""
    p = settings.primary
    if not settings.vlm_batch_deployment:
        raise InvalidRequest(
            'this folder asks for "mode": "batch", but the service has no batch deployment (VLM_BATCH_DEPLOYMENT)',
            details={"field": "mode"},
        )
    return ModelTarget(p.endpoint, settings.vlm_batch_deployment, p.api_key, p.model)


def custom_id(name: str, etag: str | None, job: str) -> str:
    """One id per source blob, etag and job (what was asked): a re-delivered event maps to the same line."""
    digest = hashlib.sha256(f"{name}\n{etag or ''}\n{job}".encode()).hexdigest()
    return CUSTOM_ID_PREFIX + digest[:48]


def request_digest(messages: list[dict[str, Any]]) -> str:
    """What the model was asked, for checking that a replay asks the same thing the batch answered."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class DeferringBackend:
    """A ChatBackend that never answers: the pipeline's first model call raises `Deferred`."""

    def __init__(self, book: Any) -> None:
        self.book = book

    async def complete(self, request: ChatRequest) -> ChatResult:
        raise Deferred(request)


def line_body(request: ChatRequest, primary: ModelTarget, deployment: str, book: Any) -> dict[str, Any]:
    """The body the router would send the primary online (the same parameter style, completion budget
    and effort as learned for the primary; see ModelRouter._call_once), addressed to the batch
    deployment: it runs the same model, and "the same Global Batch model deployment name must be
    present on each line" (docs/batch.md). A batch line cannot be re-sent in another style when the
    deployment refuses one, so the style is the primary's: set VLM_MODEL so it is known up front."""
    from .deployments import choose_effort

    style = book.style(primary)
    budget = book.completion_budget(primary, request.max_tokens, style)
    body: dict[str, Any] = {"model": deployment, "messages": request.messages, style.budget_param: budget}
    if style.temperature:
        body["temperature"] = 0
    effort = choose_effort(request.reasoning_effort, book.family(primary), style)
    if effort is not None:
        body["reasoning_effort"] = effort
    if request.response_format is not None:
        body["response_format"] = request.response_format
    return body


@dataclass
class BatchAnswer:
    """One output line's chat completion, as the replay hands it to the pipeline."""

    body: dict[str, Any]
    digest: str  # request_digest of the line that was answered
    batch_id: str


def chat_result(
    answer: BatchAnswer, target: ModelTarget, book: Any, completion_budget: int, identity: str
) -> ChatResult:
    """An output line's body -> the ChatResult the router would have returned for it.

    `identity` is the primary's: the batch deployment runs the same model (infra: the same model and
    version), so its answer is cached as the primary's and a later realtime drop of the same file hits it."""
    body = answer.body
    choices = body.get("choices") or []
    usage = body.get("usage") or {}
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    model = str(body.get("model") or target.deployment)
    book.learn(target, model)
    family = book.family(target)
    extra = {"content_filter_results": choice["content_filter_results"]} if choice.get("content_filter_results") else {}
    return ChatResult(
        content=message.get("content") if isinstance(message.get("content"), str) else None,
        finish_reason=str(choice.get("finish_reason") or "stop"),
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        model=model,
        deployment=target.deployment,
        refusal=message.get("refusal") if isinstance(message.get("refusal"), str) else None,
        extra={**extra, "batch_id": answer.batch_id},
        reasoning_tokens=_int(details_out.get("reasoning_tokens")),
        cached_tokens=_int(details_in.get("cached_tokens")),
        family=family.family if family else None,
        identity=identity,
        completion_budget=completion_budget,
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


class ReplayBackend:
    """Answers the task's first call with the batch's answer; any further call (a re-ask) goes to the
    realtime route (`realtime`), and `calls` says which was which."""

    def __init__(
        self, answer: BatchAnswer, target: ModelTarget, primary: ModelTarget, book: Any, realtime: Any, identity: str
    ) -> None:
        self.answer = answer
        self.target = target
        self.primary = primary
        self.identity = identity
        self.book = book
        self.realtime = realtime
        self.batch_calls: list[ChatResult] = []
        self.realtime_calls = 0
        self.mismatch = False

    async def complete(self, request: ChatRequest) -> ChatResult:
        from .model import check_finish

        if not self.batch_calls and not self.realtime_calls:
            if request_digest(request.messages) == self.answer.digest:
                style = self.book.style(self.primary)
                budget = self.book.completion_budget(self.primary, request.max_tokens, style)
                result = chat_result(self.answer, self.target, self.book, budget, self.identity)
                self.batch_calls.append(result)
                return check_finish(result)
            self.mismatch = True  # the request changed since it was queued (catalog, schema): ask it online
        self.realtime_calls += 1
        return await self.realtime.complete(request)


def with_model(app: Any, model: Any) -> Any:
    """The same App (settings, storage, cache, book) with another model and an in-flight table of its own."""
    import dataclasses

    return dataclasses.replace(app, model=model, inflight={})


def batch_discount(results: list[ChatResult], settings: Settings) -> float | None:
    """Batch price minus realtime price of the calls the batch answered (catalog `batch_input` /
    `batch_output`): added to the pipeline's realtime-priced cost. None when a price is unknown."""
    from .catalog import Prices, load_catalog
    from .tokens import price_usd

    catalog = load_catalog(settings.vlm_model_catalog)
    full = batch = 0.0
    for call in results:
        family = catalog.lookup(call.model) or catalog.named(call.family)
        if family is None:
            return None
        online = price_usd(family.prices, call.prompt_tokens, call.completion_tokens, call.cached_tokens)
        half = price_usd(
            Prices(input=family.prices.batch_input, output=family.prices.batch_output),
            call.prompt_tokens,
            call.completion_tokens,
        )
        if online is None or half is None:
            return None
        full, batch = full + online, batch + half
    return batch - full
