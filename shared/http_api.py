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
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, ImageTooLarge, InternalError, InvalidRequest, VlmError
from .options import OPTION_KEYS, OptionLimits, loads_bounded, parse_options
from .settings import Settings, from_settings, mirror

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)

IMAGE_PARTS = ("file", "files", "image", "images")  # and any part with a filename
MAX_CONTENT_TYPE_CHARS = 1024
MAX_PART_HEADERS = 8
# RFC 2046 section 5.1.1: 1-70 characters from this set, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


@dataclass(frozen=True)
class HttpLimits:
    """What one request may cost the parser, from `Settings` (README, Limits)."""

    max_images: int  # a bound before decoding; the pipeline checks the task's exact range
    options: OptionLimits
    max_request_bytes: int = mirror("max_request_bytes")
    max_image_bytes: int = mirror("max_image_bytes")
    max_parts: int = mirror("max_multipart_parts")
    max_part_header_bytes: int = mirror("max_part_header_bytes")

    @classmethod
    def from_settings(cls, s: Settings) -> HttpLimits:
        from .tasks import TASKS

        most = max([s.max_images_per_request, *(spec.max_images or 0 for spec in TASKS.values())])
        return from_settings(cls, s, max_images=most, options=OptionLimits.from_settings(s))


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


def _too_many_images(limits: HttpLimits) -> InvalidRequest:
    return InvalidRequest(
        f"more than {limits.max_images} images in one request", details={"field": "images", "limit": limits.max_images}
    )


def _image_too_large(limits: HttpLimits, n: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"image {n} is over MAX_IMAGE_BYTES ({limits.max_image_bytes} bytes)",
        details={"field": "images", "image": n, "limit": limits.max_image_bytes},
    )


def _boundary(content_type: str) -> bytes:
    from python_multipart.multipart import parse_options_header

    if len(content_type) > MAX_CONTENT_TYPE_CHARS or not content_type.isascii():
        raise InvalidRequest(
            f"Content-Type must be ASCII and at most {MAX_CONTENT_TYPE_CHARS} characters",
            details={"field": "content-type"},
        )
    boundary = parse_options_header(content_type)[1].get(b"boundary", b"")
    if not _BOUNDARY.fullmatch(boundary.decode("ascii")):
        raise InvalidRequest(
            "multipart/form-data needs a boundary of 1-70 RFC 2046 characters", details={"field": "content-type"}
        )
    return boundary


class _Form:
    """Callbacks for python-multipart's streaming parser: collects image parts and option fields,
    and stops the parse (by raising) as soon as a cap is passed."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.images: list[bytes] = []
        self.fields: dict[str, str] = {}
        self.parts = 0
        self.ended = False
        self._headers: dict[str, str] = {}
        self._name: list[bytes] = []
        self._value: list[bytes] = []
        self._kind: str | None = None  # "image", "field" or None (ignored)
        self._field = ""
        self._chunks: list[bytes] = []
        self._size = 0

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda data, start, end: self._name.append(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.append(data[start:end]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise InvalidRequest(
                f"more than {self.limits.max_parts} multipart parts", details={"limit": self.limits.max_parts}
            )
        self._headers, self._kind, self._chunks, self._size = {}, None, [], 0

    def header_end(self) -> None:
        name = b"".join(self._name).decode("latin-1").strip().lower()
        self._headers[name] = b"".join(self._value).decode("latin-1").strip()
        self._name, self._value = [], []

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        params = parse_options_header(self._headers.get("content-disposition", ""))[1]
        name = params.get(b"name", b"").decode("latin-1")
        if name in IMAGE_PARTS or b"filename" in params:
            if len(self.images) >= self.limits.max_images:
                raise _too_many_images(self.limits)
            self._kind = "image"
        elif name in OPTION_KEYS:
            self._kind, self._field = "field", name

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._kind is None:
            return
        self._size += end - start
        if self._kind == "image" and self._size > self.limits.max_image_bytes:
            raise _image_too_large(self.limits, len(self.images) + 1)
        if self._kind == "field" and self._size > self.limits.options.max_field_bytes:
            raise InvalidRequest(
                f"form field {self._field} is over {self.limits.options.max_field_bytes} bytes",
                details={"field": self._field},
            )
        self._chunks.append(data[start:end])

    def part_end(self) -> None:
        content = b"".join(self._chunks)
        if self._kind == "image":
            self.images.append(content)
        elif self._kind == "field":
            try:
                self.fields[self._field] = content.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(
                    f"form field {self._field} is not UTF-8 text", details={"field": self._field}
                ) from None
        self._kind, self._chunks = None, []

    def end(self) -> None:
        self.ended = True


def _multipart(content_type: str, body: bytes, limits: HttpLimits) -> tuple[list[bytes], dict[str, str]]:
    """multipart/form-data (RFC 7578) through python-multipart's streaming parser, with caps on
    header lines, headers per part, parts, and bytes per part checked while it runs."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser

    form = _Form(limits)
    try:
        parser = MultipartParser(
            _boundary(content_type),
            form.callbacks(),
            max_header_count=MAX_PART_HEADERS,
            max_header_size=limits.max_part_header_bytes,
        )
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise InvalidRequest(
            f"malformed multipart/form-data body (or a part header over {limits.max_part_header_bytes} bytes, "
            f"or over {MAX_PART_HEADERS} headers in a part)",
            details={"limit": limits.max_part_header_bytes},
        ) from None
    if not form.ended:
        raise InvalidRequest("malformed multipart/form-data body (no closing boundary)")
    return form.images, form.fields


