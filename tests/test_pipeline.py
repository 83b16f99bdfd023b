"""The pipeline with fakes below it: a scripted model peer (real SDK types) and a memory-only cache."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image

from shared.app import App
from shared.cache import MemoryLRU, ResultCache
from shared.errors import InvalidRequest, UpstreamTimeout
from shared.http_api import HttpInput, handle_analyze
from shared.model import ChatRequest, ChatResult, ModelRouter
from shared.pipeline import AnalysisRequest, analyze
from shared.settings import Settings
from tests.constants import (
    TEST_DEPLOYMENT,
    TEST_FALLBACK_MODEL,
    TEST_FALLBACK_MODEL_VERSION,
    TEST_MODEL,
    TEST_MODEL_VERSION,
)
from tests.fakes import Reply, ScriptedModel, completion

ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_MODEL": TEST_MODEL,
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}


def jpeg(w: int = 1600, h: int = 1200, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "JPEG")
    return buf.getvalue()


def _text_estimate(sent: dict) -> int:
    """Our text estimate for a request as sent (system prompt + text parts), for comparisons."""
    from shared.tokens import prompt_tokens

    texts = [sent["messages"][0]["content"]] + [
        p["text"] for p in sent["messages"][1]["content"] if p["type"] == "text"
    ]
    return prompt_tokens(texts, messages=len(sent["messages"]))


def deps_with(model, **env) -> App:
    settings = Settings.from_env({**ENV, **env})
    return App.build(settings, model=model, cache=ResultCache(MemoryLRU(16)))


def router(scripted: ScriptedModel, **env) -> ModelRouter:
    return ModelRouter(Settings.from_env({**ENV, **env}), client_factory=scripted.client_factory())


async def test_describe_sends_the_optimised_image_and_reports_usage_and_cost():
    scripted = ScriptedModel()
    deps = deps_with(router(scripted))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    (sent,) = scripted.requests
    parts = sent["messages"][1]["content"]
    image_part = next(p for p in parts if p["type"] == "image_url")
    assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert image_part["image_url"]["detail"] == "high"
    assert result.images[0]["sent_width"] == 1024 and result.images[0]["sent_height"] == 768
    assert result.usage.total_tokens == 110 and result.usage.estimated_image_tokens == 765
    assert result.usage.reasoning_tokens == 0
    assert result.usage.estimated_prompt_tokens == (scripted_estimate := 765 + _text_estimate(sent))
    assert scripted_estimate > 765
    assert result.cost_usd == round(100 * 2.5e-6 + 10 * 10e-6, 6)
    assert (result.model, result.deployment, result.cached) == (TEST_MODEL_VERSION, TEST_DEPLOYMENT, False)


async def test_cache_hit_costs_nothing_and_no_cache_bypasses_it():
    scripted = ScriptedModel()
    deps = deps_with(router(scripted))
    first = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    again = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    assert again.cached and again.id == first.id and again.result == first.result
    assert again.cost_usd == 0 and again.usage.total_tokens == 0
    assert len(scripted.requests) == 1
    await analyze(AnalysisRequest(images=[jpeg()], task="describe", use_cache=False), deps)
    assert len(scripted.requests) == 2


async def test_a_repeat_of_the_same_bytes_is_answered_without_decoding(monkeypatch):
    import shared.pipeline as pipeline

    prepared = []
    real = pipeline._prepare_all
    monkeypatch.setattr(pipeline, "_prepare_all", lambda req, s, spec: prepared.append(1) or real(req, s, spec))
    deps = deps_with(router(ScriptedModel()))
    first = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    again = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    assert len(prepared) == 1 and again.cached and again.images == first.images and again.id == first.id
    other = await analyze(AnalysisRequest(images=[jpeg(colour=(1, 2, 3))], task="describe"), deps)
    assert len(prepared) == 2 and not other.cached


class SlowModel:
    """A ChatBackend that answers after a delay and counts calls."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    async def complete(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return ChatResult("slow answer", "stop", 10, 5, TEST_DEPLOYMENT, TEST_DEPLOYMENT)


async def test_identical_requests_in_flight_share_one_model_call():
    model = SlowModel(0.05)
    deps = deps_with(model)
    results = await asyncio.gather(*(analyze(AnalysisRequest(images=[jpeg()], task="ocr"), deps) for _ in range(5)))
    assert model.calls == 1
    assert sorted(r.cached for r in results) == [False, True, True, True, True]
    assert {r.result for r in results} == {"slow answer"}


async def test_the_request_budget_answers_504_with_retry_after_instead_of_hanging():
    deps = deps_with(SlowModel(5.0), VLM_REQUEST_BUDGET_S="0.2")
    body = io.BytesIO()
    Image.new("RGB", (64, 64)).save(body, "PNG")
    out = await handle_analyze(HttpInput("POST", {"content-type": "image/png"}, {}, body.getvalue()), deps)
    assert out.status == 504 and out.body["error"]["code"] == "upstream_timeout"
    assert int(out.headers["Retry-After"]) >= 1
    with pytest.raises(UpstreamTimeout):
        await analyze(AnalysisRequest(images=[jpeg()], task="describe", budget_s=0.05), deps)


