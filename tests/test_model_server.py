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

from local.model_admin import ModelAdmin, bounded_number, read_token
from local.model_faults import FaultSpecError, parse_rates, parse_script
from local.model_quota import Quota, QuotaLimits
from local.model_server import SERVER_KEY, ModelServerConfig, build_app, check_schema
from local.model_tokens import DEFAULT_SPEC, parse_image_tokens
from local.ocr_answers import Analysis
from local.ocr_engine import Fragment, OcrEngine, decode, reading_order, resolve_detail
from local.ocr_parse import parse_date, parse_number
from local.schema_fill import SchemaError, SchemaFiller
from shared.catalog import load_catalog
from shared.tokens import prompt_tokens, text_tokens
from tests.constants import TEST_DEPLOYMENT, TEST_FALLBACK_MODEL
from tests.hostile_inputs import exponential_schema

STAND_IN_RULE = parse_image_tokens(DEFAULT_SPEC)  # how the stand-in counts unless told otherwise

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
def admin_token(server: TestServer) -> str:
    return server.app[SERVER_KEY].config.admin_token


@pytest.fixture
async def admin(base: str, admin_token: str) -> AsyncIterator[Callable[..., Any]]:
    """POST/GET JSON to the server's admin endpoints (with this start's token); every test starts from a reset server."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:

        async def call(path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
            if body is None and method == "POST":
                body = {}  # admin POSTs are JSON, even when they carry nothing
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
    im = decode((CORPUS / "orientation" / "landscape_6.jpg").read_bytes(), 0, "high", STAND_IN_RULE)
    assert (im.facts.width, im.facts.height, im.facts.orientation) == (600, 450, "landscape")
    assert im.view.size == (600, 450) and im.facts.tokens == STAND_IN_RULE.count(600, 450, "high")
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


def test_quota_timeline_keeps_every_decision_since_the_last_reset() -> None:
    """bench.multi reads it to show where a run's time went: when each call was admitted or refused."""
    clock = FakeClock()
    q = Quota(QuotaLimits(tpm=1000, window_s=60, model="primary"), clock)
    clock.now += 5
    q.reset()
    clock.now += 2
    assert q.try_acquire("primary", 600).allowed
    clock.now += 1.5
    assert not q.try_acquire("primary", 500).allowed
    assert q.try_acquire("fallback", 10).allowed  # no quota applies to it: nothing to show
    assert [(d.at_s, d.tokens, d.allowed) for d in q.timeline] == [(2.0, 600, True), (3.5, 500, False)]
    q.configure(QuotaLimits(tpm=1000, window_s=60))
    assert not q.timeline


# ------------------------------------------------------------------------- answers over HTTP


async def test_text_answer_reads_the_document_in_reading_order(
    client: openai.AsyncOpenAI, admin: Any, oyo: bytes, ocr_engine: OcrEngine
) -> None:
    prompt = "Read this document."
    r = await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=user(prompt, (oyo, "high")))
    text = r.choices[0].message.content or ""
    assert r.object == "chat.completion" and r.model.startswith("local-ocr")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.refusal is None
    assert text.startswith("Local OCR stand-in (not a vision-language model). Image: 724x1024 portrait")
    assert "OYO" in text and "IBZY2087" in text
    assert text.index("PAYMENT RECEIPT") < text.index("Booking ID") < text.index("Grand Total")
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_tokens([prompt], messages=1) + STAND_IN_RULE.count(724, 1024, "high")
    assert r.usage.completion_tokens == text_tokens(text)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert ocr_engine.loads == 1


