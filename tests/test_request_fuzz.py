"""Property-based fuzzing of the request parser: any body, content type, query or field gives
either an AnalysisRequest or a VlmError with a 4xx status, never another exception."""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.blob_job import InvalidTaskConfig, _parse_task_file
from shared.errors import VlmError
from shared.http_api import HttpInput, parse_request
from shared.options import OPTION_KEYS, OptionLimits, parse_options
from shared.pipeline import AnalysisRequest
from shared.settings import Settings, StorageSettings
from tests.constants import TEST_DEPLOYMENT

SETTINGS = Settings(
    vlm_endpoint="http://model.test/v1",
    storage=StorageSettings(connection_string="x"),
    vlm_deployment=TEST_DEPLOYMENT,
    max_image_bytes=4096,
    max_multipart_parts=16,
    max_prompt_chars=200,
    schema_max_bytes=2048,
    max_json_depth=8,
)
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = st.sampled_from((*OPTION_KEYS, "images", "code", "data"))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
option_values = st.one_of(
    json_values,
    st.sampled_from(["", "on", "off", "1-3,5", "low", "high", "ocr", "classify", "schema", "xhigh", "[", "{", "1e400"]),
    st.text(alphabet="[{\"'},]:0123456789-, ", max_size=60),
)
b64_images = st.lists(
    st.one_of(
        st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
        st.binary(max_size=64).map(lambda b: {"data": "data:image/png;base64," + base64.b64encode(b).decode()}),
        json_values,
    ),
    max_size=4,
)


def check(inp: HttpInput) -> None:
    try:
        req = parse_request(inp, SETTINGS)
    except VlmError as err:
        assert 400 <= err.status < 500, (err.status, err.message)
        assert len(err.message) < 600
        return
    assert isinstance(req, AnalysisRequest) and req.images


@FUZZ
@given(st.binary(max_size=512), st.text(max_size=80), st.dictionaries(KEYS, st.text(max_size=30), max_size=4))
def test_any_body_with_any_content_type(body, content_type, params):
    check(HttpInput("POST", {"content-type": content_type}, params, body))


@FUZZ
@given(st.dictionaries(KEYS, option_values, max_size=6), b64_images)
def test_json_bodies(doc, images):
    doc = {**doc, "images": images} if images or "images" not in doc else doc
    check(HttpInput("POST", {"content-type": "application/json"}, {}, json.dumps(doc).encode()))


part = st.tuples(
    st.one_of(KEYS, st.text(max_size=12)),
    st.one_of(st.none(), st.text(max_size=12)),
    st.one_of(
        st.binary(max_size=64), option_values.map(lambda v: (v if isinstance(v, str) else json.dumps(v)).encode())
    ),
)


@FUZZ
@given(
    st.lists(part, max_size=20),
    st.text(alphabet="abcXYZ019'()+_,-./:=? \u20ac\"", min_size=0, max_size=80),
    st.booleans(),
)
def test_multipart_bodies(parts, boundary, close):
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode() if close else b""
    check(HttpInput("POST", {"content-type": f"multipart/form-data; boundary={boundary}"}, {}, out))


@FUZZ
@given(st.dictionaries(KEYS, option_values, max_size=8), st.sampled_from(["http", "metadata", "a/_task.json"]))
def test_options_from_any_source(fields, source):
    try:
        opts = parse_options(
            fields, source=source, default_task="describe", default_detail="auto", limits=OptionLimits(max_json_depth=8)
        )
    except VlmError as err:
        assert 400 <= err.status < 500 and err.details.get("field")
        return
    assert opts.max_tokens is None or 1 <= opts.max_tokens <= OptionLimits().max_tokens
    assert isinstance(opts.strips, bool)


@FUZZ
@given(
    st.one_of(st.binary(max_size=200), st.dictionaries(KEYS, option_values, max_size=6).map(json.dumps).map(str.encode))
)
def test_task_files(raw):
    try:
        doc = _parse_task_file(raw, "f/_task.json")
    except InvalidTaskConfig as err:
        assert "f/_task.json" in err.message and not err.transient
        return
    assert isinstance(doc, dict) and isinstance(doc["task"], str)