async def test_structured_reask_counts_both_calls():
    bad = completion({"label": "giraffe", "confidence": 0.5})
    good = completion({"label": "cat", "confidence": 0.9})
    scripted = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(body=bad), Reply(body=good)]})
    deps = deps_with(router(scripted))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="classify", labels=["cat", "dog"]), deps)
    assert result.result == {"label": "cat", "confidence": 0.9}
    assert result.usage.total_tokens == 220 and result.model_calls == 2
    reask = scripted.requests[1]["messages"][-1]["content"]
    assert "giraffe" in reask
    fmt = scripted.requests[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True


async def test_json_schema_rejection_falls_back_to_json_object_once():
    rejected = Reply(400, {"error": {"message": "response_format json_schema unsupported", "param": "response_format"}})
    fenced = completion("Here you go:\n```json\n" + json.dumps({"columns": ["a"], "rows": [["1"]]}) + "\n```")
    scripted = ScriptedModel(script={TEST_DEPLOYMENT: [rejected, Reply(body=fenced)]})
    deps = deps_with(router(scripted))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="table"), deps)
    assert result.result == {"columns": ["a"], "rows": [["1"]]}
    assert [r["response_format"]["type"] for r in scripted.requests] == ["json_schema", "json_object"]
    # the router remembers: the next structured request goes straight to json_object
    await analyze(AnalysisRequest(images=[jpeg(colour=(9, 9, 9))], task="table"), deps)
    assert [r["response_format"]["type"] for r in scripted.requests][2:] == ["json_object"]


async def test_fallback_deployment_is_recorded_in_the_result():
    scripted = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(503, {"error": {"message": "down"}})]})
    deps = deps_with(router(scripted, VLM_FALLBACK_DEPLOYMENTS=TEST_FALLBACK_MODEL))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    assert result.deployment == TEST_FALLBACK_MODEL


# --- the model behind a deployment, reasoning models, cache identity (issue 11) ----------------


def stack(scripted: ScriptedModel, **env) -> App:
    """One settings object for the router and the pipeline, as in a worker."""
    settings = Settings.from_env({**ENV, **env})
    model = ModelRouter(settings, client_factory=scripted.client_factory())
    return App.build(settings, model=model, cache=ResultCache(MemoryLRU(16)))