def _json_body(body: bytes, limits: HttpLimits) -> tuple[list[bytes], dict[str, Any]]:
    doc = loads_bounded(body, field="body", limits=limits.options)
    if not isinstance(doc, dict):
        raise InvalidRequest("JSON body must be an object with an `images` list", details={"field": "body"})
    raw_images = doc.get("images")
    if not isinstance(raw_images, list) or not raw_images:
        raise InvalidRequest('JSON body needs "images": [{"data": "<base64>"}, ...]', details={"field": "images"})
    if len(raw_images) > limits.max_images:
        raise _too_many_images(limits)
    images = []
    for n, item in enumerate(raw_images, 1):
        data = item.get("data") if isinstance(item, dict) else item
        if not isinstance(data, str) or not data:
            raise InvalidRequest(
                f"images[{n - 1}] needs a non-empty base64 `data` string", details={"field": "images", "image": n}
            )
        if data.startswith("data:"):
            data = data.partition(",")[2]
        if len(data) // 4 * 3 > limits.max_image_bytes:  # base64's length tells the size before decoding
            raise _image_too_large(limits, n)
        try:
            images.append(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidRequest(
                f"images[{n - 1}].data is not valid base64", details={"field": "images", "image": n}
            ) from None
    return images, {k: doc[k] for k in OPTION_KEYS if k in doc}


def parse_request(inp: HttpInput, settings: Settings) -> Any:
    """-> AnalysisRequest. Fields come from the query string, then the body (multipart/JSON) on top."""
    from .pipeline import AnalysisRequest

    limits = HttpLimits.from_settings(settings)
    if inp.method.upper() != "POST":
        raise InvalidRequest("use POST")
    if len(inp.body) > limits.max_request_bytes:
        raise ImageTooLarge(
            f"request body is over MAX_REQUEST_BYTES ({limits.max_request_bytes} bytes); send fewer or smaller images",
            details={"limit": limits.max_request_bytes},
        )
    content_type = inp.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    fields: dict[str, Any] = {k: v for k, v in inp.params.items() if k in OPTION_KEYS}
    if media == "multipart/form-data":
        images, form = _multipart(content_type, inp.body, limits)
        fields.update(form)
    elif media == "application/json":
        images, doc = _json_body(inp.body, limits)
        fields.update(doc)
    else:
        if len(inp.body) > limits.max_image_bytes:
            raise _image_too_large(limits, 1)
        images = [inp.body] if inp.body else []
    if not images:
        raise InvalidRequest(
            "no image: send multipart `file` parts, a JSON `images` list, or the raw image as the body",
            details={"field": "images"},
        )
    options = parse_options(
        fields,
        source="http",
        default_task=settings.default_task,
        default_detail=settings.default_detail,
        limits=limits.options,
    )
    cache_control = inp.headers.get("cache-control", "").lower()
    return AnalysisRequest(
        images=images,
        task=options.task,
        prompt=options.prompt,
        detail=options.detail,
        schema=options.schema if isinstance(options.schema, dict) else None,
        labels=options.labels,
        max_tokens=options.max_tokens,
        pages=options.pages,
        strips=options.strips,
        reasoning_effort=options.reasoning_effort,
        use_cache="no-cache" not in cache_control and "no-store" not in cache_control,
    )


async def handle_analyze(inp: HttpInput, app: App | None = None) -> HttpOutput:
    """POST /api/analyze: the whole request, every error mapped here (None: the worker's App, built here
    so that a configuration error is mapped too)."""
    try:
        from .app import get_app
        from .pipeline import analyze

        app = app or get_app()
        settings = app.settings
        req = parse_request(inp, settings)
        req.budget_s = settings.request_budget_s
        result = await analyze(req, app)
        return HttpOutput(200, result.to_dict())
    except VlmError as err:
        if isinstance(err, ConfigurationError):
            log.error("configuration error: %s", err.message)
        elif err.status >= 500 or err.status == 429:
            log.warning("analyze failed: %s %s", err.code, err.message)
        return error_response(err)
    except Exception:
        return error_response(InternalError.logged(log, "unexpected error in analyze"))
