"""Every span, span attribute, metric and metric attribute name the service emits (issue 14).

One owner for the names, so that the code that emits telemetry, the Azure Monitor workbook and the
alert rules (infra/) cannot drift apart: tests/test_workbook.py checks that every name the workbook
and the alerts query is defined here. Plain constants, no OpenTelemetry import (the cold-start test
imports entry points, which must not pull in the SDK).

The model-call span and the `gen_ai.*` names follow the OpenTelemetry GenAI semantic conventions,
version 1.37.0 (status: Development):
https://github.com/open-telemetry/semantic-conventions/blob/v1.37.0/docs/gen-ai/gen-ai-spans.md
https://github.com/open-telemetry/semantic-conventions/blob/v1.37.0/docs/gen-ai/gen-ai-metrics.md
Our own names live under `vlm.*`.

Where they land in Application Insights (Azure Monitor OpenTelemetry exporter): INTERNAL and CLIENT
spans become rows of `dependencies` (workspace table AppDependencies; INTERNAL ones with type
"InProc"), SERVER spans rows of `requests`; span attributes become `customDimensions` keys, except
keys starting with the exporter's reserved prefixes (`http.`, `db.`, `net.`, `peer.`, ... see
RESERVED_EXPORTER_PREFIXES), which it drops. Metrics become rows of `customMetrics` (AppMetrics)
named by the instrument, their attributes `customDimensions`; a histogram point carries
valueSum/valueCount/valueMin/valueMax, not buckets, so percentiles come from span durations.
Source: azure-monitor-opentelemetry-exporter, export/trace/_exporter.py and
export/metrics/_exporter.py (https://github.com/Azure/azure-sdk-for-python/tree/main/sdk/monitor/azure-monitor-opentelemetry-exporter).
"""

from __future__ import annotations

from dataclasses import dataclass

SEMCONV_VERSION = "1.37.0"
"""The GenAI semantic-conventions version the gen_ai.* names below follow."""

SEMCONV_SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
"""Schema URL to give the tracer and meter, so a backend knows which version the names are."""

INSTRUMENTATION_NAME = "vlm-functions"
"""Name of the tracer and the meter (the instrumentation scope)."""

RESERVED_EXPORTER_PREFIXES = (
    "http.",
    "db.",
    "message.",
    "messaging.",
    "rpc.",
    "enduser.",
    "net.",
    "peer.",
    "exception.",
    "thread.",
    "fass.",
    "code.",
)
"""Attribute prefixes the Azure Monitor trace exporter keeps out of customDimensions; ours avoid them."""

# --------------------------------------------------------------------------- span names

SPAN_ANALYZE = "vlm.analyze"
"""One analysis (HTTP request or blob), parent of the spans below; carries the vlm.* summary.

Kind INTERNAL (a child of the host's request span), so it lands in `dependencies`, where the
workbook reads its duration percentiles."""

SPAN_PREPARE = "vlm.prepare"
"""Sniff, decode, resize and encode the images."""

SPAN_CACHE = "vlm.cache"
"""Cache look-up (memory, then the cache container)."""

SPAN_VALIDATE = "vlm.validate"
"""Parse and validate the model's answer (and the one re-ask)."""

SPAN_POISON = "vlm.poison"
"""Writing the error record of a blob the host gave up on."""

GEN_AI_OPERATION_CHAT = "chat"
"""gen_ai.operation.name value for a chat completions call."""


def model_call_span_name(request_model: str | None) -> str:
    """The model-call span name: `{gen_ai.operation.name} {gen_ai.request.model}` (semconv; kind CLIENT)."""
    return f"{GEN_AI_OPERATION_CHAT} {request_model}" if request_model else GEN_AI_OPERATION_CHAT


# --------------------------------------------------------------------------- gen_ai.* attributes (semconv 1.37.0)

GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
"""Required: "chat"."""

GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
"""Required: PROVIDER_AZURE_OPENAI against Azure, PROVIDER_OPENAI against another OpenAI-compatible URL."""

GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
"""The model asked for (VLM_MODEL, or the deployment name when the model is not known yet)."""

GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
"""The model the service says answered (the answer's `model` field)."""

GEN_AI_RESPONSE_ID = "gen_ai.response.id"
"""The completion id."""

GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
"""Why generation stopped, e.g. ["stop"] or ["length"]."""

GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
"""max_tokens or max_completion_tokens as sent."""

GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
"""Only for "chat"-style models (reasoning models take none)."""

GEN_AI_OUTPUT_TYPE = "gen_ai.output.type"
""""text" or "json" (structured output)."""

GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
"""Prompt tokens the service counted."""

GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
"""Completion tokens the service counted (reasoning tokens included)."""

SERVER_ADDRESS = "server.address"
"""Host name of the model endpoint."""

SERVER_PORT = "server.port"
"""Port of the model endpoint (set with server.address)."""

ERROR_TYPE = "error.type"
"""Low-cardinality error class when the call failed: our error code or the HTTP status."""

PROVIDER_AZURE_OPENAI = "azure.ai.openai"
"""gen_ai.provider.name well-known value for Azure OpenAI."""

