"""Spans and metrics of an analysis (issue 14), read back through the OpenTelemetry SDK's in-memory exporters."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from PIL import Image

from shared import telemetry
from shared import telemetry_names as n
from shared.app import App
from shared.blob_job import BlobProcessor
from shared.cache import MemoryLRU, ResultCache
from shared.errors import ContentFiltered, UpstreamThrottled
from shared.model import ModelRouter
from shared.pipeline import AnalysisRequest, analyze
from shared.settings import Settings
from tests.blob_fakes import FakeBlobService
from tests.constants import TEST_DEPLOYMENT, TEST_MODEL, TEST_MODEL_VERSION
from tests.fakes import Reply, ScriptedModel, completion

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_MODEL": TEST_MODEL,
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}
THROTTLED = Reply(429, {"error": {"code": "429", "message": "slow down"}}, {"retry-after-ms": "1"})


@dataclass
class Captured:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def named(self, name: str) -> list[Any]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def one(self, name: str) -> Any:
        found = self.named(name)
        assert len(found) == 1, [s.name for s in self.spans.get_finished_spans()]
        return found[0]

    def points(self, metric: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        return [
            p
            for rm in (data.resource_metrics if data else [])
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == metric
            for p in m.data.data_points
        ]

    def total(self, metric: str, **attrs: Any) -> float:
        """Sum of a counter's points (a histogram's counts) whose attributes include `attrs`."""
        wanted = {k.replace("__", "."): v for k, v in attrs.items()}
        return sum(
            getattr(p, "value", None) if hasattr(p, "value") else p.count
            for p in self.points(metric)
            if all(p.attributes.get(k) == v for k, v in wanted.items())
        )


@pytest.fixture
def otel() -> Iterator[Captured]:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    tel = telemetry.Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]), owned=True)
    telemetry.install(tel)
    yield Captured(spans, reader)
    telemetry.install(None)
    tel.shutdown()


def jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), colour).save(buf, "JPEG")
    return buf.getvalue()


def deps_for(scripted: ScriptedModel, max_retries: int = 0, **env: str) -> App:
    settings = Settings.from_env({**ENV, **env})
    model = ModelRouter(settings, client_factory=scripted.client_factory(max_retries=max_retries))
    return App.build(settings, model=model, cache=ResultCache(MemoryLRU(16)))


async def test_a_cache_hit_is_one_span_tree_without_a_model_call_and_counts_as_a_hit(otel: Captured) -> None:
    deps = deps_for(ScriptedModel())
    req = AnalysisRequest(images=[jpeg()], task="describe")
    await analyze(req, deps)
    otel.spans.clear()
    result = await analyze(req, deps)
    assert result.cached
    root = otel.one(n.SPAN_ANALYZE)
    assert root.kind == SpanKind.INTERNAL
    attrs = root.attributes
    assert attrs[n.VLM_CACHED] is True and attrs[n.VLM_OUTCOME] == n.OUTCOME_OK
    assert attrs[n.VLM_TASK] == "describe" and attrs[n.VLM_ENTRY] == n.ENTRY_HTTP
    assert attrs[n.VLM_TOKENS_PROMPT] == 0 and attrs[n.VLM_COST_USD] == 0.0
    assert attrs[n.VLM_DEPLOYMENT] == TEST_DEPLOYMENT and attrs[n.VLM_IMAGE_COUNT] == 1
    cache = otel.one(n.SPAN_CACHE)
    assert cache.attributes[n.VLM_CACHED] is True and cache.parent.span_id == root.context.span_id
    assert otel.named(n.model_call_span_name(TEST_MODEL)) == []  # nothing was sent
    assert otel.total(n.VLM_CACHE_HITS_METRIC, vlm__task="describe") == 1
    assert otel.total(n.VLM_REQUESTS_METRIC, vlm__outcome=n.OUTCOME_OK) == 2
    assert otel.total(n.VLM_DURATION_METRIC, vlm__task="describe") == 2


async def test_an_answered_analysis_has_prepare_cache_and_a_semconv_model_call_span(otel: Captured) -> None:
    scripted = ScriptedModel(default=lambda body: Reply(body=completion({"a": "x"})))
    deps = deps_for(scripted)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    result = await analyze(AnalysisRequest(images=[jpeg()], task="schema", schema=schema), deps)
    root = otel.one(n.SPAN_ANALYZE)
    children = {
        s.name: s for s in otel.spans.get_finished_spans() if s.parent and s.parent.span_id == root.context.span_id
    }
    call_name = n.model_call_span_name(TEST_MODEL)
    assert {n.SPAN_PREPARE, n.SPAN_CACHE, call_name, n.SPAN_VALIDATE} <= set(children)
    assert children[n.SPAN_VALIDATE].attributes[n.VLM_OUTCOME] == n.OUTCOME_OK
    assert children[n.SPAN_PREPARE].attributes[n.VLM_IMAGE_COUNT] == 1
    call = children[call_name]
    assert call.kind == SpanKind.CLIENT
    assert call.attributes[n.GEN_AI_OPERATION_NAME] == "chat"
    assert call.attributes[n.GEN_AI_PROVIDER_NAME] == n.PROVIDER_OPENAI
    assert call.attributes[n.GEN_AI_REQUEST_MODEL] == TEST_MODEL
    assert call.attributes[n.GEN_AI_RESPONSE_MODEL] == TEST_MODEL_VERSION
    assert call.attributes[n.GEN_AI_USAGE_INPUT_TOKENS] == 100 and call.attributes[n.GEN_AI_USAGE_OUTPUT_TOKENS] == 10
    assert tuple(call.attributes[n.GEN_AI_RESPONSE_FINISH_REASONS]) == ("stop",)
    assert call.attributes[n.GEN_AI_OUTPUT_TYPE] == "json" and call.attributes[n.SERVER_ADDRESS] == "model.test"
    assert root.attributes[n.VLM_TOKENS_PROMPT] == result.usage.prompt_tokens == 100
    assert root.attributes[n.VLM_TOKENS_ESTIMATED_PROMPT] == result.usage.estimated_prompt_tokens > 0
    assert root.attributes[n.VLM_CACHED] is False and root.attributes[n.VLM_FALLBACK] is False
    assert otel.total(n.VLM_TOKENS_METRIC, vlm__token__kind="prompt") == 100
    assert otel.total(n.VLM_TOKENS_METRIC, vlm__token__kind="completion") == 10
    assert otel.total(n.GEN_AI_CLIENT_TOKEN_USAGE, gen_ai__token__type="input") == 1
    assert otel.total(n.VLM_CACHE_HITS_METRIC) == 0


async def test_a_fallback_answer_is_marked_on_the_span_and_counted(otel: Captured) -> None:
    scripted = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(503, {"error": {"message": "down"}})]})
    deps = deps_for(scripted, VLM_FALLBACK_DEPLOYMENTS="backup")
    await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    root = otel.one(n.SPAN_ANALYZE)
    assert root.attributes[n.VLM_FALLBACK] is True and root.attributes[n.VLM_DEPLOYMENT] == "backup"
    calls = sorted(otel.named(f"chat {TEST_MODEL}") + otel.named("chat backup"), key=lambda s: s.start_time)
    assert [c.attributes[n.VLM_DEPLOYMENT] for c in calls] == [TEST_DEPLOYMENT, "backup"]
    assert calls[0].attributes[n.ERROR_TYPE] == "upstream_unavailable" and n.ERROR_TYPE not in calls[1].attributes
    assert otel.total(n.VLM_FALLBACKS_METRIC, vlm__deployment="backup", vlm__task="describe") == 1
    assert otel.total(n.VLM_MODEL_CALLS_METRIC, vlm__deployment=TEST_DEPLOYMENT, vlm__status_code=503) == 1


async def test_a_429_the_sdk_retried_counts_as_a_retry_and_a_throttled_call(otel: Captured) -> None:
    ok = Reply(body=completion("fine"))
    deps = deps_for(ScriptedModel(script={TEST_DEPLOYMENT: [THROTTLED, ok]}), max_retries=1)
    result = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    assert result.result == "fine"
    root, call = otel.one(n.SPAN_ANALYZE), otel.one(f"chat {TEST_MODEL}")
    assert call.attributes[n.VLM_RETRIES] == 1 and root.attributes[n.VLM_RETRIES] == 1
    assert root.attributes[n.VLM_OUTCOME] == n.OUTCOME_OK and root.attributes[n.VLM_FALLBACK] is False
    assert otel.total(n.VLM_THROTTLED_METRIC, vlm__deployment=TEST_DEPLOYMENT) == 1
    assert otel.total(n.VLM_MODEL_CALLS_METRIC, vlm__status_code=429) == 1
    assert otel.total(n.VLM_MODEL_CALLS_METRIC, vlm__status_code=200) == 1
    assert otel.total(n.VLM_LIMITER_WAIT_METRIC, vlm__deployment=TEST_DEPLOYMENT) == 1


async def test_a_429_that_never_cleared_is_an_error_outcome_with_its_code(otel: Captured) -> None:
    deps = deps_for(ScriptedModel(script={TEST_DEPLOYMENT: [THROTTLED]}), max_retries=1)
    with pytest.raises(UpstreamThrottled):
        await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    root = otel.one(n.SPAN_ANALYZE)
    assert root.attributes[n.VLM_ERROR_CODE] == "upstream_throttled" and root.attributes[n.VLM_RETRIES] == 1
    assert root.attributes[n.VLM_DEPLOYMENT] == TEST_DEPLOYMENT and root.attributes[n.VLM_MODEL] == TEST_MODEL
    assert otel.total(n.VLM_THROTTLED_METRIC) == 2
    assert otel.total(n.VLM_REQUESTS_METRIC, vlm__outcome=n.OUTCOME_ERROR, vlm__error__code="upstream_throttled") == 1


@pytest.mark.parametrize("stage", ["prompt", "completion"])
async def test_a_content_filter_is_an_error_outcome_on_the_span_and_the_request_counter(
    otel: Captured, stage: str
) -> None:
    if stage == "prompt":
        reply = Reply(400, {"error": {"code": "content_filter", "message": "filtered", "param": "prompt"}})
    else:
        reply = Reply(body=completion(None, finish_reason="content_filter"))
    deps = deps_for(ScriptedModel(script={TEST_DEPLOYMENT: [reply]}))
    with pytest.raises(ContentFiltered):
        await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    root = otel.one(n.SPAN_ANALYZE)
    assert root.attributes[n.VLM_OUTCOME] == n.OUTCOME_ERROR
    assert root.attributes[n.VLM_ERROR_CODE] == "content_filtered"
    assert not root.status.is_ok
    call = otel.one(f"chat {TEST_MODEL}")
    # a prompt filter fails the call itself; a completion filter is a finished call with that finish reason
    if stage == "prompt":
        assert call.attributes[n.ERROR_TYPE] == "content_filtered"
    else:
        assert tuple(call.attributes[n.GEN_AI_RESPONSE_FINISH_REASONS]) == ("content_filter",)
    assert otel.total(n.VLM_REQUESTS_METRIC, vlm__outcome=n.OUTCOME_ERROR, vlm__error__code="content_filtered") == 1
    assert otel.total(n.VLM_DURATION_METRIC, vlm__outcome=n.OUTCOME_ERROR) == 1


async def test_a_blob_that_ended_as_poison_has_a_poison_span_and_is_counted(otel: Captured) -> None:
    blobs = FakeBlobService()
    blobs.put("images", "scans/a.jpg", jpeg())
    blobs.put(
        "cache",
        "attempts/scans/a.jpg.json",
        json.dumps(
            {"failures": 5, "task": "ocr", "last_error": {"code": "upstream_timeout", "message": "slow"}}
        ).encode(),
    )
    settings = Settings.from_env(ENV)
    deps = App.build(settings, model=ModelRouter(settings), cache=ResultCache(MemoryLRU(4)), blobs=blobs)
    record = await BlobProcessor(deps).record_poison("scans/a.jpg", None)
    assert record["error"]["code"] == "poison"
    span = otel.one(n.SPAN_POISON)
    assert span.attributes[n.VLM_TASK] == record["task"] == "ocr" and span.attributes[n.VLM_ERROR_CODE] == "poison"
    assert otel.total(n.VLM_POISON_METRIC, vlm__task="ocr") == 1


async def test_an_analysis_from_the_blob_path_is_tagged_blob(otel: Captured) -> None:
    blobs = FakeBlobService()
    settings = Settings.from_env(ENV)
    scripted = ScriptedModel()
    model = ModelRouter(settings, client_factory=scripted.client_factory())
    deps = App.build(settings, model=model, cache=ResultCache(MemoryLRU(4)), blobs=blobs)
    outcome = await BlobProcessor(deps).process("in/b.jpg", jpeg(), '"e"', {})
    assert outcome.status == "succeeded"
    assert otel.one(n.SPAN_ANALYZE).attributes[n.VLM_ENTRY] == n.ENTRY_BLOB
    assert otel.total(n.VLM_REQUESTS_METRIC, vlm__entry=n.ENTRY_BLOB) == 1


async def test_every_span_and_metric_emitted_uses_only_the_declared_names(otel: Captured) -> None:
    """The workbook's test checks it queries only declared names; this checks the code emits only those."""
    scripted = ScriptedModel(
        script={TEST_DEPLOYMENT: [THROTTLED, Reply(503, {"error": {"message": "down"}})]},
        default=lambda body: Reply(body=completion({"a": "x"})),
    )
    deps = deps_for(scripted, max_retries=1, VLM_FALLBACK_DEPLOYMENTS="backup")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    req = AnalysisRequest(images=[jpeg()], task="schema", schema=schema)
    await analyze(req, deps)
    await analyze(req, deps)  # and a cache hit
    spans = otel.spans.get_finished_spans()
    assert {s.name for s in spans} >= {n.SPAN_ANALYZE, n.SPAN_PREPARE, n.SPAN_CACHE, n.SPAN_VALIDATE, "chat backup"}
    for span in spans:
        declared = n.SPAN_ATTRIBUTES.get(span.name) or (
            n.MODEL_CALL_ATTRIBUTES if span.name.startswith(n.GEN_AI_OPERATION_CHAT + " ") else ()
        )
        assert set(span.attributes) <= set(declared), (span.name, set(span.attributes) - set(declared))
    emitted = {
        m.name: m
        for rm in otel.metrics.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert set(emitted) <= set(n.METRICS)
    for name, metric in emitted.items():
        for point in metric.data.data_points:
            assert set(point.attributes) <= set(n.METRICS[name].attributes), (name, dict(point.attributes))


@pytest.mark.subprocess  # a fresh interpreter, so imports are measured from zero
def test_without_a_connection_string_or_a_folder_telemetry_is_off_and_imports_nothing() -> None:
    code = (
        "import sys\n"
        "from shared import telemetry\n"
        "from shared.settings import Settings\n"
        "t = telemetry.configure(Settings.from_env({'VLM_ENDPOINT': 'http://x/v1', 'VlmStorage': 'x', 'VLM_DEPLOYMENT': 'd'}))\n"
        "print(t.enabled, 'opentelemetry' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False", out.stderr


async def test_the_local_folder_gets_json_lines_from_the_sdk_exporters(tmp_path: Path) -> None:
    tel = telemetry.local_files(str(tmp_path), export_interval_ms=60_000)
    telemetry.install(tel)
    try:
        await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps_for(ScriptedModel()))
    finally:
        telemetry.install(None)
        tel.shutdown()  # flushes the batch processor and takes a last metric reading
    spans = jsonl(tmp_path, "spans-*.jsonl")
    by_name = {s["name"]: s for s in spans}
    root = by_name[n.SPAN_ANALYZE]
    assert root["attributes"][n.VLM_TASK] == "describe"
    assert {s["parent_id"] for s in spans if s["name"] != n.SPAN_ANALYZE} == {root["context"]["span_id"]}
    metric_lines = jsonl(tmp_path, "metrics-*.jsonl")
    names = {
        m["name"]
        for line in metric_lines
        for rm in line["resource_metrics"]
        for sm in rm["scope_metrics"]
        for m in sm["metrics"]
    }
    assert {n.VLM_REQUESTS_METRIC, n.VLM_TOKENS_METRIC, n.VLM_DURATION_METRIC} <= names


def jsonl(folder: Path, pattern: str) -> list[dict[str, Any]]:
    """Every JSON line of the files matching `pattern` (each line must parse on its own)."""
    return [json.loads(line) for f in sorted(folder.glob(pattern)) for line in f.read_text().splitlines()]


def blob_analyses(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """trace id -> the spans of that trace, for every blob-path vlm.analyze span in the local files."""
    spans = jsonl(folder, "spans-*.jsonl") if folder.exists() else []
    roots = {
        s["context"]["trace_id"]
        for s in spans
        if s["name"] == n.SPAN_ANALYZE and s["attributes"].get(n.VLM_ENTRY) == n.ENTRY_BLOB
    }
    return {t: [s for s in spans if s["context"]["trace_id"] == t] for t in roots}


@pytest.mark.integration
def test_a_folder_drop_under_the_local_stack_leaves_one_span_tree_per_file(stack, tmp_path: Path) -> None:
    """The acceptance check as a new user makes it: `make run`, drop a folder, look in .local/telemetry."""
    import time

    from tests.test_blob_integration import drop_folder, wait_for

    folder = tmp_path / "drop"
    folder.mkdir()
    for i, colour in enumerate([(250, 250, 250), (20, 120, 220), (240, 200, 10)]):
        (folder / f"page{i}.jpg").write_bytes(jpeg(colour))
    telemetry_dir = stack.config.data_dir / "telemetry"
    before = set(blob_analyses(telemetry_dir))
    names = drop_folder(stack, folder, "telemetry-check/")
    wait_for(stack, names, "telemetry-check/", timeout_s=120)
    deadline = time.monotonic() + 30  # the batch span processor writes every second
    while len(new := {t: s for t, s in blob_analyses(telemetry_dir).items() if t not in before}) < len(names):
        assert time.monotonic() < deadline, f"{len(new)} span trees for {len(names)} files"
        time.sleep(0.5)
    assert len(new) == len(names)
    for spans in new.values():
        root = next(s for s in spans if s["name"] == n.SPAN_ANALYZE)
        attrs = root["attributes"]
        assert attrs[n.VLM_OUTCOME] == n.OUTCOME_OK and attrs[n.VLM_TASK] and attrs[n.VLM_DEPLOYMENT]
        for key in (n.VLM_MODEL, n.VLM_CACHED, n.VLM_TOKENS_PROMPT, n.VLM_COST_USD, n.VLM_RETRIES, n.VLM_FALLBACK):
            assert key in attrs, key
        children = {s["name"] for s in spans if s["parent_id"] == root["context"]["span_id"]}
        assert n.SPAN_CACHE in children
        if not attrs[n.VLM_CACHED]:
            assert n.SPAN_PREPARE in children and any(c.startswith(n.GEN_AI_OPERATION_CHAT) for c in children)


def test_a_connection_string_configures_the_distro_with_the_managed_identity_it_names(monkeypatch) -> None:
    import azure.monitor.opentelemetry as distro
    from azure.identity import ManagedIdentityCredential

    seen: dict[str, Any] = {}
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kwargs: seen.update(kwargs))
    settings = Settings.from_env(
        {
            **ENV,
            "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000",
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": "Authorization=AAD;ClientId=11111111-2222-3333-4444-555555555555",
        }
    )
    tel = telemetry.configure(settings)
    assert tel.enabled and seen["connection_string"].startswith("InstrumentationKey=")
    assert isinstance(seen["credential"], ManagedIdentityCredential) and seen["disable_logging"] is True
    assert telemetry._parse_auth(settings.applicationinsights_authentication_string)["clientid"].startswith("1111")
