"""The one pipeline both entry points use: prepare -> estimate -> cache -> limiter/model -> validate.

Entry points build an `AnalysisRequest` from their trigger and call `analyze`; it
returns an `AnalysisResult` or raises a `VlmError`. Nothing here knows about
Functions types.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import InvalidRequest, UpstreamTimeout, VlmError
from .settings import Settings

if TYPE_CHECKING:
    from .app import App

T = TypeVar("T")


@dataclass
class AnalysisRequest:
    images: list[bytes]
    task: str
    prompt: str | None = None
    detail: str = "auto"
    schema: dict[str, Any] | None = None
    labels: list[str] | None = None
    max_tokens: int | None = None
    pages: str | None = None
    strips: bool = False
    reasoning_effort: str | None = None  # whether the model takes it is the catalog's business
    use_cache: bool = True
    budget_s: float | None = None  # per-request deadline (HTTP); None: no deadline beyond the SDK timeouts
    reasoning_effort: str | None = None  # None: VLM_REASONING_EFFORT for the task


@dataclass
class Usage:
    """Observed usage over every model call, next to what was estimated (drift shows here)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes reasoning_tokens
    reasoning_tokens: int = 0
    total_tokens: int = 0
    estimated_prompt_tokens: int = 0  # text + calibrated image estimate, summed over the calls
    estimated_image_tokens: int = 0  # by the catalog's formula, for the images as sent


@dataclass
class AnalysisResult:
    id: str
    task: str
    model: str
    deployment: str
    result: Any
    cached: bool
    usage: Usage
    cost_usd: float | None  # None: the catalog has no price for a model that answered
    images: list[dict[str, Any]]
    timings_ms: dict[str, float]
    model_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrepareSlots:
    """At most `size` image preparations at once in this worker (PREPARE_CONCURRENCY): decode memory is bounded.

    A slot is held until the worker thread finishes, not until its awaiting coroutine stops
    waiting: a request cancelled by its deadline cannot free a slot while its decode still runs.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = asyncio.Semaphore(size)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await self._free.acquire()
        try:
            future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except BaseException:
            self._free.release()
            raise
        future.add_done_callback(lambda _: self._free.release())
        return await asyncio.shield(future)


def validate_request(req: AnalysisRequest, settings: Settings) -> Any:
    """Everything checkable before any image is decoded (the task's image count and required fields,
    the schema); -> the caller's schema in strict form (`schemas.StrictSchema`), or None."""
    from .tasks import check_required, check_strips, strict_schema, task_spec

    spec = task_spec(req.task)  # fields were checked by shared.options.parse_options; images are checked here
    if not req.images:
        raise InvalidRequest("no image in the request", details={"field": "images"})
    limit = spec.image_limit(settings.max_images_per_request)
    if len(req.images) < spec.min_images or len(req.images) > limit:
        raise InvalidRequest(
            f"task {req.task} takes {spec.min_images}-{limit} images, got {len(req.images)}",
            details={"field": "images", "min": spec.min_images, "max": limit, "got": len(req.images)},
        )
    check_required(spec, {"labels": req.labels, "schema": req.schema})
    check_strips(spec, req.strips)
    if req.schema is None:
        return None
    from .schemas import SchemaBudget

    # to_strict runs check_caller_schema first (budget, references, regexes, meta-schema);
    # strict limits (depth, property count) fail here too, before any image work.
    return strict_schema(req.schema, SchemaBudget.from_settings(settings))


def _prepare_all(req: AnalysisRequest, settings: Settings, image_spec: Any = None) -> list[Any]:
    """CPU-bound: decode and optimise every input (run in a worker thread, one slot of PrepareSlots),
    sized for the primary's model (`image_spec`: its catalog ImageTokens; None: the estimate for an
    unknown model). One budget covers the whole request: decoded bytes and images sent add up."""
    from .images import Budget, ImageLimits, prepare
    from .tasks import task_spec

    policy = task_spec(req.task).images  # what the task wants: detail "auto", page expansion, resampling
    limits = ImageLimits.from_settings(settings)
    budget = Budget(limits)
    prepared = []
    for n, data in enumerate(req.images, 1):
        try:
            pages = prepare(
                data,
                policy=policy,
                detail=req.detail,
                limits=limits,
                model=image_spec,
                pages=req.pages,
                strips=req.strips,
                budget=budget,
            )
        except VlmError as err:
            if len(req.images) > 1:
                err.details.setdefault("image", n)
            raise
        prepared.extend(pages)
    return prepared


