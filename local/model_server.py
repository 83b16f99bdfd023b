"""The local model server: an OpenAI-compatible chat completions endpoint that reads images with real OCR.

It stands in for Azure OpenAI on one machine (DESIGN.md, "Local stand-ins") so the pipeline's
model client, limiter, structured outputs and resilience run against a real HTTP peer:

- `POST /v1/chat/completions`, `/openai/v1/chat/completions` (Azure v1 GA path) and
  `/openai/deployments/{deployment}/chat/completions` (the classic AzureOpenAI client path).
- Answers come from RapidOCR and measured image facts and are labelled `local-ocr-rapidocr`, so
  nobody mistakes them for a real model's (see local/ocr_answers.py). `--mode facts` skips OCR.
- Usage: the project's text estimate (shared.tokens) of every text part plus the stand-in's own image
  count (local/model_tokens.py, `--image-tokens tile:85:170` by default, `patch:1.9` for a patch model)
  per image at its decoded size and effective detail.
- It plays a model (local/model_behaviour.py): `--model-name` is the `model` it answers with;
  `--reasoning` takes reasoning-model parameters and reports reasoning tokens (local/model_params.py);
  `--deployments a,b` makes other deployment names 404 DeploymentNotFound. Settable at run time
  through /admin/model.
- The Batch API (local/model_batch.py, docs/batch.md): `/v1/files` and `/v1/batches` (also under
  `/openai/v1`), answering each line through the same code as the chat route, with a turnaround,
  an enqueued-token quota and admin switches to fail, expire or cancel jobs or fail lines.
- RPM/TPM quota per deployment like Azure (local/model_quota.py), latency, and injected faults
  (local/model_faults.py), all settable at start and at run time through /admin endpoints.

Run: `python -m local.model_server --host 127.0.0.1 --port 8089 [--mode ocr|facts] [--rpm N]
[--tpm N] [--window-s 60] [--latency-ms N] [--faults SPEC] [--no-json-schema] [--seed N]
[--model-name NAME] [--reasoning] [--image-tokens SPEC] [--deployments a,b] [--batch-turnaround-s S]
[--batch-enqueued-tokens N] [--batch-fail-fast]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from local.model_admin import ADMIN_TOKEN_FILE, admin_guard, bounded_number, new_admin_token, write_token
from local.model_batch import BatchLimits, BatchService, add_routes
from local.model_behaviour import DEPLOYMENT_NOT_FOUND, ModelBehaviour, parse_deployments
from local.model_faults import (
    EARLY_FAULTS,
    REFUSAL_TEXT,
    FaultInjector,
    FaultSettings,
    FaultSpecError,
    break_against_schema,
    content_filter_prompt_body,
    error_body,
    filter_results,
    parse_rates,
    parse_script,
    server_error_body,
    throttled_body,
)
from local.model_params import (
    DEFAULT_EFFORT,
    DEFAULT_EFFORTS,
    ParamError,
    check_params,
    parse_efforts,
    parse_reasoning_tokens,
    spend,
)
from local.model_quota import Quota, QuotaDecision, QuotaLimits
from local.model_tokens import DEFAULT_SPEC, ImageTokenSpecError, parse_image_tokens
from local.ocr_answers import Analysis, text_answer
from local.ocr_engine import DecodedImage, ImageDecodeError, ImageHeader, OcrEngine, decode, read_header, resolve_detail
from local.schema_fill import SchemaError, json_object_answer, resolve_ref, schema_answer
from shared.tokens import CHARS_PER_TOKEN, prompt_tokens, text_tokens

log = logging.getLogger("local.model_server")

MODEL_NAME = "local-ocr-rapidocr"
MODES = ("ocr", "facts")
ROLES = {"system", "developer", "user", "assistant", "tool"}
DATA_URL_RE = re.compile(r"data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w-]+=[^;,]*)*)?;base64,(?P<data>.*)", re.S)
JSON_SCHEMA_MIN_API_VERSION = "2024-08-01"  # the first api-version that accepts response_format json_schema
# bounds on the admin knobs (local/model_admin.py): a typo or a hostile value is a 400, not a hang
MAX_HOLD_S = 600.0  # latency_ms, jitter_ms, fault timeout_s, retry_after_ms
MAX_WINDOW_S = 86_400.0
MAX_QUOTA = 1_000_000_000  # rpm, tpm, default_max_tokens
MAX_FAULT_SCRIPT = 10_000
MAX_ADMIN_STRING = 1_000


@dataclass
class ModelServerConfig:
    """Everything the CLI can set; most of it can be changed at run time through /admin."""

    host: str = "127.0.0.1"
    port: int = 8089
    mode: str = "ocr"  # ocr | facts (facts skips OCR: fast plumbing tests)
    rpm: int = 0  # 0 = unlimited
    tpm: int = 0
    window_s: float = 60.0
    quota_model: str | None = None  # limit only this deployment
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    faults: str | dict[str, float] = ""  # rates, e.g. "429:0.05,500:0.05"
    fault_script: list[str] = field(default_factory=list)
    fault_model: str | None = None
    fault_timeout_s: float = 120.0
    fault_retry_after_ms: int = 200
    json_schema: bool = True  # False: reject response_format json_schema like an old api-version
    seed: int | None = None
    default_max_tokens: int = 1000  # charged against TPM when a request sets no max_tokens
    max_output_tokens: int = 16384  # answer cap when a request sets no max_tokens
    model_name: str = MODEL_NAME
    # the model it plays (local/model_behaviour.py); /admin/model changes these at run time
    reasoning: bool = False
    reasoning_efforts: tuple[str, ...] = DEFAULT_EFFORTS
    default_reasoning_effort: str = DEFAULT_EFFORT
    reasoning_tokens: str = ""  # per-effort overrides, e.g. "low:64,high:2000"
    image_tokens: str = DEFAULT_SPEC
    deployments: tuple[str, ...] = ()  # empty: any deployment name exists
    max_image_bytes: int = 20 * 1024 * 1024
    max_images: int = 50
    batch_turnaround_s: float = 0.0  # Batch API (local/model_batch.py): time a job waits in_progress
    batch_enqueued_tokens: int = 0  # enqueued-token quota per deployment; 0 = none
    batch_fail_fast: bool = False  # over the quota: refuse the create (400) instead of failing the job
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    admin_token: str = field(default_factory=new_admin_token, repr=False, compare=False)  # fresh per start
    admin_token_file: str | None = None  # where main() writes it for the stack, tests and people


class UnknownDeployment(Exception):
    """A deployment name this server does not have: 404 DeploymentNotFound, before the body is read."""


class RequestError(Exception):
    """A malformed request: becomes a 400 in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class ImagePart:
    data: bytes
    detail: str  # as requested: auto | low | high
    header: ImageHeader
    effective_detail: str  # low | high after resolving auto
    tokens: int


