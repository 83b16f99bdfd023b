"""The local model server, driven over HTTP by the real openai SDK (and aiohttp for raw checks).

One server per module, in-process on a free port, sharing one RapidOCR engine; each test starts
from /admin/reset. OCR runs on few, small corpus images (results are cached by the server), and
fault/quota tests use `facts` mode so the whole file stays well under a minute.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from local.model_faults import FaultSpecError, parse_rates, parse_script
from local.model_quota import Quota, QuotaLimits
from local.model_server import ModelServerConfig, build_app
from local.ocr_engine import Fragment, OcrEngine, decode, reading_order, resolve_detail
from local.ocr_parse import parse_date, parse_number
from shared.catalog import load_catalog
from shared.tokens import image_tokens, prompt_tokens, text_tokens

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("VLM_CORPUS", ROOT.parent / "shared" / "corpus"))
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus")

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared corpus is not available")


# ------------------------------------------------------------------------------------ helpers


def jpeg_bytes(path: Path, side: int) -> bytes:
    im = Image.open(path).convert("RGB")
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *images: tuple[bytes, str], mime: str = "image/jpeg") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for data, detail in images:
        parts.append({"type": "image_url", "image_url": {"url": data_url(data, mime), "detail": detail}})
    return [{"role": "user", "content": parts}]


def json_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def nullable(t: str) -> dict[str, Any]:
    return {"type": [t, "null"]}


def strict_object(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": list(props), "properties": props}


PARTY = strict_object({"name": nullable("string"), "address": nullable("string"), "tax_id": nullable("string")})
LINE_ITEM = strict_object(
    {
        "description": {"type": "string"},
        "quantity": nullable("number"),
        "unit_price": nullable("number"),
        "total": nullable("number"),
    }
)
INVOICE_SCHEMA: dict[str, Any] = {
    **strict_object(
        {
            "invoice_number": nullable("string"),
            "invoice_date": nullable("string"),
            "due_date": nullable("string"),
            "vendor": {"$ref": "#/$defs/party"},
            "customer": {"anyOf": [{"$ref": "#/$defs/party"}, {"type": "null"}]},
            "currency": nullable("string"),
            "line_items": {"type": "array", "items": {"$ref": "#/$defs/line_item"}},
            "subtotal": nullable("number"),
            "tax": nullable("number"),
            "total": nullable("number"),
        }
    ),
    "$defs": {"party": PARTY, "line_item": LINE_ITEM},
}
CLASSIFY_SCHEMA = strict_object(
    {
        "label": {"type": "string", "enum": ["invoice", "receipt", "photo", "screenshot"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    }
)
SYNTHESIS_SCHEMA = strict_object(
    {
        "common_themes": {"type": "array", "items": {"type": "string"}},
        "progression": {"type": "array", "items": {"type": "string"}},
        "key_insights": {"type": "array", "items": {"type": "string"}},
        "recommendations": {"type": "array", "items": {"type": "string"}},
    }
)


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ocr_engine() -> Any:
    engine = OcrEngine()
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
async def server(ocr_engine: OcrEngine) -> AsyncIterator[TestServer]:
    srv = TestServer(build_app(ModelServerConfig(seed=1), ocr=ocr_engine), host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture
def base(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def admin(base: str) -> AsyncIterator[Callable[..., Any]]:
    """POST/GET JSON to the server's admin endpoints; every test starts from a reset server."""
    async with aiohttp.ClientSession() as session:

        async def call(path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
            async with session.request(method, base + path, json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        await call("/admin/reset")
        await call("/admin/config", {"mode": "ocr", "latency_ms": 0, "jitter_ms": 0, "json_schema": True})
        await call("/admin/quota", {"rpm": 0, "tpm": 0})
        yield call


@pytest.fixture
async def client(base: str, admin: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
    yield c
    await c.close()


@pytest.fixture(scope="module")
def oyo() -> bytes:
    return jpeg_bytes(CORPUS / "documents" / "oyo.png", 1024)  # 724x1024


@pytest.fixture(scope="module")
def flipkart() -> bytes:
    return (CORPUS / "documents" / "FlipkartInvoice.png").read_bytes()  # 789x557 RGBA


@pytest.fixture(scope="module")
def photo() -> bytes:
    return (CORPUS / "orientation" / "landscape_1.jpg").read_bytes()  # 600x450


@pytest.fixture(scope="module")
def tiny() -> bytes:
    return png_bytes((64, 48), (200, 30, 30))


# ---------------------------------------------------------------------------- pure functions


def test_parse_number_both_conventions() -> None:
    assert parse_number("Rs 1939") == 1939
    assert parse_number("1,234.56") == 1234.56
    assert parse_number("1.234,56 €") == 1234.56
    assert parse_number("€ 12,50") == 12.5
    assert parse_number("USD 1,234") == 1234
    assert parse_number("14.50%") is None
    assert parse_number("Total: -7.5") == -7.5


def test_parse_date_to_iso() -> None:
    assert parse_date("Date: 31/12/2017") == "2017-12-31"
    assert parse_date("Invoice Date:20-10-2015") == "2015-10-20"
    assert parse_date("2024-03-05") == "2024-03-05"
    assert parse_date("Dec 31, 2017") == "2017-12-31"
    assert parse_date("le 3 mars 2021") == "2021-03-03"
    assert parse_date("12/31/2017") == "2017-12-31"  # the day cannot be a month: M/D/Y
    assert parse_date("no date here") is None


def test_reading_order_groups_lines_top_to_bottom_left_to_right() -> None:
    frags = [
        Fragment("Total", 1, 10, 102, 60, 118),
        Fragment("319.00", 1, 300, 100, 360, 116),
        Fragment("Invoice", 1, 10, 10, 80, 26),
        Fragment("No: 7", 1, 90, 12, 140, 28),
    ]
    lines = reading_order(frags)
    assert [ln.text for ln in lines] == ["Invoice No: 7", "Total 319.00"]


def test_detail_auto_rule() -> None:
    assert resolve_detail("auto", 513, 100) == "high"
    assert resolve_detail("auto", 512, 512) == "low"
    assert resolve_detail("low", 4000, 3000) == "low"
    local = Path(__file__).resolve().parents[1] / "local" / "model_catalog.local.json"
    assert load_catalog(str(local)).lookup("local-ocr-rapidocr").family == "local-ocr"  # via VLM_MODEL_CATALOG


def test_fault_specs_validate() -> None:
    assert parse_rates("429:0.05,500:0.05,503:0.03,reset:0.02") == {
        "429": 0.05,
        "500": 0.05,
        "503": 0.03,
        "reset": 0.02,
    }
    assert parse_script("500,ok,reset") == ["500", "ok", "reset"]
    for bad in ("boom:0.1", "500:2", "500:0.7,503:0.7"):
        with pytest.raises(FaultSpecError):
            parse_rates(bad)


def test_facts_are_measured_upright() -> None:
    """EXIF orientation 6 stores a landscape picture as 450x600; the model sees it upright."""
    im = decode((CORPUS / "orientation" / "landscape_6.jpg").read_bytes(), 0, "high", "local-ocr-rapidocr")
    assert (im.facts.width, im.facts.height, im.facts.orientation) == (600, 450, "landscape")
    assert im.view.size == (600, 450) and im.facts.tokens == image_tokens(600, 450, "high")
    assert 0 <= im.facts.brightness <= 255 and im.facts.colour


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quota_rpm_retry_after_is_exact() -> None:
    clock = FakeClock()
    q = Quota(QuotaLimits(rpm=2, window_s=60), clock)
    assert q.try_acquire("m", 10).allowed
    clock.now += 10
    d = q.try_acquire("m", 10)
    assert d.allowed and d.remaining_requests == 0
    clock.now += 10
    d = q.try_acquire("m", 10)
    assert not d.allowed and d.reason == "requests"
    assert d.retry_after_ms == 40_000  # the first request (t=1000) leaves the window at t=1060
    h = d.headers()
    assert h["retry-after-ms"] == "40000" and h["retry-after"] == "40"
    assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-limit-requests"] == "2"
    clock.now += 39.999
    assert not q.try_acquire("m", 10).allowed
    clock.now += 0.001
    assert q.try_acquire("m", 10).allowed


def test_quota_tpm_waits_for_enough_tokens_to_expire() -> None:
    clock = FakeClock()
    q = Quota(QuotaLimits(tpm=1000, window_s=60), clock)
    assert q.try_acquire("m", 600).allowed
    clock.now += 5
    assert q.try_acquire("m", 300).allowed
    clock.now += 1
    d = q.try_acquire("m", 500)  # needs 400 freed: only the first entry's expiry (t=1060) frees enough
    assert not d.allowed and d.reason == "tokens"
    assert d.retry_after_ms == 54_000
    assert d.remaining_tokens == 100
    d = q.try_acquire("m", 100)  # fits exactly
    assert d.allowed and d.remaining_tokens == 0
    clock.now += 54
    assert q.try_acquire("m", 500).allowed


def test_quota_too_large_and_per_model() -> None:
    clock = FakeClock()
    q = Quota(QuotaLimits(tpm=1000, window_s=60, model="primary"), clock)
    d = q.try_acquire("primary", 1001)
    assert not d.allowed and d.reason == "too_large" and d.headers()["x-should-retry"] == "false"
    assert q.try_acquire("fallback", 10**6).allowed  # the quota applies to one deployment only


# ------------------------------------------------------------------------- answers over HTTP


async def test_text_answer_reads_the_document_in_reading_order(
    client: openai.AsyncOpenAI, admin: Any, oyo: bytes, ocr_engine: OcrEngine
) -> None:
    prompt = "Read this document."
    r = await client.chat.completions.create(model="gpt-4o", messages=user(prompt, (oyo, "high")))
    text = r.choices[0].message.content or ""
    assert r.object == "chat.completion" and r.model.startswith("local-ocr")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.refusal is None
    assert text.startswith("Local OCR model (not GPT-4o). Image: 724x1024 portrait")
    assert "OYO" in text and "IBZY2087" in text
    assert text.index("PAYMENT RECEIPT") < text.index("Booking ID") < text.index("Grand Total")
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_tokens([prompt], messages=1) + image_tokens(724, 1024, "high")
    assert r.usage.completion_tokens == text_tokens(text)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert ocr_engine.loads == 1


async def test_usage_uses_auto_detail_per_image(client: openai.AsyncOpenAI, admin: Any, photo: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    small = jpeg_bytes(CORPUS / "orientation" / "landscape_1.jpg", 400)  # 400x300 -> auto = low
    r = await client.chat.completions.create(model="gpt-4o", messages=user("x", (photo, "auto"), (small, "auto")))
    assert r.usage is not None
    expected = prompt_tokens(["x"], 1) + image_tokens(600, 450, "high") + image_tokens(400, 300, "low")
    assert r.usage.prompt_tokens == expected


async def test_invoice_schema_is_valid_and_filled(
    client: openai.AsyncOpenAI, admin: Any, base: str, flipkart: bytes
) -> None:
    """Also checks the event loop keeps serving /health while OCR runs in its thread."""
    task = asyncio.create_task(
        client.chat.completions.create(
            model="gpt-4o",
            messages=user("Extract the invoice.", (flipkart, "high"), mime="image/png"),
            response_format=json_schema("invoice", INVOICE_SCHEMA),
        )
    )
    health_while_busy = 0
    async with aiohttp.ClientSession() as s:
        while not task.done():
            async with s.get(base + "/health") as resp:
                assert resp.status == 200
                health_while_busy += 0 if task.done() else 1
            await asyncio.sleep(0.05)
    r = task.result()
    assert health_while_busy >= 1
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, INVOICE_SCHEMA)
    assert value["invoice_number"] == "BLR_WFLD20151000982590"
    assert value["invoice_date"] == "2015-10-20"
    assert value["total"] == 319.0
    assert value["currency"] == "INR"
    assert value["customer"]["name"] == "Anushrut Singh"
    assert value["line_items"] and value["line_items"][0]["total"] == 319.0


async def test_receipt_schema_from_oyo(client: openai.AsyncOpenAI, admin: Any, oyo: bytes) -> None:
    r = await client.chat.completions.create(
        model="gpt-4o",
        messages=user("Extract the invoice.", (oyo, "high")),
        response_format=json_schema("invoice", INVOICE_SCHEMA),
    )
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, INVOICE_SCHEMA)
    assert value["total"] == 1939.0
    assert value["invoice_date"] == "2017-12-31"
    assert value["invoice_number"] == "IBZY2087"
    assert value["due_date"] is None


async def test_classify_enum_with_confidence(client: openai.AsyncOpenAI, admin: Any, oyo: bytes, photo: bytes) -> None:
    results = {}
    for name, image in (("doc", oyo), ("photo", photo)):
        r = await client.chat.completions.create(
            model="gpt-4o",
            messages=user("Classify as invoice, receipt, photo or screenshot.", (image, "high")),
            response_format=json_schema("classification", CLASSIFY_SCHEMA),
        )
        results[name] = json.loads(r.choices[0].message.content or "")
        jsonschema.validate(results[name], CLASSIFY_SCHEMA)
        assert 0 <= results[name]["confidence"] <= 1
    assert results["doc"]["label"] == "receipt"  # "PAYMENT RECEIPT" heads the page
    assert results["photo"]["label"] == "photo"


async def test_defs_refs_nullable_and_recursive_schema_validates(
    client: openai.AsyncOpenAI, admin: Any, tiny: bytes
) -> None:
    await admin("/admin/config", {"mode": "facts"})
    node = strict_object({"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}})
    schema = {
        **strict_object(
            {
                "title": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "kind": {"enum": ["a", "b", None]},
                "count": {"type": "integer", "minimum": 2},
                "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1},
                "tree": {"$ref": "#/$defs/node"},
                "meta": {"$ref": "#/$defs/meta"},
                "orientation": {"type": "string", "enum": ["landscape", "portrait", "square"]},
            }
        ),
        "$defs": {"node": node, "meta": strict_object({"when": {"type": ["string", "null"], "format": "date"}})},
    }
    r = await client.chat.completions.create(
        model="gpt-4o", messages=user("Fill it.", (tiny, "low")), response_format=json_schema("custom", schema)
    )
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, schema)
    assert value["orientation"] == "landscape"  # from the image facts (64x48)


async def test_json_object_mode(client: openai.AsyncOpenAI, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    prompt = "Answer in JSON matching this JSON Schema: " + json.dumps(CLASSIFY_SCHEMA)
    r = await client.chat.completions.create(
        model="gpt-4o", messages=user(prompt, (tiny, "low")), response_format={"type": "json_object"}
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), CLASSIFY_SCHEMA)
    r = await client.chat.completions.create(
        model="gpt-4o", messages=user("Describe it as JSON.", (tiny, "low")), response_format={"type": "json_object"}
    )
    assert json.loads(r.choices[0].message.content or "")["text"].startswith("Local OCR model")
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's rule: json_object needs the word JSON
        await client.chat.completions.create(
            model="gpt-4o", messages=user("Describe it.", (tiny, "low")), response_format={"type": "json_object"}
        )
    assert err.value.param == "messages"


async def test_no_json_schema_rejects_like_an_old_api_version(
    client: openai.AsyncOpenAI, admin: Any, base: str, tiny: bytes
) -> None:
    await admin("/admin/config", {"mode": "facts", "json_schema": False})
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model="gpt-4o", messages=user("x", (tiny, "low")), response_format=json_schema("c", CLASSIFY_SCHEMA)
        )
    assert err.value.status_code == 400 and err.value.param == "response_format"
    assert "json_schema is enabled only for api versions 2024-08-01-preview and later" in err.value.message
    r = await client.chat.completions.create(
        model="gpt-4o", messages=user("Return JSON.", (tiny, "low")), response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    # the classic Azure path honours api-version the same way
    await admin("/admin/config", {"json_schema": True})
    for version, ok in (("2024-06-01", False), ("2024-10-21", True)):
        az = openai.AsyncAzureOpenAI(azure_endpoint=base, api_key="x", api_version=version, max_retries=0)
        try:
            if ok:
                r = await az.chat.completions.create(
                    model="my-gpt4o",
                    messages=user("x", (tiny, "low")),
                    response_format=json_schema("c", CLASSIFY_SCHEMA),
                )
                jsonschema.validate(json.loads(r.choices[0].message.content or ""), CLASSIFY_SCHEMA)
            else:
                with pytest.raises(openai.BadRequestError):
                    await az.chat.completions.create(
                        model="my-gpt4o",
                        messages=user("x", (tiny, "low")),
                        response_format=json_schema("c", CLASSIFY_SCHEMA),
                    )
        finally:
            await az.close()


async def test_compare_and_synthesis(client: openai.AsyncOpenAI, admin: Any, photo: bytes, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    images = ((photo, "low"), (tiny, "low"))
    r = await client.chat.completions.create(model="gpt-4o", messages=user("Compare [Image 1] and [Image 2].", *images))
    text = r.choices[0].message.content or ""
    assert "[Image 1]" in text and "[Image 2]" in text and "Differences:" in text and "Similarities:" in text
    r = await client.chat.completions.create(
        model="gpt-4o",
        messages=user("Write a synthesis: common themes, progression, insights, recommendations.", *images),
        response_format=json_schema("synthesis", SYNTHESIS_SCHEMA),
    )
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, SYNTHESIS_SCHEMA)
    assert all(value[k] for k in SYNTHESIS_SCHEMA["properties"])
    # text-only synthesis over earlier per-image analyses, the way the sequence task sends them
    analyses = []
    for image in (photo, tiny):
        one = await client.chat.completions.create(model="gpt-4o", messages=user("Describe.", (image, "low")))
        analyses.append(one.choices[0].message.content or "")
    prompt = "Synthesis over the sequence.\n" + "\n".join(f"[Image {i + 1}] {a}" for i, a in enumerate(analyses))
    r = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": prompt}])
    text = r.choices[0].message.content or ""
    for heading in ("Common themes:", "Progression / changes:", "Key insights:", "Recommendations:"):
        assert heading in text
    assert "[Image 1] -> [Image 2]" in text


async def test_azure_v1_path(base: str, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    c = openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="x", max_retries=0)
    try:
        r = await c.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")))
        assert r.model == "local-ocr-rapidocr"
    finally:
        await c.close()


# --------------------------------------------------------------------------------- validation


async def test_malformed_requests_get_openai_errors(base: str, admin: Any, tiny: bytes) -> None:
    url = base + "/v1/chat/completions"
    good_part = {"type": "image_url", "image_url": {"url": data_url(tiny, "image/png")}}
    cases: list[tuple[Any, str | None, str | None]] = [
        (b"{not json", None, None),
        ({"model": "gpt-4o"}, "messages", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": "hi"}]}, None, None),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{**good_part, "image_url": {"url": "http://x/a.png"}}]}],
            },
            "messages[0].content[0].image_url.url",
            "invalid_image_url",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{**good_part, "image_url": {"url": data_url(b"nope")}}]}],
            },
            "messages[0].content[0].image_url.url",
            "invalid_image_format",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{**good_part, "image_url": {**good_part["image_url"], "detail": "max"}}],
                    }
                ],
            },
            "messages[0].content[0].image_url.detail",
            "invalid_value",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            "max_tokens",
            "integer_below_min_value",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": json_schema("loose", {"type": "object", "properties": {"a": {"type": "string"}}}),
            },
            "response_format",
            None,
        ),
    ]
    async with aiohttp.ClientSession() as s:
        for body, param, code in cases:
            kwargs = (
                {"data": body, "headers": {"content-type": "application/json"}}
                if isinstance(body, bytes)
                else {"json": body}
            )
            async with s.post(url, **kwargs) as resp:
                assert resp.status == 400, body
                err = (await resp.json())["error"]
                assert set(err) >= {"message", "type", "param", "code"}
                assert err["type"] == "invalid_request_error" and err["message"]
                assert (err["param"], err["code"]) == (param, code), err
        async with s.get(base + "/nowhere") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "404"
        stats = await (await s.get(base + "/stats")).json()
        assert stats["by_status"] == {"400": len(cases)} and stats["completed"] == 0


