"""The tasks: what each sends to the model, and how its answer is checked.

Text tasks (describe, ocr, compare) return text. Structured tasks (invoice, table,
classify, schema) use strict structured outputs, validate the answer against the
caller's original schema, re-ask once with the validation errors, and fall back to
`json_object` with a tolerant parse when an endpoint rejects json_schema. Sequence
analyses each image concurrently (bounded), then asks for one synthesis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequest, ModelOutputInvalid
from .model import ChatBackend, ChatRequest, ChatResult, ResponseFormatRejected
from .tokens import prompt_tokens

if TYPE_CHECKING:
    from .images import PreparedImage
    from .schema_guard import SchemaBudget

SYSTEM_PROMPT = (
    "You are a careful vision assistant. Answer only from what is visible in the images. "
    "If something is unreadable or absent, say so instead of guessing."
)
DEFAULT_PROMPTS = {
    "describe": "Describe this image.",
    "ocr": "Transcribe all text in the image(s) in reading order. Keep line breaks. Output only the text.",
    "compare": "Compare these images: what they have in common, how they differ, and anything notable in each. "
    "Refer to each image by its label, e.g. [Image 1].",
    "sequence_item": "Describe this image briefly: subject, setting, notable details and any visible text.",
    "sequence": "These are analyses of a sequence of images, in order. Give the common themes, the progression "
    "or changes across the sequence, key insights and recommendations.",
}
DEFAULT_MAX_TOKENS = {
    "describe": 1000,
    "ocr": 4000,
    "compare": 2000,
    "invoice": 4000,
    "table": 4000,
    "schema": 4000,
    "classify": 200,
    "sequence_item": 500,
    "sequence": 1500,
}
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


@dataclass(frozen=True)
class TaskSpec:
    name: str
    min_images: int = 1
    max_images: int | None = None  # None: MAX_IMAGES_PER_REQUEST
    structured: bool = False
    expands_pages: bool = True  # multi-page inputs become several images


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("describe", max_images=1),
        TaskSpec("classify", max_images=1, structured=True, expands_pages=False),
        TaskSpec("ocr"),
        TaskSpec("invoice", structured=True),
        TaskSpec("table", max_images=1, structured=True),
        TaskSpec("schema", structured=True),
        TaskSpec("compare", min_images=2, max_images=10, expands_pages=False),
        TaskSpec("sequence", min_images=2, max_images=50, expands_pages=False),
    )
}


@dataclass
class TaskInput:
    task: str
    images: list[PreparedImage]
    prompt: str | None = None
    schema: dict[str, Any] | None = None
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


def _max_tokens(inp: TaskInput, key: str | None = None) -> int:
    return inp.max_tokens or DEFAULT_MAX_TOKENS[key or inp.task]


async def _text(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    prompt = inp.prompt or DEFAULT_PROMPTS[inp.task]
    label = "Image" if inp.task == "compare" else ("Page" if len(inp.images) > 1 else None)
    request = chat_request(prompt, inp.images, _max_tokens(inp), label=label, reasoning_effort=inp.reasoning_effort)
    result = await model.complete(request)
    return TaskOutput(result=result.content or "", calls=[result])


async def structured_call(
    model: ChatBackend,
    prompt: str,
    images: list[PreparedImage],
    schema: dict[str, Any],
    max_tokens: int,
    name: str = "result",
    label: str | None = None,
    reasoning_effort: str | None = None,
    budget: SchemaBudget | None = None,
) -> TaskOutput:
    """Strict json_schema call, validated against the original schema; one re-ask; json_object fallback."""
    from . import schemas, task_schemas

    budget = budget or schemas.DEFAULT_BUDGET
    strict = schemas.to_strict(schema, name=name, budget=budget)
    json_object_prompt = prompt + "\n\n" + task_schemas.json_object_instructions(strict.schema)
    calls: list[ChatResult] = []
    extra: list[dict[str, Any]] = []
    use_json_object = False
    errors: list[str] = []

    async def ask() -> ChatResult:
        if use_json_object:
            fmt, text = {"type": "json_object"}, json_object_prompt
        else:
            fmt, text = strict.response_format(), prompt
        return await model.complete(
            chat_request(text, images, max_tokens, fmt, label, extra, reasoning_effort=reasoning_effort)
        )

    for attempt in (1, 2):
        try:
            result = await ask()
        except ResponseFormatRejected:
            if use_json_object:
                raise
            use_json_object = True  # the endpoint has no strict mode: same schema, in the prompt
            result = await ask()
        calls.append(result)
        answer: Any = None
        try:
            answer = schemas.parse_json_tolerant(result.content or "")
            if strict.wrapped:
                answer = schemas.unwrap(strict, answer)
            answer = schemas.normalise(schema, answer, budget=budget)
            errors = schemas.validate(schema, answer, budget=budget)
        except (ValueError, KeyError, TypeError) as exc:
            errors = [f"the answer is not valid JSON for the schema: {exc}"]
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


async def _invoice(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    label = "Page" if len(inp.images) > 1 else None
    prompt = task_schemas.INVOICE_PROMPT + (f"\n\n{inp.prompt}" if inp.prompt else "")
    return await structured_call(
        model,
        prompt,
        inp.images,
        task_schemas.INVOICE_SCHEMA,
        _max_tokens(inp),
        "invoice",
        label,
        inp.reasoning_effort,
        budget=inp.schema_budget,
    )


async def _table(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    prompt = task_schemas.TABLE_PROMPT + (f"\n\n{inp.prompt}" if inp.prompt else "")
    schema, effort = task_schemas.TABLE_SCHEMA, inp.reasoning_effort
    return await structured_call(
        model, prompt, inp.images, schema, _max_tokens(inp), "table", None, effort, budget=inp.schema_budget
    )


async def _classify(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    if not inp.labels:
        raise InvalidRequest(
            "task classify needs `labels` (a list or comma-separated string)", details={"field": "labels"}
        )
    schema = task_schemas.classify_schema(inp.labels)
    prompt = task_schemas.classify_prompt(inp.labels) + (f"\n\n{inp.prompt}" if inp.prompt else "")
    effort = inp.reasoning_effort
    return await structured_call(
        model, prompt, inp.images, schema, _max_tokens(inp), "classification", None, effort, budget=inp.schema_budget
    )


async def _schema(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    from . import task_schemas

    if not inp.schema:
        raise InvalidRequest("task schema needs `schema` (a JSON Schema object)", details={"field": "schema"})
    label = "Page" if len(inp.images) > 1 else None
    prompt = task_schemas.SCHEMA_PROMPT + (f"\n\n{inp.prompt}" if inp.prompt else "")
    effort = inp.reasoning_effort
    return await structured_call(
        model, prompt, inp.images, inp.schema, _max_tokens(inp), "result", label, effort, budget=inp.schema_budget
    )


async def _sequence(inp: TaskInput, model: ChatBackend) -> TaskOutput:
    """Per-image analyses run concurrently under a bound; then one synthesis over all of them."""
    gate = asyncio.Semaphore(max(1, inp.concurrency))
    item_prompt = inp.prompt or DEFAULT_PROMPTS["sequence_item"]

    async def one(image: PreparedImage) -> ChatResult:
        async with gate:
            budget = DEFAULT_MAX_TOKENS["sequence_item"]
            return await model.complete(
                chat_request(item_prompt, [image], budget, reasoning_effort=inp.reasoning_effort)
            )

    item_results = await asyncio.gather(*(one(image) for image in inp.images))
    items = [{"image": n, "analysis": r.content or ""} for n, r in enumerate(item_results, 1)]
    listing = "\n\n".join(f"[Image {i['image']}]\n{i['analysis']}" for i in items)
    synthesis_prompt = f"{DEFAULT_PROMPTS['sequence']}\n\n{listing}"
    synthesis = await structured_call(
        model,
        synthesis_prompt,
        [],
        SYNTHESIS_SCHEMA,
        _max_tokens(inp, "sequence"),
        "synthesis",
        reasoning_effort=inp.reasoning_effort,
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