@dataclass
class ResponseFormat:
    kind: str  # text | json_object | json_schema
    name: str = ""
    schema: dict[str, Any] | None = None
    strict: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: int
    texts: list[str]
    prompt: str  # every text part, in order, for the answer builders
    images: list[ImagePart]
    response_format: ResponseFormat
    max_tokens: int | None
    reasoning_effort: str | None = None  # effective effort in reasoning mode

    def prompt_tokens(self) -> int:
        return prompt_tokens(self.texts, messages=self.messages) + sum(i.tokens for i in self.images)


# ------------------------------------------------------------------------------------ parsing


def _decode_image_url(url: Any, param: str, max_bytes: int) -> bytes:
    if not isinstance(url, str) or not url:
        raise RequestError("Invalid image_url: expected a non-empty string.", param, "invalid_value")
    if not url.startswith("data:"):
        raise RequestError(
            "The local model server is offline and accepts only data: URLs (data:image/jpeg;base64,...).",
            param,
            "invalid_image_url",
        )
    m = DATA_URL_RE.fullmatch(url)
    if not m:
        raise RequestError("Invalid image data URL: expected data:<mime>;base64,<data>.", param, "invalid_image_url")
    try:
        data = base64.b64decode(m["data"], validate=False)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("Invalid base64 image data.", param, "invalid_image_format") from exc
    if not data:
        raise RequestError("Empty image data.", param, "invalid_image_format")
    if len(data) > max_bytes:
        raise RequestError(
            f"Image is too large: {len(data)} bytes, the limit is {max_bytes}.", param, "image_too_large"
        )
    return data


def _response_format(body: dict[str, Any], json_schema_enabled: bool, api_version: str | None) -> ResponseFormat:
    rf = body.get("response_format")
    if rf is None:
        return ResponseFormat("text")
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise RequestError(
            "Invalid type for 'response_format': expected an object with a 'type'.", "response_format", "invalid_type"
        )
    kind = rf["type"]
    if kind not in ("text", "json_object", "json_schema"):
        raise RequestError(
            f"Invalid value: '{kind}'. Supported values are: 'text', 'json_object' and 'json_schema'.",
            "response_format.type",
            "invalid_value",
        )
    if kind != "json_schema":
        return ResponseFormat(kind)
    old_api = api_version is not None and api_version[:10] < JSON_SCHEMA_MIN_API_VERSION
    if not json_schema_enabled or old_api:
        raise RequestError(
            "response_format value as json_schema is enabled only for api versions 2024-08-01-preview and later",
            "response_format",
            "BadRequest",
        )
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise RequestError(
            "Missing required parameter: 'response_format.json_schema'.",
            "response_format.json_schema",
            "missing_required_parameter",
        )
    name = js.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
        raise RequestError(
            "Invalid 'response_format.json_schema.name': expected a string of a-z, A-Z, 0-9, _ and - (at most 64).",
            "response_format.json_schema.name",
            "invalid_value",
        )
    schema = js.get("schema")
    if not isinstance(schema, dict):
        raise RequestError(
            "Missing required parameter: 'response_format.json_schema.schema'.",
            "response_format.json_schema.schema",
            "missing_required_parameter",
        )
    strict = bool(js.get("strict", False))
    problem = check_schema(schema, strict)
    if problem:
        raise RequestError(f"Invalid schema for response_format '{name}': {problem}", "response_format", None)
    return ResponseFormat("json_schema", name, schema, strict)


CHECK_SCHEMA_MAX_NODES = 100_000


