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
from shared.limiter import CALL
from shared.model import ChatRequest, ModelRouter, ResponseFormatRejected, base_url_for
from shared.settings import ModelTarget, Settings
from tests.constants import TEST_DEPLOYMENT, TEST_MODEL_VERSION
from tests.fakes import Reply, ScriptedModel, completion

ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
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
    assert result.deployment == TEST_DEPLOYMENT and result.model == TEST_MODEL_VERSION
    assert model.requests[0]["max_tokens"] == 50 and model.requests[0]["temperature"] == 0


async def test_throttled_primary_falls_back_and_records_who_answered():
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(429, {"error": {"code": "429", "message": "slow down"}})]})
    result = await router(model).complete(REQ)
    assert result.deployment == "backup"
    assert model.calls_to(TEST_DEPLOYMENT) == 1 and model.calls_to("backup") == 1


async def test_all_throttled_raises_429_with_retry_after():
    model = ScriptedModel(
        default=lambda body: Reply(429, {"error": {"code": "429", "message": "x"}}, {"retry-after-ms": "7000"})
    )
    with pytest.raises(UpstreamThrottled) as info:
        await router(model).complete(REQ)
    assert info.value.retry_after_s == 7.0


async def test_prompt_content_filter_is_final_and_carries_categories():
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(400, PROMPT_FILTER)]})
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
        model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(200, body)]})
        with pytest.raises(error) as info:
            await router(model).complete(REQ)
        assert model.calls_to("backup") == 0
        if error is ContentFiltered:
            assert info.value.details["categories"] == {"sexual": {"severity": "high", "filtered": True}}


async def test_other_400_is_an_input_error_without_fallback():
    model = ScriptedModel(
        script={TEST_DEPLOYMENT: [Reply(400, {"error": {"message": "Invalid image data", "code": "x"}})]}
    )
    with pytest.raises(InvalidRequest):
        await router(model).complete(REQ)
    assert model.calls_to("backup") == 0


async def test_response_format_rejection_is_reported_for_the_json_object_fallback():
    body = {"error": {"message": "response_format json_schema is not supported", "param": "response_format"}}
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(400, body)]})
    with pytest.raises(ResponseFormatRejected):
        await router(model).complete(REQ)


async def test_breaker_skips_a_failing_primary_after_the_threshold():
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(503, {"error": {"message": "down"}})]})
    r = router(model)
    for _ in range(4):
        assert (await r.complete(REQ)).deployment == "backup"
    assert model.calls_to(TEST_DEPLOYMENT) == 2  # threshold 2, then the circuit is open
    assert model.calls_to("backup") == 4


async def test_connection_failure_everywhere_is_503():
    model = ScriptedModel(default=lambda body: Reply(exception=httpx2.ConnectError("refused")))
    with pytest.raises(UpstreamUnavailable):
        await router(model).complete(REQ)


async def test_the_limiter_is_settled_to_what_the_quota_charged():
    """Azure charges prompt + max_tokens at admission and refunds nothing: so does our limiter."""
    from tests.fake_clock import FakeClock

    model = ScriptedModel()
    r = ModelRouter(
        Settings.from_env({**ENV, "VLM_TPM": "10000"}), clock=FakeClock(), client_factory=model.client_factory()
    )
    await r.complete(REQ)  # the server reports 100 prompt tokens; max_tokens is 50
    target = r.settings.primary
    assert r.limiter(target).stats()["available_tokens"] == 10000 - (100 + 50)


async def test_the_limiter_counts_a_call_from_when_its_request_left():
    """The router's client stamps the call's charge as its request goes out (the server's window counts it from
    then), and the stamp is the call's own: the charge in the window is the one the router reserved."""
    from tests.fake_clock import FakeClock

    model = ScriptedModel()
    clock = FakeClock(start=100.0)
    r = ModelRouter(Settings.from_env({**ENV, "VLM_TPM": "10000"}), clock=clock, client_factory=model.client_factory())
    await r.complete(REQ)
    (charge,) = r.limiter(r.settings.primary)._window.entries
    assert charge.sent == 100.0 and charge.start == charge.sent
    assert CALL.get() is None  # the router puts it back


