"""Fallback, breaker, content filter and the limiter against the real local model server over HTTP."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from shared.app import App
from shared.errors import ContentFiltered, OutputTruncated
from shared.model import ModelRouter
from shared.pipeline import AnalysisRequest, analyze
from shared.settings import Settings
from tests.constants import TEST_DEPLOYMENT

pytestmark = pytest.mark.integration


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (200, 150), (20, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def deps(stack, **env) -> App:
    from shared.cache import MemoryLRU, ResultCache

    settings = Settings.from_env(
        {
            "VLM_ENDPOINT": f"{stack.model_url}/openai/v1",
            "VlmStorage": "UseDevelopmentStorage=true",
            "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
            "VLM_FALLBACK_DEPLOYMENTS": "backup",
            "VLM_MAX_RETRIES": "1",
            "VLM_BREAKER_FAILURES": "2",
            **env,
        }
    )
    return App.build(settings, model=ModelRouter(settings), cache=ResultCache(MemoryLRU(0)))


@pytest.fixture
def admin(model_admin):
    model_admin.faults(rates={})
    yield model_admin
    model_admin.faults(rates={})


async def test_a_failing_primary_falls_back_and_its_circuit_opens(stack, admin):
    admin.faults(rates={"503": 1.0}, model=TEST_DEPLOYMENT, retry_after_ms=1)
    d = deps(stack)
    before = admin.stats()["by_model"]
    for _ in range(4):
        result = await analyze(AnalysisRequest(images=[png()], task="describe"), d)
        assert result.deployment == "backup"
    after = admin.stats()["by_model"]
    # two failed calls (each with the SDK's one retry) open the primary's circuit; the rest skip it
    assert after.get(TEST_DEPLOYMENT, 0) - before.get(TEST_DEPLOYMENT, 0) == 2 * 2
    assert after.get("backup", 0) - before.get("backup", 0) == 4
    await d.close()


async def test_content_filter_is_final_no_retry_no_fallback(stack, admin):
    admin.faults(script=["content_filter_prompt"])
    d = deps(stack)
    before = admin.requests()
    with pytest.raises(ContentFiltered) as info:
        await analyze(AnalysisRequest(images=[png()], task="describe"), d)
    assert admin.requests() - before == 1
    assert info.value.details["categories"]
    admin.faults(script=["finish_content_filter"])
    with pytest.raises(ContentFiltered):
        await analyze(AnalysisRequest(images=[png()], task="describe"), d)
    # An answer cut at our guessed budget is asked again once at the caller's; cut there too, it is final.
    admin.faults(script=["finish_length", "finish_length"])
    before = admin.requests()
    with pytest.raises(OutputTruncated):
        await analyze(AnalysisRequest(images=[png()], task="describe"), d)
    assert admin.requests() - before == 2
    await d.close()


async def test_the_limiter_reads_the_servers_rate_limit_headers(stack, admin):
    admin.quota(tpm=100_000, rpm=1000)
    try:
        d = deps(stack, VLM_TPM="100000", VLM_RPM="1000")
        charged_before = admin.stats()["charged_tokens"]
        await analyze(AnalysisRequest(images=[png()], task="describe"), d)
        stats = d.model.limiter(d.settings.primary).stats()
        # the server reported what it charged; our bucket is never above what it says remains
        charged = admin.stats()["charged_tokens"] - charged_before
        assert charged > 0 and stats["available_tokens"] <= 100_000 - charged
        await d.close()
    finally:
        admin.quota(tpm=0, rpm=0)
