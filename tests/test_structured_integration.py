"""Structured extraction and multi-image analysis over HTTP and blobs, against the local model server.

The local model's answers are modest (OCR plus label matching); these tests check the contract:
strict schemas, validation, one re-ask, the json_object fallback, and multi-image limits.
"""

from __future__ import annotations

import io
import json

import pytest
from jsonschema import Draft202012Validator

from bench import invoice_accuracy
from shared.results import record_names
from shared.task_schemas import INVOICE_SCHEMA
from tests.conftest import CORPUS, corpus
from tests.test_blob_integration import upload, wait_for
from tests.test_http_integration import call

pytestmark = pytest.mark.integration
PHOTOS = sorted(p for p in (CORPUS / "photos").iterdir() if p.suffix == ".jpg")
SMALL = corpus("photos", "gps_tagged_640x480.jpg")


def files(*paths):
    return [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


# One invoice the stand-in's label rules were written against and one held back (bench/invoice_accuracy.py
# has the figure over every corpus invoice; OCR on all ten is a benchmark's minute, not a test's).
INVOICES = ("oyo.png", "SammyMaystoneLinesTest.png")


@pytest.mark.parametrize("name", INVOICES)
def test_an_invoice_answer_validates_and_carries_the_invoices_fields(stack, name):
    """The product sends the page and the schema; the answer validates and holds fields read from
    the page (the stand-in's OCR, local/), not an empty shell that merely passes the schema."""
    path = corpus("documents", name)
    status, body, _ = call(
        stack, fields={"file": (path.name, path.read_bytes(), invoice_accuracy.mime(path)), "task": "invoice"}
    )
    assert status == 200, body
    assert list(Draft202012Validator(INVOICE_SCHEMA).iter_errors(body["result"])) == []
    hits = invoice_accuracy.field_hits(invoice_accuracy.expected_fields(path), body["result"])
    assert any(hits.values()), hits


def test_pdf_invoice_becomes_a_multi_image_request(stack):
    pdf = corpus("documents", "AzureInterior.pdf")
    status, body, _ = call(stack, fields={"file": (pdf.name, pdf.read_bytes(), "application/pdf"), "task": "invoice"})
    assert status == 200, body
    assert body["images"][0]["format"] == "pdf" and body["images"][0]["page"] == 1
    assert list(Draft202012Validator(INVOICE_SCHEMA).iter_errors(body["result"])) == []


def test_classify_returns_one_of_the_labels(stack):
    status, body, _ = call(
        stack,
        fields={"file": ("p.jpg", SMALL.read_bytes(), "image/jpeg"), "task": "classify", "labels": "indoor,outdoor"},
    )
    assert status == 200, body
    assert body["result"]["label"] in {"indoor", "outdoor"} and 0 <= body["result"]["confidence"] <= 1
    status, body, _ = call(stack, fields={"file": ("p.jpg", SMALL.read_bytes(), "image/jpeg"), "task": "classify"})
    assert status == 400 and body["error"]["code"] == "invalid_request"


def test_custom_schema_with_optional_fields_and_a_non_object_root(stack):
    schema = {
        "type": "object",
        "properties": {"guest": {"type": "string"}, "nights": {"type": "integer", "minimum": 0}},
        "required": ["guest"],
    }
    png = corpus("documents", "oyo.png").read_bytes()
    status, body, _ = call(stack, fields={"file": ("o.png", png, "image/png"), "schema": json.dumps(schema)})
    assert status == 200, body
    assert body["task"] == "schema" and isinstance(body["result"]["guest"], str)
    assert list(Draft202012Validator(schema).iter_errors(body["result"])) == []
    array_schema = {"type": "array", "items": {"type": "string"}}
    status, body, _ = call(stack, fields={"file": ("o.png", png, "image/png"), "schema": json.dumps(array_schema)})
    assert status == 200 and isinstance(body["result"], list), body


def test_too_deep_schema_is_400_naming_where(stack):
    deep = {"type": "string"}
    for i in range(7):
        deep = {"type": "object", "properties": {f"l{i}": deep}, "required": [f"l{i}"]}
    status, body, _ = call(
        stack, fields={"file": ("p.jpg", SMALL.read_bytes(), "image/jpeg"), "schema": json.dumps(deep)}
    )
    assert status == 400 and body["error"]["code"] == "invalid_schema"
    assert "/properties/l6" in body["error"]["message"]


def test_one_bad_answer_is_reasked_and_usage_counts_both_calls(stack, model_admin, facts_only):
    model_admin.faults(script=["bad_output"])
    before = model_admin.stats()
    png = corpus("documents", "FlipkartInvoice.png").read_bytes()
    status, body, _ = call(
        stack, fields={"file": ("f.png", png, "image/png"), "task": "invoice"}, headers={"Cache-Control": "no-cache"}
    )
    after = model_admin.stats()
    assert status == 200, body
    assert after["requests"] - before["requests"] == 2
    served = after["tokens"]["prompt"] + after["tokens"]["completion"]
    served -= before["tokens"]["prompt"] + before["tokens"]["completion"]
    assert body["usage"]["total_tokens"] == served


def test_two_bad_answers_give_422_with_the_validation_errors(stack, model_admin, facts_only):
    model_admin.faults(script=["bad_output", "bad_output"])
    png = corpus("documents", "FlipkartInvoice.png").read_bytes()
    status, body, _ = call(
        stack, fields={"file": ("f.png", png, "image/png"), "task": "invoice"}, headers={"Cache-Control": "no-cache"}
    )
    assert status == 422 and body["error"]["code"] == "model_output_invalid"
    assert body["error"]["details"]["errors"] and body["error"]["details"]["calls"] == 2


def test_refusal_and_truncation_are_422(stack, model_admin):
    png = corpus("documents", "oyo.png").read_bytes()
    # An answer cut at our guessed budget is asked again at the caller's: only a second cut is final.
    for script, code in ((["refusal"], "refused"), (["finish_length", "finish_length"], "output_truncated")):
        model_admin.faults(script=script)
        status, body, _ = call(
            stack, fields={"file": ("o.png", png, "image/png"), "task": "table"}, headers={"Cache-Control": "no-cache"}
        )
        assert status == 422 and body["error"]["code"] == code, body


def test_endpoint_without_json_schema_falls_back_to_json_object(stack, model_admin):
    model_admin.config(json_schema=False)
    try:
        png = corpus("documents", "oyo.png").read_bytes()
        status, body, _ = call(
            stack,
            fields={"file": ("o.png", png, "image/png"), "task": "invoice"},
            headers={"Cache-Control": "no-cache"},
        )
    finally:
        model_admin.config(json_schema=True)
    assert status == 200, body
    assert list(Draft202012Validator(INVOICE_SCHEMA).iter_errors(body["result"])) == []


def test_compare_takes_2_to_10_images(stack, facts_only):
    status, body, _ = call(stack, fields=[("task", "compare"), *files(SMALL)])
    assert status == 400 and body["error"]["details"]["got"] == 1
    status, body, _ = call(stack, fields=[("task", "compare"), *files(*([SMALL] * 11))])
    assert status == 400 and body["error"]["details"]["got"] == 11
    status, body, _ = call(
        stack, fields=[("task", "compare"), *files(SMALL, corpus("photos", "trailcam_2048x1536.jpg"))]
    )
    assert status == 200, body
    assert "[Image 1]" in body["result"] and "[Image 2]" in body["result"] and len(body["images"]) == 2


def test_sequence_over_12_photos_gives_items_and_a_synthesis(stack, facts_only):
    from PIL import Image

    photos = (PHOTOS + sorted((CORPUS / "orientation").glob("landscape_*.jpg")))[:12]
    assert len(photos) == 12
    parts = []
    for p in photos:  # shrink first: the test is about the task, not upload size
        im = Image.open(p)
        im.thumbnail((640, 640))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG")
        parts.append(("file", (p.name, buf.getvalue(), "image/jpeg")))
    status, body, _ = call(stack, fields=[("task", "sequence"), *parts])
    assert status == 200, body
    result = body["result"]
    assert [i["image"] for i in result["items"]] == list(range(1, 13))
    assert all(i["analysis"] for i in result["items"])
    assert set(result["synthesis"]) == {"themes", "changes", "insights", "recommendations"}
    assert len(body["images"]) == 12 and body["usage"]["estimated_image_tokens"] == sum(
        i["estimated_tokens"] for i in body["images"]
    )


def test_blob_folder_with_a_named_schema_and_a_manifest_job(stack):
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(stack.connection_string)
    schemas = svc.get_container_client("schemas")
    if not schemas.exists():
        schemas.create_container()
    schema = {"type": "object", "properties": {"guest": {"type": ["string", "null"]}}, "required": ["guest"]}
    schemas.upload_blob("guest.json", json.dumps(schema), overwrite=True)
    upload(stack, "structured/_task.json", json.dumps({"task": "schema", "schema": "guest"}).encode())
    upload(stack, "structured/oyo.png", corpus("documents", "oyo.png").read_bytes())
    got = wait_for(stack, ["structured/oyo.png"], "structured/")
    rec = got[record_names("structured/oyo.png").success]
    assert rec["task"] == "schema" and "guest" in rec["result"]

    upload(stack, "jobs/pair/_task.json", json.dumps({"task": "compare"}).encode())
    upload(stack, "jobs/pair/a.jpg", SMALL.read_bytes())
    upload(stack, "jobs/pair/b.jpg", corpus("photos", "trailcam_2048x1536.jpg").read_bytes())
    upload(stack, "jobs/pair/_manifest.json", json.dumps({"images": ["a.jpg", "b.jpg"]}).encode())
    got = wait_for(stack, ["jobs/pair/_manifest.json"], "jobs/")
    job = got[record_names("jobs/pair/_manifest.json").success]
    assert job["task"] == "compare" and "[Image 2]" in job["result"] and len(job["images"]) == 2
    assert not any(k.startswith(("jobs/pair/a.jpg", "jobs/pair/b.jpg")) for k in got)  # parts of the job
