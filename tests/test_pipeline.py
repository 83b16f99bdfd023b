"""The pipeline with fakes below it: a scripted model peer (real SDK types) and a memory-only cache."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image

from shared.cache import MemoryLRU, ResultCache
from shared.errors import UpstreamTimeout
from shared.http_api import HttpInput, handle_analyze
from shared.model import ChatRequest, ChatResult, ModelRouter
from shared.pipeline import AnalysisRequest, Dependencies, analyze
from shared.settings import Settings
from tests.fakes import Reply, ScriptedModel, completion

ENV = {"VLM_ENDPOINT": "http://model.test/v1", "VlmStorage": "UseDevelopmentStorage=true"}


def jpeg(w: int = 1600, h: int = 1200, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "JPEG")
    return buf.getvalue()


def deps_with(model, **env) -> Dependencies:
    settings = Settings.from_env({**ENV, **env})
    return Dependencies(settings, model=model, cache=ResultCache(MemoryLRU(16)))


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
    assert result.cost_usd == round(100 * 2.5e-6 + 10 * 10e-6, 6)
    assert (result.model, result.deployment, result.cached) == ("gpt-4o-2024-11-20", "gpt-4o", False)


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
    monkeypatch.setattr(pipeline, "_prepare_all", lambda req, s: prepared.append(1) or real(req, s))
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
        return ChatResult("slow answer", "stop", 10, 5, "gpt-4o", "gpt-4o")


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
    scripted = ScriptedModel(script={"gpt-4o": [Reply(body=bad), Reply(body=good)]})
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
    scripted = ScriptedModel(script={"gpt-4o": [rejected, Reply(body=fenced)]})
    deps = deps_with(router(scripted))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="table"), deps)
    assert result.result == {"columns": ["a"], "rows": [["1"]]}
    assert [r["response_format"]["type"] for r in scripted.requests] == ["json_schema", "json_object"]
    # the router remembers: the next structured request goes straight to json_object
    await analyze(AnalysisRequest(images=[jpeg(colour=(9, 9, 9))], task="table"), deps)
    assert [r["response_format"]["type"] for r in scripted.requests][2:] == ["json_object"]


async def test_fallback_deployment_is_recorded_in_the_result():
    scripted = ScriptedModel(script={"gpt-4o": [Reply(503, {"error": {"message": "down"}})]})
    deps = deps_with(router(scripted, VLM_FALLBACK_DEPLOYMENTS="gpt-4o-mini"))
    result = await analyze(AnalysisRequest(images=[jpeg()], task="describe"), deps)
    assert result.deployment == "gpt-4o-mini"
