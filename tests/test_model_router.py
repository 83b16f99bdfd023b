"""The model seam against a scripted HTTP peer: error mapping, fallback, breaker, finish checks."""

import httpx2
import pytest

from shared.errors import (
    ContentFiltered,
    InvalidRequest,
    OutputTruncated,
    Refused,
    UpstreamThrottled,
    UpstreamUnavailable,
)
from shared.model import ChatRequest, ModelRouter, ResponseFormatRejected, base_url_for
from shared.settings import ModelTarget, Settings
from tests.fakes import Reply, ScriptedModel, completion

ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_FALLBACK_DEPLOYMENTS": "backup",
    "VLM_BREAKER_FAILURES": "2",
}
REQ = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=50, estimated_tokens=60)

PROMPT_FILTER = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": {"filtered": False, "severity": "safe"},
                "violence": {"filtered": True, "severity": "medium"},
            },
        },
    }
}


def router(model: ScriptedModel, **env) -> ModelRouter:
    return ModelRouter(Settings.from_env({**ENV, **env}), client_factory=model.client_factory())


def test_azure_endpoints_use_the_v1_path():
    assert base_url_for(ModelTarget("https://x.openai.azure.com", "d")) == "https://x.openai.azure.com/openai/v1/"
    assert base_url_for(ModelTarget("http://127.0.0.1:8089/v1", "d")) == "http://127.0.0.1:8089/v1/"


async def test_success_reports_usage_and_the_deployment():
    model = ScriptedModel()
    result = await router(model).complete(REQ)
    assert (result.content, result.prompt_tokens, result.completion_tokens) == ("ok", 100, 10)
    assert result.deployment == "gpt-4o" and result.model == "gpt-4o-2024-11-20"
    assert model.requests[0]["max_tokens"] == 50 and model.requests[0]["temperature"] == 0


async def test_throttled_primary_falls_back_and_records_who_answered():
    model = ScriptedModel(script={"gpt-4o": [Reply(429, {"error": {"code": "429", "message": "slow down"}})]})
    result = await router(model).complete(REQ)
    assert result.deployment == "backup"
    assert model.calls_to("gpt-4o") == 1 and model.calls_to("backup") == 1


async def test_all_throttled_raises_429_with_retry_after():
    model = ScriptedModel(
        default=lambda body: Reply(429, {"error": {"code": "429", "message": "x"}}, {"retry-after-ms": "7000"})
    )
    with pytest.raises(UpstreamThrottled) as info:
        await router(model).complete(REQ)
    assert info.value.retry_after_s == 7.0


async def test_prompt_content_filter_is_final_and_carries_categories():
    model = ScriptedModel(script={"gpt-4o": [Reply(400, PROMPT_FILTER)]})
    with pytest.raises(ContentFiltered) as info:
        await router(model).complete(REQ)
    assert info.value.details["categories"] == {"violence": {"severity": "medium", "filtered": True}}
    assert model.calls_to("backup") == 0


async def test_completion_side_filter_truncation_and_refusal():
    cfr = {"sexual": {"filtered": True, "severity": "high"}, "hate": {"filtered": False, "severity": "safe"}}
    cases = [
        (completion(None, finish_reason="content_filter", content_filter_results=cfr), ContentFiltered),
        (completion("half an ans", finish_reason="length"), OutputTruncated),
        (completion(None, refusal="I can't help with that."), Refused),
    ]
    for body, error in cases:
        model = ScriptedModel(script={"gpt-4o": [Reply(200, body)]})
        with pytest.raises(error) as info:
            await router(model).complete(REQ)
        assert model.calls_to("backup") == 0
        if error is ContentFiltered:
            assert info.value.details["categories"] == {"sexual": {"severity": "high", "filtered": True}}


async def test_other_400_is_an_input_error_without_fallback():
    model = ScriptedModel(script={"gpt-4o": [Reply(400, {"error": {"message": "Invalid image data", "code": "x"}})]})
    with pytest.raises(InvalidRequest):
        await router(model).complete(REQ)
    assert model.calls_to("backup") == 0


async def test_response_format_rejection_is_reported_for_the_json_object_fallback():
    body = {"error": {"message": "response_format json_schema is not supported", "param": "response_format"}}
    model = ScriptedModel(script={"gpt-4o": [Reply(400, body)]})
    with pytest.raises(ResponseFormatRejected):
        await router(model).complete(REQ)


async def test_breaker_skips_a_failing_primary_after_the_threshold():
    model = ScriptedModel(script={"gpt-4o": [Reply(503, {"error": {"message": "down"}})]})
    r = router(model)
    for _ in range(4):
        assert (await r.complete(REQ)).deployment == "backup"
    assert model.calls_to("gpt-4o") == 2  # threshold 2, then the circuit is open
    assert model.calls_to("backup") == 4


async def test_connection_failure_everywhere_is_503():
    model = ScriptedModel(default=lambda body: Reply(exception=httpx2.ConnectError("refused")))
    with pytest.raises(UpstreamUnavailable):
        await router(model).complete(REQ)


async def test_the_limiter_is_settled_to_what_the_quota_charged():
    """Azure charges prompt + max_tokens at admission and refunds nothing: so does our limiter."""
    from shared.clock import FakeClock

    model = ScriptedModel()
    r = ModelRouter(
        Settings.from_env({**ENV, "VLM_TPM": "10000"}), clock=FakeClock(), client_factory=model.client_factory()
    )
    await r.complete(REQ)  # the server reports 100 prompt tokens; max_tokens is 50
    target = r.settings.primary
    assert r.limiter(target).stats()["available_tokens"] == 10000 - (100 + 50)