async def analyze(req: AnalysisRequest, app: App) -> AnalysisResult:
    if req.budget_s:
        try:
            async with asyncio.timeout(req.budget_s):
                return await _analyze(req, app)
        except TimeoutError:
            raise UpstreamTimeout(
                f"no answer within the request budget of {req.budget_s:.0f} s; try again later",
                details={"budget_s": req.budget_s},
                retry_after_s=10.0,
            ) from None
    return await _analyze(req, app)


def _key(req: AnalysisRequest, identity: str, images: list[bytes], stage: str, effort: str | None) -> str:
    """The content address of a request: over the optimised bytes ("sent") or the bytes as received ("raw").

    `identity` is the deployment and model (family) that answers: looked up as the primary's, stored
    as whoever answered, so a fallback's answer is never served as the primary's.
    """
    from .cache import cache_key

    options = {"labels": req.labels, "pages": req.pages, "strips": req.strips, "effort": effort}
    if stage == "raw":  # the optimiser's output depends on the model too (covered by the identity)
        options |= {"stage": "raw"}
    return cache_key(
        task=req.task,
        prompt=req.prompt,
        detail=req.detail,
        schema=req.schema,
        answered_by=identity,
        max_tokens=req.max_tokens,
        images=images,
        options=options,
    )


async def _analyze(req: AnalysisRequest, app: App) -> AnalysisResult:
    from .cache import CachedAnswer, RawAlias
    from .schemas import SchemaBudget
    from .tasks import TaskInput, run_task

    settings = app.settings
    t0 = time.perf_counter()
    strict = validate_request(req, settings)
    book = app.book
    identity = book.identity(settings.primary)
    effort = req.reasoning_effort or settings.reasoning_effort_for(req.task)

    def reused(key: str, hit: CachedAnswer, facts: list[dict[str, Any]], t_prepared: float) -> AnalysisResult:
        """An answer paid for earlier (cache) or by an identical request in flight: no usage, no cost."""
        return AnalysisResult(
            id=key,
            task=req.task,
            model=hit.model,
            deployment=hit.deployment,
            result=hit.result,
            cached=True,
            usage=Usage(estimated_image_tokens=sum(f["estimated_tokens"] for f in facts)),
            cost_usd=0.0,
            images=facts,
            timings_ms=_timings(t0, t_prepared, time.perf_counter()),
        )

    # A repeat of the very same bytes skips decoding: the raw request's address points at the answer.
    raw_key = _key(req, identity, req.images, "raw", effort)
    if req.use_cache:
        alias = await app.cache.get_alias(raw_key)
        hit = await app.cache.get_result(alias.key) if alias is not None else None
        if alias is not None and hit is not None:
            return reused(alias.key, hit, alias.images, t0)

    images = await app.prepare_slots.run(_prepare_all, req, settings, book.image_tokens(settings.primary))
    t_prepared = time.perf_counter()
    facts = [i.facts.to_dict() for i in images]
    sent = [i.data for i in images]
    key = _key(req, identity, sent, "sent", effort)
    if req.use_cache:
        hit = await app.cache.get_result(key)
        if hit is None:
            shared = await _join_inflight(app, key)
            if shared is not None:
                hit = CachedAnswer(shared.calls[-1].model, shared.calls[-1].deployment, shared.result)
        if hit is not None:
            await app.cache.put_alias(raw_key, RawAlias(key, facts))
            return reused(key, hit, facts, t_prepared)

    task_input = TaskInput(
        task=req.task,
        images=images,
        prompt=req.prompt,
        schema=strict,
        labels=req.labels,
        max_tokens=req.max_tokens,
        concurrency=settings.sequence_concurrency,
        reasoning_effort=effort,
        schema_budget=SchemaBudget.from_settings(settings),
    )
    out = await _run_once(app, key, task_input, run_task)
    answered_by = _answered_by(out, identity)
    if answered_by != identity:  # a fallback (or a model learned only now) answered: its own address
        key = _key(req, answered_by, sent, "sent", effort)
        raw_key = _key(req, answered_by, req.images, "raw", effort)
    result = _priced(req, settings, key, out, facts, _timings(t0, t_prepared, time.perf_counter()))
    await app.cache.put_result(key, CachedAnswer(result.model, result.deployment, result.result))
    await app.cache.put_alias(raw_key, RawAlias(key, facts))
    return result