async def test_usage_uses_auto_detail_per_image(client: openai.AsyncOpenAI, admin: Any, photo: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    small = jpeg_bytes(CORPUS / "orientation" / "landscape_1.jpg", 400)  # 400x300 -> auto = low
    r = await client.chat.completions.create(
        model=TEST_DEPLOYMENT, messages=user("x", (photo, "auto"), (small, "auto"))
    )
    assert r.usage is not None
    expected = prompt_tokens(["x"], 1) + STAND_IN_RULE.count(600, 450, "high") + STAND_IN_RULE.count(400, 300, "low")
    assert r.usage.prompt_tokens == expected


async def test_invoice_schema_is_valid_and_filled(
    client: openai.AsyncOpenAI, admin: Any, base: str, flipkart: bytes
) -> None:
    """Also checks the event loop keeps serving /health while OCR runs in its thread."""
    task = asyncio.create_task(
        client.chat.completions.create(
            model=TEST_DEPLOYMENT,
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
        model=TEST_DEPLOYMENT,
        messages=user("Extract the invoice.", (oyo, "high")),
        response_format=json_schema("invoice", INVOICE_SCHEMA),
    )
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, INVOICE_SCHEMA)
    assert value["total"] == 1939.0
    assert value["invoice_date"] == "2017-12-31"
    # No invoice_number check: this receipt labels its number "Booking ID", which no general
    # invoice vocabulary maps to BT-1 (the stand-in used to, tuned on this very document).
    assert value["due_date"] is None


async def test_classify_enum_with_confidence(client: openai.AsyncOpenAI, admin: Any, oyo: bytes, photo: bytes) -> None:
    results = {}
    for name, image in (("doc", oyo), ("photo", photo)):
        r = await client.chat.completions.create(
            model=TEST_DEPLOYMENT,
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
        model=TEST_DEPLOYMENT, messages=user("Fill it.", (tiny, "low")), response_format=json_schema("custom", schema)
    )
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, schema)
    assert value["orientation"] == "landscape"  # from the image facts (64x48)


def _ocr_doc(*rows: list[str]) -> Analysis:
    """Synthetic OCR: one line per row, its fragments 200 px apart, so no corpus document is involved."""
    frags = [
        Fragment(text, 0.99, 10 + 200 * j, 30 * i, 10 + 200 * j + 8 * len(text), 30 * i + 20)
        for i, row in enumerate(rows)
        for j, text in enumerate(row)
    ]
    image = decode(png_bytes((600, 800), (255, 255, 255)), 0, "high", STAND_IN_RULE)
    image.lines = reading_order(frags)
    return Analysis("Extract the invoice.", [image])


@pytest.mark.parametrize(
    ("rows", "number", "total", "date"),
    [
        (
            [["Facture n° FA-2024-117"], ["Date : 03/02/2024"], ["Net à payer", "1234,50 €"]],
            "FA-2024-117",
            1234.5,
            "2024-02-03",
        ),
        (
            [["Rechnungsnummer:", "R-88412"], ["Rechnungsdatum", "5. März 2023"], ["Gesamtbetrag", "99,90 EUR"]],
            "R-88412",
            99.9,
            "2023-03-05",
        ),
        (
            [["Número de factura", "F-77"], ["Fecha de factura", "12/10/2022"], ["Total a pagar", "450.00"]],
            "F-77",
            450.0,
            "2022-10-12",
        ),
        (
            [["INVOICE #: 2024-0042"], ["Issue date", "2024-01-31"], ["Amount due for payment", "$1,050.00"]],
            "2024-0042",
            1050.0,
            "2024-01-31",
        ),
    ],
)
def test_general_invoice_labels_in_several_languages(
    rows: list[list[str]], number: str, total: float, date: str
) -> None:
    value = SchemaFiller(INVOICE_SCHEMA, _ocr_doc(*rows)).fill()
    assert (value["invoice_number"], value["total"], value["invoice_date"]) == (number, total, date)


def _wide_recursive_schema(width: int = 12) -> dict[str, Any]:
    """Every node has `width` required children of its own kind: 12^8 values to the depth cap."""
    node = {"type": "object", "properties": {f"c{i}": {"$ref": "#/$defs/n"} for i in range(width)}}
    node["required"] = list(node["properties"])
    return {"type": "object", "properties": {"root": {"$ref": "#/$defs/n"}}, "required": ["root"], "$defs": {"n": node}}


def test_schema_filling_is_bounded_on_exponential_and_cyclic_schemas() -> None:
    a = Analysis("Fill it.", [], ocr=False)
    filler = SchemaFiller(exponential_schema(), a)
    assert filler.fill() == {"v": ""}
    assert filler.steps < 200  # one step per definition, not 2^40 branches
    cyclic = {"type": "object", "properties": {"v": {"$ref": "#/$defs/a"}}, "required": ["v"]}
    cyclic["$defs"] = {"a": {"oneOf": [{"$ref": "#/$defs/a"}, {"type": "string"}]}}
    assert SchemaFiller(cyclic, a).fill() == {"v": None}  # the cycle allows anything, so null
    wide = SchemaFiller(_wide_recursive_schema(), a)
    with pytest.raises(SchemaError, match="steps"):
        wide.fill()
    assert wide.steps == SchemaFiller.MAX_STEPS + 1
    long = {"type": "object", "properties": {"s": {"type": "string", "minLength": 10**12}}, "required": ["s"]}
    with pytest.raises(SchemaError, match="minLength"):
        SchemaFiller(long, a).fill()
    huge = {"type": "object", "properties": {f"p{i}": {} for i in range(200_000)}}
    assert "nodes" in (check_schema(huge, strict=False) or "")


