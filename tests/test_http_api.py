"""Request parsing and the one error->response mapping, without a network."""

from __future__ import annotations

import base64
import json

import pytest

from shared.errors import ALL_ERRORS, ImageTooLarge, InvalidRequest, InvalidSchema, UpstreamThrottled
from shared.http_api import HttpInput, error_response, parse_request


def inp(body: bytes, content_type: str = "", params: dict | None = None, **headers: str) -> HttpInput:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if content_type:
        h["content-type"] = content_type
    return HttpInput("POST", h, params or {}, body)


def parse(i: HttpInput):
    return parse_request(i, max_bytes=1024 * 1024, default_task="describe", default_detail="auto")


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
        (inp(b"x" * (100 * 1024 * 1024 + 1), "image/jpeg"), ImageTooLarge),
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


def test_every_error_maps_to_a_json_body_with_its_status():
    for cls in ALL_ERRORS:
        out = error_response(cls("boom", details={"k": 1}))
        assert out.status == cls.status
        assert out.body == {"error": {"code": cls.code, "message": "boom", "details": {"k": 1}}}
        assert ("Retry-After" in out.headers) == (cls.status in (429, 503, 504))


def test_retry_after_comes_from_the_error():
    out = error_response(UpstreamThrottled("slow", retry_after_s=7.4))
    assert out.headers["Retry-After"] == "7"