def _answered_by(out: Any, asked: str) -> str:
    """The identity every call of the task was answered by; several (a fallback mid-task) are all named."""
    identities = sorted({c.identity or asked for c in out.calls}) or [asked]
    return identities[0] if len(identities) == 1 else "+".join(identities)


async def _run_once(app: App, key: str, task_input: Any, run_task: Any) -> Any:
    """Run the task, publishing the outcome to identical requests that arrive meanwhile."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    app.inflight[key] = future
    try:
        out = await run_task(task_input, app.model)
    except Exception as exc:
        future.set_exception(exc)
        future.exception()  # mark retrieved: nobody may be waiting
        raise
    except BaseException:
        future.cancel()
        raise
    else:
        future.set_result(out)
    finally:
        if app.inflight.get(key) is future:
            del app.inflight[key]
    return out


def _priced(
    req: AnalysisRequest, settings: Settings, key: str, out: Any, facts: list[dict[str, Any]], timings: dict[str, float]
) -> AnalysisResult:
    """Usage and cost over every call the task made, each priced by the catalog entry of the model that answered."""
    from .catalog import load_catalog
    from .tokens import price_usd

    calls = out.calls
    usage = Usage(
        prompt_tokens=sum(c.prompt_tokens for c in calls),
        completion_tokens=sum(c.completion_tokens for c in calls),
        reasoning_tokens=sum(c.reasoning_tokens for c in calls),
        estimated_prompt_tokens=sum(c.estimated_prompt_tokens for c in calls),
        estimated_image_tokens=sum(f["estimated_tokens"] for f in facts),
    )
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    catalog = load_catalog(settings.vlm_model_catalog)
    cost: float | None = 0.0
    for call in calls:
        family = catalog.lookup(call.model) or catalog.named(call.family)
        price = (
            price_usd(family.prices, call.prompt_tokens, call.completion_tokens, call.cached_tokens) if family else None
        )
        cost = None if cost is None or price is None else cost + price
    last = calls[-1] if calls else None
    return AnalysisResult(
        id=key,
        task=req.task,
        model=last.model if last else "",
        deployment=last.deployment if last else settings.vlm_deployment,
        result=out.result,
        cached=False,
        usage=usage,
        cost_usd=None if cost is None else round(cost, 6),
        images=facts,
        timings_ms=timings,
        model_calls=len(out.calls),
    )


async def _join_inflight(app: App, key: str) -> Any:
    """Wait for an identical request already at the model; None if there is none or it failed."""
    shared = app.inflight.get(key)
    if shared is None:
        return None
    try:
        out = await asyncio.shield(shared)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if shared.cancelled() and task is not None and not task.cancelling():
            return None  # the other request was cancelled, not us: run it ourselves
        raise
    except Exception:
        return None  # it failed: this request makes its own attempt
    return out if out.calls else None


def _timings(t0: float, t_prepared: float, t_model: float) -> dict[str, float]:
    now = time.perf_counter()
    return {
        "prepare": round((t_prepared - t0) * 1000, 1),
        "model": round((t_model - t_prepared) * 1000, 1),
        "total": round((now - t0) * 1000, 1),
    }