PROVIDER_OPENAI = "openai"
"""gen_ai.provider.name well-known value for the OpenAI API (and compatible local servers)."""

# --------------------------------------------------------------------------- vlm.* attributes (spans and metrics)

VLM_TASK = "vlm.task"
"""describe, classify, ocr, invoice, table, schema, compare, sequence."""

VLM_ENTRY = "vlm.entry"
"""Which front door: ENTRY_HTTP or ENTRY_BLOB."""

VLM_DEPLOYMENT = "vlm.deployment"
"""The deployment that answered (or was tried)."""

VLM_MODEL = "vlm.model"
"""The model name the service reported."""

VLM_DETAIL = "vlm.detail"
"""Detail level asked for: low, high or auto."""

VLM_IMAGE_COUNT = "vlm.image.count"
"""Images (pages, frames, strips) sent."""

VLM_CACHED = "vlm.cached"
"""True when the answer came from the cache or an identical request in flight."""

VLM_TOKENS_ESTIMATED_PROMPT = "vlm.tokens.estimated_prompt"
"""Prompt tokens estimated before the call (what the limiter reserved)."""

VLM_TOKENS_ESTIMATED_IMAGE = "vlm.tokens.estimated_image"
"""Image tokens estimated before the call."""

VLM_TOKENS_PROMPT = "vlm.tokens.prompt"
"""Prompt tokens used (sum over model calls, re-ask included)."""

VLM_TOKENS_COMPLETION = "vlm.tokens.completion"
"""Completion tokens used (reasoning tokens included)."""

VLM_TOKENS_REASONING = "vlm.tokens.reasoning"
"""Reasoning tokens used (already inside completion)."""

VLM_COST_USD = "vlm.cost_usd"
"""Estimated cost of the analysis in USD, from the model catalog's prices."""

VLM_LIMITER_WAIT_MS = "vlm.limiter.wait_ms"
"""Time spent waiting for the client-side rate limiter."""

VLM_RETRIES = "vlm.retries"
"""Model-call retries (429s and transient errors) for this analysis."""

VLM_FALLBACK = "vlm.fallback"
"""True when a fallback deployment answered."""

VLM_OUTCOME = "vlm.outcome"
"""OUTCOME_OK or OUTCOME_ERROR."""

VLM_ERROR_CODE = "vlm.error.code"
"""The error code of a failed analysis (shared/errors.py codes, e.g. content_filtered, poison)."""

VLM_TOKEN_KIND = "vlm.token.kind"
"""Metric attribute of VLM_TOKENS_METRIC: one of TOKEN_KINDS."""

VLM_HTTP_STATUS = "vlm.status_code"
"""HTTP status of a model call (a metric attribute of the model-call counter)."""

ENTRY_HTTP = "http"
ENTRY_BLOB = "blob"

OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOMES = (OUTCOME_OK, OUTCOME_ERROR)

TOKEN_KIND_PROMPT = "prompt"
TOKEN_KIND_COMPLETION = "completion"
TOKEN_KIND_REASONING = "reasoning"
TOKEN_KINDS = (TOKEN_KIND_PROMPT, TOKEN_KIND_COMPLETION, TOKEN_KIND_REASONING)

# --------------------------------------------------------------------------- metric names

VLM_REQUESTS_METRIC = "vlm.requests"
"""Counter: analyses, by task, entry and outcome (and error code when failed)."""

VLM_TOKENS_METRIC = "vlm.tokens"
"""Counter: tokens used, by kind (prompt, completion, reasoning), task, deployment and model."""

VLM_COST_METRIC = "vlm.cost"
"""Counter: estimated cost in USD, by task, deployment and model."""

VLM_CACHE_HITS_METRIC = "vlm.cache.hits"
"""Counter: analyses answered from the cache, by task."""

VLM_MODEL_CALLS_METRIC = "vlm.model.calls"
"""Counter: model calls (each retry counts), by deployment and HTTP status; the 429 rate's denominator."""

VLM_THROTTLED_METRIC = "vlm.model.throttled"
"""Counter: model calls answered 429, by deployment."""

VLM_FALLBACKS_METRIC = "vlm.model.fallbacks"
"""Counter: analyses a fallback deployment answered, by the deployment that answered and task."""

VLM_LIMITER_WAIT_METRIC = "vlm.limiter.wait"
"""Histogram (ms): time waited for the client-side rate limiter, by deployment."""

VLM_DURATION_METRIC = "vlm.request.duration"
"""Histogram (ms): end-to-end analysis latency, by task and outcome."""

VLM_POISON_METRIC = "vlm.poison.records"
"""Counter: blobs the host gave up on (poison error records written)."""

GEN_AI_CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"
"""Semconv histogram ({token}): tokens per model call, by gen_ai.token.type."""

GEN_AI_CLIENT_OPERATION_DURATION = "gen_ai.client.operation.duration"
"""Semconv histogram (s): duration of one model call."""

GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
"""Semconv metric attribute: "input" or "output"."""


