"""OpenTelemetry spans and metrics for every analysis (issue 14): configured once per worker, lazily.

Three ways it runs, chosen by settings on first use (never at import: the cold-start test imports
the entry points, which must pull in neither OpenTelemetry nor the Azure Monitor distro):
- APPLICATIONINSIGHTS_CONNECTION_STRING set (Azure): the Azure Monitor distro
  (`azure-monitor-opentelemetry`), with Entra ingestion through the managed identity that
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING names ("Authorization=AAD;ClientId=...", as
  infra/modules/functionapp.bicep sets it);
- VLM_TELEMETRY_DIR set (`make run`): the SDK's own console exporters writing one JSON object a line
  to `<dir>/spans-<pid>.jsonl` and `<dir>/metrics-<pid>.jsonl`;
- neither: `NullTelemetry`, which does nothing and imports nothing.
Tests install a `Telemetry` over the SDK's in-memory exporters (`install`).

Every name comes from shared/telemetry_names.py (the workbook and alerts query the same names).
The model layer adds to the analysis in progress through a context variable (`AnalysisStats`),
so concurrent calls of one task (sequence) add up into one span.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import telemetry_names as n

if TYPE_CHECKING:
    from .settings import ModelTarget, Settings


@dataclass
class AnalysisStats:
    """What the model layer adds to the analysis in progress: limiter wait, retries, fallback."""

    limiter_wait_ms: float = 0.0
    retries: int = 0
    fallback: bool = False


_ANALYSIS: contextvars.ContextVar[AnalysisStats | None] = contextvars.ContextVar("vlm_analysis", default=None)
_ATTEMPTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("vlm_model_attempts", default=None)
_ENTRY: contextvars.ContextVar[str] = contextvars.ContextVar("vlm_entry", default=n.ENTRY_HTTP)


@contextmanager
def entry(name: str) -> Iterator[None]:
    """Name the front door (ENTRY_BLOB, ENTRY_HTTP) of the analyses run inside this block."""
    token = _ENTRY.set(name)
    try:
        yield
    finally:
        _ENTRY.reset(token)


def note_fallback() -> None:
    """A fallback deployment answered a call of the analysis in progress."""
    stats = _ANALYSIS.get()
    if stats is not None:
        stats.fallback = True


class _NullSpan:
    """Stands in for a span when telemetry is off: accepts everything, keeps nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass


_NULL_SPAN = _NullSpan()


class NullTelemetry:
    """Telemetry switched off: no OpenTelemetry import, no work beyond a function call."""

    enabled = False

    @contextmanager
    def analysis(self, task: str, detail: str, image_count: int, **attributes: Any) -> Iterator[Analysis | None]:
        yield None

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        yield _NULL_SPAN

    @contextmanager
    def model_call(self, target: ModelTarget, kwargs: dict[str, Any]) -> Iterator[ModelCall | None]:
        yield None

    def limiter_wait(self, deployment: str, wait_ms: float) -> None:
        pass

    def http_hook(self, deployment: str) -> Callable[[Any], Awaitable[None]] | None:
        return None

    def poison(self, task: str | None) -> None:
        pass

    def shutdown(self) -> None:
        pass