def reasoning_body(model: str, prompt: int, completion_tokens: int, reasoning: int, content="ok", finish="stop"):
    body = completion(content, model=model, finish_reason=finish)
    body["usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    return body


async def test_a_deployment_named_vision_is_sized_and_priced_as_the_model_it_reports():
    from shared.tokens import image_tokens, model_view_size

    scripted = ScriptedModel(default=lambda body: Reply(body=completion(model="gpt-4.1-mini-2025-04-14")))
    deps = stack(scripted, VLM_MODEL="", VLM_DEPLOYMENT="vision")
    first = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    f = first.images[0]  # nothing known yet: the unknown-model estimate, not TEST_MODEL's numbers
    assert f["estimated_tokens"] == image_tokens(f["sent_width"], f["sent_height"], "high", None)
    assert f["estimated_tokens"] != image_tokens(f["sent_width"], f["sent_height"], "high", TEST_MODEL)
    assert first.cost_usd == round(100 * 0.40e-6 + 10 * 1.60e-6, 6)  # priced as the model that answered
    second = await analyze(AnalysisRequest(images=[jpeg(colour=(5, 5, 5))], task="describe"), deps)
    f = second.images[0]  # learned: gpt-4.1-mini's own (patch) view and count from now on
    assert (f["sent_width"], f["sent_height"]) == model_view_size(1600, 1200, "high", "gpt-4.1-mini")
    assert f["estimated_tokens"] == image_tokens(f["sent_width"], f["sent_height"], "high", "gpt-4.1-mini")


async def test_a_fallbacks_answer_is_never_served_as_the_primarys():
    down = Reply(503, {"error": {"message": "down"}})
    scripted = ScriptedModel(
        script={TEST_DEPLOYMENT: [down, Reply()]},
        default=lambda body: Reply(body=completion("cheap answer", model=TEST_FALLBACK_MODEL_VERSION)),
    )
    deps = stack(scripted, VLM_FALLBACK_DEPLOYMENTS=f"backup={TEST_FALLBACK_MODEL}")
    req = AnalysisRequest(images=[jpeg()], task="describe")
    first = await analyze(req, deps)
    assert (first.deployment, first.result) == ("backup", "cheap answer")
    assert first.cost_usd == round(100 * 0.15e-6 + 10 * 0.60e-6, 6)
    again = await analyze(req, deps)  # the primary is back: its own answer, not the fallback's from the cache
    assert (again.deployment, again.result, again.cached) == (TEST_DEPLOYMENT, "ok", False)
    third = await analyze(req, deps)
    assert third.cached and third.result == "ok" and third.id == again.id != first.id
    assert scripted.calls_to(TEST_DEPLOYMENT) == 2 and scripted.calls_to("backup") == 1


async def test_a_reasoning_model_gets_its_parameters_and_its_reasoning_is_reported_and_priced():
    body = reasoning_body("gpt-5-mini-2025-08-07", prompt=1000, completion_tokens=700, reasoning=600)
    scripted = ScriptedModel(default=lambda b: Reply(body=body))
    deps = stack(scripted, VLM_MODEL="gpt-5-mini", VLM_REASONING_ALLOWANCE="3000")
    result = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    sent = scripted.requests[0]
    assert "max_tokens" not in sent and "temperature" not in sent
    assert sent["max_completion_tokens"] == 1000 + 3000 and sent["reasoning_effort"] == "low"
    assert (result.usage.reasoning_tokens, result.usage.completion_tokens) == (600, 700)
    assert result.cost_usd == round(1000 * 0.25e-6 + 700 * 2.0e-6, 6)  # reasoning is billed as output
    other = AnalysisRequest(images=[jpeg(colour=(1, 1, 1))], task="describe", reasoning_effort="high")
    await analyze(other, deps)
    assert scripted.requests[1]["reasoning_effort"] == "high"


async def test_the_reasoning_effort_setting_is_per_task():
    scripted = ScriptedModel(default=lambda b: Reply(body=completion(model="gpt-5-mini")))
    deps = stack(scripted, VLM_MODEL="gpt-5-mini", VLM_REASONING_EFFORT="low,compare=medium")
    await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    await analyze(AnalysisRequest(images=[jpeg(), jpeg(colour=(0, 0, 255))], task="compare"), deps)
    assert [r["reasoning_effort"] for r in scripted.requests] == ["low", "medium"]


async def test_an_answer_cut_off_by_reasoning_is_reported_as_such():
    from shared.errors import OutputTruncated

    body = reasoning_body("gpt-5-mini", prompt=900, completion_tokens=5000, reasoning=5000, content="", finish="length")
    deps = stack(ScriptedModel(default=lambda b: Reply(body=body)), VLM_MODEL="gpt-5-mini")
    with pytest.raises(OutputTruncated) as info:
        await analyze(AnalysisRequest(images=[jpeg()], task="classify", labels=["cat", "dog"]), deps)
    assert info.value.details["reason"] == "reasoning_used_budget"
    assert info.value.details["reasoning_tokens"] == 5000
    assert "reasoning" in info.value.message


async def test_the_response_schema_is_counted_in_the_estimate():
    from shared.tasks import chat_request

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"description": "d" * 4000}}}
    bare, with_schema = chat_request("p", [], 100), chat_request("p", [], 100, fmt)
    assert with_schema.estimated_tokens - bare.estimated_tokens >= 1000


async def test_cached_prompt_tokens_are_priced_at_the_cached_input_price(tmp_path):
    entry = {
        "family": "acme-vl",
        "match": ["acme-vl"],
        "image_tokens": {"kind": "patch", "patch_px": 32, "max_patches": 1536, "multiplier": 1.0},
        "parameters": "chat",
        "price_usd_per_mtok": {"input": 2.0, "cached_input": 0.5, "output": 8.0},
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"schema_version": 1, "families": [entry]}))
    body = completion(model="acme-vl-2026-01-01")
    body["usage"] = {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
                     "prompt_tokens_details": {"cached_tokens": 600}}  # fmt: skip
    deps = stack(ScriptedModel(default=lambda b: Reply(body=body)), VLM_MODEL="", VLM_MODEL_CATALOG=str(path))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    assert result.cost_usd == round((400 * 2.0 + 600 * 0.5 + 10 * 8.0) / 1e6, 6)


async def test_a_model_without_a_catalog_price_has_no_made_up_cost():
    deps = stack(ScriptedModel(default=lambda b: Reply(body=completion(model="acme-unknown"))), VLM_MODEL="")
    result = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    assert result.cost_usd is None and result.usage.prompt_tokens == 100


async def test_the_callers_schema_is_converted_to_strict_once_per_request(monkeypatch):
    from shared import schemas

    caller = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    converted = []
    real = schemas.to_strict

    def counting(schema, *args, **kwargs):
        converted.append(schema)
        return real(schema, *args, **kwargs)

    monkeypatch.setattr(schemas, "to_strict", counting)
    scripted = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(body=completion({"total": 12.5}))]})
    deps = deps_with(router(scripted))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="schema", schema=caller), deps)
    assert result.result == {"total": 12.5}
    assert converted == [caller]


async def test_classify_without_labels_is_refused_before_the_image_is_decoded():
    deps = deps_with(router(ScriptedModel()))
    with pytest.raises(InvalidRequest) as info:
        await analyze(AnalysisRequest(images=[b"not an image at all"], task="classify"), deps)
    assert info.value.details["field"] == "labels"
