"""The one pipeline both entry points use: prepare -> estimate -> cache -> limiter/model -> validate.

Entry points build an `AnalysisRequest` from their trigger and call `analyze`; it
returns an `AnalysisResult` or raises a `VlmError`. Nothing here knows about
Functions types.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidRequest, UpstreamTimeout, VlmError
from .settings import DETAILS, Settings


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
    use_cache: bool = True
    budget_s: float | None = None  # per-request deadline (HTTP); None: no deadline beyond the SDK timeouts


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated_image_tokens: int = 0


@dataclass
class AnalysisResult:
    id: str
    task: str
    model: str
    deployment: str
    result: Any
    cached: bool
    usage: Usage
    cost_usd: float
    images: list[dict[str, Any]]
    timings_ms: dict[str, float]
    model_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Dependencies:
    """What the pipeline talks to, created lazily once per event loop and injectable in tests."""

    def __init__(self, settings: Settings, model: Any = None, cache: Any = None, blobs: Any = None) -> None:
        self.settings = settings
        self._model = model
        self._cache = cache
        self._blobs = blobs
        self.inflight: dict[str, asyncio.Future[Any]] = {}  # cache key -> the one model run for it

    @property
    def blobs(self) -> Any:
        if self._blobs is None:
            from .storage import BlobStore

            self._blobs = BlobStore(self.settings)
        return self._blobs

    @property
    def model(self) -> Any:
        if self._model is None:
            from .model import ModelRouter

            self._model = ModelRouter(self.settings)
        return self._model

    @property
    def cache(self) -> Any:
        if self._cache is None:
            from .cache import MemoryLRU, ResultCache

            self._cache = ResultCache(
                MemoryLRU(self.settings.cache_memory_items), self.blobs, self.settings.cache_container
            )
        return self._cache

    async def close(self) -> None:
        if self._model is not None and hasattr(self._model, "close"):
            await self._model.close()
        if self._blobs is not None:
            await self._blobs.close()


_DEPS: dict[int, Dependencies] = {}


def get_dependencies() -> Dependencies:
    """The process's dependencies for the running event loop (aio clients are loop-bound)."""
    from .settings import get_settings

    loop_id = id(asyncio.get_running_loop())
    deps = _DEPS.get(loop_id)
    if deps is None:
        deps = _DEPS[loop_id] = Dependencies(get_settings())
    return deps


def validate_request(req: AnalysisRequest, settings: Settings) -> None:
    from .tasks import task_spec

    spec = task_spec(req.task)
    if req.detail not in DETAILS:
        raise InvalidRequest(f"detail must be one of {', '.join(DETAILS)}", details={"field": "detail"})
    if not req.images:
        raise InvalidRequest("no image in the request", details={"field": "images"})
    limit = spec.max_images or settings.max_images_per_request
    if spec.name != "sequence":
        limit = min(limit, settings.max_images_per_request)
    if len(req.images) < spec.min_images or len(req.images) > limit:
        raise InvalidRequest(
            f"task {req.task} takes {spec.min_images}-{limit} images, got {len(req.images)}",
            details={"field": "images", "min": spec.min_images, "max": limit, "got": len(req.images)},
        )
    if req.max_tokens is not None and not 1 <= req.max_tokens <= 16384:
        raise InvalidRequest("max_tokens must be between 1 and 16384", details={"field": "max_tokens"})
    if req.schema is not None:
        from .schemas import SchemaBudget, to_strict

        # to_strict runs check_caller_schema first (budget, references, regexes, meta-schema);
        # strict limits (depth, property count) fail here too, before any image work.
        to_strict(req.schema, budget=SchemaBudget.from_settings(settings))


def _prepare_all(req: AnalysisRequest, settings: Settings) -> list[Any]:
    """CPU-bound: decode and optimise every input (run in a worker thread)."""
    from .images import ImageLimits, prepare
    from .tasks import task_spec

    spec = task_spec(req.task)
    limits = ImageLimits.from_settings(settings)
    prepared = []
    for n, data in enumerate(req.images, 1):
        try:
            pages = prepare(
                data,
                task=req.task,
                detail=req.detail,
                limits=limits,
                model=settings.model_family,
                pages=req.pages,
                strips=req.strips,
            )
        except VlmError as err:
            if len(req.images) > 1:
                err.details.setdefault("image", n)
            raise
        prepared.extend(pages if spec.expands_pages else pages[:1])
    return prepared


async def analyze(req: AnalysisRequest, deps: Dependencies) -> AnalysisResult:
    if req.budget_s:
        try:
            async with asyncio.timeout(req.budget_s):
                return await _analyze(req, deps)
        except TimeoutError:
            raise UpstreamTimeout(
                f"no answer within the request budget of {req.budget_s:.0f} s; try again later",
                details={"budget_s": req.budget_s},
                retry_after_s=10.0,
            ) from None
    return await _analyze(req, deps)