class Telemetry:
    """A tracer and the instruments of telemetry_names.METRICS over given SDK/distro providers."""

    enabled = True

    def __init__(self, tracer_provider: Any, meter_provider: Any, owned: bool = False) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._trace = trace
        self._kind_client = SpanKind.CLIENT
        self._kind_internal = SpanKind.INTERNAL
        self._error_status = Status(StatusCode.ERROR)
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._owned = owned  # providers made here (local files): flushed and shut down by `shutdown`
        self.tracer = tracer_provider.get_tracer(n.INSTRUMENTATION_NAME, schema_url=n.SEMCONV_SCHEMA_URL)
        meter = meter_provider.get_meter(n.INSTRUMENTATION_NAME, schema_url=n.SEMCONV_SCHEMA_URL)
        self.instruments: dict[str, Any] = {}
        for spec in n.METRICS.values():
            make = meter.create_counter if spec.kind == "counter" else meter.create_histogram
            self.instruments[spec.name] = make(spec.name, unit=spec.unit, description=spec.description)

    def _add(self, name: str, value: float, attributes: dict[str, Any]) -> None:
        self.instruments[name].add(value, {k: v for k, v in attributes.items() if v is not None})

    def _record(self, name: str, value: float, attributes: dict[str, Any]) -> None:
        self.instruments[name].record(value, {k: v for k, v in attributes.items() if v is not None})

    # --- one analysis ------------------------------------------------------------------

    @contextmanager
    def analysis(self, task: str, detail: str, image_count: int, **attributes: Any) -> Iterator[Analysis]:
        """The vlm.analyze span around one analysis, and its metrics when it ends (ok or error).

        `attributes`: known up front (the primary's deployment and model), overwritten by `finish`."""
        stats = AnalysisStats()
        token = _ANALYSIS.set(stats)
        started = time.perf_counter()
        where = {n.VLM_TASK: task, n.VLM_ENTRY: _ENTRY.get()}
        span_cm = self.tracer.start_as_current_span(
            n.SPAN_ANALYZE, kind=self._kind_internal, record_exception=False, set_status_on_exception=False
        )
        span = span_cm.__enter__()
        span.set_attributes({**attributes, **where, n.VLM_DETAIL: detail, n.VLM_IMAGE_COUNT: image_count})
        analysis = Analysis(span, stats)
        outcome, code = n.OUTCOME_OK, None
        try:
            yield analysis
        except BaseException as exc:
            outcome, code = n.OUTCOME_ERROR, _error_code(exc)
            span.set_status(self._error_status)
            raise
        finally:
            _ANALYSIS.reset(token)
            span.set_attributes(
                {
                    n.VLM_OUTCOME: outcome,
                    n.VLM_LIMITER_WAIT_MS: round(stats.limiter_wait_ms, 3),
                    n.VLM_RETRIES: stats.retries,
                    n.VLM_FALLBACK: stats.fallback,
                }
            )
            if code is not None:
                span.set_attribute(n.VLM_ERROR_CODE, code)
            span_cm.__exit__(None, None, None)
            self._analysis_metrics(analysis, where, outcome, code, (time.perf_counter() - started) * 1000)

    def _analysis_metrics(
        self, analysis: Analysis, where: dict[str, Any], outcome: str, code: str | None, ms: float
    ) -> None:
        self._add(n.VLM_REQUESTS_METRIC, 1, {**where, n.VLM_OUTCOME: outcome, n.VLM_ERROR_CODE: code})
        self._record(n.VLM_DURATION_METRIC, ms, {**where, n.VLM_OUTCOME: outcome})
        result = analysis.result
        if result is None:
            return
        if result.cached:
            self._add(n.VLM_CACHE_HITS_METRIC, 1, where)
            return
        who = {n.VLM_TASK: where[n.VLM_TASK], n.VLM_DEPLOYMENT: result.deployment, n.VLM_MODEL: result.model}
        usage = result.usage
        for kind, count in (
            (n.TOKEN_KIND_PROMPT, usage.prompt_tokens),
            (n.TOKEN_KIND_COMPLETION, usage.completion_tokens),
            (n.TOKEN_KIND_REASONING, usage.reasoning_tokens),
        ):
            self._add(n.VLM_TOKENS_METRIC, count, {**who, n.VLM_TOKEN_KIND: kind})
        if result.cost_usd is not None:
            self._add(n.VLM_COST_METRIC, result.cost_usd, who)
        if analysis.stats.fallback:
            self._add(n.VLM_FALLBACKS_METRIC, 1, {n.VLM_DEPLOYMENT: result.deployment, n.VLM_TASK: where[n.VLM_TASK]})

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A child span (prepare, cache, validate, poison) of whatever span is current."""
        with self.tracer.start_as_current_span(name, kind=self._kind_internal, record_exception=False) as span:
            if attributes:
                span.set_attributes(attributes)
            yield span

    # --- model calls -------------------------------------------------------------------

    @contextmanager
    def model_call(self, target: ModelTarget, kwargs: dict[str, Any]) -> Iterator[ModelCall]:
        """The GenAI semconv CLIENT span around one chat completion (the SDK's retries inside it)."""
        request_model = target.model or target.deployment
        provider = n.PROVIDER_AZURE_OPENAI if target.is_azure else n.PROVIDER_OPENAI
        url = urlsplit(target.endpoint)
        attrs: dict[str, Any] = {
            n.GEN_AI_OPERATION_NAME: n.GEN_AI_OPERATION_CHAT,
            n.GEN_AI_PROVIDER_NAME: provider,
            n.GEN_AI_REQUEST_MODEL: request_model,
            n.GEN_AI_OUTPUT_TYPE: "json" if kwargs.get("response_format") else "text",
            n.VLM_DEPLOYMENT: target.deployment,
        }
        budget = kwargs.get("max_tokens") or kwargs.get("max_completion_tokens")
        if budget is not None:
            attrs[n.GEN_AI_REQUEST_MAX_TOKENS] = budget
        if "temperature" in kwargs:
            attrs[n.GEN_AI_REQUEST_TEMPERATURE] = kwargs["temperature"]
        if url.hostname:
            attrs[n.SERVER_ADDRESS] = url.hostname
            attrs[n.SERVER_PORT] = url.port or (443 if url.scheme == "https" else 80)
        attempts: list[int] = [0]
        token = _ATTEMPTS.set(attempts)
        call = ModelCall()
        started = time.perf_counter()
        error: str | None = None
        with self.tracer.start_as_current_span(
            n.model_call_span_name(request_model),
            kind=self._kind_client,
            attributes=attrs,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield call
            except BaseException as exc:
                error = _error_code(exc)
                span.set_attribute(n.ERROR_TYPE, error)
                span.set_status(self._error_status)
                raise
            finally:
                _ATTEMPTS.reset(token)
                retries = max(0, attempts[0] - 1)
                span.set_attribute(n.VLM_RETRIES, retries)
                stats = _ANALYSIS.get()
                if stats is not None:
                    stats.retries += retries
                response_model = call.set_on(span)
                common = {
                    n.GEN_AI_OPERATION_NAME: n.GEN_AI_OPERATION_CHAT,
                    n.GEN_AI_PROVIDER_NAME: provider,
                    n.GEN_AI_REQUEST_MODEL: request_model,
                    n.GEN_AI_RESPONSE_MODEL: response_model,
                }
                self._record(
                    n.GEN_AI_CLIENT_OPERATION_DURATION, time.perf_counter() - started, {**common, n.ERROR_TYPE: error}
                )
                if call.input_tokens is not None:
                    self._record(
                        n.GEN_AI_CLIENT_TOKEN_USAGE, call.input_tokens, {**common, n.GEN_AI_TOKEN_TYPE: "input"}
                    )
                if call.output_tokens is not None:
                    self._record(
                        n.GEN_AI_CLIENT_TOKEN_USAGE, call.output_tokens, {**common, n.GEN_AI_TOKEN_TYPE: "output"}
                    )

    def limiter_wait(self, deployment: str, wait_ms: float) -> None:
        """Time one call waited for the client-side rate limiter."""
        stats = _ANALYSIS.get()
        if stats is not None:
            stats.limiter_wait_ms += wait_ms
        self._record(n.VLM_LIMITER_WAIT_METRIC, wait_ms, {n.VLM_DEPLOYMENT: deployment})

    def http_hook(self, deployment: str) -> Callable[[Any], Awaitable[None]]:
        """An httpx response hook: every HTTP attempt, the SDK's retried 429s included, is counted."""
        calls = self.instruments[n.VLM_MODEL_CALLS_METRIC]
        throttled = self.instruments[n.VLM_THROTTLED_METRIC]

        async def on_response(response: Any) -> None:
            status = int(getattr(response, "status_code", 0) or 0)
            attempts = _ATTEMPTS.get()
            if attempts is not None:
                attempts[0] += 1
            calls.add(1, {n.VLM_DEPLOYMENT: deployment, n.VLM_HTTP_STATUS: status})
            if status == 429:
                throttled.add(1, {n.VLM_DEPLOYMENT: deployment})

        return on_response

    def poison(self, task: str | None) -> None:
        """A blob the host gave up on got its error record."""
        self._add(n.VLM_POISON_METRIC, 1, {n.VLM_TASK: task or "unknown"})

    def flush(self) -> None:
        """Export every finished span now (benches: the export's cost counted with the requests)."""
        self._tracer_provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop providers made here (tests, local files); the distro's stay with the process."""
        if self._owned:
            self._tracer_provider.shutdown()
            self._meter_provider.shutdown()


class Analysis:
    """The analysis in progress: its span and what the model layer added."""

    def __init__(self, span: Any, stats: AnalysisStats) -> None:
        self.span = span
        self.stats = stats
        self.result: Any = None

    def finish(self, result: Any) -> None:
        """The summary attributes of an answered analysis (an `AnalysisResult`)."""
        self.result = result
        usage = result.usage
        attrs = {
            n.VLM_DEPLOYMENT: result.deployment,
            n.VLM_MODEL: result.model,
            n.VLM_CACHED: result.cached,
            n.VLM_TOKENS_ESTIMATED_PROMPT: usage.estimated_prompt_tokens,
            n.VLM_TOKENS_ESTIMATED_IMAGE: usage.estimated_image_tokens,
            n.VLM_TOKENS_PROMPT: usage.prompt_tokens,
            n.VLM_TOKENS_COMPLETION: usage.completion_tokens,
            n.VLM_TOKENS_REASONING: usage.reasoning_tokens,
            n.VLM_IMAGE_COUNT: len(result.images),
        }
        if result.cost_usd is not None:
            attrs[n.VLM_COST_USD] = result.cost_usd
        self.span.set_attributes(attrs)


@dataclass
class ModelCall:
    """What the model-call span learns from the answer (set by the router after the call)."""

    response_model: str | None = None
    response_id: str | None = None
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None

    def set_on(self, span: Any) -> str | None:
        for key, value in (
            (n.GEN_AI_RESPONSE_MODEL, self.response_model),
            (n.GEN_AI_RESPONSE_ID, self.response_id),
            (n.GEN_AI_USAGE_INPUT_TOKENS, self.input_tokens),
            (n.GEN_AI_USAGE_OUTPUT_TOKENS, self.output_tokens),
            (n.VLM_TOKENS_REASONING, self.reasoning_tokens),
        ):
            if value is not None:
                span.set_attribute(key, value)
        if self.finish_reason is not None:
            span.set_attribute(n.GEN_AI_RESPONSE_FINISH_REASONS, [self.finish_reason])
        return self.response_model


def _error_code(exc: BaseException) -> str:
    """Low-cardinality: our error code, else the exception's class name (never its message)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code else type(exc).__name__


# --------------------------------------------------------------------------- the worker's instance

_INSTANCE: Telemetry | NullTelemetry | None = None
_LOCK = threading.Lock()
NULL = NullTelemetry()


def current(settings: Settings | None = None) -> Telemetry | NullTelemetry:
    """The worker's telemetry, configured from `settings` on first use (None: what is there, or off)."""
    global _INSTANCE
    if _INSTANCE is None:
        if settings is None:
            return NULL
        with _LOCK:
            if _INSTANCE is None:
                _INSTANCE = configure(settings)
    return _INSTANCE


def install(telemetry: Telemetry | NullTelemetry | None) -> None:
    """Replace the worker's telemetry (tests, benches); None: configure from settings again on next use."""
    global _INSTANCE
    _INSTANCE = telemetry


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span through the worker's telemetry (modules that hold no settings: tasks)."""
    with current().span(name, **attributes) as s:
        yield s


def configure(settings: Settings) -> Telemetry | NullTelemetry:
    """Azure Monitor when a connection string is set, local JSONL files when VLM_TELEMETRY_DIR is, else off."""
    if settings.applicationinsights_connection_string:
        return _azure_monitor(settings)
    if settings.telemetry_dir:
        return local_files(settings.telemetry_dir, settings.telemetry_export_interval_ms)
    return NULL


def _azure_monitor(settings: Settings) -> Telemetry:
    """The distro, with Entra ingestion through the identity the authentication string names.

    The exporter would read APPLICATIONINSIGHTS_AUTHENTICATION_STRING from the environment itself;
    settings.py reads it instead and passes a credential: only settings.py reads the environment.
    The Functions host already ships our log records: the distro's log export stays off.
    https://learn.microsoft.com/azure/azure-monitor/app/azure-ad-authentication (Python: credential=)
    """
    from azure.monitor.opentelemetry import configure_azure_monitor
    from opentelemetry import metrics, trace

    auth = _parse_auth(settings.applicationinsights_authentication_string)
    kwargs: dict[str, Any] = {}
    if auth.get("authorization", "").upper() == "AAD":
        from azure.identity import ManagedIdentityCredential

        kwargs["credential"] = ManagedIdentityCredential(client_id=auth.get("clientid") or settings.azure_client_id)
    configure_azure_monitor(
        connection_string=settings.applicationinsights_connection_string,
        disable_logging=True,
        **kwargs,
    )
    return Telemetry(trace.get_tracer_provider(), metrics.get_meter_provider())


def _parse_auth(value: str | None) -> dict[str, str]:
    """'Authorization=AAD;ClientId=x' -> {'authorization': 'AAD', 'clientid': 'x'}."""
    pairs = (part.split("=", 1) for part in (value or "").split(";") if "=" in part)
    return {k.strip().lower(): v.strip() for k, v in pairs}


def local_files(directory: str, export_interval_ms: int = 10_000, span_queue: int = 2048) -> Telemetry:
    """SDK providers whose console exporters write JSON lines to `directory` (one file per process).

    `span_queue`: finished spans held for the exporter (the SDK's default 2048; past it, spans are dropped)."""
    import os
    from pathlib import Path

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    spans_out = open(folder / f"spans-{pid}.jsonl", "a", encoding="utf-8", buffering=1)
    metrics_out = open(folder / f"metrics-{pid}.jsonl", "a", encoding="utf-8", buffering=1)
    resource = Resource.create({"service.name": n.INSTRUMENTATION_NAME})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(
            ConsoleSpanExporter(out=spans_out, formatter=lambda s: s.to_json(indent=None) + "\n"),
            schedule_delay_millis=1000,
            max_queue_size=span_queue,
        )
    )
    reader = PeriodicExportingMetricReader(
        ConsoleMetricExporter(out=metrics_out, formatter=lambda m: m.to_json(indent=None) + "\n"),
        export_interval_millis=export_interval_ms,
    )
    return Telemetry(tracer_provider, MeterProvider(resource=resource, metric_readers=[reader]), owned=True)
