"""Self-calibrating image-token estimates: a model the catalog cannot count for ends up estimated closely."""

from __future__ import annotations

import base64
import io
import json
import math
import random

from PIL import Image

from shared.app import App
from shared.cache import MemoryLRU, ResultCache
from shared.calibration import Calibration
from shared.model import ModelRouter
from shared.pipeline import AnalysisRequest, analyze
from shared.settings import Settings
from tests.constants import TEST_DEPLOYMENT
from tests.fakes import Reply, ScriptedModel, completion

ENV = {
    "VLM_ENDPOINT": "http://model.test/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}


class ForeignCounter:
    """A peer that counts prompt tokens its own way: 28-px patches x 1.3 and ~3.6 characters a token,
    under a model name no catalog family matches."""

    name = "acme-vision-7-2026-10-01"

    def __call__(self, body: dict) -> Reply:
        chars, image_tokens = 0, 0
        for message in body["messages"]:
            parts = message["content"] if isinstance(message["content"], list) else [message["content"]]
            for part in parts:
                if isinstance(part, str):
                    chars += len(part)
                elif part["type"] == "text":
                    chars += len(part["text"])
                else:
                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    w, h = Image.open(io.BytesIO(data)).size
                    image_tokens += math.ceil(math.ceil(w / 28) * math.ceil(h / 28) * 1.3)
        if body.get("response_format"):
            chars += len(json.dumps(body["response_format"]))
        prompt = math.ceil(chars / 3.6) + 4 * len(body["messages"]) + image_tokens
        return Reply(body=completion(model=self.name, prompt_tokens=prompt))


def photo(w: int, h: int, seed: int) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    return buf.getvalue()


async def test_an_unknown_model_is_estimated_within_5_percent_after_20_calls():
    settings = Settings.from_env({**ENV, "VLM_DEPLOYMENT": "vision"})
    scripted = ScriptedModel(default=ForeignCounter())
    deps = App.build(
        settings,
        model=ModelRouter(settings, client_factory=scripted.client_factory()),
        cache=ResultCache(MemoryLRU(4)),
    )
    rng = random.Random(7)
    errors = []
    for n in range(21):
        w, h = rng.randrange(500, 3000), rng.randrange(500, 3000)
        task = rng.choice(["describe", "ocr"])
        result = await analyze(AnalysisRequest(images=[photo(w, h, n)], task=task, use_cache=False), deps)
        observed, estimated = result.usage.prompt_tokens, result.usage.estimated_prompt_tokens
        errors.append(abs(estimated - observed) / observed)
    assert errors[0] > 0.25  # the first estimate is the catalog's deliberately high one
    assert errors[-1] < 0.05, errors
    assert max(errors[10:]) < 0.05, errors


async def test_the_same_holds_for_a_family_whose_catalog_formula_is_wrong(tmp_path):
    """An override naming the model but with a formula that is off by 2x: calibration absorbs it."""
    override = {
        "schema_version": 1,
        "families": [
            {
                "family": "acme-vision-7",
                "match": ["acme-vision-7"],
                "image_tokens": {"kind": "patch", "patch_px": 32, "max_patches": 1536, "multiplier": 3.0},
                "parameters": "chat",
                "price_usd_per_mtok": {"input": 1.0, "output": 2.0},
            }
        ],
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(override))
    settings = Settings.from_env({**ENV, "VLM_MODEL": "acme-vision-7", "VLM_MODEL_CATALOG": str(path)})
    scripted = ScriptedModel(default=ForeignCounter())
    deps = App.build(
        settings, model=ModelRouter(settings, client_factory=scripted.client_factory()), cache=ResultCache(MemoryLRU(4))
    )
    for n in range(20):
        result = await analyze(AnalysisRequest(images=[photo(1200 + 40 * n, 900, n)], task="describe"), deps)
    assert abs(result.usage.estimated_prompt_tokens - result.usage.prompt_tokens) / result.usage.prompt_tokens < 0.05
    assert result.cost_usd == round(result.usage.prompt_tokens * 1e-6 + result.usage.completion_tokens * 2e-6, 6)


def test_the_correction_is_a_clamped_median_of_recent_ratios():
    c = Calibration(window=5)
    assert c.factor == 1.0 and c.image_estimate(1000) == 1000
    for observed in (2100, 2100, 2100, 90000, 2100):  # one odd answer among five
        c.observe(observed, text_estimate=100, image_formula=1000)
    assert c.factor == 2.0 and c.image_estimate(500) == 1000
    c.observe(5, text_estimate=100, image_formula=1000)  # a negative ratio is clamped, not trusted
    assert c.factor == 2.0
    c.observe(5000, text_estimate=100, image_formula=0)  # no images: nothing learned about them
    assert c.samples == 5
    for _ in range(5):  # the window moves on: the model behind the deployment changed
        c.observe(600, text_estimate=100, image_formula=1000)
    assert c.factor == 0.5