# -------------------------------------------------------------------------------------- quota


async def test_quota_over_http(client: openai.AsyncOpenAI, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    await admin("/admin/quota", {"rpm": 1, "window_s": 60})
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=user("x", (tiny, "low")))
    assert raw.headers["x-ratelimit-remaining-requests"] == "0" and raw.headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")))
    h = err.value.response.headers
    assert 59_000 < int(h["retry-after-ms"]) <= 60_000 and h["retry-after"] == "60"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert err.value.code == "429" and "Please retry after 60 seconds" in err.value.message
    other = await client.chat.completions.create(model="other-deployment", messages=user("x", (tiny, "low")))
    assert other.choices  # quota windows are per deployment

    await admin("/admin/quota", {"tpm": 2000, "window_s": 60})
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=user("x", (tiny, "low")), max_tokens=900
    )
    charged = prompt_tokens(["x"], 1) + image_tokens(64, 48, "low") + 900
    assert first.headers["x-ratelimit-remaining-tokens"] == str(2000 - charged)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")), max_tokens=1200)
    assert "token rate limit" in err.value.message
    with pytest.raises(openai.RateLimitError) as err:  # more than the whole quota: retrying cannot help
        await client.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")), max_tokens=5000)
    assert err.value.response.headers["x-should-retry"] == "false"


