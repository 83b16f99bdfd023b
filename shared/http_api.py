"""HTTP in and out for POST /api/analyze, with no Functions types (the entry point translates).

Parses multipart, JSON and raw bodies into an `AnalysisRequest`, runs the pipeline,
and is the one place where errors become responses: a JSON error body with the
error's status and code, `Retry-After` on throttling and timeouts, never a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError, ImageTooLarge, InvalidRequest, InvalidSchema, VlmError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 100 * 1024 * 1024  # the Functions host's own request-size limit
FIELDS = ("task", "prompt", "detail", "schema", "labels", "max_tokens", "pages", "strips")


@dataclass
class HttpInput:
    method: str
    headers: dict[str, str]  # lower-case names
    params: dict[str, str]
    body: bytes


@dataclass
class HttpOutput:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def json_bytes(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False).encode()


def error_response(err: VlmError) -> HttpOutput:
    """The one mapping from an error to a response."""
    headers = {}
    if err.retry_after_s is not None or err.status in (429, 503, 504):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s or 10)))
    return HttpOutput(err.status, err.to_dict(), headers)


_PARAM = re.compile(r'(\w+)\*?=(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))')


def _params(header: str) -> dict[str, str]:
    """`form-data; name="file"; filename="a.jpg"` -> {"name": "file", "filename": "a.jpg"}."""
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _PARAM.finditer(header)}


def _multipart(content_type: str, body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """A plain multipart/form-data split (RFC 7578). The stdlib email parser takes ~100 ms on a
    3 MB photo; splitting on the boundary takes about one copy of the body."""
    boundary = _params(content_type).get("boundary")
    if not boundary:
        raise InvalidRequest("multipart/form-data without a boundary", details={"content_type": content_type})
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InvalidRequest("malformed multipart/form-data body (no closing boundary)")
    images: list[bytes] = []
    fields: dict[str, str] = {}
    for chunk in chunks[1:-1]:
        head, sep, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise InvalidRequest("malformed multipart/form-data part (no header end)")
        content = content.removesuffix(b"\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = _params(headers.get("content-disposition", ""))
        name = disposition.get("name")
        if name in ("file", "files", "image", "images") or "filename" in disposition:
            images.append(content)
        elif name in FIELDS:
            fields[name] = content.decode("utf-8", "replace")
    return images, fields


def _json_body(body: bytes) -> tuple[list[bytes], dict[str, Any]]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("JSON body must be an object with an `images` list")
    raw_images = doc.get("images")
    if not isinstance(raw_images, list) or not raw_images:
        raise InvalidRequest('JSON body needs "images": [{"data": "<base64>"}, ...]', details={"field": "images"})
    images = []
    for n, item in enumerate(raw_images, 1):
        data = item.get("data") if isinstance(item, dict) else item
        if not isinstance(data, str):
            raise InvalidRequest(
                f"images[{n - 1}] needs a base64 `data` string", details={"field": "images", "image": n}
            )
        if data.startswith("data:") and "," in data:
            data = data.split(",", 1)[1]
        try:
            images.append(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidRequest(
                f"images[{n - 1}].data is not valid base64", details={"field": "images", "image": n}
            ) from None
    return images, {k: doc[k] for k in FIELDS if k in doc}


def parse_request(inp: HttpInput, max_bytes: int, default_task: str, default_detail: str) -> Any:
    """-> AnalysisRequest. Fields come from the body (multipart/JSON) or the query string (raw body)."""
    from .pipeline import AnalysisRequest
    from .tasks import parse_labels

    if inp.method.upper() != "POST":
        raise InvalidRequest("use POST")
    if len(inp.body) > MAX_BODY_BYTES:  # each image is checked against MAX_IMAGE_BYTES after parsing
        raise ImageTooLarge(
            f"request body of {len(inp.body)} bytes is over the {MAX_BODY_BYTES} byte limit; send fewer or smaller images",
            details={"limit": MAX_BODY_BYTES},
        )
    content_type = inp.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    fields: dict[str, Any] = dict(inp.params)
    fields.pop("code", None)
    if media == "multipart/form-data":
        images, form = _multipart(content_type, inp.body)
        fields.update(form)
    elif media == "application/json":
        images, doc = _json_body(inp.body)
        fields.update(doc)
    else:
        images = [inp.body] if inp.body else []
    if not images:
        raise InvalidRequest(
            "no image: send multipart `file` parts, a JSON `images` list, or the raw image as the body",
            details={"field": "images"},
        )

    schema = fields.get("schema")
    if isinstance(schema, str) and schema.strip():
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidSchema(f"schema is not valid JSON: {exc}", details={"field": "schema"}) from None
    if schema is not None and schema != "" and not isinstance(schema, dict):
        raise InvalidSchema("schema must be a JSON object (a JSON Schema)", details={"field": "schema"})
    task = str(fields.get("task") or ("schema" if schema else default_task))
    max_tokens = fields.get("max_tokens")
    if max_tokens not in (None, ""):
        try:
            max_tokens = int(max_tokens)
        except (TypeError, ValueError):
            raise InvalidRequest("max_tokens must be an integer", details={"field": "max_tokens"}) from None
    else:
        max_tokens = None
    strips = str(fields.get("strips", "")).lower() in ("1", "true", "yes", "on")
    cache_control = inp.headers.get("cache-control", "").lower()
    return AnalysisRequest(
        images=images,
        task=task,
        prompt=(str(fields["prompt"]) if fields.get("prompt") else None),
        detail=str(fields.get("detail") or default_detail),
        schema=schema or None,
        labels=parse_labels(fields.get("labels")),
        max_tokens=max_tokens,
        pages=(str(fields["pages"]) if fields.get("pages") else None),
        strips=strips,
        use_cache="no-cache" not in cache_control and "no-store" not in cache_control,
    )


async def handle_analyze(inp: HttpInput, deps: Any = None) -> HttpOutput:
    """POST /api/analyze: the whole request, every error mapped here."""
    try:
        from .pipeline import analyze, get_dependencies

        deps = deps or get_dependencies()
        settings = deps.settings
        req = parse_request(inp, settings.max_image_bytes, settings.default_task, settings.default_detail)
        req.budget_s = settings.request_budget_s
        result = await analyze(req, deps)
        return HttpOutput(200, result.to_dict())
    except VlmError as err:
        if isinstance(err, ConfigurationError):
            log.error("configuration error: %s", err.message)
        elif err.status >= 500 or err.status == 429:
            log.warning("analyze failed: %s %s", err.code, err.message)
        return error_response(err)
    except Exception:
        log.exception("unexpected error in analyze")
        return HttpOutput(500, {"error": {"code": "internal_error", "message": "unexpected error", "details": {}}})