def check_schema(schema: dict[str, Any], strict: bool) -> str | None:
    """Every $ref must resolve; under strict, the rules OpenAI enforces on structured-output schemas."""
    problems: list[str] = []
    budget = [CHECK_SCHEMA_MAX_NODES]

    def walk(node: Any, ctx: tuple[str, ...]) -> None:
        budget[0] -= 1
        if budget[0] < 0:  # structural walk, refs are resolved but never followed: linear in size
            return
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, (*ctx, str(i)))
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                resolve_ref(schema, ref)
            except SchemaError as exc:
                problems.append(f"In context={ctx}, {exc}.")
        if strict and (node.get("type") == "object" or "properties" in node):
            if node.get("additionalProperties") is not False:
                problems.append(f"In context={ctx}, 'additionalProperties' is required to be supplied and to be false.")
            props = node.get("properties", {})
            required = node.get("required", [])
            missing = [k for k in props if k not in required] if isinstance(required, list) else list(props)
            if missing:
                problems.append(
                    f"In context={ctx}, 'required' is required to be supplied and to be an array including every key "
                    f"in properties. Missing '{missing[0]}'."
                )
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for k, v in value.items():
                    walk(v, (*ctx, key, k))
            elif key in ("items", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "prefixItems"):
                walk(value, (*ctx, key))

    if strict and schema.get("type") != "object":
        got = schema.get("type")
        return f"In context=(), schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{got}\"'."
    walk(schema, ())
    if budget[0] < 0:
        return f"schema has more than {CHECK_SCHEMA_MAX_NODES} nodes."
    return problems[0] if problems else None


def parse_chat_request(
    body: Any,
    config: ModelServerConfig,
    deployment: str | None = None,
    api_version: str | None = None,
    behaviour: ModelBehaviour | None = None,
) -> ChatRequest:
    """Validate an OpenAI chat completions body; every problem is a RequestError naming the parameter."""
    behaviour = behaviour or behaviour_from(config)
    if not isinstance(body, dict):
        raise RequestError("Invalid request body: expected a JSON object.", None, None)
    model = body.get("model", deployment)
    if deployment is not None:
        model = deployment  # the URL names the deployment on the classic Azure path
    if not isinstance(model, str) or not model:
        raise RequestError("you must provide a model parameter", None, None)
    if body.get("stream"):
        raise RequestError("Streaming is not supported by the local model server.", "stream", "unsupported_value")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise RequestError(
            "'messages' is a required property and must be an array.", "messages", "missing_required_parameter"
        )
    if not messages:
        raise RequestError("[] is too short - 'messages'", "messages", "empty_array")
    texts: list[str] = []
    images: list[ImagePart] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(
                f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]", "invalid_type"
            )
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(
                f"Invalid value: '{role}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'.",
                f"messages[{i}].role",
                "invalid_value",
            )
        content = msg.get("content")
        if content is None and role == "assistant":
            continue
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise RequestError(
                f"Invalid type for 'messages[{i}].content': expected one of a string or array of objects.",
                f"messages[{i}].content",
                "invalid_type",
            )
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise RequestError(f"Invalid type for '{param}': expected an object.", param, "invalid_type")
            ptype = part.get("type")
            if ptype == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(
                        f"Missing required parameter: '{param}.text'.", f"{param}.text", "missing_required_parameter"
                    )
                texts.append(part["text"])
            elif ptype == "image_url":
                if role != "user":
                    raise RequestError(
                        f"Image URLs are only allowed for messages with role 'user', but this message with role '{role}' contains an image URL.",
                        f"messages[{i}]",
                        "invalid_value",
                    )
                iu = part.get("image_url")
                if not isinstance(iu, dict):
                    raise RequestError(
                        f"Missing required parameter: '{param}.image_url'.",
                        f"{param}.image_url",
                        "missing_required_parameter",
                    )
                detail = iu.get("detail", "auto") or "auto"
                if detail not in ("auto", "low", "high"):
                    raise RequestError(
                        f"Invalid value: '{detail}'. Supported values are: 'auto', 'low' and 'high'.",
                        f"{param}.image_url.detail",
                        "invalid_value",
                    )
                data = _decode_image_url(iu.get("url"), f"{param}.image_url.url", config.max_image_bytes)
                try:
                    header = read_header(data)
                except ImageDecodeError as exc:
                    raise RequestError(
                        "You uploaded an unsupported image. Please make sure your image has of one the following "
                        "formats: ['png', 'jpeg', 'gif', 'webp'].",
                        f"{param}.image_url.url",
                        "invalid_image_format",
                    ) from exc
                eff = resolve_detail(detail, header.width, header.height)
                tokens = behaviour.image_rule.count(header.width, header.height, eff)
                images.append(ImagePart(data, detail, header, eff, tokens))
            else:
                raise RequestError(
                    f"Invalid value: '{ptype}'. Supported values are: 'text' and 'image_url'.",
                    f"{param}.type",
                    "invalid_value",
                )
    if len(images) > config.max_images:
        raise RequestError(
            f"Too many images: {len(images)}, at most {config.max_images}.", "messages", "too_many_images"
        )
    try:
        params = check_params(
            body,
            reasoning=behaviour.reasoning,
            efforts=behaviour.efforts,
            default_effort=behaviour.default_effort,
            model_name=behaviour.model_name,
        )
    except ParamError as exc:
        raise RequestError(exc.message, exc.param, exc.code) from exc
    rf = _response_format(body, config.json_schema, api_version)
    if rf.kind == "json_object" and not any("json" in t.lower() for t in texts):
        raise RequestError(
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
            "messages",
            None,
        )
    return ChatRequest(
        model, len(messages), texts, "\n".join(texts), images, rf, params.max_tokens, params.reasoning_effort
    )