def test_the_router_builds_its_limiters_with_the_fixed_split_when_one_is_set():
    from tests.fake_clock import FakeClock

    model = ScriptedModel()
    settings = Settings.from_env({**ENV, "VLM_TPM": "8000", "VLM_RATE_SPLIT": "8"})
    stats = (
        ModelRouter(settings, clock=FakeClock(), client_factory=model.client_factory())
        .limiter(settings.primary)
        .stats()
    )
    assert stats["split"] == 8 and stats["slow_start"] is None and stats["available_tokens"] == pytest.approx(1000)
    adaptive = Settings.from_env({**ENV, "VLM_TPM": "8000"})
    stats = (
        ModelRouter(adaptive, clock=FakeClock(), client_factory=model.client_factory())
        .limiter(adaptive.primary)
        .stats()
    )
    assert stats["split"] == 0 and stats["slow_start"] == 1.0


# --- adaptive parameters, missing deployments, shared state (issues 10 and 11) -------------------

UNSUPPORTED_MAX_TOKENS = {
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}
DEPLOYMENT_NOT_FOUND = {
    "error": {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist. If you created the deployment "
        "within the last 5 minutes, please wait a moment and try again.",
    }
}


def reasoning_peer(model_name: str = "gpt-5.4-mini-2026-03-17"):
    """Behaves like a reasoning deployment: refuses max_tokens/temperature as Azure does."""

    def answer(body: dict) -> Reply:
        if "max_tokens" in body or "temperature" in body:
            return Reply(400, UNSUPPORTED_MAX_TOKENS)
        return Reply(body=completion(model=model_name))

    return answer


async def test_a_refused_parameter_style_is_switched_once_and_remembered():
    """A deployment named `vision`, no VLM_MODEL, running a reasoning model the catalog does not know."""
    model = ScriptedModel(default=reasoning_peer())
    r = router(model, VLM_DEPLOYMENT="vision", VLM_FALLBACK_DEPLOYMENTS="")
    request = ChatRequest(REQ.messages, max_tokens=50, estimated_tokens=60, reasoning_effort="low")
    assert (await r.complete(request)).content == "ok"  # the user never sees the 400
    assert (await r.complete(request)).content == "ok"
    assert len(model.requests) == 3  # one extra call, once per deployment
    last = model.requests[-1]
    assert "max_tokens" not in last and "temperature" not in last
    assert last["max_completion_tokens"] == 50 + r.settings.vlm_reasoning_allowance
    assert last["reasoning_effort"] == "low"
    assert r.breakers.get(r.settings.primary.label).consecutive_failures == 0


async def test_a_burst_of_first_calls_pays_the_style_switch_once():
    import asyncio

    model = ScriptedModel(default=reasoning_peer())
    r = router(model, VLM_DEPLOYMENT="vision", VLM_FALLBACK_DEPLOYMENTS="")
    results = await asyncio.gather(*(r.complete(REQ) for _ in range(6)))
    assert [x.content for x in results] == ["ok"] * 6
    assert len(model.requests) == 6 + 1


async def test_a_refused_style_parameter_that_adapting_cannot_fix_is_a_400_not_a_loop():
    model = ScriptedModel(default=lambda body: Reply(400, UNSUPPORTED_MAX_TOKENS))
    with pytest.raises(InvalidRequest):
        await router(model, VLM_FALLBACK_DEPLOYMENTS="").complete(REQ)
    assert len(model.requests) == 2


