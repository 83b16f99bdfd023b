"""The tasks: one `TaskSpec` each, holding every policy that differs between tasks, and their runners.

A TaskSpec says how images are prepared (`ImagePolicy`: detail "auto", which pages and frames
expand, resampling), how many files a request takes, which fields it needs (checked before any
image is decoded), the default prompt and max_tokens, the response format and its fallback, and
whether a blob file waits for a `_manifest.json`. No other module branches on a task's name
(tests/test_tasks.py checks that, and checks the README's task table against TASKS).

Text tasks (describe, ocr, compare) return text. Structured tasks (invoice, table, classify,
schema) use strict structured outputs, validate the answer against the caller's original schema
and re-ask once with the validation errors; every request carries its `json_object` fallback,
which the model router sends to a deployment that rejects json_schema. Sequence analyses each
image concurrently (bounded), then asks for one structured synthesis.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import telemetry
from .errors import InvalidRequest, ModelOutputInvalid
from .image_policy import PAGED_FORMATS, ImagePolicy
from .model import ChatBackend, ChatRequest, ChatResult
from .telemetry_names import OUTCOME_ERROR, OUTCOME_OK, SPAN_VALIDATE, VLM_OUTCOME
from .tokens import prompt_tokens

if TYPE_CHECKING:
    from .images import PreparedImage
    from .schema_guard import SchemaBudget
    from .schemas import StrictSchema

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a careful vision assistant. Answer only from what is visible in the images. "
    "If something is unreadable or absent, say so instead of guessing."
)
SYNTHESIS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "themes": {"type": "array", "items": {"type": "string"}, "description": "common themes"},
        "changes": {"type": "array", "items": {"type": "string"}, "description": "progression or changes, in order"},
        "insights": {"type": "array", "items": {"type": "string"}, "description": "key insights"},
        "recommendations": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["themes", "changes", "insights", "recommendations"],
    "additionalProperties": False,
}

# Image policies (values handed to images.prepare). Documents need every glyph and every page;
# photos are looked at as a whole, the first page/frame unless `pages` picks another.
DOCUMENT_IMAGES = ImagePolicy(auto_detail="high", expand=PAGED_FORMATS, resample="document")
PHOTO_IMAGES = ImagePolicy(auto_detail="by_size")
GLANCE_IMAGES = ImagePolicy(auto_detail="low")  # classifying, or skimming many images

# The structured tasks' response format, and what an endpoint that rejects it gets instead:
# the same schema in the prompt, answered as free JSON and parsed tolerantly.
JSON_SCHEMA = "json_schema"
JSON_OBJECT = "json_object"


@dataclass(frozen=True)
class TaskSpec:
    """Everything that differs between tasks; no other module branches on a task's name.

    The README's task table is checked against these (tests/test_tasks.py).
    """

    name: str
    images: ImagePolicy  # detail "auto", which pages/frames expand, resampling
    max_tokens: int  # default completion budget (the caller's max_tokens overrides it)
    prompt: str | None = None  # default prompt (text tasks); structured tasks' prompts are in task_schemas
    min_images: int = 1
    max_images: int | None = None  # None: MAX_IMAGES_PER_REQUEST
    capped_by_setting: bool = True  # MAX_IMAGES_PER_REQUEST also caps max_images
    requires: tuple[str, ...] = ()  # request fields without which the task cannot run (checked before decoding)
    response_format: str | None = None  # None: text; JSON_SCHEMA: strict structured output
    fallback_format: str | None = None  # what to send when the endpoint rejects response_format
    image_label: str | None = "Page"  # "[Page N]" before each image when there are several; None: no labels
    strips: bool = True  # strips=True may be asked (tasks that label or judge whole images say no)
    waits_for_manifest: bool = False  # blob path: files are not analysed one by one, a _manifest.json runs the job
    item_prompt: str | None = None  # sequence: the per-image prompt (a task with one makes a call per image) ...
    item_max_tokens: int | None = None  # ... and its completion budget
    implied_by: str | None = None  # a request field that selects this task when the request names none

    @property
    def one_call(self) -> bool:
        """Answered by one model call per job (a re-ask aside): what a Batch API line can carry."""
        return self.item_prompt is None

    @property
    def structured(self) -> bool:
        return self.response_format is not None

    def image_limit(self, max_images_per_request: int) -> int:
        """The most images (inputs) one request of this task may carry."""
        limit = self.max_images or max_images_per_request
        return min(limit, max_images_per_request) if self.capped_by_setting else limit


def _structured(name: str, **kw: Any) -> TaskSpec:
    return TaskSpec(name, response_format=JSON_SCHEMA, fallback_format=JSON_OBJECT, **kw)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("describe", PHOTO_IMAGES, 1000, prompt="Describe this image.", max_images=1),
        _structured(
            "classify",
            images=GLANCE_IMAGES,
            max_tokens=200,
            max_images=1,
            requires=("labels",),
            image_label=None,
            strips=False,
        ),
        TaskSpec(
            "ocr",
            DOCUMENT_IMAGES,
            4000,
            prompt="Transcribe all text in the image(s) in reading order. Keep line breaks. Output only the text.",
        ),
        _structured("invoice", images=DOCUMENT_IMAGES, max_tokens=4000),
        _structured("table", images=DOCUMENT_IMAGES, max_tokens=4000, max_images=1, image_label=None),
        _structured("schema", images=DOCUMENT_IMAGES, max_tokens=4000, requires=("schema",), implied_by="schema"),
        TaskSpec(
            "compare",
            PHOTO_IMAGES,
            2000,
            prompt="Compare these images: what they have in common, how they differ, and anything notable in each. "
            "Refer to each image by its label, e.g. [Image 1].",
            min_images=2,
            max_images=10,
            image_label="Image",
            strips=False,
            waits_for_manifest=True,
        ),
        # The synthesis is structured (SYNTHESIS_SCHEMA); the per-image analyses are text.
        _structured(
            "sequence",
            images=GLANCE_IMAGES,
            max_tokens=1500,
            prompt="These are analyses of a sequence of images, in order. Give the common themes, the progression "
            "or changes across the sequence, key insights and recommendations.",
            min_images=2,
            max_images=50,
            capped_by_setting=False,
            strips=False,
            waits_for_manifest=True,
            item_prompt="Describe this image briefly: subject, setting, notable details and any visible text.",
            item_max_tokens=500,
        ),
    )
}


def implied_task(present: set[str], default: str) -> str:
    """The task of a request that names none: the one a field it carries implies, else `default`."""
    return next((t.name for t in TASKS.values() if t.implied_by in present), default)


REQUIRED_FIELD_HELP = {
    "labels": "a list or comma-separated string",
    "schema": "a JSON Schema object",
}


@dataclass
class TaskInput:
    task: str
    images: list[PreparedImage]
    prompt: str | None = None
    schema: StrictSchema | None = None  # the caller's schema, converted once (`strict_schema`) per request
    labels: list[str] | None = None
    max_tokens: int | None = None
    concurrency: int = 4
    reasoning_effort: str | None = None  # for deployments whose model reasons (the router decides)
    schema_budget: SchemaBudget | None = None  # None: the defaults (shared.schema_guard.DEFAULT_BUDGET)


@dataclass
class TaskOutput:
    result: Any
    calls: list[ChatResult] = field(default_factory=list)


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is None:
        raise InvalidRequest(
            f"unknown task {name!r}; use one of: {', '.join(TASKS)}", details={"field": "task", "tasks": list(TASKS)}
        )
    return spec


def check_required(spec: TaskSpec, given: dict[str, Any]) -> None:
    """A 400 naming the first field the task needs and did not get; run before any image is decoded."""
    for name in spec.requires:
        if not given.get(name):
            help_ = REQUIRED_FIELD_HELP.get(name, "")
            raise InvalidRequest(
                f"task {spec.name} needs `{name}`" + (f" ({help_})" if help_ else ""), details={"field": name}
            )


def check_strips(spec: TaskSpec, strips: bool) -> None:
    """Strips cut one image into several: a task that looks at whole images refuses them (400) up front."""
    if strips and not spec.strips:
        raise InvalidRequest(
            f"task {spec.name} looks at whole images and does not take strips", details={"field": "strips"}
        )


def strict_schema(schema: dict[str, Any], budget: SchemaBudget | None = None) -> StrictSchema:
    """The caller's schema in strict form (done once per request; refusals are 4xx before any image work)."""
    from . import schemas

    return schemas.to_strict(schema, name="result", budget=budget or schemas.DEFAULT_BUDGET)