def behaviour_from(config: ModelServerConfig) -> ModelBehaviour:
    """The model a config describes (validated: a bad spec is a ValueError at start, not a 500 later)."""
    try:
        rule = parse_image_tokens(config.image_tokens)
    except ImageTokenSpecError as exc:
        raise ValueError(str(exc)) from exc
    b = ModelBehaviour(
        model_name=config.model_name,
        reasoning=config.reasoning,
        efforts=parse_efforts(config.reasoning_efforts),
        default_effort=config.default_reasoning_effort,
        reasoning_tokens=parse_reasoning_tokens(config.reasoning_tokens),
        image_rule=rule,
        deployments=parse_deployments(config.deployments),
    )
    return b.updated({})  # checks the default effort is one the model takes


def usage_body(prompt: int, completion: int, reasoning: int) -> dict[str, Any]:
    """`usage` as today's models report it: reasoning tokens are inside completion_tokens (billed as output)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# ------------------------------------------------------------------------------------- server


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    charged_tokens: int = 0  # prompt + max_tokens of every admitted request: the quota's count

    def as_json(self, faults: Counter[str]) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "by_status": dict(self.by_status),
            "by_model": dict(self.by_model),
            "faults_injected": dict(faults),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "reasoning_tokens": self.reasoning_tokens,  # already inside tokens.completion
            "charged_tokens": self.charged_tokens,
        }


class ModelServer:
    """State behind the routes: config, OCR engine, quota, faults, counters."""

    def __init__(self, config: ModelServerConfig, ocr: OcrEngine | None = None) -> None:
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {config.mode!r}")
        self.config = config
        self.behaviour = self.start_behaviour = behaviour_from(config)
        self.ocr = ocr or OcrEngine()
        self.owns_ocr = ocr is None
        self.quota = Quota(QuotaLimits(config.rpm, config.tpm, config.window_s, config.quota_model), config.clock)
        self.faults = FaultInjector(
            FaultSettings(
                rates=parse_rates(config.faults),
                script=parse_script(config.fault_script),
                model=config.fault_model,
                timeout_s=config.fault_timeout_s,
                retry_after_ms=config.fault_retry_after_ms,
                seed=config.seed,
            )
        )
        self.stats = Stats()
        self.batches = BatchService(
            self,
            BatchLimits(
                turnaround_s=config.batch_turnaround_s,
                enqueued_tokens=config.batch_enqueued_tokens,
                fail_fast=config.batch_fail_fast,
            ),
        )
        self.rng = random.Random(config.seed)
        self.release = asyncio.Event()  # set on shutdown/reset: held (`timeout`) requests give up

    def _fault_settings(self, body: dict[str, Any]) -> FaultSettings:
        c = self.config
        script = body.get("script")
        if isinstance(script, list | str) and len(script) > MAX_FAULT_SCRIPT:
            raise FaultSpecError(f"'script' may hold at most {MAX_FAULT_SCRIPT} entries")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise FaultSpecError("'model' must be a string or null")
        match = body.get("match")
        if match is not None and not isinstance(match, str):
            raise FaultSpecError("'match' must be a string or null")
        if (match and len(match) > MAX_ADMIN_STRING) or (model and len(model) > MAX_ADMIN_STRING):
            raise FaultSpecError(f"'model' and 'match' may be at most {MAX_ADMIN_STRING} characters")
        try:
            timeout_s = bounded_number(body, "timeout_s", c.fault_timeout_s, lo=0, hi=MAX_HOLD_S)
            retry_after_ms = bounded_number(
                body, "retry_after_ms", c.fault_retry_after_ms, lo=0, hi=MAX_HOLD_S * 1000, integer=True
            )
            seed = (
                None
                if body.get("seed", c.seed) is None
                else bounded_number(body, "seed", c.seed or 0, lo=-(2**63), hi=2**63, integer=True)
            )
        except ValueError as exc:
            raise FaultSpecError(str(exc)) from None
        return FaultSettings(
            rates=parse_rates(body.get("rates")),
            script=parse_script(body.get("script")),
            model=model,
            match=match,
            timeout_s=timeout_s,
            retry_after_ms=retry_after_ms,
            seed=seed,
        )

    # -- responses
    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        self.stats.by_status[str(status)] += 1
        h = {"x-request-id": str(uuid.uuid4()), "x-ms-region": "local"}
        h.update(headers or {})
        return web.json_response(body, status=status, headers=h, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    def _request_error(self, e: RequestError) -> web.Response:
        return self._json(e.status, error_body(e.message, "invalid_request_error", e.param, e.code))

    def _throttled(self, d: QuotaDecision, model: str) -> web.Response:
        return self._json(429, throttled_body(d.retry_after_header, d.reason, model), d.headers())

    def _injected_429(self, model: str) -> web.Response:
        """A 429 that is not the quota's doing (capacity on a busy region): the capacity message, the
        fault's wait, and the quota's true x-ratelimit-remaining-* (the quota was not used up)."""
        quota = self.quota.peek(model)
        d = QuotaDecision(
            False,
            "capacity",
            self.faults.settings.retry_after_ms / 1000,
            quota.limit_requests,
            quota.limit_tokens,
            quota.remaining_requests,
            quota.remaining_tokens,
        )
        return self._throttled(d, model)

    async def _hold(self, request: web.Request, seconds: float) -> bool:
        """Keep a request open until `seconds` pass, the client hangs up, or the server resets; True if the client left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        release = self.release  # reset swaps the event; this request waits on the one it started with
        while loop.time() < deadline and not release.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return True
            await asyncio.sleep(0.05)
        return False

    async def _analyse(self, req: ChatRequest) -> Analysis:
        loop = asyncio.get_running_loop()
        decoded: list[DecodedImage] = []
        for i, part in enumerate(req.images):
            try:
                decoded.append(
                    await loop.run_in_executor(
                        None, decode, part.data, i, part.effective_detail, self.behaviour.image_rule
                    )
                )
            except ImageDecodeError as exc:
                raise RequestError(
                    "You uploaded an unsupported image. Please make sure your image has of one the following formats: "
                    "['png', 'jpeg', 'gif', 'webp'].",
                    "messages",
                    "invalid_image_format",
                ) from exc
        ocr = self.config.mode == "ocr"
        if ocr:
            for im in decoded:
                im.lines = await self.ocr.read(im)
                im.ocr_done = True
        return Analysis(req.prompt, decoded, ocr)

    def _answer(self, req: ChatRequest, a: Analysis) -> tuple[str, Any]:
        """The content string and, for JSON formats, the value it encodes."""
        rf = req.response_format
        if rf.kind == "json_schema" and rf.schema is not None:
            value = schema_answer(a, rf.schema)
            return json.dumps(value, ensure_ascii=False), value
        if rf.kind == "json_object":
            value = json_object_answer(a)
            return json.dumps(value, ensure_ascii=False), value
        return text_answer(a), None

    # -- the endpoint
    def parse(self, body: Any, deployment: str | None, api_version: str | None) -> ChatRequest:
        """A chat body as this server reads it (the chat route and the batch runner share this)."""
        named = deployment if deployment is not None else body.get("model") if isinstance(body, dict) else None
        if isinstance(named, str) and not self.behaviour.knows(named):
            raise UnknownDeployment(named)
        return parse_chat_request(body, self.config, deployment, api_version, self.behaviour)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        c = self.config
        try:
            try:
                body = await request.json(loads=json.loads)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
                    "HTTP library correctly. The OpenAI API expects a JSON payload.)",
                    None,
                    None,
                ) from exc
            req = self.parse(body, request.match_info.get("deployment"), request.query.get("api-version"))
        except UnknownDeployment:
            return self._json(404, DEPLOYMENT_NOT_FOUND)  # Azure routes by deployment before reading the body
        except RequestError as e:
            return self._request_error(e)
        self.stats.by_model[req.model] += 1
        p_tokens = req.prompt_tokens()
        charge = p_tokens + (req.max_tokens or c.default_max_tokens)
        decision = self.quota.try_acquire(req.model, charge)
        if not decision.allowed:
            return self._throttled(decision, req.model)
        self.stats.charged_tokens += charge  # what the quota counted, whatever max_tokens the client sent
        fault = self.faults.pick(req.model, "\n".join(req.texts))
        delay = c.latency_ms + (self.rng.uniform(0, c.jitter_ms) if c.jitter_ms > 0 else 0.0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if fault in EARLY_FAULTS:
            return await self._early_fault(fault, request, req)
        try:
            body = await self.complete(req, fault)
        except RequestError as e:
            return self._request_error(e)
        # The rate-limit headers describe the quota as the call was admitted, as a streaming answer's must (its
        # headers leave before the first token): what was left then, this call included. Reading them at answer
        # time would count calls admitted during this one's latency, which the client cannot tell apart.
        headers = decision.headers()
        if fault == "invalid_json":
            text = json.dumps(body, ensure_ascii=False)
            self.stats.by_status["200"] += 1
            return web.Response(
                status=200, text=text[: max(1, len(text) * 3 // 5)], content_type="application/json", headers=headers
            )
        return self._json(200, body, headers)

    async def answer_body(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Status and body for one request body, as the chat route would answer it (no quota, no faults)."""
        try:
            req = self.parse(body, None, None)
            self.stats.by_model[req.model] += 1
            return 200, await self.complete(req)
        except UnknownDeployment:
            return 404, DEPLOYMENT_NOT_FOUND
        except RequestError as e:
            return e.status, error_body(e.message, "invalid_request_error", e.param, e.code)

    async def complete(self, req: ChatRequest, fault: str | None = None) -> dict[str, Any]:
        """The chat.completion body for a parsed request (counted in /stats); RequestError if it cannot be answered.

        The chat route and the batch runner (local/model_batch.py) both answer through here, so a batch
        line gets exactly the answer the same request would get online.
        """
        c = self.config
        try:
            analysis = await self._analyse(req)
            content, value = self._answer(req, analysis)
        except SchemaError as e:
            raise RequestError(f"Invalid schema for response_format: {e}", "response_format") from None
        limit = req.max_tokens or c.max_output_tokens
        thought = self.behaviour.reasoning_tokens.get(req.reasoning_effort, 0) if req.reasoning_effort else 0
        spent = spend(content, text_tokens(content), thought, limit, CHARS_PER_TOKEN)
        content, finish = spent.content, spent.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        choice_filter = filter_results()
        if fault == "finish_length":
            content = content[: max(1, len(content) // 2)]
            message["content"], finish = content, "length"
        elif fault == "finish_content_filter":
            message["content"], finish = None, "content_filter"
            choice_filter = filter_results("sexual")
        elif fault == "refusal":
            message["content"], message["refusal"], finish = None, REFUSAL_TEXT, "stop"
        elif fault == "bad_output":
            message["content"] = self._bad_output(req, value)
        out_text = message["content"] or message["refusal"] or ""
        p_tokens = req.prompt_tokens()
        usage = usage_body(p_tokens, spent.reasoning_tokens + text_tokens(out_text), spent.reasoning_tokens)
        body = {
            "id": f"chatcmpl-local-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.behaviour.model_name,
            "system_fingerprint": "fp_local_ocr",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish,
                    "content_filter_results": choice_filter,
                }
            ],
            "usage": usage,
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filter_results()}],
        }
        self.stats.completed += 1
        self.stats.prompt_tokens += usage["prompt_tokens"]
        self.stats.completion_tokens += usage["completion_tokens"]
        self.stats.reasoning_tokens += spent.reasoning_tokens
        return body

    def _bad_output(self, req: ChatRequest, value: Any) -> str:
        """An answer the client must reject: schema-invalid JSON, prose around JSON, or nothing."""
        rf = req.response_format
        if rf.kind == "json_schema" and rf.schema is not None:
            return json.dumps(break_against_schema(value, rf.schema), ensure_ascii=False)
        if rf.kind == "json_object":
            return (
                "Sure! Here is the JSON you asked for:\n" + json.dumps(value, ensure_ascii=False) + "\nAnything else?"
            )
        return ""

    async def _early_fault(self, fault: str, request: web.Request, req: ChatRequest) -> web.StreamResponse:
        if fault == "429":
            return self._injected_429(req.model)
        if fault in ("500", "503"):
            status = int(fault)
            headers = {"retry-after-ms": str(self.faults.settings.retry_after_ms)} if status == 503 else {}
            return self._json(status, server_error_body(status), headers)
        if fault == "content_filter_prompt":
            return self._json(400, content_filter_prompt_body())
        if fault == "reset":
            self.stats.by_status["reset"] += 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=204)
        # timeout: hold the request; if the client is still there afterwards, answer 408 like a gateway would
        try:
            left = await self._hold(request, self.faults.settings.timeout_s)
        except asyncio.CancelledError:  # servers run with handler_cancellation cancel us when the client leaves
            self.stats.by_status["timeout"] += 1
            raise
        if left or request.transport is None or request.transport.is_closing():
            self.stats.by_status["timeout"] += 1
            return web.Response(status=204)
        return self._json(408, error_body("Request timed out.", "timeout", None, "timeout"))

    # -- admin
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "mode": self.config.mode,
                "model": self.config.model_name,
                "ocr_loaded": self.ocr.loads > 0,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "local"}],
            }
        )

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats.as_json(self.faults.injected), "batch": self.batches.stats.as_json()})

    def quota_state(self) -> dict[str, Any]:
        q = self.quota.limits
        return {"rpm": q.rpm, "tpm": q.tpm, "window_s": q.window_s, "model": q.model}

    def config_state(self) -> dict[str, Any]:
        c = self.config
        return {
            "mode": c.mode,
            "latency_ms": c.latency_ms,
            "jitter_ms": c.jitter_ms,
            "json_schema": c.json_schema,
            "default_max_tokens": c.default_max_tokens,
            "model_name": c.model_name,
        }

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, nesting too deep
            raise RequestError("admin body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError("admin body must be a JSON object")
        return body

    async def admin_faults(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"faults": self.faults.state()})
        try:
            body = await self._admin_body(request)
            self.faults.configure(self._fault_settings(body))
        except (RequestError, FaultSpecError) as exc:
            return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
        return web.json_response({"faults": self.faults.state()})

    async def admin_quota(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"quota": self.quota_state()})
        try:
            body = await self._admin_body(request)
            model = body.get("model")
            if model is not None and (not isinstance(model, str) or len(model) > MAX_ADMIN_STRING):
                raise ValueError(f"model must be a string of at most {MAX_ADMIN_STRING} characters")
            limits = QuotaLimits(
                rpm=bounded_number(body, "rpm", 0, lo=0, hi=MAX_QUOTA, integer=True),
                tpm=bounded_number(body, "tpm", 0, lo=0, hi=MAX_QUOTA, integer=True),
                window_s=bounded_number(body, "window_s", self.config.window_s, lo=0.001, hi=MAX_WINDOW_S),
                model=model,
            )
        except (RequestError, TypeError, ValueError) as exc:
            return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
        self.quota.configure(limits)
        return web.json_response({"quota": self.quota_state()})

    async def admin_quota_timeline(self, _request: web.Request) -> web.Response:
        """Every quota decision since the last reset, oldest first: [seconds, tokens, admitted]."""
        rows = [[round(d.at_s, 3), d.tokens, d.allowed] for d in self.quota.timeline]
        return web.json_response({"timeline": rows, "window_s": self.quota.limits.window_s})

    async def admin_config(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"config": self.config_state()})
        c = self.config
        try:
            body = await self._admin_body(request)
            mode = body.get("mode", c.mode)
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}")
            latency = bounded_number(body, "latency_ms", c.latency_ms, lo=0, hi=MAX_HOLD_S * 1000)
            jitter = bounded_number(body, "jitter_ms", c.jitter_ms, lo=0, hi=MAX_HOLD_S * 1000)
            json_schema = body.get("json_schema", c.json_schema)
            if not isinstance(json_schema, bool):
                raise ValueError("json_schema must be a boolean")
            default_max = bounded_number(
                body, "default_max_tokens", c.default_max_tokens, lo=1, hi=MAX_QUOTA, integer=True
            )
        except (RequestError, TypeError, ValueError) as exc:
            return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
        c.mode, c.latency_ms, c.jitter_ms, c.json_schema, c.default_max_tokens = (
            mode,
            latency,
            jitter,
            json_schema,
            default_max,
        )
        return web.json_response({"config": self.config_state()})

    async def admin_model(self, request: web.Request) -> web.Response:
        """GET or change the model the server plays (local/model_behaviour.py); fields not named stay."""
        if request.method == "POST":
            try:
                self.behaviour = self.behaviour.updated(await self._admin_body(request))
            except (RequestError, TypeError, ValueError) as exc:
                return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
            self.config.model_name = self.behaviour.model_name
        return web.json_response({"model": self.behaviour.state()})

    async def admin_batch(self, request: web.Request) -> web.Response:
        """GET or set the Batch API's turnaround, enqueued-token quota and failing lines (local/model_batch.py)."""
        try:
            body = await self._admin_body(request) if request.method == "POST" else {}
        except RequestError as exc:
            return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
        return await self.batches.admin(request, body)

    async def admin_batch_job(self, request: web.Request) -> web.Response:
        try:
            body = await self._admin_body(request)
        except RequestError as exc:
            return web.json_response(error_body(str(exc), "invalid_request_error"), status=400)
        return await self.batches.admin_job(request, body)

    async def admin_reset(self, request: web.Request) -> web.Response:
        self.behaviour = self.start_behaviour
        self.config.model_name = self.behaviour.model_name
        self.stats = Stats()
        self.faults.injected.clear()
        self.faults.configure(self._fault_settings({}))
        self.quota.reset()
        await self.batches.reset()
        self.release.set()  # let held requests go
        self.release = asyncio.Event()
        return web.json_response({"status": "reset"})


@web.middleware
async def azure_errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Unknown paths and methods answer in Azure's JSON error shape, not aiohttp's text pages."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        return web.json_response(
            {"error": {"code": "405", "message": f"Method {request.method} not allowed"}},
            status=405,
            headers={"Allow": ",".join(exc.allowed_methods)},
        )


SERVER_KEY = web.AppKey("model_server", ModelServer)
PRELOAD_KEY = web.AppKey("ocr_preload", asyncio.Task)


def build_app(config: ModelServerConfig | None = None, *, ocr: OcrEngine | None = None) -> web.Application:
    """The aiohttp application; pass a shared OcrEngine to reuse one loaded model across apps (tests)."""
    config = config or ModelServerConfig()
    server = ModelServer(config, ocr)
    app = web.Application(
        client_max_size=64 * 1024 * 1024, middlewares=[admin_guard(lambda: config.admin_token), azure_errors]
    )
    app[SERVER_KEY] = server
    for prefix in ("/v1", "/openai/v1"):
        app.router.add_post(f"{prefix}/chat/completions", server.chat_completions)
        app.router.add_get(f"{prefix}/models", server.models)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", server.chat_completions)
    add_routes(app, server.batches)
    app.router.add_get("/admin/batch", server.admin_batch)
    app.router.add_post("/admin/batch", server.admin_batch)
    app.router.add_post("/admin/batches/{batch_id}", server.admin_batch_job)
    app.router.add_get("/health", server.health)
    app.router.add_get("/stats", server.stats_view)
    for path, handler in (
        ("/admin/faults", server.admin_faults),
        ("/admin/quota", server.admin_quota),
        ("/admin/config", server.admin_config),
    ):
        app.router.add_get(path, handler)
        app.router.add_post(path, handler)
    app.router.add_post("/admin/reset", server.admin_reset)
    app.router.add_get("/admin/quota/timeline", server.admin_quota_timeline)
    app.router.add_get("/admin/model", server.admin_model)
    app.router.add_post("/admin/model", server.admin_model)

    async def preload(app: web.Application) -> None:
        if config.mode == "ocr":  # load in the background: the port opens at once, the first OCR waits
            app[PRELOAD_KEY] = asyncio.get_running_loop().create_task(server.ocr.aload())

    async def release_held(app: web.Application) -> None:
        server.release.set()

    async def close_ocr(app: web.Application) -> None:
        task = app.get(PRELOAD_KEY)
        if task is not None and not task.done():
            task.cancel()
        if server.owns_ocr:
            server.ocr.close()

    app.on_startup.append(preload)
    app.on_shutdown.append(release_held)
    app.on_cleanup.append(close_ocr)
    return app


def parse_args(argv: list[str] | None = None) -> ModelServerConfig:
    p = argparse.ArgumentParser(prog="python -m local.model_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--mode", choices=MODES, default="ocr", help="facts skips OCR (fast plumbing tests)")
    p.add_argument("--rpm", type=int, default=0, help="requests per window per deployment (0 = off)")
    p.add_argument("--tpm", type=int, default=0, help="tokens per window per deployment (0 = off)")
    p.add_argument("--window-s", type=float, default=60.0, help="quota window length in seconds")
    p.add_argument("--quota-model", default=None, help="apply the quota to this deployment only")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform random latency, 0..N ms")
    p.add_argument("--faults", default="", help='fault rates, e.g. "429:0.05,500:0.05,503:0.03,reset:0.02"')
    p.add_argument("--fault-script", default="", help='faults for the next requests in order, e.g. "500,ok,reset"')
    p.add_argument("--fault-model", default=None, help="inject faults only into requests for this deployment")
    p.add_argument("--fault-timeout-s", type=float, default=120.0, help="how long a `timeout` fault holds a request")
    p.add_argument("--fault-retry-after-ms", type=int, default=200, help="retry-after-ms of injected 429/503")
    p.add_argument(
        "--no-json-schema", action="store_true", help="reject response_format json_schema like an old api-version"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for fault rates and latency jitter")
    p.add_argument("--default-max-tokens", type=int, default=1000, help="TPM charge when a request sets no max_tokens")
    p.add_argument("--model-name", default=MODEL_NAME, help="the `model` it answers with, e.g. gpt-5.4-mini-2026-03-17")
    p.add_argument(
        "--reasoning",
        action="store_true",
        help="reasoning-model parameters: refuse max_tokens and temperature, take max_completion_tokens and "
        "reasoning_effort, report reasoning tokens",
    )
    p.add_argument("--reasoning-efforts", default=",".join(DEFAULT_EFFORTS), help="reasoning_effort values taken")
    p.add_argument("--default-reasoning-effort", default=DEFAULT_EFFORT, help="effort when a request names none")
    p.add_argument("--reasoning-tokens", default="", help='reasoning tokens per effort, e.g. "low:64,high:2000"')
    p.add_argument(
        "--image-tokens", default=DEFAULT_SPEC, help="image token formula: tile:BASE:PER_TILE[:PX] or patch:MULT[:CAP]"
    )
    p.add_argument("--batch-turnaround-s", type=float, default=0.0, help="Batch API: seconds a job stays in_progress")
    p.add_argument("--batch-enqueued-tokens", type=int, default=0, help="Batch API: enqueued-token quota (0 = none)")
    p.add_argument(
        "--batch-fail-fast",
        action="store_true",
        help="Batch API: refuse a create over the quota (400) like newer regions",
    )
    p.add_argument("--deployments", default="", help="known deployment names (others: 404 DeploymentNotFound)")
    p.add_argument(
        "--admin-token-file",
        default=None,
        help=f"write this start's admin token here (the stack uses .local/{ADMIN_TOKEN_FILE}); "
        "without it the token is printed",
    )
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parse_rates(a.faults)
        script = parse_script(a.fault_script)
    except FaultSpecError as exc:
        p.error(str(exc))
    config = ModelServerConfig(
        host=a.host,
        port=a.port,
        mode=a.mode,
        rpm=a.rpm,
        tpm=a.tpm,
        window_s=a.window_s,
        quota_model=a.quota_model,
        latency_ms=a.latency_ms,
        jitter_ms=a.jitter_ms,
        faults=a.faults,
        fault_script=script,
        fault_model=a.fault_model,
        fault_timeout_s=a.fault_timeout_s,
        fault_retry_after_ms=a.fault_retry_after_ms,
        json_schema=not a.no_json_schema,
        seed=a.seed,
        default_max_tokens=a.default_max_tokens,
        model_name=a.model_name,
        reasoning=a.reasoning,
        reasoning_efforts=tuple(a.reasoning_efforts.split(",")),
        default_reasoning_effort=a.default_reasoning_effort,
        reasoning_tokens=a.reasoning_tokens,
        image_tokens=a.image_tokens,
        deployments=parse_deployments(a.deployments),
        admin_token_file=a.admin_token_file,
        batch_turnaround_s=a.batch_turnaround_s,
        batch_enqueued_tokens=a.batch_enqueued_tokens,
        batch_fail_fast=a.batch_fail_fast,
    )
    try:
        behaviour_from(config)
    except ValueError as exc:
        p.error(str(exc))
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    app = build_app(config)
    if config.admin_token_file:  # written before the port opens: whoever waits for /health can read it
        where = f"in {write_token(config.admin_token_file, config.admin_token)}"
    else:
        where = config.admin_token
    print(
        f"local model server ({config.model_name}, mode {config.mode}) on http://{config.host}:{config.port}/v1; "
        f"admin token (Authorization: Bearer ...) {where}",
        flush=True,
    )
    web.run_app(app, host=config.host, port=config.port, print=None, access_log_format='%a "%r" %s %b %Tfs')


if __name__ == "__main__":
    main()