# ------------------------------------------------------------------------------------- faults


def _check_200(kind: str, r: Any, schema: dict[str, Any]) -> None:
    choice = r.choices[0]
    if kind == "finish_content_filter":
        assert choice.finish_reason == "content_filter" and choice.message.content is None
        assert choice.model_extra["content_filter_results"]["sexual"]["filtered"] is True
    elif kind == "finish_length":
        assert choice.finish_reason == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice.message.content)
    elif kind == "bad_output":
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(choice.message.content), schema)
    elif kind == "refusal":
        assert choice.message.content is None and choice.message.refusal == "I'm sorry, I can't help with that."


FAULT_EXPECTATIONS: dict[str, type[BaseException] | None] = {
    "429": openai.RateLimitError,
    "500": openai.InternalServerError,
    "503": openai.InternalServerError,
    "reset": openai.APIConnectionError,
    "timeout": openai.APITimeoutError,
    "invalid_json": json.JSONDecodeError,
    "content_filter_prompt": openai.BadRequestError,
    "finish_content_filter": None,
    "finish_length": None,
    "bad_output": None,
    "refusal": None,
}


@pytest.mark.parametrize("kind", list(FAULT_EXPECTATIONS))
async def test_each_fault_kind_is_visible_to_the_sdk(kind: str, base: str, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    await admin("/admin/faults", {"script": [kind], "timeout_s": 30, "retry_after_ms": 150})
    c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=0.5)
    expected = FAULT_EXPECTATIONS[kind]
    try:
        kwargs: dict[str, Any] = {"model": "gpt-4o", "messages": user("x", (tiny, "low"))}
        kwargs["response_format"] = json_schema("c", CLASSIFY_SCHEMA)
        if expected is None:
            _check_200(kind, await c.chat.completions.create(**kwargs), CLASSIFY_SCHEMA)
        else:
            with pytest.raises(expected) as err:
                await c.chat.completions.create(**kwargs)
            if kind == "reset":
                assert not isinstance(err.value, openai.APITimeoutError)
            if isinstance(err.value, openai.APIStatusError):
                assert err.value.status_code == (int(kind) if kind.isdigit() else 400)
            if kind == "429":
                assert err.value.response.headers["retry-after-ms"] == "150"
            if kind == "content_filter_prompt":
                assert err.value.code == "content_filter"
                body = err.value.body
                assert body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
                assert body["innererror"]["content_filter_result"]["sexual"] == {"filtered": True, "severity": "medium"}
        # the script is used up: the next request is answered normally
        ok = await c.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")))
        assert ok.choices[0].finish_reason == "stop"
    finally:
        await c.close()
    for _ in range(40):
        stats = await admin("/stats", method="GET")
        if kind != "timeout" or stats["by_status"].get("timeout"):
            break
        await asyncio.sleep(0.05)
    assert stats["faults_injected"] == {kind: 1}
    if kind == "timeout":
        assert stats["by_status"].get("timeout") == 1  # the held request noticed the client leave