def image_parts(images: list[PreparedImage], label: str | None = None) -> list[dict[str, Any]]:
    """Content parts for the images; with a label, each image is preceded by `[Label N]`."""
    parts: list[dict[str, Any]] = []
    for n, image in enumerate(images, 1):
        if label:
            parts.append({"type": "text", "text": f"[{label} {n}]"})
        parts.append({"type": "image_url", "image_url": {"url": image.data_url(), "detail": image.facts.detail}})
    return parts


def chat_request(
    prompt: str,
    images: list[PreparedImage],
    max_tokens: int,
    response_format: dict[str, Any] | None = None,
    label: str | None = None,
    extra_messages: list[dict[str, Any]] | None = None,
    reasoning_effort: str | None = None,
) -> ChatRequest:
    """Builds the messages and the limiter's estimate: text (with the response schema, which the model
    reads as part of the prompt) + image tokens (by formula; the router calibrates them) + max_tokens."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": prompt}, *image_parts(images, label)]},
        *(extra_messages or []),
    ]
    texts = [SYSTEM_PROMPT, prompt] + [m["content"] for m in extra_messages or [] if isinstance(m["content"], str)]
    if label:
        texts += [f"[{label} {n}]" for n in range(1, len(images) + 1)]
    if response_format is not None:
        texts.append(json.dumps(response_format, separators=(",", ":")))
    image_tokens = sum(i.facts.estimated_tokens for i in images)
    estimate = prompt_tokens(texts, messages=len(messages)) + image_tokens
    return ChatRequest(
        messages,
        max_tokens,
        response_format,
        estimated_tokens=estimate + max_tokens,
        image_tokens=image_tokens,
        reasoning_effort=reasoning_effort,
    )


async def run_task(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    runner = RUNNERS[inp.task]
    return await runner(inp, model)


def _max_tokens(inp: TaskInput) -> int:
    return inp.max_tokens or TASKS[inp.task].max_tokens


def _label(inp: TaskInput) -> str | None:
    """The task's image label when there are several images; one image goes unlabelled."""
    return TASKS[inp.task].image_label if len(inp.images) > 1 else None