@pytest.mark.timeout(120)  # a regression would otherwise hang the module for the default 600 s
@pytest.mark.parametrize("case", ["exponential", "wide", "json_object"])
async def test_hostile_schemas_are_answered_or_refused(base: str, admin: Any, tiny: bytes, case: str) -> None:
    await admin("/admin/config", {"mode": "facts"})
    schema = exponential_schema() if case != "wide" else _wide_recursive_schema()
    body: dict[str, Any] = {"model": TEST_DEPLOYMENT, "messages": user("Fill it.", (tiny, "low"))}
    if case == "json_object":
        body["messages"] = user("Answer in JSON matching this JSON Schema: " + json.dumps(schema), (tiny, "low"))
        body["response_format"] = {"type": "json_object"}
    else:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "h", "schema": schema, "strict": False},
        }
    status, answer = await _raw(base, body)
    if case == "wide":
        assert status == 400, answer
        assert answer["error"]["param"] == "response_format"
    else:
        assert status == 200, answer
        assert json.loads(answer["choices"][0]["message"]["content"]) == {"v": ""}


async def test_json_object_mode(client: openai.AsyncOpenAI, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    prompt = "Answer in JSON matching this JSON Schema: " + json.dumps(CLASSIFY_SCHEMA)
    r = await client.chat.completions.create(
        model=TEST_DEPLOYMENT, messages=user(prompt, (tiny, "low")), response_format={"type": "json_object"}
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), CLASSIFY_SCHEMA)
    r = await client.chat.completions.create(
        model=TEST_DEPLOYMENT,
        messages=user("Describe it as JSON.", (tiny, "low")),
        response_format={"type": "json_object"},
    )
    assert json.loads(r.choices[0].message.content or "")["text"].startswith("Local OCR stand-in")
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's rule: json_object needs the word JSON
        await client.chat.completions.create(
            model=TEST_DEPLOYMENT, messages=user("Describe it.", (tiny, "low")), response_format={"type": "json_object"}
        )
    assert err.value.param == "messages"


async def test_no_json_schema_rejects_like_an_old_api_version(
    client: openai.AsyncOpenAI, admin: Any, base: str, tiny: bytes
) -> None:
    await admin("/admin/config", {"mode": "facts", "json_schema": False})
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")), response_format=json_schema("c", CLASSIFY_SCHEMA)
        )
    assert err.value.status_code == 400 and err.value.param == "response_format"
    assert "json_schema is enabled only for api versions 2024-08-01-preview and later" in err.value.message
    r = await client.chat.completions.create(
        model=TEST_DEPLOYMENT, messages=user("Return JSON.", (tiny, "low")), response_format={"type": "json_object"}
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
    r = await client.chat.completions.create(
        model=TEST_DEPLOYMENT, messages=user("Compare [Image 1] and [Image 2].", *images)
    )
    text = r.choices[0].message.content or ""
    assert "[Image 1]" in text and "[Image 2]" in text and "Differences:" in text and "Similarities:" in text
    r = await client.chat.completions.create(
        model=TEST_DEPLOYMENT,
        messages=user("Write a synthesis: common themes, progression, insights, recommendations.", *images),
        response_format=json_schema("synthesis", SYNTHESIS_SCHEMA),
    )
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, SYNTHESIS_SCHEMA)
    assert all(value[k] for k in SYNTHESIS_SCHEMA["properties"])
    # text-only synthesis over earlier per-image analyses, the way the sequence task sends them
    analyses = []
    for image in (photo, tiny):
        one = await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("Describe.", (image, "low")))
        analyses.append(one.choices[0].message.content or "")
    prompt = "Synthesis over the sequence.\n" + "\n".join(f"[Image {i + 1}] {a}" for i, a in enumerate(analyses))
    r = await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=[{"role": "user", "content": prompt}])
    text = r.choices[0].message.content or ""
    for heading in ("Common themes:", "Progression / changes:", "Key insights:", "Recommendations:"):
        assert heading in text
    assert "[Image 1] -> [Image 2]" in text


async def test_azure_v1_path(base: str, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    c = openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="x", max_retries=0)
    try:
        r = await c.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")))
        assert r.model == "local-ocr-rapidocr"
    finally:
        await c.close()


# --------------------------------------------------------------------------------- validation