async def test_a_refused_reasoning_effort_value_moves_to_the_next_one_the_model_takes():
    def answer(body: dict) -> Reply:
        if body.get("reasoning_effort") == "minimal":
            err = {"message": "Unsupported value: 'reasoning_effort' does not support 'minimal' with this model.",
                   "param": "reasoning_effort", "code": "unsupported_value"}  # fmt: skip
            return Reply(400, {"error": err})
        return Reply(body=completion(model="gpt-5-mini"))

    from shared.deployments import REASONING

    model = ScriptedModel(default=answer)
    r = router(model, VLM_MODEL="acme-reasoner", VLM_FALLBACK_DEPLOYMENTS="")  # efforts unknown to the catalog
    r.book.set_style(r.settings.primary, REASONING)
    await r.complete(ChatRequest(REQ.messages, 50, estimated_tokens=60, reasoning_effort="minimal"))
    assert [m.get("reasoning_effort") for m in model.requests] == ["minimal", "low"]


def test_choose_effort_follows_the_catalog_and_refusals():
    from shared.catalog import load_catalog
    from shared.deployments import CHAT, REASONING, choose_effort

    fam = load_catalog().lookup("o3")  # takes low, medium, high
    assert choose_effort("minimal", fam, REASONING) == "low"
    assert choose_effort("xhigh", fam, REASONING) == "high"
    assert choose_effort("low", fam, CHAT) is None
    assert choose_effort("low", None, REASONING) == "low"


async def test_a_missing_deployment_is_skipped_without_counting_as_a_failure():
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(404, DEPLOYMENT_NOT_FOUND)]})
    r = router(model)  # breaker threshold 2
    for _ in range(3):
        assert (await r.complete(REQ)).deployment == "backup"
    assert model.calls_to(TEST_DEPLOYMENT) == 3  # never opened: not a transient failure
    assert r.breakers.get(r.settings.primary.label).consecutive_failures == 0


async def test_missing_and_retired_deployments_get_a_clear_error_naming_them():
    from shared.errors import DeploymentUnavailable

    retired = {"error": {"code": "OperationNotSupported", "message": "The chatCompletion operation does not work "
                         "with the specified model, gpt-35-turbo. Please choose different model and try again."}}  # fmt: skip
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(400, retired)], "backup": [Reply(404, DEPLOYMENT_NOT_FOUND)]})
    with pytest.raises(DeploymentUnavailable) as info:
        await router(model).complete(REQ)
    assert info.value.details == {"deployment": "backup", "reason": "not_found"}
    assert "backup" in info.value.message and "VLM_FALLBACK_DEPLOYMENTS" in info.value.message
    assert info.value.status == 503 and not info.value.transient
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(400, retired)]})
    with pytest.raises(DeploymentUnavailable) as info:
        await router(model, VLM_FALLBACK_DEPLOYMENTS="").complete(REQ)
    assert info.value.details["reason"] == "retired" and "retired" in info.value.message


async def test_an_invalid_schema_400_is_that_requests_error_and_spoils_nothing():
    invalid = {"error": {"message": "Invalid schema for response_format 'result': In context=(), 'required' is "
                         "required to be supplied", "param": "response_format", "code": "invalid_json_schema"}}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "result", "schema": {"type": "object"}}}
    request = ChatRequest(REQ.messages, 50, response_format=fmt, estimated_tokens=60)
    model = ScriptedModel(script={TEST_DEPLOYMENT: [Reply(400, invalid), Reply()]})
    r = router(model)
    with pytest.raises(InvalidRequest) as info:
        await r.complete(request)
    assert not isinstance(info.value, ResponseFormatRejected) and info.value.status == 400
    assert (await r.complete(request)).content == "ok"  # the next caller still gets json_schema
    assert [m["response_format"]["type"] for m in model.requests] == ["json_schema", "json_schema"]


