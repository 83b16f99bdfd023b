"""Request parsing and the one error->response mapping, without a network."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging

import pytest

from shared.app import App
from shared.errors import ALL_ERRORS, ImageTooLarge, InvalidRequest, InvalidSchema, UpstreamThrottled, VlmError
from shared.http_api import HttpInput, error_response, handle_analyze, parse_request
from shared.settings import Settings, StorageSettings
from tests.constants import TEST_DEPLOYMENT

SETTINGS = Settings(
    vlm_endpoint="http://model.test/v1", storage=StorageSettings(connection_string="x"), vlm_deployment=TEST_DEPLOYMENT
)


def inp(body: bytes, content_type: str = "", params: dict | None = None, **headers: str) -> HttpInput:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if content_type:
        h["content-type"] = content_type
    return HttpInput("POST", h, params or {}, body)


def parse(i: HttpInput, **limits):
    return parse_request(i, dataclasses.replace(SETTINGS, **limits))


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_multipart_files_and_fields():
    body, ct = multipart(
        [
            ("file", "a.jpg", b"\xff\xd8\xffA"),
            ("file", "b.png", b"\x89PNG\r\n\x1a\nB"),
            ("task", None, b"compare"),
            ("prompt", None, "Vergleiche die Größe".encode()),
            ("max_tokens", None, b"300"),
            ("detail", None, b"low"),
        ]
    )
    req = parse(inp(body, ct))
    assert req.images == [b"\xff\xd8\xffA", b"\x89PNG\r\n\x1a\nB"]
    assert (req.task, req.prompt, req.max_tokens, req.detail) == ("compare", "Vergleiche die Größe", 300, "low")
    assert req.use_cache


def test_multipart_quoted_boundary_and_boundary_like_bytes_inside_a_file():
    payload = b"\xff\xd8\xff--not-the-boundary\r\n\r\n--q"
    body, _ = multipart([("file", "a.jpg", payload), ("task", None, b"ocr")], boundary="q q")
    req = parse(inp(body, 'multipart/form-data; boundary="q q"'))
    assert req.images == [payload] and req.task == "ocr"


def test_json_body_with_base64_and_data_urls():
    a = base64.b64encode(b"\xff\xd8\xffA").decode()
    body = {
        "images": [{"data": a}, {"data": "data:image/png;base64," + a}],
        "task": "classify",
        "labels": ["cat", "dog"],
        "schema": None,
    }
    req = parse(inp(json.dumps(body).encode(), "application/json"))
    assert req.images == [b"\xff\xd8\xffA"] * 2
    assert req.labels == ["cat", "dog"] and req.task == "classify"


def test_raw_body_takes_fields_from_the_query_and_ignores_the_key():
    req = parse(inp(b"\xff\xd8\xff", "image/jpeg", {"task": "ocr", "code": "secret", "labels": "a, b"}))
    assert req.images == [b"\xff\xd8\xff"] and req.task == "ocr" and req.labels == ["a", "b"]


def test_schema_implies_the_schema_task_and_no_cache_header_bypasses_the_cache():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    req = parse(inp(b"x", "image/jpeg", {"schema": json.dumps(schema)}, cache_control="no-cache"))
    assert req.task == "schema" and req.schema == schema and req.use_cache is False


@pytest.mark.parametrize(
    ("i", "error"),
    [
        (inp(b"", "image/jpeg"), InvalidRequest),
        (inp(b"{", "application/json"), InvalidRequest),
        (inp(b'{"images": []}', "application/json"), InvalidRequest),
        (inp(b'{"images": [{"data": "@@@"}]}', "application/json"), InvalidRequest),
        (inp(b"x", "image/jpeg", {"schema": "{bad"}), InvalidSchema),
        (inp(b"x", "image/jpeg", {"schema": "[1]"}), InvalidSchema),
        (inp(b"x", "image/jpeg", {"max_tokens": "many"}), InvalidRequest),
        (inp(b"x", "image/jpeg", {"labels": "[1, 2]"}), InvalidRequest),
        (inp(b"--a\r\n\r\nx\r\n--a--", "multipart/form-data"), InvalidRequest),  # no boundary parameter
        (
            inp(b"--a\r\nContent-Disposition: form-data; name=file\r\n\r\nxx", "multipart/form-data; boundary=a"),
            InvalidRequest,
        ),
    ],
)
def test_bad_requests_raise_typed_errors(i, error):
    with pytest.raises(error):
        parse(i)


def test_a_body_over_max_request_bytes_is_refused_before_parsing():
    body, ct = multipart([("file", "a.jpg", b"x" * 2000)])
    with pytest.raises(ImageTooLarge) as info:
        parse(inp(body, ct), max_request_bytes=1000)
    assert info.value.details["limit"] == 1000


def test_every_error_maps_to_a_json_body_with_its_status():
    for cls in ALL_ERRORS:
        out = error_response(cls("boom", details={"k": 1}))
        assert out.status == cls.status
        assert out.body == {"error": {"code": cls.code, "message": "boom", "details": {"k": 1}}}
        assert ("Retry-After" in out.headers) == (cls.status in (429, 503, 504))


def test_retry_after_comes_from_the_error():
    out = error_response(UpstreamThrottled("slow", retry_after_s=7.4))
    assert out.headers["Retry-After"] == "7"


# --- hostile multipart --------------------------------------------------------------


@pytest.mark.parametrize("boundary", ["€", "a" * 71, "", '"ends in a space "', "a<b"])
def test_a_non_ascii_or_overlong_boundary_is_a_400(boundary):
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=file\r\n\r\nxx\r\n--{boundary}--\r\n".encode()
    with pytest.raises(InvalidRequest) as info:
        parse(inp(body, f"multipart/form-data; boundary={boundary}"))
    assert info.value.details["field"] == "content-type"


def test_a_200_kb_part_header_is_refused_at_the_header_cap():
    header = b"Content-Disposition: form-data; name=file; " + b"w" * 200_000
    body = b"--a\r\n" + header + b"\r\n\r\nxx\r\n--a--\r\n"
    with pytest.raises(InvalidRequest) as info:
        parse(inp(body, "multipart/form-data; boundary=a"))
    assert info.value.details["limit"] == SETTINGS.max_part_header_bytes
    assert "www" not in info.value.message


def test_millions_of_empty_parts_stop_at_the_part_cap():
    body = b"--a\r\n\r\n\r\n" * 1_700_000 + b"--a--\r\n"
    with pytest.raises(InvalidRequest) as info:
        parse(inp(body, "multipart/form-data; boundary=a"), max_request_bytes=len(body))
    assert info.value.details["limit"] == SETTINGS.max_multipart_parts


def test_an_image_part_over_max_image_bytes_stops_the_parse():
    body, ct = multipart([("file", "a.jpg", b"x" * 5000), ("file", "b.jpg", b"y")])
    with pytest.raises(ImageTooLarge) as info:
        parse(inp(body, ct), max_image_bytes=4000)
    assert info.value.details == {"field": "images", "image": 1, "limit": 4000}


def test_too_many_image_parts_are_refused_while_parsing():
    body, ct = multipart([("images", None, b"x")] * 60)
    with pytest.raises(InvalidRequest) as info:
        parse(inp(body, ct))
    assert info.value.details["field"] == "images"


def test_an_oversized_form_field_is_refused_while_parsing():
    body, ct = multipart([("file", "a.jpg", b"x"), ("prompt", None, b"p" * 200_000)])
    with pytest.raises(InvalidRequest) as info:
        parse(inp(body, ct))
    assert info.value.details["field"] == "prompt"


def test_unknown_parts_are_ignored_and_any_part_with_a_filename_is_an_image():
    body, ct = multipart([("photo", "p.jpg", b"P"), ("image", None, b"I"), ("colour", None, b"red")])
    req = parse(inp(body, ct))
    assert req.images == [b"P", b"I"]


def test_a_form_field_that_is_not_utf8_is_a_400():
    body, ct = multipart([("file", "a.jpg", b"x"), ("prompt", None, b"\xff\xfe")])
    with pytest.raises(InvalidRequest) as info:
        parse(inp(body, ct))
    assert info.value.details["field"] == "prompt"


# --- hostile JSON and fields --------------------------------------------------------


def b64(data: bytes = b"\xff\xd8\xff") -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[" * 100_000, "body"),
        (b'{"images": ' + b"[" * 100_000, "body"),
        (json.dumps({"images": [b64()], "schema": "[" * 60_000}).encode(), "schema"),
        (json.dumps({"images": [b64()], "schema": "[" * 100_000}).encode(), "body"),  # items counted first
        (json.dumps({"images": [b64()], "labels": "[" * 50_000}).encode(), "labels"),
        (b'{"images": ["/9j/"], "max_tokens": 1e400}', "body"),
        (b'{"images": ["/9j/"], "max_tokens": NaN}', "body"),
        (b'{"images": ["/9j/"], "max_tokens": ' + b"9" * 5000 + b"}", "body"),
        (json.dumps({"images": [b64()], "max_tokens": 10**30}).encode(), "max_tokens"),
        (json.dumps({"images": [b64()], "max_tokens": True}).encode(), "max_tokens"),
        (json.dumps({"images": [b64()], "max_tokens": 3.0}).encode(), "max_tokens"),
        (json.dumps({"images": [b64()], "prompt": "p" * 20_001}).encode(), "prompt"),
        (json.dumps({"images": [b64()], "pages": 3}).encode(), "pages"),
        (json.dumps({"images": [b64()], "reasoning_effort": "max"}).encode(), "reasoning_effort"),
        (json.dumps({"images": [b64()], "labels": ["x"] * 101}).encode(), "labels"),
        (json.dumps({"images": [b64()], "detail": "ultra"}).encode(), "detail"),
        (json.dumps({"images": [b64()] * 51}).encode(), "images"),
        (json.dumps({"images": [b64()], "task": "paint" * 1000}).encode(), "task"),
    ],
)
def test_hostile_json_gives_a_400_naming_the_field_without_echoing_it(body, field):
    with pytest.raises(VlmError) as info:
        parse(inp(body, "application/json"))
    err = info.value
    assert err.status == 400 and err.details["field"] == field
    assert len(err.message) < 300 and "[[[" not in err.message and "Expecting" not in err.message


@pytest.mark.parametrize("name", ["schema", "labels"])
def test_deeply_nested_query_fields_are_a_400(name):
    with pytest.raises(VlmError) as info:
        parse(inp(b"\xff\xd8\xff", "image/jpeg", {name: "[" * 100_000}))
    assert info.value.status == 400 and info.value.details["field"] == name


def test_json_items_are_counted_before_parsing():
    body = json.dumps({"images": [b64()], "x": [0] * 200_000}).encode()
    with pytest.raises(InvalidRequest, match="too many JSON items"):
        parse(inp(body, "application/json"))


def test_base64_size_is_checked_before_decoding(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image that its length already showed to be too large")

    monkeypatch.setattr("shared.http_api.base64.b64decode", no_decoding)
    body = json.dumps({"images": [b64(b"x" * 3000)]}).encode()
    with pytest.raises(ImageTooLarge) as info:
        parse(inp(body, "application/json"), max_image_bytes=2000)
    assert info.value.details["image"] == 1


def test_reasoning_effort_and_strips_words_reach_the_request():
    body = json.dumps({"images": [b64()], "reasoning_effort": "High", "strips": "on", "pages": "1-3, 5"}).encode()
    req = parse(inp(body, "application/json"))
    assert (req.reasoning_effort, req.strips, req.pages) == ("high", True, "1-3,5")


# --- unexpected errors --------------------------------------------------------------


async def test_an_unexpected_error_is_a_500_with_an_error_id_that_is_also_logged(monkeypatch, caplog):
    async def broken(req, deps):
        raise RuntimeError("secret internals /home/app/key")

    monkeypatch.setattr("shared.pipeline.analyze", broken)
    caplog.set_level(logging.ERROR, logger="shared.http_api")
    out = await handle_analyze(inp(b"\xff\xd8\xff", "image/jpeg"), App.build(SETTINGS))
    assert out.status == 500 and out.body["error"]["code"] == "internal_error"
    error_id = out.body["error"]["details"]["error_id"]
    assert len(error_id) == 12 and "secret" not in out.json_bytes().decode()
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "secret internals" in caplog.text