async def test_fault_rates_are_seeded_and_model_restricted(client: openai.AsyncOpenAI, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})

    async def outcomes(model: str, n: int) -> list[str]:
        out = []
        for _ in range(n):
            try:
                await client.chat.completions.create(model=model, messages=user("x", (tiny, "low")))
                out.append("ok")
            except openai.InternalServerError:
                out.append("500")
        return out

    await admin("/admin/faults", {"rates": {"500": 0.5}, "seed": 7})
    first = await outcomes("gpt-4o", 8)
    await admin("/admin/faults", {"rates": "500:0.5", "seed": 7})
    assert await outcomes("gpt-4o", 8) == first and set(first) == {"ok", "500"}
    await admin("/admin/faults", {"rates": {"500": 1.0}, "model": "primary"})
    assert await outcomes("primary", 2) == ["500", "500"]
    assert await outcomes("fallback", 2) == ["ok", "ok"]
    state = await admin("/admin/faults", method="GET")
    assert state["faults"]["model"] == "primary" and state["faults"]["rates"] == {"500": 1.0}


async def test_latency_and_stats(client: openai.AsyncOpenAI, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts", "latency_ms": 150})
    await admin("/admin/faults", {"script": ["ok", "500"]})
    t0 = time.perf_counter()
    r1 = await client.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")))
    assert time.perf_counter() - t0 >= 0.15
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")))
    r3 = await client.chat.completions.create(model="gpt-4o-mini", messages=user("yy", (tiny, "low")))
    stats = await admin("/stats", method="GET")
    assert stats["requests"] == 3 and stats["completed"] == 2
    assert stats["by_status"] == {"200": 2, "500": 1}
    assert stats["by_model"] == {"gpt-4o": 2, "gpt-4o-mini": 1}
    assert stats["faults_injected"] == {"500": 1}
    assert r1.usage and r3.usage
    assert stats["tokens"] == {
        "prompt": r1.usage.prompt_tokens + r3.usage.prompt_tokens,
        "completion": r1.usage.completion_tokens + r3.usage.completion_tokens,
    }
    health = await admin("/health", method="GET")
    assert health["status"] == "ok" and health["mode"] == "facts"


# ---------------------------------------------------------------------------------------- CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_cli_starts_fast_and_detects_a_client_leaving(tiny: bytes) -> None:
    port = _free_port()
    args = [sys.executable, "-m", "local.model_server", "--port", str(port), "--mode", "facts", "--rpm", "50"]
    args += ["--fault-script", "timeout", "--fault-timeout-s", "30", "--seed", "3"]
    proc = await asyncio.create_subprocess_exec(*args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(base + "/health") as resp:
                        health = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    assert time.perf_counter() - t0 < 10, "server did not start"
                    await asyncio.sleep(0.1)
            assert health["mode"] == "facts"
            quota = await (await s.get(base + "/admin/quota")).json()
            assert quota["quota"]["rpm"] == 50
            c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=0.5)
            with pytest.raises(openai.APITimeoutError):
                await c.chat.completions.create(model="gpt-4o", messages=user("x", (tiny, "low")))
            await c.close()
            for _ in range(40):  # run_app does not cancel handlers: the server polls for the hang-up
                stats = await (await s.get(base + "/stats")).json()
                if stats["by_status"].get("timeout"):
                    break
                await asyncio.sleep(0.05)
            assert stats["by_status"] == {"timeout": 1}
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    bad = await asyncio.create_subprocess_exec(
        *args[:3], "--faults", "boom:0.5", cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(bad.communicate(), 30)
    assert bad.returncode == 2 and b"unknown fault kind" in err


def test_a_short_window_admits_the_rate_scaled_to_it():
    """Azure evaluates over 1-10 s windows: 600 RPM is 100 requests per 10 s, not 600."""
    now = [1000.0]
    q = Quota(QuotaLimits(rpm=600, tpm=60_000, window_s=10), lambda: now[0])
    for _ in range(10):
        assert q.try_acquire("m", 1000).allowed  # 10 x 1000 = 60,000 x 10/60
    refused = q.try_acquire("m", 1000)
    assert not refused.allowed and refused.reason == "tokens" and refused.retry_after_s == 10
    assert q.try_acquire("m", 20_000).reason == "too_large"  # more than one 10 s window holds
    now[0] += 10
    assert q.try_acquire("m", 1000).allowed