async def test_a_call_cancelled_mid_flight_gives_its_reservation_back():
    import asyncio

    from openai import AsyncOpenAI

    from tests.fake_clock import FakeClock

    arrived = asyncio.Event()

    async def hang(request: httpx2.Request) -> httpx2.Response:
        arrived.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def factory(target, hooks):
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(hang), event_hooks=hooks)
        return AsyncOpenAI(base_url=target.endpoint, api_key="t", max_retries=0, http_client=http)

    # no budget prior: the caller's 5000 is reserved, so the refund is visible
    settings = Settings.from_env({**ENV, "VLM_TPM": "100000", "VLM_RPM": "100", "VLM_BUDGET_PRIOR_TOKENS": "0"})
    r = ModelRouter(settings, clock=FakeClock(), client_factory=factory)
    call = asyncio.create_task(r.complete(ChatRequest(REQ.messages, 5000, estimated_tokens=6000)))
    await arrived.wait()
    assert r.limiter(settings.primary).stats()["available_tokens"] < 100000 - 5000
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    stats = r.limiter(settings.primary).stats()
    assert (stats["available_tokens"], stats["available_requests"]) == (100000, 100)


async def test_the_limiter_reserves_the_calibrated_image_estimate():
    model = ScriptedModel(default=lambda body: Reply(body=completion(prompt_tokens=10 + 3 * 400)))
    r = router(model, VLM_FALLBACK_DEPLOYMENTS="")
    asked: list[int] = []
    limiter = r.limiter(r.settings.primary)
    real = limiter.acquire
    limiter.acquire = lambda n: asked.append(n) or real(n)
    request = ChatRequest(REQ.messages, max_tokens=50, estimated_tokens=10 + 400 + 50, image_tokens=400)
    first = await r.complete(request)  # the server counts the image at 3x our formula
    second = await r.complete(request)
    assert asked == [10 + 400 + 50, 10 + 1200 + 50]
    assert (first.estimated_prompt_tokens, second.estimated_prompt_tokens) == (410, 1210)


def test_fallback_entries_may_name_their_model():
    s = Settings.from_env({**ENV, "VLM_MODEL": "gpt-5.4-mini",
                           "VLM_FALLBACK_DEPLOYMENTS": "backup=gpt-5.4-nano, https://o.openai.azure.com|dep3=gpt-5.1,plain"})  # fmt: skip
    assert [(t.deployment, t.model) for t in s.model_targets] == [
        (TEST_DEPLOYMENT, "gpt-5.4-mini"),
        ("backup", "gpt-5.4-nano"),
        ("dep3", "gpt-5.1"),
        ("plain", None),
    ]
    assert s.model_targets[2].endpoint == "https://o.openai.azure.com" and s.model_targets[2].api_key is None
    from shared.errors import ConfigurationError

    for bad in ("backup=", "|dep", "ftp://x|dep"):
        with pytest.raises(ConfigurationError):
            Settings.from_env({**ENV, "VLM_FALLBACK_DEPLOYMENTS": bad})
    with pytest.raises(ConfigurationError):
        Settings.from_env({**ENV, "VLM_REASONING_EFFORT": "extreme"})


async def test_a_retry_after_http_date_is_honoured_and_a_missing_one_uses_the_limiters_default():
    """One Retry-After parser (shared.limiter.parse_retry_after) for the limiter and the caller's advice."""
    from shared.limiter import DEFAULT_RETRY_AFTER_S

    dated = ScriptedModel(
        default=lambda body: Reply(
            429,
            {"error": {"code": "429", "message": "x"}},
            {"retry-after": "Wed, 21 Oct 2026 07:28:30 GMT", "date": "Wed, 21 Oct 2026 07:28:00 GMT"},
        )
    )
    with pytest.raises(UpstreamThrottled) as info:
        await router(dated).complete(REQ)
    assert info.value.retry_after_s == 30.0
    silent = ScriptedModel(default=lambda body: Reply(429, {"error": {"code": "429", "message": "x"}}))
    with pytest.raises(UpstreamThrottled) as info:
        await router(silent).complete(REQ)
    assert info.value.retry_after_s == DEFAULT_RETRY_AFTER_S