async def _text(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    prompt = inp.prompt or TASKS[inp.task].prompt or ""
    request = chat_request(
        prompt, inp.images, _max_tokens(inp), label=_label(inp), reasoning_effort=inp.reasoning_effort
    )
    result = await model.complete(request)
    return TaskOutput(result=result.content or "", calls=[result])


async def structured_call(
    model: ChatBackend,
    prompt: str,
    images: list[PreparedImage],
    strict: StrictSchema,
    max_tokens: int,
    label: str | None = None,
    reasoning_effort: str | None = None,
    budget: SchemaBudget | None = None,
    fallback_format: str | None = JSON_OBJECT,
) -> TaskOutput:
    """Strict json_schema call, validated against the original schema; one re-ask.

    Every request carries its json_object fallback (the same schema in the prompt); the model router
    sends it to a deployment that rejects json_schema, and remembers that deployment. The answer is
    parsed tolerantly either way, so nothing here needs to know which of the two was sent.
    """
    from . import schemas, task_schemas

    budget = budget or schemas.DEFAULT_BUDGET
    schema = strict.original
    fallback_prompt = prompt + "\n\n" + task_schemas.json_object_instructions(strict.schema)
    calls: list[ChatResult] = []
    extra: list[dict[str, Any]] = []
    errors: list[str] = []

    async def ask() -> ChatResult:
        request = chat_request(
            prompt, images, max_tokens, strict.response_format(), label, extra, reasoning_effort=reasoning_effort
        )
        if fallback_format is not None:
            request.fallback = chat_request(
                fallback_prompt,
                images,
                max_tokens,
                {"type": fallback_format},
                label,
                extra,
                reasoning_effort=reasoning_effort,
            )
        return await model.complete(request)

    for attempt in (1, 2):
        result = await ask()
        calls.append(result)
        answer: Any = None
        with telemetry.span(SPAN_VALIDATE) as span:
            try:
                answer = schemas.parse_json_tolerant(result.content or "")
                if strict.wrapped:
                    answer = schemas.unwrap(strict, answer)
                answer = schemas.normalise(schema, answer, budget=budget)
                errors = schemas.validate(schema, answer, budget=budget)
            except schemas.AnswerNotJson as exc:
                errors = [str(exc)]  # our own words (see AnswerNotJson)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s: the answer could not be checked: %s: %s", label, type(exc).__name__, str(exc)[:300])
                errors = ["the answer could not be read as JSON matching the schema"]
            span.set_attribute(VLM_OUTCOME, OUTCOME_ERROR if errors else OUTCOME_OK)
        if not errors:
            return TaskOutput(result=answer, calls=calls)
        if attempt == 1:
            extra = [
                {"role": "assistant", "content": result.content or ""},
                {"role": "user", "content": task_schemas.reask_message(errors)},
            ]
    usage = sum(c.total_tokens for c in calls)
    raise ModelOutputInvalid(
        "the model's answer did not match the schema after one re-ask",
        details={"errors": errors[:20], "calls": len(calls), "total_tokens": usage},
    )


def _builtin(schema: dict[str, Any], name: str) -> StrictSchema:
    """A built-in schema in strict form (small and fixed: converted per call, not worth a cache)."""
    from . import schemas

    return schemas.to_strict(schema, name=name)


def _with_guidance(prompt: str, inp: TaskInput) -> str:
    return prompt + (f"\n\n{inp.prompt}" if inp.prompt else "")


async def _ask(inp: TaskInput, model: ChatBackend, strict: StrictSchema, prompt: str) -> TaskOutput:
    """One structured call for a task: the caller's guidance appended; its budget, page labels and fallback."""
    return await structured_call(
        model,
        _with_guidance(prompt, inp),
        inp.images,
        strict,
        _max_tokens(inp),
        _label(inp),
        inp.reasoning_effort,
        inp.schema_budget,
        TASKS[inp.task].fallback_format,
    )


async def _invoice(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    return await _ask(inp, model, _builtin(task_schemas.INVOICE_SCHEMA, "invoice"), task_schemas.INVOICE_PROMPT)


async def _table(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    return await _ask(inp, model, _builtin(task_schemas.TABLE_SCHEMA, "table"), task_schemas.TABLE_PROMPT)


async def _classify(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    check_required(TASKS[inp.task], {"labels": inp.labels})
    assert inp.labels is not None
    strict = _builtin(task_schemas.classify_schema(inp.labels), "classification")
    return await _ask(inp, model, strict, task_schemas.classify_prompt(inp.labels))


async def _schema(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    check_required(TASKS[inp.task], {"schema": inp.schema})
    assert inp.schema is not None
    return await _ask(inp, model, inp.schema, task_schemas.SCHEMA_PROMPT)


async def _sequence(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    """Per-image analyses run concurrently under a bound; then one synthesis over all of them."""
    spec = TASKS[inp.task]
    gate = asyncio.Semaphore(max(1, inp.concurrency))
    item_prompt = inp.prompt or spec.item_prompt or ""
    item_budget = spec.item_max_tokens or spec.max_tokens

    async def one(image: PreparedImage) -> ChatResult:
        async with gate:
            return await model.complete(
                chat_request(item_prompt, [image], item_budget, reasoning_effort=inp.reasoning_effort)
            )

    item_results = await asyncio.gather(*(one(image) for image in inp.images))
    items = [{"image": n, "analysis": r.content or ""} for n, r in enumerate(item_results, 1)]
    listing = "\n\n".join(f"[Image {i['image']}]\n{i['analysis']}" for i in items)
    synthesis_prompt = f"{spec.prompt}\n\n{listing}"
    synthesis = await structured_call(
        model,
        synthesis_prompt,
        [],
        _builtin(SYNTHESIS_SCHEMA, "synthesis"),
        _max_tokens(inp),
        reasoning_effort=inp.reasoning_effort,
        fallback_format=spec.fallback_format,
    )
    return TaskOutput(result={"items": items, "synthesis": synthesis.result}, calls=[*item_results, *synthesis.calls])


RUNNERS: dict[str, Callable[[TaskInput, ChatBackend], Awaitable[TaskOutput]]] = {
    "describe": _text,
    "ocr": _text,
    "compare": _text,
    "invoice": _invoice,
    "table": _table,
    "classify": _classify,
    "schema": _schema,
    "sequence": _sequence,
}