@dataclass(frozen=True)
class MetricSpec:
    """What one instrument is: its kind, unit and the attributes it is recorded with."""

    name: str
    kind: str  # "counter" or "histogram"
    unit: str
    attributes: tuple[str, ...]
    description: str


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec(
            VLM_REQUESTS_METRIC,
            "counter",
            "{request}",
            (VLM_TASK, VLM_ENTRY, VLM_OUTCOME, VLM_ERROR_CODE),
            "Analyses by task and outcome",
        ),
        MetricSpec(
            VLM_TOKENS_METRIC,
            "counter",
            "{token}",
            (VLM_TOKEN_KIND, VLM_TASK, VLM_DEPLOYMENT, VLM_MODEL),
            "Tokens used, by kind",
        ),
        MetricSpec(VLM_COST_METRIC, "counter", "USD", (VLM_TASK, VLM_DEPLOYMENT, VLM_MODEL), "Estimated cost"),
        MetricSpec(VLM_CACHE_HITS_METRIC, "counter", "{request}", (VLM_TASK, VLM_ENTRY), "Cache hits"),
        MetricSpec(
            VLM_MODEL_CALLS_METRIC,
            "counter",
            "{call}",
            (VLM_DEPLOYMENT, VLM_HTTP_STATUS),
            "Model calls, retries included",
        ),
        MetricSpec(VLM_THROTTLED_METRIC, "counter", "{call}", (VLM_DEPLOYMENT,), "Model calls answered 429"),
        MetricSpec(VLM_FALLBACKS_METRIC, "counter", "{request}", (VLM_DEPLOYMENT, VLM_TASK), "Fallback answers"),
        MetricSpec(VLM_LIMITER_WAIT_METRIC, "histogram", "ms", (VLM_DEPLOYMENT,), "Rate-limiter wait"),
        MetricSpec(VLM_DURATION_METRIC, "histogram", "ms", (VLM_TASK, VLM_ENTRY, VLM_OUTCOME), "Analysis latency"),
        MetricSpec(VLM_POISON_METRIC, "counter", "{record}", (VLM_TASK,), "Poison records written"),
        MetricSpec(
            GEN_AI_CLIENT_TOKEN_USAGE,
            "histogram",
            "{token}",
            (
                GEN_AI_OPERATION_NAME,
                GEN_AI_PROVIDER_NAME,
                GEN_AI_TOKEN_TYPE,
                GEN_AI_REQUEST_MODEL,
                GEN_AI_RESPONSE_MODEL,
            ),
            "Tokens per model call (semconv)",
        ),
        MetricSpec(
            GEN_AI_CLIENT_OPERATION_DURATION,
            "histogram",
            "s",
            (GEN_AI_OPERATION_NAME, GEN_AI_PROVIDER_NAME, GEN_AI_REQUEST_MODEL, GEN_AI_RESPONSE_MODEL, ERROR_TYPE),
            "Model call duration (semconv)",
        ),
    )
}
"""Every metric the code emits, by name."""

_ANALYZE_ATTRIBUTES = (
    VLM_TASK,
    VLM_ENTRY,
    VLM_DEPLOYMENT,
    VLM_MODEL,
    VLM_DETAIL,
    VLM_IMAGE_COUNT,
    VLM_CACHED,
    VLM_TOKENS_ESTIMATED_PROMPT,
    VLM_TOKENS_ESTIMATED_IMAGE,
    VLM_TOKENS_PROMPT,
    VLM_TOKENS_COMPLETION,
    VLM_TOKENS_REASONING,
    VLM_COST_USD,
    VLM_LIMITER_WAIT_MS,
    VLM_RETRIES,
    VLM_FALLBACK,
    VLM_OUTCOME,
    VLM_ERROR_CODE,
)

MODEL_CALL_ATTRIBUTES = (
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_OUTPUT_TYPE,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    SERVER_ADDRESS,
    SERVER_PORT,
    ERROR_TYPE,
    VLM_DEPLOYMENT,
    VLM_TOKENS_REASONING,
    VLM_RETRIES,
)
"""Attributes of the model-call span (its name comes from model_call_span_name)."""

SPAN_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    SPAN_ANALYZE: _ANALYZE_ATTRIBUTES,
    SPAN_PREPARE: (VLM_DETAIL, VLM_IMAGE_COUNT, VLM_TOKENS_ESTIMATED_IMAGE),
    SPAN_CACHE: (VLM_CACHED,),
    SPAN_VALIDATE: (VLM_TASK, VLM_OUTCOME, VLM_ERROR_CODE),
    SPAN_POISON: (VLM_TASK, VLM_ERROR_CODE),
}
"""Attributes of each fixed-name span (the model-call span: MODEL_CALL_ATTRIBUTES)."""

SPAN_NAMES = frozenset(SPAN_ATTRIBUTES)
"""Every fixed span name (the model-call span's name is `chat <model>`)."""

ALL_ATTRIBUTES = frozenset(
    {a for attrs in SPAN_ATTRIBUTES.values() for a in attrs}
    | set(MODEL_CALL_ATTRIBUTES)
    | {a for m in METRICS.values() for a in m.attributes}
)
"""Every attribute name, on spans or metrics."""
