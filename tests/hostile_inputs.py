"""Hostile inputs from issue 10, built from code (no binary files in the repo), cheap and cached.

Two kinds of case:
- `HttpCase`: one POST /api/analyze (body bytes, Content-Type as raw bytes, query fields).
- `BlobCase`: files dropped into a fresh folder of the images container (plus optional blobs in the
  schemas container); `target` is the blob whose record must say `failed` on the first attempt.

Every builder is cached per session (`functools.cache`), so a case costs its bytes once. Cases that
point a `$ref` at a URL take the URL of a listener the test runs (`ref_url`), so that any outbound
connection is seen rather than sent somewhere real.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

BOUNDARY = "hostileBoundary7MA4YWxkTrZu0gW"
EVIL_KEY = "a" * 35 + "!"  # ^(a+)+$ against this backtracks ~2^35 times in Python's re
EVIL_REGEX = "^(a+)+$"


# --- images ------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, *, bit_depth: int = 8, color_type: int = 0, level: int = 9) -> bytes:
    """A PNG of zero pixels written chunk by chunk: a huge canvas costs only its compressed size to
    build (rows are compressed one at a time; nothing of the decoded size is ever held here)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes(1 + (width * channels * bit_depth + 7) // 8)  # filter byte 0 + zero samples
    z = zlib.compressobj(level)
    parts = [z.compress(row) for _ in range(height)]
    idat = b"".join(parts) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@cache
def normal_png() -> bytes:
    """A small, ordinary image with a line of text: the 'normal request' and the good blob."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(im).text((12, 36), "HOSTILE SUITE 2026", fill="black")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@cache
def png_20000x2() -> bytes:
    """Extreme aspect ratio: sent as 2048x0.2 -> 512x1 without a minimum side."""
    return png_raw(20000, 2)


@cache
def png_7071_16bit() -> bytes:
    """~100 KB on the wire, ~100 MB as 16-bit samples and several times that once converted."""
    return png_raw(7071, 7071, bit_depth=16, color_type=0)


@cache
def gif_huge_canvas(frames: int = 3000, side: int = 5000) -> bytes:
    """An animated GIF: a 5000x5000 logical screen, `frames` frames of one pixel each (~20 bytes a frame).
    Seeking to the last frame composites every earlier one onto the full canvas."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    for n in range(frames):
        out += b"\x21\xf9\x04\x04\x01\x00\x00\x00"  # graphic control: disposal 1, delay 1
        out += b"\x2c" + struct.pack("<HHHHB", n % side, 0, 1, 1, 0)
        out += b"\x02\x02\x44\x01\x00"  # LZW min code 2; clear, index 0, end
    out += b"\x3b"
    return bytes(out)


@cache
def tiff_chained_ifds(count: int = 100_000) -> bytes:
    """A little-endian TIFF of `count` one-pixel pages whose IFDs form one long chain (~66 bytes each,
    6.6 MB for 100k: under the stack's 8 MiB image limit, so only a frame budget can stop it early)."""
    entries = 5
    ifd_size = 2 + entries * 12 + 4
    first = 8
    pixel_at = first + count * ifd_size
    out = bytearray(b"II*\x00" + struct.pack("<I", first))
    for n in range(count):
        nxt = first + (n + 1) * ifd_size if n + 1 < count else 0
        out += struct.pack("<H", entries)
        out += struct.pack("<HHII", 256, 4, 1, 1)  # ImageWidth
        out += struct.pack("<HHII", 257, 4, 1, 1)  # ImageLength
        out += struct.pack("<HHII", 262, 3, 1, 1)  # Photometric: black is zero
        out += struct.pack("<HHII", 273, 4, 1, pixel_at)  # StripOffsets
        out += struct.pack("<HHII", 279, 4, 1, 1)  # StripByteCounts
        out += struct.pack("<I", nxt)
    out += b"\x00"
    return bytes(out)


@cache
def pdf_tall_mediabox(height: int = 2147483647) -> bytes:
    """A one-page PDF whose MediaBox is 612 x 2^31-1 points (a hand-written file with a valid xref)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 {height}] /Resources << >> >>".encode(),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# --- schemas -----------------------------------------------------------------------------------


def _object(extra: dict[str, Any] | None = None, **props: Any) -> dict[str, Any]:
    """An object schema whose properties are all required, so the strict conversion keeps them
    non-null and the local model fills every one (a nullable value would be answered null and pruned)."""
    props = props or {"text": {"type": "string"}}
    return {"type": "object", "properties": props, "required": list(props), **(extra or {})}


def ssrf_schemas(ref_url: str) -> dict[str, dict[str, Any]]:
    """`$ref`s to a URL and a local file, under keywords the strict conversion moves into descriptions."""
    return {
        "ssrf_not_http": _object({"not": {"$ref": ref_url}}),
        "ssrf_not_file": _object({"not": {"$ref": "file:///etc/passwd"}}),
        "ssrf_if_http": _object({"if": {"$ref": ref_url}, "then": {"required": ["text"]}}),
        "ssrf_contains_http": _object(
            items={"type": "array", "items": {"type": "string"}, "minItems": 1, "contains": {"$ref": ref_url}}
        ),
        "ssrf_property_http": _object(text={"$ref": ref_url}),
    }


@cache
def redos_schemas() -> dict[str, dict[str, Any]]:
    """Catastrophic backtracking: the local model answers the enum value / the property key, so the
    validator meets the evil string unless the regex engine is linear (or the pattern is refused)."""
    return {
        "redos_pattern": _object(k={"type": "string", "enum": [EVIL_KEY], "pattern": EVIL_REGEX}),
        "redos_pattern_properties": {
            "type": "object",
            "properties": {EVIL_KEY: {"type": "string"}},
            "required": [EVIL_KEY],
            "patternProperties": {EVIL_REGEX: {"type": "integer"}},
        },
        "redos_property_names": {
            "type": "object",
            "properties": {EVIL_KEY: {"type": "string"}},
            "required": [EVIL_KEY],
            "propertyNames": {"pattern": EVIL_REGEX},
        },
        "regex_format_overflow": _object(r={"type": "string", "format": "regex", "enum": ["a{4294967296}"]}),
    }


@cache
def exponential_schema(depth: int = 40) -> dict[str, Any]:
    """$defs d0..dN, each a oneOf of two refs to the next: validating one value costs 2^N."""
    defs = {f"d{k}": {"oneOf": [{"$ref": f"#/$defs/d{k + 1}"}, {"$ref": f"#/$defs/d{k + 1}"}]} for k in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"type": "object", "properties": {"v": {"$ref": "#/$defs/d0"}}, "required": ["v"], "$defs": defs}


@cache
def huge_enum_schema(n: int = 100_000) -> dict[str, Any]:
    """Draft-04 meta-validation checks `enum` with uniqueItems: pairwise for unhashable mixed items."""
    kinds: list[Callable[[int], Any]] = [lambda i: i, str, lambda i: [i], lambda i: {"k": i}]
    items = [kinds[i % 4](i) for i in range(n)]
    return {"$schema": "http://json-schema.org/draft-04/schema#", **_object(e={"enum": items})}


@cache
def nested_not_schema(depth: int = 200) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"not": schema}
    return _object(text=schema)


def all_schemas(ref_url: str) -> dict[str, dict[str, Any]]:
    return {
        **ssrf_schemas(ref_url),
        **redos_schemas(),
        "exponential_oneof": exponential_schema(),
        "huge_enum_draft4": huge_enum_schema(),
        "nested_not_200": nested_not_schema(),
        "root_not_self_ref": {"not": {"$ref": "#/not"}},
    }


# --- HTTP cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpBody:
    body: bytes
    content_type: bytes  # raw header bytes: some cases are not latin-1
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpCase:
    id: str
    build: Callable[[str], HttpBody]  # ref_url -> request
    model_call_allowed: bool = False  # the problem may only show in the model's answer
    ok_statuses: frozenset[int] = frozenset()  # besides 4xx (a linear regex engine may accept)


def multipart(fields: dict[str, str | bytes], files: list[bytes] | None = None, boundary: str = BOUNDARY) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + data + b"\r\n"
    for n, data in enumerate(files if files is not None else [normal_png()]):
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f{n}.png"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}".encode()


def form(fields: dict[str, str | bytes], files: list[bytes] | None = None) -> HttpBody:
    return HttpBody(multipart(fields, files), MULTIPART)


def json_body(text: str | bytes) -> HttpBody:
    return HttpBody(text.encode() if isinstance(text, str) else text, b"application/json")


def _b64_png() -> str:
    import base64

    return base64.b64encode(normal_png()).decode()


def schema_case(name: str, *, model_call_allowed: bool = False, ok: frozenset[int] = frozenset()) -> HttpCase:
    def build(ref_url: str) -> HttpBody:
        schema = all_schemas(ref_url)[name]
        return json_body(json.dumps({"images": [{"data": _b64_png()}], "task": "schema", "schema": schema}))

    return HttpCase(f"schema-{name}", build, model_call_allowed, ok)


@cache
def _header_bomb() -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"; {"a" * 200_000}\r\n\r\n'
    return head.encode() + normal_png() + f"\r\n--{BOUNDARY}--\r\n".encode()


@cache
def _empty_parts(n: int = 1_700_000) -> bytes:
    """9 bytes a part with the one-letter boundary `B`: 15 MB, far under the host's body limit."""
    return b"--B\r\n\r\n\r\n" * n + b"--B--\r\n"


@cache
def _deep_json(depth: int = 100_000) -> bytes:
    return b'{"images": [{"data": "' + _b64_png().encode() + b'"}], "x": ' + b"[" * depth + b"]" * depth + b"}"


def http_cases() -> list[HttpCase]:
    png = normal_png
    cases = [
        # control: refused correctly today; shows the measurements themselves pass
        HttpCase("control-not-an-image", lambda _: HttpBody(b"plain text, not an image\n", b"text/plain")),
        *(schema_case(n) for n in ssrf_schemas("http://x")),
        schema_case("redos_pattern", model_call_allowed=True),
        schema_case("redos_pattern_properties", model_call_allowed=True, ok=frozenset({200})),
        schema_case("redos_property_names", model_call_allowed=True),
        # a valid schema: the answer is checked with RE2, which refuses the repeat count; a 200 or a 422
        # is right, a 500 (Python's OverflowError, the original bug) is not
        schema_case("regex_format_overflow", model_call_allowed=True, ok=frozenset({200, 422})),
        schema_case("exponential_oneof", model_call_allowed=True),
        schema_case("huge_enum_draft4"),
        schema_case("nested_not_200"),
        schema_case("root_not_self_ref"),
        HttpCase("multipart-200kb-part-header", lambda _: HttpBody(_header_bomb(), MULTIPART)),
        HttpCase("multipart-1.7m-empty-parts", lambda _: HttpBody(_empty_parts(), b"multipart/form-data; boundary=B")),
        HttpCase(
            "multipart-boundary-euro",
            lambda _: HttpBody(multipart({}, boundary="€"), "multipart/form-data; boundary=€".encode()),
        ),
        HttpCase("gif-5000x5000-pages-3000", lambda _: form({"pages": "3000"}, [gif_huge_canvas()])),
        HttpCase("tiff-100k-chained-ifds", lambda _: form({"task": "ocr"}, [tiff_chained_ifds()])),
        HttpCase(
            "pdf-mediabox-2147483647-strips",
            lambda _: form({"task": "ocr", "strips": "true"}, [pdf_tall_mediabox()]),
        ),
        HttpCase("png-20000x2", lambda _: form({}, [png_20000x2()])),
        HttpCase("png-7071x7071-16bit-x10", lambda _: form({"task": "ocr"}, [png_7071_16bit()] * 10)),
        HttpCase("prompt-1mb", lambda _: form({"prompt": "a" * 1_000_000}, [png()])),
        HttpCase("json-nested-100k", lambda _: json_body(_deep_json())),
        HttpCase("schema-field-100k-brackets", lambda _: form({"task": "schema", "schema": "[" * 100_000})),
        HttpCase("labels-50k-brackets", lambda _: form({"task": "classify", "labels": "[" * 50_000})),
        HttpCase(
            "max-tokens-1e400",
            lambda _: json_body('{"images": [{"data": "' + _b64_png() + '"}], "max_tokens": 1e400}'),
        ),
        HttpCase(
            "function-key-not-utf8",
            lambda _: HttpBody(multipart({}), MULTIPART, headers={"x-functions-key": b"\xff\xfe\x80key"}),
        ),
    ]
    return cases


# --- blob cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobCase:
    id: str
    build: Callable[[str], dict[str, bytes]]  # ref_url -> {relative name: bytes} (in upload order)
    target: str  # relative name of the blob whose record must be `failed`
    schemas: Callable[[str], dict[str, bytes]] = lambda _: {}  # blobs for the schemas container
    codes: frozenset[str] = frozenset()  # acceptable error codes (empty: any 4xx-class code)
    model_call_allowed: bool = False
    must_fail: bool = True  # False: within budget on the first attempt is enough (it may be analysed)


def _task(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def blob_schema_case(name: str, *, model_call_allowed: bool = False) -> BlobCase:
    """The schema as a blob in the schemas container, named by the folder's `_task.json`."""

    def schemas(ref_url: str) -> dict[str, bytes]:
        return {f"hostile-{name}.json": json.dumps(all_schemas(ref_url)[name]).encode()}

    return BlobCase(
        f"schemas-container-{name}",
        lambda _: {"_task.json": _task({"task": "schema", "schema": f"hostile-{name}"}), "doc.png": normal_png()},
        "doc.png",
        schemas,
        model_call_allowed=model_call_allowed,
    )


LONG_NAME = "n" * 1100 + ".png"


def blob_cases() -> list[BlobCase]:
    png = normal_png
    invalid_config = frozenset({"invalid_task_config"})
    return [
        # control: refused correctly today; shows the measurements themselves pass
        BlobCase(
            "control-not-an-image",
            lambda _: {"a.png": b"plain text\n"},
            "a.png",
            codes=frozenset({"unsupported_media_type"}),
        ),
        BlobCase(
            "task-json-max-tokens-lots",
            lambda _: {"_task.json": _task({"task": "describe", "max_tokens": "lots"}), "a.png": png()},
            "a.png",
            codes=invalid_config,
        ),
        BlobCase(
            "task-json-pages-int",
            lambda _: {"_task.json": _task({"task": "ocr", "pages": 3}), "a.png": png()},
            "a.png",
            codes=invalid_config,
        ),
        BlobCase(
            "task-json-inline-ssrf-file",
            lambda u: {
                "_task.json": _task({"task": "schema", "schema": ssrf_schemas(u)["ssrf_not_file"]}),
                "a.png": png(),
            },
            "a.png",
        ),
        BlobCase(
            "task-json-inline-root-not-self-ref",
            lambda _: {"_task.json": _task({"task": "schema", "schema": {"not": {"$ref": "#/not"}}}), "a.png": png()},
            "a.png",
        ),
        blob_schema_case("ssrf_not_http"),
        blob_schema_case("nested_not_200"),
        BlobCase(
            "manifest-dotdot-path",
            lambda _: {
                "_task.json": _task({"task": "compare"}),
                "a.png": png(),
                "_manifest.json": json.dumps({"images": ["a.png", "../../cache/x"]}).encode(),
            },
            "_manifest.json",
        ),
        BlobCase(
            "manifest-leading-slash",
            lambda _: {
                "_task.json": _task({"task": "compare"}),
                "a.png": png(),
                "_manifest.json": json.dumps({"images": ["a.png", "/results/x"]}).encode(),
            },
            "_manifest.json",
        ),
        BlobCase(
            "gif-5000x5000-pages-3000",
            lambda _: {"_task.json": _task({"task": "describe", "pages": "3000"}), "a.gif": gif_huge_canvas()},
            "a.gif",
        ),
        BlobCase(
            "tiff-100k-chained-ifds",
            lambda _: {"_task.json": _task({"task": "ocr"}), "a.tif": tiff_chained_ifds()},
            "a.tif",
        ),
        BlobCase(
            "pdf-mediabox-2147483647-strips",
            lambda _: {"_task.json": _task({"task": "ocr", "strips": True}), "a.pdf": pdf_tall_mediabox()},
            "a.pdf",
        ),
        BlobCase("png-20000x2", lambda _: {"a.png": png_20000x2()}, "a.png"),
        # one such image may fit the decoded-bytes budget (ten in one HTTP request may not)
        BlobCase(
            "png-7071x7071-16bit",
            lambda _: {"a.png": png_7071_16bit()},
            "a.png",
            model_call_allowed=True,
            must_fail=False,
        ),
    ]


# --- a listener that records connections ---------------------------------------------------------


class SilentListener:
    """Accepts TCP connections on a free 127.0.0.1 port, records them, never answers (the worst
    case for a client: a fetch that hangs). `url` is what hostile `$ref`s point at."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/secret.json"
        self.connections: list[tuple[str, int]] = []
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-listener", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(addr)
            self._held.append(conn)  # keep it open, say nothing

    def __enter__(self) -> SilentListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for conn in self._held:
            conn.close()
        self.sock.close()


# --- driving the local stack ---------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(host_url: str, key: str, req: HttpBody, timeout_s: float = 60.0) -> Answer:
    """POST /api/analyze with http.client, so header values can be raw bytes (`boundary=€`, a
    non-UTF-8 key). A timeout raises TimeoutError: the caller reports it as a stalled host."""
    import http.client
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(host_url)
    params = dict(req.params)
    if "x-functions-key" not in req.headers:
        params["code"] = key
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.putrequest("POST", "/api/analyze?" + urlencode(params))
        conn.putheader("Content-Type", req.content_type)
        conn.putheader("Content-Length", str(len(req.body)))
        conn.putheader("Cache-Control", "no-cache")
        for name, value in req.headers.items():
            conn.putheader(name, value)
        conn.endheaders(req.body)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def normal_request() -> HttpBody:
    """An ordinary request: one small PNG, task describe (the cache is bypassed by `send`)."""
    return form({"task": "describe", "detail": "low"}, [normal_png()])


class ProcessProbe:
    """CPU seconds and peak-RSS growth of one process, from /proc (not wall clock). Peak RSS is
    VmHWM after resetting it through clear_refs, so a spike freed before `stop` still counts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu0 = 0.0
        self.rss0 = 0

    def cpu_s(self) -> float:
        import os

        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.rss0 = self._status_kb("VmRSS")
        self.cpu0 = self.cpu_s()

    def stop(self) -> tuple[float, float]:
        """-> (CPU seconds used, peak RSS growth in MB) since `start`."""
        return self.cpu_s() - self.cpu0, (self._status_kb("VmHWM") - self.rss0) / 1024