async def test_malformed_requests_get_openai_errors(base: str, admin: Any, tiny: bytes) -> None:
    url = base + "/v1/chat/completions"
    good_part = {"type": "image_url", "image_url": {"url": data_url(tiny, "image/png")}}
    cases: list[tuple[Any, str | None, str | None]] = [
        (b"{not json", None, None),
        ({"model": TEST_DEPLOYMENT}, "messages", "missing_required_parameter"),
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
    raw = await client.chat.completions.with_raw_response.create(
        model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low"))
    )
    assert raw.headers["x-ratelimit-remaining-requests"] == "0" and raw.headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")))
    h = err.value.response.headers
    assert 59_000 < int(h["retry-after-ms"]) <= 60_000 and h["retry-after"] == "60"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert err.value.code == "429" and "Please retry after 60 seconds" in err.value.message
    other = await client.chat.completions.create(model="other-deployment", messages=user("x", (tiny, "low")))
    assert other.choices  # quota windows are per deployment
    timeline = (await admin("/admin/quota/timeline", method="GET"))["timeline"]
    assert [row[2] for row in timeline] == [True, False, True]  # the refusal is on it, then the other deployment
    assert 0 <= timeline[0][0] <= timeline[1][0] <= timeline[2][0]

    await admin("/admin/quota", {"tpm": 2000, "window_s": 60})
    first = await client.chat.completions.with_raw_response.create(
        model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")), max_tokens=900
    )
    charged = prompt_tokens(["x"], 1) + STAND_IN_RULE.count(64, 48, "low") + 900
    assert first.headers["x-ratelimit-remaining-tokens"] == str(2000 - charged)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")), max_tokens=1200)
    assert "token rate limit" in err.value.message
    with pytest.raises(openai.RateLimitError) as err:  # more than the whole quota: retrying cannot help
        await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")), max_tokens=5000)
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
        kwargs: dict[str, Any] = {"model": TEST_DEPLOYMENT, "messages": user("x", (tiny, "low"))}
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
                assert "high demand" in err.value.message  # capacity, not the quota (whose headers it leaves alone)
            if kind == "content_filter_prompt":
                assert err.value.code == "content_filter"
                body = err.value.body
                assert body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
                assert body["innererror"]["content_filter_result"]["sexual"] == {"filtered": True, "severity": "medium"}
        # the script is used up: the next request is answered normally
        ok = await c.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")))
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
    first = await outcomes(TEST_DEPLOYMENT, 8)
    await admin("/admin/faults", {"rates": "500:0.5", "seed": 7})
    assert await outcomes(TEST_DEPLOYMENT, 8) == first and set(first) == {"ok", "500"}
    await admin("/admin/faults", {"rates": {"500": 1.0}, "model": "primary"})
    assert await outcomes("primary", 2) == ["500", "500"]
    assert await outcomes("fallback", 2) == ["ok", "ok"]
    state = await admin("/admin/faults", method="GET")
    assert state["faults"]["model"] == "primary" and state["faults"]["rates"] == {"500": 1.0}


async def test_latency_and_stats(client: openai.AsyncOpenAI, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts", "latency_ms": 150})
    await admin("/admin/faults", {"script": ["ok", "500"]})
    t0 = time.perf_counter()
    r1 = await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")))
    assert time.perf_counter() - t0 >= 0.15
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")))
    r3 = await client.chat.completions.create(model=TEST_FALLBACK_MODEL, messages=user("yy", (tiny, "low")))
    stats = await admin("/stats", method="GET")
    assert stats["requests"] == 3 and stats["completed"] == 2
    assert stats["by_status"] == {"200": 2, "500": 1}
    assert stats["by_model"] == {TEST_DEPLOYMENT: 2, TEST_FALLBACK_MODEL: 1}
    assert stats["faults_injected"] == {"500": 1}
    assert r1.usage and r3.usage
    assert stats["tokens"] == {
        "prompt": r1.usage.prompt_tokens + r3.usage.prompt_tokens,
        "completion": r1.usage.completion_tokens + r3.usage.completion_tokens,
    }
    health = await admin("/health", method="GET")
    assert health["status"] == "ok" and health["mode"] == "facts"


# ------------------------------------------------------------------------------------- admin API


ADMIN_POSTS = ["/admin/reset", "/admin/config", "/admin/quota", "/admin/faults"]


@pytest.mark.parametrize("path", ADMIN_POSTS)
async def test_admin_refuses_requests_without_the_token(base: str, admin: Any, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            async with s.post(base + path, json={"latency_ms": 5}, headers=headers) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        async with s.get(base + "/admin/config") as r:
            assert r.status == 401
    assert (await admin("/admin/config", method="GET"))["config"]["latency_ms"] == 0  # nothing changed


@pytest.mark.parametrize("path", ADMIN_POSTS)
async def test_admin_refuses_what_a_browser_page_could_send(base: str, admin_token: str, admin: Any, path: str) -> None:
    """A cross-site form or fetch without preflight can only send text/plain, forms or multipart."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession() as s:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            async with s.post(base + path, data='{"latency_ms": 5}', headers={**auth, "Content-Type": ctype}) as r:
                assert r.status == 415, (ctype, await r.text())
        async with s.post(base + path, data=b'{"latency_ms": 5}', headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 401  # without the token it does not even get that far
    assert (await admin("/admin/config", method="GET"))["config"]["latency_ms"] == 0


async def test_admin_token_header_that_is_not_utf8_is_401(base: str, admin: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
    body = b'{"latency_ms": 5}'
    writer.write(
        b"POST /admin/config HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer \xff\xfe\x80\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"401"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/admin/config", {"latency_ms": 1e308}),
        ("/admin/config", {"latency_ms": 600_001}),
        ("/admin/config", {"jitter_ms": float("inf")}),
        ("/admin/config", {"latency_ms": -1}),
        ("/admin/config", {"latency_ms": "5"}),
        ("/admin/config", {"latency_ms": True}),
        ("/admin/config", {"default_max_tokens": 10**30}),
        ("/admin/config", {"default_max_tokens": 0}),
        ("/admin/quota", {"window_s": 1e308}),
        ("/admin/quota", {"rpm": 10**20}),
        ("/admin/quota", {"tpm": -5}),
        ("/admin/quota", {"model": "m" * 5000}),
        ("/admin/faults", {"timeout_s": 1e308}),
        ("/admin/faults", {"retry_after_ms": 1e12}),
        ("/admin/faults", {"seed": 1e300}),
        ("/admin/faults", {"script": ["ok"] * 10_001}),
        ("/admin/faults", {"rates": {"500": float("nan")}}),
    ],
)
async def test_admin_numbers_are_bounded(base: str, admin_token: str, admin: Any, path: str, body: dict) -> None:
    raw = json.dumps(body).encode()  # Infinity/NaN as Python's json writes them
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(base + path, data=raw, headers=headers) as r:
            assert r.status == 400, await r.text()
            assert (await r.json())["error"]["message"]
    config = (await admin("/admin/config", method="GET"))["config"]
    assert config["latency_ms"] == 0 and config["jitter_ms"] == 0


async def test_admin_body_nested_too_deep_is_400(base: str, admin_token: str, admin: Any) -> None:
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/admin/config", data=b"[" * 100_000, headers=headers) as r:
            assert r.status == 400


def test_bounded_number_keeps_whole_numbers_whole() -> None:
    assert bounded_number({"n": 3.0}, "n", 1, lo=0, hi=10, integer=True) == 3
    assert bounded_number({}, "n", 1.5, lo=0, hi=10) == 1.5
    with pytest.raises(ValueError, match="whole"):
        bounded_number({"n": 2.5}, "n", 1, lo=0, hi=10, integer=True)


# ---------------------------------------------------------------------------------------- CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration  # starts the server as a process
async def test_cli_starts_fast_and_detects_a_client_leaving(tiny: bytes, tmp_path: Path) -> None:
    port = _free_port()
    token_file = tmp_path / "admin" / "token"
    args = [sys.executable, "-m", "local.model_server", "--port", str(port), "--mode", "facts", "--rpm", "50"]
    args += [
        "--fault-script",
        "timeout",
        "--fault-timeout-s",
        "30",
        "--seed",
        "3",
        "--admin-token-file",
        str(token_file),
    ]
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
            assert (await s.get(base + "/admin/quota")).status == 401
            assert token_file.stat().st_mode & 0o777 == 0o600
            admin = ModelAdmin(base, read_token(token_file))
            quota = await asyncio.to_thread(admin.call, "/admin/quota")
            assert quota["quota"]["rpm"] == 50
            c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=0.5)
            with pytest.raises(openai.APITimeoutError):
                await c.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")))
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


# ------------------------------------------------------------------ the model it plays (issue 11)
# Reasoning parameters and tokens, a dated model name, its own image-token formula, known deployments.

DATED = "gpt-5.4-mini-2026-03-17"


async def _raw(base: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(base + path, json=body) as resp:
        return resp.status, await resp.json()


async def test_reasoning_mode_refuses_chat_parameters_with_azures_bodies(base: str, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    await admin("/admin/model", {"reasoning": True, "model_name": DATED})
    msgs = user("x", (tiny, "low"))
    cases = [
        (
            {"max_tokens": 50},
            "max_tokens",
            "unsupported_parameter",
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
        ),
        (
            {"max_completion_tokens": 50, "temperature": 0},
            "temperature",
            "unsupported_value",
            "Unsupported value: 'temperature' does not support 0 with this model. "
            "Only the default (1) value is supported.",
        ),
        (
            {"reasoning_effort": "minimal"},
            "reasoning_effort",
            "unsupported_value",
            "Unsupported value: 'minimal' is not supported with the 'gpt-5.4-mini' model. "
            "Supported values are: 'none', 'low', 'medium', and 'high'.",
        ),
        (
            {"reasoning_effort": "max"},
            "reasoning_effort",
            "invalid_value",
            "Invalid value: 'max'. Supported values are: 'none', 'minimal', 'low', 'medium', 'high', and 'xhigh'.",
        ),
    ]
    for extra, param, code, message in cases:
        status, body = await _raw(base, {"model": "vision", "messages": msgs, **extra})
        assert status == 400, extra
        assert body == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}, (
            extra
        )
    # the same request in the reasoning style is answered; temperature 1 (the default) is accepted
    ok = {"model": "vision", "messages": msgs, "max_completion_tokens": 500, "temperature": 1}
    status, body = await _raw(base, {**ok, "reasoning_effort": "low"})
    assert status == 200 and body["model"] == DATED, body
    # the openai SDK sees the refusal as a BadRequestError carrying the code the service adapts on
    c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model="vision", messages=msgs, max_tokens=10, temperature=0)
        assert err.value.code == "unsupported_parameter" and err.value.param == "max_tokens"
    finally:
        await c.close()
    # a chat model refuses reasoning_effort, and takes max_tokens and temperature as before
    await admin("/admin/model", {"reasoning": False})
    status, body = await _raw(base, {"model": "vision", "messages": msgs, "reasoning_effort": "low"})
    assert (status, body["error"]["param"], body["error"]["code"]) == (
        400,
        "reasoning_effort",
        "unsupported_parameter",
    )
    status, body = await _raw(base, {"model": "vision", "messages": msgs, "max_tokens": 50, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    stats = await admin("/stats", method="GET")
    assert stats["by_status"] == {"400": len(cases) + 2, "200": 2} and stats["completed"] == 2


async def test_reasoning_tokens_grow_with_effort_and_spend_the_completion_budget(
    base: str, admin: Any, tiny: bytes
) -> None:
    await admin("/admin/config", {"mode": "facts"})
    await admin("/admin/model", {"reasoning": True, "model_name": DATED, "reasoning_tokens": {"low": 40, "high": 400}})
    msgs = user("Describe this image.", (tiny, "low"))
    c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    try:
        answers = {}
        for effort in ("low", "medium", "high"):
            answers[effort] = await c.chat.completions.create(
                model="vision", messages=msgs, max_completion_tokens=2000, reasoning_effort=effort
            )
        low, medium, high = (answers[e] for e in ("low", "medium", "high"))
        reasoning = [a.usage.completion_tokens_details.reasoning_tokens for a in (low, medium, high)]
        assert reasoning == [40, 256, 400]  # 256: the built-in medium, not overridden
        visible = text_tokens(low.choices[0].message.content or "")
        assert visible > 0 and all(
            a.choices[0].message.content == low.choices[0].message.content for a in answers.values()
        )
        for a, r in zip((low, medium, high), reasoning, strict=True):
            assert a.model == DATED and a.choices[0].finish_reason == "stop"
            assert a.usage.completion_tokens == r + visible  # reasoning is billed inside completion_tokens
            assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
            assert a.usage.prompt_tokens_details.cached_tokens == 0
        # a request that names no effort gets the model's default (medium)
        d = await c.chat.completions.create(model="vision", messages=msgs, max_completion_tokens=2000)
        assert d.usage.completion_tokens_details.reasoning_tokens == 256
        # reasoning that uses the whole budget leaves an empty answer cut off by length
        cut = await c.chat.completions.create(
            model="vision", messages=msgs, max_completion_tokens=400, reasoning_effort="high"
        )
        assert cut.choices[0].message.content == "" and cut.choices[0].finish_reason == "length"
        assert cut.usage.completion_tokens == 400 and cut.usage.completion_tokens_details.reasoning_tokens == 400
        # reasoning that leaves less than the answer needs: the answer is cut at what is left
        part = await c.chat.completions.create(
            model="vision", messages=msgs, max_completion_tokens=40 + visible - 1, reasoning_effort="low"
        )
        assert part.choices[0].finish_reason == "length"
        assert part.usage.completion_tokens <= 40 + visible - 1
        assert 0 < len(part.choices[0].message.content or "") < len(low.choices[0].message.content or "")
        # effort none thinks not at all
        none = await c.chat.completions.create(
            model="vision", messages=msgs, max_completion_tokens=2000, reasoning_effort="none"
        )
        assert none.usage.completion_tokens_details.reasoning_tokens == 0 and none.usage.completion_tokens == visible
    finally:
        await c.close()
    stats = await admin("/stats", method="GET")
    assert stats["reasoning_tokens"] == 40 + 256 + 400 + 256 + 400 + 40


async def test_quota_charges_prompt_plus_max_completion_tokens(base: str, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    await admin("/admin/model", {"reasoning": True})
    await admin("/admin/quota", {"tpm": 100_000, "window_s": 60})
    c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    try:
        raw = await c.chat.completions.with_raw_response.create(
            model="vision", messages=user("x", (tiny, "low")), max_completion_tokens=3000, reasoning_effort="low"
        )
    finally:
        await c.close()
    r = raw.parse()
    assert r.usage is not None and r.usage.completion_tokens < 3000
    # charged at admission with the budget it asked for, not what it used (reasoning included)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100_000 - r.usage.prompt_tokens - 3000


async def test_image_tokens_follow_the_spec_not_the_model_name(base: str, admin: Any, oyo: bytes, tiny: bytes) -> None:
    """The stand-in counts with its own formula: a patch model under a name the catalog does not know."""
    await admin("/admin/config", {"mode": "facts"})
    text = prompt_tokens(["x"], messages=1)

    async def prompt(data: bytes, detail: str) -> int:
        status, body = await _raw(base, {"model": "m", "messages": user("x", (data, detail))})
        assert status == 200, body
        return body["usage"]["prompt_tokens"] - text

    # default: tiles of 85 + 170 each, as before (oyo 724x1024 high: 2x2 tiles after the 768 short side)
    assert await prompt(oyo, "high") == 85 + 4 * 170 and await prompt(tiny, "low") == 85
    await admin("/admin/model", {"model_name": "acme-vision-2027-01-01", "image_tokens": "patch:1.9"})
    assert await prompt(oyo, "high") == 1399  # ceil(23 x 32 patches x 1.9); detail does not matter
    assert await prompt(oyo, "low") == 1399
    assert await prompt(tiny, "low") == 8  # 2 x 2 patches x 1.9 = 7.6
    await admin("/admin/model", {"image_tokens": "patch:1:100"})
    assert await prompt(oyo, "high") == 88  # shrunk to 8 x 11 patches to fit the cap of 100
    await admin("/admin/model", {"image_tokens": "tile:100:200"})
    assert await prompt(oyo, "high") == 100 + 4 * 200 and await prompt(tiny, "low") == 100
    # the model name alone changes nothing: gpt-4.1-mini is a patch model in the catalog, not here
    await admin("/admin/model", {"model_name": "gpt-4.1-mini-2025-04-14", "image_tokens": "tile:85:170"})
    assert load_catalog().image_tokens_for("gpt-4.1-mini").kind == "patch"
    assert await prompt(oyo, "high") == 85 + 4 * 170


async def test_unknown_deployments_get_azures_404(base: str, admin: Any, tiny: bytes) -> None:
    await admin("/admin/config", {"mode": "facts"})
    await admin("/admin/model", {"deployments": "vision,backup"})
    body = {"messages": user("x", (tiny, "low"))}
    not_found = {
        "error": {
            "code": "DeploymentNotFound",
            "message": "The API deployment for this resource does not exist. If you created the deployment within "
            "the last 5 minutes, please wait a moment and try again.",
        }
    }
    assert await _raw(base, {"model": TEST_DEPLOYMENT, **body}) == (404, not_found)
    assert await _raw(base, body, "/openai/deployments/retired/chat/completions?api-version=2024-10-21") == (
        404,
        not_found,
    )
    # Azure routes by deployment first: a broken body for a missing deployment is still a 404
    assert await _raw(base, {"model": "gone", "messages": []}) == (404, not_found)
    status, ok = await _raw(base, body, "/openai/deployments/backup/chat/completions?api-version=2024-10-21")
    assert status == 200 and ok["model"] == "local-ocr-rapidocr"
    c = openai.AsyncOpenAI(base_url=f"{base}/openai/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.NotFoundError) as err:
            await c.chat.completions.create(model=TEST_DEPLOYMENT, messages=user("x", (tiny, "low")))
        assert err.value.code == "DeploymentNotFound"
        assert (await c.chat.completions.create(model="vision", messages=user("x", (tiny, "low")))).choices
    finally:
        await c.close()
    stats = await admin("/stats", method="GET")
    assert stats["by_status"] == {"404": 4, "200": 2} and stats["completed"] == 2


async def test_admin_model_validates_and_reset_restores_the_start(base: str, admin_token: str, admin: Any) -> None:
    start = (await admin("/admin/model", method="GET"))["model"]
    assert start["model_name"] == "local-ocr-rapidocr" and start["reasoning"] is False
    assert start["image_tokens"] == "tile:85:170:512" and start["deployments"] == []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as s:
        for bad in (
            {"image_tokens": "hex:3"},
            {"image_tokens": "patch:-1"},
            {"reasoning": "yes"},
            {"reasoning_efforts": ["low", "turbo"]},
            {"default_reasoning_effort": "xhigh"},  # not among the efforts this model takes
            {"reasoning_tokens": {"low": -1}},
            {"model_name": ""},
            {"deployments": [1, 2]},
            {"temperature": 0},
        ):
            async with s.post(base + "/admin/model", json=bad) as resp:
                assert resp.status == 400, bad
                assert (await resp.json())["error"]["message"]
    assert (await admin("/admin/model", method="GET"))["model"] == start  # nothing half-applied
    changed = await admin(
        "/admin/model",
        {
            "model_name": DATED,
            "reasoning": True,
            "reasoning_efforts": "low,high,xhigh",
            "default_reasoning_effort": "low",
        },
    )
    assert changed["model"]["reasoning_efforts"] == ["low", "high", "xhigh"]
    assert (await admin("/health", method="GET"))["model"] == DATED
    await admin("/admin/reset")
    assert (await admin("/admin/model", method="GET"))["model"] == start


def test_spend_puts_reasoning_first() -> None:
    from local.model_params import Completion, spend

    assert spend("abcdefgh", 2, 10, 100, 4) == Completion("abcdefgh", 12, 10, "stop")
    assert spend("abcdefgh", 2, 100, 100, 4) == Completion("", 100, 100, "length")
    assert spend("abcdefgh", 2, 150, 100, 4) == Completion("", 100, 100, "length")
    assert spend("abcdefgh", 2, 99, 100, 4) == Completion("abcd", 100, 99, "length")


@pytest.mark.integration  # starts the server as a process
async def test_cli_plays_a_reasoning_model_behind_named_deployments(tiny: bytes, tmp_path: Path) -> None:
    port = _free_port()
    token_file = tmp_path / "admin-token"
    args = [sys.executable, "-m", "local.model_server", "--port", str(port), "--mode", "facts"]
    args += ["--model-name", DATED, "--reasoning", "--image-tokens", "patch:1.9", "--deployments", "vision"]
    args += ["--reasoning-tokens", "low:32", "--admin-token-file", str(token_file)]
    proc = await asyncio.create_subprocess_exec(*args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    auth = {"Authorization": f"Bearer {token_file.read_text().strip() if token_file.exists() else ''}"}
                    async with s.get(base + "/admin/model", headers=auth) as resp:
                        model = (await resp.json())["model"]
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("server did not start")
        assert (model["model_name"], model["reasoning"], model["image_tokens"], model["deployments"]) == (
            DATED,
            True,
            "patch:1.9:1536",
            ["vision"],
        )
        body = {"model": "vision", "messages": user("x", (tiny, "low")), "reasoning_effort": "low"}
        status, answer = await _raw(base, body)
        assert status == 200 and answer["model"] == DATED
        assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == 32
        assert answer["usage"]["prompt_tokens"] == prompt_tokens(["x"], messages=1) + 8
        assert (await _raw(base, {**body, "model": "other"}))[0] == 404
        assert (await _raw(base, {**body, "max_tokens": 10}))[0] == 400
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    bad = await asyncio.create_subprocess_exec(
        *args[:5], "--image-tokens", "hex:3", cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(bad.communicate(), 30)
    assert bad.returncode == 2 and b"image tokens spec" in err