def _key(req: AnalysisRequest, settings: Settings, images: list[bytes], stage: str) -> str:
    """The content address of a request: over the optimised bytes ("sent") or the bytes as received ("raw")."""
    from .cache import cache_key

    options = {"labels": req.labels, "pages": req.pages, "strips": req.strips}
    if stage == "raw":  # the optimiser's output depends on the model family too
        options |= {"stage": "raw", "model": settings.model_family}
    return cache_key(
        task=req.task,
        prompt=req.prompt,
        detail=req.detail,
        schema=req.schema,
        deployment=settings.vlm_deployment,
        max_tokens=req.max_tokens,
        images=images,
        options=options,
    )


async def _analyze(req: AnalysisRequest, deps: Dependencies) -> AnalysisResult:
    from .schemas import SchemaBudget
    from .tasks import TaskInput, run_task

    settings = deps.settings
    t0 = time.perf_counter()
    validate_request(req, settings)

    def reused(key: str, hit: dict[str, Any], facts: list[dict[str, Any]], t_prepared: float) -> AnalysisResult:
        """An answer paid for earlier (cache) or by an identical request in flight: no usage, no cost."""
        return AnalysisResult(
            id=key,
            task=req.task,
            model=hit["model"],
            deployment=hit["deployment"],
            result=hit["result"],
            cached=True,
            usage=Usage(estimated_image_tokens=sum(f["estimated_tokens"] for f in facts)),
            cost_usd=0.0,
            images=facts,
            timings_ms=_timings(t0, t_prepared, time.perf_counter()),
        )

    # A repeat of the very same bytes skips decoding: the raw request's address points at the answer.
    raw_key = _key(req, settings, req.images, "raw")
    if req.use_cache:
        alias = await deps.cache.get(raw_key)
        hit = await deps.cache.get(alias["key"]) if alias and "key" in alias else None
        if hit is not None:
            return reused(alias["key"], hit, alias["images"], t0)

    images = await asyncio.to_thread(_prepare_all, req, settings)
    t_prepared = time.perf_counter()
    facts = [i.facts.to_dict() for i in images]
    key = _key(req, settings, [i.data for i in images], "sent")
    alias = {"key": key, "images": facts}
    if req.use_cache:
        hit = await deps.cache.get(key)
        if hit is None:
            shared = await _join_inflight(deps, key)
            if shared is not None:
                hit = {
                    "model": shared.calls[-1].model,
                    "deployment": shared.calls[-1].deployment,
                    "result": shared.result,
                }
        if hit is not None:
            await deps.cache.put(raw_key, alias)
            return reused(key, hit, facts, t_prepared)

    task_input = TaskInput(
        task=req.task,
        images=images,
        prompt=req.prompt,
        schema=req.schema,
        labels=req.labels,
        max_tokens=req.max_tokens,
        concurrency=settings.sequence_concurrency,
        schema_budget=SchemaBudget.from_settings(settings),
    )
    out = await _run_once(deps, key, task_input, run_task)
    result = _priced(req, settings, key, out, facts, _timings(t0, t_prepared, time.perf_counter()))
    await deps.cache.put(key, {"model": result.model, "deployment": result.deployment, "result": result.result})
    await deps.cache.put(raw_key, alias)
    return result


async def _run_once(deps: Dependencies, key: str, task_input: Any, run_task: Any) -> Any:
    """Run the task, publishing the outcome to identical requests that arrive meanwhile."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    deps.inflight[key] = future
    try:
        out = await run_task(task_input, deps.model)
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
        if deps.inflight.get(key) is future:
            del deps.inflight[key]
    return out


def _priced(
    req: AnalysisRequest, settings: Settings, key: str, out: Any, facts: list[dict[str, Any]], timings: dict[str, float]
) -> AnalysisResult:
    """Usage and cost over every call the task made, priced by the family that answered."""
    from .tokens import cost_usd, known_family

    usage = Usage(
        prompt_tokens=sum(c.prompt_tokens for c in out.calls),
        completion_tokens=sum(c.completion_tokens for c in out.calls),
        estimated_image_tokens=sum(f["estimated_tokens"] for f in facts),
    )
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    cost = 0.0
    for call in out.calls:
        name = call.model if known_family(call.model) else settings.model_family
        cost += cost_usd(call.prompt_tokens, call.completion_tokens, name)
    last = out.calls[-1] if out.calls else None
    return AnalysisResult(
        id=key,
        task=req.task,
        model=last.model if last else "",
        deployment=last.deployment if last else settings.vlm_deployment,
        result=out.result,
        cached=False,
        usage=usage,
        cost_usd=round(cost, 6),
        images=facts,
        timings_ms=timings,
        model_calls=len(out.calls),
    )


async def _join_inflight(deps: Dependencies, key: str) -> Any:
    """Wait for an identical request already at the model; None if there is none or it failed."""
    shared = deps.inflight.get(key)
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
